"""What every workload is: a GPU program under CUDA managed memory, replayed on the emulated device.

A workload stands for one program of the suites that unified-memory papers measure with
(UVMBench: Polybench, Rodinia and its own; NVIDIA's oversubscription sample; traces captured
elsewhere).  Like such a program it allocates its arrays (each ``cudaMallocManaged`` becomes an
anonymous mmap of the process, 2 MiB aligned as UVM's VA blocks are), the CPU writes the input
(first touch on the host), its kernels run as device jobs whose every access translates through
the device page table and may fault -- serviced by whichever driver runs them -- and the CPU reads
the result back and checks it against plain NumPy over the same input.

The interface a runner (``hmmgpu run``, a sweep, a test) relies on::

    w = Gemm(footprint=64 << 20, seed=0)     # sized by the bytes it maps: oversubscription is
    w.footprint                              # device memory / footprint
    w.setup(proc)                            # mmap + the CPU writes the input
    lo, hi = w.extent                        # the VA range a mirroring driver must cover
    w.run(driver)                            # its kernels through driver.jobs (any driver's job API)
    c = w.check()                            # Check: ok, what was compared, how
    w.close()                                # munmap

Lanes are written for the engine's contract: a lane may run several times until one pass
completes without faulting, and only that pass commits.  Every lane is idempotent (a function of
memory as it was at launch), and touches a bounded number of pages: a long reduction loop is cut
into launches of ``step`` iterations whose running value is carried in the output array -- the
same order of operations as the one-launch original, so a replayed lane repeats at most ``step``
iterations and one pass needs only a few pages resident, which keeps progress possible when the
device holds less than the working set.  A NumPy lane makes exactly the accesses of its CUDA lane
in the same order (one per step, vectorised over lanes), so both backends raise the same faults.
Float arithmetic is float32 with one rounding per operation (``__fadd_rn`` / ``__fmul_rn`` on CUDA,
never contracted into an FMA), so every result compares exactly with a NumPy model that does
the same operations in the same order.
"""
import os

import numpy as np

from ..constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PMD_SIZE, PROT_READ, PROT_WRITE
from ..device.jobs import UserJob

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
HEADER = "workloads.cuh"

_U = np.uint64
F32 = np.float32


def va(base, idx, size=4):
    """Virtual addresses base + size * idx as uint64 (what a lane hands to ctx.load/store)."""
    return _U(base) + np.asarray(idx).astype(_U) * _U(size)


def f32arg(word):
    """A float32 job argument from its packed word (pack_args passes np.float32 as its bits)."""
    return np.array(int(word) & 0xFFFFFFFF, np.uint32).view(np.float32)[()]


def page_round(n):
    return -(-int(n) // PAGE_SIZE) * PAGE_SIZE


def kernel_jobs(filename, lanes):
    """The UserJobs of hmmgpu/workloads/kernels/<filename>: ``{name: UserJob}`` whose CUDA lanes
    are that file's HMM_DEFINE_JOB(name, ...) and whose NumPy lanes are ``lanes[name]``.  They
    share one module, so the file compiles once per GPU."""
    with open(os.path.join(KERNEL_DIR, HEADER)) as f:
        header = f.read()
    with open(os.path.join(KERNEL_DIR, filename)) as f:
        body = f.read()
    src = f'#line 1 "{HEADER}"\n{header}\n#line 1 "{filename}"\n{body}'
    return {name: UserJob(name, cuda_source=src, numpy_lane=fn, module=filename)
            for name, fn in lanes.items()}


def steps(n, step):
    """[lo, hi) ranges of at most ``step`` iterations covering range(n): one launch each."""
    step = max(1, int(step))
    return [(lo, min(n, lo + step)) for lo in range(0, int(n), step)]


class Region:
    """One allocation of the workload: ``addr`` (2 MiB aligned), ``nbytes`` asked, ``length`` mapped."""

    __slots__ = ("name", "addr", "nbytes", "length")

    def __init__(self, name, addr, nbytes, length):
        self.name, self.addr, self.nbytes, self.length = name, int(addr), int(nbytes), int(length)

    def __repr__(self):
        return f"Region({self.name!r}, 0x{self.addr:x}, {self.nbytes} bytes)"


class Check:
    """The outcome of a result check: ``ok``, what was compared, and how (``exact`` or a tolerance)."""

    def __init__(self, ok, what, how="exact", detail=""):
        self.ok, self.what, self.how, self.detail = bool(ok), what, how, detail

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return (f"Check({'ok' if self.ok else 'FAILED'}: {self.what}, {self.how}"
                f"{'; ' + self.detail if self.detail else ''})")


def compare(expected, got, what):
    """Exact comparison of named arrays (float NaNs equal NaNs); a Check naming the first miss."""
    bad = []
    for name in expected:
        e, g = np.asarray(expected[name]), np.asarray(got[name])
        if e.shape != g.shape:
            bad.append(f"{name}: shape {g.shape} != {e.shape}")
            continue
        eq = (e == g) | ((e != e) & (g != g)) if e.dtype.kind == "f" else (e == g)
        if not eq.all():
            i = np.unravel_index(int(np.flatnonzero(~eq.reshape(-1))[0]), e.shape)
            bad.append(f"{name}: {int((~eq).sum())} of {e.size} differ, first at {tuple(map(int, i))}: "
                       f"{g[i]!r} != {e[i]!r}")
    return Check(not bad, what, "exact", "; ".join(bad))


class Workload:
    """Base class: subclasses set ``name``, ``suite``, ``default_dims`` (the instance built when
    no footprint is given), ``params`` (tunables and their defaults, e.g. the original's
    iteration counts), ``KERNELS`` (from ``kernel_jobs``), and implement ``dims_for(footprint)``,
    ``layout()``, ``init(rng)``, ``execute()`` and ``check()``."""

    name = ""
    suite = ""
    default_dims = {}
    params = {}
    KERNELS = {}

    def __init__(self, footprint=None, *, seed=0, **params):
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise TypeError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}; "
                            f"it takes {', '.join(sorted(self.params)) or 'none'}")
        self.p = dict(self.params)
        self.p.update(params)
        self.validate()
        self.seed = int(seed)
        if footprint is None:
            self.dims = dict(self.default_dims)
        else:
            if int(footprint) <= 0:
                raise ValueError(f"{self.name}: footprint must be positive, not {footprint}")
            self.dims = self.dims_for(int(footprint))
        self.proc = None
        self.regions = {}
        self.driver = None
        self.results = []

    def validate(self):
        """Check ``self.p`` (the parameters); raise ValueError naming the bad one."""

    # -- sizing ------------------------------------------------------------------------------
    def dims_for(self, footprint):
        """The problem dimensions (a dict) of the largest instance mapping at most ``footprint``."""
        raise NotImplementedError

    def layout(self, dims=None):
        """The allocations, ``[(name, nbytes)]``, of the instance with ``dims`` (default: ours)."""
        raise NotImplementedError

    @classmethod
    def _bytes(cls, layout):
        return sum(page_round(n) for _, n in layout)

    def _fit(self, footprint, make, lo, step=1):
        """The largest n = lo + k*step whose dims ``make(n)`` fit in ``footprint`` bytes (the
        footprint grows with n); ValueError naming the smallest footprint when none fits."""
        fits = lambda n: self._bytes(self.layout(make(n))) <= footprint   # noqa: E731
        if not fits(lo):
            raise ValueError(f"{self.name}: a footprint of {footprint} bytes is below its smallest "
                             f"instance ({self._bytes(self.layout(make(lo)))} bytes)")
        d = step
        while fits(lo + d):                  # galloping, then bisection: O(log n) layouts
            lo += d
            d *= 2
        hi = lo + d
        while hi - lo > step:
            mid = lo + (hi - lo) // step // 2 * step
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return make(lo)

    @property
    def footprint(self):
        """Bytes this workload maps (page-rounded allocations): what oversubscription divides."""
        return self._bytes(self.layout())

    # -- memory of the process ---------------------------------------------------------------
    def setup(self, proc):
        """Allocate every array in ``proc`` and let the CPU write the input (first touch)."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name}: already set up")
        self.proc = proc
        try:
            for name, nbytes in self.layout():
                self.regions[name] = self._mmap(name, nbytes, self.align_of(name))
            self.init(np.random.default_rng(self.seed))
        except BaseException:
            self.close()
            raise
        return self

    def align_of(self, name):
        """Where array ``name`` starts past a 2 MiB boundary (0: on one)."""
        return 0

    def _mmap(self, name, nbytes, align_to=0):
        """An anonymous mapping of ``nbytes`` whose start is ``align_to`` past a 2 MiB boundary
        (cudaMallocManaged hands out whole 2 MiB VA blocks): over-map, then unmap the slack."""
        length = page_round(max(1, nbytes))
        prot, flags = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
        raw = self.proc.mmap(length + PMD_SIZE, prot, flags)
        addr = -(-(raw - align_to) // PMD_SIZE) * PMD_SIZE + align_to
        if addr > raw:
            self.proc.munmap(raw, addr - raw)
        tail = raw + length + PMD_SIZE - (addr + length)
        if tail:
            self.proc.munmap(addr + length, tail)
        return Region(name, addr, nbytes, length)

    def addr(self, name):
        return self.regions[name].addr

    def write(self, name, data, offset=0):
        """A CPU store of ``data`` (an ndarray) into array ``name``."""
        self.proc.write(self.regions[name].addr + offset, np.ascontiguousarray(data))

    def read(self, name, dtype, shape=None, offset=0, count=None):
        """A CPU load of array ``name`` as ``dtype`` (the whole array unless ``count`` items)."""
        dt = np.dtype(dtype)
        r = self.regions[name]
        n = (r.nbytes - offset) // dt.itemsize if count is None else int(count)
        a = self.proc.read(r.addr + offset, n * dt.itemsize).view(dt)
        return a.reshape(shape) if shape is not None else a

    @property
    def extent(self):
        """[lo, hi): the virtual range that holds every array (page aligned)."""
        lo = min(r.addr for r in self.regions.values())
        hi = max(r.addr + r.length for r in self.regions.values())
        return lo, hi

    def close(self):
        """Unmap every array (the process keeps running)."""
        for r in self.regions.values():
            self.proc.munmap(r.addr, r.length)
        self.regions = {}

    # -- the program -------------------------------------------------------------------------
    def init(self, rng):
        raise NotImplementedError

    def run(self, driver):
        """Run the program's kernels through ``driver.jobs`` (and its CPU steps on the process).
        Returns the JobResults, one per launch."""
        if self.proc is None:
            raise RuntimeError(f"{self.name}: setup(proc) first")
        self.driver = driver
        self.results = []
        self.execute()
        return self.results

    def launch(self, kernel, nlanes, args):
        """One kernel launch of ``nlanes`` lanes through the driver's job API."""
        r = self.driver.jobs.run(self.KERNELS[kernel], int(nlanes), list(args))
        self.results.append(r)
        return r

    def execute(self):
        raise NotImplementedError

    def check(self):
        raise NotImplementedError

    def summary(self):
        """Launches, lanes launched (first rounds and replays) and faults of the last run."""
        rs = self.results
        return {"launches": len(rs), "lanes": sum(sum(r.rounds) for r in rs),
                "replays": sum(r.replays for r in rs), "faults": sum(r.faults for r in rs)}

    def __repr__(self):
        d = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        return f"{type(self).__name__}({d}; {self.footprint} bytes)"
