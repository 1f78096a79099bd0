"""Physical memory: the pfn space, struct page as arrays, and the RAM frame allocator.

Stands for mm/page_alloc.c, include/linux/mm_types.h (struct page) and the
physical-range bookkeeping of kernel/resource.c (request_free_mem_region).

One global pfn space: system RAM is pfns [0, nr_ram) in the backend's host
arena; every ``memremap_pages`` adds a segment of device frames above it, in that
device's own arena.  ``struct page`` is a struct-of-arrays indexed by pfn, grown
when a segment is added.  Pages follow today's refcount rule: a page is free
when its refcount drops to 0; RAM pages return to the allocator, ZONE_DEVICE
pages are handed to their pgmap's ``ops.folio_free`` (or, for drivers written
to the older name, ``ops.page_free``) in one batched call.

Large folios (a THP, a hugetlb page, a driver's 2 MiB device folio) are
naturally aligned runs of 2**order pages: every page of one carries the
folio's ``order`` and the first one PG_HEAD, so compound_head() of any page is
its pfn rounded down to the folio size.  Reference and map counts stay per
4 KiB page (a PMD mapping holds one of each on every page it maps, as the
page tables hold one entry per page); the folio is free when every page of it
is.  A folio some of whose pages are freed while others are still in use is
split at once into order-0 pages: the work deferred_split_scan() does for a
partially unmapped THP, done when it becomes possible, as reclaim would.
"""
import errno
import threading

import numpy as np

from ..constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER, PAGE_SIZE
from ..errors import oserror

PG_LOCKED = np.uint32(1 << 0)
PG_DIRTY = np.uint32(1 << 1)
PG_ANON = np.uint32(1 << 2)
PG_ZONE_DEVICE = np.uint32(1 << 3)
PG_UPTODATE = np.uint32(1 << 4)
PG_SWAPBACKED = np.uint32(1 << 5)
PG_RESERVED = np.uint32(1 << 6)
PG_ANON_EXCLUSIVE = np.uint32(1 << 7)   # PageAnonExclusive: only this mapping may see the page
PG_HEAD = np.uint32(1 << 8)             # PageHead: the first page of a large folio
PG_HUGETLB = np.uint32(1 << 9)          # folio_test_hugetlb: a page of the hugetlbfs pool

# Capability mask of a coherent-memory node (the CDM thread in reference/): what the kernel may
# do with its pages.  memremap_pages gives each coherent pgmap a node with the driver's mask.
NODE_ALLOW_NUMA_BALANCING = 1 << 0
NODE_ALLOW_KSM = 1 << 1
NODE_ALLOW_LONGTERM_PIN = 1 << 2
NODE_ALLOW_HUGETLB = 1 << 3
NODE_ALLOW_FALLBACK_ALLOC = 1 << 4   # may the page allocator hand these pages to anyone
NODE_ALLOW_ALL = (1 << 5) - 1
# enum memory_type (include/linux/memremap.h): what kind of ZONE_DEVICE memory a pgmap holds
MEMORY_DEVICE_PRIVATE = 1
MEMORY_DEVICE_COHERENT = 2
MEMORY_DEVICE_FS_DAX = 3
MEMORY_DEVICE_GENERIC = 4
MEMORY_DEVICE_PCI_P2PDMA = 5


def add_at(counts, pfns, delta, unique=False):
    """counts[pfns] += delta with repeated pfns counted each time (np.add.at, but fast).

    ``unique=True`` promises no repeats (one VMA's pages): plain fancy indexing.
    Otherwise ufunc.at costs tens of ns per element, and for a batch that is a
    sizeable share of the array one bincount pass is several times cheaper.
    """
    pfns = np.asarray(pfns, dtype=np.int64)
    if unique:
        counts[pfns] += delta
    elif pfns.size * 8 > counts.size:
        counts += (np.bincount(pfns, minlength=counts.size) * delta).astype(counts.dtype)
    else:
        np.add.at(counts, pfns, delta)


class StructPages:
    """struct page for every pfn, as parallel arrays."""

    FIELDS = (("refcount", np.int32, 0), ("mapcount", np.int32, 0), ("pincount", np.int32, 0),
              ("flags", np.uint32, 0), ("pgmap", np.int32, -1), ("memcg", np.int32, -1),
              ("mapping", np.int32, -1), ("index", np.int64, 0), ("zone_device_data", np.int64, 0),
              ("order", np.int8, 0))

    def __init__(self, n):
        self.n = 0
        for name, dtype, fill in self.FIELDS:
            setattr(self, name, np.full(0, fill, dtype=dtype))
        self.grow(n)

    def grow(self, n):
        if n <= self.n:
            return
        for name, dtype, fill in self.FIELDS:
            old = getattr(self, name)
            new = np.full(n, fill, dtype=dtype)
            new[:old.size] = old
            setattr(self, name, new)
        self.n = n

    # A frame is freed when its refcount reaches 0, and mappings and pins hold references, so
    # refcount, mapcount and pincount are 0 already; pgmap is the frame's owner and stays.
    _RESET = tuple((name, fill) for name, _dtype, fill in FIELDS
                   if name not in ("pgmap", "refcount", "mapcount", "pincount"))

    def reset(self, pfns):
        """Back to the state of a free frame (what a free frame's counts already say aside)."""
        for name, fill in self._RESET:
            getattr(self, name)[pfns] = fill


class Segment:
    def __init__(self, base, arena, pgmap_index):
        self.base = int(base)
        self.nframes = arena.nframes
        self.end = self.base + self.nframes
        self.arena = arena
        self.pgmap_index = pgmap_index


class PhysicalMemory:
    """The machine's page frames.  All methods take NumPy pfn arrays."""

    def __init__(self, backend, nr_ram):
        if nr_ram < 16:
            raise ValueError(f"ram of {nr_ram} pages is too small (at least 16)")
        self.backend = backend
        self.lock = threading.RLock()
        self.unlocked = threading.Condition(self.lock)  # page-lock waiters (folio_wait_locked)
        # The reverse-map lock (anon_vma / i_mmap locks in Linux): a walk that finds pages'
        # mappings through the VMAs of every process (rmap.py) holds it while it lists and
        # updates them, and every change to a VMA's bounds or PTE array takes it, so a split
        # never happens under a walk.  Taken before ``lock``, never inside it.
        self.rmap_lock = threading.RLock()
        self._lock_waiters = 0                          # how many sleep on ``unlocked``
        self.nr_ram = int(nr_ram)
        self.ram = backend.host_arena(self.nr_ram)
        # Sorted by base.  Never changed in place: add/remove_segment build a new tuple, so a
        # reader that took ``self.segments`` once (``_split``) indexes the list it searched even
        # while a driver hotplugs or unplugs a chunk in another thread.
        self.segments = (Segment(0, self.ram, -1),)
        self.pgmaps = []
        self.pgmaps_seq = 0       # bumped whenever ``pgmaps`` changes (caches of it compare this)
        self.pages = StructPages(self.nr_ram)
        self.memcgs = []          # index -> MemCgroup, set by System
        self.oom = None           # callable(npages, memcg) -> bool: something was freed
        # Large folios alive (THPs, device folios, hugetlb pages): while there are none, freeing
        # never needs to look at a page's order.
        self.nr_folios = 0
        self.huge_zero_pfn = -1   # the huge zero folio, allocated on first use
        self.hugetlb = None       # the hugetlbfs pool (mm/hugetlb.py), set by System
        # The shared zero page: pfn 0, mapped read-only wherever untouched anon memory is read.
        self.zero_pfn = 0
        self.pages.flags[0] = PG_RESERVED | PG_UPTODATE
        self.pages.refcount[0] = 1
        # Free RAM frames as a stack; low pfns come out first, which keeps dumps readable.
        self._free = np.arange(self.nr_ram - 1, 0, -1, dtype=np.int64)
        self._nfree = self._free.size
        # Whole 2 MiB blocks that came back as folios, by head: a THP allocation takes them
        # first, an order-0 one only when the stack runs dry (a buddy allocator keeps them whole).
        self._blocks = np.empty(self.nr_ram // HPAGE_PMD_NR + 1, dtype=np.int64)
        self._nblocks = 0
        self._next_region = self.nr_ram

    # -- RAM frame allocator ---------------------------------------------------------
    def nr_free(self):
        return self._nfree + self._nblocks * HPAGE_PMD_NR

    def _break_blocks(self, npages):
        """Order-0 allocations need ``npages`` more frames than the stack has: free 2 MiB
        blocks go onto it, lowest frames on top."""
        k = min(self._nblocks, -(-npages // HPAGE_PMD_NR))
        heads = self._blocks[self._nblocks - k:self._nblocks]
        self._nblocks -= k
        pages = np.sort(self.folio_pages(heads))[::-1]
        self._free[self._nfree:self._nfree + pages.size] = pages
        self._nfree += pages.size

    def alloc(self, n, memcg=None, zero=True):
        """Allocate ``n`` RAM pages with refcount 1, charged to ``memcg``.

        Out of memory (system-wide or over the memcg limit), the OOM killer runs
        (``self.oom``); if nothing can be freed this raises OSError(ENOMEM).
        """
        n = int(n)
        if n == 0:
            return np.zeros(0, np.int64)
        # The OOM killer tears processes down, which takes their mmap_lock: it must run
        # with the page-table lock released, or a victim busy in another thread that
        # waits for this lock would never let go of its mmap_lock.
        while True:
            with self.lock:
                charged = memcg is None or memcg.try_charge(n)
                if charged and self._nfree < n and self._nblocks:
                    self._break_blocks(n - self._nfree)
                if charged and self._nfree >= n:
                    pfns = self._free[self._nfree - n:self._nfree][::-1].copy()
                    self._nfree -= n
                    self.pages.refcount[pfns] = 1
                    self.pages.memcg[pfns] = -1 if memcg is None else memcg.id
                    break
                if charged and memcg is not None:
                    memcg.uncharge(n)
                why = (None if charged else memcg)
                free = self.nr_free()
            if not (self.oom and self.oom(n, why)):
                if why is not None:
                    raise oserror(errno.ENOMEM, f"memory cgroup {memcg.name!r} is over its limit "
                                  f"({memcg.usage} + {n * PAGE_SIZE} > {memcg.limit} bytes) "
                                  "and the OOM killer found nothing to kill")
                raise oserror(errno.ENOMEM, f"out of system memory: {n} pages wanted, {free} free, "
                              "and the OOM killer found nothing to kill")
        if zero:
            self.ram.fill(pfns, 0)
        return pfns

    def _free_ram(self, pfns):
        self._uncharge(pfns)
        self.pages.reset(pfns)
        end = self._nfree + pfns.size
        # Pushed highest first, so the next alloc() pops them lowest first: a freed range comes
        # back as ascending runs, which the fault path zeroes and the device maps run by run.
        if pfns.size > 1 and not (pfns[1:] < pfns[:-1]).all():
            pfns = np.sort(pfns)[::-1]
        self._free[self._nfree:end] = pfns
        self._nfree = end

    # -- large folios ------------------------------------------------------------------
    def alloc_folios(self, n, order=HPAGE_PMD_ORDER, memcg=None, zero=True):
        """folio_alloc() of up to ``n`` naturally aligned folios of 2**order RAM pages.

        Returns their head pfns (refcount 1 on every page, charged to ``memcg``).  As a THP
        allocation (GFP_TRANSHUGE_LIGHT) it never runs the OOM killer: what cannot be had --
        no whole free block, or a memcg over its limit -- is simply not returned, and the
        caller falls back to small pages.  Whole free blocks are taken from the top of RAM,
        since order-0 allocations take the lowest frames first.
        """
        n, nr = int(n), 1 << order
        if n <= 0 or self.nr_free() < nr:
            return np.zeros(0, np.int64)
        with self.lock:
            k = min(n, self._nblocks) if order == HPAGE_PMD_ORDER else 0
            take = np.sort(self._blocks[self._nblocks - k:self._nblocks]) >> order
            if k < n and self._nfree >= nr:
                # whole free blocks in the order-0 stack: the highest, in ascending order (one
                # run of frames where possible)
                stack = self._free[:self._nfree]
                free = np.zeros(self.nr_ram, dtype=bool)
                free[stack] = True
                nb = self.nr_ram >> order
                blocks = np.nonzero(free[:nb << order].reshape(nb, nr).all(axis=1))[0]
                take = np.concatenate((take, blocks[-(n - k):] if n > k else blocks[:0]))
            if memcg is not None and take.size:
                room = max(0, (memcg.limit - memcg.usage) // PAGE_SIZE) if memcg.limit is not None else None
                if room is not None:
                    take = take[:room // nr]
                if take.size and not memcg.try_charge(take.size * nr):
                    take = take[:0]
            if take.size == 0:
                return np.zeros(0, np.int64)
            heads = take << order
            pages = (heads[:, None] + np.arange(nr, dtype=np.int64)).reshape(-1)
            from_blocks = np.isin(heads, self._blocks[self._nblocks - k:self._nblocks]) if k else None
            if from_blocks is not None:
                self._nblocks -= k
                # blocks taken from the list but not used (the memcg had room for fewer)
                unused = np.setdiff1d(self._blocks[self._nblocks:self._nblocks + k], heads)
                self._blocks[self._nblocks:self._nblocks + unused.size] = unused
                self._nblocks += unused.size
            stacked = pages if from_blocks is None else pages[np.repeat(~from_blocks, nr)]
            if stacked.size:
                free[stacked] = False
                kept = stack[free[stack]]
                self._free[:kept.size] = kept
                self._nfree = kept.size
            pg = self.pages
            pg.refcount[pages] = 1
            pg.memcg[pages] = -1 if memcg is None else memcg.id
            pg.order[pages] = order
            pg.flags[heads] |= PG_HEAD
            self.nr_folios += int(heads.size)
        if zero:
            self.ram.fill(pages, 0)
        return heads

    def folio_pages(self, heads, order=HPAGE_PMD_ORDER):
        """Every page of the folios at ``heads``, folio by folio."""
        heads = np.asarray(heads, dtype=np.int64)
        return (heads[:, None] + np.arange(1 << order, dtype=np.int64)).reshape(-1)

    def folio_order(self, pfns):
        return self.pages.order[np.asarray(pfns, dtype=np.int64)].astype(np.int64)

    def compound_head(self, pfns):
        """compound_head(): each page's folio head (the page itself when order 0)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        o = self.pages.order[pfns].astype(np.int64)
        return (pfns >> o) << o

    def zero_mask(self, pfns):
        """is_zero_pfn() || is_huge_zero_pfn(): the pages read faults of untouched anonymous
        memory map, which hold neither a reference nor a mapcount."""
        if self.huge_zero_pfn < 0:
            return pfns == self.zero_pfn
        return (pfns == self.zero_pfn) | ((pfns & ~(HPAGE_PMD_NR - 1)) == self.huge_zero_pfn)

    def huge_zero_folio(self):
        """mm_get_huge_zero_folio(): the shared 2 MiB zero folio (allocated on first use and
        kept), or -1 when no whole free block is left, in which case a read fault maps the
        small zero page instead."""
        if self.huge_zero_pfn < 0:
            heads = self.alloc_folios(1, HPAGE_PMD_ORDER, None, zero=True)
            if heads.size:
                with self.lock:
                    pages = self.folio_pages(heads)
                    self.pages.flags[pages] |= PG_RESERVED | PG_UPTODATE
                    self.huge_zero_pfn = int(heads[0])
                    self.nr_folios -= 1       # never freed: put() need not know it
        return self.huge_zero_pfn

    def split_folios(self, heads):
        """__split_unmapped_folio() to order 0 for the folios at ``heads``: the pages stay where
        they are, each now a folio of its own; a driver hears of its device folios through
        ``ops.folio_split(heads, order)``.  The caller has dealt with the mappings (no PMD maps
        a split folio)."""
        heads = np.asarray(heads, dtype=np.int64)
        if heads.size == 0:
            return
        with self.lock:
            pg = self.pages
            for order in np.unique(pg.order[heads]).tolist():
                h = heads[pg.order[heads] == order]
                if order == 0:
                    continue
                dev = h[h >= self.nr_ram]
                if dev.size:
                    owners = pg.pgmap[dev]
                    for idx in np.unique(owners).tolist():
                        split = getattr(self.pgmaps[idx].ops, "folio_split", None)
                        if split is not None:
                            split(dev[owners == idx], order)
                pages = self.folio_pages(h, order)
                pg.order[pages] = 0
                pg.flags[h] &= ~PG_HEAD
                self.nr_folios -= int(h.size)

    def _free_large(self, dead):
        """The pages of ``dead`` that belong to large folios: whole folios free go back as
        folios; a folio only part of which is free is split (see the module docstring);
        hugetlb pages wait for the rest of their page.  Returns the order-0 pages left to free."""
        pg = self.pages
        o = pg.order[dead]
        big = o != 0
        if not np.count_nonzero(big):
            return dead
        small = [dead[~big]]
        bp, bo = dead[big], o[big].astype(np.int64)
        heads, first = np.unique((bp >> bo) << bo, return_index=True)
        orders = bo[first]
        for order in np.unique(orders).tolist():
            h = heads[orders == order]
            nr = 1 << order
            pages = self.folio_pages(h, order).reshape(h.size, nr)
            whole = ~(pg.refcount[pages] != 0).any(axis=1)
            tlb = (pg.flags[h] & PG_HUGETLB) != 0
            if np.count_nonzero(whole & tlb):
                self.hugetlb.free_folios(h[whole & tlb])
            free = whole & ~tlb
            if np.count_nonzero(free):
                fh = h[free]
                self.nr_folios -= int(fh.size)
                ram = fh[fh < self.nr_ram]
                if ram.size:
                    fp = self.folio_pages(ram, order)
                    self._uncharge(fp)
                    self.pages.reset(fp)
                    if order == HPAGE_PMD_ORDER:       # kept whole for the next THP
                        self._blocks[self._nblocks:self._nblocks + ram.size] = ram
                        self._nblocks += ram.size
                    else:
                        self._free_ram(fp)
                dev = fh[fh >= self.nr_ram]
                if dev.size:
                    self._free_device(dev, order)
            part = ~whole & ~tlb
            if np.count_nonzero(part):
                self.split_folios(h[part])
                small.append(bp[np.isin(bp >> bo << bo, h[part])])
        return np.concatenate(small) if len(small) > 1 else small[0]

    def _uncharge(self, pfns):
        if not self.memcgs:
            return                         # no memory cgroup: nothing was ever charged
        cg = self.pages.memcg[pfns]
        cg = cg[cg >= 0]
        if cg.size:
            ids, counts = np.unique(cg, return_counts=True)
            for i, c in zip(ids.tolist(), counts.tolist()):
                self.memcgs[i].uncharge(c)

    # -- references ----------------------------------------------------------------
    def get(self, pfns, unique=False):
        """get_page() on every pfn (duplicates count twice).

        ``unique=True`` promises no pfn is listed twice (a migration batch), which
        allows plain fancy indexing instead of the much slower ``ufunc.at``.
        """
        pfns = np.asarray(pfns, dtype=np.int64)
        with self.lock:
            if unique:
                self.pages.refcount[pfns] += 1
            else:
                add_at(self.pages.refcount, pfns, 1)

    def put(self, pfns, unique=False):
        """put_page() on every pfn; pages reaching 0 are freed (batched page_free for devices)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        if pfns.size == 0:
            return
        with self.lock:
            if unique:
                cand = pfns
                rc = self.pages.refcount[cand] - 1
                self.pages.refcount[cand] = rc
            else:
                add_at(self.pages.refcount, pfns, -1)
                cand = np.unique(pfns)
                rc = self.pages.refcount[cand]
            if np.count_nonzero(rc < 0):
                bad = cand[rc < 0]
                raise AssertionError(f"refcount underflow on pfn(s) {bad[:8].tolist()}")
            dead = cand[rc == 0]
            if dead.size == 0:
                return
            if self.nr_folios:
                dead = self._free_large(dead)
                if dead.size == 0:
                    return
            if dead.max() < self.nr_ram:
                self._free_ram(dead)
                return
            ram = dead[dead < self.nr_ram]
            if ram.size:
                self._free_ram(ram)
            self._free_device(dead[dead >= self.nr_ram])

    def _free_device(self, heads, order=0):
        """The last reference to device folios went: free_zone_device_folio() hands each pgmap
        its folios in one call, ``ops.folio_free(heads, order)``, or ``ops.page_free(pfns)``
        with every page of them for a driver that only knows the older name."""
        pfns = heads if order == 0 else self.folio_pages(heads, order)
        self._uncharge(pfns)
        owners = self.pages.pgmap[heads]
        for idx in np.unique(owners).tolist():
            sel = heads[owners == idx]
            pages = sel if order == 0 else self.folio_pages(sel, order)
            self.pages.reset(pages)
            self.pages.flags[pages] = PG_ZONE_DEVICE
            ops = self.pgmaps[idx].ops
            folio_free = getattr(ops, "folio_free", None)
            if folio_free is not None:
                folio_free(sel, order)
            else:
                ops.page_free(pages)

    # -- page locks (trylock bits) -------------------------------------------------
    def trylock(self, pfns, unique=False):
        """folio_trylock() on each pfn; returns a mask of the ones now locked by the caller."""
        pfns = np.asarray(pfns, dtype=np.int64)
        with self.lock:
            got = (self.pages.flags[pfns] & PG_LOCKED) == 0
            if not unique:
                # a pfn listed twice can only be taken once
                _, first = np.unique(pfns, return_index=True)
                once = np.zeros(pfns.size, bool)
                once[first] = True
                got &= once
            self.pages.flags[pfns[got]] |= PG_LOCKED
            return got

    def unlock(self, pfns):
        pfns = np.asarray(pfns, dtype=np.int64)
        with self.lock:
            self.pages.flags[pfns] &= ~PG_LOCKED
            if self._lock_waiters:
                self.unlocked.notify_all()

    def wait_unlocked(self, pfn, timeout=10.0):
        """migration_entry_wait(): sleep until ``pfn`` is unlocked."""
        with self.lock:
            self._lock_waiters += 1
            try:
                ok = self.unlocked.wait_for(lambda: not (self.pages.flags[pfn] & PG_LOCKED), timeout)
            finally:
                self._lock_waiters -= 1
        if not ok:
            raise oserror(errno.EDEADLK, f"page frame {pfn} stayed locked for {timeout} s")

    # -- segments ---------------------------------------------------------------
    def request_free_mem_region(self, nframes):
        """A free physical range above everything taken so far; returns its base pfn."""
        with self.lock:
            # PMD-aligned, so that a driver's 2 MiB device folios are naturally aligned pfns
            base = -(-self._next_region // HPAGE_PMD_NR) * HPAGE_PMD_NR
            self._next_region = base + int(nframes)
            return base

    def add_segment(self, base, arena, pgmap):
        """Give the frames of ``arena`` the pfns [base, base+nframes), owned by ``pgmap``."""
        with self.lock:
            seg_end = base + arena.nframes
            for s in self.segments:
                if s.base < seg_end and base < s.end:
                    raise oserror(errno.EBUSY, f"physical range pfn [{base}, {seg_end}) overlaps "
                                  f"pfn [{s.base}, {s.end})")
            idx = len(self.pgmaps)
            self.pgmaps.append(pgmap)
            self.pgmaps_seq += 1
            self.pages.grow(seg_end)
            self.pages.pgmap[base:seg_end] = idx
            self.pages.flags[base:seg_end] = PG_ZONE_DEVICE
            self.segments = tuple(sorted(self.segments + (Segment(base, arena, idx),), key=lambda s: s.base))
            return idx

    def remove_segment(self, base):
        with self.lock:
            seg = next((s for s in self.segments if s.base == base and s.pgmap_index >= 0), None)
            if seg is None:
                raise oserror(errno.EINVAL, f"no device segment starts at pfn {base}")
            busy = np.nonzero(self.pages.refcount[seg.base:seg.end])[0]
            if busy.size:
                raise oserror(errno.EBUSY, f"device pfn {seg.base + int(busy[0])} still has references "
                              f"({busy.size} pages in use)")
            self.segments = tuple(s for s in self.segments if s is not seg)
            self.pgmaps[seg.pgmap_index] = None
            self.pgmaps_seq += 1
            self.pages.pgmap[seg.base:seg.end] = -1
            self.pages.flags[seg.base:seg.end] = 0

    def segment_of(self, pfns, segments=None):
        """Index into ``segments`` (default ``self.segments``) of every pfn (-1 outside any)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        segments = self.segments if segments is None else segments
        bases = np.array([s.base for s in segments], dtype=np.int64)
        ends = np.array([s.end for s in segments], dtype=np.int64)
        i = np.searchsorted(bases, pfns, side="right") - 1
        ok = (i >= 0) & (pfns < ends[np.maximum(i, 0)])
        return np.where(ok, i, -1)

    def _split(self, pfns):
        """Yield (segment, positions, frame indices) grouping ``pfns`` by segment."""
        pfns = np.asarray(pfns, dtype=np.int64)
        segments = self.segments
        if pfns.size and pfns.min() >= 0 and pfns.max() < self.nr_ram:
            yield segments[0], slice(None), pfns
            return
        seg = self.segment_of(pfns, segments)
        if (seg < 0).any():
            bad = pfns[seg < 0][0]
            raise oserror(errno.EFAULT, f"pfn {int(bad)} is not backed by any memory")
        for si in np.unique(seg).tolist():
            pos = np.nonzero(seg == si)[0]
            s = segments[si]
            yield s, pos, pfns[pos] - s.base

    # -- data (through the arenas) -----------------------------------------------
    def read(self, pfns):
        pfns = np.asarray(pfns, dtype=np.int64)
        out = np.empty((pfns.size, PAGE_SIZE), dtype=np.uint8)
        for s, pos, idx in self._split(pfns):
            out[pos] = s.arena.read(idx)
        return out

    def write(self, pfns, data):
        pfns = np.asarray(pfns, dtype=np.int64)
        data = np.asarray(data, dtype=np.uint8).reshape(pfns.size, PAGE_SIZE)
        for s, pos, idx in self._split(pfns):
            s.arena.write(idx, data[pos])

    def fill(self, pfns, value=0):
        for s, pos, idx in self._split(pfns):
            s.arena.fill(idx, value)

    def copy(self, dst_pfns, src_pfns):
        """Copy page contents src -> dst, through the DMA engine when a device is involved."""
        dst_pfns = np.asarray(dst_pfns, dtype=np.int64)
        src_pfns = np.asarray(src_pfns, dtype=np.int64)
        fences = []
        for sd, dpos, didx in self._split(dst_pfns):
            sub_src = src_pfns[dpos]
            for ss, spos, sidx in self._split(sub_src):
                d = didx[spos] if not isinstance(spos, slice) else didx
                if sd.arena.kind == "host" and ss.arena.kind == "host":
                    sd.arena.host[d] = ss.arena.host[sidx]
                else:
                    fences.append(self.dma().copy(sd.arena, d, ss.arena, sidx))
        for f in fences:
            f.wait()

    def dma(self):
        if not hasattr(self, "_dma"):
            self._dma = self.backend.dma_engine()
        return self._dma

    def node_allows(self, pfns, feature):
        """page_node_allow(): may ``feature`` (a NODE_ALLOW_* bit) use these pages?  A mask.

        System RAM allows everything; device-private memory nothing (the CPU cannot even
        address it); coherent memory what its driver allowed at registration."""
        pfns = np.asarray(pfns, dtype=np.int64)
        out = np.ones(pfns.shape, dtype=bool)
        dev = pfns >= self.nr_ram
        if not dev.any():
            return out
        caps = self.pgmap_table("caps", lambda p: p.node.caps if getattr(p, "node", None) is not None else 0)
        out[dev] = (caps[self.pages.pgmap[pfns[dev]]] & int(feature)) != 0
        return out

    def longterm_pinnable(self, pfns):
        """folio_is_longterm_pinnable(): RAM, or device memory whose node allows long-term pins."""
        return self.node_allows(pfns, NODE_ALLOW_LONGTERM_PIN)

    def pgmap_table(self, key, make):
        """An array indexed by pgmap index (+1 slot for "none" at the end) of ``make(pgmap)``
        for every pgmap, kept until the set of pgmaps changes."""
        cache = self.__dict__.setdefault("_pgmap_tables", {})
        got = cache.get(key)
        if got is None or got[0] != self.pgmaps_seq:
            if len(cache) > 64:
                cache.clear()
            got = (self.pgmaps_seq, np.array([make(p) if p is not None else 0 for p in self.pgmaps] + [0]))
            cache[key] = got
        return got[1]

    def zone_device_type(self, pfns):
        """The memory_type of each pfn's pgmap, 0 for system RAM."""
        pfns = np.asarray(pfns, dtype=np.int64)
        dev = pfns >= self.nr_ram
        ndev = np.count_nonzero(dev)
        if not ndev:
            return np.zeros(pfns.shape, dtype=np.int64)
        types = self.pgmap_table("type", lambda p: getattr(p, "type", 0))
        if ndev == pfns.size:
            return types[self.pages.pgmap[pfns]]
        out = np.zeros(pfns.shape, dtype=np.int64)
        out[dev] = types[self.pages.pgmap[pfns[dev]]]
        return out

    def is_device(self, pfns):
        return np.asarray(pfns, dtype=np.int64) >= self.nr_ram
