"""Access counters: uvm_gpu_access_counters.c, and the counting hardware it programs.

A GPU from Volta on counts its accesses to memory that is not its own (system memory or a peer
GPU's, mapped remotely) per 2 MiB region of virtual address space (UVM_ACCESS_COUNTER_GRANULARITY_2M).
When a region's counter reaches ``uvm_perf_access_counter_threshold`` (256) the GPU writes a
notification (the region, the counter value, and a 32-bit mask of which 64 KiB sub-regions were
touched) to its notification buffer and the counter restarts.  UVM fetches notifications in
batches of ``uvm_perf_access_counter_batch_count`` (256) and, when
``uvm_perf_access_counter_migration_enable`` allows (default -1: only on ATS systems, so off on a
PCIe x86 machine; 1 forces it on), migrates the touched sub-regions' pages to the GPU
(expand_notification_block): the pages resident on the processor closest to the GPU that holds
the notified address, minus those already on the GPU; a notification for a block the GPU does not
map is stale and dropped.  Current nvidia-uvm skips virtual-address notifications on 4 KiB-page
kernels and for HMM blocks (bugs 4299018 and 4309292); the emulation services them, as the
design these figures come from describes.

``AccessCounterUnit`` is the hardware side (vectorised counting per region); the policy hook is
``AccessCounterPolicy.on_notifications`` (what to migrate for a batch of notifications).
"""
import numpy as np

from .policy import Knob, Policy
from .va_block import PAGES_PER_UVM_VA_BLOCK, UVM_ID_INVALID, UVM_PROT_NONE, UVM_VA_BLOCK_SHIFT

UVM_ACCESS_COUNTER_GRANULARITY = 2 << 20
UVM_SUB_GRANULARITY_REGIONS = 32
SUB_REGION_PAGES = PAGES_PER_UVM_VA_BLOCK // UVM_SUB_GRANULARITY_REGIONS     # 64 KiB

# Module parameters of uvm_gpu_access_counters.c, with nvidia-uvm's defaults.
uvm_perf_access_counter_migration_enable = -1   # <= -1: default policy (on only with ATS), 0 off, >= 1 on
uvm_perf_access_counter_batch_count = 256       # notifications fetched and serviced per batch
uvm_perf_access_counter_threshold = 256         # remote accesses to a region that raise a notification


class Notifications:
    """A batch of access-counter notifications, struct-of-arrays: ``address`` (the 2 MiB region's
    base), ``sub_granularity`` (uint32, bit i = 64 KiB sub-region i touched), ``counter_value``."""

    def __init__(self, address, sub_granularity, counter_value):
        self.address = np.asarray(address, np.int64)
        self.sub_granularity = np.asarray(sub_granularity, np.uint32)
        self.counter_value = np.asarray(counter_value, np.int64)

    def __len__(self):
        return int(self.address.size)

    def __getitem__(self, sl):
        return Notifications(self.address[sl], self.sub_granularity[sl], self.counter_value[sl])

    def __repr__(self):
        return f"Notifications({len(self)})"


class AccessCounterUnit:
    """One GPU's counters and notification buffer (the hardware UVM programs with a threshold)."""

    def __init__(self, threshold=uvm_perf_access_counter_threshold):
        if not 1 <= int(threshold) <= (1 << 16) - 1:
            raise ValueError(f"access counter threshold {threshold} is outside [1, 65535]")
        self.threshold = int(threshold)
        self.regions = np.zeros(0, np.int64)        # 2 MiB region numbers with a live counter, sorted
        self.count = np.zeros(0, np.int64)
        self.sub = np.zeros(0, np.uint32)
        self._pending = []                          # notification batches in arrival order
        self.num_notifications = 0

    def record(self, vaddrs, counts=None):
        """Count remote accesses: one per address, or ``counts[i]`` at ``vaddrs[i]``.  Regions that
        reach the threshold raise a notification (in region order) and start over."""
        v = np.asarray(vaddrs, np.int64).ravel()
        c = np.ones(v.size, np.int64) if counts is None else np.asarray(counts, np.int64).ravel()
        if v.size == 0:
            return 0
        reg = v >> UVM_VA_BLOCK_SHIFT
        bit = (np.uint32(1) << ((v >> 16) & (UVM_SUB_GRANULARITY_REGIONS - 1)).astype(np.uint32))
        u, inv = np.unique(reg, return_inverse=True)
        add = np.bincount(inv, weights=c, minlength=u.size).astype(np.int64)
        sub = np.zeros(u.size, np.uint32)
        np.bitwise_or.at(sub, inv, bit)
        pos = np.searchsorted(self.regions, u)
        if self.regions.size:
            have = (pos < self.regions.size) & (self.regions[np.minimum(pos, self.regions.size - 1)] == u)
        else:
            have = np.zeros(u.size, bool)
        new = u[~have]
        if new.size:
            at = np.searchsorted(self.regions, new)
            self.regions = np.insert(self.regions, at, new)
            self.count = np.insert(self.count, at, 0)
            self.sub = np.insert(self.sub, at, np.uint32(0))
            pos = np.searchsorted(self.regions, u)
        self.count[pos] += add
        self.sub[pos] |= sub
        hit = pos[self.count[pos] >= self.threshold]
        if hit.size:
            self._pending.append(Notifications(self.regions[hit] << UVM_VA_BLOCK_SHIFT, self.sub[hit], self.count[hit]))
            self.num_notifications += int(hit.size)
            self.count[hit] = 0
            self.sub[hit] = 0
        return int(hit.size)

    def pending(self):
        return sum(len(b) for b in self._pending)

    def fetch(self, batch_count=uvm_perf_access_counter_batch_count):
        """fetch_access_counter_buffer_entries: up to ``batch_count`` notifications, oldest first,
        sorted by address as preprocess_notifications does."""
        if not self._pending:
            return Notifications(np.zeros(0), np.zeros(0), np.zeros(0))
        allb = Notifications(np.concatenate([b.address for b in self._pending]),
                             np.concatenate([b.sub_granularity for b in self._pending]),
                             np.concatenate([b.counter_value for b in self._pending]))
        take, rest = allb[:batch_count], allb[batch_count:]
        self._pending = [rest] if len(rest) else []
        order = np.argsort(take.address, kind="stable")
        return take[order]

    def clear_all(self):
        """uvm_api_clear_all_access_counters."""
        self.count[:] = 0
        self.sub[:] = 0
        self._pending = []


class AccessCounterPolicy(Policy):
    """Hook: ``on_notifications(notes, blocks, gpu)`` returns (rows, masks): the pages of each VA
    block to migrate to processor ``gpu``; the driver applies thrashing hints and migrates."""
    name = "access_counters"

    def on_notifications(self, notes, blocks, gpu, now_ns=0):
        raise NotImplementedError


class UvmAccessCounters(AccessCounterPolicy):
    """service_notifications / expand_notification_block (the default).  ``ats`` says whether the
    machine has ATS, which decides migrations under the default -1."""
    name = "uvm"
    KNOBS = {
        "uvm_perf_access_counter_migration_enable": Knob(uvm_perf_access_counter_migration_enable, None, None,
                                                         "uvm_gpu_access_counters.c"),
        "uvm_perf_access_counter_batch_count": Knob(uvm_perf_access_counter_batch_count, 1, None,
                                                    "uvm_gpu_access_counters.c"),
        "uvm_perf_access_counter_threshold": Knob(uvm_perf_access_counter_threshold, 1, (1 << 16) - 1,
                                                  "uvm_gpu_access_counters.c"),
    }

    def __init__(self, ats=False, **knobs):
        super().__init__(**knobs)
        self.ats = bool(ats)
        self.num_notifications = 0

    @property
    def migration_enabled(self):
        """is_migration_enabled."""
        v = self.uvm_perf_access_counter_migration_enable
        return v > 0 or (v < 0 and self.ats)

    def new_unit(self):
        """The hardware counters of one GPU, programmed with this policy's threshold."""
        return AccessCounterUnit(self.uvm_perf_access_counter_threshold)

    def on_notifications(self, notes, blocks, gpu, now_ns=0):
        self.num_notifications += len(notes)
        empty = (np.zeros(0, np.int64), np.zeros((0, PAGES_PER_UVM_VA_BLOCK), bool))
        if not self.migration_enabled or len(notes) == 0:
            return empty
        rows = blocks.rows_of_blocks(notes.address >> UVM_VA_BLOCK_SHIFT, create=False)
        ok = rows >= 0
        # a block the GPU does not map: the notification is stale (pages moved, range freed)
        ok[ok] = (blocks.prot[gpu, rows[ok]] > UVM_PROT_NONE).any(axis=1)
        rows, notes = rows[ok], notes[np.flatnonzero(ok)]
        if rows.size == 0:
            return empty
        page = (notes.address >> 12) & (PAGES_PER_UVM_VA_BLOCK - 1)
        closest = blocks.closest_resident_pages(rows, page, gpu)
        keep = (closest != UVM_ID_INVALID) & (closest != gpu)
        rows, notes, closest = rows[keep], notes[np.flatnonzero(keep)], closest[keep]
        bits = ((notes.sub_granularity[:, None] >> np.arange(UVM_SUB_GRANULARITY_REGIONS, dtype=np.uint32)) & 1) == 1
        accessed = np.repeat(bits, SUB_REGION_PAGES, axis=1)
        on_src = blocks.resident[closest, rows]
        accessed &= on_src & ~blocks.resident[gpu, rows]
        # several notifications for one block merge into one mask (service_notifications_in_block)
        u, inv = np.unique(rows, return_inverse=True)
        masks = np.zeros((u.size, PAGES_PER_UVM_VA_BLOCK), bool)
        np.logical_or.at(masks, inv, accessed)
        keep = masks.any(axis=1)
        return u[keep], masks[keep]


POLICIES = {cls.name: cls for cls in (UvmAccessCounters,)}
