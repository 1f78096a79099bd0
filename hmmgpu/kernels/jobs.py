"""The CuPy job executor and fault ring: launches job slices of jobs.cu / user kernels.

Every job kernel has the signature of HMM_JOB_PARAMS (hmm.cuh), so one launcher serves the
built-in jobs and users' own.  Lane-private scratch arrays are uploaded once per job and their
device addresses passed in the argument words.
"""
import cupy
import numpy as np

from ..device.jobs import LANE_FAULTED, Zeros
from .module import launch, load_module

_U64 = np.uint64


class CupyFaultHW:
    """The fault ring in GPU memory: records (capacity, 4) uint64 and a uint64 put counter."""

    def __init__(self, backend, capacity, gpu=0):
        self.capacity = int(capacity)
        self.gpu = gpu
        self.stream = backend.stream(gpu)
        with cupy.cuda.Device(gpu), self.stream:
            self.records = cupy.zeros((self.capacity, 4), dtype=cupy.uint64)
            self.put = cupy.zeros(1, dtype=cupy.uint64)

    def drain(self):
        with cupy.cuda.Device(self.gpu), self.stream:
            put = int(self.put.get(stream=self.stream)[0])
            n = min(put, self.capacity)
            recs = self.records[:n].get(stream=self.stream) if n else np.zeros((0, 4), np.uint64)
            self.put.fill(0)
        return recs, put


class _Job:
    pass


class CupyJobExecutor:
    def __init__(self, device):
        self.dev = device
        self.gpu = device.gpu
        self.backend = device.backend
        self.stream = self.backend.stream(self.gpu)
        self.fault = device.fault_buffer.hw

    def prepare(self, spec, job_id):
        h = _Job()
        h.spec, h.job_id = spec, job_id
        if spec.user is not None:
            if not spec.user.cuda_source:
                raise ValueError(f"user job '{spec.name}' has no CUDA source for the cupy backend")
            h.mod = load_module(f"{spec.user.name}.cu", self.gpu, source=spec.user.cuda_source)
            h.kernel = spec.user.name
        else:
            h.mod = load_module("jobs.cu", self.gpu)
            h.kernel = "job_" + spec.name
        with cupy.cuda.Device(self.gpu), self.stream:
            h.state = cupy.zeros(max(spec.nlanes, 1), dtype=cupy.uint8)
            h.arrays = {}
            words = np.zeros(max(len(spec.args), 1), dtype=np.uint64)
            for i, a in enumerate(spec.args):
                if isinstance(a, (np.ndarray, Zeros)):
                    d = cupy.asarray(a) if isinstance(a, np.ndarray) else cupy.zeros(a.n, a.dtype)
                    h.arrays[i] = d
                    words[i] = d.data.ptr
                else:
                    words[i] = int(a) & 0xFFFFFFFFFFFFFFFF
            h.args = cupy.asarray(words)
        dev = self.dev
        h.prefix = tuple(_U64(x) for x in (
            dev.arena.ptr, dev.pfn_base, dev.nframes, dev.host_arena.ptr, dev.nr_ram,
            self.fault.records.data.ptr, self.fault.put.data.ptr, self.fault.capacity,
            h.state.data.ptr, job_id))
        return h

    def launch(self, h, pending, lo, n, nodes):
        if pending is None:
            lanes, base = _U64(0), _U64(lo)
        else:
            lanes, base = pending[lo:lo + n], _U64(0)
        threads = 32 * n if h.spec.warp else n
        with cupy.cuda.Device(self.gpu):
            launch(h.mod, h.kernel, threads, h.prefix + (nodes, lanes, base, _U64(n), h.args), self.stream)
        return self.backend.fence(self.gpu)

    def sync(self):
        self.stream.synchronize()

    def faulted(self, h):
        with cupy.cuda.Device(self.gpu), self.stream:
            f = cupy.flatnonzero(h.state[: h.spec.nlanes] == LANE_FAULTED).astype(cupy.uint64)
            return f, int(f.size)

    def finish(self, h):
        with cupy.cuda.Device(self.gpu), self.stream:
            out = tuple(h.arrays[i].get(stream=self.stream) for i in h.spec.outputs)
        return out
