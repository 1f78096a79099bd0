"""The replayable fault buffer: where device lanes report translation misses.

It stands for NVIDIA's replayable fault buffer as UVM drives it (uvm_gpu_replayable_faults.c):
the device appends records to a ring in its own memory, the host fetches them in batches
(256 by default), drops duplicates, sorts by address, services the rest and tells the device to replay.

A record is four uint64 words: (vaddr, lane, access, job_id), access being ACCESS_READ,
ACCESS_WRITE or ACCESS_ATOMIC.  A lane that finds the buffer full still stops and is marked
faulted; its fault is simply raised again on replay (as a GPU re-raises a dropped fault), and
the overflow is counted.
"""
import errno as _errno

import numpy as np

ACCESS_READ = 0
ACCESS_WRITE = 1
ACCESS_ATOMIC = 2
ACCESS_NAMES = ("read", "write", "atomic")

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


def dedupe(records, seen_vpn=None, seen_access=None):
    """One FaultBatch from raw records (n, 4); drops duplicates within it and against ``seen``.

    Returns (batch, number of duplicates).  A fault is a duplicate when its page appears earlier
    in the batch, or was serviced earlier in the same drain, with an access at least as strong.
    """
    n = len(records)
    if n == 0:
        return FaultBatch([], [], [], []), 0
    vaddr = records[:, 0]
    vpn = (vaddr >> np.uint64(12)).astype(np.int64)
    access = records[:, 2].astype(np.int64)
    # per page: strongest access, then earliest record
    order = np.lexsort((np.arange(n), -access, vpn))
    vs = vpn[order]
    head = np.concatenate(([True], vs[1:] != vs[:-1]))
    keep = order[head]
    if seen_vpn is not None and seen_vpn.size:
        pos = np.searchsorted(seen_vpn, vpn[keep])
        posc = np.minimum(pos, seen_vpn.size - 1)
        covered = (seen_vpn[posc] == vpn[keep]) & (seen_access[posc] >= access[keep])
        keep = keep[~covered]
    keep = keep[np.argsort(vpn[keep], kind="stable")]   # by address, as UVM sorts a batch
    batch = FaultBatch(vaddr[keep], access[keep], records[keep, 1].astype(np.int64),
                       records[keep, 3].astype(np.int64))
    return batch, n - keep.size


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

    def drain(self):
        """Fetch every recorded fault; returns (list of FaultBatch, overflowed lanes)."""
        records, put = self.hw.drain()
        self.last_put = int(put)          # every faulting lane counts here, recorded or not
        overflow = max(0, int(put) - self.capacity)
        c = self.counters
        c["num_buffer_overflows"] += overflow
        if len(records):
            kinds = np.bincount(records[:, 2].astype(np.int64), minlength=3)
            c["num_read_faults"] += int(kinds[ACCESS_READ])
            c["num_write_faults"] += int(kinds[ACCESS_WRITE])
            c["num_atomic_faults"] += int(kinds[ACCESS_ATOMIC])
        batches = []
        seen_vpn = np.zeros(0, np.int64)
        seen_acc = np.zeros(0, np.int64)
        for lo in range(0, len(records), self.batch_size):   # one iteration per batch of 256
            batch, dups = dedupe(records[lo:lo + self.batch_size], seen_vpn, seen_acc)
            c["num_duplicate_faults"] += dups
            c["num_fault_batches"] += 1
            if len(batch):
                batches.append(batch)
                v = np.concatenate((seen_vpn, batch.vpn))
                a = np.concatenate((seen_acc, batch.access.astype(np.int64)))
                o = np.lexsort((-a, v))
                v, a = v[o], a[o]
                h = np.concatenate(([True], v[1:] != v[:-1]))
                seen_vpn, seen_acc = v[h], a[h]
        return batches, overflow


def fatal_errno(result, n):
    """Normalise a service callback's answer to an int errno array (0: serviced)."""
    if result is None:
        return np.zeros(n, np.int64)
    r = np.asarray(result)
    if r.dtype == bool:
        return np.where(r, _errno.EFAULT, 0).astype(np.int64)
    return r.astype(np.int64)
