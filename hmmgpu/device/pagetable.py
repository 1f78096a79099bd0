"""The device page table: a 4-level radix tree in device memory that the device's MMU walks.

It stands for a GPU's own page tables (NVIDIA's GMMU, AMD's VM page tables) as the HMM
documentation describes them (Documentation/mm/hmm.rst, section 4): the driver never writes
entries with the CPU; it queues update commands that the device executes on its own queue, and
an update is done only when the device says so (the fence).

Geometry (x86-64-like, 48-bit virtual addresses): vpn = vaddr >> 12 has 36 bits, split into four
9-bit indices; level 0 is the root (node 0), level 3 holds the 4 KiB leaves.  All nodes live in
one pool ``nodes`` of shape (capacity, 512) uint64 on the device (a NumPy array on the fallback).
A level-2 entry (x86's PMD, the GMMU's dual PDE) either links a leaf table or is itself a 2 MiB
leaf, as GPU MMUs map big pages: one entry translates an aligned 2 MiB range to 512 physically
contiguous frames.

Entry encoding (uint64)::

    bits 63..12  pfn (leaf) or node index (directory entry)
    bit 0  PTE_VALID      the entry points somewhere
    bit 1  PTE_WRITE      stores allowed (leaf)
    bit 2  PTE_DIRTY      set by the device's walker on a successful write/atomic translation
    bit 3  PTE_ACCESSED   set by the device's walker on any successful translation
    bit 4  PTE_ATOMIC     atomics allowed (device-exclusive access granted by the driver)
    bit 7  PTE_HUGE       (level-2 entries only; x86's PS bit) a 2 MiB leaf: its pfn is the first
                          of 512 aligned frames, all system RAM, all this device's memory or
                          all one enabled peer's, and
                          page i of the range is frame pfn + i; its flags are a 4 KiB leaf's, and
                          the walker sets ACCESSED/DIRTY on this one entry for all 512 pages
    0 == no entry

The walker reads the level-2 entry on the way down anyway; a 4 KiB translation costs one more bit
test than it did before 2 MiB leaves existed, and nothing else.

Directory nodes are allocated by the host (as UVM allocates page directories host-side and
asks the copy engine to write the PDEs): the host keeps a shadow of *which* tables exist, in
sorted arrays per level, and of which level-2 entries are 2 MiB leaves, never of the leaves'
contents.  Empty tables are kept after an unmap, as most GPU drivers do, so a later map of the
same range needs no allocation.  A 2 MiB leaf mapped where a leaf table was replaces it: the
device wipes that table and the host keeps it on a free list, taken before the pool grows.

Command buffer: records of four uint64 words ``(op | count << 8, target, value, first)``;
one device thread per affected entry finds its command by binary search over ``first`` (the
running sum of counts), so a run of a million contiguous pages is one 32-byte command.
``entry(v)`` below is the entry that translates vpn v (its 4 KiB leaf, or the 2 MiB leaf over
it), ``pmd(v)`` v's level-2 slot.

    PT_OP_LINK   pt[target + k] = value     node slots: count 1, value child << 12 | VALID links a
                                            table; count 512, value 0 wipes a freed table
    PT_OP_MAP    entry(target + k) = value + (k << 12)       (a run of consecutive pfns)
    PT_OP_UNMAP  entry(target + k) = 0
    PT_OP_CLEAR  entry(target + k) &= ~value   where VALID (protect / downgrade, clear A/D)
    PT_OP_SET    entry(target + k) |= value    where VALID
    PT_OP_HUGE   pmd(target + 512 k) = value + (k << 21)      (a run of 2 MiB leaves over
                                            consecutive 512-frame runs; value has PTE_HUGE)
    PT_OP_SPLIT  table value, slot k = (pmd(target) & ~PTE_HUGE) + (k << 12), count 512: the
                                            2 MiB leaf at target copied into a leaf table
                                            (flags, A/D bits included, and consecutive pfns)

A command only ever depends on commands of an earlier buffer (each buffer is one launch whose
threads run in any order): splitting is SPLIT, then a LINK of the new table in place of the
2 MiB leaf, then the update that needed 4 KiB entries.

How a driver maps a 2 MiB folio (migrate_vma of a THP to device memory, or an hmm_range_fault
entry of order 9 mapped remotely): ``pt.map_huge(heads, head_pfns, flags)`` with the vpns of the
folios' first pages (multiples of 512) and their head pfns (multiples of 512, the whole folio in
RAM, in this device's memory or in one enabled peer's); one entry and, for folios consecutive in
both address and frame, one command per run.  Nothing else changes for the driver: ``invalidate_range``, ``unmap``,
``protect`` and ``set_bits`` over a whole folio act on its one entry and over part of it split it
first (mm's split_huge_pmd), as does a ``map`` of 4 KiB pages inside it; ``lookup`` of any page
under a 2 MiB leaf shows PTE_HUGE (a snapshot's PROT_PMD) and that page's own pfn.
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
PTE_HUGE = 0x80
PTE_FLAGS_MASK = 0xFFF
_LEAF_FLAGS = PTE_FLAGS_MASK & ~PTE_HUGE   # what a caller may put in an entry or change in one
PTE_PFN_SHIFT = 12

PT_LEVELS = 4
PT_BITS = 9
PT_ENTRIES = 1 << PT_BITS
VPN_BITS = PT_LEVELS * PT_BITS          # 36: 48-bit virtual addresses
HUGE_PAGES = PT_ENTRIES                 # 4 KiB pages under one 2 MiB leaf

PT_OP_LINK = 1
PT_OP_MAP = 2
PT_OP_UNMAP = 3
PT_OP_CLEAR = 4
PT_OP_SET = 5
PT_OP_HUGE = 6
PT_OP_SPLIT = 7

_U64 = np.uint64


def pte_pfn(entries):
    """pfns of leaf entries (NumPy array)."""
    return (np.asarray(entries, dtype=np.uint64) >> _U64(PTE_PFN_SHIFT)).astype(np.int64)


def make_commands(op, targets, counts, values):
    """Pack command records (n, 4) uint64; ``first`` is the running sum of counts.

    ``op`` is one op for every record, or one per record (a buffer mixing ops)."""
    n = len(targets)
    if n == 1 and not isinstance(op, np.ndarray):   # one run (the common small update): no array arithmetic
        return np.array([[op | (int(counts[0]) << 8), int(targets[0]), int(values[0]), 0]], dtype=np.uint64)
    cmds = np.empty((n, 4), dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.uint64)
    cmds[:, 0] = np.asarray(op, dtype=np.uint64) | (counts << _U64(8))
    cmds[:, 1] = np.asarray(targets, dtype=np.uint64)
    cmds[:, 2] = np.asarray(values, dtype=np.uint64)
    first = np.cumsum(counts, dtype=np.uint64) - counts
    cmds[:, 3] = first
    return cmds


def _pack(*parts):
    """One command buffer from (op, targets, counts, values) parts; None when all are empty."""
    parts = [p for p in parts if len(p[1])]
    if not parts:
        return None
    if len(parts) == 1:
        return make_commands(*parts[0])
    return make_commands(np.concatenate([np.full(len(p[1]), p[0], np.int64) for p in parts]),
                         *(np.concatenate([np.asarray(p[i], np.int64) for p in parts]) for i in (1, 2, 3)))


_EMPTY = np.zeros(0, np.int64)
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


def _isin_sorted(table, x):
    """Which of ``x`` are in the sorted array ``table``."""
    if table.size == 0:
        return np.zeros(x.shape, bool)
    pos = np.minimum(np.searchsorted(table, x), table.size - 1)
    return table[pos] == x


def _map_runs(vpns, pfns, flags, extra, shift=0):
    """Sort a map request by vpn (a vpn given twice keeps its last pfn and flags) and cut it into
    runs where vpn >> shift and pfn >> shift both step by one and the flags stay: (vpns, pfns,
    run starts, run lengths, the flags: one int, or one per run).  ``flags`` is a scalar or one
    value per entry; ``extra`` bits are added to every entry."""
    if np.ndim(flags) == 0:                 # one value for every entry
        f = (int(flags) & _LEAF_FLAGS) | extra
    else:
        f = (np.broadcast_to(np.asarray(flags, dtype=np.int64), vpns.shape) & _LEAF_FLAGS) | extra
    if _strictly_increasing(vpns):          # the common case needs no sort
        v, p = vpns, pfns
    else:
        rev_unique, rev_idx = np.unique(vpns[::-1], return_index=True)
        pick = vpns.size - 1 - rev_idx
        v, p = rev_unique, pfns[pick]
        if not isinstance(f, int):
            f = f[pick]
    starts, lengths = _runs(v >> shift, p >> shift) if shift else _runs(v, p)
    if not isinstance(f, int):              # a run must also keep its flags
        fl_break = np.flatnonzero(np.diff(f) != 0) + 1
        if fl_break.size:
            starts = np.union1d(starts, fl_break)
            lengths = np.diff(np.concatenate((starts, [v.size])))
        f = f[starts]
    return v, p, starts, lengths, f


class DevicePageTable:
    """The device's page table; every update goes through a command buffer.

    ``hw`` is the backend's page-table hardware (``alloc``/``grow``/``execute``/``lookup``/
    ``fence``); ``lock`` serialises submissions with job slices on the same device queue.

    ``stats``: pt_commands and pt_entries_updated (a 2 MiB leaf counts as one entry),
    pt_submissions (command buffers), pt_links, pt_invalidations, pt_nodes (the pool's
    high-water mark), pt_huge_maps (2 MiB leaves written), pt_splits (2 MiB leaves split).
    """

    def __init__(self, hw, *, nr_ram, pfn_base, nframes, lock=None, initial_nodes=64,
                 inflight=None, track="device", peer_ranges=None):
        self.hw = hw
        # peer_ranges() -> ((pfn_base, nframes), ...): the peers' memory the device addresses
        # besides RAM and its own (EmulatedDevice.enable_peer_access); read only for a map that
        # leaves those two
        self.peer_ranges = peer_ranges or tuple
        self.track = track                         # the trace track of this device
        self.lock = lock or threading.RLock()
        self.nr_ram = int(nr_ram)
        self.pfn_base = int(pfn_base)
        self.nframes = int(nframes)
        self.capacity = max(int(initial_nodes), 4)
        self.nodes = hw.alloc(self.capacity)
        self.nr_nodes = 1                          # node 0 is the root
        self._retired = []                         # old pools kept until the next fence wait
        self._inflight = inflight if inflight is not None else collections.deque()
        self.stats = {"pt_commands": 0, "pt_entries_updated": 0, "pt_links": 0,
                      "pt_submissions": 0, "pt_invalidations": 0, "pt_nodes": 1,
                      "pt_huge_maps": 0, "pt_splits": 0}
        # map_check(vpns, pfns): a driver's debug check run before every map (it may raise);
        # hmmgpu.hmm.debug.check_device_mappings sets the notifier-sequence check.  map_huge
        # passes the heads: a folio is locked by its head page
        self.map_check = None
        self._reset_shadow()

    def _reset_shadow(self):
        # Shadow of the directory: for levels 1..3, sorted vpn prefixes and their node ids;
        # level 3 lists the leaf tables that are linked.
        self._keys = [None] + [np.zeros(0, np.int64) for _ in range(PT_LEVELS - 1)]
        self._ids = [None] + [np.zeros(0, np.int64) for _ in range(PT_LEVELS - 1)]
        self._huge = _EMPTY                        # sorted vpn >> 9 of the 2 MiB leaves
        self._free = _EMPTY                        # wiped leaf tables a 2 MiB leaf replaced

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
        for base, n in self.peer_ranges():         # at most MAX_PEERS
            ok |= (pfns >= base) & (pfns < base + n)
        if not ok.all():
            bad = int(pfns[~ok][0])
            raise ValueError(f"device page table: pfn 0x{bad:x} is neither system RAM [0, 0x{self.nr_ram:x}), "
                             f"this device's memory [0x{self.pfn_base:x}, "
                             f"0x{self.pfn_base + self.nframes:x}) nor an enabled peer's")
        return pfns

    def _check_huge(self, vpns, pfns):
        """2 MiB leaves: aligned vpns, and pfns that start 512 aligned frames lying all in RAM,
        all in this device's memory or all in one enabled peer's."""
        if vpns.size <= _SMALL:                    # a few folios: Python integers
            lo, hi = self.pfn_base, self.pfn_base + self.nframes
            if all(not v & (HUGE_PAGES - 1) and not p & (HUGE_PAGES - 1)
                   and ((0 <= p and p + HUGE_PAGES <= self.nr_ram) or (lo <= p and p + HUGE_PAGES <= hi))
                   for v, p in zip(vpns.tolist(), pfns.tolist())):
                return
        bad = np.flatnonzero(vpns & (HUGE_PAGES - 1))
        if bad.size:
            v = int(vpns[bad[0]])
            raise ValueError(f"device page table: vpn 0x{v:x} (address 0x{v << 12:x}) is not the first "
                             f"page of an aligned 2 MiB range")
        ok = (pfns >= 0) & (pfns + HUGE_PAGES <= self.nr_ram)
        for base, n in ((self.pfn_base, self.nframes),) + tuple(self.peer_ranges()):
            ok |= (pfns >= base) & (pfns + HUGE_PAGES <= base + n)
        bad = np.flatnonzero(((pfns & (HUGE_PAGES - 1)) != 0) | ~ok)
        if bad.size:
            p, v = int(pfns[bad[0]]), int(vpns[bad[0]])
            raise ValueError(f"device page table: pfn 0x{p:x} (for vpn 0x{v:x}) does not start 512 aligned "
                             f"frames all in system RAM [0, 0x{self.nr_ram:x}), all in this device's "
                             f"memory [0x{self.pfn_base:x}, 0x{self.pfn_base + self.nframes:x}) or all "
                             "in one enabled peer's")

    def _alloc_nodes(self, n):
        """``n`` node ids for new tables, all zero on the device: wiped tables from the free
        list first, then fresh ones from the pool (which grows by a copy queued on the device's
        stream; a queued slice may still walk the old pool, kept until the next fence wait)."""
        take = min(n, self._free.size)
        ids = self._free[:take]
        self._free = self._free[take:]
        if take < n:
            fresh = np.arange(self.nr_nodes, self.nr_nodes + n - take, dtype=np.int64)
            self.nr_nodes += n - take
            ids = np.concatenate((ids, fresh)) if take else fresh
            if self.nr_nodes > self.capacity:
                cap = self.capacity
                while cap < self.nr_nodes:
                    cap *= 2
                old = self.nodes
                self.nodes = self.hw.grow(old, cap)
                self._retired.append(old)
                self.capacity = cap
            self.stats["pt_nodes"] = self.nr_nodes
        return ids

    def _ensure_tables(self, vpns_sorted, top=PT_LEVELS - 1):
        """Allocate the missing directory nodes of levels 1..``top`` for ``vpns_sorted`` (top 3:
        leaf tables too; 2: up to the tables that hold 2 MiB leaves); returns LINK commands."""
        # the usual case first: every table at ``top`` exists already (then so do their parents)
        have = self._keys[top]
        if have.size:
            keys = vpns_sorted >> (PT_BITS * (PT_LEVELS - top))
            pos = have.searchsorted(keys)             # nondecreasing: keys are sorted
            if pos[-1] < have.size and not np.count_nonzero(have[pos] != keys):
                return None
        links_t, links_v = [], []
        for level in range(1, top + 1):
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
            ids = self._alloc_nodes(missing.size)
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
        if not links_t:
            return None
        t = np.concatenate(links_t)
        self.stats["pt_links"] += int(t.size)
        return make_commands(PT_OP_LINK, t, np.ones(t.size, np.int64), np.concatenate(links_v))

    def _pmd_slots(self, keys):
        """Pool slots of the level-2 entries of ``keys`` (vpn >> 9), whose level-2 tables exist."""
        tables = self._ids[PT_LEVELS - 2][np.searchsorted(self._keys[PT_LEVELS - 2], keys >> PT_BITS)]
        return tables * PT_ENTRIES + (keys & (PT_ENTRIES - 1))

    def _split(self, keys):
        """split_huge_pmd: turn the 2 MiB leaves at ``keys`` (sorted, all in the shadow's huge
        set) into leaf tables of 512 entries with the leaf's flags and consecutive pfns.  The
        device copies each leaf (its ACCESSED/DIRTY bits are the device's to know), then the
        new tables are linked in place of the leaves: two command buffers, queued in order."""
        nodes = self._alloc_nodes(keys.size)
        self._submit(make_commands(PT_OP_SPLIT, keys << PT_BITS, np.full(keys.size, PT_ENTRIES), nodes),
                     keys.size * PT_ENTRIES)
        self._submit(make_commands(PT_OP_LINK, self._pmd_slots(keys), np.ones(keys.size, np.int64),
                                   (nodes << PTE_PFN_SHIFT) | PTE_VALID), keys.size)
        self.stats["pt_links"] += int(keys.size)
        self.stats["pt_splits"] += int(keys.size)
        self._huge = np.setdiff1d(self._huge, keys, assume_unique=True)
        merged = np.concatenate((self._keys[PT_LEVELS - 1], keys))
        order = np.argsort(merged, kind="stable")
        self._keys[PT_LEVELS - 1] = merged[order]
        self._ids[PT_LEVELS - 1] = np.concatenate((self._ids[PT_LEVELS - 1], nodes))[order]

    def _huge_cover(self, vpns):
        """For a leaf update of sorted unique ``vpns``: split the 2 MiB leaves it covers in part;
        returns (the vpns left to update one by one, the heads of the 2 MiB leaves it covers
        whole, to update as one entry each)."""
        keys = vpns >> PT_BITS
        inh = _isin_sorted(self._huge, keys)
        if not inh.any():
            return vpns, _EMPTY
        hk = keys[inh]
        first = np.flatnonzero(np.concatenate(([True], hk[1:] != hk[:-1])))
        uk, cnt = hk[first], np.diff(np.concatenate((first, [hk.size])))
        whole = uk[cnt == HUGE_PAGES]
        if whole.size < uk.size:
            self._split(uk[cnt < HUGE_PAGES])
        if whole.size:
            vpns = vpns[~_isin_sorted(whole, keys)]
        return vpns, whole << PT_BITS

    def _huge_range(self, v0, v1):
        """``_huge_cover`` of the range [v0, v1): at most two 2 MiB leaves are split."""
        h = self._huge
        k = h[int(np.searchsorted(h, v0 >> PT_BITS)):int(np.searchsorted(h, (v1 - 1) >> PT_BITS, side="right"))]
        if k.size == 0:
            return _EMPTY
        whole = ((k << PT_BITS) >= v0) & (((k + 1) << PT_BITS) <= v1)
        if not whole.all():
            self._split(k[~whole])
        return k[whole] << PT_BITS

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
        A vpn under a 2 MiB leaf splits that leaf first.
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
        # runs of consecutive vpn and pfn become one command
        v, p, starts, lengths, f = _map_runs(vpns, pfns, flags, PTE_VALID)
        with self.lock:
            if self._huge.size:
                keys = v >> PT_BITS
                hit = _isin_sorted(self._huge, keys)
                if hit.any():
                    self._split(np.unique(keys[hit]))
            links = self._ensure_tables(v)
            self._submit(links, 0 if links is None else len(links))
            self._submit(make_commands(PT_OP_MAP, v[starts], lengths, (p[starts] << PTE_PFN_SHIFT) | f),
                         v.size)
            return self.hw.fence()

    def map_huge(self, vpns, pfns, flags=PTE_WRITE):
        """Map 2 MiB leaves: ``vpns`` are the first pages of aligned 2 MiB ranges (multiples of
        512), ``pfns`` the first of the 512 aligned frames each maps (all RAM, all this
        device's memory or all one enabled peer's; ValueError otherwise, changing nothing).
        ``flags`` as for ``map``.

        One entry per leaf; leaves consecutive in both address and frames are one command.  A
        leaf table that held 4 KiB entries in such a range is replaced (wiped, kept for reuse).
        Returns the Fence after which the device translates through the new entries.
        """
        vpns = self._check_vpns(vpns)
        pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
        if vpns.shape != pfns.shape:
            raise ValueError(f"device page table: {vpns.size} vpns but {pfns.size} pfns")
        if vpns.size == 0:
            return self.hw.fence()
        self._check_huge(vpns, pfns)
        if self.map_check is not None:
            self.map_check(vpns, pfns)
        v, p, starts, lengths, f = _map_runs(vpns, pfns, flags, PTE_VALID | PTE_HUGE, PT_BITS)
        keys = v >> PT_BITS
        with self.lock:
            links = self._ensure_tables(v, top=PT_LEVELS - 2)
            self._submit(links, 0 if links is None else len(links))
            old = _EMPTY
            tabs = self._keys[PT_LEVELS - 1]
            if tabs.size:
                gone = _isin_sorted(keys, tabs)
                if gone.any():                       # leaf tables the new leaves replace
                    old = self._ids[PT_LEVELS - 1][gone]
                    self._keys[PT_LEVELS - 1] = tabs[~gone]
                    self._ids[PT_LEVELS - 1] = self._ids[PT_LEVELS - 1][~gone]
            # the wipe rides in the same buffer: the tables are unlinked by the leaves' stores
            # and no walk can reach them meanwhile (updates and slices share one queue)
            self._submit(_pack((PT_OP_HUGE, v[starts], lengths, (p[starts] << PTE_PFN_SHIFT) | f),
                               (PT_OP_LINK, old * PT_ENTRIES, np.full(old.size, PT_ENTRIES), np.zeros(old.size))),
                         v.size + old.size * PT_ENTRIES)
            if old.size:
                self._free = np.concatenate((self._free, old))
            if not _isin_sorted(self._huge, keys).all():    # not a remap of leaves already there
                self._huge = np.union1d(self._huge, keys)
            self.stats["pt_huge_maps"] += int(v.size)
            return self.hw.fence()

    def _leaf_op(self, op, vpns, value):
        vpns = self._check_vpns(vpns)
        if not _strictly_increasing(vpns):
            vpns = np.unique(vpns)
        if vpns.size == 0:
            return self.hw.fence()
        with self.lock:
            if not self._huge.size:
                starts, lengths = _runs(vpns)
                self._submit(make_commands(op, vpns[starts], lengths, np.full(starts.size, value, np.uint64)),
                             vpns.size)
                return self.hw.fence()
            vpns, heads = self._huge_cover(vpns)   # 2 MiB leaves: one entry each, or split
            starts, lengths = _runs(vpns)
            targets = vpns[starts]
            if heads.size:
                targets = np.concatenate((targets, heads))
                lengths = np.concatenate((lengths, np.ones(heads.size, np.int64)))
                if op == PT_OP_UNMAP:
                    self._huge = np.setdiff1d(self._huge, heads >> PT_BITS, assume_unique=True)
            if targets.size:
                self._submit(make_commands(op, targets, lengths, np.full(targets.size, value, np.uint64)),
                             vpns.size + heads.size)
            return self.hw.fence()

    def unmap(self, vpns):
        """Clear the leaves ``vpns``; returns the Fence (see ``invalidate`` for the safe form)."""
        return self._leaf_op(PT_OP_UNMAP, vpns, 0)

    def protect(self, vpns, clear=PTE_WRITE | PTE_ATOMIC):
        """Downgrade valid leaves: clear ``clear`` bits (write-protect, revoke atomic, clear A/D)."""
        return self._leaf_op(PT_OP_CLEAR, vpns, int(clear) & _LEAF_FLAGS)

    def set_bits(self, vpns, bits):
        """Upgrade valid leaves: set ``bits`` (e.g. PTE_WRITE after a write fault was serviced)."""
        return self._leaf_op(PT_OP_SET, vpns, int(bits) & _LEAF_FLAGS & ~PTE_VALID)

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
            heads = None
            if self._huge.size:                    # 2 MiB leaves: one entry each, or split
                v0 = max(int(start_vpn), 0)
                v1 = min(int(start_vpn) + int(npages), 1 << VPN_BITS)
                if v0 < v1:
                    heads = self._huge_range(v0, v1)
            starts, lengths = self._range_runs(start_vpn, int(start_vpn) + int(npages))
            if heads is not None and heads.size:
                starts = np.concatenate((starts, heads))
                lengths = np.concatenate((lengths, np.ones(heads.size, np.int64)))
                if op == PT_OP_UNMAP:
                    self._huge = np.setdiff1d(self._huge, heads >> PT_BITS, assume_unique=True)
            if starts.size:
                self._submit(make_commands(op, starts, lengths, np.full(starts.size, value, np.uint64)),
                             lengths.sum())
            return self.hw.fence()

    def unmap_range(self, start_vpn, npages):
        """``unmap`` of every vpn in [start_vpn, start_vpn + npages), at a cost set by the tables present."""
        return self._range_op(PT_OP_UNMAP, start_vpn, npages, 0)

    def protect_range(self, start_vpn, npages, clear=PTE_WRITE | PTE_ATOMIC):
        """``protect`` of every vpn in [start_vpn, start_vpn + npages)."""
        return self._range_op(PT_OP_CLEAR, start_vpn, npages, int(clear) & _LEAF_FLAGS)

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
            self._reset_shadow()
            self.stats["pt_nodes"] = 1

    # -- reading (tests, snapshot) ----------------------------------------------------------
    def lookup(self, vpns):
        """The entries that translate ``vpns`` as the device's walker sees them (0 where none).

        Under a 2 MiB leaf: that entry, PTE_HUGE set, with the page's own pfn (the leaf's first
        frame + vpn % 512), so ``pte_pfn`` works on any answer."""
        vpns = self._check_vpns(vpns)
        with self.lock:
            out = self.hw.lookup(self.nodes, vpns)     # synchronous: all earlier work is done
            self._retired.clear()
            return out
