"""The CUDA sources compile with NVRTC for Hopper (compute_90), no GPU needed.

Uses the NVRTC library of the `nvidia-cuda-nvrtc` wheel (or CuPy's, or the system's) through
ctypes; skipped when none is installed.  Compiles exactly what the CuPy backend loads (the units
of hmmgpu.kernels.source, with its NVRTC options).  Catches what g++ in test_device_cuda_cpu.py
cannot: CUDA-only syntax, intrinsics, device-code restrictions.
"""
import ctypes
import glob
import os
import site
import sys

import pytest

from hmmgpu.kernels.source import NVRTC_OPTIONS, kernel_source


def _find_nvrtc():
    roots = list(sys.path) + site.getsitepackages() + [site.getusersitepackages()]
    pats = ["nvidia/cu13/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*", "nvidia/cu12/lib/libnvrtc.so*"]
    for r in roots:
        for p in pats:
            for f in sorted(glob.glob(os.path.join(r, p))):
                if "builtins" not in f:
                    return f
    for f in ("libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"):
        try:
            ctypes.CDLL(f)
            return f
        except OSError:
            pass
    return None


def _compile(lib, code, name):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0, None, None) == 0
    opts = [o.encode() for o in NVRTC_OPTIONS] + [b"-arch=compute_90"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


@pytest.fixture(scope="module")
def nvrtc():
    path = _find_nvrtc()
    if path is None:
        pytest.skip("no NVRTC library here (pip install nvidia-cuda-nvrtc to run this check)")
    return ctypes.CDLL(path)


@pytest.mark.parametrize("name", ["pagetable.cu", "dma.cu", "jobs.cu"])
def test_kernel_sources_compile(nvrtc, name):
    rc, log = _compile(nvrtc, kernel_source(name), name)
    assert rc == 0, log
    assert "warning" not in log.lower(), log


def test_user_jobs_compile(nvrtc):
    from test_device_fatal import COPY64_JOB
    from test_device_jobs import COUNT_JOB, STAMP_JOB
    from test_device_parity import SCALE_JOB
    for job in (COUNT_JOB, STAMP_JOB, SCALE_JOB, COPY64_JOB):
        rc, log = _compile(nvrtc, kernel_source(job.name + ".cu", job.cuda_source), job.name)
        assert rc == 0, log
