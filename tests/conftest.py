"""Shared fixtures for the test suite.

The host-kernel tests (tests/test_mm_*.py) use:

* ``mm_system``  a fresh ``hmmgpu.System`` (NumPy backend unless HMMGPU_BACKEND says otherwise)
                 with 64 MiB of RAM
                 (``mm_system_factory(ram_bytes=...)`` for another size);
* ``mm_file``    a factory for real files: ``fd = mm_file(data, flags=os.O_RDWR)``
                 writes ``data`` to a new temp file and returns an open OS fd (closed at teardown;
                 ``mm_file.path(fd)`` gives its path);
* ``mmh``        small helpers that look at the emulated kernel's internals (PTEs, struct page).
"""
import os

import numpy as np
import pytest

os.environ.setdefault("HMMGPU_BACKEND", "numpy")

PAGE = 4096
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_DIRTY = 1 << 2
PTE_YOUNG = 1 << 3
PTE_SPECIAL = 1 << 4
PTE_PFN_SHIFT = 12


@pytest.fixture
def mm_system_factory():
    import hmmgpu

    made = []

    def make(ram_bytes=64 << 20, **kw):
        # NumPy unless HMMGPU_BACKEND asks for another (the same tests then run on CuPy's
        # pinned, mapped host RAM)
        s = hmmgpu.System(backend=os.environ.get("HMMGPU_BACKEND", "numpy"), ram_bytes=ram_bytes, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        close = getattr(s, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass


@pytest.fixture
def mm_system(mm_system_factory):
    return mm_system_factory()


class _FileFactory:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.fds = []
        self.paths = {}
        self.n = 0

    def __call__(self, data=b"", flags=os.O_RDWR, name=None):
        self.n += 1
        path = self.tmp_path / (name or f"mmfile{self.n}")
        with open(path, "wb") as f:
            f.write(bytes(data))
        fd = os.open(path, flags)
        self.fds.append(fd)
        self.paths[fd] = path
        return fd

    def open(self, path, flags=os.O_RDWR):
        fd = os.open(path, flags)
        self.fds.append(fd)
        self.paths[fd] = path
        return fd

    def path(self, fd):
        return self.paths[fd]

    def contents(self, fd_or_path):
        path = self.paths.get(fd_or_path, fd_or_path)
        with open(path, "rb") as f:
            return f.read()

    def close_all(self):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def mm_file(tmp_path):
    f = _FileFactory(tmp_path)
    yield f
    f.close_all()


class MMHelpers:
    """Read-only views of the emulated kernel's internals (docs/architecture.md encoding)."""

    PRESENT = PTE_PRESENT
    WRITE = PTE_WRITE
    DIRTY = PTE_DIRTY
    SPECIAL = PTE_SPECIAL

    @staticmethod
    def vmas(proc):
        return list(proc.mm.vmas)

    @staticmethod
    def find_vma(proc, addr):
        for v in proc.mm.vmas:
            if v.start <= addr < v.end:
                return v
        return None

    @classmethod
    def pte(cls, proc, addr):
        v = cls.find_vma(proc, addr)
        if v is None:
            return None
        return int(v.pte[(addr - v.start) // PAGE])

    @classmethod
    def pfn(cls, proc, addr):
        """pfn the PTE at addr points at, or None when not present."""
        e = cls.pte(proc, addr)
        if not e or not (e & PTE_PRESENT):
            return None
        return e >> PTE_PFN_SHIFT

    @classmethod
    def writable(cls, proc, addr):
        e = cls.pte(proc, addr)
        return bool(e and (e & PTE_PRESENT) and (e & PTE_WRITE))

    @staticmethod
    def pages(system):
        return system.phys.pages

    @staticmethod
    def refcount(system, pfn):
        return int(system.phys.pages.refcount[pfn])

    @staticmethod
    def mapcount(system, pfn):
        return int(system.phys.pages.mapcount[pfn])

    @staticmethod
    def pincount(system, pfn):
        return int(system.phys.pages.pincount[pfn])

    @staticmethod
    def nr_free(system):
        return int(system.phys.nr_free())

    @staticmethod
    def pattern(n, seed):
        """n deterministic pseudo-random bytes (never all zero)."""
        rng = np.random.default_rng(seed)
        b = rng.integers(1, 256, size=n, dtype=np.uint8)
        return b

    @staticmethod
    def mapped_pte_counts(procs, nframes):
        """How many present, non-special PTEs point at each pfn across ``procs``."""
        counts = np.zeros(nframes, dtype=np.int64)
        for p in procs:
            for v in p.mm.vmas:
                pte = np.asarray(v.pte, dtype=np.uint64)
                present = (pte & np.uint64(PTE_PRESENT)) != 0
                special = (pte & np.uint64(PTE_SPECIAL)) != 0
                pfns = (pte[present & ~special] >> np.uint64(PTE_PFN_SHIFT)).astype(np.int64)
                np.add.at(counts, pfns, 1)
        return counts


@pytest.fixture
def mmh():
    return MMHelpers


# ---------------------------------------------------------------------------------------------
# Device layer (tests/test_device_*.py): the GPU switch and the ``backend`` fixture.
#
# Tests marked ``@pytest.mark.gpu`` need a CUDA GPU.  Without one they are skipped, except under
# ``--require-gpu``, where they run anyway and therefore FAIL: a GPU run must never pass by skipping.

def pytest_addoption(parser):
    parser.addoption("--require-gpu", action="store_true", default=False,
                     help="run gpu-marked tests even without a usable GPU (they fail instead of skipping)")


def _gpu_usable():
    from hmmgpu.device.backend import backend_info
    info = backend_info()
    return info["backend"] == "cupy", info["reason"]


def pytest_collection_modifyitems(config, items):
    if config.getoption("--require-gpu"):
        return
    if not any("gpu" in item.keywords for item in items):
        return
    ok, why = _gpu_usable()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU ({why}); --require-gpu turns this into a failure")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    """A device backend instance: the NumPy fallback, and CuPy where a GPU answers."""
    from hmmgpu.device.backend import get_backend
    if request.param == "cupy":
        ok, why = _gpu_usable()
        if not ok:
            pytest.fail(f"--require-gpu: the cupy backend cannot run here: {why}")
    return get_backend(request.param)
