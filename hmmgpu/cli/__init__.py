"""The ``hmmgpu`` command: ``info``, ``demo``, ``bench``, ``run`` and ``sweep``, one module per command.

    hmmgpu info              which backend runs here and why; CUDA, driver, GPUs, emulated devices
    hmmgpu demo              the main job, end to end: a CPU-built data set (arrays, a linked list,
                             a tree), device jobs on it through the mirrored address space, hot data
                             migrated to the device and back, rss and memcg before and after
    hmmgpu bench [SUITE...]  the benchmark suites, each figure beside its baseline from the same run
    hmmgpu run WORKLOAD      one workload (UVMBench program, access pattern, trace) under a driver
                             configuration, its result checked; modelled and wall time, counters
    hmmgpu sweep ...         workloads x policies x oversubscription x seeds into a results
                             directory (JSON, CSV, plots), resumable, local workers or Dask

Every command takes ``--backend auto|cupy|numpy`` (default: the HMMGPU_BACKEND variable, else
auto) and ``--json``.  Tables go to stdout; with ``--json`` the JSON goes to stdout and the
tables to stderr, so ``hmmgpu bench --json > out.json`` still shows them.  ``demo``,
``bench`` and ``run`` take ``--trace FILE.json`` (a Chrome trace that https://ui.perfetto.dev opens).  A
mistake in the call (an unknown backend, CuPy missing, sizes beyond the machine's memory, a
trace path that cannot be written, --plot without matplotlib) is one line on stderr and exit
status 2, before any work starts.  ``python -m hmmgpu`` is the same command.
"""
import argparse
import sys

from . import bench, demo, info, run, sweep
from ._common import EMULATED_LABEL, UserError

__all__ = ["main", "build_parser", "EMULATED_LABEL"]

EPILOG = """\
examples:
  hmmgpu info                         what runs here: backend and why, CUDA, GPUs, emulated devices
  hmmgpu demo                         the main job, end to end (works with or without a GPU)
  hmmgpu demo > demo.txt              ... its tables in a file
  hmmgpu demo --trace demo.json       ... and a Chrome trace of faults, migrations, invalidations
  hmmgpu bench --quick                every suite at smaller sizes (about a minute on 2 CPU cores)
  hmmgpu bench migration scaling      two suites at full size
  hmmgpu bench --json > results.json  machine-readable results on stdout (tables go to stderr)
  hmmgpu run gemm --oversub 1.25      one UVMBench program, working set 1.25 x device memory
  hmmgpu sweep uvmbench --oversub 1,1.25   13 programs x 2 ratios -> ./sweep-results
  HMMGPU_BACKEND=numpy hmmgpu demo    force the NumPy fallback on a GPU machine

On the NumPy fallback every figure is labelled "emulated (numpy fallback)": device memory is
host memory and timings are those of NumPy, not of a GPU.
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: ``hmmgpu bench: error: ... (see --help)``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version():
    import hmmgpu
    return f"hmmgpu {hmmgpu.__version__}"


def build_parser():
    p = _Parser(prog="hmmgpu", description="Linux HMM (Heterogeneous Memory Management) emulated with a real "
                                           "GPU in the loop (CuPy), or a NumPy fallback.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(sp):
        sp.add_argument("--backend", choices=("auto", "cupy", "numpy"), default=None,
                        help="device backend (default: $HMMGPU_BACKEND, else auto: CuPy when a CUDA GPU "
                             "answers, else NumPy)")
        sp.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout (the tables then go to stderr)")

    info.add_parser(sub, common)
    demo.add_parser(sub, common)
    bench.add_parser(sub, common)
    run.add_parser(sub, common)
    sweep.add_parser(sub, common)
    return p


def main(argv=None):
    p = build_parser()
    opt = p.parse_args(argv)
    if not getattr(opt, "func", None):
        p.print_help()
        return 0
    try:
        return opt.func(opt)
    except UserError as e:
        print(f"hmmgpu {opt.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
