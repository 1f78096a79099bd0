"""The device page table: a 4-level radix tree in device memory that the device's MMU walks.

It stands for a GPU's own page tables (NVIDIA's GMMU, AMD's VM page tables) as the HMM
documentation describes them (Documentation/mm/hmm.rst, section 4): the driver never writes
entries with the CPU; it queues update commands that the device executes on its own queue, and
an update is done only when the device says so (the fence).

Geometry (x86-64-like, 48-bit virtual addresses): vpn = vaddr >> 12 has 36 bits, split into four
9-bit indices; level 0 is the root (node 0), level 3 holds the 4 KiB leaves.  All nodes live in
one pool ``nodes`` of shape (capacity, 512) uint64 on the device (a NumPy array on the fallback).

Entry encoding (uint64)::

    bits 63..12  pfn (leaf) or node index (directory entry)
    bit 0  PTE_VALID      the entry points somewhere
    bit 1  PTE_WRITE      stores allowed (leaf)
    bit 2  PTE_DIRTY      set by the device's walker on a successful write/atomic translation
    bit 3  PTE_ACCESSED   set by the device's walker on any successful translation
    bit 4  PTE_ATOMIC     atomics allowed (device-exclusive access granted by the driver)
    0 == no entry

Directory nodes are allocated by the host (as UVM allocates page directories host-side and
asks the copy engine to write the PDEs): the host keeps a shadow of *which* tables exist, in
sorted arrays per level, never of the leaves.  Empty tables are kept after an unmap, as most
GPU drivers do, so a later map of the same range needs no allocation.

Command buffer: records of four uint64 words ``(op | count << 8, target, value, first)``;
one device thread per affected entry finds its command by binary search over ``first`` (the
running sum of counts), so a run of a million contiguous pages is one 32-byte command.

    PT_OP_LINK   target = node * 512 + slot, value = child << 12 | VALID     (count 1)
    PT_OP_MAP    leaf(target + k) = value + (k << 12)       (a run of consecutive pfns)
    PT_OP_UNMAP  leaf(target + k) = 0
    PT_OP_CLEAR  leaf(target + k) &= ~value   where VALID (protect / downgrade, clear A/D)
    PT_OP_SET    leaf(target + k) |= value    where VALID
"""
import collections
import threading

import numpy as np

from ._trace import span

PTE_VALID = 0x1
PTE_WRITE = 0x2
PTE_DIRTY = 0x4
PTE_ACCESSED = 0x8
PTE_ATOMIC = 0x10
PTE_FLAGS_MASK = 0xFFF
PTE_PFN_SHIFT = 12

PT_LEVELS = 4
PT_BITS = 9
PT_ENTRIES = 1 << PT_BITS
VPN_BITS = PT_LEVELS * PT_BITS          # 36: 48-bit virtual addresses

PT_OP_LINK = 1
PT_OP_MAP = 2
PT_OP_UNMAP = 3
PT_OP_CLEAR = 4
PT_OP_SET = 5

_U64 = np.uint64


def pte_pfn(entries):
    """pfns of leaf entries (NumPy array)."""
    return (np.asarray(entries, dtype=np.uint64) >> _U64(PTE_PFN_SHIFT)).astype(np.int64)


def make_commands(op, targets, counts, values):
    """Pack command records (n, 4) uint64; ``first`` is the running sum of counts."""
    n = len(targets)
    if n == 1:          # one run (the common small update): no array arithmetic
        return np.array([[op | (int(counts[0]) << 8), int(targets[0]), int(values[0]), 0]], dtype=np.uint64)
    cmds = np.empty((n, 4), dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.uint64)
    cmds[:, 0] = _U64(op) | (counts << _U64(8))
    cmds[:, 1] = np.asarray(targets, dtype=np.uint64)
    cmds[:, 2] = np.asarray(values, dtype=np.uint64)
    first = np.cumsum(counts, dtype=np.uint64) - counts
    cmds[:, 3] = first
    return cmds


_ONE_RUN = (np.zeros(1, np.int64), np.ones(1, np.int64))
_SMALL = 16         # arrays up to this size are checked with Python integers


def _bounds(a):
    """(min, max) of a non-empty int64 array."""
    if a.size <= _SMALL:
        lst = a.tolist()
        return min(lst), max(lst)
    return int(a.min()), int(a.max())


def _runs(*arrays):
    """Start positions and lengths of runs where every array steps by exactly +1."""
    n = len(arrays[0])
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if n == 1:
        return _ONE_RUN
    cont = np.ones(n - 1, dtype=bool)
    for a in arrays:
        a = np.asarray(a, dtype=np.int64)
        cont &= np.diff(a) == 1
    starts = np.flatnonzero(np.concatenate(([True], ~cont)))
    lengths = np.diff(np.concatenate((starts, [n])))
    return starts, lengths


def _strictly_increasing(a):
    if a.size <= _SMALL:
        lst = a.tolist()
        return all(x < y for x, y in zip(lst, lst[1:]))
    return bool((a[1:] > a[:-1]).all())


class DevicePageTable:
    """The device's page table; every update goes through a command buffer.

    ``hw`` is the backend's page-table hardware (``alloc``/``grow``/``execute``/``lookup``/
    ``fence``); ``lock`` serialises submissions with job slices on the same device queue.
    """

    def __init__(self, hw, *, nr_ram, pfn_base, nframes, lock=None, initial_nodes=64,
                 inflight=None, track="device"):
        self.hw = hw
        self.track = track                         # the trace track of this device
        self.lock = lock or threading.RLock()
        self.nr_ram = int(nr_ram)
        self.pfn_base = int(pfn_base)
        self.nframes = int(nframes)
        self.capacity = max(int(initial_nodes), 4)
        self.nodes = hw.alloc(self.capacity)
        self.nr_nodes = 1                          # node 0 is the root
        # Shadow of the directory: for levels 1..3, sorted vpn prefixes and their node ids.
        self._keys = [None] + [np.zeros(0, np.int64) for _ in range(PT_LEVELS - 1)]
        self._ids = [None] + [np.zeros(0, np.int64) for _ in range(PT_LEVELS - 1)]
        self._retired = []                         # old pools kept until the next fence wait
        self._inflight = inflight if inflight is not None else collections.deque()
        self.stats = {"pt_commands": 0, "pt_entries_updated": 0, "pt_links": 0,
                      "pt_submissions": 0, "pt_invalidations": 0, "pt_nodes": 1}
        # map_check(vpns, pfns): a driver's debug check run before every map (it may raise);
        # hmmgpu.hmm.debug.check_device_mappings sets the notifier-sequence check
        self.map_check = None

    # -- the host side of the directory ------------------------------------------------------
    def _check_vpns(self, vpns):
        vpns = np.asarray(vpns, dtype=np.int64).reshape(-1)
        if not vpns.size:
            return vpns
        lo, hi = _bounds(vpns)
        if lo < 0 or hi >> VPN_BITS:
            bad = int(vpns[(vpns < 0) | (vpns >> VPN_BITS != 0)][0])
            raise ValueError(f"device page table: vpn 0x{bad:x} (address 0x{bad << 12:x}) is outside "
                             f"the device's {VPN_BITS + 12}-bit virtual address space")
        return vpns

    def _check_pfns(self, pfns):
        pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
        if not pfns.size:
            return pfns
        lo, hi = _bounds(pfns)
        if (0 <= lo and hi < self.nr_ram) or (self.pfn_base <= lo and hi < self.pfn_base + self.nframes):
            return pfns                            # all RAM, or all this device's memory
        ok = ((pfns >= 0) & (pfns < self.nr_ram)) | (
            (pfns >= self.pfn_base) & (pfns < self.pfn_base + self.nframes))
        if not ok.all():
            bad = int(pfns[~ok][0])
            raise ValueError(f"device page table: pfn 0x{bad:x} is neither system RAM [0, 0x{self.nr_ram:x}) "
                             f"nor this device's memory [0x{self.pfn_base:x}, "
                             f"0x{self.pfn_base + self.nframes:x})")
        return pfns

    def _ensure_tables(self, vpns_sorted):
        """Allocate the missing directory nodes for ``vpns_sorted``; returns LINK commands."""
        # the usual case first: every leaf table exists already (then so do their parents)
        have = self._keys[PT_LEVELS - 1]
        if have.size:
            keys = vpns_sorted >> PT_BITS
            pos = have.searchsorted(keys)             # nondecreasing: keys are sorted
            if pos[-1] < have.size and not np.count_nonzero(have[pos] != keys):
                return None
        links_t, links_v = [], []
        for level in range(1, PT_LEVELS):
            shift = PT_BITS * (PT_LEVELS - level)
            keys = vpns_sorted >> shift
            keys = keys[np.concatenate(([True], np.diff(keys) != 0))] if keys.size else keys
            have = self._keys[level]
            pos = np.searchsorted(have, keys)
            found = (pos < have.size) & (have[np.minimum(pos, max(have.size - 1, 0))] == keys) \
                if have.size else np.zeros(keys.size, bool)
            missing = keys[~found]
            if missing.size == 0:
                continue
            ids = np.arange(self.nr_nodes, self.nr_nodes + missing.size, dtype=np.int64)
            self.nr_nodes += missing.size
            if level == 1:
                parents = np.zeros(missing.size, np.int64)
            else:
                pk, pi = self._keys[level - 1], self._ids[level - 1]
                parents = pi[np.searchsorted(pk, missing >> PT_BITS)]
            links_t.append(parents * PT_ENTRIES + (missing & (PT_ENTRIES - 1)))
            links_v.append((ids << PTE_PFN_SHIFT) | PTE_VALID)
            merged = np.concatenate((have, missing))
            order = np.argsort(merged, kind="stable")
            self._keys[level] = merged[order]
            self._ids[level] = np.concatenate((self._ids[level], ids))[order]
        if self.nr_nodes > self.capacity:
            cap = self.capacity
            while cap < self.nr_nodes:
                cap *= 2
            old = self.nodes
            self.nodes = self.hw.grow(old, cap)     # a copy queued on the device's stream
            self._retired.append(old)               # a queued slice may still walk the old pool
            self.capacity = cap
        self.stats["pt_nodes"] = self.nr_nodes
        if not links_t:
            return None
        t = np.concatenate(links_t)
        self.stats["pt_links"] += int(t.size)
        return make_commands(PT_OP_LINK, t, np.ones(t.size, np.int64), np.concatenate(links_v))

    def _submit(self, cmds, nentries):
        if cmds is None or len(cmds) == 0:
            return
        stats = self.stats
        stats["pt_commands"] += len(cmds)
        stats["pt_submissions"] += 1
        stats["pt_entries_updated"] += int(nentries)
        self.hw.execute(self.nodes, cmds)

    # -- updates -----------------------------------------------------------------------------
    def map(self, vpns, pfns, flags=PTE_WRITE):
        """Point leaves ``vpns`` at ``pfns`` with ``flags`` (PTE_WRITE, PTE_ATOMIC, ...; VALID implied).

        ``flags`` is a scalar or one value per page.  A vpn given twice takes its last pfn.
        Returns the Fence after which the device translates through the new entries.
        """
        vpns = self._check_vpns(vpns)
        pfns = self._check_pfns(pfns)
        if vpns.shape != pfns.shape:
            raise ValueError(f"device page table: {vpns.size} vpns but {pfns.size} pfns")
        if self.map_check is not None:
            self.map_check(vpns, pfns)
        if vpns.size == 0:
            return self.hw.fence()
        if np.ndim(flags) == 0:                 # one value for every page
            f = (int(flags) & PTE_FLAGS_MASK) | PTE_VALID
        else:
            f = (np.broadcast_to(np.asarray(flags, dtype=np.int64), vpns.shape) & PTE_FLAGS_MASK) | PTE_VALID
        # last one wins, then sort by vpn: runs of consecutive vpn and pfn become one command
        if _strictly_increasing(vpns):          # the common case needs no sort
            v, p = vpns, pfns
        else:
            rev_unique, rev_idx = np.unique(vpns[::-1], return_index=True)
            pick = vpns.size - 1 - rev_idx
            v, p = rev_unique, pfns[pick]
            if not isinstance(f, int):
                f = f[pick]
        starts, lengths = _runs(v, p)
        if not isinstance(f, int):
            # a run must also keep its flags
            fl_break = np.flatnonzero(np.diff(f) != 0) + 1
            if fl_break.size:
                starts = np.union1d(starts, fl_break)
                lengths = np.diff(np.concatenate((starts, [v.size])))
            f = f[starts]
        with self.lock:
            links = self._ensure_tables(v)
            self._submit(links, 0 if links is None else len(links))
            self._submit(make_commands(PT_OP_MAP, v[starts], lengths, (p[starts] << PTE_PFN_SHIFT) | f),
                         v.size)
            return self.hw.fence()

    def _leaf_op(self, op, vpns, value):
        vpns = self._check_vpns(vpns)
        if not _strictly_increasing(vpns):
            vpns = np.unique(vpns)
        if vpns.size == 0:
            return self.hw.fence()
        starts, lengths = _runs(vpns)
        with self.lock:
            self._submit(make_commands(op, vpns[starts], lengths, np.full(starts.size, value, np.uint64)),
                         vpns.size)
            return self.hw.fence()

    def unmap(self, vpns):
        """Clear the leaves ``vpns``; returns the Fence (see ``invalidate`` for the safe form)."""
        return self._leaf_op(PT_OP_UNMAP, vpns, 0)

    def protect(self, vpns, clear=PTE_WRITE | PTE_ATOMIC):
        """Downgrade valid leaves: clear ``clear`` bits (write-protect, revoke atomic, clear A/D)."""
        return self._leaf_op(PT_OP_CLEAR, vpns, int(clear) & PTE_FLAGS_MASK)

    def set_bits(self, vpns, bits):
        """Upgrade valid leaves: set ``bits`` (e.g. PTE_WRITE after a write fault was serviced)."""
        return self._leaf_op(PT_OP_SET, vpns, int(bits) & PTE_FLAGS_MASK & ~PTE_VALID)

    def flush(self):
        """The TLB flush: a Fence after every update and job slice submitted so far."""
        with self.lock:
            return self.hw.fence()

    def _range_runs(self, start_vpn, end_vpn):
        """The parts of vpns [start_vpn, end_vpn) that have leaf tables, as (starts, lengths) runs.

        Only those can hold entries, so a range update costs one command per run of existing
        tables, however large the range: an mmu notifier may invalidate the whole address space.
        """
        v0 = max(int(start_vpn), 0)
        v1 = min(int(end_vpn), 1 << VPN_BITS)
        keys = self._keys[PT_LEVELS - 1]
        if v1 <= v0 or keys.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        i0 = int(np.searchsorted(keys, v0 >> PT_BITS))
        i1 = int(np.searchsorted(keys, (v1 - 1) >> PT_BITS, side="right"))
        k = keys[i0:i1]
        if k.size == 0:
            return k, k
        lo = np.maximum(k << PT_BITS, v0)
        hi = np.minimum((k + 1) << PT_BITS, v1)
        first = np.concatenate(([True], lo[1:] != hi[:-1]))       # adjacent tables: one run
        last = np.concatenate((first[1:], [True]))
        return lo[first], hi[last] - lo[first]

    def _range_op(self, op, start_vpn, npages, value):
        with self.lock:
            starts, lengths = self._range_runs(start_vpn, int(start_vpn) + int(npages))
            if starts.size:
                self._submit(make_commands(op, starts, lengths, np.full(starts.size, value, np.uint64)),
                             lengths.sum())
            return self.hw.fence()

    def unmap_range(self, start_vpn, npages):
        """``unmap`` of every vpn in [start_vpn, start_vpn + npages), at a cost set by the tables present."""
        return self._range_op(PT_OP_UNMAP, start_vpn, npages, 0)

    def protect_range(self, start_vpn, npages, clear=PTE_WRITE | PTE_ATOMIC):
        """``protect`` of every vpn in [start_vpn, start_vpn + npages)."""
        return self._range_op(PT_OP_CLEAR, start_vpn, npages, int(clear) & PTE_FLAGS_MASK)

    def _invalidated(self, submit, npages):
        """Run ``submit`` (which queues the update and returns its Fence) and wait until it is safe.

        Safe means (1) the device executed the update (its fence) and (2) every job slice that
        was queued before it has retired, since a slice may have translated through the old
        entries.  Slices run in order with updates on one device queue; (2) is waited for
        explicitly all the same, so that the guarantee does not rest on that accident.
        """
        with span("pt invalidate", "invalidate", self.track, npages=int(npages)):
            with self.lock:
                before = list(self._inflight)
                fence = submit()
                self.stats["pt_invalidations"] += 1
            for f in before:
                f.wait()
            fence.wait()
        with self.lock:
            self._retired.clear()

    def invalidate(self, vpns, *, downgrade=None):
        """Unmap (or, with ``downgrade=bits``, write-protect) ``vpns`` and return only when it is safe.

        This is what an mmu-notifier callback calls: after it returns no lane touches the old
        pages (see ``_invalidated``).
        """
        if downgrade is None:
            self._invalidated(lambda: self.unmap(vpns), np.size(vpns))
        else:
            self._invalidated(lambda: self.protect(vpns, clear=downgrade), np.size(vpns))

    def invalidate_range(self, start_vpn, npages, *, downgrade=None):
        """``invalidate`` of [start_vpn, start_vpn + npages), for any size (see ``_range_runs``)."""
        if downgrade is None:
            self._invalidated(lambda: self.unmap_range(start_vpn, npages), npages)
        else:
            self._invalidated(lambda: self.protect_range(start_vpn, npages, downgrade), npages)

    def release(self):
        """Drop every entry and table (the address space is being destroyed): waits like
        ``invalidate``, then starts over with an empty root in a fresh minimal pool, so the
        device memory of the old tables goes back."""
        with self.lock:                            # no slice can be queued meanwhile
            for f in list(self._inflight):
                f.wait()
            self.hw.fence().wait()                 # nor walk the old pool any more
            self._retired.clear()
            self.capacity = 4
            self.nodes = self.hw.alloc(self.capacity)
            self.nr_nodes = 1
            self._keys = [None] + [np.zeros(0, np.int64) for _ in range(PT_LEVELS - 1)]
            self._ids = [None] + [np.zeros(0, np.int64) for _ in range(PT_LEVELS - 1)]
            self.stats["pt_nodes"] = 1

    # -- reading (tests, snapshot) ----------------------------------------------------------
    def lookup(self, vpns):
        """The leaf entries of ``vpns`` as the device's walker sees them (0 where none)."""
        vpns = self._check_vpns(vpns)
        with self.lock:
            out = self.hw.lookup(self.nodes, vpns)     # synchronous: all earlier work is done
            self._retired.clear()
            return out
