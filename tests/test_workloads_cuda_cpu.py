"""The workloads' CUDA lanes (hmmgpu/workloads/kernels/*.cu), executed on the CPU.

Runs the gpu-marked tests of tests/test_workloads.py -- every program and the trace replay on
the CuPy backend, results checked exactly against NumPy -- in a subprocess against the CUDA
shim that tests/test_device_cuda_cpu.py sets up (tests/cuda_shim).  Skipped without g++ and
where a real GPU runs those tests.
"""
import test_device_cuda_cpu as shim

pytestmark = shim.pytestmark


def test_workload_kernels_on_cpu(tmp_path):
    shim.pytest_under_shim(shim.shim_environment(str(tmp_path)), "--require-gpu", "-m", "gpu",
                           "tests/test_workloads.py")
