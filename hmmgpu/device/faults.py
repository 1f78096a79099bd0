"""The replayable fault buffer and the host's fault-service loop, as NVIDIA's UVM runs them.

It stands for a GPU's replayable fault buffer and uvm_gpu_replayable_faults.c: faulting lanes
append records to a ring in device memory; the host fetches them in batches of
``uvm_perf_fault_batch_count`` (256), drops duplicates, sorts by address and services up to
``uvm_perf_fault_max_batches_per_service`` (20) batches in one pass of the bottom half, then
replays.  A record is four uint64 words: (vaddr, lane, access, job_id), access being
ACCESS_READ, ACCESS_WRITE or ACCESS_ATOMIC.  A fault no driver can service (a misaligned
access, or a page-table entry pointing at memory the device cannot address: on a GPU both
would be a sticky error that kills the context) carries its reason and the access size in the
access word's upper bits (``FATAL_*``, hmm.cuh's HMM_FATAL_*); it is never handed to the driver,
it cancels the job.

The ring is sized for what a slice of lanes can raise (``MAX_FAULTS_PER_LANE`` per lane), and
the host fetches it whenever the next slice could overflow it and after the last one, so its
records are all in the host's fault cache (UVM's ``fault_cache``) before any replay.  A lane
that finds the ring full still stops and is marked faulted; its fault is raised again on
replay (as a GPU re-raises a dropped fault) and the overflow is counted -- which happens only
when one slice alone can raise more than the ring holds, as a real ring of that size would.

Replay policies (``uvm_perf_fault_replay_policy``), as this emulation runs them.  The emulated
device does not run while the host services a pass (its launches have finished before the
host fetches), so every replay issued during a pass resumes its lanes when the pass returns:

* ``REPLAY_BLOCK``: the driver is called once per 2 MiB VA block of each batch, a replay after
  each;
* ``REPLAY_BATCH``: the driver is called once per batch, a replay after each;
* ``REPLAY_BATCH_FLUSH`` (the default): the pass's batches go to the driver in one call (a
  ``FaultDrain``: runs coalesce across batches, one page-table command buffer per pass), then
  the ring -- already drained into the fault cache -- is flushed and one replay issued;
* ``REPLAY_ONCE``: every record in the cache is serviced (one driver call per pass) before a
  single replay.

Only the lanes whose faults were serviced are replayed; a lane whose record still waits in the
cache stays stalled (replayed, it could only raise the same record again), and records in the
cache for pages a pass has just serviced are dropped as duplicates, their lanes replayed.
"""
import errno as _errno

import numpy as np

ACCESS_READ = 0
ACCESS_WRITE = 1
ACCESS_ATOMIC = 2
ACCESS_NAMES = ("read", "write", "atomic")

# a fatal record's access word: access | reason << FATAL_SHIFT | size << SIZE_SHIFT
FATAL_SHIFT = 8
SIZE_SHIFT = 16
FATAL_MISALIGNED = 1
FATAL_BAD_PFN = 2

FAULT_RECORD_WORDS = 4
DEFAULT_FAULT_BATCH = 256               # uvm_perf_fault_batch_count
MAX_BATCHES_PER_SERVICE = 20            # uvm_perf_fault_max_batches_per_service
# A lane of a bulk job touches at most two pages of each of its (at most two) operands and
# records every one that faults; a pointer lane stops at its first fault.
MAX_FAULTS_PER_LANE = 4
DEFAULT_FAULT_BUFFER_ENTRIES = MAX_FAULTS_PER_LANE << 16   # what a default slice (65,536 lanes) raises
MAX_FAULT_BUFFER_ENTRIES = 1 << 22       # 128 MiB of records: the default size never goes past it
VA_BLOCK_PAGES = 512                    # UVM's va_block: 2 MiB

# uvm_perf_fault_replay_policy values (uvm_gpu_replayable_faults.h)
REPLAY_BLOCK = 0
REPLAY_BATCH = 1
REPLAY_BATCH_FLUSH = 2
REPLAY_ONCE = 3
REPLAY_POLICY_NAMES = ("block", "batch", "batch_flush", "once")
DEFAULT_REPLAY_POLICY = REPLAY_BATCH_FLUSH

# The counters of UVM's fault_stats (procfs gpuN/fault_stats), same names.
FAULT_COUNTERS = ("num_read_faults", "num_write_faults", "num_atomic_faults", "num_duplicate_faults",
                  "num_fatal_faults", "num_fault_batches", "num_replays", "num_buffer_overflows")

_U64 = np.uint64


def replay_policy(policy):
    """A policy given as REPLAY_* or its name ("batch_flush", ...) -> REPLAY_*."""
    if isinstance(policy, str):
        name = policy.lower()
        if name not in REPLAY_POLICY_NAMES:
            raise ValueError(f"unknown replay policy {policy!r}: choose one of {', '.join(REPLAY_POLICY_NAMES)}")
        return REPLAY_POLICY_NAMES.index(name)
    p = int(policy)
    if not 0 <= p < len(REPLAY_POLICY_NAMES):
        raise ValueError(f"unknown replay policy {policy!r}: 0..{len(REPLAY_POLICY_NAMES) - 1}")
    return p


class FaultBatch:
    """Deduplicated faults, struct-of-arrays, sorted by address: what ``service(faults)`` gets.

    ``vaddr`` uint64 (the faulting address of one lane; one entry per page), ``access`` uint8
    (ACCESS_*; the strongest access seen on that page), ``lane`` int64 (the first lane that
    faulted there with that access), ``job`` int64.  ``vpn`` gives the pages.
    """

    def __init__(self, vaddr, access, lane, job):
        self.vaddr = np.asarray(vaddr, dtype=np.uint64)
        self.access = np.asarray(access, dtype=np.uint8)
        self.lane = np.asarray(lane, dtype=np.int64)
        self.job = np.asarray(job, dtype=np.int64)

    def __len__(self):
        return int(self.vaddr.size)

    @property
    def vpn(self):
        return (self.vaddr >> _U64(12)).astype(np.int64)

    @property
    def write(self):
        return self.access != ACCESS_READ

    def __repr__(self):
        return f"{type(self).__name__}({len(self)} faults)"


class FaultDrain(FaultBatch):
    """Every batch of one service pass in one FaultBatch: one entry per page over the whole
    pass (duplicates across batches merged, the strongest access kept), sorted by address.

    ``batch`` (int64) is the batch, counted from 0 within the pass, whose record the entry
    keeps; ``nbatches`` and ``nrecords`` say how much of the buffer the pass took.  A driver
    that services a whole drain at once answers it with one page-table command buffer.
    """

    def __init__(self, vaddr, access, lane, job, batch, nbatches, nrecords):
        super().__init__(vaddr, access, lane, job)
        self.batch = np.asarray(batch, dtype=np.int64)
        self.nbatches = int(nbatches)
        self.nrecords = int(nrecords)

    def select(self, mask):
        """The entries where ``mask`` holds, as a FaultDrain of the same pass."""
        return FaultDrain(self.vaddr[mask], self.access[mask], self.lane[mask], self.job[mask],
                          self.batch[mask], self.nbatches, self.nrecords)


def coalesce(records, batch_size=DEFAULT_FAULT_BATCH):
    """The FaultDrain of raw records (n, 4) taken by one pass: one vectorised pass.

    A record is a duplicate when its page has another record in the pass with an access at
    least as strong (the kept one is the strongest, then the earliest in the ring).  Returns
    (FaultDrain, number of duplicates).
    """
    n = len(records)
    vpn = (records[:, 0] >> _U64(12)).astype(np.int64)
    acc = records[:, 2].astype(np.int64)
    if n < 2 or ((vpn[1:] > vpn[:-1]).all()):
        keep = np.arange(n)                          # a streaming job: sorted and unique already
    else:
        order = np.lexsort((np.arange(n), -acc, vpn))    # page, strongest, earliest
        vs = vpn[order]
        head = np.ones(n, bool)
        head[1:] = vs[1:] != vs[:-1]
        keep = order[head]
    r = records[keep]
    drain = FaultDrain(r[:, 0], r[:, 2], r[:, 1].astype(np.int64), r[:, 3].astype(np.int64),
                       keep // batch_size, -(-n // batch_size), n)
    return drain, n - keep.size


class JobFault(OSError):
    """A device job was cancelled because the driver could not service one of its faults."""

    def __init__(self, err, address, access, lane, job, name, reason=""):
        why = f": {reason}" if reason else ""
        super().__init__(err, f"device job '{name}' #{job} cancelled: fatal {ACCESS_NAMES[access]} fault "
                              f"at 0x{address:x} (lane {lane}){why}")
        self.address = int(address)
        self.access = int(access)
        self.lane = int(lane)
        self.job = int(job)


def fatal_word(access, reason, size):
    """The access word of a fatal fault record (hmm.cuh's hmm_fatal)."""
    return np.uint64(int(access) | (int(reason) << FATAL_SHIFT) | (int(size) << SIZE_SHIFT))


def fatal_reason(word):
    """Why a fatal record's access could not be made, from its access word."""
    word = int(word)
    reason, size = (word >> FATAL_SHIFT) & 0xFF, (word >> SIZE_SHIFT) & 0xFF
    if reason == FATAL_MISALIGNED:
        return f"misaligned {size}-byte access (accesses must be naturally aligned)"
    if reason == FATAL_BAD_PFN:
        return ("its device page-table entry points outside system RAM, the device's memory and its "
                "enabled peers' memory")
    return f"unknown fatal fault reason {reason}"


class FaultBuffer:
    """The host's side of the fault buffer: the ring's hardware, the fault cache the host
    fetches it into, the passes the service loop takes from it, and UVM's counters.

    ``capacity`` ring entries, ``batch_size`` records per batch, ``max_batches`` batches per
    pass, ``policy`` a REPLAY_* value (see the module docstring).
    """

    def __init__(self, hw, capacity=DEFAULT_FAULT_BUFFER_ENTRIES, batch_size=DEFAULT_FAULT_BATCH,
                 counters=None, *, max_batches=MAX_BATCHES_PER_SERVICE, policy=DEFAULT_REPLAY_POLICY):
        if capacity < 1 or batch_size < 1 or max_batches < 1:
            raise ValueError("fault buffer: capacity, batch size and batches per service must be at least 1")
        self.hw = hw
        self.capacity = int(capacity)
        self.batch_size = int(batch_size)
        self.max_batches = int(max_batches)
        self.policy = replay_policy(policy)
        self.counters = counters if counters is not None else dict.fromkeys(FAULT_COUNTERS, 0)
        self._cache = np.zeros((0, FAULT_RECORD_WORDS), np.uint64)   # fetched, not yet serviced
        self.fatal = self._cache                     # fetched fatal records: they cancel the job
        self.fetches = 0

    @property
    def npending(self):
        """Records fetched from the ring and not yet taken by a pass."""
        return len(self._cache)

    def fetch(self):
        """Move every record in the ring into the fault cache (one read of the ring and its put
        counter); returns how many records the ring dropped for lack of room."""
        records, put = self.hw.drain()
        self.fetches += 1
        lost = max(0, int(put) - self.capacity)
        c = self.counters
        c["num_buffer_overflows"] += lost
        if len(records):
            fatal = (records[:, 2] >> _U64(FATAL_SHIFT)) != 0
            if fatal.any():                          # never serviced: kept apart
                self.fatal = np.concatenate((self.fatal, records[fatal]))
                records = records[~fatal]
            kinds = np.bincount(records[:, 2].astype(np.int64), minlength=3)
            c["num_read_faults"] += int(kinds[ACCESS_READ])
            c["num_write_faults"] += int(kinds[ACCESS_WRITE])
            c["num_atomic_faults"] += int(kinds[ACCESS_ATOMIC])
            self._cache = records if not len(self._cache) else np.concatenate((self._cache, records))
        return lost

    def take(self, nbatches):
        """Remove the oldest ``nbatches`` batches of records from the cache (a pass's fetches)."""
        n = min(len(self._cache), nbatches * self.batch_size)
        out, self._cache = self._cache[:n], self._cache[n:]
        self.counters["num_fault_batches"] += -(-n // self.batch_size)
        return out

    def waiting_lanes(self, lo, hi):
        """The lanes in [lo, hi] whose records still wait in the cache."""
        col = self._cache[:, 1]
        return col[(col >= _U64(lo)) & (col <= _U64(hi))].astype(np.int64)

    def drop_covered(self, drain):
        """Drop the cached records that ``drain`` serviced already (same page, access no
        stronger): they are duplicates, and their lanes can replay.  Returns their lanes."""
        c = self._cache
        if not len(c) or not len(drain):
            return np.zeros(0, np.int64)
        dv = drain.vpn
        va = c[:, 0]
        near = (va >= _U64(int(dv[0]) << 12)) & (va < _U64((int(dv[-1]) + 1) << 12))
        if not near.any():                            # a streaming job's later records: none near
            return np.zeros(0, np.int64)
        i = np.flatnonzero(near)
        vpn = (va[i] >> _U64(12)).astype(np.int64)
        pos = np.minimum(np.searchsorted(dv, vpn), dv.size - 1)
        hit = (dv[pos] == vpn) & (c[i, 2].astype(np.int64) <= drain.access[pos])
        if not hit.any():
            return np.zeros(0, np.int64)
        gone = i[hit]
        lanes = c[gone, 1].astype(np.int64)
        keep = np.ones(len(c), bool)
        keep[gone] = False
        self._cache = c[keep]
        self.counters["num_duplicate_faults"] += int(gone.size)
        return lanes

    def reset(self):
        """Empty the ring and the cache (a cancelled job leaves nothing for the next one)."""
        self.hw.drain()
        self._cache = self._cache[:0]
        self.fatal = self.fatal[:0]


def fatal_errno(result, n):
    """Normalise a service callback's answer to an int errno array (0: serviced)."""
    if result is None:
        return np.zeros(n, np.int64)
    r = np.asarray(result)
    if r.dtype == bool:
        return np.where(r, _errno.EFAULT, 0).astype(np.int64)
    return r.astype(np.int64)
