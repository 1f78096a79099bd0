"""Experiments: one workload under one driver configuration (a *point*), and sweeps of points.

A ``Point`` names what one measurement runs: a workload (hmmgpu/workloads) at a footprint, the
driver's policies (by family: ``prefetch``, ``eviction``, ``thrashing``, ``access_counters``;
none given means the driver's defaults), an oversubscription ratio R (the working set is R times
device memory, so the device gets ``footprint / R`` bytes), a seed and a backend.
``run_point(point)`` builds a fresh machine (a ``System``, a process, the workload's arrays and
a driver), runs the workload, checks its result and returns one flat dict: the check, modelled
and wall time, faults, migrated bytes, evictions, launches and the driver's counters.  Every
figure but ``wall_s`` is a function of the point alone (the same on every run and worker, and
by design on either backend), which is what makes a sweep resumable and distributable.

``sweep(points, out_dir, ...)`` runs points in local worker processes (``ProcessPoolExecutor``,
spawn) or on a Dask cluster (``scheduler=ADDRESS``, the optional ``[dask]`` extra), skips the
points whose results ``out_dir`` already holds, and writes ``results.json`` and ``results.csv``
after every point.  ``plot(rows, out_dir)`` draws the sweep's figures with matplotlib.

This module sits beside the command line (``hmmgpu run``, ``hmmgpu sweep``): it imports the
workloads and drivers, and nothing below imports it.  The driver is chosen in one place,
``open_driver``.
"""
import contextlib
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import threading
import time

from . import workloads
from .drivers.uvm import registry
from .drivers.uvm.pmm import UVM_CHUNK_SIZE_MAX

POLICY_FAMILIES = registry.FAMILIES
DEFAULT_POLICY_LABEL = "default"
BACKEND_NAMES = ("auto", "cupy", "numpy")
# the UVMBench programs (issue 14's list): what `uvmbench` stands for in a sweep's workloads
UVMBENCH = tuple(n for n, cls in workloads.WORKLOADS.items() if cls.suite in ("polybench", "rodinia", "uvmbench"))
GROUPS = {"uvmbench": UVMBENCH,
          "patterns": tuple(n for n, cls in workloads.WORKLOADS.items() if cls.suite == "oversubscription")}
RESULTS_JSON, RESULTS_CSV = "results.json", "results.csv"
PLOT_SPEEDUP, PLOT_OVERSUB = "speedup.png", "oversubscription.png"
MIN_RAM_BYTES = 64 << 20           # the emulated machine's RAM beyond the workload's arrays

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.I)


def parse_bytes(text):
    """``"1536"``, ``"64K"``, ``"1.5M"``, ``"2GiB"`` -> bytes (K, M, G, T are powers of 1024);
    ValueError naming the text otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ValueError(f"{text!r} is not a size: a number of bytes with an optional K, M, G or T suffix")
        n = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
        if n != int(n):
            raise ValueError(f"{text!r} is not a whole number of bytes")
        n = int(n)
    if n <= 0:
        raise ValueError(f"a footprint must be positive, not {text!r}")
    return n


def parse_policies(items):
    """``["prefetch=none", "eviction=fifo"]`` (or ``"default"``, a dict, or pairs) -> a sorted
    tuple of the (family, name) pairs that differ from nvidia-uvm's defaults (``POLICY_NAMES`` of
    hmmgpu/drivers/uvm/registry.py); ValueError naming an unknown family or policy, or a family
    given twice."""
    if isinstance(items, dict):
        items = items.items()
    if not isinstance(items, str):
        items = [f"{p[0]}={p[1]}" if isinstance(p, (tuple, list)) and len(p) == 2 else p for p in items]
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    out = {}
    for item in items:
        item = item.strip()
        if item == DEFAULT_POLICY_LABEL:
            continue
        family, sep, name = item.partition("=")
        family, name = family.strip().lower().replace("-", "_"), name.strip()
        if not sep or not name:
            raise ValueError(f"policy {item!r} is not FAMILY=NAME (families: {', '.join(POLICY_FAMILIES)})")
        if family not in POLICY_FAMILIES:
            raise ValueError(f"no policy family {family!r}: choose from {', '.join(POLICY_FAMILIES)}")
        if name not in registry.POLICY_NAMES[family] and name != DEFAULT_POLICY_LABEL:
            raise ValueError(f"no {family} policy {name!r}: choose from "
                             f"{', '.join(sorted(registry.POLICY_NAMES[family]))}")
        if family in out and out[family] != name:
            raise ValueError(f"policy family {family!r} given twice ({out[family]}, {name})")
        out[family] = name
    # nvidia-uvm's own choice is the default, however it is spelled
    return tuple(sorted((f, n) for f, n in out.items()
                        if n not in (DEFAULT_POLICY_LABEL, registry.DEFAULT_NAMES[f])))


def policy_label(policies):
    """``(("eviction", "fifo"), ("prefetch", "none"))`` -> ``"eviction=fifo,prefetch=none"``;
    ``()`` -> ``"default"``."""
    return ",".join(f"{f}={n}" for f, n in policies) or DEFAULT_POLICY_LABEL


@dataclasses.dataclass(frozen=True)
class Point:
    """One measurement: ``workload`` (a name of hmmgpu.workloads), ``footprint`` in bytes (None:
    the workload's default size), ``policies`` ((family, name) pairs overriding the driver's
    defaults), ``oversub`` (working set / device memory), ``seed``, ``backend`` ("numpy",
    "cupy" or "auto"), ``params`` ((name, value) pairs of workload parameters)."""
    workload: str
    footprint: object = None
    policies: tuple = ()
    oversub: float = 1.0
    seed: int = 0
    backend: str = "numpy"
    params: tuple = ()

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)    # noqa: E731  (frozen)
        set_("workload", str(self.workload).lower())
        if self.footprint is not None:
            set_("footprint", parse_bytes(self.footprint))
        set_("policies", parse_policies(self.policies))
        ov = float(self.oversub)
        if not (math.isfinite(ov) and ov > 0):
            raise ValueError(f"an oversubscription ratio must be a positive number, not {self.oversub!r}")
        set_("oversub", ov)
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or int(self.seed) < 0:
            raise ValueError(f"a seed must be a non-negative integer, not {self.seed!r}")
        set_("seed", int(self.seed))
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"no backend {self.backend!r}: choose from {', '.join(BACKEND_NAMES)}")
        params = dict(self.params)
        set_("params", tuple(sorted(params.items())))

    @property
    def policy(self):
        return policy_label(self.policies)

    @property
    def key(self):
        """What identifies the point in a results file (a string, stable across runs)."""
        return json.dumps([self.workload, self.footprint, self.policy, self.oversub, self.seed, self.backend,
                           [list(p) for p in self.params]])

    def to_dict(self):
        return {"workload": self.workload, "footprint_requested": self.footprint, "policy": self.policy,
                "oversub": self.oversub, "seed": self.seed, "backend_requested": self.backend,
                "params": dict(self.params)}

    def make_workload(self):
        """The workload instance (no memory yet): ValueError/TypeError for a bad name, size or
        parameter, which is how a point is validated before anything runs."""
        return workloads.get(self.workload)(self.footprint, seed=self.seed, **dict(self.params))


def validate(point):
    """Check everything about ``point`` that can be checked before running it: the workload, its
    size and parameters, and that the driver can run the policies asked for.  Raises ValueError
    (or TypeError for an unknown workload parameter) with a one-line reason."""
    point.make_workload()
    _check_policies(point)
    return point


# -- the driver: the one place that knows which driver runs a point --------------------------------

DRIVER = "UvmDriver"
DEVICE_GRANULE = UVM_CHUNK_SIZE_MAX     # device memory comes in 2 MiB root chunks


def _check_policies(point):
    registry.make_policies(dict(point.policies), seed=point.seed)


def device_bytes_for(footprint, oversub):
    """Device memory of a point: the working set is ``oversub`` x device memory, in whole 2 MiB
    root chunks (the UVM driver's unit).  At ``oversub`` <= 1 the footprint fits (rounded up);
    above 1 the multiple of 2 MiB nearest ``footprint / oversub`` by ratio (at least one chunk),
    so the oversubscription a point gets, ``footprint / device_bytes`` (``oversub_effective``),
    is near the one asked for only when the footprint spans many chunks."""
    want = footprint / oversub
    up = max(1, math.ceil(want / DEVICE_GRANULE))
    if oversub <= 1:
        return up * DEVICE_GRANULE
    down = max(1, up - 1)
    n = min((down, up), key=lambda k: abs(math.log(k * DEVICE_GRANULE / want)))
    return n * DEVICE_GRANULE


def open_driver(system, proc, w, point, device_bytes):
    """The driver that runs ``point``'s workload ``w`` in ``proc`` with ``device_bytes`` of device
    memory, and a function that reads its figures after the run: ``(driver, figures)``, where
    ``figures()`` returns ``{modelled_s, migrated_bytes, evictions, counters}``."""
    from .drivers.uvm import UvmDriver
    drv = UvmDriver(system, proc, device_bytes=device_bytes, policy=dict(point.policies), seed=point.seed)

    def figures():
        c = drv.counters
        return {"modelled_s": drv.modelled_time, "faults": c["gpu_page_fault_count"],
                "migrated_bytes": c["bytes_xfer_htd"] + c["bytes_xfer_dth"], "evictions": c["num_evictions"],
                "counters": c}
    return drv, figures


# -- one point ---------------------------------------------------------------------------------------

# What a row of results holds, in this order (``counters`` is a dict; the CSV spreads it into
# ``counter.NAME`` columns).  Every field but wall_s is determined by the point.
ROW_FIELDS = ("workload", "policy", "oversub", "seed", "backend_requested", "footprint_requested", "params",
              "backend", "driver", "footprint", "device_bytes", "oversub_effective", "ok", "check", "check_detail",
              "error", "modelled_s", "wall_s", "faults", "launches", "lanes", "replays", "migrated_bytes",
              "evictions", "counters")
NONDETERMINISTIC = ("wall_s",)

_ONE_EMULATOR = threading.Lock()      # one emulated machine at a time per process (a Dask worker's
                                      # threads included): one emulator per worker


class _Watched:
    """A driver whose job API reports each launch to ``on_launch(result)`` (the live table)."""

    def __init__(self, driver, on_launch):
        self._driver, self._on_launch = driver, on_launch

    @property
    def jobs(self):
        return self

    def run(self, *args, **kw):
        r = self._driver.jobs.run(*args, **kw)
        self._on_launch(r)
        return r

    def __getattr__(self, name):
        return getattr(self._driver, name)


class PointTimeout(Exception):
    """A point ran past its wall-time limit (``run_point(..., timeout=)``)."""


@contextlib.contextmanager
def _deadline(seconds):
    """Raise PointTimeout in this thread after ``seconds`` of wall time (SIGALRM: only in a
    process's main thread, which is where local workers and ``hmmgpu run`` call run_point; a
    Dask worker thread runs without a limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise PointTimeout(f"did not finish within {seconds:g} s of wall time")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_point(point, on_launch=None, timeout=None):
    """Run one point on a fresh emulated machine; the flat dict of ROW_FIELDS.

    ``on_launch(result, driver)`` is called after every kernel launch (the JobResult and the
    driver), for a live view.  A failed check is a result (``ok`` False, ``check_detail`` says
    where); an exception while running is recorded in ``error`` (ok False), and so is running
    past ``timeout`` seconds of wall time (a policy that livelocks the fault path; the figures
    are then those at the moment it was stopped, and the machine is dropped, not torn down)."""
    import hmmgpu
    validate(point)
    w = point.make_workload()
    fp = w.footprint
    device_bytes = device_bytes_for(fp, point.oversub)
    row = dict(point.to_dict(), backend=None, driver=DRIVER, footprint=fp, device_bytes=device_bytes,
               oversub_effective=round(fp / device_bytes, 4), ok=False,
               check="", check_detail="", error=None, modelled_s=None, wall_s=None, faults=0, launches=0,
               lanes=0, replays=0, migrated_bytes=0, evictions=0, counters={})
    with _ONE_EMULATOR:
        system = hmmgpu.System(backend=point.backend, ram_bytes=4 * fp + MIN_RAM_BYTES)
        row["backend"] = system.backend_name
        proc = system.spawn()
        w.setup(proc)
        dropped = False
        try:
            driver, figures = open_driver(system, proc, w, point, device_bytes)
            target = driver if on_launch is None else _Watched(driver, lambda r: on_launch(r, driver))
            t0 = time.perf_counter()
            try:
                with _deadline(timeout):
                    w.run(target)
            except PointTimeout as e:
                row["error"] = f"timeout: {e}"
                dropped = True              # stopped mid-service: the machine is dropped as it is
            except Exception as e:          # a crash is a result of the point, not of the sweep
                row["error"] = f"{type(e).__name__}: {e}"
            row["wall_s"] = time.perf_counter() - t0
            row.update(w.summary())
            row.update(figures())           # faults as the driver counted them, a stopped launch's too
            if not dropped:
                driver.close()
                if row["error"] is None:
                    c = w.check()
                    row.update(ok=c.ok, check=f"{c.what} ({c.how})", check_detail=c.detail)
        finally:
            if not dropped:
                w.close()
                proc.exit()
    return {k: row[k] for k in ROW_FIELDS}


def deterministic(row):
    """``row`` without the figures that vary from run to run (wall time)."""
    return {k: v for k, v in row.items() if k not in NONDETERMINISTIC}


# -- sweeps ------------------------------------------------------------------------------------------

def expand_workloads(names):
    """Workload names, with ``uvmbench`` / ``patterns`` expanded; ValueError for an unknown one."""
    out = []
    for n in names:
        n = n.strip().lower()
        for m in GROUPS.get(n, (n,)):
            workloads.get(m)
            if m not in out:
                out.append(m)
    return out


def make_points(workload_names, policies=((),), oversubs=(1.0,), seeds=(0,), footprint=None, backend="numpy",
                params=()):
    """Every combination, workload-major: a list of Points (validated)."""
    pts = [Point(w, footprint, p, o, s, backend, params)
           for w, p, o, s in itertools.product(expand_workloads(workload_names), policies, oversubs, seeds)]
    for p in pts:
        validate(p)
    return pts


SPEC_KEYS = {"workloads": "names, or groups: uvmbench, patterns", "policies": "a list of policy sets",
             "oversub": "ratios", "seeds": "integers", "footprint": "bytes (K/M/G suffix) or null",
             "backend": "numpy, cupy or auto", "params": "workload parameters"}


def load_spec(path):
    """A sweep spec from a JSON or TOML file (by extension): a dict with SPEC_KEYS (any subset).
    ValueError naming the file and the problem."""
    try:
        if path.lower().endswith(".toml"):
            try:
                import tomllib
            except ImportError:
                raise ValueError(f"{path}: reading TOML needs Python 3.11 (tomllib); write the spec as JSON") \
                    from None
            with open(path, "rb") as f:
                spec = tomllib.load(f)
        else:
            with open(path) as f:
                spec = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the spec {path}: {e.strerror}") from None
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: not valid {'TOML' if path.lower().endswith('.toml') else 'JSON'}: {e}") \
            from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a spec is a table/object of {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(SPEC_KEYS)}")
    for k in ("workloads", "policies", "oversub", "seeds"):
        if k in spec and not isinstance(spec[k], list):
            raise ValueError(f"{path}: {k} must be a list ({SPEC_KEYS[k]})")
    if "params" in spec and not isinstance(spec["params"], dict):
        raise ValueError(f"{path}: params must be a table/object of workload parameters")
    return spec


def load_results(out_dir):
    """The rows already in ``out_dir/results.json`` (``[]`` when there is none)."""
    path = os.path.join(out_dir, RESULTS_JSON)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        doc = json.load(f)
    return list(doc.get("rows", []))


def row_key(row):
    return Point(row["workload"], row["footprint_requested"], parse_policies(row["policy"]), row["oversub"],
                 row["seed"], row["backend_requested"], tuple(row["params"].items())).key


def _sort_key(row):
    return (row["workload"], row["policy"] != DEFAULT_POLICY_LABEL, row["policy"], row["oversub"], row["seed"],
            row["backend_requested"], row["footprint_requested"] or 0, json.dumps(row["params"], sort_keys=True))


def write_results(rows, out_dir, meta=None):
    """``results.json`` ({meta, rows}) and ``results.csv`` (one line per point, counters spread
    into ``counter.NAME`` columns), rows in a fixed order; each written whole, then renamed."""
    rows = sorted(rows, key=_sort_key)
    doc = {"meta": meta or {}, "rows": rows}
    _atomic_write(os.path.join(out_dir, RESULTS_JSON), lambda f: f.write(json.dumps(doc, indent=1) + "\n"))
    names = sorted({k for r in rows for k in r.get("counters", {})})
    head = [k for k in ROW_FIELDS if k != "counters"] + [f"counter.{k}" for k in names]

    def w(f):
        out = csv.writer(f, lineterminator="\n")
        out.writerow(head)
        for r in rows:
            vals = [json.dumps(r[k], sort_keys=True) if k == "params" else r[k] for k in head[:len(ROW_FIELDS) - 1]]
            out.writerow(["" if v is None else v for v in vals] + [r["counters"].get(k, "") for k in names])
    _atomic_write(os.path.join(out_dir, RESULTS_CSV), w)
    return rows


def _atomic_write(path, fill):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        fill(f)
    os.replace(tmp, path)


def pending(points, rows):
    """The points whose results ``rows`` do not hold yet (a row that ended in an error is run again)."""
    done = {row_key(r) for r in rows if r.get("error") is None}
    return [p for p in points if p.key not in done]


def _run_in_worker(point, timeout=None):
    return run_point(point, timeout=timeout)


def run_points(points, workers=1, scheduler=None, timeout=None):
    """Yield ``(point, row)`` as points complete: in this process (``workers`` 1), in ``workers``
    local spawned processes, or on the Dask cluster at ``scheduler``; ``timeout``: each point's
    wall-time limit in seconds (local runs only)."""
    if scheduler is not None:
        yield from _run_on_dask(points, scheduler)
    elif workers <= 1:
        for p in points:
            yield p, run_point(p, timeout=timeout)
    else:
        import concurrent.futures as cf
        import multiprocessing
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            futs = {ex.submit(_run_in_worker, p, timeout): p for p in points}
            try:
                for f in cf.as_completed(futs):
                    yield futs[f], f.result()
            except BaseException:
                for f in futs:
                    f.cancel()
                raise


DASK_HINT = "pip install 'hmmgpu[dask]' (or pip install 'dask[distributed]')"


def dask_client(scheduler):
    """A dask.distributed Client for ``scheduler`` (an address, or a Client/LocalCluster)."""
    try:
        from distributed import Client
    except ImportError:
        raise ImportError(f"--scheduler needs dask.distributed, which is not installed: {DASK_HINT}") from None
    if isinstance(scheduler, Client):
        return scheduler, False
    return Client(scheduler), True


def _run_on_dask(points, scheduler):
    from distributed import as_completed
    client, own = dask_client(scheduler)
    try:
        futs = client.map(_run_in_worker, points, pure=False)
        by = {f.key: p for f, p in zip(futs, points)}
        for f in as_completed(futs):
            yield by[f.key], f.result()
    finally:
        if own:
            client.close()


def sweep(points, out_dir, workers=1, scheduler=None, on_point=None, meta=None, timeout=None):
    """Run the points that ``out_dir`` has no result for, writing the results after each one
    (``timeout``: each point's wall-time limit in seconds, local runs; a point past it is an
    error row, run again on the next sweep).

    Returns ``(rows, ran)``: every row in the directory (older points included) and how many
    points ran now.  ``on_point(point, row, done, total)`` reports progress (``total`` counts
    only the points that run now)."""
    os.makedirs(out_dir, exist_ok=True)
    rows = load_results(out_dir)
    todo = pending(points, rows)
    keys = {p.key for p in todo}
    rows = [r for r in rows if row_key(r) not in keys]      # errored rows of points run again
    meta = dict(meta or {})
    for i, (p, row) in enumerate(run_points(todo, workers, scheduler, timeout), 1):
        rows.append(row)
        rows = write_results(rows, out_dir, meta)
        if on_point:
            on_point(p, row, i, len(todo))
    if not todo:
        rows = write_results(rows, out_dir, meta)
    return rows, len(todo)


# -- plots -------------------------------------------------------------------------------------------

def plot(rows, out_dir):
    """Draw the sweep's figures into ``out_dir`` with matplotlib (ImportError without it):
    ``speedup.png`` -- per workload and oversubscription, each policy set's modelled speedup over
    the default policies (drawn when the rows have modelled times and more than one policy set);
    ``oversubscription.png`` -- faults, migrated bytes and evictions against the oversubscription
    ratio, one line per workload (default policies, mean over seeds).  Returns
    ``{file: None or why it was not drawn}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["ok"]]
    out = {}
    policies = sorted({r["policy"] for r in ok} - {DEFAULT_POLICY_LABEL})
    speed = speedups(ok)
    if not policies:
        out[PLOT_SPEEDUP] = "only the default policies ran: nothing to compare"
    elif not speed:
        out[PLOT_SPEEDUP] = "no modelled times (the driver has no cost model)"
    else:
        groups = sorted({(w, o) for (w, o, _) in speed})
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) * len(policies)), 4))
        width = 0.8 / len(policies)
        for j, pol in enumerate(policies):
            ys = [speed.get((w, o, pol), float("nan")) for w, o in groups]
            ax.bar([i + j * width for i in range(len(groups))], ys, width, label=pol)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{w}\n{o:g}x" for w, o in groups], fontsize=7)
        ax.set_ylabel("speedup over the default policies (modelled time)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, PLOT_SPEEDUP), dpi=100)
        plt.close(fig)
        out[PLOT_SPEEDUP] = None
    series = by_oversub(ok)
    if not series:
        out[PLOT_OVERSUB] = "no checked results of the default policies"
    else:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        colours = plt.get_cmap("tab20").colors
        for ax, (field, label) in zip(axes, (("faults", "faults"), ("migrated_bytes", "migrated MiB"),
                                             ("evictions", "evictions"))):
            for i, (wl, pts) in enumerate(sorted(series.items())):
                xs = sorted(pts)
                ys = [pts[x][field] / ((1 << 20) if field == "migrated_bytes" else 1) for x in xs]
                ax.plot(xs, ys, marker="os^v"[i // 20 % 4], color=colours[i % 20], label=wl)
            ax.set_xlabel("oversubscription (working set / device memory)")
            ax.set_ylabel(label)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7)
        fig.tight_layout(rect=(0, 0, 0.88, 1))
        fig.savefig(os.path.join(out_dir, PLOT_OVERSUB), dpi=100)
        plt.close(fig)
        out[PLOT_OVERSUB] = None
    return out


def _mean_by(rows, keyf, fields):
    acc = {}
    for r in rows:
        acc.setdefault(keyf(r), []).append(r)
    return {k: {f: sum(r[f] for r in rs) / len(rs) for f in fields} for k, rs in acc.items()}


def speedups(rows):
    """{(workload, oversub, policy): modelled time of the default policies / of that policy}
    (means over seeds; only where both have modelled times)."""
    timed = [r for r in rows if r["modelled_s"] is not None]
    t = _mean_by(timed, lambda r: (r["workload"], r["oversub"], r["policy"]), ("modelled_s",))
    return {k: t[(k[0], k[1], DEFAULT_POLICY_LABEL)]["modelled_s"] / v["modelled_s"]
            for k, v in t.items() if k[2] != DEFAULT_POLICY_LABEL and (k[0], k[1], DEFAULT_POLICY_LABEL) in t
            and v["modelled_s"] > 0}


def by_oversub(rows):
    """{workload: {oversub: mean faults, migrated_bytes, evictions, modelled_s or None}} of the
    default policies."""
    d = [r for r in rows if r["policy"] == DEFAULT_POLICY_LABEL]
    m = _mean_by(d, lambda r: (r["workload"], r["oversub"]), ("faults", "migrated_bytes", "evictions"))
    out = {}
    for (wl, o), v in m.items():
        ts = [r["modelled_s"] for r in d if r["workload"] == wl and r["oversub"] == o]
        v["modelled_s"] = None if None in ts else sum(ts) / len(ts)
        out.setdefault(wl, {})[o] = v
    return out


def slowdowns(rows, base=1.0, time_field="modelled_s"):
    """{(workload, oversub): time at oversub / time at ``base``} of the default policies, means
    over seeds; ``time_field`` "modelled_s" (None where the driver models no time) or "wall_s"."""
    d = [r for r in rows if r["policy"] == DEFAULT_POLICY_LABEL and r["ok"] and r[time_field] is not None]
    t = _mean_by(d, lambda r: (r["workload"], r["oversub"]), (time_field,))
    return {k: v[time_field] / t[(k[0], base)][time_field] for k, v in t.items()
            if k[1] != base and (k[0], base) in t and t[(k[0], base)][time_field] > 0}


__all__ = ["Point", "run_point", "validate", "sweep", "make_points", "load_spec", "load_results", "write_results",
           "plot", "speedups", "slowdowns", "by_oversub", "parse_bytes", "parse_policies", "policy_label",
           "device_bytes_for", "open_driver", "deterministic", "POLICY_FAMILIES", "UVMBENCH", "GROUPS"]
