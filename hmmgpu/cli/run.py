"""``hmmgpu run WORKLOAD``: one workload under one driver configuration, with a live table.

The point is built and checked (hmmgpu/experiments.py: the workload, its size and parameters,
the policies, the oversubscription ratio) before anything runs; the live table shows the kernels
as they launch; then the result check, modelled and wall time, and the driver's counters.
"""
import argparse
import json
import time

from ._common import (UserError, available_ram_bytes, check_backend, check_writable, console, emit_json, fmt_bytes,
                      print_trace_summary, recording, trace_written, wrap)

HELP = "run one workload (UVMBench program, access pattern, trace) and check its result"
DESCRIPTION = ("Run one workload of hmmgpu.workloads on a fresh emulated machine: its arrays in a process "
               "(the CPU writes the input), its kernels as device jobs through a driver whose device memory "
               "is the footprint divided by the oversubscription ratio, then its result checked exactly "
               "against plain NumPy.  A live table shows the kernels as they launch; then the check, "
               "modelled and wall time, faults, migrated bytes, evictions and the driver's counters.  Exit "
               "status 1 when the check fails, 2 for a mistake in the call.")

EPILOG = """\
examples:
  hmmgpu run --list                         the workloads and their default footprints
  hmmgpu run gemm                           GEMM at its default size, device memory = footprint
  hmmgpu run atax --footprint 10M --oversub 1.25
                                            working set 1.25 x device memory (UVMBench's 125%)
  hmmgpu run hotspot --footprint 4M --seed 3
  hmmgpu run kmeans --param reps=5 --json > kmeans.json
  hmmgpu run trace --param path=run.npz     replay a page-access trace (docs/workloads.md)
  hmmgpu run bfs --trace bfs.json           and a Chrome trace (open in https://ui.perfetto.dev)
  hmmgpu run srad --oversub 1.5 --policy prefetch=none --policy eviction=fifo
                                            a policy per family (prefetch: density, block,
                                            sequential, none; eviction: lru, lfu, fifo, random;
                                            thrashing: uvm, none; access_counters: uvm)

The driver is the UVM driver (hmmgpu.drivers.uvm.UvmDriver); device memory comes in 2 MiB root
chunks, so the oversubscription a run gets is footprint / device memory (shown), near --oversub
when the footprint spans many chunks.  Modelled time is the driver's clock (the h100 profile's
cost model: fault batches, copies, remote accesses, replays, launches).

Sizes take K, M, G suffixes (powers of 1024).  docs/experiments.md says what every field means.
"""


def add_parser(sub, common):
    sp = sub.add_parser("run", help=HELP, description=wrap(DESCRIPTION), epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    common(sp)
    sp.add_argument("workload", nargs="?", metavar="WORKLOAD", help="a workload name (--list names them)")
    add_point_args(sp)
    sp.add_argument("--oversub", type=float, default=1.0, metavar="R",
                    help="oversubscription: working set / device memory (default 1.0; 1.25 = UVMBench's 125%%)")
    sp.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the input data (default 0)")
    sp.add_argument("--policy", action="append", default=[], metavar="FAMILY=NAME",
                    help="a driver policy per family: prefetch, eviction, thrashing, access_counters "
                         "(repeatable; default: nvidia-uvm's own: density, lru, uvm, uvm)")
    sp.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace (open in ui.perfetto.dev)")
    sp.add_argument("--list", action="store_true", help="list the workloads and their default footprints")
    add_timeout_arg(sp)
    sp.set_defaults(func=cmd_run)
    return sp


def add_point_args(sp):
    """The options ``run`` and ``sweep`` share: --footprint and --param."""
    sp.add_argument("--footprint", metavar="BYTES",
                    help="bytes the workload maps, with K/M/G suffixes (default: its documented default size)")
    sp.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a workload parameter (repeatable; docs/workloads.md lists them), e.g. step=8")


def add_timeout_arg(sp):
    sp.add_argument("--timeout", type=positive_seconds, default=None, metavar="SECONDS",
                    help="stop a run after this much wall time and record it as an error (a policy that "
                         "livelocks the fault path); default: no limit")


def positive_seconds(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text})")
    return v


def parse_params(items):
    """``["step=8", "roi=[0,20,0,30]", "path=run.npz"]`` -> {name: value}: JSON values where they
    parse (numbers, lists, true/false), strings otherwise."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--param {item!r} is not NAME=VALUE")
        try:
            v = json.loads(value)
        except ValueError:
            v = value
        out[name.strip()] = tuple(v) if isinstance(v, list) else v
    return out


def parse_footprint(text):
    from .. import experiments as X
    if text is None:
        return None
    try:
        return X.parse_bytes(text)
    except ValueError as e:
        raise UserError(f"--footprint: {e}") from None


def check_fits(points):
    """UserError when the largest point cannot fit in this machine's memory (before any run)."""
    avail = available_ram_bytes()
    need = max(5 * p.make_workload().footprint for p in points) + (64 << 20)   # RAM, device, checks
    if avail is not None and need > avail:
        raise UserError(f"the largest workload needs about {fmt_bytes(need)} of host memory but "
                        f"{fmt_bytes(avail)} is available; pass a smaller --footprint")


def make_point(workload, backend, footprint=None, policies=(), oversub=1.0, seed=0, params=None):
    """A validated Point, or UserError with the reason."""
    from .. import experiments as X
    try:
        return X.validate(X.Point(workload, footprint, X.parse_policies(policies), oversub, seed, backend,
                                  tuple((params or {}).items())))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def cmd_run(opt):
    from .. import workloads as W
    con = console(json_on_stdout=opt.json)
    if opt.list:
        rows = [{"name": n, "suite": cls.suite, "default_footprint": W.default_footprint(n)}
                for n, cls in W.WORKLOADS.items()]
        if opt.json:
            emit_json(rows)
        else:
            for r in rows:
                con.print(f"{r['name']:16s} {r['suite']:17s} {fmt_bytes(r['default_footprint'])}")
        return 0
    if not opt.workload:
        raise UserError("name a workload (hmmgpu run --list names them)")
    backend = check_backend(opt.backend)
    point = make_point(opt.workload, backend, parse_footprint(opt.footprint), opt.policy, opt.oversub, opt.seed,
                       parse_params(opt.param))
    check_fits([point])
    if opt.trace:
        check_writable(opt.trace, "the trace")
    with recording(opt.trace) as tr:
        row = run_live(point, con, opt.timeout)
    res = {"point": point.to_dict(), "result": row}
    if tr is not None:
        res["trace"] = trace_written(tr, opt.trace, f"hmmgpu run {point.workload}")
    print_result(con, row)
    if tr is not None:
        print_trace_summary(con, tr, opt.trace)
    if opt.json:
        emit_json(res)
    return 0 if row["ok"] else 1


class _Kernels:
    """What the live table shows: per kernel, launches, lanes, faults and replays so far."""

    def __init__(self):
        self.by, self.t0, self.modelled = {}, time.perf_counter(), None

    def add(self, r, driver):
        k = self.by.setdefault(r.name, [0, 0, 0, 0])
        k[0] += 1
        k[1] += sum(r.rounds)
        k[2] += r.faults
        k[3] += r.replays
        clock = getattr(driver, "clock", None)
        self.modelled = None if clock is None else clock.now

    def caption(self):
        m = "-" if self.modelled is None else f"{self.modelled * 1e3:,.3f} ms"
        return f"wall {time.perf_counter() - self.t0:,.1f} s, modelled {m}"


def run_live(point, con, timeout=None):
    """run_point with a live table of the kernels as they launch."""
    from .. import experiments as X
    ks = _Kernels()
    title = (f"hmmgpu run {point.workload}: oversub {point.oversub:g}, policy {point.policy}, seed {point.seed}, "
             f"backend {point.backend}")
    from rich.live import Live      # rich is a dependency; off a terminal Live prints the last frame only
    from rich.table import Table

    def table():
        t = Table(title=title, title_justify="left", caption=ks.caption(), caption_justify="left")
        for c in ("kernel", "launches", "lanes", "faults", "replays"):
            t.add_column(c, justify="left" if c == "kernel" else "right")
        for name, v in ks.by.items():
            t.add_row(name, *(f"{x:,}" for x in v))
        return t

    with Live(table(), console=con, refresh_per_second=4, transient=False) as live:
        def on_launch(r, driver):
            ks.add(r, driver)
            live.update(table())
        row = X.run_point(point, on_launch, timeout)
        live.update(table())
    con.print()
    return row


def print_result(con, row):
    from rich.markup import escape
    from rich.table import Table
    t = Table(title="result", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    check = ("[green]ok[/]" if row["ok"] else "[red]FAILED[/]") + f" {escape(row['check'])}"
    if row["check_detail"]:
        check += f": {escape(row['check_detail'])}"
    if row["error"]:
        check = f"[red]error[/] {escape(row['error'])}"
    modelled = ("- (the driver models no time)" if row["modelled_s"] is None
                else f"{row['modelled_s'] * 1e3:,.3f} ms")
    for k, v in (("check", check), ("workload", f"{row['workload']}, {fmt_bytes(row['footprint'])}"),
                 ("device memory", f"{fmt_bytes(row['device_bytes'])} (oversub {row['oversub_effective']:g}; "
                                   f"asked {row['oversub']:g})"),
                 ("driver", f"{row['driver']}, policy {row['policy']}, backend {row['backend']}"),
                 ("modelled time", modelled), ("wall time", f"{row['wall_s']:,.3f} s"),
                 ("launches", f"{row['launches']:,} ({row['lanes']:,} lanes, {row['replays']:,} replays)"),
                 ("faults", f"{row['faults']:,}"), ("migrated", fmt_bytes(row["migrated_bytes"])),
                 ("evictions", f"{row['evictions']:,}")):
        t.add_row(k, v)
    con.print(t)
    c = Table(title="counters", title_justify="left")
    c.add_column("counter")
    c.add_column("value", justify="right")
    for k, v in row["counters"].items():
        if v:
            c.add_row(k, f"{v:,}")
    c.caption = "counters at zero not shown"
    con.print(c)
