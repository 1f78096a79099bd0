"""hugetlbfs: the pool of 2 MiB pages behind MAP_HUGETLB (mm/hugetlb.c).

``System(hugetlb_pages=N)`` sets /proc/sys/vm/nr_hugepages at boot: N naturally aligned
2 MiB blocks leave the page allocator for the pool, where they stay 2 MiB folios (order 9,
PG_HUGETLB) for good.  A private anonymous MAP_HUGETLB mapping is a VMA with VM_HUGETLB whose
entries are PMD mappings only (PTE_HUGE, see pgtable.py); its pages come from the pool and go
back to it when their last reference goes.  They are neither in rss (HugetlbPages) nor
charged to a memory cgroup.  A shared one (MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB) is the
same over an object of its own (a shmem PageCache standing for the hugetlbfs inode) that holds
its pages: fork shares them, a write never copies them, MADV_DONTNEED only unmaps them, and
they go back to the pool when the last mapping goes.

The reservation hugetlb_reserve_pages() makes at mmap() is made here by taking the pages at
mmap() time (the mapping is populated as MAP_POPULATE would), so an mmap() that the pool
cannot serve fails with ENOMEM, and a mapping once made never meets an empty pool until it
gives pages back (MADV_DONTNEED) or shares them with a child (a write then copies the whole
2 MiB, hugetlb_wp(), and raises SIGBUS when the pool is empty).
"""
import contextlib
import errno

import numpy as np

from ..constants import HPAGE_PMD_NR, PAGE_SHIFT
from ..errors import BusError, oserror
from . import pgtable as pt
from .notifier import MMU_NOTIFY_CLEAR, invalidation
from .physmem import PG_ANON, PG_ANON_EXCLUSIVE, PG_HEAD, PG_HUGETLB
from .vma import VM_WRITE

# The pool a System has unless told otherwise, as the selftests' runner reserves before
# hmm-tests, when RAM is at least DEFAULT_POOL_MIN_RAM_FACTOR times that.
DEFAULT_POOL_PAGES = 2
DEFAULT_POOL_MIN_RAM_FACTOR = 16

_NR = HPAGE_PMD_NR
_ARANGE = np.arange(_NR, dtype=np.int64)
_PFN = np.uint64(pt.PFN_SHIFT)


class HugetlbPool:
    """struct hstate for 2 MiB pages: ``nr_hugepages`` folios, the free ones on a stack."""

    def __init__(self, phys, nr_hugepages):
        self.phys = phys
        heads = phys.alloc_folios(nr_hugepages, zero=False)
        self.nr_hugepages = int(heads.size)
        self._free = list(heads.tolist())
        pages = phys.folio_pages(heads)
        with phys.lock:
            phys.pages.refcount[pages] = 0
            phys.pages.flags[pages] |= PG_HUGETLB
            phys.nr_folios -= self.nr_hugepages      # counted while in use only

    def nr_free(self):
        """free_huge_pages."""
        return len(self._free)

    def nr_pages(self):
        """RAM frames the pool holds, free or in use."""
        return self.nr_hugepages * _NR

    def alloc(self, n):
        """alloc_hugetlb_folio() for ``n`` folios: their heads (zeroed, refcount 1 on every
        page), or None when the pool has fewer than ``n`` free."""
        phys = self.phys
        with phys.lock:
            if len(self._free) < n:
                return None
            heads = np.array(self._free[len(self._free) - n:], dtype=np.int64)
            del self._free[len(self._free) - n:]
            pages = phys.folio_pages(heads)
            phys.pages.refcount[pages] = 1
            phys.nr_folios += n
        phys.ram.fill(pages, 0)
        return heads

    def free_folios(self, heads):
        """free_huge_folio(): every page of these folios is unreferenced; back to the pool.
        Called by physmem with its lock held."""
        pg = self.phys.pages
        pages = self.phys.folio_pages(heads)
        pg.flags[pages] = PG_HUGETLB
        pg.flags[heads] |= PG_HEAD
        pg.mapping[pages] = -1
        self._free.extend(np.asarray(heads, dtype=np.int64).tolist())
        self.phys.nr_folios -= len(heads)


def hugetlb_populate(mm, vma):
    """Take the mapping's pages from the pool (its reservation) and map them; ENOMEM when the
    pool cannot serve it.  A shared mapping's pages belong to its object (``vma.file``, the
    hugetlbfs inode of MAP_SHARED | MAP_ANONYMOUS), which holds a reference to each, so that
    fork shares them and MADV_DONTNEED only unmaps them."""
    pool = mm.phys.hugetlb
    n = vma.npages // _NR
    heads = pool.alloc(n) if pool is not None else None
    if heads is None:
        free = 0 if pool is None else pool.nr_free()
        raise oserror(errno.ENOMEM, f"MAP_HUGETLB: {n} huge pages wanted, {free} free in the pool "
                      f"(System(hugetlb_pages=...))", vma.start, vma.end)
    groups = np.arange(0, vma.npages, _NR, dtype=np.int64)
    with mm.phys.lock:
        if vma.file is not None:
            cache, pages = vma.file, mm.phys.folio_pages(heads)
            index = vma.pgoff + (groups[:, None] + _ARANGE).reshape(-1)
            cache._grow(int(index[-1]) + 1)
            cache.pfn_of[index] = pages
            mm.phys.pages.mapping[pages] = cache.id
            mm.phys.pages.index[pages] = index
            _map_shared(mm, vma, groups, bool(vma.vm_flags & VM_WRITE))
        else:
            _map_new(mm, vma, groups, heads, bool(vma.vm_flags & VM_WRITE))


def _pte_flags(writable):
    return pt.PTE_YOUNG | pt.PTE_HUGE | ((pt.PTE_WRITE | pt.PTE_DIRTY) if writable else np.uint64(0))


def _map_new(mm, vma, groups, heads, writable):
    pg = mm.phys.pages
    pages = mm.phys.folio_pages(heads)
    idx = (groups[:, None] + _ARANGE).reshape(-1)
    pg.flags[pages] |= PG_ANON | PG_ANON_EXCLUSIVE
    pg.mapcount[pages] += 1
    vma.pte[idx] = pt.mk_pte(pages, _pte_flags(writable))
    mm.maybe_huge = True


def _map_shared(mm, vma, groups, writable):
    """Map the object's pages at entries ``groups`` (+511 each) of a shared mapping: each entry
    takes a reference and a mapcount (phys.lock held)."""
    pg = mm.phys.pages
    idx = (groups[:, None] + _ARANGE).reshape(-1)
    pages = vma.file.pfn_of[vma.pgoff + idx]
    pg.refcount[pages] += 1
    pg.mapcount[pages] += 1
    vma.pte[idx] = pt.mk_pte(pages, _pte_flags(writable))
    mm.maybe_huge = True


def hugetlb_fault(mm, vma, i0, i1, write, unshare):
    """hugetlb_fault() for entries [i0, i1): True when every one is present (and writable for a
    write); otherwise it does what is needed and returns False for another round.

    A write to a page the process shares (after fork) copies the whole 2 MiB from the pool
    (hugetlb_wp()); so does FOLL_PIN for reading (unshare); an exclusive page is reused.
    """
    phys = mm.phys
    pg = phys.pages
    groups = np.arange(i0 // _NR * _NR, -(-i1 // _NR) * _NR, _NR, dtype=np.int64)
    if vma.file is not None:
        return _shared_fault(mm, vma, groups, write)
    with phys.lock:
        head = vma.pte[groups].copy()
    none = head == 0
    present = (head & pt.PTE_PRESENT) != 0
    ro = present & ((head & pt.PTE_WRITE) == 0)
    p = (head >> _PFN).astype(np.int64)
    copy = reuse = np.zeros(groups.size, bool)
    if (write and ro.any()) or (unshare and vma.cow):
        pages = (np.where(present, p, 0)[:, None] + _ARANGE).reshape(-1)
        fl = pg.flags[pages].reshape(groups.size, _NR)
        rc = pg.refcount[pages].reshape(groups.size, _NR)
        excl = (((fl & PG_ANON_EXCLUSIVE) != 0) | (rc == 1)).all(axis=1)
        copy = (ro if write else present) & ~excl
        reuse = ro & excl if write else reuse
    if reuse.any():
        with phys.lock:
            r = groups[reuse]
            r = r[vma.pte[r] == head[reuse]]
            idx = (r[:, None] + _ARANGE).reshape(-1)
            vma.pte[idx] |= pt.PTE_WRITE | pt.PTE_DIRTY | pt.PTE_YOUNG
            pg.flags[(vma.pte[idx] >> _PFN).astype(np.int64)] |= PG_ANON_EXCLUSIVE
    want = none | copy
    if not want.any():
        return not reuse.any()
    pool = phys.hugetlb
    heads = pool.alloc(int(np.count_nonzero(want))) if pool is not None else None
    if heads is None:
        k = int(groups[np.argmax(want)])
        raise BusError(vma.start + (k << PAGE_SHIFT), "no free huge page left in the hugetlb pool",
                       "write" if write else "read")
    copies = copy[want]
    if copies.any():
        src = (p[copy][:, None] + _ARANGE).reshape(-1)
        phys.copy(phys.folio_pages(heads[copies]), src)
    g = groups[want]
    lo, hi = vma.start + (int(g[0]) << PAGE_SHIFT), vma.start + ((int(g[-1]) + _NR) << PAGE_SHIFT)
    with invalidation(mm, lo, hi, MMU_NOTIFY_CLEAR) if copies.any() else contextlib.nullcontext():
        with phys.lock:
            same = vma.pte[g] == head[want]
            if not same.all():
                phys.put(phys.folio_pages(heads))
                return False
            if copies.any():
                old = (g[copies][:, None] + _ARANGE).reshape(-1)
                op = (vma.pte[old] >> _PFN).astype(np.int64)
                pg.mapcount[op] -= 1
                vma.pte[old] = 0
                phys.put(op, unique=True)
            _map_new(mm, vma, g, heads, write)
    return False


def _shared_fault(mm, vma, groups, write):
    """hugetlb_fault() in a shared mapping: the object's page is mapped again (after
    MADV_DONTNEED) or made writable, never copied.  True when nothing was left to do."""
    with mm.phys.lock:
        head = vma.pte[groups]
        none = head == 0
        if none.any():
            _map_shared(mm, vma, groups[none], write)
        ro = ~none & ((head & pt.PTE_WRITE) == 0)
        if write and ro.any():
            idx = (groups[ro][:, None] + _ARANGE).reshape(-1)
            vma.pte[idx] |= pt.PTE_WRITE | pt.PTE_DIRTY | pt.PTE_YOUNG
        return not (none.any() or (write and ro.any()))
