"""The NumPy twins of the device jobs, and the fallback's MMU, fault buffer and lane context.

Every function here is the vectorised counterpart of a kernel in hmmgpu/kernels/jobs.cu or
hmm.cuh, with the same results: memory bytes, page-table ACCESSED/DIRTY bits, lane states, and
the set of fault records.  Loops run over pointer-chasing steps, operands, runs of contiguous
frames or leaf tables, never over lanes or pages -- except the scalar path, which runs a few
pointer-chasing lanes one step at a time in plain Python (NumPy's per-call cost would dominate
a step that touches 16 bytes).  Completion is immediate; nothing here is a timing.

Translation goes through a per-slice cache of leaf tables (the page-walk cache of a GPU MMU;
hmm.cuh keeps a per-lane micro-TLB): a slice walks the upper levels once per 2 MiB of address
space, then reads each leaf by index -- or, under a 2 MiB leaf, that one entry, whose pfn plus
the page's index in the range is the page's frame.  Data moves per run of contiguous frames: a
run of pages (a 2 MiB leaf's 512 pages are one) is read or written as one slice of the arena,
the scattered rest by one gather or scatter.
"""
import numpy as np

from ..device.hw import DONE
from ..device.faults import (ACCESS_ATOMIC, ACCESS_READ, ACCESS_WRITE, FATAL_BAD_PFN, FATAL_MISALIGNED,
                             fatal_word)
from ..device.jobs import LANE_DONE, LANE_FAULTED, Zeros
from ..device.pagetable import (PT_BITS, PT_ENTRIES, PT_LEVELS, PTE_ACCESSED, PTE_ATOMIC, PTE_DIRTY,
                                PTE_HUGE, PTE_PFN_SHIFT, PTE_VALID, PTE_WRITE, VPN_BITS)

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_IN_LEAF = _U64((PT_ENTRIES - 1) << PTE_PFN_SHIFT)   # vaddr bits of the page in its 2 MiB range: the pfn offset
BULK_UNITS = 256
MIN_RUN_PAGES = 8            # a run of contiguous frames this long is read as a slice
SCALAR_LANES = 32            # pointer chases with at most this many lanes run the scalar path


class NumpyFaultHW:
    """The fault ring in (emulated) device memory: records (capacity, 4) and the put counter."""

    def __init__(self, capacity):
        self.capacity = int(capacity)
        self.records = np.zeros((self.capacity, 4), dtype=np.uint64)
        self.put = 0

    def append(self, vaddr, access, lane, job):
        n = len(vaddr)
        if n == 0:
            return
        k = max(0, min(n, self.capacity - self.put))
        if k:
            r = self.records[self.put:self.put + k]
            r[:, 0] = np.asarray(vaddr, np.uint64)[:k]
            r[:, 1] = np.asarray(lane, np.int64)[:k].astype(np.uint64)
            r[:, 2] = np.broadcast_to(np.asarray(access, np.int64), (n,))[:k].astype(np.uint64)
            r[:, 3] = _U64(job)
        self.put += n          # keeps counting past the end: the overflow

    def drain(self):
        """The records and the put counter, and an empty ring (the host's read of the ring)."""
        n = min(self.put, self.capacity)
        out, put = self.records[:n].copy(), self.put
        self.put = 0
        return out, put


def pte_allows(e, access):
    e = np.asarray(e, dtype=np.uint64)
    valid = (e & _U64(PTE_VALID)) != 0
    if access == ACCESS_READ:
        return valid
    w = valid & ((e & _U64(PTE_WRITE)) != 0)
    if access == ACCESS_WRITE:
        return w
    return w & ((e & _U64(PTE_ATOMIC)) != 0)


def _unique_sorted(keys):
    """np.unique(keys, return_inverse=True), without a sort when ``keys`` is sorted already
    (a bulk slice's pages are)."""
    if keys.size and (keys[1:] >= keys[:-1]).all():
        head = np.ones(keys.size, bool)
        head[1:] = keys[1:] != keys[:-1]
        return keys[head], np.cumsum(head) - 1
    return np.unique(keys, return_inverse=True)


def runs_of(idx, min_run=MIN_RUN_PAGES):
    """Runs of +1 or -1 steps in ``idx`` at least ``min_run`` long (a freshly faulted range is
    often a run of frames in one direction or the other, as the free list hands them out), as
    (start, length, step) over positions, and the positions outside them (the scattered rest)."""
    n = idx.size
    if n < min_run:
        return [], np.arange(n)
    d = np.diff(idx)
    step = np.where((d == 1) | (d == -1), d, 0)
    chg = np.flatnonzero(step[1:] != step[:-1]) + 1
    a = np.concatenate(([0], chg))                     # segment k: steps a[k] .. b[k] - 1,
    b = np.concatenate((chg, [n - 1]))                 # positions a[k] .. b[k]
    long = (step[a] != 0) & (b - a + 1 >= min_run)
    if not long.any():
        return [], np.arange(n)
    rest = np.ones(n, bool)
    out, last = [], -1
    for s0, e0, st in zip(a[long].tolist(), b[long].tolist(), step[a[long]].tolist()):   # per long run
        s0 = max(s0, last + 1)                         # two runs meeting share one position
        rest[s0:e0 + 1] = False
        out.append((s0, e0 + 1 - s0, st))
        last = e0
    return out, np.flatnonzero(rest)


class NumpyMMU:
    """Translation and physical access for the twins: hmm_translate / hmm_frame of hmm.cuh."""

    def __init__(self, dev_arena, host_arena, pfn_base, nframes, faults):
        self.dev = dev_arena.frames
        self.host = host_arena.frames
        self.pfn_base = int(pfn_base)
        self.nframes = int(nframes)
        self.faults = faults
        self.set_peers(())
        self.nodes = None
        self.job_id = 0
        self._tlb_keys = np.zeros(0, np.int64)
        self._tlb_nodes = np.zeros(0, np.int64)

    def set_peers(self, peers):
        """The enabled peers' memory for the slices to come: ((pfn_base, nframes, frames), ...)
        (hmm.cuh's peer table).  Memory k of ``mems`` is system RAM (0), this device's (1),
        peer k - 2."""
        self.peers = tuple(peers)
        self.mems = (self.host, self.dev) + tuple(f for _, _, f in self.peers)

    def begin_slice(self, nodes, job_id):
        """A new slice: the page-table pool it walks, and an empty cache of leaf tables (an
        invalidation between two slices can never be missed)."""
        self.nodes = nodes
        self.job_id = job_id
        self._tlb_keys = np.zeros(0, np.int64)
        self._tlb_nodes = np.zeros(0, np.int64)

    # -- the walker ------------------------------------------------------------------------
    def _walk_upper(self, keys):
        """What the level-2 entry of each vpn >> 9 in ``keys`` leads to: its leaf table's node
        (>= 0), -1 where a table is missing, or -2 - slot for a 2 MiB leaf at flat ``slot``."""
        flat = self.nodes.reshape(-1)
        node = np.zeros(keys.shape, np.int64)
        ok = np.ones(keys.shape, bool)
        for level in range(PT_LEVELS - 2):
            shift = PT_BITS * (PT_LEVELS - 2 - level)
            e = flat[node * PT_ENTRIES + ((keys >> shift) & (PT_ENTRIES - 1))]
            ok &= (e & _U64(PTE_VALID)) != 0
            node = np.where(ok, (e >> _U64(PTE_PFN_SHIFT)).astype(np.int64), 0)
        slot = node * PT_ENTRIES + (keys & (PT_ENTRIES - 1))
        e = flat[slot]
        huge = ok & ((e & _U64(PTE_HUGE)) != 0)
        ok &= (e & _U64(PTE_VALID)) != 0
        out = np.where(ok, (e >> _U64(PTE_PFN_SHIFT)).astype(np.int64), -1)
        if np.count_nonzero(huge):
            out[huge] = -2 - slot[huge]
        return out

    def leaf_tables(self, keys):
        """``_walk_upper`` of sorted unique ``keys``, through the slice's cache."""
        ck, cn = self._tlb_keys, self._tlb_nodes
        pos = np.searchsorted(ck, keys)
        hit = pos < ck.size
        hit[hit] = ck[pos[hit]] == keys[hit]
        out = np.empty(keys.size, np.int64)
        out[hit] = cn[pos[hit]]
        miss = ~hit
        if miss.any():
            mk = keys[miss]
            mn = self._walk_upper(mk)
            out[miss] = mn
            k2, n2 = np.concatenate((ck, mk)), np.concatenate((cn, mn))
            o = np.argsort(k2, kind="stable")
            self._tlb_keys, self._tlb_nodes = k2[o], n2[o]
        return out

    def _walk_keys(self, vpns):
        """(in range mask, None if all are; unique keys vpn >> 9; inverse; ``_walk_upper`` of them)."""
        good = (vpns >= 0) & ((vpns >> VPN_BITS) == 0)
        if np.count_nonzero(good) == good.size:
            good, keys = None, vpns >> PT_BITS
        else:
            keys = np.where(good, vpns >> PT_BITS, 0)
        uk, inv = _unique_sorted(keys)
        return good, inv, self.leaf_tables(uk)

    def walk(self, vpns):
        """(slot, huge): the flat slot (into nodes.reshape(-1)) of the entry that translates each
        vpn, -1 where a table is missing, and which vpns are under 2 MiB leaves (whose slot is
        the level-2 one), or None when none is."""
        vpns = np.asarray(vpns, dtype=np.int64)
        good, inv, lk = self._walk_keys(vpns)
        return self._slots(vpns, good, inv, lk)

    @staticmethod
    def _slots(vpns, good, inv, lk):
        big = lk < -1
        if not np.count_nonzero(big):                              # one test per 2 MiB: 4 KiB leaves only
            leaf = lk[inv]
            ok = leaf >= 0 if good is None else good & (leaf >= 0)
            return np.where(ok, leaf * PT_ENTRIES + (vpns & (PT_ENTRIES - 1)), -1), None
        # per key: the slot of its first page and the step per page (0 under a 2 MiB leaf)
        tab = lk >= 0
        slot = np.where(tab, lk * PT_ENTRIES, np.where(big, -2 - lk, -1))[inv]
        if tab.any():
            slot += (vpns & (PT_ENTRIES - 1)) * tab[inv]
        huge = big[inv]
        if good is not None:
            slot[~good] = -1
            huge &= good
        return slot, huge

    def translate(self, vaddr, access, lanes, record=True, size=1):
        """(ok, pte) per address; sets ACCESSED/DIRTY on success; records the failures in order.
        A page under a 2 MiB leaf gets that entry with its own pfn (hmm_pte_of_page).  An entry
        whose pfn is outside memory (``pfn_ok``) fails too, as a fatal fault of an access of
        ``size`` bytes."""
        vaddr = np.asarray(vaddr, dtype=np.uint64)
        vpns = (vaddr >> _U64(12)).astype(np.int64)
        flat = self.nodes.reshape(-1)
        want = _U64(PTE_ACCESSED | (PTE_DIRTY if access != ACCESS_READ else 0))
        good, inv, lk = self._walk_keys(vpns)
        if good is None and lk.size and lk.max() < -1:
            # every page under a 2 MiB leaf: one entry read, checked and marked per leaf
            ks = -2 - lk
            ek = flat[ks]
            okk = pte_allows(ek, access)
            need = okk & ((ek & want) != want)
            if need.any():
                flat[ks[need]] |= want
            ok = okk[inv]
            e = ek[inv] + (vaddr & _IN_LEAF)
        else:
            slots, huge = self._slots(vpns, good, inv, lk)
            e = flat[np.maximum(slots, 0)]
            e[slots < 0] = 0
            ok = pte_allows(e, access)
            need = ok & ((e & want) != want)
            if need.any():
                flat[slots[need]] |= want
            if huge is not None:
                e += (vaddr & _IN_LEAF) * huge
        wild = ok & ~self.pfn_ok(e)
        if wild.any():
            ok &= ~wild
        if record and not ok.all():
            bad = ~ok
            words = np.where(wild, fatal_word(access, FATAL_BAD_PFN, size), _U64(access))
            self.faults.append(vaddr[bad], words[bad], np.asarray(lanes)[bad], self.job_id)
        return ok, e

    def pfn_ok(self, pte):
        """hmm_frame's test: the leaf points at system RAM, this device's frames or an enabled
        peer's."""
        pfn = (np.asarray(pte, np.uint64) >> _U64(12)).astype(np.int64)
        d = pfn - self.pfn_base
        ok = ((pfn >= 0) & (pfn < self.host.shape[0])) | ((d >= 0) & (d < self.nframes))
        for base, n, _ in self.peers:             # at most MAX_PEERS
            ok |= (pfn >= base) & (pfn < base + n)
        return ok

    # -- physical access -----------------------------------------------------------------------
    def frames(self, pte):
        """(memory of each leaf entry's pfn: an int8 index into ``mems``, frame index in it)."""
        pfn = (np.asarray(pte, np.uint64) >> _U64(12)).astype(np.int64)
        d = pfn - self.pfn_base
        dev = (d >= 0) & (d < self.nframes)
        idx = np.where(dev, d, pfn)
        which = dev.view(np.int8)
        for k, (base, n, _) in enumerate(self.peers):
            q = pfn - base
            m = (q >= 0) & (q < n)
            if m.any():
                which = which.copy() if which.base is dev else which
                which[m] = 2 + k
                idx[m] = q[m]
        return which, idx

    def _pieces(self, which):
        """(arena, positions) for each memory that ``which`` selects: one when all agree."""
        if not self.peers:                        # RAM and own frames only: a bool mask
            dev = which.view(bool)
            if dev.all():
                return ((self.dev, None),)
            if not dev.any():
                return ((self.host, None),)
            return ((self.dev, np.flatnonzero(dev)), (self.host, np.flatnonzero(~dev)))
        used = np.flatnonzero(np.bincount(which, minlength=len(self.mems)))
        if used.size == 1:
            return ((self.mems[int(used[0])], None),)
        return tuple((self.mems[k], np.flatnonzero(which == k)) for k in used.tolist())

    def _where(self, pte, off, itemsize):
        which, fr = self.frames(pte)
        return which, (fr * 4096 + np.asarray(off, np.int64)) // itemsize

    def load(self, pte, off, dtype, width=1):
        dt = np.dtype(dtype)
        which, idx = self._where(pte, off, dt.itemsize * width)
        out = np.empty((idx.size, width), dtype=dt)
        for mem, pos in self._pieces(which):
            v = mem.reshape(-1).view(dt).reshape(-1, width)
            if pos is None:
                np.take(v, idx, axis=0, out=out)
            else:
                out[pos] = v[idx[pos]]
        return out if width > 1 else out[:, 0]

    def store(self, pte, off, values, dtype, width=1):
        dt = np.dtype(dtype)
        which, idx = self._where(pte, off, dt.itemsize * width)
        values = np.asarray(values, dtype=dt).reshape(idx.size, width)
        for mem, pos in self._pieces(which):
            v = mem.reshape(-1).view(dt).reshape(-1, width)
            if pos is None:
                v[idx] = values
            else:
                v[idx[pos]] = values[pos]

    def atomic_add(self, pte, off, values, dtype):
        """Old values as if the lanes had gone in lane order; then the sums land."""
        dt = np.dtype(dtype)
        which, idx = self._where(pte, off, dt.itemsize)
        values = np.asarray(values, dtype=dt)
        key = idx * len(self.mems) + which              # one key space for every memory
        order = np.argsort(key, kind="stable")
        sk, sv = key[order], values[order]
        start = np.concatenate(([True], sk[1:] != sk[:-1]))
        cs = np.cumsum(sv, dtype=dt) - sv
        excl = cs - cs[np.maximum.accumulate(np.where(start, np.arange(sk.size), 0))]
        cur = np.empty(idx.size, dtype=dt)
        pieces = self._pieces(which)
        for mem, pos in pieces:
            v = mem.reshape(-1).view(dt)
            if pos is None:
                cur[:] = v[idx]
            else:
                cur[pos] = v[idx[pos]]
        old = np.empty_like(cur)
        old[order] = cur[order] + excl
        for mem, pos in pieces:
            v = mem.reshape(-1).view(dt)
            np.add.at(v, idx if pos is None else idx[pos], values if pos is None else values[pos])
        return old

    def page_runs(self, pte):
        """Whole pages, by memory: (arena, lane positions, frame index, long runs, rest)."""
        which, fr = self.frames(pte)
        out = []
        for mem, pos in self._pieces(which):
            f = fr if pos is None else fr[pos]
            p = np.arange(fr.size) if pos is None else pos
            runs, rest = runs_of(f)
            out.append((mem, p, f, runs, rest))
        return out


class ScalarMMU:
    """Reads through the MMU for one lane at a time, in plain Python, for the pointer chases:
    the page table, system RAM and device memory as memoryviews of uint64 words; every page
    translated in the slice is kept (nothing can change the page table during a slice, so this
    TLB holds what hmm_lane's micro-TLB would find again); ACCESSED is set on a page's first
    translation, and a fault is recorded in the ring exactly as the vectorised path records it."""

    def __init__(self, mmu):
        self.mmu = mmu
        self.pt = memoryview(mmu.nodes.reshape(-1)).cast("B").cast("Q")
        self.mem = tuple(memoryview(m.reshape(-1)).cast("Q") for m in mmu.mems)   # RAM, own, peers
        self.leaves = {}
        self.pages = {}            # vpn -> (memory, index of the page's first word)

    def _walk_upper(self, key):
        """NumpyMMU._walk_upper of one key, with Python integers."""
        pt = self.pt
        e = pt[(key >> (2 * PT_BITS)) & (PT_ENTRIES - 1)]
        if not e & PTE_VALID:
            return -1
        e = pt[((e >> PTE_PFN_SHIFT) << PT_BITS) + ((key >> PT_BITS) & (PT_ENTRIES - 1))]
        if not e & PTE_VALID:
            return -1
        slot = ((e >> PTE_PFN_SHIFT) << PT_BITS) + (key & (PT_ENTRIES - 1))
        e = pt[slot]
        if e & PTE_HUGE:
            return -2 - slot
        return e >> PTE_PFN_SHIFT if e & PTE_VALID else -1

    def _leaf(self, vpn):
        key = vpn >> PT_BITS
        node = self.leaves.get(key)
        if node is None:
            node = self._walk_upper(key)
            self.leaves[key] = node
        if node >= 0:
            return node * PT_ENTRIES + (vpn & (PT_ENTRIES - 1))
        return -2 - node if node < -1 else -1          # a 2 MiB leaf's slot, or none

    def _fault(self, vaddr, word, lane):
        self.mmu.faults.append(np.array([vaddr], np.uint64), word, np.array([lane], np.int64),
                               self.mmu.job_id)

    def page(self, vaddr, lane):
        """(memory, first word) of the page of ``vaddr`` for an 8-byte read, or None after
        recording the read fault (fatal for a pfn outside memory, as hmm_xlate records it)."""
        vpn = vaddr >> 12
        pg = self.pages.get(vpn)
        if pg is not None:
            return pg
        slot = self._leaf(vpn) if vpn >> VPN_BITS == 0 else -1
        e = self.pt[slot] if slot >= 0 else 0
        if not e & PTE_VALID:
            self._fault(vaddr, ACCESS_READ, lane)
            return None
        if not e & PTE_ACCESSED:
            self.pt[slot] = e | PTE_ACCESSED
        pfn = e >> PTE_PFN_SHIFT
        if e & PTE_HUGE:
            pfn += vpn & (PT_ENTRIES - 1)
        d = pfn - self.mmu.pfn_base
        if 0 <= d < self.mmu.nframes:
            pg = (self.mem[1], d << 9)
        elif pfn < len(self.mem[0]) >> 9:
            pg = (self.mem[0], pfn << 9)
        else:
            pg = next(((self.mem[2 + k], (pfn - base) << 9) for k, (base, n, _) in enumerate(self.mmu.peers)
                       if 0 <= pfn - base < n), None)
            if pg is None:
                self._fault(vaddr, fatal_word(ACCESS_READ, FATAL_BAD_PFN, 8), lane)
                return None
        self.pages[vpn] = pg
        return pg

    def load(self, vaddr, lane):
        """The uint64 at ``vaddr`` (a read through the MMU), or None after a fault; a misaligned
        address is a fatal fault, never rounded down."""
        if vaddr & 7:
            self._fault(vaddr, fatal_word(ACCESS_READ, FATAL_MISALIGNED, 8), lane)
            return None
        pg = self.page(vaddr, lane)
        return None if pg is None else pg[0][pg[1] + ((vaddr & 4095) >> 3)]


class NumpyLaneContext:
    """hmm_lane of hmm.cuh for a vector of lanes: each call acts on the still-active lanes
    (optionally only the positions ``sel``); a lane that faults stops, later calls skip it and
    its loads read 0.  ``probe_pass`` is True in the first pass of a two-phase job (see
    ``UserJob``): loads happen, stores and atomics only translate, and the scratch arrays the
    lane function got are throwaway copies."""

    def __init__(self, mmu, lanes, probe=False):
        self.mmu = mmu
        self.lanes = np.asarray(lanes, dtype=np.int64)
        self.active = np.ones(self.lanes.size, dtype=bool)
        self.probe_pass = probe

    @property
    def faulted(self):
        return ~self.active

    def _xlate(self, vaddr, access, sel, size=1):
        sel = np.arange(self.lanes.size) if sel is None else np.asarray(sel, dtype=np.int64)
        vaddr = np.broadcast_to(np.asarray(vaddr, dtype=np.uint64), sel.shape)
        live = self.active[sel]
        if size > 1:
            # hmm_xlate: a misaligned access is never made; it is a fatal fault of the lane
            mis = live & ((vaddr & _U64(size - 1)) != 0)
            if mis.any():
                self.mmu.faults.append(vaddr[mis], fatal_word(access, FATAL_MISALIGNED, size),
                                       self.lanes[sel[mis]], self.mmu.job_id)
                self.active[sel[mis]] = False
                live = live & ~mis
        if live.all():
            ok, pte = self.mmu.translate(vaddr, access, self.lanes[sel], size=size)
            self.active[sel[~ok]] = False
            return ok, pte, vaddr
        ok = np.zeros(sel.size, bool)
        pte = np.zeros(sel.size, np.uint64)
        s = sel[live]
        o, e = self.mmu.translate(vaddr[live], access, self.lanes[s], size=size)
        self.active[s[~o]] = False
        ok[live] = o
        pte[live] = e
        return ok, pte, vaddr

    def probe(self, vaddr, access, sel=None):
        return self._xlate(vaddr, access, sel)[0]

    def load(self, vaddr, dtype, sel=None):
        ok, pte, vaddr = self._xlate(vaddr, ACCESS_READ, sel, np.dtype(dtype).itemsize)
        if ok.all():
            return self.mmu.load(pte, vaddr & _U64(4095), dtype)
        out = np.zeros(ok.size, dtype=dtype)
        out[ok] = self.mmu.load(pte[ok], vaddr[ok] & _U64(4095), dtype)
        return out

    def store(self, vaddr, values, sel=None):
        values = np.asarray(values)
        ok, pte, vaddr = self._xlate(vaddr, ACCESS_WRITE, sel, values.dtype.itemsize)
        if not self.probe_pass and ok.any():
            values = np.broadcast_to(values, ok.shape)
            self.mmu.store(pte[ok], vaddr[ok] & _U64(4095), values[ok], values.dtype)

    def atomic_add(self, vaddr, values, sel=None):
        values = np.asarray(values)
        ok, pte, vaddr = self._xlate(vaddr, ACCESS_ATOMIC, sel, values.dtype.itemsize)
        values = np.broadcast_to(values, ok.shape)
        old = np.zeros(ok.size, dtype=values.dtype)
        if not self.probe_pass and ok.any():
            old[ok] = self.mmu.atomic_add(pte[ok], vaddr[ok] & _U64(4095), values[ok], values.dtype)
        return old


# ------------------------------------------------------------------------------------------------
# the twins of jobs.cu

def _bulk_translate(mmu, lanes, args, ops):
    """Translate every page of every operand for each lane; record every failing page.

    Returns (all-ok mask, per operand (first vaddr, pteA, pteB)).
    """
    nunits = int(args[2])
    lanes = np.asarray(lanes, dtype=np.int64)
    nu = np.minimum(BULK_UNITS, nunits - lanes * BULK_UNITS)
    allok = np.ones(lanes.size, bool)
    rec_pos, rec_ord, rec_va, rec_acc = [], [], [], []
    per_op = []
    for j, (ai, acc) in enumerate(ops):               # one iteration per operand (1 or 2)
        first = np.uint64(args[ai]) + lanes.astype(np.uint64) * _U64(4096)
        vA = first >> _U64(12)
        vB = (first + nu.astype(np.uint64) * _U64(16) - _U64(1)) >> _U64(12)
        okA, eA = mmu.translate(first, acc, lanes, record=False)
        two = vB != vA
        okB = np.ones(lanes.size, bool)
        eB = np.zeros(lanes.size, np.uint64)
        if two.any():
            o, e = mmu.translate(vB[two] << _U64(12), acc, lanes[two], record=False)
            okB[two] = o
            eB[two] = e
        for which, (ok, e, va) in enumerate(((okA, eA, first), (okB, eB, vB << _U64(12)))):
            p = np.flatnonzero(~ok)
            if p.size:
                rec_pos.append(p)
                rec_ord.append(np.full(p.size, 2 * j + which))
                rec_va.append(va[p])
                # translated, but to a pfn the device cannot address: fatal (bulk_translate's hmm_frame)
                rec_acc.append(np.where(pte_allows(e[p], acc), fatal_word(acc, FATAL_BAD_PFN, 16), _U64(acc)))
        allok &= okA & okB
        per_op.append((first, eA, eB))
    if rec_pos:
        pos = np.concatenate(rec_pos)
        order = np.lexsort((np.concatenate(rec_ord), pos))
        mmu.faults.append(np.concatenate(rec_va)[order], np.concatenate(rec_acc).astype(np.uint64)[order],
                          lanes[pos[order]], mmu.job_id)
    return allok, nu, per_op


def _bulk_units(c, nu, per_op):
    """Unit addresses of committing lanes ``c``: for each operand (pte, page offset) per unit."""
    cnu = nu[c]
    total = int(cnu.sum())
    starts = np.cumsum(cnu) - cnu
    rep = np.repeat(np.arange(c.size), cnu)
    k = (np.arange(total, dtype=np.int64) - starts[rep]).astype(np.uint64)
    out = []
    for first, eA, eB in per_op:
        f = first[c][rep]
        va = f + k * _U64(16)
        pte = np.where((va >> _U64(12)) == (f >> _U64(12)), eA[c][rep], eB[c][rep])
        out.append((pte, va & _U64(4095)))
    return out, starts


BULK_OPS = {"memset": ((0, ACCESS_WRITE),),
            "copy": ((0, ACCESS_WRITE), (1, ACCESS_READ)),
            "axpy": ((0, ACCESS_READ), (1, ACCESS_WRITE)),
            "reduce": ((0, ACCESS_READ),)}
BULK_CHUNK_LANES = 2048          # bounds the temporaries of a gather: 8 MiB of data per step


def _pages_memset(mmu, pte, byte):
    """memset of whole pages: a run of frames is one slice assignment, the rest one scatter."""
    for mem, _, f, runs, rest in mmu.page_runs(pte):
        for s, ln, st in runs:                        # one per long run of frames
            lo = f[s] if st > 0 else f[s + ln - 1]
            mem[lo:lo + ln] = byte
        if rest.size:
            mem[f[rest]] = byte


def _pages_reduce(mmu, pte, out):
    """Per-page sums of uint32 words (mod 2**64) into ``out``: runs summed in place, the
    scattered rest gathered a chunk at a time."""
    for mem, pos, f, runs, rest in mmu.page_runs(pte):
        words = mem.view(np.uint32)
        one = pos.size == out.size                    # every page in this memory: pos is 0..n-1
        for s, ln, st in runs:                        # one per long run of frames
            lo = f[s] if st > 0 else f[s + ln - 1]
            src = words[lo:lo + ln] if st > 0 else words[lo:lo + ln][::-1]
            if one:
                np.add.reduce(src, axis=1, dtype=np.uint64, out=out[s:s + ln])
            else:
                out[pos[s:s + ln]] = src.sum(axis=1, dtype=np.uint64)
        for lo in range(0, rest.size, BULK_CHUNK_LANES):
            r = rest[lo:lo + BULK_CHUNK_LANES]
            out[pos[r]] = np.take(words, f[r], axis=0).sum(axis=1, dtype=np.uint64)


def _bulk_apply(mmu, name, args, units, width, lanes_out, lane_starts=None):
    """The data step of a bulk job over (pte, page offset) pieces of ``width`` uint32 words:
    16-byte units (width 4), or whole pages (width 1024) when every operand is page-aligned."""
    if name == "memset":
        pte, off = units[0]
        b = np.uint32(int(args[1]) * 0x01010101)
        mmu.store(pte, off, np.full((pte.size, width), b, np.uint32), np.uint32, width)
    elif name == "copy":
        (dp, do), (sp, so) = units
        mmu.store(dp, do, mmu.load(sp, so, np.uint32, width), np.uint32, width)
    elif name == "axpy":
        (xp, xo), (yp, yo) = units
        a = np.array(int(args[3]), np.uint32).view(np.float32)
        x = mmu.load(xp, xo, np.float32, width)
        y = mmu.load(yp, yo, np.float32, width)
        mmu.store(yp, yo, a * x + y, np.float32, width)   # two roundings, like __fmul_rn/__fadd_rn
    else:
        pte, off = units[0]
        sums = mmu.load(pte, off, np.uint32, width).astype(np.uint64).sum(axis=1, dtype=np.uint64)
        args[3][lanes_out] = sums if lane_starts is None else np.add.reduceat(sums, lane_starts)


def _bulk_pages(mmu, name, args, lanes, per_op):
    """Whole-page lanes of page-aligned operands: one page of each operand per lane."""
    ptes = [eA for _, eA, _ in per_op]
    if name == "memset":
        _pages_memset(mmu, ptes[0], np.uint8(int(args[1]) & 0xFF))
    elif name == "reduce":
        sums = np.empty(lanes.size, np.uint64)
        _pages_reduce(mmu, ptes[0], sums)
        args[3][lanes] = sums
    else:
        zero = np.zeros(lanes.size, np.uint64)
        for lo in range(0, lanes.size, BULK_CHUNK_LANES):       # bounded temporaries
            sl = slice(lo, lo + BULK_CHUNK_LANES)
            _bulk_apply(mmu, name, args, [(p[sl], zero[sl]) for p in ptes], 1024, lanes[sl])


def bulk_job(mmu, state, lanes, name, args):
    ops = BULK_OPS[name]
    ok, nu, per_op = _bulk_translate(mmu, lanes, args, ops)
    c = np.flatnonzero(ok)
    if c.size < lanes.size:
        state[lanes[~ok]] = LANE_FAULTED
        per_op = [(first[c], eA[c], eB[c]) for first, eA, eB in per_op]
        lanes, nu = lanes[c], nu[c]
    if lanes.size == 0:
        return
    done = lanes
    if all(int(args[ai]) % 4096 == 0 for ai, _ in ops):
        # page-aligned operands: a full lane is exactly one page of each operand
        full = nu == BULK_UNITS
        if full.all():
            _bulk_pages(mmu, name, args, lanes, per_op)
            state[done] = LANE_DONE
            return
        if full.any():
            f = np.flatnonzero(full)
            _bulk_pages(mmu, name, args, lanes[f], [(a[f], b[f], d[f]) for a, b, d in per_op])
        keep = np.flatnonzero(~full)
        lanes, nu = lanes[keep], nu[keep]
        per_op = [(a[keep], b[keep], d[keep]) for a, b, d in per_op]
    for lo in range(0, lanes.size, BULK_CHUNK_LANES):           # bounded temporaries
        sl = slice(lo, lo + BULK_CHUNK_LANES)
        c = np.arange(lanes[sl].size)
        units, starts = _bulk_units(c, nu[sl], [(a[sl], b[sl], d[sl]) for a, b, d in per_op])
        _bulk_apply(mmu, name, args, units, 4, lanes[sl], starts)
    state[done] = LANE_DONE


def gather_lane(ctx, lanes, args):
    i = lanes.astype(np.uint64)
    dst, src, idx = (np.uint64(a) for a in args[:3])
    j = ctx.load(idx + _U64(8) * i, np.int64)
    ctx.probe(dst + _U64(4) * i, ACCESS_WRITE)
    v = ctx.load(src + _U64(4) * j.astype(np.uint64), np.uint32)
    ctx.store(dst + _U64(4) * i, v)


def list_lane(ctx, lanes, args):
    cur, sums, steps, max_steps = args[0], args[1], args[2], int(args[3])
    p, s, n = cur[lanes].copy(), sums[lanes].copy(), steps[lanes].copy()
    while True:                                   # one iteration per step along the lists
        sel = np.flatnonzero(ctx.active & (p != 0) & (n < max_steps))
        if sel.size == 0:
            break
        node = p[sel]
        if not (node & _U64(15)).any():           # 16-byte nodes: one translation, one read each
            ok, pte, _ = ctx._xlate(node, ACCESS_READ, sel, 8)
            t = sel[ok]
            words = ctx.mmu.load(pte[ok], node[ok] & _U64(4095), np.uint64, 2)
            s[t] += words[:, 1]
            n[t] += _U64(1)
            p[t] = words[:, 0]
            continue
        nxt = ctx.load(node, np.uint64, sel)
        v = ctx.load(node + _U64(8), np.uint64, sel)
        ok = ctx.active[sel]
        t = sel[ok]
        s[t] += v[ok]
        n[t] += _U64(1)
        p[t] = nxt[ok]
    cur[lanes], sums[lanes], steps[lanes] = p, s, n


def list_lane_scalar(sm, state, lanes, args):
    """list_lane of jobs.cu for a few lanes, one node at a time (see ScalarMMU)."""
    cur, sums, steps, max_steps = args[0], args[1], args[2], int(args[3])
    pages = sm.pages
    for i in lanes.tolist():                      # a few lanes: SCALAR_LANES at most
        p, s, n = int(cur[i]), int(sums[i]), int(steps[i])
        faulted = False
        while p and n < max_steps:                # one iteration per node
            off = p & 4095
            pg = pages.get(p >> 12)
            if pg is None or off > 4088 or off & 7:   # a page not read yet, a node across two
                                                      # pages, or a misaligned one (fatal)
                nxt = sm.load(p, i)
                v = None if nxt is None else sm.load(p + 8, i)
                if v is None:
                    faulted = True
                    break
            else:
                w = pg[1] + (off >> 3)
                nxt, v = pg[0][w], pg[0][w + 1]
            s += v
            n += 1
            p = nxt
        cur[i], sums[i], steps[i] = p, s & _MASK64, n
        state[i] = LANE_FAULTED if faulted else LANE_DONE


def tree_lane(ctx, lanes, args):
    cur, depth, result, keys, max_depth = args[0], args[1], args[2], args[3], int(args[4])
    p, d, r, key = cur[lanes].copy(), depth[lanes].copy(), result[lanes].copy(), keys[lanes]
    while True:                                   # one iteration per tree level
        sel = np.flatnonzero(ctx.active & (p != 0) & (d < max_depth))
        if sel.size == 0:
            break
        node = p[sel]
        if not (node & _U64(31)).any():           # 32-byte nodes: one translation, one read each
            ok, pte, _ = ctx._xlate(node + _U64(16), ACCESS_READ, sel, 8)
            words = ctx.mmu.load(pte[ok], node[ok] & _U64(4095), np.uint64, 4)
            sel = sel[ok]
            left, right, k, v = words.T
        else:
            k = ctx.load(node + _U64(16), np.uint64, sel)
            ok = ctx.active[sel]
            sel, k = sel[ok], k[ok]
            v = ctx.load(p[sel] + _U64(24), np.uint64, sel)
            left = ctx.load(p[sel], np.uint64, sel)
            right = ctx.load(p[sel] + _U64(8), np.uint64, sel)
        d[sel] += _U64(1)
        hit = k == key[sel]
        r[sel[hit]] = v[hit]
        p[sel] = np.where(hit, _U64(0), np.where(key[sel] < k, left, right))
    cur[lanes], depth[lanes], result[lanes] = p, d, r


def tree_lane_scalar(sm, state, lanes, args):
    """tree_lane of jobs.cu for a few lanes, one level at a time (see ScalarMMU)."""
    cur, depth, result, keys, max_depth = args[0], args[1], args[2], args[3], int(args[4])
    for i in lanes.tolist():                      # a few lanes: SCALAR_LANES at most
        p, d, r, key = int(cur[i]), int(depth[i]), int(result[i]), int(keys[i])
        faulted = False

        def load(vaddr):                          # hmm_load: 0 once the lane faulted
            nonlocal faulted
            x = None if faulted else sm.load(vaddr, i)
            faulted = faulted or x is None
            return x or 0
        while p and d < max_depth:                # one iteration per tree level
            k = load(p + 16)
            if faulted:
                break
            v, left, right = load(p + 24), load(p), load(p + 8)   # one page: a node is 32-byte aligned
            d += 1
            if k == key:
                r, p = v, 0
                break
            p = left if key < k else right
        cur[i], depth[i], result[i] = p, d, r
        state[i] = LANE_FAULTED if faulted else LANE_DONE


LANE_JOBS = {"gather": gather_lane, "list_chase": list_lane, "tree_search": tree_lane}
SCALAR_JOBS = {"list_chase": list_lane_scalar, "tree_search": tree_lane_scalar}


def run_lanes(mmu, state, lanes, fn, args, two_phase):
    """hmm_run_lanes: optional probe pass (on copies of the scratch arrays, so a lane's scratch
    is written only by its commit pass), then the real pass; lane states updated."""
    if two_phase:
        ctx = NumpyLaneContext(mmu, lanes, probe=True)
        fn(ctx, lanes, [a.copy() if isinstance(a, np.ndarray) else a for a in args])
        state[lanes[ctx.faulted]] = LANE_FAULTED
        lanes = lanes[ctx.active]
        if lanes.size == 0:
            return
    ctx = NumpyLaneContext(mmu, lanes)
    fn(ctx, lanes, args)
    state[lanes] = np.where(ctx.active, LANE_DONE, LANE_FAULTED).astype(np.uint8)


class _Job:
    def __init__(self, spec, job_id):
        self.spec = spec
        self.job_id = job_id
        self.state = np.zeros(spec.nlanes, dtype=np.uint8)
        self.args = [a.copy() if isinstance(a, np.ndarray) else
                     np.zeros(a.n, a.dtype) if isinstance(a, Zeros) else a for a in spec.args]


class NumpyJobExecutor:
    def __init__(self, device):
        self.dev = device                  # a weak proxy: the device owns its executor
        self.mmu = NumpyMMU(device.arena, device.host_arena, device.pfn_base, device.nframes,
                            device.fault_buffer.hw)

    def prepare(self, spec, job_id):
        if spec.user is not None and spec.user.numpy_lane is None:
            raise ValueError(f"user job '{spec.name}' has no NumPy lane function for the numpy backend")
        return _Job(spec, job_id)

    def launch(self, h, lanes, lo, n, nodes):
        """Run lanes ``lanes[lo:lo + n]`` (``lo .. lo + n - 1`` when ``lanes`` is None)."""
        self.mmu.begin_slice(nodes, h.job_id)
        peers = self.dev.peers             # read per slice: a peer disabled or gone is not reached
        if peers:
            self.mmu.set_peers((q.pfn_base, q.nframes, q.arena.frames) for q in peers)
        try:
            self._run(h, lanes, lo, n)
        finally:
            if peers:                      # hold no peer's memory between slices
                self.mmu.set_peers(())
        return DONE

    def _run(self, h, lanes, lo, n):
        lanes = np.arange(lo, lo + n, dtype=np.int64) if lanes is None else lanes[lo:lo + n]
        spec = h.spec
        if spec.user is not None:
            run_lanes(self.mmu, h.state, lanes, spec.user.numpy_lane, h.args, True)
        elif spec.warp:
            bulk_job(self.mmu, h.state, lanes, spec.name, h.args)
        elif lanes.size <= SCALAR_LANES and spec.name in SCALAR_JOBS:
            SCALAR_JOBS[spec.name](ScalarMMU(self.mmu), h.state, lanes, h.args)
        else:
            run_lanes(self.mmu, h.state, lanes, LANE_JOBS[spec.name], h.args, False)

    def sync(self):
        pass

    def faulted_lanes(self, h):
        """Every lane marked FAULTED (the ring dropped some of their records)."""
        return np.flatnonzero(h.state == LANE_FAULTED)

    def finish(self, h):
        return tuple(h.args[i] for i in h.spec.outputs)
