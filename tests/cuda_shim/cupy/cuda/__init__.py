"""cupy.cuda of the CUDA shim: devices, streams, events, pinned and managed memory."""
import threading

from .. import _emu
from .._emu import DEVICE
from . import nvrtc, runtime  # noqa: F401

_local = threading.local()
_stream_ids = iter(range(0x1000, 1 << 40, 0x10))


class Device:
    def __init__(self, device=None):
        self.id = int(device or 0)
        self.pci_bus_id = "0000:00:00.0"
        self.compute_capability = "90"

    def __enter__(self):
        if not 0 <= self.id < DEVICE.ngpus:
            raise _emu.CUDARuntimeError(101, f"cudaErrorInvalidDevice: the shim has {DEVICE.ngpus} GPU(s) "
                                             "(HMMGPU_SHIM_GPUS)")
        _local.devices = getattr(_local, "devices", []) + [self.id]
        return self

    def __exit__(self, *a):
        _local.devices = _local.devices[:-1]

    def synchronize(self):
        DEVICE.synchronize()

    def use(self):
        pass


class Stream:
    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.ptr = 0 if null else next(_stream_ids)
        self.queue = DEVICE.queue(self.ptr)
        self._prev = []

    def __enter__(self):
        self._prev.append(getattr(_local, "stream", None))
        _local.stream = self
        return self

    def __exit__(self, *a):
        _local.stream = self._prev.pop()

    def synchronize(self):
        self.queue.run()

    @property
    def done(self):                     # no lock: finalizers ask, from anywhere
        return self.queue.idle()

    def use(self):
        _local.stream = self
        return self

    def wait_event(self, event):
        """cudaStreamWaitEvent: work queued here from now on runs after the event's work (the
        other queue runs up to it first, when this one reaches the wait)."""
        q, ticket = event.queue, event.ticket
        if q is not None and q is not self.queue:
            self.queue.submit(lambda: q.run(ticket))


Stream.null = Stream(null=True)


def current_device():
    """The device of the innermost ``with Device(i)`` (0 outside any)."""
    return (getattr(_local, "devices", None) or [0])[-1]


def get_current_stream(device_id=None):
    return getattr(_local, "stream", None) or Stream.null


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.queue = None
        self.ticket = 0
        self.time = None
        self.ptr = id(self)

    def record(self, stream=None):
        q = DEVICE.queue((stream or get_current_stream()).ptr)

        def op():
            self.time = _emu.now()
        self.queue = q
        self.ticket = q.submit(op)

    def synchronize(self):
        if self.queue is not None:
            self.queue.run(self.ticket)

    @property
    def done(self):
        DEVICE.check()
        return self.queue is None or self.queue.completed >= self.ticket


def get_elapsed_time(start, end):
    start.synchronize()
    end.synchronize()
    return (end.time - start.time) * 1e3


class _HostMemory:
    def __init__(self, nbytes, fill=None):
        self.size = int(nbytes)
        self.ptr = DEVICE.host_alloc(self.size, fill)

    def __del__(self):
        DEVICE.free_later(lambda p=self.ptr: DEVICE.host_free(p))


class PinnedMemoryPointer:
    def __init__(self, mem, offset=0):
        self.mem = mem
        self.ptr = mem.ptr + offset
        self.size = mem.size - offset


def alloc_pinned_memory(nbytes):
    return PinnedMemoryPointer(_HostMemory(nbytes, fill=0xCD))


class ManagedMemoryPointer:
    def __init__(self, mem):
        self.mem = mem
        self.ptr = mem.ptr
        self.size = mem.size


def malloc_managed(nbytes):
    """Managed memory: reachable from the host and the device at one address."""
    return ManagedMemoryPointer(_HostMemory(nbytes))


class UnownedMemory:
    """Memory allocated by someone else (here: the driver's virtual memory management)."""

    def __init__(self, ptr, size, owner, device_id=-1):
        self.ptr, self.size, self.owner, self.device_id = int(ptr), int(size), owner, device_id


MemoryPointer = None          # replaced below (cupy.MemoryPointer is cupy.cuda.MemoryPointer)


def _late():
    global MemoryPointer
    from .. import MemoryPointer as mp
    MemoryPointer = mp


_late()
