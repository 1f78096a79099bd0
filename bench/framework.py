"""The benchmark framework behind ``hmmgpu bench``: suites, same-run baselines, the table, JSON.

A suite is a module in ``bench/suites/`` with ``NAME``, ``DESCRIPTION`` and ``run(ctx)``; it adds
rows with ``ctx.figure(...)`` (a throughput against a baseline), ``ctx.cost(...)`` (a cost per
item against a baseline) or ``ctx.row(...)`` (anything else), or raises ``Unavailable(reason)``
when a piece it needs is not there, or ``Skip(reason)`` when it has nothing to add on this
backend.  No number is ever made up.  Every row holds one figure of ours and its baseline
*measured in the same run*:

    ratio     one meaning everywhere: HIGHER IS BETTER.  Baseline time / our time for the same
              work (so 1.0 means "as fast as the baseline"); for a cost row, baseline cost / our
              cost; for a scaling row, the per-page cost at a smaller size / the per-page cost at
              the largest size (1.0: flat; below 1: the largest size costs more per page).
    spread    min .. median .. max of the ratio over the repeats: per repeat when ours and the
              baseline were timed alternately (``ctx.compare``), else the widest band the
              two sets of samples allow (fastest baseline over slowest ours, and so on)
    target    ">= x" on the ratio: a band with no upper end, so being faster never fails
    result    pass / fail against the target (on the median ratio), or none without a target
    ours, baseline   absolute medians (GB/s, ns/page, ...) with their spreads in the JSON
    label     "GPU (cupy)" or "emulated (numpy fallback)": on the fallback nothing is a GPU figure

Timing: ``ctx.compare(ours, base, ...)`` times our function and its baseline alternately, repeat
by repeat, after a warm-up of each (``setup`` functions run untimed before each call), so both
see the same load on a shared machine.  ``base`` may be a ``BestOf`` of several ways to do the
same work: each is timed in every repeat and the fastest (by median) is the baseline, named in
the table.  ``ctx.time(fn, setup=None)`` times one function the same way.  On the CuPy backend a
call is bracketed by CUDA events on the current stream (with a device synchronize before the end
event, so host work of the emulation is inside the bracket; ``device_only=True`` leaves it out
for pure GPU baselines such as one cudaMemcpyAsync); on the NumPy backend ``time.perf_counter``.
"""
import gc
import importlib
import sys
import time

from .measure import EMULATED_LABEL, Ctx, Skip, Unavailable

SUITE_ORDER = ("migration", "jobs", "faults", "prefetch", "scaling", "device", "fallback", "thp", "policies")


class _Broken:
    """Stands in for a suite module that does not import."""

    def __init__(self, name, err):
        self.NAME = name
        self.DESCRIPTION = f"(does not import: {err})"
        self._err = err

    def run(self, ctx):
        raise Unavailable(f"suite module does not import: {self._err}")


def _load_suites():
    suites = {}
    for name in SUITE_ORDER:
        try:
            suites[name] = importlib.import_module(f".suites.{name}", __package__)
        except Exception as e:        # a suite whose pieces are missing must not sink the others
            suites[name] = _Broken(name, f"{type(e).__name__}: {e}")
    return suites


SUITES = _load_suites()


def run(suites=None, quick=False, backend=None, repeat=None, console=None, options=None, timer="cpu"):
    """Run ``suites`` (names; all by default); returns the results dict (what --json prints).

    ``console``: a rich Console for progress bars (None: none).  ``timer``: on the NumPy backend,
    "cpu" (this process's CPU time, the default) or "wall"; a GPU run uses CUDA events.
    """
    import hmmgpu
    from hmmgpu.device.backend import backend_info
    names = list(suites or SUITE_ORDER)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    import numpy as np
    meta = {"date": time.strftime("%Y-%m-%d"), "time_utc": time.strftime("%H:%M:%S", time.gmtime()),
            "hmmgpu": hmmgpu.__version__, "python": sys.version.split()[0], "numpy": np.__version__,
            "quick": bool(quick), "auto_backend": backend_info()}
    progress = task = None
    if console is not None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        progress = Progress(TextColumn("[bold]{task.fields[suite]:10s}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} suites"), TimeElapsedColumn(),
                            TextColumn("{task.description}"), console=console, transient=True)
        progress.start()
        task = progress.add_task("", total=len(names), suite="")

    def on_progress(what):
        if progress is not None:
            progress.update(task, description=what)

    ctx = Ctx(backend, quick, repeat, on_progress, options, timer)
    meta["backend"] = ctx.backend_name
    meta["timer"] = ctx.timer
    meta["label"] = ctx.label
    meta["repeat"] = ctx.repeat
    meta["device"] = _device_meta(ctx)
    unavailable, skipped, timings = {}, {}, {}
    try:
        for name in names:
            suite = SUITES[name]
            ctx.suite = name
            if progress is not None:
                progress.update(task, suite=name, description=suite.DESCRIPTION[:60])
            t0 = time.perf_counter()
            try:
                suite.run(ctx)
            except Skip as e:
                skipped[name] = str(e)
            except Unavailable as e:
                unavailable[name] = str(e)
            except Exception as e:     # a broken suite is reported, never hidden
                unavailable[name] = f"failed: {type(e).__name__}: {e}"
            timings[name] = round(time.perf_counter() - t0, 3)
            gc.collect()       # a suite's Systems hold GiB arenas in reference cycles: free them now
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return {"meta": meta, "rows": ctx.rows, "unavailable": unavailable, "skipped": skipped,
            "suite_seconds": timings, "suites": names}


def _device_meta(ctx):
    if not ctx.gpu:
        return {"name": "CPU (NumPy)", "emulated": True}
    try:
        from hmmgpu.kernels.backend import cuda_info
        i = cuda_info(0)
        return {k: i.get(k) for k in ("name", "nvml_name", "driver", "cuda_runtime", "cuda_driver", "cupy",
                                      "memory_total", "pcie_gen", "pcie_width", "compute_capability")}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


# -- output --------------------------------------------------------------------------------------

def fmt_value(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:,.1f} us"
        if v < 1:
            return f"{v * 1e3:,.2f} ms"
        return f"{v:,.3f} s"
    if unit in ("ns/page", "ns/step"):
        return f"{v:,.0f} {unit}"
    if unit == "GB/s":
        return f"{v:,.2f} GB/s"
    return f"{v:,.4g} {unit}"


_TIMER_NAMES = {"cpu": "process CPU time", "wall": "wall clock"}


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def print_results(res, console):
    """The table: one row per figure, ratio (higher is better) and its spread, pass/fail."""
    from rich.markup import escape
    from rich.table import Table
    meta = res["meta"]
    t = Table(title=f"hmmgpu bench -- {meta['label']} -- {meta['date']}"
                    + (" -- quick" if meta["quick"] else "")
                    + f" -- {meta['repeat']} repeats, timer: {_TIMER_NAMES.get(meta['timer'], meta['timer'])}",
              title_justify="left")
    for c, j in (("suite", "left"), ("figure", "left"), ("size", "left"), ("ratio", "right"),
                 ("min..max", "left"), ("target", "left"), ("result", "left"), ("ours", "right"),
                 ("baseline (same run)", "left"), ("baseline", "right")):
        t.add_column(c, justify=j)
    for r in res["rows"]:
        result = {"pass": "[green]PASS[/]", "fail": "[red]FAIL[/]"}.get(r.get("result"), "-")
        sp = r.get("ratio_spread")
        spread = f"{sp[0]:.2f}..{sp[2]:.2f}" if sp else ""
        t.add_row(r["suite"], escape(r["figure"]), r["size"] or "", _fmt_ratio(r["ratio"]), spread,
                  escape(r["target"] or ""), result, fmt_value(r["ours"], r["ours_unit"]),
                  escape(r["baseline_name"]), fmt_value(r["baseline"], r["baseline_unit"]))
    console.print(t)
    console.print("ratio: higher is better (baseline time / our time for the same work; scaling: per-page "
                  "cost at the smaller size / at the largest); min..max: its spread over the repeats")
    if meta["backend"] == "numpy":
        console.print(f"[yellow]every figure above is {EMULATED_LABEL}: device memory is host memory; "
                      f"ratios compare NumPy with NumPy, not a GPU[/]")
    for name, why in res.get("skipped", {}).items():
        console.print(f"[bold]{name}[/]: skipped: {escape(why)}")
    for name, why in res["unavailable"].items():
        console.print(f"[bold]{name}[/]: not available: {escape(why)}")


def plot(res, path):
    """Bar chart of the ratios per figure, with their spread; returns a message for the user.

    The caller checks that matplotlib imports before the run (``hmmgpu bench --plot``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rows"] if r["ratio"] is not None]
    if not rows:
        return "--plot: no figure with a ratio to plot"
    labels = [f"{r['suite']}: {r['figure']}" + (f" [{r['size']}]" if r["size"] else "") for r in rows]
    vals = [r["ratio"] for r in rows]
    err = [[r["ratio"] - (r["ratio_spread"] or [r["ratio"]] * 3)[0] for r in rows],
           [(r["ratio_spread"] or [r["ratio"]] * 3)[2] - r["ratio"] for r in rows]]
    colors = ["tab:green" if r["meets_target"] else ("tab:red" if r["meets_target"] is False else "tab:gray")
              for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    ax.barh(range(len(rows)), vals, xerr=err, color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("ratio to the same-run baseline (higher is better); bars: min..max over the repeats")
    ax.set_title(f"hmmgpu bench -- {res['meta']['label']} -- {res['meta']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {len(rows)} ratios -> {path}"
