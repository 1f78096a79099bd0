"""Importing hmmgpu (and its device layer) must not touch CUDA: no CuPy import, no context."""
import subprocess
import sys


def test_import_does_not_initialise_cuda():
    code = ("import sys, hmmgpu, hmmgpu.device, hmmgpu.kernels, hmmgpu.fallback.backend\n"
            "assert 'cupy' not in sys.modules, 'cupy imported at import time'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
