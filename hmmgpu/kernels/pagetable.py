"""The page-table hardware of the CuPy backend: node pool in GPU memory, pagetable.cu kernels.

Commands are uploaded (through a pinned staging buffer, one cudaMemcpyAsync) and executed on
the GPU's stream; the host never stores into the pool.
"""
import cupy
import numpy as np

from ..device.pagetable import PT_ENTRIES
from .module import Uploader, host_sync, launch, load_module


class CupyPageTableHW:
    def __init__(self, backend, gpu=0):
        self.backend = backend
        self.gpu = gpu
        self.stream = backend.stream(gpu)
        self.uploader = Uploader(backend, gpu)

    def _mod(self):
        return load_module("pagetable.cu", self.gpu)

    def alloc(self, capacity):
        with cupy.cuda.Device(self.gpu), self.stream:
            return cupy.zeros((capacity, PT_ENTRIES), dtype=cupy.uint64)

    def grow(self, nodes, capacity):
        with cupy.cuda.Device(self.gpu), self.stream:
            new = cupy.zeros((capacity, PT_ENTRIES), dtype=cupy.uint64)
            new[: nodes.shape[0]] = nodes          # a device-to-device copy on the stream
        return new

    def fence(self):
        return self.backend.fence(self.gpu)

    def execute(self, nodes, cmds):
        total = int((cmds[:, 0] >> np.uint64(8)).sum())
        cmds = np.asarray(cmds, dtype=np.uint64)
        with cupy.cuda.Device(self.gpu), self.uploader.staged(cmds) as (dcmds,):
            launch(self._mod(), "pt_execute", total,
                   (nodes, np.uint64(dcmds), np.uint64(len(cmds)), np.uint64(total)), self.stream)

    def lookup(self, nodes, vpns):
        vpns = np.ascontiguousarray(vpns, dtype=np.uint64)
        with cupy.cuda.Device(self.gpu), self.stream, self.uploader.staged(vpns) as (dv,):
            out = cupy.empty(vpns.size, dtype=cupy.uint64)
            launch(self._mod(), "pt_lookup", vpns.size, (nodes, np.uint64(dv), np.uint64(vpns.size), out),
                   self.stream)
            host_sync()
            return out.get(stream=self.stream)
