"""The CUDA path, executed on the CPU: what hmmgpu's CuPy backend computes, checked without a GPU.

CI has no GPU, yet hmmgpu/kernels/*.cu and the Python that drives them must compute exactly
what the NumPy backend computes.  tests/cuda_shim holds a stand-in for the part of CuPy that
hmmgpu uses: the real .cu sources built with g++ against a shim of the CUDA builtins, device
memory in an address space of its own that the host cannot touch, streams that run their work
only when the host waits (so a missing fence always shows), warps and threads in a seeded
random order, a misaligned access failing the launch as the GPU's sticky error does, and NVRTC's
-ftz/-fmad honoured (CuPy's own RawModule(code=...) path flushes subnormals, as on the GPU).
With it this file runs, each in a subprocess whose failure names what broke:

* the gpu-marked device tests (page table, DMA, jobs, fatal faults, parity with the twins, peer
  access between devices), and peer devices on two GPUs (HMMGPU_SHIM_GPUS=2);
* the dmirror driver tests and the hmm-tests port (tests/test_hmm_selftests.py) on the cupy
  backend;
* ``hmmgpu demo --backend cupy``, every bench suite's GPU branch at its --quick size, the
  device suite through bench/device_bench.py at 4 MiB.

It says nothing about speed, the real toolchain or the hardware: tests/test_device_nvrtc.py
compiles the sources with NVRTC when it is installed, and ../shared/gpu-check.sh on a GPU
machine remains the real check.  Skipped without g++ (or off x86-64), and when a real GPU is
there (the real tests run instead).
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(REPO, "tests", "cuda_shim")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64",
                                reason="needs g++ on x86-64 to build the CUDA sources for the CPU")


def _real_gpu():
    from hmmgpu.device.backend import backend_info
    return backend_info()["backend"] == "cupy"


def shim_environment(d):
    """The environment of a subprocess that runs on the shim (builds and caches under ``d``);
    skips the calling test where a real GPU runs the gpu-marked tests itself."""
    if _real_gpu():
        pytest.skip("a real GPU is here: the gpu-marked tests run on it instead")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SHIM, REPO]), HMMGPU_SHIM_BUILD=os.path.join(d, "build"),
               HMMGPU_KERNEL_CACHE=os.path.join(d, "kernels"), HMMGPU_SHIM_SEED="7", PYTHONFAULTHANDLER="1")
    env.pop("HMMGPU_BACKEND", None)
    return env


@pytest.fixture(scope="module")
def shim_env(tmp_path_factory):
    return shim_environment(str(tmp_path_factory.mktemp("cuda_shim")))


def run(env, *args, backend=None, timeout=600):
    e = dict(env)
    if backend:
        e["HMMGPU_BACKEND"] = backend
    return subprocess.run([sys.executable, *args], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=timeout)


def pytest_under_shim(env, *args, backend=None):
    r = run(env, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, backend=backend)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and not re.search(r"\b\d+ (failed|errors?)\b", r.stdout), r.stdout[-3000:]
    return r


SHIM_CHECKS = r'''
import ctypes, sys
import numpy as np
import cupy
from cupy import _emu

# 1. streams run their work only when the host waits for it
stream = cupy.cuda.Stream(non_blocking=True)
pinned = cupy.cuda.alloc_pinned_memory(64)
view = np.ctypeslib.as_array((ctypes.c_uint8 * 64).from_address(pinned.ptr))
view[:] = 0
with stream:
    src = cupy.asarray(np.full(64, 7, np.uint8))
cupy.cuda.runtime.memcpyAsync(pinned.ptr, src.data.ptr, 64, 4, stream.ptr)
ev = cupy.cuda.Event()
ev.record(stream)
assert (view == 0).all() and not ev.done, "a queued copy ran before anyone waited for it"
ev.synchronize()
assert (view == 7).all() and ev.done

# 2. subnormals: kept with -ftz=false (NVRTC's default), flushed on CuPy's RawModule(code=) path
code = r"""extern "C" __global__ void k(unsigned long long y, unsigned long long x) {
    float* py = (float*)y;
    const float* px = (const float*)x;
    py[0] = __fadd_rn(__fmul_rn(0.5f, px[0]), py[0]);
}"""
def axpy(mod):
    with stream:
        x = cupy.asarray(np.array([2e-38], np.float32))
        y = cupy.asarray(np.array([1e-39], np.float32))
        mod.get_function("k")((1,), (1,), (y, x))
        return y.get(stream=stream)[0]
want = np.float32(0.5) * np.float32(2e-38) + np.float32(1e-39)
from hmmgpu.kernels.backend import load_module   # noqa: F401 (where gpu-check.sh's probe finds it)
from hmmgpu.kernels.module import compile_source
assert axpy(cupy.RawModule(path=compile_source(code, "k.cu"))) == want
assert axpy(cupy.RawModule(code=code)) != want, "CuPy's -ftz=true path did not flush"

# 3. the host cannot touch device memory: reading it crashes the process (checked by the parent)
if sys.argv[1] == "deref":
    print(ctypes.c_uint8.from_address(src.data.ptr).value)

# 4. a frame of a lazy arena that was never committed is not there, even for the device
if sys.argv[1] == "uncommitted":
    from hmmgpu.device import EmulatedDevice
    from hmmgpu.device.backend import get_backend
    be = get_backend("cupy")
    dev = EmulatedDevice(be, 1024, 1 << 20, be.host_arena(16), lazy_memory=True)
    dev.arena.commit(0, 512)                          # the first granule only
    dev.pt.map(np.array([0x1000, 0x1001]), np.array([(1 << 20) + 5, (1 << 20) + 600])).wait()
    dev.jobs.memset(0x1000 << 12, 1, 4096, service=lambda f: None)     # committed: fine
    print("committed frame written", flush=True)
    dev.jobs.memset(0x1001 << 12, 1, 4096, service=lambda f: None)     # crashes

# 5. a misaligned access fails the launch and the context stays lost
bad = r"""extern "C" __global__ void m(unsigned long long p) { *(unsigned long long*)(p + 4) = 1; }"""
mod = cupy.RawModule(path=compile_source(bad, "m.cu"))
with stream:
    buf = cupy.zeros(4, cupy.uint64)
    mod.get_function("m")((1,), (1,), (buf,))
for attempt in range(2):
    try:
        stream.synchronize()
    except _emu.CUDARuntimeError as e:
        assert "misaligned" in str(e), e
    else:
        raise AssertionError("a misaligned access went unnoticed")
print("shim ok")
'''


def test_shim_is_strict(shim_env):
    """The shim's own promises: asynchronous streams, FTZ as compiled, device memory off-limits to
    the host, uncommitted memory of a lazy arena off-limits to the device too, misaligned
    accesses fatal.  If one of them lapses, the tests below prove less."""
    r = run(shim_env, "-c", SHIM_CHECKS, "checks")
    assert r.returncode == 0 and "shim ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    r = run(shim_env, "-c", SHIM_CHECKS, "deref")
    assert r.returncode < 0 and "Segmentation fault" in r.stderr, (r.returncode, r.stderr[-3000:])
    r = run(shim_env, "-c", SHIM_CHECKS, "uncommitted")
    assert "committed frame written" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode < 0 and "Segmentation fault" in r.stderr, (r.returncode, r.stderr[-3000:])


def test_auto_backend_needs_a_kernel_to_run(shim_env):
    """A GPU and CuPy without NVRTC (a driver-only machine): auto must not pick cupy, and
    ``hmmgpu info`` says why; asking for cupy explicitly fails with the same reason."""
    env = dict(shim_env, HMMGPU_SHIM_NO_NVRTC="1")
    r = run(env, "-m", "hmmgpu.cli", "info", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    assert info["auto_backend"] == "numpy" and info["backend"] == "numpy", info
    assert "test kernel does not run" in info["auto_reason"] and "NVRTC" in info["auto_reason"], info
    assert info["nvrtc"] is None and "libnvrtc" in info["nvrtc_error"]
    r = run(env, "-c", "import hmmgpu; hmmgpu.System(backend='cupy')")
    assert r.returncode != 0 and "test kernel does not run" in r.stderr, r.stderr[-2000:]
    r = run(shim_env, "-m", "hmmgpu.cli", "info", "--json")
    info = json.loads(r.stdout)
    assert info["auto_backend"] == "cupy" and "ran it correctly" in info["auto_reason"], info


@pytest.mark.parametrize("path", ["tests/test_device_pagetable.py", "tests/test_device_dma.py",
                                  "tests/test_device_jobs.py", "tests/test_device_fatal.py",
                                  "tests/test_device_parity.py", "tests/test_device_lifetime.py",
                                  "tests/test_device_peer.py", "tests/test_docs.py"])
def test_gpu_marked_device_tests(shim_env, path):
    pytest_under_shim(shim_env, "--require-gpu", "-m", "gpu", path)


TWO_GPUS = r'''
import numpy as np
from cupy import _emu
from hmmgpu.device import EmulatedDevice
from hmmgpu.device.backend import get_backend

be = get_backend("cupy")
host = be.host_arena(64)
A, B = 1 << 20, 2 << 20
a = EmulatedDevice(be, 64, A, host, gpu=0, name="A")
b = EmulatedDevice(be, 64, B, host, gpu=1, name="B")
a.enable_peer_access(b)
a.enable_peer_access(b)
b.enable_peer_access(a)
assert _emu.DEVICE.peer_access == {(0, 1), (1, 0)}, _emu.DEVICE.peer_access
rng = np.random.default_rng(1)
data = rng.integers(0, 256, (8, 4096), dtype=np.uint8)
# B's write sits on GPU 1's queue, A's copy on GPU 0's: the copy must come after the write ...
b.write_pages(B + np.arange(8), data)
a.copy_pages(A + np.arange(8), B + np.arange(8))
assert np.array_equal(a.read_pages(A + np.arange(8)), data), "A's peer copy ran before B's write"
# ... and B's later work after A's copy into B's frames
a.copy_pages(B + np.arange(8, 16), A + np.arange(8))
assert np.array_equal(b.read_pages(B + np.arange(8, 16)), data), "B read before A's peer copy"
# a job of A through entries on B's frames: after B's queued write, and B sees what it stored
b.write_pages(B + np.arange(16, 20), data[:4])
a.pt.map(0x1000 + np.arange(4), B + np.arange(16, 20)).wait()
want = int(data[:4].reshape(-1).view(np.uint32).astype(np.uint64).sum())
assert a.jobs.reduce_sum(0x1000 << 12, 4 * 4096, service=lambda f: None).value == want
a.jobs.memset(0x1000 << 12, 0x5A, 4 * 4096, service=lambda f: None)
assert (b.read_pages(B + np.arange(16, 20)) == 0x5A).all(), "B read before A's job stored"
print("two gpus ok")
'''


def test_peer_devices_on_two_gpus(shim_env):
    """Two emulated devices on two (shim) GPUs: enable_peer_access enables CUDA peer access each
    way, once, and peer copies and job slices are ordered across the two GPUs' queues -- the
    shim's queues run only when waited for, so a missing cross-GPU wait reads stale frames."""
    r = run(dict(shim_env, HMMGPU_SHIM_GPUS="2"), "-c", TWO_GPUS)
    assert r.returncode == 0 and "two gpus ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_uvm_driver_over_two_gpus(shim_env):
    """UvmDriver(ndevices=2) on two (shim) GPUs, device i on GPU i: tests/test_uvm_multi.py on the
    CUDA path -- device-to-device migrations as peer copies ordered across the GPUs' queues, peer
    mappings read and written by jobs through UVA pointers, per-device eviction."""
    pytest_under_shim(dict(shim_env, HMMGPU_SHIM_GPUS="2"), "tests/test_uvm_multi.py", backend="cupy")


@pytest.mark.parametrize("path", ["tests/test_dmirror_driver.py", "tests/test_hmm_selftests.py"])
def test_on_cupy_backend(shim_env, path):
    """dmirror and the hmm-tests port with system RAM in pinned memory and device memory on the
    (emulated) GPU: every migration, device read/write and snapshot through the CUDA path."""
    pytest_under_shim(shim_env, path, backend="cupy")


def test_demo_on_cupy(shim_env):
    r = run(shim_env, "-m", "hmmgpu.cli", "demo", "--backend", "cupy", "--mib", "1", "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["backend"] == "cupy" and res["ok"] and all(res["checks"].values()), res["checks"]


@pytest.mark.parametrize("suite", ["migration", "prefetch", "jobs", "faults", "scaling", "fallback"])
def test_bench_gpu_branch(shim_env, suite):
    r = run(shim_env, "-m", "hmmgpu.cli", "bench", suite, "--quick", "--backend", "cupy", "--no-progress",
            "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert not res.get("unavailable"), res["unavailable"]
    rows = [row for row in res["rows"] if row["suite"] == suite]
    # every figure with a target was measured against its baseline (fixed costs have neither)
    assert rows and all(row["ratio"] is not None for row in rows if row["target"]), rows


def test_device_bench(shim_env, tmp_path):
    """The device suite, through bench/device_bench.py as gpu-check.sh runs it (4 MiB here)."""
    out = tmp_path / "device_bench.json"
    r = run(shim_env, "bench/device_bench.py", "--gib", "0.004", "--reps", "1", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    assert figures and all(f["ratio"] is not None for f in figures.values()), figures


def test_a_sweep_point_is_the_same_on_both_backends(shim_env):
    """One oversubscribed point (evictions, prefetches, remote maps) run on the CUDA path and on
    NumPy: every figure of the row but the wall time and the backend's name is the same --
    the policies decide on the emulated clock, never on what the hardware took."""
    args = ["-m", "hmmgpu.cli", "run", "gesummv", "--footprint", "5M", "--oversub", "1.25", "--param", "step=64",
            "--json"]
    rows = {}
    for backend in ("cupy", "numpy"):
        r = run(shim_env, *args, "--backend", backend)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        rows[backend] = json.loads(r.stdout)["result"]
    assert rows["cupy"]["backend"] == "cupy" and rows["cupy"]["ok"] and rows["cupy"]["evictions"] > 0
    drop = ("wall_s", "backend", "backend_requested")
    assert {k: v for k, v in rows["cupy"].items() if k not in drop} == \
           {k: v for k, v in rows["numpy"].items() if k not in drop}
