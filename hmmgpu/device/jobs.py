"""The job engine: device kernels over many lanes, with replayable faults.

It stands for a GPU's compute engine together with the fault-servicing loop of NVIDIA's UVM
driver (uvm_gpu_replayable_faults.c: fetch a batch, dedupe, service, replay).  A job is a
kernel over ``nlanes`` lanes; each lane translates every address through the device page table
(hmmgpu/device/pagetable.py).  A lane that misses, writes a read-only page, or makes an atomic
access to a page without PTE_ATOMIC writes a record to the fault buffer and stops without side
effects.  The engine runs a job in rounds:

1. launch the pending lanes in bounded slices (``slice_lanes``); between slices the device lock
   is released, so a page-table invalidation from another thread slips in there -- slices are
   the preemption points;
2. wait, drain the fault buffer in batches (256 by default), drop duplicates, and hand each batch
   to ``service(faults)``: the driver maps pages through the job's page table (``device.pt``,
   or a context's ``ctx.pt``) and returns None (all serviced), or a bool / errno array marking
   fatal faults (no VMA, PROT_NONE), which cancel the job with ``JobFault`` naming the address;
3. replay only the lanes that faulted (including those whose record did not fit in the buffer).

Built-in jobs (memset, copy, axpy, reduce_sum, gather, list_chase, tree_search) have a CUDA
kernel (hmmgpu/kernels/jobs.cu) and a NumPy twin (hmmgpu/fallback/jobs.py) with identical
results.  ``UserJob`` carries a user's CUDA C lane (hmmgpu/kernels/hmm.cuh) and/or a NumPy lane
function with the same context API (``load``, ``store``, ``atomic_add``, ``probe``).
"""
import errno as _errno
import threading

import numpy as np

from ..constants import PAGE_SIZE
from ._trace import span
from .faults import ACCESS_NAMES, JobFault, fatal_errno, fatal_reason

DEFAULT_SLICE_LANES = 1 << 16
MAX_STALLED_ROUNDS = 8

LANE_PENDING = 0
LANE_DONE = 1
LANE_FAULTED = 2


def _f32_bits(x):
    return int(np.array(x, dtype=np.float32).view(np.uint32))


def pack_args(values):
    """Job arguments as uint64 words: ints as two's complement, np.float32 / float as their bits
    (float32 for np.float32, float64 for a Python float); NumPy arrays and Zeros stay arrays
    (lane-private scratch: the kernel gets their device address)."""
    out = []
    for v in values:
        if isinstance(v, (np.ndarray, Zeros)):
            out.append(v)
        elif isinstance(v, np.float32):
            out.append(_f32_bits(v))
        elif isinstance(v, (float, np.float64)):
            out.append(int(np.array(v, dtype=np.float64).view(np.uint64)))
        else:
            out.append(int(v) & 0xFFFFFFFFFFFFFFFF)
    return out


class Zeros:
    """A zero-filled lane-private output array, allocated on the device (nothing to upload)."""

    def __init__(self, n, dtype=np.uint64):
        self.n = int(n)
        self.dtype = np.dtype(dtype)


class UserJob:
    """A job written by a user: a CUDA lane (``cuda_source`` defining it with HMM_DEFINE_JOB(name,
    ...)) and/or a NumPy lane function ``numpy_lane(ctx, lanes, args)`` vectorised over ``lanes``.

    Both backends run the lane twice (probe, then commit), so a faulting lane leaves no trace.
    """

    def __init__(self, name, cuda_source=None, numpy_lane=None):
        self.name = name
        self.cuda_source = cuda_source
        self.numpy_lane = numpy_lane


class JobSpec:
    """What the engine hands a backend's executor: kernel name, lane count, argument words."""

    def __init__(self, name, nlanes, args, *, warp=False, outputs=(), user=None):
        self.name = name
        self.nlanes = int(nlanes)
        self.args = list(args)        # ints (uint64 words), NumPy arrays and Zeros (lane-private scratch)
        self.warp = warp              # one warp per lane (bulk jobs) instead of one thread
        self.outputs = tuple(outputs)  # indices of array args returned by finish()
        self.user = user


class JobResult:
    """How a job went: ``rounds`` (lanes launched per round: the first is nlanes, the rest are
    replays of faulted lanes), ``faults`` (faults serviced), ``value`` (the job's answer)."""

    def __init__(self, name, job_id, rounds, faults, value=None, outputs=()):
        self.name = name
        self.job_id = job_id
        self.rounds = rounds
        self.faults = faults
        self.value = value
        self.outputs = outputs

    @property
    def replays(self):
        return len(self.rounds) - 1

    def __repr__(self):
        return f"JobResult({self.name!r} #{self.job_id}, rounds={self.rounds}, faults={self.faults})"


def _check_bulk(what, addrs, nbytes):
    for a in addrs:
        if a % 16:
            raise ValueError(f"{what}: address 0x{a:x} is not 16-byte aligned")
    if nbytes % 16 or nbytes < 0:
        raise ValueError(f"{what}: length {nbytes} is not a multiple of 16 bytes")


class JobQueue:
    """What every job engine of one device shares: the device runs one job at a time (the fault
    buffer is shared, and a job must never be cancelled by a fatal fault of another), and job
    ids and lane counts are the device's.  Invalidations still interleave (dev.lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.next_job_id = 1
        self.lanes_launched = 0


class JobEngine:
    """Runs jobs on one EmulatedDevice in one address space: ``device.jobs`` translates through
    ``device.pt``, a context's ``ctx.jobs`` through ``ctx.pt``.  ``space`` is the object whose
    ``pt`` and ``service`` the jobs use (read at each launch / job, so they may be replaced)."""

    def __init__(self, device, executor, slice_lanes=DEFAULT_SLICE_LANES, *, space=None, queue=None):
        self.device = device
        self.space = space if space is not None else device
        self.ex = executor
        self.slice_lanes = int(slice_lanes)
        self.queue = queue if queue is not None else JobQueue()

    @property
    def next_job_id(self):
        return self.queue.next_job_id

    @property
    def lanes_launched(self):
        return self.queue.lanes_launched

    # -- the fault/replay loop ---------------------------------------------------------------
    def submit(self, spec, service=None):
        with self.queue.lock:
            return self._submit(spec, service)

    def _submit(self, spec, service):
        dev, space, q = self.device, self.space, self.queue
        service = service if service is not None else space.service
        with dev.lock:
            job_id = q.next_job_id
            q.next_job_id += 1
            h = self.ex.prepare(spec, job_id)
        rounds, nfaults = [], 0
        pending, npending = None, spec.nlanes        # None: all lanes, by index
        last_key, stalled = None, 0
        try:
            while npending:
                with span(f"{spec.name} #{job_id} round {len(rounds)}", "job", dev.name, lanes=npending):
                    for lo in range(0, npending, self.slice_lanes):      # one iteration per slice
                        n = min(self.slice_lanes, npending - lo)
                        with dev.lock:              # a preemption point between two slices
                            fence = self.ex.launch(h, pending, lo, n, space.pt.nodes)
                            while dev.inflight and dev.inflight[0].done():
                                dev.inflight.popleft()
                            dev.inflight.append(fence)
                    q.lanes_launched += npending
                    rounds.append(npending)
                    self.ex.sync()
                batches, overflow = dev.fault_buffer.drain()
                if len(dev.fault_buffer.last_fatal):     # nothing to service: the job is cancelled
                    self._fatal(dev, dev.fault_buffer.last_fatal, job_id, spec.name)
                if dev.fault_buffer.last_put == 0:       # no lane faulted: no lane scan needed
                    break
                faulted, nfaulted = self.ex.faulted(h)
                if nfaulted == 0:
                    raise RuntimeError(f"device job '{spec.name}' #{job_id}: faults were recorded "
                                       "but no lane is marked faulted")
                if not batches and not overflow:
                    raise RuntimeError(f"device job '{spec.name}' #{job_id}: {nfaulted} lanes faulted "
                                       "but the fault buffer holds no record")
                key = []
                for batch in batches:                 # one iteration per batch of faults
                    nfaults += len(batch)
                    with span("service", "fault", dev.name, faults=len(batch), job=job_id):
                        errs = self._service(service, batch)
                    if errs is not None:
                        i = int(np.flatnonzero(errs)[0])
                        dev.counters["num_fatal_faults"] += int(np.count_nonzero(errs))
                        raise JobFault(int(errs[i]), int(batch.vaddr[i]), int(batch.access[i]),
                                       int(batch.lane[i]), job_id, spec.name,
                                       "the driver could not service it")
                    key.append((batch.vpn, batch.access))
                # a service callback that returns without mapping anything would spin forever
                if nfaulted == npending and last_key is not None and _same_faults(key, last_key):
                    stalled += 1
                    if stalled >= MAX_STALLED_ROUNDS:
                        b = batches[0] if batches else None
                        where = f" at 0x{int(b.vaddr[0]):x} ({ACCESS_NAMES[int(b.access[0])]})" if b else ""
                        raise JobFault(_errno.EFAULT, int(b.vaddr[0]) if b else 0,
                                       int(b.access[0]) if b else 0, int(b.lane[0]) if b else -1,
                                       job_id, spec.name,
                                       f"fault{where} still pending after {stalled} replays: "
                                       "the service callback returned without mapping the page")
                else:
                    stalled = 0
                last_key = key
                dev.counters["num_replays"] += 1
                pending, npending = faulted, nfaulted
        except BaseException:
            self.ex.sync()
            dev.fault_buffer.hw.drain()         # leave an empty buffer for the next job
            raise
        outputs = self.ex.finish(h)
        return JobResult(spec.name, job_id, rounds, nfaults, outputs=outputs)

    @staticmethod
    def _fatal(dev, records, job_id, name):
        dev.counters["num_fatal_faults"] += len(records)
        r = records[np.lexsort((records[:, 1], records[:, 0]))[0]]      # the lowest address
        raise JobFault(_errno.EFAULT, int(r[0]), int(r[2]) & 0xFF, int(r[1]), job_id, name,
                       fatal_reason(r[2]))

    @staticmethod
    def _service(service, batch):
        if service is None:
            return np.full(len(batch), _errno.EFAULT, np.int64)
        errs = fatal_errno(service(batch), len(batch))
        return errs if errs.any() else None

    # -- built-in jobs -----------------------------------------------------------------------
    def memset(self, addr, value, nbytes, service=None):
        """Set ``nbytes`` at virtual ``addr`` to the byte ``value`` (16-byte aligned)."""
        _check_bulk("memset", (addr,), nbytes)
        nunits = nbytes // 16
        spec = JobSpec("memset", -(-nbytes // PAGE_SIZE), [addr, value & 0xFF, nunits], warp=True)
        return self.submit(spec, service)

    def copy(self, dst, src, nbytes, service=None):
        """memcpy between virtual ranges (16-byte aligned, not overlapping)."""
        _check_bulk("copy", (dst, src), nbytes)
        spec = JobSpec("copy", -(-nbytes // PAGE_SIZE), [dst, src, nbytes // 16], warp=True)
        return self.submit(spec, service)

    def axpy(self, a, x, y, n, service=None):
        """y[i] = a * x[i] + y[i] on ``n`` float32 (n multiple of 4, 16-byte aligned)."""
        _check_bulk("axpy", (x, y), 4 * n)
        spec = JobSpec("axpy", -(-4 * n // PAGE_SIZE), [x, y, 4 * n // 16, _f32_bits(a)], warp=True)
        return self.submit(spec, service)

    def reduce_sum(self, addr, nbytes, service=None):
        """Sum of the uint32 words of [addr, addr+nbytes) modulo 2**64; ``.value`` is an int."""
        _check_bulk("reduce_sum", (addr,), nbytes)
        nlanes = -(-nbytes // PAGE_SIZE)
        spec = JobSpec("reduce", nlanes, [addr, 0, nbytes // 16, Zeros(nlanes)],
                       warp=True, outputs=(3,))
        r = self.submit(spec, service)
        r.value = int(r.outputs[0].sum(dtype=np.uint64))
        return r

    def gather(self, dst, src, idx, n, service=None):
        """dst[i] = src[idx[i]] for i < n: uint32 elements, int64 indices, all in virtual memory."""
        spec = JobSpec("gather", n, [dst, src, idx])
        return self.submit(spec, service)

    def list_chase(self, heads, max_steps=1 << 20, service=None):
        """Walk linked lists (nodes {u64 next; u64 value}, 16-byte aligned) from each head.

        ``.value`` = (sum of values mod 2**64, nodes visited) per lane, NumPy uint64 arrays.
        """
        heads = np.asarray(heads, dtype=np.uint64).copy()
        n = heads.size
        spec = JobSpec("list_chase", n, [heads, Zeros(n), Zeros(n),
                                         int(max_steps)], outputs=(1, 2))
        r = self.submit(spec, service)
        r.value = r.outputs
        return r

    def tree_search(self, root, keys, max_depth=64, service=None):
        """Look ``keys`` up in a binary search tree (nodes {left, right, key, value}, 32-byte aligned).

        ``.value`` = (value or 2**64-1 when absent, nodes visited) per lane.
        """
        keys = np.asarray(keys, dtype=np.uint64).copy()
        n = keys.size
        spec = JobSpec("tree_search", n, [np.full(n, root, np.uint64), Zeros(n),
                                          np.full(n, np.iinfo(np.uint64).max, np.uint64), keys,
                                          int(max_depth)], outputs=(2, 1))
        r = self.submit(spec, service)
        r.value = r.outputs
        return r

    def run(self, job, nlanes, args=(), service=None):
        """Run a ``UserJob`` over ``nlanes`` lanes with ``args`` (see ``pack_args``).

        Array arguments are lane-private scratch the job may read and write; they come back in
        ``result.outputs`` in argument order.
        """
        packed = pack_args(args)
        outs = tuple(i for i, a in enumerate(packed) if isinstance(a, (np.ndarray, Zeros)))
        spec = JobSpec(job.name, nlanes, packed, outputs=outs, user=job)
        return self.submit(spec, service)


def _same_faults(a, b):
    if len(a) != len(b):
        return False
    return all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
