"""The CUDA sources, executed on the CPU: the GPU tests' semantics checked without a GPU.

CI has no GPU, yet hmmgpu/kernels/*.cu must compute exactly what their NumPy twins compute.
This test compiles the real .cu files with g++ against a small shim of the CUDA builtins
(threadIdx/blockIdx, atomics, warp ballot/shuffle: a warp's 32 threads run as 32 OS threads
meeting at a barrier), puts a CPU stand-in for the few CuPy calls hmmgpu makes on the path, and
runs every gpu-marked device test (PT commands, DMA, jobs, faults, parity with the twins) in a
subprocess against it.  It says nothing about speed or about the real CUDA toolchain and
hardware: `pytest --require-gpu -m gpu` on a GPU machine remains the real check.  Skipped when
g++ is missing, and when a real GPU is there (the real tests run instead).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_TESTS = ["tests/test_device_pagetable.py", "tests/test_device_dma.py",
                "tests/test_device_jobs.py", "tests/test_device_parity.py", "tests/test_docs.py"]

SHIM_H = r'''// CPU stand-in for the CUDA builtins hmmgpu's kernels use (validation only).
#include <cstdint>
#include <cstring>
#include <barrier>
#define __device__
#define __global__
#define __forceinline__ inline
struct emu_dim3 { unsigned x, y, z; };
extern thread_local emu_dim3 threadIdx, blockIdx;
extern emu_dim3 blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class F, class I> inline F emu_fadd(F* p, F v) {
    I old = __atomic_load_n((I*)p, __ATOMIC_SEQ_CST);
    for (;;) { F f; memcpy(&f, &old, sizeof f); F n = f + v; I ni; memcpy(&ni, &n, sizeof ni);
        if (__atomic_compare_exchange_n((I*)p, &old, ni, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return f; }
}
inline float atomicAdd(float* p, float v) { return emu_fadd<float, unsigned>(p, v); }
inline double atomicAdd(double* p, double v) { return emu_fadd<double, unsigned long long>(p, v); }
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline double __longlong_as_double(long long u) { double f; memcpy(&f, &u, 8); return f; }
// warp collectives: the 32 threads of a warp run as 32 OS threads meeting at a barrier
extern std::barrier<>* emu_warp_bar;
extern unsigned long long emu_slots[32];
inline unsigned __ballot_sync(unsigned, bool p) {
    emu_slots[threadIdx.x & 31] = p; emu_warp_bar->arrive_and_wait();
    unsigned r = 0; for (int i = 0; i < 32; i++) r |= (emu_slots[i] ? 1u : 0u) << i;
    emu_warp_bar->arrive_and_wait(); return r;
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) {
    unsigned long long b = 0; memcpy(&b, &v, sizeof v);
    emu_slots[threadIdx.x & 31] = b; emu_warp_bar->arrive_and_wait();
    unsigned long long r = emu_slots[src & 31]; emu_warp_bar->arrive_and_wait();
    T out; memcpy(&out, &r, sizeof out); return out;
}
template <class T> inline T __shfl_down_sync(unsigned, T v, int d) {
    int l = threadIdx.x & 31;
    unsigned long long b = 0; memcpy(&b, &v, sizeof v);
    emu_slots[l] = b; emu_warp_bar->arrive_and_wait();
    unsigned long long r = emu_slots[l + d < 32 ? l + d : l]; emu_warp_bar->arrive_and_wait();
    T out; memcpy(&out, &r, sizeof out); return out;
}
'''

LAUNCH_IMPL_H = r'''#include <barrier>
#include <thread>
#include <vector>
#include <cstring>
thread_local emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;
std::barrier<>* emu_warp_bar;
unsigned long long emu_slots[32];
typedef unsigned long long u64;
typedef void (*K)(u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64);
static void call(void* f, const u64* a) { ((K)f)(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]); }
extern "C" void emu_launch(void* f, const u64* args, unsigned grid, unsigned block, int warp_mode) {
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    if (!warp_mode) {
        for (unsigned b = 0; b < grid; b++)
            for (unsigned t = 0; t < block; t++) { blockIdx = {b, 0, 0}; threadIdx = {t, 0, 0}; call(f, args); }
        return;
    }
    std::barrier<> bar(32);
    emu_warp_bar = &bar;
    for (unsigned b = 0; b < grid; b++)
        for (unsigned w = 0; w < block / 32; w++) {
            std::vector<std::thread> th;
            for (unsigned l = 0; l < 32; l++)
                th.emplace_back([=] { blockIdx = {b, 0, 0}; threadIdx = {w * 32 + l, 0, 0}; call(f, args); });
            for (auto& t : th) t.join();
        }
}
'''

FAKE_CUPY_INIT = r'''"""A CPU stand-in for the parts of CuPy that hmmgpu uses, for tests only: kernels are the real
.cu sources compiled with g++ (shim.h maps the CUDA builtins), device arrays are NumPy arrays,
every launch runs to completion.  It checks what the kernels compute, never how fast."""
import ctypes
import hashlib
import os
import subprocess
import numpy as np

__version__ = "14.2.0-cpu-emulation"
uint8, uint32, uint64, int64, float32 = np.uint8, np.uint32, np.uint64, np.int64, np.float32
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Data:
    def __init__(self, a):
        self.ptr = a.ctypes.data


class ndarray(np.ndarray):
    @property
    def data(self):
        return _Data(self)

    def get(self, stream=None, order="C", out=None, blocking=True):
        return np.array(self.view(np.ndarray))


def _wrap(a):
    return np.ascontiguousarray(a).view(ndarray) if isinstance(a, np.ndarray) else a


def zeros(shape, dtype=float):
    return np.zeros(shape, dtype).view(ndarray)


def ones(shape, dtype=float):
    return np.ones(shape, dtype).view(ndarray)


def asarray(a, dtype=None):
    return np.array(np.asarray(a, dtype=dtype)).view(ndarray)


def flatnonzero(a):
    return np.flatnonzero(np.asarray(a)).view(ndarray)


class _Pool:
    def free_all_blocks(self):
        pass


def get_default_memory_pool():
    return _Pool()


class RawModule:
    def __init__(self, code, options=()):
        self.code, self.options = code, options
        self.lib = None

    def compile(self, log_stream=None):
        if self.lib is not None:
            return
        inc = [o for o in self.options if o.startswith("-I")]
        key = hashlib.sha1(self.code.encode()).hexdigest()[:16]
        build = os.path.join(HERE, "build")
        os.makedirs(build, exist_ok=True)
        src = os.path.join(build, key + ".cpp")
        so = os.path.join(build, key + ".so")
        if not os.path.exists(so):
            with open(src, "w") as f:
                f.write(f'#include "{HERE}/shim.h"\n' + self.code + f'\n#include "{HERE}/launch_impl.h"\n')
            r = subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-ffp-contract=off",
                                "-Wno-attributes", *inc, "-o", so, src, "-lpthread"],
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError("g++ failed:\n" + r.stderr[-5000:])
        self.lib = ctypes.CDLL(so)

    def get_function(self, name):
        self.compile()
        return _Kernel(self.lib, name)


WARP_KERNELS = {"job_memset", "job_copy", "job_axpy", "job_reduce", "job_reduce_flat"}


class _Kernel:
    def __init__(self, lib, name):
        self.lib, self.name = lib, name
        self.fn = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value

    def __call__(self, grid, block, args, shared_mem=0):
        words = (ctypes.c_uint64 * 16)()
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                words[i] = a.ctypes.data
            else:
                words[i] = int(a) & 0xFFFFFFFFFFFFFFFF
        self.lib.emu_launch(ctypes.c_void_p(self.fn), words, ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]),
                            ctypes.c_int(1 if self.name in WARP_KERNELS else 0))


from . import cuda  # noqa: E402
'''

FAKE_CUPY_CUDA = r'''import ctypes
import numpy as np


class Device:
    def __init__(self, i=0):
        self.id = i
        self.pci_bus_id = "0000:00:00.0"

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


class Stream:
    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def synchronize(self):
        pass


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.done = False

    def record(self, stream=None):
        self.done = True

    def synchronize(self):
        pass


def get_elapsed_time(a, b):
    return 1.0


def malloc_managed(n):
    raise RuntimeError("no managed memory in the CPU emulation")


class _Attrs:
    def __init__(self, p):
        self.devicePointer = p
        self.hostPointer = p
        self.device = 0
        self.type = 1


class runtime:
    _host = {}

    @staticmethod
    def getDeviceCount():
        return 1

    @staticmethod
    def hostAlloc(size, flags):
        buf = np.full(size, 0xCD, np.uint8)     # not zeroed, like cudaHostAlloc
        p = buf.ctypes.data
        runtime._host[p] = buf
        return p

    @staticmethod
    def freeHost(p):
        runtime._host.pop(p, None)

    @staticmethod
    def pointerGetAttributes(p):
        return _Attrs(p)

    @staticmethod
    def memcpyAsync(dst, src, size, kind, stream):
        ctypes.memmove(dst, src, size)

    @staticmethod
    def memsetAsync(ptr, value, size, stream):
        ctypes.memset(ptr, value, size)

    @staticmethod
    def memGetInfo():
        return (1 << 34, 1 << 35)

    @staticmethod
    def getDeviceProperties(i):
        return {"name": b"CPU emulation", "major": 9, "minor": 0, "multiProcessorCount": 1, "unifiedAddressing": 1}

    @staticmethod
    def runtimeGetVersion():
        return 13000

    @staticmethod
    def driverGetVersion():
        return 13000
'''


def _real_gpu():
    from hmmgpu.device.backend import backend_info
    return backend_info()["backend"] == "cupy"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the CUDA sources for the CPU")
def test_cuda_sources_on_cpu(tmp_path):
    if _real_gpu():
        pytest.skip("a real GPU is here: the gpu-marked tests run on it instead")
    (tmp_path / "cupy").mkdir()
    (tmp_path / "shim.h").write_text(SHIM_H)
    (tmp_path / "launch_impl.h").write_text(LAUNCH_IMPL_H)
    (tmp_path / "cupy" / "__init__.py").write_text(FAKE_CUPY_INIT)
    (tmp_path / "cupy" / "cuda.py").write_text(FAKE_CUPY_CUDA)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
    env.pop("HMMGPU_BACKEND", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--require-gpu",
                        "-m", "gpu", *DEVICE_TESTS], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and not re.search(r"\b\d+ failed", r.stdout)
