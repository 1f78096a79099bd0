"""``hmmgpu sweep``: workloads x policies x oversubscription x seeds, into a results directory.

Points come from flags or a spec file (JSON, or TOML where tomllib exists); each runs on a fresh
emulated machine (hmmgpu/experiments.py ``run_point``) in local worker processes or on a Dask
cluster; ``results.json`` and ``results.csv`` are rewritten after every point, so an interrupted
sweep resumes where it stopped: points whose results the directory holds are skipped.
"""
import argparse
import os

from ._common import (PLOT_HINT, UserError, check_backend, console, emit_json, fmt_bytes, progress_console, wrap)
from .run import add_point_args, add_timeout_arg, check_fits, make_point, parse_footprint, parse_params

HELP = "workloads x policies x oversubscription x seeds: results table and plots"
DESCRIPTION = ("Run every combination of workloads, policy sets, oversubscription ratios and seeds, each "
               "point on a fresh emulated machine, and write one row per point to OUT/results.json and "
               "OUT/results.csv, then plots (matplotlib): the speedup of each policy set over the "
               "driver's default policies per workload, and faults, migrated bytes and evictions against "
               "oversubscription.  Points the directory already holds are skipped, so a sweep that was "
               "stopped resumes where it was.  Points run in local worker processes (--workers) or on a "
               "Dask cluster (--scheduler).  Exit status 1 when a point's check failed or it crashed.")

EPILOG = """\
examples:
  hmmgpu sweep uvmbench --oversub 1.0,1.25          the 13 UVMBench programs at 100% and 125%
  hmmgpu sweep gemm atax --seeds 0,1,2 --out runs/a  three seeds of two programs
  hmmgpu sweep --spec sweep.toml --workers 2        from a spec file (JSON or TOML)
  hmmgpu sweep srad --policies default --policies prefetch=none,eviction=fifo
  hmmgpu sweep uvmbench --scheduler tcp://10.0.0.5:8786     on a Dask cluster (pip install 'hmmgpu[dask]')

A spec file sets any of: workloads, policies (a list of sets, {} or "default" for the driver's
own), oversub, seeds, footprint, backend, params; flags given on the command line win.
  {"workloads": ["uvmbench"], "oversub": [1.0, 1.25], "seeds": [0],
   "policies": [{}, {"prefetch": "none"}], "footprint": "4M"}
Workload groups: uvmbench (the 13 UVMBench programs), patterns (NVIDIA's oversubscription sample).
docs/experiments.md describes the files, the plots and a sweep measured on a 2-core machine.
"""


def _list(text, conv, what):
    try:
        return [conv(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of numbers, not {text!r}") from None


def add_parser(sub, common):
    sp = sub.add_parser("sweep", help=HELP, description=wrap(DESCRIPTION), epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    common(sp)
    sp.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                    help="workload names or groups (uvmbench, patterns); default: the spec's")
    sp.add_argument("--spec", metavar="FILE", help="a spec file, .json or .toml (see below)")
    add_point_args(sp)
    sp.add_argument("--policies", action="append", default=None, metavar="SET",
                    help="a policy set: 'default' or FAMILY=NAME[,FAMILY=NAME...] (repeatable; default: "
                         "the driver's own)")
    sp.add_argument("--oversub", metavar="R[,R...]", help="oversubscription ratios (default 1.0)")
    sp.add_argument("--seeds", metavar="N[,N...]", help="seeds (default 0)")
    sp.add_argument("--out", default="sweep-results", metavar="DIR",
                    help="results directory (default ./sweep-results); created if missing")
    sp.add_argument("--workers", type=int, default=None, metavar="N",
                    help="local worker processes (default: the CPU count; 1 runs in this process)")
    sp.add_argument("--scheduler", metavar="ADDRESS",
                    help="run the points on the Dask cluster at ADDRESS (dask.distributed; one emulator per "
                         "worker process at a time)")
    add_timeout_arg(sp)
    sp.add_argument("--no-plots", action="store_true", help="do not draw the plots")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_sweep)
    return sp


def build_points(opt, backend):
    """The sweep's Points from the spec file and the flags (flags win); UserError on a mistake."""
    from .. import experiments as X
    spec = {}
    if opt.spec:
        try:
            spec = X.load_spec(opt.spec)
        except ValueError as e:
            raise UserError(str(e)) from None
    names = opt.workloads or spec.get("workloads")
    if not names:
        raise UserError("name the workloads (or a group: uvmbench, patterns), here or in --spec")
    try:
        names = X.expand_workloads(names)
    except ValueError as e:
        raise UserError(str(e)) from None
    policies = opt.policies if opt.policies is not None else spec.get("policies", [{}])
    try:
        policies = [X.parse_policies(p) for p in policies]
    except (ValueError, TypeError) as e:
        raise UserError(f"policies: {e}") from None
    oversubs = _list(opt.oversub, float, "--oversub") if opt.oversub else spec.get("oversub", [1.0])
    seeds = _list(opt.seeds, int, "--seeds") if opt.seeds else spec.get("seeds", [0])
    footprint = parse_footprint(opt.footprint if opt.footprint is not None else spec.get("footprint"))
    params = dict(spec.get("params", {}), **parse_params(opt.param))
    if opt.backend is None and "backend" in spec:
        backend = check_backend(spec["backend"])
    if not (oversubs and seeds and policies):
        raise UserError("--oversub, --seeds and --policies need at least one value each")
    return [make_point(w, backend, footprint, p, o, s, params)
            for w in names for p in policies for o in oversubs for s in seeds]


def cmd_sweep(opt):
    from .. import experiments as X
    backend = check_backend(opt.backend)
    points = build_points(opt, backend)
    check_fits(points)
    workers = (os.cpu_count() or 1) if opt.workers is None else opt.workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    if opt.scheduler:
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise UserError(f"--scheduler needs dask.distributed, which is not installed: {X.DASK_HINT}") from None
    out = os.path.abspath(opt.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a directory")
    if not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"--out {out}: directory {os.path.dirname(out)} does not exist")
    try:
        X.load_results(out)
    except (ValueError, KeyError) as e:
        raise UserError(f"--out {out}: {X.RESULTS_JSON} is not a results file of hmmgpu sweep ({e})") from None
    con = console(json_on_stdout=opt.json)
    todo = X.pending(points, X.load_results(out))
    con.print(f"sweep: {len(points)} points, {len(points) - len(todo)} already in {out}, {len(todo)} to run "
              f"({'on ' + opt.scheduler if opt.scheduler else f'{min(workers, max(1, len(todo)))} worker(s)'}, "
              f"driver {X.DRIVER})")
    on_point, stop = _progress(con, None if opt.no_progress else progress_console(), len(todo))
    meta = {"driver": X.DRIVER}
    try:
        rows, ran = X.sweep(points, out, workers=min(workers, max(1, len(todo))), scheduler=opt.scheduler,
                            on_point=on_point, meta=meta, timeout=opt.timeout)
    except OSError as e:
        raise UserError(f"--scheduler {opt.scheduler}: {e}") from None
    finally:
        stop()
    keys = {p.key for p in points}
    mine = [r for r in rows if X.row_key(r) in keys]
    print_rows(con, mine)
    plots = {}
    if not opt.no_plots:
        try:
            plots = X.plot(mine, out)
        except ImportError:
            plots = {"*": f"plots skipped: matplotlib is not installed ({PLOT_HINT})"}
        for f, why in plots.items():
            con.print(f"plot {os.path.join(out, f)}" if why is None else f"plot {f}: {why}")
    con.print(f"results: {os.path.join(out, X.RESULTS_JSON)}, {os.path.join(out, X.RESULTS_CSV)}")
    if opt.json:
        emit_json({"out": out, "points": len(points), "ran": ran, "rows": mine, "plots": plots})
    return 0 if all(r["ok"] for r in mine) else 1


def _progress(con, pcon, total):
    """(on_point, stop): a rich progress bar over points on a terminal, else one line per point."""
    if pcon is not None and total:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        prog = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=pcon, transient=True)
        prog.start()
        task = prog.add_task("", total=total)

        def on_point(p, row, done, n):
            prog.update(task, completed=done, description=_line(p, row))
        return on_point, prog.stop

    from rich.markup import escape

    def on_point(p, row, done, n):
        con.print(escape(f"[{done}/{n}] {_line(p, row)}"), highlight=False)
    return on_point, lambda: None


def _line(p, row):
    status = "ok" if row["ok"] else ("error" if row["error"] else "FAILED")
    return f"{p.workload} {p.policy} oversub {p.oversub:g} seed {p.seed}: {status}, {row['wall_s']:.1f} s"


def print_rows(con, rows):
    from rich.table import Table
    from .. import experiments as X
    t = Table(title=f"sweep: {len(rows)} points", title_justify="left")
    for c in ("workload", "policy", "oversub", "(got)", "seed", "check", "modelled", "wall", "faults", "migrated",
              "evictions", "launches"):
        t.add_column(c, justify="left" if c in ("workload", "policy", "check") else "right")
    for r in rows:
        t.add_row(r["workload"], r["policy"], f"{r['oversub']:g}", f"{r['oversub_effective']:.3g}", str(r["seed"]),
                  "ok" if r["ok"] else ("error" if r["error"] else "FAILED"),
                  "-" if r["modelled_s"] is None else f"{r['modelled_s'] * 1e3:,.3f} ms", f"{r['wall_s']:,.2f} s",
                  f"{r['faults']:,}", fmt_bytes(r["migrated_bytes"]), f"{r['evictions']:,}", f"{r['launches']:,}")
    con.print(t)
    base = min((r["oversub"] for r in rows), default=None)
    wall = X.slowdowns(rows, base=base, time_field="wall_s") if rows else {}
    if wall:
        slow = X.slowdowns(rows, base=base)
        s = Table(title="slowdown, default policies", title_justify="left",
                  caption=f"time at each oversubscription / time at {base:g}", caption_justify="left")
        for c in ("workload", "oversub", "modelled", "wall"):
            s.add_column(c, justify="left" if c == "workload" else "right")
        for k in sorted(wall):
            s.add_row(k[0], f"{k[1]:g}", f"{slow[k]:.2f}x" if k in slow else "-", f"{wall[k]:.2f}x")
        con.print(s)
