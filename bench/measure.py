"""How the suites measure: timing, same-run baselines, and the rows they add.

The suites import this module and nothing else of the framework (``framework.py`` loads the
suites and runs them, so an import the other way would be a cycle).  See ``framework.py`` for
what a row's ratio, spread, target and result mean.
"""
import statistics
import time

EMULATED_LABEL = "emulated (numpy fallback)"
GPU_LABEL = "GPU (cupy)"
TIMERS = ("cpu", "wall")


class Unavailable(Exception):
    """A suite (or one figure) cannot run here; the message says why."""


class Skip(Exception):
    """A suite has nothing to add on this backend (another suite measures the same); says why."""


class Timing:
    """Seconds of the timed repeats of one function."""

    __slots__ = ("samples", "median", "min", "max", "name", "candidates", "partner")

    def __init__(self, samples, name=None):
        self.samples = list(samples)
        if not self.samples:
            raise ValueError("a Timing needs at least one sample")
        self.median = statistics.median(self.samples)
        self.min = min(self.samples)
        self.max = max(self.samples)
        self.name = name              # which way of doing it (a BestOf candidate's name)
        self.candidates = None        # BestOf: {name: median seconds} of every candidate
        self.partner = None           # the Timing it was interleaved with, repeat by repeat

    def __repr__(self):
        return f"Timing(median={self.median:.6f}s, n={len(self.samples)})"


class BestOf:
    """Several ways to do the same work; the fastest of them (by median) is the baseline.

    ``BestOf([(name, fn), (name, fn, setup), ...])``: every candidate runs in every repeat.
    """

    def __init__(self, candidates):
        self.candidates = [(c[0], c[1], c[2] if len(c) > 2 else None) for c in candidates]
        if not self.candidates:
            raise ValueError("BestOf needs at least one candidate")


def ratio_spread(ours, base):
    """(min, median, max) of base/ours: per repeat for an interleaved pair, else the band."""
    if ours.partner is base and len(ours.samples) == len(base.samples):
        r = [b / a for a, b in zip(ours.samples, base.samples) if a > 0]
        if r:
            return min(r), statistics.median(r), max(r)
    return base.min / ours.max, base.median / ours.median, base.max / ours.min


class Ctx:
    """What a suite gets: the backend, the mode, a timer and the row makers."""

    def __init__(self, backend=None, quick=False, repeat=None, progress=None, options=None, timer="cpu"):
        from hmmgpu.device.backend import get_backend
        self.quick = bool(quick)
        self.backend = get_backend(None if backend in (None, "auto") else backend)
        self.backend_name = self.backend.name
        self.gpu = self.backend_name == "cupy"
        self.label = GPU_LABEL if self.gpu else EMULATED_LABEL
        if timer not in TIMERS:
            raise ValueError(f"timer must be one of {', '.join(TIMERS)}, not {timer!r}")
        # CUDA events on a GPU; on the fallback, this process's CPU time by default: on a shared
        # machine wall time also counts the time other processes held the CPU
        self.timer = "cuda events" if self.gpu else timer
        self._clock = time.process_time if self.timer == "cpu" else time.perf_counter
        self.repeat = int(repeat) if repeat else 5
        if self.repeat < 1:
            raise ValueError(f"repeat must be at least 1 (got {repeat})")
        self.warmup = 1
        self.options = dict(options or {})   # suite knobs from a thin entry (device_bench.py --gib)
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
            ratio, target, size=None, note="", label=None, meets=None, spread=None,
            ours_spread=None, baseline_spread=None, baseline_candidates=None):
        """One figure beside its baseline.  ``ours``/``baseline`` are absolute values; ``ratio``
        is higher-is-better (see the module docstring); ``spread`` its (min, median, max)."""
        if meets is None:
            meets = _meets(ratio, target)
        r = {"suite": self.suite, "figure": figure, "size": size, "ratio": ratio,
             "ratio_spread": _floats(spread), "target": target, "meets_target": meets,
             "result": None if meets is None else ("pass" if meets else "fail"),
             "ours": ours, "ours_unit": ours_unit, "ours_spread": _floats(ours_spread),
             "baseline_name": baseline_name, "baseline": baseline,
             "baseline_unit": baseline_unit or ours_unit, "baseline_spread": _floats(baseline_spread),
             "baseline_candidates": baseline_candidates, "label": label or self.label, "note": note}
        self.rows.append(r)
        return r

    def figure(self, figure, *, nbytes, ours, base, baseline_name=None, target, size=None, note=""):
        """A throughput row: ``ours`` and ``base`` are Timings of the same ``nbytes`` of work.

        ``base`` may be an exception (the baseline could not be measured here): the row then
        shows our figure, no ratio, and why the baseline is missing.  ``baseline_name``
        defaults to the name of the fastest ``BestOf`` candidate.
        """
        ours_gbps = _gbps_spread(nbytes, ours)
        if isinstance(base, BaseException):
            return self.row(figure, ours=ours_gbps[1], ours_unit="GB/s", ours_spread=ours_gbps,
                            baseline_name=f"{baseline_name}: unavailable ({type(base).__name__}: {base})",
                            baseline=None, ratio=None, target=target, size=size, note=note)
        lo, med, hi = ratio_spread(ours, base)
        return self.row(figure, ours=ours_gbps[1], ours_unit="GB/s", ours_spread=ours_gbps,
                        baseline_name=_best_name(base, baseline_name), baseline=nbytes / base.median / 1e9,
                        baseline_spread=_gbps_spread(nbytes, base), ratio=med, spread=(lo, med, hi),
                        target=target, size=size, note=note,
                        baseline_candidates=_candidates(base, lambda s: nbytes / s / 1e9))

    def cost(self, figure, *, ours, base, per, base_per=None, unit="ns/page", scale=1e9,
             baseline_name=None, target, size=None, note="", label=None):
        """A cost row: ``ours`` / ``base`` are Timings of work on ``per`` / ``base_per`` items;
        the figures are seconds per item times ``scale`` (ns by default); ratio = base / ours."""
        base_per = per if base_per is None else base_per
        o = Timing([s / per for s in ours.samples])
        b = Timing([s / base_per for s in base.samples])
        if ours.partner is base:
            o.partner = b
        lo, med, hi = ratio_spread(o, b)
        return self.row(figure, ours=o.median * scale, ours_unit=unit,
                        ours_spread=(o.min * scale, o.median * scale, o.max * scale),
                        baseline_name=_best_name(base, baseline_name), baseline=b.median * scale,
                        baseline_spread=(b.min * scale, b.median * scale, b.max * scale),
                        ratio=med, spread=(lo, med, hi), target=target, size=size, note=note, label=label)

    def baseline(self, thunk):
        """Run a baseline measurement; its exception is returned (and reported), not raised."""
        try:
            return thunk()
        except Exception as e:         # Unavailable, or e.g. a CUDA API that differs across versions
            return e

    # -- timing --------------------------------------------------------------------------------
    def sync(self):
        if self.gpu:
            self._cupy.cuda.Device().synchronize()

    def _once(self, fn, setup=None, device_only=False, inner=1):
        """Seconds of ``fn()``, ``inner`` times over (``setup()`` untimed before each call)."""
        if inner > 1:
            return sum(self._once(fn, setup, device_only) for _ in range(inner))
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
        t0 = self._clock()
        fn()
        return self._clock() - t0

    def time(self, fn, setup=None, repeat=None, warmup=None, device_only=False):
        """Timing of ``fn()`` over repeats after a warm-up (``setup()`` untimed, each time)."""
        repeat = self.repeat if repeat is None else repeat
        warmup = self.warmup if warmup is None else warmup
        for _ in range(warmup):
            if setup:
                setup()
            fn()
        self.sync()
        return Timing([self._once(fn, setup, device_only) for _ in range(repeat)])

    def compare(self, ours, base, ours_setup=None, base_setup=None, base_device_only=False, repeat=None,
                ours_inner=1, base_inner=1):
        """Time ``ours`` and ``base`` alternately, repeat by repeat, after a warm-up of each.

        Interleaving puts both under the same conditions (a shared machine's load, clocks,
        caches), so their ratio means something even where absolute figures drift.  ``base``
        may be a ``BestOf`` (every candidate timed each repeat; the fastest is returned, with
        ``.name`` and ``.candidates``), an exception (a baseline that could not be prepared
        here) or raise while running: then ``ours`` is still measured and the exception is
        returned in its place.  ``ours_inner`` / ``base_inner`` > 1 time that many calls per
        sample (a short or small piece of work then spans enough time to measure).  Returns (Timing of
        ours, Timing of base or the exception).
        """
        repeat = self.repeat if repeat is None else repeat
        if isinstance(base, BestOf):
            cands = base.candidates
        elif isinstance(base, BaseException):
            cands = []
        else:
            cands = [(None, base, base_setup)]
        err = base if isinstance(base, BaseException) else None
        for _ in range(self.warmup):
            if ours_setup:
                ours_setup()
            ours()
            for _name, fn, setup in (cands if err is None else ()):
                try:
                    if setup:
                        setup()
                    fn()
                except Exception as e:
                    err = e
                    break
        self.sync()
        a, b = [], [[] for _ in cands]
        for _ in range(repeat):
            a.append(self._once(ours, ours_setup, False, ours_inner))
            if err is None:
                try:
                    for k, (_name, fn, setup) in enumerate(cands):
                        b[k].append(self._once(fn, setup, base_device_only, base_inner))
                except Exception as e:
                    err = e
        t_ours = Timing(a)
        if err is not None:
            return t_ours, err
        timings = [Timing(s, name) for (name, _fn, _setup), s in zip(cands, b)]
        best = min(timings, key=lambda t: t.median)
        if len(timings) > 1:
            best.candidates = {t.name: t.median for t in timings}
        t_ours.partner = best
        best.partner = t_ours
        return t_ours, best


def _best_name(base, name):
    if name and base.name and base.candidates:
        return f"{name}: {base.name}"
    return name or base.name or "baseline"


def _candidates(base, convert):
    if not base.candidates:
        return None
    return {k: convert(v) for k, v in base.candidates.items()}


def _gbps_spread(nbytes, t):
    return (nbytes / t.max / 1e9, nbytes / t.median / 1e9, nbytes / t.min / 1e9)


def _floats(spread):
    return None if spread is None else [float(x) for x in spread]


def target_value(target):
    """x of a ">= x" target (None for any other)."""
    t = str(target or "").strip()
    if t.startswith(">="):
        try:
            return float(t[2:])
        except ValueError:
            return None
    return None


def _meets(ratio, target):
    x = target_value(target)
    if ratio is None or x is None:
        return None
    return bool(ratio >= x)
