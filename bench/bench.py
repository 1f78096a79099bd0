"""The benchmark framework behind ``hmmgpu bench``: suites, same-run baselines, tables, JSON, plots.

A suite is a module in ``bench/suites/`` with ``NAME``, ``DESCRIPTION`` and ``run(ctx)``, which
returns a list of rows made with ``ctx.row(...)`` or raises ``Unavailable(reason)`` when a piece
it needs is not there (then the suite is listed as "not available: <reason>"; no number is ever
made up).  Every row holds one figure of ours and its baseline *measured in the same run*:

    ratio     ours relative to the baseline, > 1 is better than the baseline for a throughput
              (baseline time / our time for the same bytes); for a scaling row, our per-page
              cost at N pages over our per-page cost at the largest N (flat = 1)
    target    the design target (docs/architecture.md, DESIGN.md), e.g. ">= 0.85", "within 1.5x"
    ours, baseline   absolute figures (GB/s, ns/page, ms)
    label     "GPU (cupy)" or "emulated (numpy fallback)": on the fallback nothing is a GPU figure

Timing: ``ctx.compare(ours, base, ...)`` times our figure and its baseline alternately, repeat
by repeat, after a warm-up of each (``setup`` functions run untimed before each call), and
returns the medians; ``ctx.time(fn, setup=None)`` times one function the same way.  On the CuPy backend it brackets the call with
CUDA events on the current stream (with a device synchronize before the end event, so host
work of the emulation is inside the bracket; ``device_only=True`` leaves it out for pure GPU
baselines such as one cudaMemcpyAsync); on the NumPy backend it uses ``time.perf_counter``.
"""
import importlib
import statistics
import sys
import time

EMULATED_LABEL = "emulated (numpy fallback)"
GPU_LABEL = "GPU (cupy)"
SUITE_ORDER = ("migration", "jobs", "faults", "prefetch", "scaling", "fallback")


class Unavailable(Exception):
    """A suite (or one figure) cannot run here; the message says why."""


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
            suites[name] = importlib.import_module(f"bench.suites.{name}")
        except Exception as e:        # a suite whose pieces are missing must not sink the others
            suites[name] = _Broken(name, f"{type(e).__name__}: {e}")
    return suites


SUITES = _load_suites()


class Timing:
    __slots__ = ("median", "samples")

    def __init__(self, samples):
        self.samples = list(samples)
        self.median = statistics.median(self.samples)

    def __repr__(self):
        return f"Timing(median={self.median:.6f}s, n={len(self.samples)})"


class Ctx:
    """What a suite gets: the backend, the mode, a timer and a row maker."""

    def __init__(self, backend=None, quick=False, repeat=None, progress=None):
        from hmmgpu.device.backend import get_backend
        self.quick = bool(quick)
        self.backend = get_backend(None if backend in (None, "auto") else backend)
        self.backend_name = self.backend.name
        self.gpu = self.backend_name == "cupy"
        self.label = GPU_LABEL if self.gpu else EMULATED_LABEL
        self.repeat = int(repeat) if repeat else (3 if quick else 5)
        self.warmup = 1
        self._progress = progress
        self.suite = None
        self.rows = []
        self._cupy = None
        if self.gpu:
            import cupy
            self._cupy = cupy

    # -- reporting -----------------------------------------------------------------------------
    def progress(self, what):
        if self._progress:
            self._progress(what)

    def row(self, figure, *, ours, ours_unit, baseline_name, baseline, baseline_unit=None,
            ratio, target, size=None, note="", label=None, meets=None):
        """One figure beside its baseline.  ``ours``/``baseline`` are absolute values."""
        r = {"suite": self.suite, "figure": figure, "ratio": ratio, "target": target,
             "meets_target": _meets(ratio, target) if meets is None else meets,
             "ours": ours, "ours_unit": ours_unit, "baseline_name": baseline_name,
             "baseline": baseline, "baseline_unit": baseline_unit or ours_unit, "size": size,
             "label": label or self.label, "note": note}
        self.rows.append(r)
        return r

    def figure(self, figure, *, nbytes, ours, base, baseline_name, target, size=None, note=""):
        """A throughput row: ``ours`` and ``base`` are Timings of the same ``nbytes``.

        ``base`` may be an exception (the baseline could not be measured here): the row then
        shows our figure, no ratio, and why the baseline is missing.
        """
        if isinstance(base, BaseException):
            return self.row(figure, ours=nbytes / ours.median / 1e9, ours_unit="GB/s",
                            baseline_name=f"{baseline_name}: unavailable ({type(base).__name__}: {base})",
                            baseline=None, ratio=None, target=target, size=size, note=note)
        return self.row(figure, ours=nbytes / ours.median / 1e9, ours_unit="GB/s", baseline_name=baseline_name,
                        baseline=nbytes / base.median / 1e9, ratio=base.median / ours.median, target=target,
                        size=size, note=note)

    def baseline(self, thunk):
        """Run a baseline measurement; its exception is returned (and reported), not raised."""
        try:
            return thunk()
        except Unavailable as e:
            return e
        except Exception as e:         # e.g. a CUDA API that differs across versions
            return e

    # -- timing --------------------------------------------------------------------------------
    def sync(self):
        if self.gpu:
            self._cupy.cuda.Device().synchronize()

    def _once(self, fn, setup=None, device_only=False):
        """Seconds of one ``fn()`` (``setup()`` untimed before it)."""
        if setup:
            setup()
            self.sync()
        if self.gpu:
            cp = self._cupy
            stream = cp.cuda.get_current_stream()
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            fn()
            if not device_only:
                self.sync()
            e1.record(stream)
            e1.synchronize()
            return cp.cuda.get_elapsed_time(e0, e1) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def time(self, fn, setup=None, repeat=None, warmup=None, device_only=False):
        """Median seconds of ``fn()`` over repeats after a warm-up (``setup()`` untimed, each time)."""
        repeat = self.repeat if repeat is None else repeat
        warmup = self.warmup if warmup is None else warmup
        for _ in range(warmup):
            if setup:
                setup()
            fn()
        self.sync()
        return Timing([self._once(fn, setup, device_only) for _ in range(repeat)])

    def compare(self, ours, base, ours_setup=None, base_setup=None, base_device_only=False, repeat=None):
        """Time ``ours`` and ``base`` alternately, repeat by repeat, after a warm-up of each.

        Interleaving puts both under the same conditions (a shared machine's load, clocks,
        caches), so their ratio means something even where absolute figures drift.  ``base``
        may be an exception (a baseline that could not be prepared here) or raise while
        running: then ``ours`` is still measured and the exception is returned in its place.
        Returns (Timing of ours, Timing of base or the exception).
        """
        repeat = self.repeat if repeat is None else repeat
        err = base if isinstance(base, BaseException) else None
        for _ in range(self.warmup):
            if ours_setup:
                ours_setup()
            ours()
            if err is None:
                try:
                    if base_setup:
                        base_setup()
                    base()
                except Exception as e:
                    err = e
        self.sync()
        a, b = [], []
        for _ in range(repeat):
            a.append(self._once(ours, ours_setup))
            if err is None:
                try:
                    b.append(self._once(base, base_setup, base_device_only))
                except Exception as e:
                    err = e
        return Timing(a), (err if err is not None else Timing(b))


def _meets(ratio, target):
    if ratio is None or target is None:
        return None
    t = str(target).strip()
    try:
        if t.startswith(">="):
            return ratio >= float(t[2:])
        if t.startswith("within"):
            k = float(t.split()[1].rstrip("x"))
            return 1 / k <= ratio <= k
    except ValueError:
        return None
    return None


def run(suites=None, quick=False, backend=None, repeat=None, console=None):
    """Run ``suites`` (names; all by default); returns the results dict (what --json prints)."""
    import hmmgpu
    from hmmgpu.device.backend import backend_info
    names = list(suites or SUITE_ORDER)
    meta = {"date": time.strftime("%Y-%m-%d"), "time_utc": time.strftime("%H:%M:%S", time.gmtime()),
            "hmmgpu": hmmgpu.__version__, "python": sys.version.split()[0], "quick": bool(quick),
            "auto_backend": backend_info()}
    import numpy as np
    meta["numpy"] = np.__version__
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

    ctx = Ctx(backend, quick, repeat, on_progress)
    meta["backend"] = ctx.backend_name
    meta["label"] = ctx.label
    meta["repeat"] = ctx.repeat
    meta["device"] = _device_meta(ctx)
    unavailable, timings = {}, {}
    try:
        for name in names:
            suite = SUITES[name]
            ctx.suite = name
            if progress is not None:
                progress.update(task, suite=name, description=suite.DESCRIPTION[:60])
            t0 = time.perf_counter()
            try:
                suite.run(ctx)
            except Unavailable as e:
                unavailable[name] = str(e)
            except Exception as e:     # a broken suite is reported, never hidden
                unavailable[name] = f"failed: {type(e).__name__}: {e}"
            timings[name] = round(time.perf_counter() - t0, 3)
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return {"meta": meta, "rows": ctx.rows, "unavailable": unavailable, "suite_seconds": timings,
            "suites": names}


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
    if unit == "ns/page":
        return f"{v:,.0f} ns/page"
    if unit == "GB/s":
        return f"{v:,.2f} GB/s"
    return f"{v:,.4g} {unit}"


def print_results(res, console):
    from rich.table import Table
    meta = res["meta"]
    t = Table(title=f"hmmgpu bench -- {meta['label']} -- {meta['date']}"
                    + (" -- quick" if meta["quick"] else ""), title_justify="left")
    for c, j in (("suite", "left"), ("figure", "left"), ("size", "left"), ("ratio", "right"),
                 ("target", "left"), ("ours", "right"), ("baseline (same run)", "left"), ("baseline", "right")):
        t.add_column(c, justify=j)
    for r in res["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        if r["meets_target"] is True:
            ratio = f"[green]{ratio}[/]"
        elif r["meets_target"] is False:
            ratio = f"[red]{ratio}[/]"
        t.add_row(r["suite"], r["figure"], r["size"] or "", ratio, r["target"] or "",
                  fmt_value(r["ours"], r["ours_unit"]), r["baseline_name"],
                  fmt_value(r["baseline"], r["baseline_unit"]))
    console.print(t)
    if meta["backend"] == "numpy":
        console.print(f"[yellow]every figure above is {EMULATED_LABEL}: device memory is host memory; "
                      f"ratios compare NumPy with NumPy, not a GPU[/]")
    for name, why in res["unavailable"].items():
        console.print(f"[bold]{name}[/]: not available: {why}")


def plot(res, path):
    """Bar chart of the ratios per figure; returns a message for the user."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("--plot needs matplotlib, which is not installed: pip install -e '.[plot]' "
                "(or pip install matplotlib); no plot written")
    rows = [r for r in res["rows"] if r["ratio"] is not None]
    if not rows:
        return "--plot: no figure with a ratio to plot"
    labels = [f"{r['suite']}: {r['figure']}" + (f" [{r['size']}]" if r["size"] else "") for r in rows]
    vals = [r["ratio"] for r in rows]
    colors = ["tab:green" if r["meets_target"] else ("tab:red" if r["meets_target"] is False else "tab:gray")
              for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    ax.barh(range(len(rows)), vals, color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("ratio to the same-run baseline (scaling: per-page cost / cost at the largest size)")
    ax.set_title(f"hmmgpu bench -- {res['meta']['label']} -- {res['meta']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {len(rows)} ratios -> {path}"


def main(argv=None):
    """``python -m bench.bench`` is ``hmmgpu bench``."""
    from hmmgpu.cli import main as cli_main
    return cli_main(["bench"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
