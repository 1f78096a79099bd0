"""The module cache: each .cu source compiled into a ``cupy.RawModule`` once per GPU, launches,
and the launch / host-synchronisation counters.

Sources are loaded with a ``#line 1 "file.cu"`` prefix so compiler errors point at the real file
(a user's job source gets ``#include "hmm.cuh"`` first).  The engines (dma.py, pagetable.py,
jobs.py) and the benchmarks import this module; backend.py, which hands the engines out,
imports them, so nothing here imports backend.py back.
"""
import ctypes
import os
import threading
import weakref

import cupy
import numpy as np

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
NVRTC_OPTIONS = ("-I" + KERNEL_DIR, "--std=c++17")

cudaMemcpyDefault = 4

cudaHostAllocPortable = 0x01
cudaHostAllocMapped = 0x02

_modules = {}
_modules_lock = threading.Lock()

# Kernel launches (``launch``) and blocking host synchronisations (``host_sync``) made through
# this backend: a fault round costs at most 3 launches and 1 synchronisation
# (hmmgpu/device/faults.py); ``CupyBackend.counters``, ``EmulatedDevice.stats()``, the trace and
# ``hmmgpu bench --json`` report them.
COUNTERS = {"kernel_launches": 0, "host_syncs": 0}


def host_sync():
    """Count one point where the host blocks on the GPU (call it beside the blocking call)."""
    COUNTERS["host_syncs"] += 1


def load_module(filename, gpu=0, source=None):
    """The RawModule of hmmgpu/kernels/<filename> (or of ``source`` under that name), compiled
    once per GPU and cached."""
    key = (filename, gpu, source)
    with _modules_lock:
        mod = _modules.get(key)
        if mod is None:
            if source is None:
                with open(os.path.join(KERNEL_DIR, filename)) as f:
                    code = f'#line 1 "{filename}"\n' + f.read()
            else:
                code = f'#include "hmm.cuh"\n#line 1 "{filename}"\n' + source
            with cupy.cuda.Device(gpu):
                mod = cupy.RawModule(code=code, options=NVRTC_OPTIONS)
                mod.compile()
            _modules[key] = mod
    return mod


def launch(mod, name, nthreads, args, stream, block=256):
    """One launch of kernel ``name`` over ``nthreads`` threads on ``stream``."""
    if nthreads <= 0:
        return
    grid = (int(-(-nthreads // block)),)
    COUNTERS["kernel_launches"] += 1
    with stream:
        mod.get_function(name)(grid, (block,), args)


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
