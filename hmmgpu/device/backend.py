"""The backend switch: which implementation of the device primitives runs.

Two backends fill the same small interface (tinygrad's shape: one interface, one
module per backend, chosen by name):

* ``cupy``  (``hmmgpu/kernels/backend.py``): system RAM in pinned, mapped host
  memory, device frames in GPU memory, copies and jobs as CUDA kernels.
* ``numpy`` (``hmmgpu/fallback/backend.py``): every primitive in vectorised
  NumPy with identical semantics; its timings are emulated and say so.

``auto`` (the default, or ``HMMGPU_BACKEND``) picks CuPy only when it imports, a
CUDA device is present, and a test kernel compiles (NVRTC), loads and runs there
correctly; ``backend_info()`` says which step failed otherwise.  Nothing here
initialises CUDA at import time; the probe does when it runs (once per process).
"""
import os

import numpy as np

from ..constants import PAGE_SIZE
from ..errors import BackendUnavailable

BACKENDS = ("auto", "cupy", "numpy")


class Fence:
    """Completion of asynchronous device work (a CUDA event on the GPU)."""

    def wait(self):
        pass

    def done(self):
        return True


DONE = Fence()


class Arena:
    """A pool of ``nframes`` page frames in one memory: system RAM or a device's.

    Frames are addressed by index (0 .. nframes-1); the memory map in
    ``hmmgpu.mm.physmem`` turns global pfns into (arena, index).  Every method
    takes a NumPy int64 index array and works on all of them in one step.
    """

    kind = "host"          # "host": system RAM; "device": a device's own memory
    host = None            # a NumPy view of the frames when the CPU can address them

    def __init__(self, backend, nframes):
        self.backend = backend
        self.nframes = int(nframes)

    def read(self, idx):
        """Copy frames ``idx`` out to a new host array of shape (len(idx), PAGE_SIZE)."""
        raise NotImplementedError

    def write(self, idx, data):
        """Store host bytes ``data`` (len(idx), PAGE_SIZE) into frames ``idx``."""
        raise NotImplementedError

    def fill(self, idx, value=0):
        """Set every byte of frames ``idx`` to ``value`` (zeroing new pages)."""
        raise NotImplementedError

    def sub(self, first, nframes):
        """Frames [first, first + nframes) as an Arena of their own: a view, no copy.  A driver
        whose device owns one arena hotplugs it in chunks (one memremap_pages each)."""
        raise NotImplementedError

    def read_bytes(self, idx, offsets, lengths):
        """Gather byte spans (frame idx[i], offsets[i] .. +lengths[i]) into one flat array."""
        pages = self.read(idx)
        return _slice_spans(pages, offsets, lengths)


def _slice_spans(pages, offsets, lengths):
    """Flatten sub-page spans of a (n, PAGE_SIZE) array, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return np.zeros(0, np.uint8)
    starts = np.arange(len(lengths), dtype=np.int64) * PAGE_SIZE + np.asarray(offsets, np.int64)
    total = int(lengths.sum())
    # index of every byte: start of its span + position inside the span
    rep = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return pages.reshape(-1)[rep + np.arange(total, dtype=np.int64)]


class Backend:
    """The device primitives one backend provides."""

    name = "?"
    emulated = True         # True: timings are not hardware timings

    def host_arena(self, nframes):
        """System RAM: an Arena with ``.host`` set (pinned, mapped memory on CUDA)."""
        raise NotImplementedError

    def device_arena(self, nframes, gpu=0):
        """A device's own memory: an Arena of ``kind == "device"``."""
        raise NotImplementedError

    def dma_engine(self, gpu=0):
        """The copy engine (``hmmgpu.device.dma``) of one device."""
        raise NotImplementedError

    def info(self):
        """Facts for ``hmmgpu info``: a dict."""
        return {"backend": self.name}

    # -- the hardware of one emulated device (hmmgpu/device/device.py puts it together) --------
    def fence(self, gpu=0):
        """A Fence that completes when everything queued so far on ``gpu``'s device queue has."""
        return DONE

    def pagetable_hw(self, gpu=0):
        """The page-table walker and command processor (alloc/grow/execute/lookup/fence)."""
        raise NotImplementedError

    def fault_buffer_hw(self, capacity, gpu=0):
        """The fault ring in device memory (``drain() -> (records (n, 4) uint64, put)``)."""
        raise NotImplementedError

    def job_executor(self, device):
        """Launches job slices for an EmulatedDevice (hmmgpu/device/jobs.py)."""
        raise NotImplementedError


_reason = {}


def backend_info():
    """Which backend ``auto`` picks on this machine, and why."""
    name, why = _probe_auto()
    return {"backend": name, "reason": why, "env": os.environ.get("HMMGPU_BACKEND")}


def _probe_auto():
    if "auto" in _reason:
        return _reason["auto"]
    try:
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA install
        result = ("numpy", f"cupy does not import ({type(e).__name__}: {e})")
    else:
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            result = ("numpy", f"cupy imports but no CUDA device answers ({type(e).__name__}: {e})")
        else:
            result = _probe_kernel(cupy, n) if n > 0 else (
                "numpy", "cupy imports but the CUDA runtime reports 0 devices")
    _reason["auto"] = result
    return result


def _probe_kernel(cupy, n):
    """A device that answers is not enough: without NVRTC (a driver-only machine with CuPy 14
    and no toolkit) no kernel compiles, and then nothing of the cupy backend would run."""
    head = f"cupy {cupy.__version__}, {n} CUDA device(s)"
    try:
        from ..kernels.backend import selftest
        return "cupy", f"{head}: {selftest(0)}"
    except Exception as e:
        return "numpy", (f"{head}, but a test kernel does not run ({type(e).__name__}: {e}); "
                         "pip install -e '.[cuda12]' (or '.[cuda13]') brings CuPy with NVRTC")


def get_backend(name=None):
    """Instantiate a backend by name: "auto" (default; HMMGPU_BACKEND), "cupy" or "numpy"."""
    name = name or os.environ.get("HMMGPU_BACKEND") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name, _ = _probe_auto()
    if name == "cupy":
        chosen, why = _probe_auto()
        if chosen != "cupy":
            raise BackendUnavailable(f"backend 'cupy' was requested but cannot run: {why}")
        from ..kernels.backend import CupyBackend
        return CupyBackend()
    from ..fallback.backend import NumpyBackend
    return NumpyBackend()
