"""Physical memory: the pfn space, struct page as arrays, and the RAM frame allocator.

Stands for mm/page_alloc.c, include/linux/mm_types.h (struct page) and the
physical-range bookkeeping of kernel/resource.c (request_free_mem_region).

One global pfn space: system RAM is pfns [0, nr_ram) in the backend's host
arena; every ``memremap_pages`` adds a segment of device frames above it, in that
device's own arena.  ``struct page`` is a struct-of-arrays indexed by pfn, grown
when a segment is added.  Pages follow today's refcount rule: a page is free
when its refcount drops to 0; RAM pages return to the allocator, ZONE_DEVICE
pages are handed to their pgmap's ``ops.page_free`` in one batched call.
"""
import errno
import threading

import numpy as np

from ..constants import PAGE_SIZE
from ..errors import oserror

PG_LOCKED = np.uint32(1 << 0)
PG_DIRTY = np.uint32(1 << 1)
PG_ANON = np.uint32(1 << 2)
PG_ZONE_DEVICE = np.uint32(1 << 3)
PG_UPTODATE = np.uint32(1 << 4)
PG_SWAPBACKED = np.uint32(1 << 5)
PG_RESERVED = np.uint32(1 << 6)
PG_ANON_EXCLUSIVE = np.uint32(1 << 7)   # PageAnonExclusive: only this mapping may see the page

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
              ("mapping", np.int32, -1), ("index", np.int64, 0), ("zone_device_data", np.int64, 0))

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
        self._lock_waiters = 0                          # how many sleep on ``unlocked``
        self.nr_ram = int(nr_ram)
        self.ram = backend.host_arena(self.nr_ram)
        self.segments = [Segment(0, self.ram, -1)]
        self.pgmaps = []
        self.pgmaps_seq = 0       # bumped whenever ``pgmaps`` changes (caches of it compare this)
        self.pages = StructPages(self.nr_ram)
        self.memcgs = []          # index -> MemCgroup, set by System
        self.oom = None           # callable(npages, memcg) -> bool: something was freed
        # The shared zero page: pfn 0, mapped read-only wherever untouched anon memory is read.
        self.zero_pfn = 0
        self.pages.flags[0] = PG_RESERVED | PG_UPTODATE
        self.pages.refcount[0] = 1
        # Free RAM frames as a stack; low pfns come out first, which keeps dumps readable.
        self._free = np.arange(self.nr_ram - 1, 0, -1, dtype=np.int64)
        self._nfree = self._free.size
        self._next_region = self.nr_ram

    # -- RAM frame allocator ---------------------------------------------------------
    def nr_free(self):
        return self._nfree

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
                if charged and self._nfree >= n:
                    pfns = self._free[self._nfree - n:self._nfree][::-1].copy()
                    self._nfree -= n
                    self.pages.refcount[pfns] = 1
                    self.pages.memcg[pfns] = -1 if memcg is None else memcg.id
                    break
                if charged and memcg is not None:
                    memcg.uncharge(n)
                why = (None if charged else memcg)
                free = self._nfree
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
            if dead.max() < self.nr_ram:
                self._free_ram(dead)
                return
            ram = dead[dead < self.nr_ram]
            if ram.size:
                self._free_ram(ram)
            self._free_device(dead[dead >= self.nr_ram])

    def _free_device(self, pfns):
        """The last reference to device pages went: free_zone_device_folio() -> page_free."""
        self._uncharge(pfns)
        owners = self.pages.pgmap[pfns]
        for idx in np.unique(owners).tolist():
            sel = pfns[owners == idx]
            self.pages.reset(sel)
            self.pages.flags[sel] = PG_ZONE_DEVICE
            pgmap = self.pgmaps[idx]
            pgmap.ops.page_free(sel)

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
            base = self._next_region
            self._next_region += int(nframes)
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
            self.segments.append(Segment(base, arena, idx))
            self.segments.sort(key=lambda s: s.base)
            self.pages.grow(seg_end)
            self.pages.pgmap[base:seg_end] = idx
            self.pages.flags[base:seg_end] = PG_ZONE_DEVICE
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
            self.segments.remove(seg)
            self.pgmaps[seg.pgmap_index] = None
            self.pgmaps_seq += 1
            self.pages.pgmap[seg.base:seg.end] = -1
            self.pages.flags[seg.base:seg.end] = 0

    def segment_of(self, pfns):
        """Index into ``self.segments`` of every pfn (-1 outside any segment)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        bases = np.array([s.base for s in self.segments], dtype=np.int64)
        ends = np.array([s.end for s in self.segments], dtype=np.int64)
        i = np.searchsorted(bases, pfns, side="right") - 1
        ok = (i >= 0) & (pfns < ends[np.maximum(i, 0)])
        return np.where(ok, i, -1)

    def _split(self, pfns):
        """Yield (segment, positions, frame indices) grouping ``pfns`` by segment."""
        pfns = np.asarray(pfns, dtype=np.int64)
        if pfns.size and pfns.min() >= 0 and pfns.max() < self.nr_ram:
            yield self.segments[0], slice(None), pfns
            return
        seg = self.segment_of(pfns)
        if (seg < 0).any():
            bad = pfns[seg < 0][0]
            raise oserror(errno.EFAULT, f"pfn {int(bad)} is not backed by any memory")
        for si in np.unique(seg).tolist():
            pos = np.nonzero(seg == si)[0]
            s = self.segments[si]
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
