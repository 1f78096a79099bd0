"""The backend switch: which implementation of the device primitives runs.

Two backends fill the same small interface (``hmmgpu/device/hw.py``; tinygrad's shape:
one interface, one module per backend, chosen by name):

* ``cupy``  (``hmmgpu/kernels/backend.py``): system RAM in pinned, mapped host
  memory, device frames in GPU memory, copies and jobs as CUDA kernels.
* ``numpy`` (``hmmgpu/fallback/backend.py``): every primitive in vectorised
  NumPy with identical semantics; its timings are emulated and say so.

``auto`` (the default, or ``HMMGPU_BACKEND``; empty means unset) picks CuPy only when
it imports, a CUDA device is present, and a test kernel compiles (NVRTC), loads and runs
there correctly; ``backend_info()`` says which step failed otherwise.  Nothing here
initialises CUDA at import time; the probe does when it runs (once per process).
This module imports the backends and nothing imports it back: it is the registry.
"""
import os

from ..errors import BackendUnavailable

BACKENDS = ("auto", "cupy", "numpy")

_reason = {}


def env_backend():
    """$HMMGPU_BACKEND, or None when it is unset or empty."""
    return os.environ.get("HMMGPU_BACKEND", "").strip() or None


def backend_info():
    """Which backend ``auto`` picks on this machine, and why."""
    name, why = _probe_auto()
    return {"backend": name, "reason": why, "env": env_backend()}


def _probe_auto():
    if "auto" in _reason:
        return _reason["auto"]
    try:
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA install
        result = ("numpy", f"cupy does not import ({type(e).__name__}: {e})")
    else:
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            result = ("numpy", f"cupy imports but no CUDA device answers ({type(e).__name__}: {e})")
        else:
            result = _probe_kernel(cupy, n) if n > 0 else (
                "numpy", "cupy imports but the CUDA runtime reports 0 devices")
    _reason["auto"] = result
    return result


def _probe_kernel(cupy, n):
    """A device that answers is not enough: without NVRTC (a driver-only machine with CuPy 14
    and no toolkit) no kernel compiles, and then nothing of the cupy backend would run."""
    head = f"cupy {cupy.__version__}, {n} CUDA device(s)"
    try:
        from ..kernels.module import selftest
        return "cupy", f"{head}: {selftest(0)}"
    except Exception as e:
        return "numpy", (f"{head}, but a test kernel does not run ({type(e).__name__}: {e}); "
                         "pip install -e '.[cuda12]' (or '.[cuda13]') brings CuPy with NVRTC")


def get_backend(name=None):
    """Instantiate a backend by name: "auto" (default; HMMGPU_BACKEND), "cupy" or "numpy"."""
    name = name or env_backend() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name, _ = _probe_auto()
    if name == "cupy":
        chosen, why = _probe_auto()
        if chosen != "cupy":
            raise BackendUnavailable(f"backend 'cupy' was requested but cannot run: {why}")
        from ..kernels.backend import CupyBackend
        return CupyBackend()
    from ..fallback.backend import NumpyBackend
    return NumpyBackend()
