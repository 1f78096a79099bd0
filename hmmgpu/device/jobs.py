"""The job engine: device kernels over many lanes, with replayable faults.

It stands for a GPU's compute engine together with the fault-service loop of NVIDIA's UVM
driver (uvm_gpu_replayable_faults.c; hmmgpu/device/faults.py has the fault buffer, the passes
and the replay policies).  A job is a kernel over ``nlanes`` lanes; each lane translates every
address through the device page table (hmmgpu/device/pagetable.py).  A lane that misses, writes
a read-only page, or makes an atomic access to a page without PTE_ATOMIC writes a record to the
fault buffer and stops without side effects.  The engine runs a job in rounds:

1. launch the lanes to run in bounded slices (``slice_lanes``); between slices the device lock
   is released, so a page-table invalidation from another thread slips in there -- slices are
   the preemption points; the host fetches the fault ring before a slice that could overflow it
   and after the last one (on the GPU: one host synchronisation per round);
2. a service pass takes up to 20 batches of 256 records from the host's fault cache, drops
   duplicates, and hands the pass to ``service(faults)`` -- whole (a ``FaultDrain``, the default
   BATCH_FLUSH policy), per batch or per VA block, as the replay policy says: the driver maps
   pages through the job's page table (``device.pt``, or a context's ``ctx.pt``) and returns
   None (all serviced), or a bool / errno array marking fatal faults (no VMA, PROT_NONE), which
   cancel the job with ``JobFault`` naming the faulting address;
3. replay the lanes whose faults were serviced (and those whose record the ring dropped);
   lanes whose records wait in the cache stay stalled until a later pass services them.

Built-in jobs (memset, copy, axpy, reduce_sum, gather, list_chase, tree_search) have a CUDA
kernel (hmmgpu/kernels/jobs.cu) and a NumPy twin (hmmgpu/fallback/jobs.py) with identical
results.  ``UserJob`` carries a user's CUDA C lane (hmmgpu/kernels/hmm.cuh) and/or a NumPy lane
function with the same context API (``load``, ``store``, ``atomic_add``, ``probe``).
"""
import errno as _errno
import threading

import numpy as np

from ..constants import PAGE_SIZE
from ._trace import counter, span
from .faults import (ACCESS_NAMES, REPLAY_BATCH, REPLAY_BATCH_FLUSH, REPLAY_BLOCK, REPLAY_ONCE,
                     VA_BLOCK_PAGES, JobFault, coalesce, fatal_errno, fatal_reason)

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

    The probe/commit contract (both backends).  A lane runs in two passes:

    * the probe pass translates every access the lane makes: loads happen and return the data,
      stores and atomics only translate (they write nothing; an atomic returns 0), and the
      lane's scratch arrays (the array arguments) are throwaway copies -- writes to them are
      dropped.  A lane that faults stops there (its later loads return 0) and is replayed from
      the start once the fault is serviced; it leaves nothing behind, in memory or in scratch;
    * the commit pass runs a lane whose probe raised no fault once more, for real: its stores,
      atomics and scratch writes land.  It sees the same memory and the same scratch as its
      probe did, so it makes the same accesses and cannot fault.

    So every lane's effects -- memory and scratch -- are committed exactly once, however many
    fault rounds the job takes: ``out[lane] += v`` in a lane adds ``v`` once.  A lane must
    therefore be a function of the memory it loads and its scratch (no hidden state), and
    must not read another lane's scratch elements, which that lane may commit at any time.
    A NumPy lane tells the passes apart by ``ctx.probe_pass``; ``ctx.faulted`` marks the lanes
    that have stopped.  The NumPy lane context API: ``ctx.load(vaddr, dtype, sel=None)``,
    ``ctx.store(vaddr, values, sel=None)``, ``ctx.atomic_add(vaddr, values, sel=None)`` (returns
    the old values), ``ctx.probe(vaddr, access, sel=None)`` (translate only), ``ctx.active``;
    every call acts on the lanes still running (or positions ``sel`` of ``lanes``).

    ``module`` names the source file the kernel is compiled from (default ``<name>.cu``): jobs
    whose kernels share one source and module name compile once (a CUDA module holds them all).
    """

    def __init__(self, name, cuda_source=None, numpy_lane=None, module=None):
        self.name = name
        self.cuda_source = cuda_source
        self.numpy_lane = numpy_lane
        self.module = module or f"{name}.cu"


class JobSpec:
    """What the engine hands a backend's executor: kernel name, lane count, argument words.

    ``max_faults`` is the most fault records one lane can write in one run (a bulk lane records
    every page it misses, a pointer lane stops at its first): the host fetches the fault ring
    before a slice of lanes that could overflow it.
    """

    def __init__(self, name, nlanes, args, *, warp=False, outputs=(), user=None, max_faults=1):
        self.name = name
        self.nlanes = int(nlanes)
        self.args = list(args)        # ints (uint64 words), NumPy arrays and Zeros (lane-private scratch)
        self.warp = warp              # one warp per lane (bulk jobs) instead of one thread
        self.outputs = tuple(outputs)  # indices of array args returned by finish()
        self.user = user
        self.max_faults = int(max_faults)


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
        dev, q = self.device, self.queue
        fb = dev.fault_buffer
        service = service if service is not None else self.space.service
        with dev.lock:
            job_id = q.next_job_id
            q.next_job_id += 1
            h = self.ex.prepare(spec, job_id)
        rounds, nfaults = [], 0
        lanes, nlanes = None, spec.nlanes            # None: every lane, by index
        stall = _Stall()
        try:
            while True:
                lost = self._round(h, spec, job_id, lanes, nlanes, len(rounds)) if nlanes else 0
                if nlanes:
                    rounds.append(nlanes)
                if len(fb.fatal):                    # nothing to service: the job is cancelled
                    self._fatal(fb.fatal, job_id, spec.name)
                if not fb.npending and not lost:
                    break
                lanes, served = self._service_passes(h, spec, job_id, service, lost, stall)
                nfaults += served
                nlanes = int(lanes.size)
                self._count_calls()
        except BaseException:
            self.ex.sync()
            fb.reset()                               # leave an empty buffer for the next job
            raise
        outputs = self.ex.finish(h)
        return JobResult(spec.name, job_id, rounds, nfaults, outputs=outputs)

    def _round(self, h, spec, job_id, lanes, nlanes, k):
        """Launch ``nlanes`` lanes (``lanes``, or 0..nlanes-1 when None) in slices, then fetch
        the fault ring; returns the records the ring dropped for lack of room."""
        dev, q, fb = self.device, self.queue, self.device.fault_buffer
        lost, bound = 0, 0                           # bound: records the ring may hold now
        with span(f"{spec.name} #{job_id} round {k}", "job", dev.name, lanes=nlanes):
            for lo in range(0, nlanes, self.slice_lanes):      # one iteration per slice
                n = min(self.slice_lanes, nlanes - lo)
                if bound and bound + n * spec.max_faults > fb.capacity:
                    lost += fb.fetch()               # the host keeps up with the ring
                    bound = 0
                with dev.lock:                       # a preemption point between two slices
                    fence = self.ex.launch(h, lanes, lo, n, self.space.pt.nodes)
                    while dev.inflight and dev.inflight[0].done():
                        dev.inflight.popleft()
                    dev.inflight.append(fence)
                bound += n * spec.max_faults
            q.lanes_launched += nlanes
            lost += fb.fetch()
        return lost

    def _service_passes(self, h, spec, job_id, service, lost, stall):
        """Service passes over the fault cache as the replay policy says; returns the lanes to
        replay (sorted) and the number of faults serviced."""
        dev, fb = self.device, self.device.fault_buffer
        c = dev.counters
        resume, served = [], 0
        while fb.npending:                           # one iteration per pass
            records = fb.take(fb.max_batches)
            drain, dups = coalesce(records, fb.batch_size)
            c["num_duplicate_faults"] += dups
            groups = _groups(drain, fb.policy)
            for g in groups:                         # one driver call per group
                with span("service", "fault", dev.name, faults=len(g), job=job_id,
                          batches=drain.nbatches):
                    errs = self._service(service, g)
                if errs is not None:
                    i = int(np.flatnonzero(errs)[0])     # the lowest faulting address: sorted
                    c["num_fatal_faults"] += int(np.count_nonzero(errs))
                    raise JobFault(int(errs[i]), int(g.vaddr[i]), int(g.access[i]), int(g.lane[i]),
                                   job_id, spec.name, "the driver could not service it")
            served += len(drain)
            if fb.policy in (REPLAY_BLOCK, REPLAY_BATCH):
                c["num_replays"] += len(groups)
            elif fb.policy == REPLAY_BATCH_FLUSH:
                c["num_replays"] += 1
            resume.append(records[:, 1].astype(np.int64))
            covered = fb.drop_covered(drain)
            if covered.size:
                resume.append(covered)
            stall.check(drain, job_id, spec.name)
            if fb.policy != REPLAY_ONCE:
                break
        if fb.policy == REPLAY_ONCE:
            c["num_replays"] += 1
        if lost:                                     # lanes whose record the ring dropped
            resume.append(self.ex.faulted_lanes(h))
        lanes = np.concatenate(resume) if len(resume) > 1 else resume[0]
        if lanes.size > 1 and not (lanes[1:] > lanes[:-1]).all():     # a streaming job's are
            lanes = np.unique(lanes)
        if fb.npending and lanes.size:               # their other faults wait in the cache
            waiting = fb.waiting_lanes(lanes[0], lanes[-1])
            if waiting.size:
                lanes = lanes[~np.isin(lanes, waiting)]
        return lanes, served

    def _fatal(self, records, job_id, name):
        self.device.counters["num_fatal_faults"] += len(records)
        r = records[np.lexsort((records[:, 1], records[:, 0]))[0]]      # the lowest address
        raise JobFault(_errno.EFAULT, int(r[0]), int(r[2]) & 0xFF, int(r[1]), job_id, name,
                       fatal_reason(r[2]))

    def _count_calls(self):
        """The backend's kernel launches and host synchronisations so far, into the trace."""
        calls = getattr(self.device.backend, "counters", None)
        if calls is not None:
            counter("cuda calls", self.device.name, **calls)

    @staticmethod
    def _service(service, faults):
        if service is None:
            return np.full(len(faults), _errno.EFAULT, np.int64)
        errs = fatal_errno(service(faults), len(faults))
        return errs if errs.any() else None

    # -- built-in jobs -----------------------------------------------------------------------
    def memset(self, addr, value, nbytes, service=None):
        """Set ``nbytes`` at virtual ``addr`` to the byte ``value`` (16-byte aligned)."""
        _check_bulk("memset", (addr,), nbytes)
        nunits = nbytes // 16
        spec = JobSpec("memset", -(-nbytes // PAGE_SIZE), [addr, value & 0xFF, nunits], warp=True,
                       max_faults=2)
        return self.submit(spec, service)

    def copy(self, dst, src, nbytes, service=None):
        """memcpy between virtual ranges (16-byte aligned, not overlapping)."""
        _check_bulk("copy", (dst, src), nbytes)
        spec = JobSpec("copy", -(-nbytes // PAGE_SIZE), [dst, src, nbytes // 16], warp=True,
                       max_faults=4)
        return self.submit(spec, service)

    def axpy(self, a, x, y, n, service=None):
        """y[i] = a * x[i] + y[i] on ``n`` float32 (n multiple of 4, 16-byte aligned)."""
        _check_bulk("axpy", (x, y), 4 * n)
        spec = JobSpec("axpy", -(-4 * n // PAGE_SIZE), [x, y, 4 * n // 16, _f32_bits(a)], warp=True,
                       max_faults=4)
        return self.submit(spec, service)

    def reduce_sum(self, addr, nbytes, service=None):
        """Sum of the uint32 words of [addr, addr+nbytes) modulo 2**64; ``.value`` is an int."""
        _check_bulk("reduce_sum", (addr,), nbytes)
        nlanes = -(-nbytes // PAGE_SIZE)
        spec = JobSpec("reduce", nlanes, [addr, 0, nbytes // 16, Zeros(nlanes)],
                       warp=True, outputs=(3,), max_faults=2)
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


def _groups(drain, policy):
    """The driver calls of one pass: the whole drain, or one per batch (BATCH), or one per
    2 MiB VA block of each batch (BLOCK); each sorted by address."""
    if policy in (REPLAY_BATCH_FLUSH, REPLAY_ONCE) or drain.nbatches == 1 and policy == REPLAY_BATCH:
        return [drain]
    key = drain.batch
    if policy == REPLAY_BLOCK:
        key = key * ((1 << 36) // VA_BLOCK_PAGES) + drain.vpn // VA_BLOCK_PAGES
    order = np.argsort(key, kind="stable")           # stable: each group stays sorted by address
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    return [drain.select(idx) for idx in np.split(order, cuts)]


class _Stall:
    """A service callback that returns without mapping anything would make the same pass come
    back forever: after MAX_STALLED_ROUNDS identical passes in a row the job is cancelled."""

    def __init__(self):
        self.last = None
        self.count = 0

    def check(self, drain, job_id, name):
        key = (drain.vpn, drain.access)
        if self.last is not None and np.array_equal(key[0], self.last[0]) and \
                np.array_equal(key[1], self.last[1]):
            self.count += 1
            if self.count >= MAX_STALLED_ROUNDS:
                a, acc = int(drain.vaddr[0]), int(drain.access[0])
                raise JobFault(_errno.EFAULT, a, acc, int(drain.lane[0]), job_id, name,
                               f"fault at 0x{a:x} ({ACCESS_NAMES[acc]}) still pending after "
                               f"{self.count} replays: the service callback returned without "
                               "mapping the page")
        else:
            self.count = 0
        self.last = key
