"""The module cache: each .cu source compiled into a ``cupy.RawModule`` once per GPU, and launches.

Sources are loaded with a ``#line 1 "file.cu"`` prefix so compiler errors point at the real file
(a user's job source gets ``#include "hmm.cuh"`` first).  The engines (dma.py, pagetable.py,
jobs.py) and the benchmarks import this module; backend.py, which hands the engines out,
imports them, so nothing here imports backend.py back.
"""
import os
import threading

import cupy

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
NVRTC_OPTIONS = ("-I" + KERNEL_DIR, "--std=c++17")

cudaMemcpyDefault = 4

_modules = {}
_modules_lock = threading.Lock()


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
    with stream:
        mod.get_function(name)(grid, (block,), args)
