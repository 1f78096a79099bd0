"""The module cache: each CUDA source compiled with NVRTC once, loaded once per GPU; launches,
and the launch / host-synchronisation counters.

Sources are compiled here, not through ``cupy.RawModule(code=...)``, for two reasons.  CuPy
appends ``-ftz=true`` after the caller's options (cupy/cuda/compiler.py,
``_compile_with_cache_cuda``) and NVRTC honours the last ``-ftz``, so float jobs would flush
subnormals that their NumPy twins keep; and CuPy's kernel cache is keyed by the source text
only, so an edited hmm.cuh would leave stale binaries behind.  The translation unit is
source.py's (hmmgpu's headers pasted in between ``#line`` markers, so compiler errors still
name the real file and line), the options are source.py's NVRTC_OPTIONS (``-ftz=false
-fmad=false``: IEEE single precision with subnormals, every multiply and add rounded on its
own, what NumPy computes), and the binary is cached on disk under a hash of that text, the
options and the NVRTC version.  It is loaded with ``cupy.RawModule(path=...)`` once per GPU,
and kernel functions are looked up once.

Also here: the staging uploader the engines use for small command arrays, pinned mapped host
memory, and the probe's test kernel.  The engines (dma.py, pagetable.py, jobs.py) and the benchmarks import this module;
backend.py, which hands the engines out, imports them, so nothing here imports backend.py back.
"""
import contextlib
import ctypes
import glob
import hashlib
import os
import site
import sys
import tempfile
import threading
import weakref

import numpy as np
import cupy

from .source import NVRTC_OPTIONS, kernel_source

cudaHostAllocPortable = 0x01
cudaHostAllocMapped = 0x02
cudaMemcpyHostToDevice = 1
cudaMemcpyDefault = 4

_modules = {}
_functions = {}
_modules_lock = threading.Lock()

# Kernel launches (``launch``) and blocking host synchronisations (``host_sync``) made through
# this backend: a fault round costs at most 3 launches and 1 synchronisation
# (hmmgpu/device/faults.py); ``CupyBackend.counters``, ``EmulatedDevice.stats()``, the trace and
# ``hmmgpu bench --json`` report them.
COUNTERS = {"kernel_launches": 0, "host_syncs": 0}


def host_sync():
    """Count one point where the host blocks on the GPU (call it beside the blocking call)."""
    COUNTERS["host_syncs"] += 1


class KernelCompileError(RuntimeError):
    """NVRTC rejected a source (the message carries its log), or no NVRTC library was found."""


def _nvrtc():
    """CuPy's NVRTC binding, with the library of the nvidia-cuda-nvrtc wheel loaded first when
    CuPy cannot find one by itself (CuPy 13 looks only at the system's library path; CuPy 14
    finds the wheel through cuda-pathfinder)."""
    from cupy.cuda import nvrtc
    try:
        nvrtc.getVersion()
        return nvrtc
    except Exception as e:
        first = e
    for lib in _wheel_nvrtc_libs():
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)     # CuPy's dlopen by soname finds it now
            nvrtc.getVersion()
            return nvrtc
        except Exception:
            continue
    raise KernelCompileError(f"no usable NVRTC library ({type(first).__name__}: {first}); "
                             "pip install -e '.[cuda12]' (or '.[cuda13]') installs one")


def _wheel_nvrtc_libs():
    """libnvrtc of the NVIDIA wheels (nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvrtc for CUDA 13)."""
    roots = list(dict.fromkeys(sys.path + site.getsitepackages() + [site.getusersitepackages()]))
    pats = ("nvidia/cuda_nvrtc/lib/libnvrtc.so.12", "nvidia/cu13/lib/libnvrtc.so.13")
    return [p for r in roots for pat in pats for p in sorted(glob.glob(os.path.join(r, pat)))]


def _arch(nvrtc, gpu):
    """-arch for ``gpu``: real machine code (a cubin) when this NVRTC knows the GPU, else PTX
    for the newest architecture it knows, which the driver compiles when it loads it."""
    cc = int(cupy.cuda.Device(gpu).compute_capability)
    known = sorted(int(a) for a in nvrtc.getSupportedArchs())
    if cc in known:
        return f"-arch=sm_{cc}", "cubin"
    older = [a for a in known if a <= cc]
    return f"-arch=compute_{older[-1] if older else known[0]}", "ptx"


def _cache_dir():
    root = os.environ.get("HMMGPU_KERNEL_CACHE") or os.path.join(
        os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache"),
        "hmmgpu")
    try:
        os.makedirs(root, exist_ok=True)
        return root
    except OSError:
        root = os.path.join(tempfile.gettempdir(), f"hmmgpu-kernels-{os.getuid()}")
        os.makedirs(root, exist_ok=True)
        return root


def compile_source(code, name, gpu=0):
    """NVRTC-compile a translation unit for ``gpu``; returns the path of the cached binary."""
    nvrtc = _nvrtc()
    arch, kind = _arch(nvrtc, gpu)
    options = NVRTC_OPTIONS + (arch,)
    ident = "\0".join((code, *options, repr(tuple(nvrtc.getVersion()))))
    path = os.path.join(_cache_dir(), hashlib.sha256(ident.encode()).hexdigest()[:40] + "." + kind)
    if os.path.exists(path):
        return path
    prog = nvrtc.createProgram(code, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as e:
            raise KernelCompileError(f"{name}: NVRTC {e}\n{nvrtc.getProgramLog(prog)}") from None
        binary = nvrtc.getCUBIN(prog) if kind == "cubin" else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(binary)
    os.replace(tmp, path)                 # atomic: a concurrent process never loads half a file
    return path


def load_module(filename, gpu=0, source=None):
    """The RawModule of hmmgpu/kernels/<filename> (or of ``source`` under that name), compiled
    once (see the module docstring) and loaded once per GPU."""
    key = (filename, gpu, source)
    with _modules_lock:
        mod = _modules.get(key)
        if mod is None:
            path = compile_source(kernel_source(filename, source), filename, gpu)
            with cupy.cuda.Device(gpu):
                mod = cupy.RawModule(path=path)
            _modules[key] = mod
    return mod


def nvrtc_version():
    """(major, minor) of the NVRTC library hmmgpu compiles with (KernelCompileError if none)."""
    return tuple(_nvrtc().getVersion())


SELFTEST_SOURCE = r"""
extern "C" __global__ void hmmgpu_selftest(hmm_u64 out) {
    hmm_u64 i = threadIdx.x;
    ((hmm_u64*)out)[i] = (hmm_u64)__float_as_uint(__fmul_rn(1e-38f, 0.25f)) + i;   // a subnormal
}
"""


def selftest(gpu=0):
    """Compile a tiny kernel (with hmm.cuh, as every job is) through load_module, run it on
    ``gpu`` and check what it wrote, subnormal float included; returns a one-line account."""
    mod = load_module("selftest.cu", gpu, source=SELFTEST_SOURCE)
    with cupy.cuda.Device(gpu):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            out = cupy.zeros(32, dtype=cupy.uint64)
        launch(mod, "hmmgpu_selftest", 32, (out,), stream, block=32)
        got = out.get(stream=stream)
    want = int(np.array([np.float32(1e-38) * np.float32(0.25)], np.float32).view(np.uint32)[0]) + np.arange(32)
    if not np.array_equal(got, want.astype(np.uint64)):
        raise RuntimeError(f"the test kernel ran on GPU {gpu} but wrote {got[:4]}..., not {want[:4]}...")
    major, minor = nvrtc_version()
    return f"NVRTC {major}.{minor} compiled a test kernel and GPU {gpu} ran it correctly"


def kernel(mod, name):
    """Kernel ``name`` of a loaded module, looked up once."""
    f = _functions.get((mod, name))
    if f is None:
        f = _functions.setdefault((mod, name), mod.get_function(name))
    return f


def launch(mod, name, nthreads, args, stream, block=256):
    """One launch of kernel ``name`` over ``nthreads`` threads on ``stream``."""
    if nthreads <= 0:
        return
    grid = (int(-(-nthreads // block)),)
    COUNTERS["kernel_launches"] += 1
    with stream:
        kernel(mod, name)(grid, (block,), args)


class Uploader:
    """Small host arrays (page-table commands, copy indices) to the device without an
    allocation per call: the bytes go through one of two pinned staging buffers into one device
    buffer, both kept and grown on demand, with one cudaMemcpyAsync on the device's stream.

    A staging buffer is rewritten only after the event of its previous copy (the copy may not
    have run yet when the host returns); the device buffer needs no event, since the work that
    reads it is queued on the same stream before the next copy overwrites it -- which is why
    ``staged`` holds the uploader's lock until that work is queued.  Each engine has its own.
    """

    ALIGN = 256

    def __init__(self, backend, gpu):
        self.gpu = gpu
        self.stream = backend.stream(gpu)
        self.lock = threading.Lock()
        with cupy.cuda.Device(gpu):
            self.slots = [[None, 0, cupy.cuda.Event(block=False, disable_timing=True), False]
                          for _ in range(2)]                 # [host view, pointer, event, used]
        self.next = 0
        self.dev = None

    @contextlib.contextmanager
    def staged(self, *arrays):
        """``with up.staged(a, b) as (pa, pb):`` device addresses of copies of the arrays, for the
        work queued inside the block."""
        arrays = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
        spans = [-(-a.size // self.ALIGN) * self.ALIGN for a in arrays]
        total = max(sum(spans), self.ALIGN)
        with self.lock, cupy.cuda.Device(self.gpu):
            slot = self.slots[self.next]
            self.next ^= 1
            if slot[3] and not slot[2].done:     # its last copy must have read the staging bytes
                host_sync()
                slot[2].synchronize()
            if slot[0] is None or slot[0].size < total:
                slot[0], slot[1] = _pinned(max(total, 2 * (0 if slot[0] is None else slot[0].size)))
            if self.dev is None or self.dev.size < total:
                with self.stream:
                    self.dev = cupy.empty(max(total, 2 * (0 if self.dev is None else self.dev.size)),
                                          dtype=cupy.uint8)
            host, off, ptrs = slot[0], 0, []
            for a, span in zip(arrays, spans):
                host[off:off + a.size] = a
                ptrs.append(int(self.dev.data.ptr) + off)
                off += span
            cupy.cuda.runtime.memcpyAsync(int(self.dev.data.ptr), slot[1], off, cudaMemcpyHostToDevice,
                                          self.stream.ptr)
            slot[2].record(self.stream)
            slot[3] = True
            yield ptrs


def _pinned(nbytes):
    """A page-locked host buffer: (uint8 view, pointer); freed when the view goes."""
    ptr = cupy.cuda.runtime.hostAlloc(nbytes, cudaHostAllocPortable)
    view = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
    weakref.finalize(view, cupy.cuda.runtime.freeHost, ptr)
    return view, ptr


def pinned_mapped(nbytes, gpu=0):
    """Pinned host memory mapped into the GPU's address space: (owner, NumPy uint8 view,
    device pointer).  Keep ``owner`` alive as long as the memory is used."""
    with cupy.cuda.Device(gpu):
        hptr = cupy.cuda.runtime.hostAlloc(max(int(nbytes), 1), cudaHostAllocMapped | cudaHostAllocPortable)
        owner = _Pinned(hptr)
        attrs = cupy.cuda.runtime.pointerGetAttributes(hptr)
    buf = (ctypes.c_uint8 * max(int(nbytes), 1)).from_address(hptr)
    return owner, np.ctypeslib.as_array(buf)[:int(nbytes)], int(attrs.devicePointer) or hptr


class _Pinned:
    def __init__(self, hptr):
        weakref.finalize(self, cupy.cuda.runtime.freeHost, hptr)
