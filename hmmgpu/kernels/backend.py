"""The CuPy backend: system RAM in pinned, mapped host memory; device frames, page tables,
fault buffers and jobs in GPU memory; every device operation a CUDA kernel or copy on the GPU's
stream.

Device code lives in hmmgpu/kernels/*.cu and *.cuh; module.py compiles each source with NVRTC
(IEEE floats, a cache keyed by the whole unit) and loads it once per GPU.  Importing
hmmgpu never initialises CUDA: this module is imported only when the cupy backend is chosen, and
the first CUDA call happens when a backend object hands out its first arena or engine.
"""
import ctypes
import threading
import weakref

import numpy as np
import cupy

from ..constants import PAGE_SIZE
from ..device.hw import Arena, Backend, Fence
from .module import COUNTERS, host_sync
from .module import load_module  # noqa: F401  (the GPU check's probe imports it from here)

cudaHostAllocPortable = 0x01
cudaHostAllocMapped = 0x02
cudaErrorPeerAccessAlreadyEnabled = 704


class CudaFence(Fence):
    """A CUDA event recorded on the device's stream.

    Events come from a ring (``_EventRing``) and are recorded again once the ring comes round,
    later on the same in-order stream: waiting then waits for a little more work than this
    fence covers, and ``done()`` may answer False a little longer; neither is ever wrong.
    """

    def __init__(self, event):
        self.event = event

    def wait(self):
        host_sync()
        self.event.synchronize()

    def done(self):
        return self.event.done


class _EventRing:
    """The events of one stream's fences, created once (not a cudaEventCreate per fence)."""

    SIZE = 256

    def __init__(self, gpu):
        with cupy.cuda.Device(gpu):
            self.events = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(self.SIZE)]
        self.next = 0
        self.lock = threading.Lock()

    def record(self, stream):
        with self.lock:
            ev = self.events[self.next]
            self.next = (self.next + 1) % self.SIZE
            ev.record(stream)
        return CudaFence(ev)


# The CUDA driver's virtual memory management (cuda.h): reserve address space, back it later.
CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0


class _CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _CUmemAllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _CUmemAllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _CUmemLocation), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", _CUmemAllocFlags)]


class _CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", _CUmemLocation), ("flags", ctypes.c_int)]


_libcuda = None


def _driver():
    """libcuda, with the argument types of the calls made here."""
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        u64, sz, p = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
        for name, args in (("cuDeviceGet", (p, ctypes.c_int)),
                           ("cuDeviceGetAttribute", (p, ctypes.c_int, ctypes.c_int)),
                           ("cuMemGetAllocationGranularity", (p, p, ctypes.c_int)),
                           ("cuMemAddressReserve", (p, sz, sz, u64, u64)),
                           ("cuMemAddressFree", (u64, sz)),
                           ("cuMemCreate", (p, sz, p, u64)),
                           ("cuMemRelease", (u64,)),
                           ("cuMemMap", (u64, sz, sz, u64, u64)),
                           ("cuMemUnmap", (u64, sz)),
                           ("cuMemSetAccess", (u64, sz, p, sz))):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        _libcuda = lib
    return _libcuda


def _cu(rc, what):
    if rc:
        raise MemoryError(f"{what} failed (CUresult {rc})")


class LazyDeviceMemory:
    """Device memory that is address space first and backed later, range by range: the CUDA
    driver's virtual memory management (cuMemAddressReserve, then cuMemCreate + cuMemMap +
    cuMemSetAccess per committed range), so the device's frames keep one contiguous address
    range for the kernels while memory is spent only on what a driver hotplugged."""

    def __init__(self, gpu, nbytes, stream):
        _release_pending()
        cu = _driver()
        dev, ok = ctypes.c_int(), ctypes.c_int()
        _cu(cu.cuDeviceGet(ctypes.byref(dev), gpu), "cuDeviceGet")
        _cu(cu.cuDeviceGetAttribute(ctypes.byref(ok), CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                                    dev), "cuDeviceGetAttribute")
        if not ok.value:
            raise MemoryError(f"GPU {gpu} has no virtual memory management")
        self.gpu, self.stream = gpu, stream
        loc = _CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, dev.value)
        self.prop = _CUmemAllocationProp(type=CU_MEM_ALLOCATION_TYPE_PINNED, location=loc)
        self.access = _CUmemAccessDesc(location=loc, flags=CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        gran = ctypes.c_size_t()
        _cu(cu.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(self.prop),
                                             CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity")
        self.granule = gran.value
        self.size = -(-max(int(nbytes), 1) // self.granule) * self.granule
        ptr = ctypes.c_uint64()
        _cu(cu.cuMemAddressReserve(ctypes.byref(ptr), self.size, 0, 0, 0), "cuMemAddressReserve")
        self.ptr = ptr.value
        self.backed = np.zeros(self.size // self.granule, bool)
        self.maps = []                                    # [address, size, handle] per commit
        weakref.finalize(self, _lazy_released, (gpu, stream, self.ptr, self.size, self.maps))

    def commit(self, offset, nbytes):
        """Back [offset, offset + nbytes) (whole granules), zero-filled on the stream."""
        _release_pending()
        g0, g1 = offset // self.granule, -(-(offset + nbytes) // self.granule)
        todo = np.flatnonzero(~self.backed[g0:g1]) + g0
        if todo.size == 0:
            return
        cu = _driver()
        cuts = np.flatnonzero(np.diff(todo) != 1) + 1
        for run in np.split(todo, cuts):                   # one mapping per run of missing granules
            addr, size = self.ptr + int(run[0]) * self.granule, int(run.size) * self.granule
            h = ctypes.c_uint64()
            _cu(cu.cuMemCreate(ctypes.byref(h), size, ctypes.byref(self.prop), 0), "cuMemCreate")
            rc = cu.cuMemMap(addr, size, 0, h.value, 0)
            if rc == 0:
                rc = cu.cuMemSetAccess(addr, size, ctypes.byref(self.access), 1)
                if rc:
                    cu.cuMemUnmap(addr, size)
            if rc:
                cu.cuMemRelease(h.value)
                _cu(rc, "cuMemMap/cuMemSetAccess")
            self.maps.append([addr, size, h.value])
            self.backed[run] = True
            cupy.cuda.runtime.memsetAsync(addr, 0, size, self.stream.ptr)   # new memory is not zeroed



# Lazy memory whose owner is gone.  The owner's finalizer only queues it here: a finalizer runs
# wherever the garbage collector happens to start, inside a driver call or with locks held, and
# must not call the CUDA driver from there.  The memory is given back at the next lazy
# allocation or commit, once its stream's queued work is done.
_pending = []


def _lazy_released(item):
    _pending.append(item)


def _release_pending():
    while _pending:
        try:
            item = _pending.pop(0)                    # atomic: no other caller releases it too
        except IndexError:
            return
        gpu, stream, ptr, size, maps = item
        try:
            with cupy.cuda.Device(gpu):
                if not stream.done:
                    stream.synchronize()              # nothing queued may touch it any more
                cu = _driver()
                for addr, n, h in maps:
                    cu.cuMemUnmap(addr, n)
                    cu.cuMemRelease(h)
                cu.cuMemAddressFree(ptr, size)
        except Exception:                             # interpreter shutdown: the driver frees it
            pass


class CupyArena(Arena):
    """Frames in GPU memory (kind "device") or in pinned, mapped host memory (kind "host").

    ``ptr`` is the address a kernel dereferences: with unified virtual addressing the host
    allocation has the same address on the GPU, and kernels read it over PCIe with no copy.
    A lazy device arena is LazyDeviceMemory until ``commit``; where the driver cannot do that
    it is allocated whole, and ``lazy`` is False with ``lazy_reason`` saying why.
    """

    def __init__(self, backend, nframes, kind, gpu, lazy=False):
        super().__init__(backend, nframes)
        self.kind = kind
        self.gpu = gpu
        self.stream = backend.stream(gpu)
        self.lazy, self.lazy_reason, self.vmm, self._first = False, None, None, 0
        size = self.nframes * PAGE_SIZE
        if lazy and kind == "device":
            try:
                with cupy.cuda.Device(gpu):
                    self.vmm = LazyDeviceMemory(gpu, size, self.stream)
                mem = cupy.cuda.UnownedMemory(self.vmm.ptr, self.vmm.size, self.vmm, device_id=gpu)
                self.frames = cupy.ndarray((self.nframes, PAGE_SIZE), dtype=cupy.uint8,
                                           memptr=cupy.cuda.MemoryPointer(mem, 0))
                self.ptr, self.host, self.lazy = self.vmm.ptr, None, True
                return
            except (OSError, MemoryError, AttributeError) as e:
                self.vmm, self.lazy_reason = None, f"{type(e).__name__}: {e}"
        with cupy.cuda.Device(gpu):
            if kind == "host":
                hptr = cupy.cuda.runtime.hostAlloc(max(size, 1), cudaHostAllocMapped | cudaHostAllocPortable)
                weakref.finalize(self, cupy.cuda.runtime.freeHost, hptr)
                attrs = cupy.cuda.runtime.pointerGetAttributes(hptr)
                self.ptr = int(attrs.devicePointer) or hptr
                buf = (ctypes.c_uint8 * max(size, 1)).from_address(hptr)
                self.host = np.ctypeslib.as_array(buf)[:size].reshape(self.nframes, PAGE_SIZE)
                self.host[:] = 0          # cudaHostAlloc does not zero
                self.frames = None
            else:
                with self.stream:
                    self.frames = cupy.zeros((self.nframes, PAGE_SIZE), dtype=cupy.uint8)
                self.ptr = int(self.frames.data.ptr)
                self.host = None

    def sub(self, first, nframes):
        first, nframes = int(first), int(nframes)
        view = CupyArena.__new__(CupyArena)
        Arena.__init__(view, self.backend, nframes)
        view.kind, view.gpu, view.stream = self.kind, self.gpu, self.stream
        view.lazy, view.lazy_reason, view.vmm = self.lazy, self.lazy_reason, self.vmm
        view._first = self._first + first
        view.ptr = self.ptr + first * PAGE_SIZE       # kernels and copies address it directly
        view.frames = None if self.frames is None else self.frames[first:first + nframes]
        view.host = None if self.host is None else self.host[first:first + nframes]
        view._parent = self                           # the allocation outlives every view
        return view

    def commit(self, first, nframes):
        if self.vmm is not None:
            with cupy.cuda.Device(self.gpu):
                self.vmm.commit((self._first + int(first)) * PAGE_SIZE, int(nframes) * PAGE_SIZE)

    def _dev_idx(self, idx):
        return cupy.asarray(np.asarray(idx, dtype=np.int64))

    def read(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        if self.kind == "host":
            return self.host[idx]
        with cupy.cuda.Device(self.gpu), self.stream:
            out = self.frames[self._dev_idx(idx)]           # one gather kernel
            host_sync()
            return out.get(stream=self.stream)              # one copy

    def write(self, idx, data):
        idx = np.asarray(idx, dtype=np.int64)
        data = np.asarray(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        if self.kind == "host":
            self.host[idx] = data
            return
        with cupy.cuda.Device(self.gpu), self.stream:
            self.frames[self._dev_idx(idx)] = cupy.asarray(data)   # one copy, one scatter kernel

    def fill(self, idx, value=0):
        idx = np.asarray(idx, dtype=np.int64)
        if self.kind == "host":
            self.host[idx] = value
            return
        with cupy.cuda.Device(self.gpu), self.stream:
            self.frames[self._dev_idx(idx)] = np.uint8(value)


class CupyBackend(Backend):
    name = "cupy"
    emulated = False
    counters = COUNTERS            # kernel launches and host synchronisations (module.py)

    def __init__(self):
        self._streams = {}
        self._rings = {}
        self._peers = set()                      # (gpu, peer gpu) pairs with CUDA peer access
        self._lock = threading.Lock()

    def stream(self, gpu=0):
        """The device queue of ``gpu``: every update, slice and copy goes on it, in order."""
        with self._lock:
            s = self._streams.get(gpu)
            if s is None:
                with cupy.cuda.Device(gpu):
                    s = cupy.cuda.Stream(non_blocking=True)
                self._streams[gpu] = s
            return s

    def fence(self, gpu=0):
        s = self.stream(gpu)
        with self._lock:
            ring = self._rings.get(gpu)
            if ring is None:
                ring = self._rings[gpu] = _EventRing(gpu)
        with cupy.cuda.Device(gpu):
            return ring.record(s)

    def gpu_count(self):
        return int(cupy.cuda.runtime.getDeviceCount())

    def enable_peer(self, gpu, peer_gpu):
        """cudaDeviceEnablePeerAccess(peer_gpu) on ``gpu``, once (emulated devices of one GPU
        share its memory: nothing to enable).  ValueError where the two cannot be peers."""
        if gpu == peer_gpu or (gpu, peer_gpu) in self._peers:
            return
        rt = cupy.cuda.runtime
        if not rt.deviceCanAccessPeer(gpu, peer_gpu):
            raise ValueError(f"GPU {gpu} cannot address GPU {peer_gpu}'s memory (no peer access)")
        with cupy.cuda.Device(gpu):
            try:
                rt.deviceEnablePeerAccess(peer_gpu)
            except rt.CUDARuntimeError as e:
                if e.status != cudaErrorPeerAccessAlreadyEnabled:
                    raise
        self._peers.add((gpu, peer_gpu))

    def queue_after(self, gpu, other_gpu):
        """``gpu``'s stream waits for an event recorded now on ``other_gpu``'s (no host wait)."""
        if gpu == other_gpu:
            return
        fence = self.fence(other_gpu)
        with cupy.cuda.Device(gpu):
            self.stream(gpu).wait_event(fence.event)

    def host_arena(self, nframes, gpu=0):
        return CupyArena(self, nframes, "host", gpu)

    def device_arena(self, nframes, gpu=0, lazy=False):
        return CupyArena(self, nframes, "device", gpu, lazy)

    def dma_engine(self, gpu=0):
        from .dma import CupyDmaEngine
        return CupyDmaEngine(self, gpu)

    def pagetable_hw(self, gpu=0):
        from .pagetable import CupyPageTableHW
        return CupyPageTableHW(self, gpu)

    def fault_buffer_hw(self, capacity, gpu=0):
        from .jobs import CupyFaultHW
        return CupyFaultHW(self, capacity, gpu)

    def job_executor(self, device):
        from .jobs import CupyJobExecutor
        return CupyJobExecutor(device)

    def info(self, gpu=0):
        return cuda_info(gpu)


def cuda_info(gpu=0):
    """CUDA and NVML facts about ``gpu``; NVML is matched to the CUDA device by PCI bus id."""
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(gpu)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else name
    with cupy.cuda.Device(gpu):
        free, total = rt.memGetInfo()
        bus_id = cupy.cuda.Device(gpu).pci_bus_id
    info = {"backend": "cupy", "emulated": False, "gpu": gpu, "name": name,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "multiprocessors": props["multiProcessorCount"], "memory_total": int(total),
            "memory_free": int(free), "pci_bus_id": bus_id,
            "cuda_runtime": rt.runtimeGetVersion(), "cuda_driver": rt.driverGetVersion(),
            "cupy": cupy.__version__, "unified_addressing": bool(props.get("unifiedAddressing", 1))}
    try:
        import pynvml
    except ImportError:
        info["nvml"] = "unavailable (pip install nvidia-ml-py)"
        return info
    try:
        pynvml.nvmlInit()
        try:
            h = _nvml_handle(pynvml, bus_id)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            drv = pynvml.nvmlSystemGetDriverVersion()
            nvname = pynvml.nvmlDeviceGetName(h)
            info.update({
                "nvml_name": nvname.decode() if isinstance(nvname, bytes) else nvname,
                "driver": drv.decode() if isinstance(drv, bytes) else drv,
                "nvml_memory_total": int(mem.total), "nvml_memory_free": int(mem.free),
            })
            for key, fn in (("pcie_gen", pynvml.nvmlDeviceGetCurrPcieLinkGeneration),
                            ("pcie_width", pynvml.nvmlDeviceGetCurrPcieLinkWidth),
                            ("pcie_gen_max", pynvml.nvmlDeviceGetMaxPcieLinkGeneration),
                            ("pcie_width_max", pynvml.nvmlDeviceGetMaxPcieLinkWidth)):
                try:
                    info[key] = int(fn(h))
                except pynvml.NVMLError:
                    info[key] = None
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:          # no NVML library, or no permission: the CUDA facts stand
        info["nvml"] = f"unavailable ({type(e).__name__}: {e})"
    return info


def _norm_bus_id(b):
    b = b.decode() if isinstance(b, bytes) else str(b)
    dom, _, rest = b.lower().partition(":")
    return f"{int(dom, 16):x}:{rest}" if rest else b.lower()


def _nvml_handle(pynvml, bus_id):
    """The NVML device whose PCI bus id is CUDA's (NVML spells the domain with 8 digits)."""
    want = _norm_bus_id(bus_id)
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        if _norm_bus_id(pynvml.nvmlDeviceGetPciInfo(h).busId) == want:
            return h
    raise LookupError(f"no NVML device has PCI bus id {bus_id}")
