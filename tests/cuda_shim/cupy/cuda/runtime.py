"""cupy.cuda.runtime of the CUDA shim."""
import ctypes

from .._emu import DEVICE, CUDARuntimeError

cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault = 1, 2, 3, 4
cudaCpuDeviceId = -1


def getDeviceCount():
    return DEVICE.ngpus


def deviceCanAccessPeer(device, peer):
    return int(device != peer and 0 <= device < DEVICE.ngpus and 0 <= peer < DEVICE.ngpus)


def deviceEnablePeerAccess(peer, flags=0):
    from . import current_device
    me = current_device()
    if not deviceCanAccessPeer(me, peer):
        raise CUDARuntimeError(217, f"cudaErrorPeerAccessUnsupported: GPU {me} -> GPU {peer}")
    if (me, peer) in DEVICE.peer_access:
        raise CUDARuntimeError(704, "cudaErrorPeerAccessAlreadyEnabled")
    DEVICE.peer_access.add((me, peer))


def getDeviceProperties(i):
    return {"name": b"CPU shim of an sm_90 GPU", "major": 9, "minor": 0, "multiProcessorCount": 1,
            "totalGlobalMem": 1 << 35, "unifiedAddressing": 1, "canMapHostMemory": 1, "managedMemory": 1,
            "concurrentManagedAccess": 1, "pageableMemoryAccess": 0, "pciBusID": 0}


def runtimeGetVersion():
    return 13000


def driverGetVersion():
    return 13000


def memGetInfo():
    return (1 << 34, 1 << 35)


def deviceSynchronize():
    DEVICE.synchronize()


def hostAlloc(size, flags):
    return DEVICE.host_alloc(size, fill=0xCD)          # not zeroed, like cudaHostAlloc


def freeHost(p):
    DEVICE.free_later(lambda: DEVICE.host_free(p))    # cudaFreeHost waits for the device


class _Attrs:
    def __init__(self, p, kind):
        self.type = kind
        self.device = 0
        self.devicePointer = p if kind else 0
        self.hostPointer = p if kind in (1, 3) else 0


def pointerGetAttributes(p):
    return _Attrs(p, DEVICE.kind(p))


def _queue(stream):
    return DEVICE.queue(int(stream))


def memcpyAsync(dst, src, size, kind, stream):
    """Device and registered host memory are read when the copy runs; pageable host memory is
    staged now (what cudaMemcpyAsync does with it)."""
    dst, src, size = int(dst), int(src), int(size)
    if size <= 0:
        return
    if DEVICE.kind(src) == 0:
        staged = ctypes.create_string_buffer(ctypes.string_at(src, size), size)
        src_now = ctypes.addressof(staged)
    else:
        staged, src_now = None, src

    def op():
        staged                                      # kept until the copy ran
        ctypes.memmove(dst, src_now, size)
    _queue(stream).submit(op)


def memsetAsync(ptr, value, size, stream):
    ptr, value, size = int(ptr), int(value), int(size)

    def op():
        if value == 0 and DEVICE.is_device(ptr) and ptr % 4096 == 0 and size % 4096 == 0:
            DEVICE.zero(ptr, size)
        else:
            ctypes.memset(ptr, value, size)
    _queue(stream).submit(op)


def memPrefetchAsync(ptr, count, dst_device, stream):
    """As CuPy 14 built for CUDA 13 reads it: dst_device is a device location, never the CPU."""
    if int(dst_device) < 0:
        raise CUDARuntimeError(101, "cudaErrorInvalidDevice: invalid device ordinal")
    _queue(stream).submit(lambda: None)


def memAdvise(ptr, count, advice, device):
    pass
