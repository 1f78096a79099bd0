"""The replayable fault buffer: where device lanes report translation misses.

It stands for NVIDIA's replayable fault buffer as UVM drives it (uvm_gpu_replayable_faults.c):
the device appends records to a ring in its own memory, the host fetches them in batches
(256 by default), drops duplicates, sorts by address, services the rest and tells the device to replay.

A record is four uint64 words: (vaddr, lane, access, job_id), access being ACCESS_READ,
ACCESS_WRITE or ACCESS_ATOMIC.  A fault no driver can service (a misaligned access, or a
page-table entry pointing outside memory: on a GPU both would be a sticky error that kills the
context) carries its reason and the access size in the access word's upper bits (``FATAL_*``,
hmm.cuh's HMM_FATAL_*); it is never handed to the driver, it cancels the job.

A lane that finds the buffer full still stops and is marked
faulted; its fault is simply raised again on replay (as a GPU re-raises a dropped fault), and
the overflow is counted.
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
DEFAULT_FAULT_BUFFER_ENTRIES = 256      # UVM's default fault batch size
DEFAULT_FAULT_BATCH = 256

# The counters of UVM's fault_stats (procfs gpuN/fault_stats), same names.
FAULT_COUNTERS = ("num_read_faults", "num_write_faults", "num_atomic_faults", "num_duplicate_faults",
                  "num_fatal_faults", "num_fault_batches", "num_replays", "num_buffer_overflows")


class FaultBatch:
    """One batch of deduplicated faults, struct-of-arrays (what ``service(faults)`` receives).

    ``vaddr`` uint64 (the faulting address of one lane; one entry per page), ``access`` uint8
    (ACCESS_*; the strongest access seen on that page in the batch), ``lane`` int64 (the first
    lane that faulted there), ``job`` int64.  ``vpn`` gives the pages.
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
        return (self.vaddr >> np.uint64(12)).astype(np.int64)

    @property
    def write(self):
        return self.access != ACCESS_READ

    def __repr__(self):
        return f"FaultBatch({len(self)} faults)"


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
        return "its device page-table entry points outside system RAM and the device's memory"
    return f"unknown fatal fault reason {reason}"


def dedupe_batches(records, batch_size):
    """Split raw records (n, 4) into fetch batches of ``batch_size`` and drop duplicates.

    A record is a duplicate when its page appears in the same batch with an access at least as
    strong (the kept one is the strongest, then the earliest), or was already kept in an earlier
    batch of the same drain with an access at least as strong: a read fault on a page whose
    write fault was just serviced needs nothing more.  Each batch is sorted by address, as UVM
    sorts a batch.  One vectorised pass over the whole drain.  Returns (list of FaultBatch,
    number of duplicates).
    """
    n = len(records)
    if n == 0:
        return [], 0
    idx = np.arange(n)
    vpn = (records[:, 0] >> np.uint64(12)).astype(np.int64)
    acc = records[:, 2].astype(np.int64)
    b = idx // batch_size
    order = np.lexsort((idx, -acc, b, vpn))            # page, batch, strongest, earliest
    vs, bs = vpn[order], b[order]
    head = np.ones(n, bool)
    head[1:] = (vs[1:] != vs[:-1]) | (bs[1:] != bs[:-1])
    rep = order[head]                                  # one record per (page, batch)
    m, rv = acc[rep], vpn[rep]
    first = np.ones(rep.size, bool)
    first[1:] = rv[1:] != rv[:-1]
    seg = np.cumsum(first) - 1
    upto = np.maximum.accumulate(seg * 4 + m) - seg * 4  # strongest access so far, per page
    before = np.empty_like(upto)
    before[1:] = upto[:-1]
    before[first] = -1
    keep = rep[m > before]
    kb = b[keep]
    o = np.lexsort((vpn[keep], kb))
    keep, kb = keep[o], kb[o]
    cuts = np.flatnonzero(np.diff(kb)) + 1
    batches = [FaultBatch(records[k, 0], records[k, 2], records[k, 1].astype(np.int64),
                          records[k, 3].astype(np.int64)) for k in np.split(keep, cuts)]
    return batches, n - keep.size


class FaultBuffer:
    """The host's side of the fault buffer: drain the device ring, split into batches, dedupe."""

    def __init__(self, hw, capacity=DEFAULT_FAULT_BUFFER_ENTRIES, batch_size=DEFAULT_FAULT_BATCH,
                 counters=None):
        if capacity < 1 or batch_size < 1:
            raise ValueError("fault buffer: capacity and batch size must be at least 1")
        self.hw = hw
        self.capacity = int(capacity)
        self.batch_size = int(batch_size)
        self.counters = counters if counters is not None else dict.fromkeys(FAULT_COUNTERS, 0)
        self.last_put = 0
        self.last_fatal = np.zeros((0, FAULT_RECORD_WORDS), np.uint64)

    def drain(self):
        """Fetch every recorded fault; returns (list of FaultBatch, overflowed lanes).  Fatal
        records (see the module docstring) are kept apart in ``last_fatal``."""
        records, put = self.hw.drain()
        self.last_put = int(put)          # every faulting lane counts here, recorded or not
        fatal = (records[:, 2] >> np.uint64(FATAL_SHIFT)) != 0 if len(records) else np.zeros(0, bool)
        self.last_fatal = records[fatal]
        if fatal.any():
            records = records[~fatal]
        overflow = max(0, int(put) - self.capacity)
        c = self.counters
        c["num_buffer_overflows"] += overflow
        if len(records):
            kinds = np.bincount(records[:, 2].astype(np.int64), minlength=3)
            c["num_read_faults"] += int(kinds[ACCESS_READ])
            c["num_write_faults"] += int(kinds[ACCESS_WRITE])
            c["num_atomic_faults"] += int(kinds[ACCESS_ATOMIC])
        batches, dups = dedupe_batches(records, self.batch_size)
        c["num_duplicate_faults"] += dups
        c["num_fault_batches"] += -(-len(records) // self.batch_size)
        return batches, overflow


def fatal_errno(result, n):
    """Normalise a service callback's answer to an int errno array (0: serviced)."""
    if result is None:
        return np.zeros(n, np.int64)
    r = np.asarray(result)
    if r.dtype == bool:
        return np.where(r, _errno.EFAULT, 0).astype(np.int64)
    return r.astype(np.int64)
