"""The CuPy job executor and fault ring: launches job slices of jobs.cu / user kernels.

Every job kernel has the signature of HMM_JOB_PARAMS (hmm.cuh), so one launcher serves the
built-in jobs and users' own.  Lane-private scratch arrays are uploaded once per job, in one
block, and their device addresses passed in the argument words; a user job's probe pass gets a
second set of words aimed at a copy of that block, refreshed by one device-to-device copy
before each slice, so scratch writes of the probe pass are dropped (the probe/commit contract
of hmmgpu.device.UserJob).

A fault round costs one launch per slice, the page-table updates of the service (one or two
launches: directory links, then leaves) and one host synchronisation: the fault ring's records
live in pinned, mapped host memory (the lanes write them over the link), and its put counter,
in GPU memory for the lanes' atomics, is published to a pinned word by one copy and reset by
one memset queued behind the job, then the host waits once and reads both in place.
"""
import cupy
import numpy as np

from ..device.hw import MAX_PEERS
from ..device.jobs import LANE_FAULTED, Zeros
from .module import cudaMemcpyDefault, host_sync, launch, load_module, pinned_mapped

_U64 = np.uint64


class CupyFaultHW:
    """The fault ring: records (capacity, 4) uint64 in pinned, mapped host memory, a uint64
    put counter in GPU memory."""

    def __init__(self, backend, capacity, gpu=0):
        self.capacity = int(capacity)
        self.gpu = gpu
        self.stream = backend.stream(gpu)
        self._rec_owner, rec, self.records_ptr = pinned_mapped(self.capacity * 32, gpu)
        self.records = rec.view(np.uint64).reshape(self.capacity, 4)
        self._put_owner, put, self.put_host_ptr = pinned_mapped(8, gpu)
        self.put_host = put.view(np.uint64)
        with cupy.cuda.Device(gpu), self.stream:
            self.put = cupy.zeros(1, dtype=cupy.uint64)

    def drain(self):
        """Every record and the put counter, after everything queued so far ran: one copy, one
        memset, one wait.  The ring is empty afterwards."""
        rt = cupy.cuda.runtime
        with cupy.cuda.Device(self.gpu):
            rt.memcpyAsync(self.put_host_ptr, self.put.data.ptr, 8, cudaMemcpyDefault, self.stream.ptr)
            rt.memsetAsync(self.put.data.ptr, 0, 8, self.stream.ptr)
            host_sync()
            self.stream.synchronize()
        put = int(self.put_host[0])
        n = min(put, self.capacity)
        return self.records[:n].copy(), put


class _Job:
    pass


class CupyJobExecutor:
    def __init__(self, device):
        self.dev = device
        self.gpu = device.gpu
        self.backend = device.backend
        self.stream = self.backend.stream(self.gpu)
        self.fault = device.fault_buffer.hw
        self._peer_epoch = None             # the device's peer_epoch the table was written for
        self._peer_table = None             # [MAX_PEERS][3] uint64 on the GPU (hmm.cuh's P.peers)
        self._peer_ptr = _U64(0)

    def prepare(self, spec, job_id):
        h = _Job()
        h.spec, h.job_id = spec, job_id
        if spec.user is not None:
            if not spec.user.cuda_source:
                raise ValueError(f"user job '{spec.name}' has no CUDA source for the cupy backend")
            h.mod = load_module(spec.user.module, self.gpu, source=spec.user.cuda_source)
            h.kernel = spec.user.name
        else:
            h.mod = load_module("jobs.cu", self.gpu)
            h.kernel = "job_" + spec.name
        # the scratch arrays, 16-byte aligned in one block
        arrays = [(i, a) for i, a in enumerate(spec.args) if isinstance(a, (np.ndarray, Zeros))]
        offs, size = [], 0
        for _, a in arrays:
            nbytes = a.nbytes if isinstance(a, np.ndarray) else a.n * a.dtype.itemsize
            offs.append(size)
            size += -(-nbytes // 16) * 16
        block = np.zeros(max(size, 16), np.uint8)
        for (_, a), off in zip(arrays, offs):
            if isinstance(a, np.ndarray):
                block[off:off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        with cupy.cuda.Device(self.gpu), self.stream:
            h.state = cupy.zeros(max(spec.nlanes, 1), dtype=cupy.uint8)
            h.block = cupy.asarray(block)
            two_phase = spec.user is not None and arrays
            h.shadow = cupy.zeros(h.block.shape, dtype=cupy.uint8) if two_phase else None
            h.arrays = {}
            words = np.zeros(max(len(spec.args), 1), dtype=np.uint64)
            shadow_words = words.copy()
            for (i, a), off in zip(arrays, offs):
                dt = a.dtype
                n = a.size if isinstance(a, np.ndarray) else a.n
                h.arrays[i] = h.block[off:off + n * dt.itemsize].view(dt)
                words[i] = h.block.data.ptr + off
                shadow_words[i] = (h.shadow.data.ptr if two_phase else h.block.data.ptr) + off
            for i, a in enumerate(spec.args):
                if i not in h.arrays:
                    words[i] = shadow_words[i] = int(a) & 0xFFFFFFFFFFFFFFFF
            h.args = cupy.asarray(words)
            h.probe_args = cupy.asarray(shadow_words) if two_phase else h.args
        dev = self.dev
        h.prefix = tuple(_U64(x) for x in (
            dev.arena.ptr, dev.pfn_base, dev.nframes, dev.host_arena.ptr, dev.nr_ram,
            self.fault.records_ptr, self.fault.put.data.ptr, self.fault.capacity,
            h.state.data.ptr, job_id))
        return h

    def launch(self, h, lanes, lo, n, nodes):
        """Launch lanes ``lanes[lo:lo + n]`` (``lo .. lo + n - 1`` when ``lanes`` is None)."""
        with cupy.cuda.Device(self.gpu):
            if lanes is None:
                dl, base = _U64(0), _U64(lo)
            else:
                with self.stream:
                    h.lanes = cupy.asarray(np.ascontiguousarray(lanes[lo:lo + n], dtype=np.uint64))
                dl, base = h.lanes, _U64(0)
            if h.shadow is not None:                 # the probe pass's copy of the scratch
                cupy.cuda.runtime.memcpyAsync(h.shadow.data.ptr, h.block.data.ptr, h.block.nbytes,
                                              cudaMemcpyDefault, self.stream.ptr)
            threads = 32 * n if h.spec.warp else n
            # a peer on another GPU: the slice runs after the work queued there (the peer's later
            # work comes after the slice anyway: a round ends with a host wait on this GPU)
            for g in self._peers():
                self.backend.queue_after(self.gpu, g)
            launch(h.mod, h.kernel, threads,
                   h.prefix + (nodes, dl, base, _U64(n), h.args, h.probe_args, self._peer_ptr), self.stream)
        return self.backend.fence(self.gpu)

    def _peers(self):
        """Bring the kernels' peer table up to date with the device's peers (rewritten on the
        stream, behind the slices that used the old one, when they changed); returns the other
        GPUs those peers are on."""
        peers = self.dev.peers                       # drops a peer that went away (epoch moves)
        if self.dev.peer_epoch != self._peer_epoch:
            self._peer_epoch = self.dev.peer_epoch
            if peers:
                table = np.zeros((MAX_PEERS, 3), np.uint64)
                for i, q in enumerate(peers):
                    table[i] = (q.pfn_base, q.nframes, q.arena.ptr)
                with self.stream:
                    if self._peer_table is None:
                        self._peer_table = cupy.zeros(table.size, dtype=cupy.uint64)
                    self._peer_table.set(table.reshape(-1), stream=self.stream)
            self._peer_ptr = _U64(self._peer_table.data.ptr if peers else 0)
        return {q.gpu for q in peers} - {self.gpu} if peers else ()

    def sync(self):
        host_sync()
        self.stream.synchronize()

    def faulted_lanes(self, h):
        """Every lane marked FAULTED (read back when the ring dropped records)."""
        with cupy.cuda.Device(self.gpu), self.stream:
            host_sync()
            state = h.state[: h.spec.nlanes].get(stream=self.stream)
        return np.flatnonzero(state == LANE_FAULTED)

    def finish(self, h):
        with cupy.cuda.Device(self.gpu), self.stream:
            host_sync()
            block = h.block.get(stream=self.stream)       # one copy for every output
        out = []
        for i in h.spec.outputs:
            a = h.arrays[i]
            off = a.data.ptr - h.block.data.ptr
            out.append(block[off:off + a.nbytes].view(a.dtype).copy())
        return tuple(out)
