"""``hmmgpu bench``: the benchmark suites (hmmgpu.bench, the repository's bench/ folder)."""
from ._common import (PLOT_HINT, UserError, check_backend, check_writable, console, emit_json, print_trace_summary,
                      progress_console, recording, trace_written, wrap)

HELP = "benchmark suites, each figure beside its same-run baseline"
DESCRIPTION = ("Run benchmark suites (all when none is named).  Every figure is printed as a ratio to a "
               "baseline measured in the same run (pinned cudaMemcpy, the same kernel on a flat array, "
               "zero-copy read, CUDA managed memory; on the fallback the fastest plain NumPy way to do "
               "the same work), higher is better everywhere, with its spread over the repeats and "
               "PASS/FAIL against its target.  Suites whose pieces are missing say so instead of "
               "printing numbers.")

EPILOG = """\
suites:
  migration  migrate anonymous pages to device memory and back, scattered and contiguous frames
             (baseline: one pinned cudaMemcpy of the same bytes; fallback: the fastest NumPy copy)
  jobs       a reduce job walking the device page table over device-resident and remote system
             pages (baseline: the same kernel on a flat array / a zero-copy read)
  faults     a job faulting on host-resident memory (remote map, or migrate on fault) and on
             untouched memory (baseline: CUDA managed memory, same access pattern)
  prefetch   explicit migrate + map of a range (baseline: cudaMemPrefetchAsync of managed memory)
  scaling    per-page cost of fault-in, mprotect, fork, writeback, munmap, hmm_range_fault and
             migrate at the largest size against smaller ones (target: at most 1.5x per page)
  device     the device's engines alone: DMA of scattered pages (GPU: page-table reduce,
             prefetch, fault-driven first touch)
  fallback   the NumPy backend's migration of scattered pages on a GPU run (target >= 0.7)
  thp        benchmark_thp_migration: THPs migrated as 2 MiB device folios against the same bytes
             as 4 KiB pages, both ways (fallback target >= 3 at 64 MiB)

examples:
  hmmgpu bench --quick --json > quick.json
  hmmgpu bench migration faults --repeat 9 --plot ratios.png
  hmmgpu bench scaling --trace scaling.json     (open in https://ui.perfetto.dev)
"""


def positive_int(text):
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {v})")
    return v


def add_parser(sub, common):
    import argparse
    sp = sub.add_parser("bench", help=HELP, description=wrap(DESCRIPTION), epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    common(sp)
    sp.add_argument("suites", nargs="*", metavar="SUITE", help="suites to run (default: all; --list names them)")
    sp.add_argument("--quick", action="store_true",
                    help="smaller sizes (tens of MiB): about a minute on 2 CPU cores")
    sp.add_argument("--repeat", type=positive_int, default=None, metavar="N",
                    help="timed repeats per figure after one warm-up (default 5); the median is reported")
    sp.add_argument("--timer", choices=("cpu", "wall"), default="cpu",
                    help="on the NumPy backend: time this process's CPU time (default; on a shared machine "
                         "wall time also counts other processes' turns) or the wall clock; a GPU run uses "
                         "CUDA events")
    sp.add_argument("--plot", metavar="FILE.png", help=f"bar chart of the ratios (needs matplotlib: {PLOT_HINT})")
    sp.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace of the run")
    sp.add_argument("--list", action="store_true", help="list the suites and exit (with --json: as JSON)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_bench)
    return sp


def cmd_bench(opt):
    from ..bench import framework as b
    if opt.list:
        suites = [{"name": name, "description": suite.DESCRIPTION} for name, suite in b.SUITES.items()]
        if opt.json:
            emit_json(suites)
        else:
            con = console()
            for s in suites:
                con.print(f"[bold]{s['name']:10s}[/] {s['description']}")
        return 0
    names = opt.suites or list(b.SUITES)
    unknown = [s for s in names if s not in b.SUITES]
    if unknown:
        raise UserError(f"unknown suite(s) {', '.join(unknown)}: choose from {', '.join(b.SUITES)} "
                        "(hmmgpu bench --list)")
    backend = check_backend(opt.backend)
    if opt.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}") from None
        check_writable(opt.plot, "the plot")
    if opt.trace:
        check_writable(opt.trace, "the trace")
    con = console(json_on_stdout=opt.json)
    with recording(opt.trace) as tr:
        res = b.run(names, quick=opt.quick, backend=backend, repeat=opt.repeat,
                    console=None if opt.no_progress else progress_console(), timer=opt.timer)
    if tr is not None:
        res["trace"] = trace_written(tr, opt.trace, "hmmgpu bench")
    b.print_results(res, con)
    if opt.plot:
        from rich.markup import escape
        con.print(escape(b.plot(res, opt.plot)))
    if tr is not None:
        print_trace_summary(con, tr, opt.trace)
    if opt.json:
        emit_json(res)
    # a suite that broke (an exception, not a missing piece) fails the command; a figure that
    # misses its target is a measurement, not a failure of the command
    return 1 if any(why.startswith("failed") for why in res["unavailable"].values()) else 0
