"""The NumPy backend: the device primitives in vectorised NumPy.

Honest like numba's CUDA simulator: it has the same semantics as the CuPy
backend, its "device memory" is ordinary host memory, its copies complete at
once, and every figure measured on it is labelled "numpy fallback".
"""
import numpy as np

from ..constants import PAGE_SIZE
from ..device.hw import Arena, Backend


class NumpyArena(Arena):
    """Frames in one NumPy array; zero-filled lazily by the OS (calloc)."""

    def __init__(self, backend, nframes, kind):
        super().__init__(backend, nframes)
        self.kind = kind
        self.frames = np.zeros((self.nframes, PAGE_SIZE), dtype=np.uint8)
        # System RAM is CPU-addressable; device memory is reached through read/write only,
        # exactly as on the CuPy backend, so no code path can depend on a shortcut.
        self.host = self.frames if kind == "host" else None

    def sub(self, first, nframes):
        view = NumpyArena.__new__(NumpyArena)
        Arena.__init__(view, self.backend, nframes)
        view.kind = self.kind
        view.frames = self.frames[int(first):int(first) + int(nframes)]
        view.host = view.frames if self.kind == "host" else None
        return view

    def read(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        runs = _few_runs(idx)
        if runs is None:
            return self.frames[idx]
        out = np.empty((idx.size, PAGE_SIZE), np.uint8)
        for (a, b), o in zip(*runs):                 # one copy per run of consecutive frames
            out[o:o + b - a] = self.frames[a:b]
        return out

    def write(self, idx, data):
        idx = np.asarray(idx, dtype=np.int64)
        data = np.asarray(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        runs = _few_runs(idx)
        if runs is None:
            self.frames[idx] = data
            return
        for (a, b), o in zip(*runs):
            self.frames[a:b] = data[o:o + b - a]

    def fill(self, idx, value=0):
        idx = np.asarray(idx, dtype=np.int64)
        runs = _few_runs(idx)
        if runs is None:
            self.frames[idx] = value
            return
        for a, b in runs[0]:                       # a memset per run (fresh pages come in runs)
            self.frames[a:b] = value


MIN_PAGES_PER_RUN = 16      # below this many pages per run on average, one fancy-index op wins


def _few_runs(idx):
    """``idx`` as runs of consecutive ascending frames -- ([(first, end), ...], [offset in idx,
    ...]) -- when they average at least MIN_PAGES_PER_RUN pages; None otherwise."""
    n = idx.size
    if n < MIN_PAGES_PER_RUN:
        return None
    if int(idx[-1]) - int(idx[0]) == n - 1 and not np.count_nonzero(np.diff(idx) != 1):
        return [(int(idx[0]), int(idx[-1]) + 1)], [0]
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    if (brk.size + 1) * MIN_PAGES_PER_RUN > n:
        return None
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [n]))
    return list(zip(idx[starts].tolist(), (idx[ends - 1] + 1).tolist())), starts.tolist()


class NumpyBackend(Backend):
    name = "numpy"
    emulated = True

    def host_arena(self, nframes):
        return NumpyArena(self, nframes, "host")

    def device_arena(self, nframes, gpu=0, lazy=False):
        # np.zeros is lazy already: the OS backs a page when it is first touched
        return NumpyArena(self, nframes, "device")

    def dma_engine(self, gpu=0):
        from .dma import NumpyDmaEngine
        return NumpyDmaEngine(self)

    def pagetable_hw(self, gpu=0):
        from .pagetable import NumpyPageTableHW
        return NumpyPageTableHW()

    def fault_buffer_hw(self, capacity, gpu=0):
        from .jobs import NumpyFaultHW
        return NumpyFaultHW(capacity)

    def job_executor(self, device):
        from .jobs import NumpyJobExecutor
        return NumpyJobExecutor(device)

    def info(self):
        return {"backend": self.name, "numpy": np.__version__, "emulated": True}
