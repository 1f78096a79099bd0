"""The emulated GPU behind the fake CuPy: its memory, its streams, its compiler and its launches.

Device memory is its own address space: one reserved range of the process, inaccessible
(PROT_NONE) except while the emulated device works (a stream runs its queue, a copy is made),
so host code that dereferences a device pointer -- or hands one to NumPy -- crashes as it would
next to a real GPU.  Pinned host memory (cudaHostAlloc) and managed memory are ordinary
mappings, reachable from both sides, at the same address (unified addressing).

Streams are asynchronous in the strictest way that stays deterministic: work is queued and runs
only when the host waits for it (Stream/Event/Device synchronize, a blocking copy to the host,
a result whose size the host needs).  A missing fence therefore always shows: the host reads
memory the device has not written yet.  Freed memory is returned only once every queue is idle
(cudaFree and cudaFreeHost synchronise the device).

Kernels are the real .cu sources compiled by g++ against shim.h (see launch.cpp for how a grid
runs).  libcuda.cpp stands for the driver's virtual memory management (reserved address space
backed range by range); its reserved-but-unmapped parts stay inaccessible even while the device
works.  A launch that made a misaligned access fails as the GPU's sticky error does: this call
and every later one raise CUDARuntimeError.
"""
import collections
import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import time


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))        # tests/cuda_shim
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
PROT_NONE, PROT_RW = 0, 3
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x20, 0x4000
PAGE = 4096
HEAP_BYTES = 1 << 40            # address space only (MAP_NORESERVE)
MAP_FIXED = 0x10


class CUDARuntimeError(RuntimeError):
    def __init__(self, status, msg):
        self.status = status
        super().__init__(msg)


def _check(rc, what):
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _round(n, to=PAGE):
    return -(-max(int(n), 1) // to) * to


def _mmap(nbytes, prot):
    p = _libc.mmap(None, nbytes, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if p in (None, ctypes.c_void_p(-1).value):
        raise MemoryError(f"mmap of {nbytes} bytes failed")
    return p


class Device:
    """The emulated GPU -- or GPUs, with HMMGPU_SHIM_GPUS: they share one device heap and one set of
    queues (one address space, as unified addressing makes it) -- pending frees, the sticky error."""

    def __init__(self):
        self.base = _mmap(HEAP_BYTES, PROT_NONE)
        self.top = self.base
        self.lock = threading.RLock()
        self.open_count = 0
        self.free_ranges = {}                # size -> [ptr]: released, zero again, reusable
        # libcuda.cpp's reservations live in a region of their own, inaccessible but for the
        # mapped ranges (toggled with the heap), so the heap stays one mapping cheap to toggle
        self.vbase = _mmap(HEAP_BYTES, PROT_NONE)
        self.vtop = self.vbase
        self.vfree = {}                      # size -> [ptr] of released reservations
        self.vmapped = {}                    # ptr -> size of mapped (committed) ranges
        self.queues = {}                     # stream ptr -> Queue
        self.pending_free = []               # callables run when every queue is idle
        self.host = {}                       # pinned / managed allocations: ptr -> size
        self.sticky = None                   # the error that killed the context
        # HMMGPU_SHIM_GPUS=n: n GPUs sharing this memory and the queues (one address space, as
        # UVA makes it), each with its streams; peer_access holds (gpu, peer) pairs enabled
        self.ngpus = int(os.environ.get("HMMGPU_SHIM_GPUS", "1"))
        self.peer_access = set()
        self.launches = 0
        self.seed = int(os.environ.get("HMMGPU_SHIM_SEED", "1"))

    # -- memory --------------------------------------------------------------------------------
    def malloc(self, nbytes):
        """Device memory that reads as zeros (a range never used, or one given back and remapped)."""
        size = _round(nbytes)
        with self.lock:
            spare = self.free_ranges.get(size)
            if spare:
                return spare.pop()
            p = self.top
            self.top += size
            if self.top > self.base + HEAP_BYTES:
                raise CUDARuntimeError(2, "cudaErrorMemoryAllocation: the emulated heap is exhausted")
            if self.open_count:              # device work in progress: the new memory is reachable
                _check(_libc.mprotect(p, size, PROT_RW), "mprotect")
        return p

    def free_later(self, fn):
        with self.lock:
            self.pending_free.append(fn)
        self._reap()

    def release_device(self, p, nbytes):
        """Give a range back: fresh zero pages (MAP_FIXED), same protection as the rest."""
        size = _round(nbytes)
        with self.lock:
            prot = PROT_RW if self.open_count else PROT_NONE
            q = _libc.mmap(p, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
            if q != p:
                raise MemoryError("remapping freed device memory failed")
            self.free_ranges.setdefault(size, []).append(p)

    def host_alloc(self, nbytes, fill=None):
        size = _round(nbytes)
        p = _mmap(size, PROT_RW)
        if fill is not None:
            ctypes.memset(p, fill, size)
        with self.lock:
            self.host[p] = size
        return p

    def host_free(self, p):
        with self.lock:
            size = self.host.pop(p, None)
        if size:
            _libc.munmap(p, size)

    def is_device(self, p):
        return self.base <= p < self.top or self.vbase <= p < self.vtop

    def kind(self, p):
        """cudaMemoryType of an address: 2 device, 1 registered host, 3 managed, 0 unregistered."""
        if self.is_device(p):
            return 2
        with self.lock:
            for q, n in self.host.items():
                if q <= p < q + n:
                    return 1
        return 0

    class _Access:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            d = self.dev
            with d.lock:
                if d.open_count == 0:
                    d._protect(PROT_RW)
                d.open_count += 1

        def __exit__(self, *exc):
            d = self.dev
            with d.lock:
                d.open_count -= 1
                if d.open_count == 0:
                    d._protect(PROT_NONE)

    def access(self):
        """While the device works: device memory is reachable (for the device's own threads)."""
        return Device._Access(self)

    def _protect(self, prot):
        if self.top > self.base:
            _check(_libc.mprotect(self.base, self.top - self.base, prot), "mprotect")
        for p, n in self.vmapped.items():
            _check(_libc.mprotect(p, n, prot), "mprotect")

    # -- virtual memory management (libcuda.cpp's callbacks) -----------------------------------
    def vmm_reserve(self, size):
        """Address space aligned to libcuda.cpp's 2 MiB granule, nothing mapped."""
        with self.lock:
            spare = self.vfree.get(size)
            if spare:
                return spare.pop()
            p = _round(self.vtop, 2 << 20)
            self.vtop = p + size
            return p

    def vmm_map(self, p, size):
        with self.lock:
            self.vmapped[p] = size
            if self.open_count:
                _check(_libc.mprotect(p, size, PROT_RW), "mprotect")

    def vmm_unmap(self, p, size):
        """Fresh zero pages, inaccessible again."""
        with self.lock:
            self.vmapped.pop(p, None)
            q = _libc.mmap(p, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
            if q != p:
                raise MemoryError("unmapping emulated device memory failed")

    def zero(self, p, size):
        """Zero device memory without touching it (fresh pages), while the device works: what a
        memset to 0 does, minus populating hundreds of MiB of a chunk nobody has used yet."""
        with self.lock:
            q = _libc.mmap(p, size, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
            if q != p:
                raise MemoryError("zeroing emulated device memory failed")

    def vmm_free(self, p, size):
        with self.lock:
            self.vfree.setdefault(size, []).append(p)

    # -- queues --------------------------------------------------------------------------------
    def queue(self, ptr):
        with self.lock:
            q = self.queues.get(ptr)
            if q is None:
                q = self.queues[ptr] = Queue(self, ptr)
            return q

    def check(self):
        if self.sticky is not None:
            raise self.sticky

    def synchronize(self):
        for q in list(self.queues.values()):
            q.run()

    def _reap(self):
        with self.lock:
            if any(q.ops for q in self.queues.values()) or not self.pending_free:
                return
            todo, self.pending_free = self.pending_free, []
        for fn in todo:
            fn()


class Queue:
    """One stream: work runs in submission order when the host waits for it."""

    def __init__(self, dev, ptr):
        self.dev = dev
        self.ptr = ptr
        self.ops = collections.deque()
        self.lock = threading.RLock()
        self.submitted = 0
        self.completed = 0

    def submit(self, fn):
        self.dev.check()
        with self.lock:
            self.submitted += 1
            self.ops.append((self.submitted, fn))
            return self.submitted

    def run(self, upto=None):
        """Run queued work (up to and including ticket ``upto``)."""
        self.dev.check()
        with self.lock, self.dev.access():
            while self.ops and (upto is None or self.ops[0][0] <= upto):
                seq, fn = self.ops.popleft()
                try:
                    fn()
                except CUDARuntimeError as e:
                    self.dev.sticky = e
                    self.ops.clear()
                    raise
                self.completed = seq
        self.dev._reap()

    def idle(self):
        return not self.ops


DEVICE = Device()


def _load_libcuda():
    """Build libcuda.cpp (soname libcuda.so.1) and load it first, globally: hmmgpu's
    ctypes.CDLL("libcuda.so.1") then finds this one."""
    out_dir = os.environ.get("HMMGPU_SHIM_BUILD") or os.path.join(tempfile.gettempdir(),
                                                                    f"hmmgpu-shim-build-{os.getuid()}")
    os.makedirs(out_dir, exist_ok=True)
    src = os.path.join(HERE, "libcuda.cpp")
    with open(src, "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:16]
    so = os.path.join(out_dir, f"libcuda-{key}", "libcuda.so.1")
    if not os.path.exists(so):
        os.makedirs(os.path.dirname(so), exist_ok=True)
        tmp = so + f".{os.getpid()}.tmp"
        subprocess.run(["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-Wl,-soname,libcuda.so.1", "-o", tmp,
                        src], check=True, capture_output=True)
        os.replace(tmp, so)
    lib = ctypes.CDLL(so, mode=ctypes.RTLD_GLOBAL)
    reserve_t = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)
    range_t = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint64)
    hooks = (reserve_t(DEVICE.vmm_reserve), range_t(DEVICE.vmm_map), range_t(DEVICE.vmm_unmap),
             range_t(DEVICE.vmm_free))
    lib.emu_vmm_hooks(*hooks)
    return lib, hooks


LIBCUDA = _load_libcuda()              # the callbacks must outlive every call


# -- the compiler ----------------------------------------------------------------------------------

def _cpu_has_fma():
    try:
        with open("/proc/cpuinfo") as f:
            return " fma " in f.read()
    except OSError:
        return False


def _last_flag(options, name, default):
    val = default
    for o in options:
        for spelled in (f"-{name}=", f"--{name}="):
            if o.startswith(spelled):
                val = o[len(spelled):] == "true"
    return val


def build(code, options):
    """g++-build a CUDA translation unit into a shared object; returns its path.

    NVRTC's defaults are honoured, and like NVRTC the last spelling of an option wins:
    ``-ftz`` (default false) turns on the CPU's flush-to-zero while kernels run; ``-fmad``
    (default true) lets g++ contract a * b + c into one fused multiply-add, as NVRTC does.
    """
    ftz = _last_flag(options, "ftz", False)
    fmad = _last_flag(options, "fmad", True) and _cpu_has_fma()
    with open(os.path.join(HERE, "shim.h")) as f:
        shim = f.read()
    with open(os.path.join(HERE, "launch.cpp")) as f:
        launch = f.read()
    flags = ["-std=c++20", "-O1", "-fPIC", "-Wno-attributes", "-fsanitize=alignment",
             f"-DEMU_FTZ={int(ftz)}"] + (["-ffp-contract=fast", "-mfma"] if fmad else ["-ffp-contract=off"])
    unit = shim + "\n" + code + "\n" + launch
    key = hashlib.sha256(("\0".join(flags) + unit).encode()).hexdigest()[:32]
    out_dir = os.environ.get("HMMGPU_SHIM_BUILD") or os.path.join(tempfile.gettempdir(),
                                                                    f"hmmgpu-shim-build-{os.getuid()}")
    os.makedirs(out_dir, exist_ok=True)
    so = os.path.join(out_dir, key + ".so")
    if not os.path.exists(so):
        src = os.path.join(out_dir, key + ".cpp")
        with open(src, "w") as f:
            f.write(unit)
        tmp = so + f".{os.getpid()}.tmp"
        # compiled with the alignment checks but linked without the UBSan runtime: launch.cpp's
        # handlers take the reports (the runtime would slow every launch down twentyfold)
        r = subprocess.run(["g++", *flags, "-c", "-o", tmp + ".o", src], capture_output=True, text=True)
        if r.returncode == 0:
            r = subprocess.run(["g++", "-shared", "-o", tmp, tmp + ".o", "-lpthread"], capture_output=True,
                               text=True)
            os.unlink(tmp + ".o")
        if r.returncode:
            return None, r.stderr[-6000:]
        os.replace(tmp, so)
    return so, ""


WARP_KERNELS = {"job_memset", "job_copy", "job_axpy", "job_reduce", "job_reduce_flat", "dma_copy_pages"}


class Library:
    """A built module: its kernels by name."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint,
                                        ctypes.c_int, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64))

    def function(self, name):
        return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value

    def launch(self, name, grid, block, words):
        fn = self.function(name)
        DEVICE.launches += 1
        seed = DEVICE.seed * 1000003 + DEVICE.launches
        bad = ctypes.c_uint64(0)
        rc = self.lib.emu_launch(fn, words, grid, block, int(name in WARP_KERNELS), seed, ctypes.byref(bad))
        if rc == 1:
            raise CUDARuntimeError(716, f"cudaErrorMisalignedAddress: kernel '{name}' made a misaligned "
                                        f"access at 0x{bad.value:x} (the context is lost)")
        if rc:
            raise CUDARuntimeError(719, f"cudaErrorLaunchFailure: kernel '{name}': a lane returned while "
                                        "the rest of its warp waited in a collective (the context is lost)")


def now():
    return time.perf_counter()
