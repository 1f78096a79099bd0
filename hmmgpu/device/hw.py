"""The hardware interface a backend fills in: arenas of page frames, fences, the engines.

Two backends implement it (tinygrad's shape: one small interface, one module per backend):
``hmmgpu/kernels/backend.py`` (CuPy: pinned mapped host memory, GPU memory, CUDA kernels) and
``hmmgpu/fallback/backend.py`` (NumPy, identical semantics).  The switch that picks one,
``hmmgpu/device/backend.py``, imports them; they import only this module, so no import
goes back up.
"""
import numpy as np

from ..constants import PAGE_SIZE

MAX_PEERS = 7          # peers one device addresses: the rows of the kernels' peer table (hmm.cuh)


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

    def commit(self, first, nframes):
        """Back frames [first, first + nframes) with memory before anything touches them.  A
        lazy device arena (``device_arena(..., lazy=True)``) holds only address space until
        then, as a GPU driver maps physical memory into a reserved range chunk by chunk; on
        every other arena this does nothing.  Raises MemoryError when the memory is not there."""

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

    def device_arena(self, nframes, gpu=0, lazy=False):
        """A device's own memory: an Arena of ``kind == "device"``; ``lazy``: only its address
        space until ``commit`` (see Arena.commit)."""
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

    def gpu_count(self):
        """How many physical devices this backend drives (the NumPy backend: one, emulated)."""
        return 1

    def enable_peer(self, gpu, peer_gpu):
        """Let ``gpu``'s kernels and copies address ``peer_gpu``'s memory (one direction).
        Devices of one GPU, and every device of the NumPy backend, reach each other already."""

    def queue_after(self, gpu, other_gpu):
        """Work queued on ``gpu`` from now on runs after everything queued so far on
        ``other_gpu`` (one GPU has one queue: nothing to do)."""

    def pagetable_hw(self, gpu=0):
        """The page-table walker and command processor (alloc/grow/execute/lookup/fence)."""
        raise NotImplementedError

    def fault_buffer_hw(self, capacity, gpu=0):
        """The fault ring in device memory (``drain() -> (records (n, 4) uint64, put)``)."""
        raise NotImplementedError

    def job_executor(self, device):
        """Launches job slices for an EmulatedDevice (hmmgpu/device/jobs.py)."""
        raise NotImplementedError
