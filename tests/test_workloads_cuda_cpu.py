"""The workloads' CUDA lanes (hmmgpu/workloads/kernels/*.cu), executed on the CPU.

Runs the gpu-marked tests of tests/test_workloads.py -- every program and the trace replay on
the CuPy backend, results checked exactly against NumPy -- in a subprocess against the CPU shim
of the CUDA builtins and the CuPy stand-in that tests/test_device_cuda_cpu.py defines (its
files are reused, not copied).  Skipped without g++ and where a real GPU runs those tests.
"""
import os
import shutil
import subprocess
import sys

import pytest

import test_device_cuda_cpu as shim


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the CUDA sources for the CPU")
def test_workload_kernels_on_cpu(tmp_path):
    if shim._real_gpu():
        pytest.skip("a real GPU is here: the gpu-marked tests run on it instead")
    (tmp_path / "cupy").mkdir()
    (tmp_path / "shim.h").write_text(shim.SHIM_H)
    (tmp_path / "launch_impl.h").write_text(shim.LAUNCH_IMPL_H)
    (tmp_path / "cupy" / "__init__.py").write_text(shim.FAKE_CUPY_INIT)
    (tmp_path / "cupy" / "cuda.py").write_text(shim.FAKE_CUPY_CUDA)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), shim.REPO]))
    env.pop("HMMGPU_BACKEND", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--require-gpu",
                        "-m", "gpu", "tests/test_workloads.py"], cwd=shim.REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
