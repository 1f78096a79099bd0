"""Transparent huge pages: PMD-mapped 2 MiB folios of anonymous memory (mm/huge_memory.c,
mm/khugepaged.c's MADV_COLLAPSE).

A PMD mapping is 512 entries of a VMA's PTE array with PTE_HUGE set (see pgtable.py), so
every operation here is one vectorised pass over whole 512-entry groups:

* ``thp_vma_allowable``: the THP mode (``System(thp=...)``, sysfs transparent_hugepage/enabled:
  "always", "madvise" -- VM_HUGEPAGE VMAs only -- or "never") and the VMA's own advice;
* ``huge_pmd_fault``: a fault in a group with no page table under it yet installs a whole THP
  (a write) or the huge zero folio (a read, with use_zero_page); a write to the huge zero
  folio replaces it by a THP; a write to a read-only THP reuses it when it is exclusive and
  otherwise splits the PMD, so that the 4 KiB COW path copies only the pages written
  (Linux's COW of an anonymous THP since 5.8);
* ``split_huge_pmd``: clear PTE_HUGE on the groups of a range, under an MMU_NOTIFY_CLEAR
  invalidation, as __split_huge_pmd() does; every entry already maps its own page and holds
  its own counts, so nothing else changes.  The VMA operations split the PMDs that straddle
  the edges of what they change (partial munmap, mprotect, mremap, MADV_DONTNEED);
* ``split_folio``: a folio split into order-0 pages, after every PMD mapping of it anywhere
  (the reverse map) became 512 PTEs;
* ``madvise_collapse``: MADV_COLLAPSE, a new THP for each 2 MiB of the range, the old pages
  copied into it (holes and the zero page as zeros), mapped by one PMD.
"""
import errno

import numpy as np

from ..constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER, PAGE_SHIFT
from ..errors import oserror
from . import pgtable as pt
from .notifier import MMU_NOTIFY_CLEAR, invalidation
from .physmem import PG_ANON, PG_ANON_EXCLUSIVE, PG_LOCKED, PG_ZONE_DEVICE
from .vma import VM_HUGEPAGE, VM_HUGETLB, VM_NOHUGEPAGE, VM_WRITE, vma_is_anonymous

THP_MODES = ("always", "madvise", "never")

_U = np.uint64
_NR = HPAGE_PMD_NR
_HUGE = pt.PTE_HUGE
_NOT_HUGE = ~pt.PTE_HUGE
_PFN = _U(pt.PFN_SHIFT)
_ARANGE = np.arange(_NR, dtype=np.int64)


def thp_vma_allowable(mm, vma, collapse=False):
    """thp_vma_allowable_order(PMD_ORDER): may this VMA hold THPs?  MADV_COLLAPSE ignores the
    sysfs mode (``collapse``) but not VM_NOHUGEPAGE."""
    if not vma_is_anonymous(vma) or vma.vm_flags & (VM_NOHUGEPAGE | VM_HUGETLB):
        return False
    if collapse:
        return True
    mode = mm.system.thp
    return mode == "always" or (mode == "madvise" and bool(vma.vm_flags & VM_HUGEPAGE))


def pmd_groups(vma, i0, i1):
    """Start indices (into ``vma.pte``) of the 2 MiB-aligned groups overlapping [i0, i1) that lie
    wholly inside the VMA."""
    off = (-(vma.start >> PAGE_SHIFT)) % _NR
    first = off + ((i0 - off) // _NR) * _NR if i0 > off else off
    stop = min(vma.npages - _NR, i1 - 1)
    if first > stop:
        return np.zeros(0, np.int64)
    return np.arange(first, stop + 1, _NR, dtype=np.int64)


def _group_index(g):
    return (g[:, None] + _ARANGE).reshape(-1)


def split_huge_pmd(mm, vma, i0, i1):
    """__split_huge_pmd() for every PMD mapping overlapping entries [i0, i1) of ``vma``.

    Returns how many were split.  The caller holds mmap_lock.
    """
    if not mm.maybe_huge:
        return 0
    i0, i1 = max(0, i0), min(vma.npages, i1)
    if i0 >= i1:
        return 0
    off = (-(vma.start >> PAGE_SHIFT)) % _NR
    lo = off + ((i0 - off) // _NR) * _NR if i0 >= off else 0
    hi = min(vma.npages, off + -(-(i1 - off) // _NR) * _NR) if i1 > off else i1
    seg = vma.pte[lo:hi]
    hit = np.nonzero((seg & _HUGE) != 0)[0]
    if hit.size == 0:
        return 0
    a, b = lo + int(hit[0]), lo + int(hit[-1]) + 1
    with invalidation(mm, vma.start + (a << PAGE_SHIFT), vma.start + (b << PAGE_SHIFT), MMU_NOTIFY_CLEAR):
        with mm.phys.lock:
            vma.pte[a:b] &= _NOT_HUGE
    return -(-(b - a) // _NR)


def split_huge_pmd_groups(mm, vma, groups):
    """__split_huge_pmd() of the PMD mappings starting at entries ``groups`` of ``vma``, under
    one invalidation: the others between them stay PMD mappings."""
    groups = np.asarray(groups, dtype=np.int64)
    if groups.size == 0:
        return
    lo = vma.start + (int(groups.min()) << PAGE_SHIFT)
    hi = vma.start + ((int(groups.max()) + _NR) << PAGE_SHIFT)
    with invalidation(mm, lo, hi, MMU_NOTIFY_CLEAR):
        with mm.phys.lock:
            vma.pte[_group_index(groups)] &= _NOT_HUGE


def split_huge_pmd_edges(mm, vma, i0, i1):
    """Split the PMD mappings that [i0, i1) covers only in part (vma_adjust_trans_huge())."""
    base = vma.start >> PAGE_SHIFT
    for i in (i0, i1):
        if 0 < i < vma.npages and (base + i) % _NR and vma.pte[i] & _HUGE:
            split_huge_pmd(mm, vma, i, i + 1)


def split_folio(system, heads, vmas):
    """split_folio() of the folios at ``heads``: every PMD that maps one, in ``vmas`` (their
    reverse map), becomes 512 PTEs, then each folio becomes 512 order-0 folios."""
    heads = np.asarray(heads, dtype=np.int64)
    if heads.size == 0:
        return
    blocks = np.unique(heads >> HPAGE_PMD_ORDER)
    for v in vmas:
        mm = v.mm
        if not mm.maybe_huge:
            continue
        pte = v.pte
        huge = np.nonzero((pte & _HUGE) != 0)[0]
        if huge.size == 0:
            continue
        p = (pte[huge] >> _PFN).astype(np.int64)
        hit = huge[np.isin(p >> HPAGE_PMD_ORDER, blocks)]
        if hit.size:
            # only these folios' PMDs: others between them stay PMD mappings
            lo = v.start + (int(hit[0]) << PAGE_SHIFT)
            hi = v.start + ((int(hit[-1]) + 1) << PAGE_SHIFT)
            with invalidation(mm, lo, hi, MMU_NOTIFY_CLEAR):
                with system.phys.lock:
                    v.pte[hit] &= _NOT_HUGE
    system.phys.split_folios(heads)


def _install(mm, vma, groups, heads, flags):
    """Map folio ``heads`` at ``groups`` (PMD mappings, counted), where the groups are still empty
    (or still map the huge zero folio); returns the heads that were not used."""
    phys = mm.phys
    pg = phys.pages
    idx = _group_index(groups).reshape(groups.size, _NR)
    cur = vma.pte[idx]
    hz = phys.huge_zero_pfn
    ok = ~(cur != 0).any(axis=1)
    if hz >= 0:
        ok |= ((cur[:, 0] & _HUGE) != 0) & ((cur[:, 0] >> _PFN).astype(np.int64) == hz) & (
            ((cur[:, 0] & pt.PTE_PRESENT) != 0))
    use = np.nonzero(ok)[0][:heads.size]
    used, spare = heads[:use.size], heads[use.size:]
    if use.size:
        pages = phys.folio_pages(used)
        where = idx[use].reshape(-1)
        pg.flags[pages] |= PG_ANON | PG_ANON_EXCLUSIVE
        pg.mapcount[pages] += 1
        mm._account(pages, +1)
        vma.pte[where] = pt.mk_pte(pages, flags | _HUGE)
        mm.maybe_huge = True
    return spare


def huge_pmd_fault(mm, vma, i0, i1, write, unshare):
    """The PMD-level part of a fault on entries [i0, i1) of ``vma`` (do_huge_pmd_anonymous_page,
    do_huge_pmd_wp_page, do_huge_zero_wp_pmd).  What it leaves to do is the 4 KiB path's."""
    allowable = thp_vma_allowable(mm, vma)
    if not allowable and not mm.maybe_huge:
        return
    groups = pmd_groups(vma, i0, i1)
    if groups.size == 0:
        return
    phys = mm.phys
    pg = phys.pages
    idx = _group_index(groups).reshape(groups.size, _NR)
    with phys.lock:
        snap = vma.pte[idx]
    head = snap[:, 0]
    huge = (head & _HUGE) != 0
    present = (head & pt.PTE_PRESENT) != 0
    hpfn = (head >> _PFN).astype(np.int64)
    hz = phys.huge_zero_pfn
    zero = huge & present & (hpfn == hz) if hz >= 0 else np.zeros(groups.size, bool)
    wflags = pt.PTE_WRITE | pt.PTE_DIRTY | pt.PTE_YOUNG
    if allowable:
        empty = np.nonzero(~(snap != 0).any(axis=1))[0]
        if empty.size:
            if not write and mm.system.thp_use_zero_page:
                hz = phys.huge_zero_folio()
                if hz >= 0:
                    with phys.lock:
                        gi = idx[empty]
                        still = ~(vma.pte[gi] != 0).any(axis=1)
                        gi = gi[still].reshape(-1)
                        vma.pte[gi] = pt.mk_pte(np.tile(hz + _ARANGE, int(np.count_nonzero(still))),
                                                pt.PTE_YOUNG | _HUGE)
                        if gi.size:
                            mm.maybe_huge = True
                    return
            heads = phys.alloc_folios(empty.size, memcg=mm.memcg)
            if heads.size:
                with phys.lock:
                    spare = _install(mm, vma, groups[empty], heads,
                                     wflags if write and vma.vm_flags & VM_WRITE else pt.PTE_YOUNG | pt.PTE_DIRTY)
                phys.put(phys.folio_pages(spare))
    if not huge.any():
        return
    if write:
        ro = huge & present & ((head & pt.PTE_WRITE) == 0)
        g_zero = np.nonzero(ro & zero)[0]
        if g_zero.size:
            heads = phys.alloc_folios(g_zero.size, memcg=mm.memcg)
            with invalidation(mm, vma.start + (int(groups[g_zero[0]]) << PAGE_SHIFT),
                              vma.start + ((int(groups[g_zero[-1]]) + _NR) << PAGE_SHIFT), MMU_NOTIFY_CLEAR):
                with phys.lock:
                    spare = _install(mm, vma, groups[g_zero], heads, wflags)
            phys.put(phys.folio_pages(spare))
            # what could not get a THP falls back to 4 KiB pages
            left = groups[g_zero]
            left = left[(vma.pte[left] >> _PFN).astype(np.int64) == hz]
            split_huge_pmd_groups(mm, vma, left)
        g_anon = np.nonzero(ro & ~zero)[0]
        if g_anon.size:
            pages = _group_index(hpfn[g_anon])
            fl = pg.flags[pages].reshape(g_anon.size, _NR)
            rc = pg.refcount[pages].reshape(g_anon.size, _NR)
            # folio_test_anon && (PageAnonExclusive || we hold the only reference): reuse
            reuse = (((fl & PG_ANON) != 0) & (((fl & PG_ANON_EXCLUSIVE) != 0) | (rc == 1))).all(axis=1)
            split_huge_pmd_groups(mm, vma, groups[g_anon[~reuse]])
            r = g_anon[reuse]
            if r.size:
                with phys.lock:
                    gi = idx[r]
                    cur = vma.pte[gi]
                    same = (cur == snap[r]).all(axis=1)
                    gi = gi[same].reshape(-1)
                    vma.pte[gi] |= wflags
                    p = (vma.pte[gi] >> _PFN).astype(np.int64)
                    pg.flags[p] |= PG_ANON_EXCLUSIVE
    elif unshare and vma.cow:
        # FOLL_PIN for reading a THP another process may still map: the 4 KiB path unshares
        g_anon = np.nonzero(huge & present & ~zero)[0]
        if g_anon.size:
            pages = _group_index(hpfn[g_anon])
            fl = pg.flags[pages].reshape(g_anon.size, _NR)
            shared = (((fl & PG_ANON) != 0) & ((fl & PG_ANON_EXCLUSIVE) == 0)).any(axis=1)
            split_huge_pmd_groups(mm, vma, groups[g_anon[shared]])


def madvise_collapse(mm, vma, s, e):
    """MADV_COLLAPSE over [s, e) of one VMA: 0, or the errno of the last 2 MiB that failed."""
    phys = mm.phys
    pg = phys.pages
    if not thp_vma_allowable(mm, vma, collapse=True):
        return errno.EINVAL
    groups = pmd_groups(vma, vma.idx(s), vma.idx(e - 1) + 1)
    base = vma.start >> PAGE_SHIFT
    # only the 2 MiB wholly inside [s, e) (hstart = round_up(start), hend = round_down(end))
    groups = groups[(groups >= vma.idx(s)) & (groups + _NR <= vma.idx(e - 1) + 1)]
    assert not ((base + groups) % _NR).any()
    if groups.size == 0:
        return 0
    idx = _group_index(groups).reshape(groups.size, _NR)
    snap = vma.pte[idx]
    todo = np.nonzero((snap[:, 0] & _HUGE) == 0)[0]          # SCAN_PMD_MAPPED: already done
    if todo.size == 0:
        return 0
    # __collapse_huge_page_swapin(): device-private and exclusive entries come back first
    swp = pt.is_swap(snap[todo])
    if swp.any():
        rows = todo[swp.any(axis=1)]
        for k in rows.tolist():
            g = int(groups[k])
            mm.handle_mm_fault(vma, vma.start + (g << PAGE_SHIFT), vma.start + ((g + _NR) << PAGE_SHIFT), False)
        snap = vma.pte[idx]
    snap = snap[todo]
    present = pt.pte_present(snap)
    pfn = pt.pte_pfn(snap)
    zero = present & phys.zero_mask(pfn)
    page = present & ~zero
    last = 0
    ok = ~(pt.is_swap(snap)).any(axis=1)
    if not ok.all():
        last = errno.EAGAIN
    pc = np.where(page, pfn, 0)
    fl = pg.flags[pc]
    bad = page & (((fl & PG_ZONE_DEVICE) != 0) | ((fl & PG_ANON) == 0))
    ok &= ~bad.any(axis=1)
    if bad.any():
        last = errno.EINVAL
    busy = page & ((pg.pincount[pc] > 0) | ((fl & PG_LOCKED) != 0))
    if busy.any():
        last = errno.EAGAIN
    ok &= ~busy.any(axis=1)
    todo, snap, pfn, zero, page = todo[ok], snap[ok], pfn[ok], zero[ok], page[ok]
    if todo.size == 0:
        return last
    heads = phys.alloc_folios(todo.size, memcg=mm.memcg, zero=False)
    if heads.size < todo.size:
        phys.put(phys.folio_pages(heads))
        return errno.ENOMEM if mm.memcg is None or heads.size == 0 else errno.EBUSY
    new = phys.folio_pages(heads).reshape(todo.size, _NR)
    if page.any():
        phys.copy(new[page], pfn[page])
    if (~page).any():
        phys.fill(new[~page], 0)
    g = groups[todo]
    lo = vma.start + (int(g[0]) << PAGE_SHIFT)
    hi = vma.start + ((int(g[-1]) + _NR) << PAGE_SHIFT)
    with invalidation(mm, lo, hi, MMU_NOTIFY_CLEAR):
        with phys.lock:
            gi = idx[todo]
            same = (vma.pte[gi] == snap).all(axis=1)
            if not same.all():
                phys.put(new[~same].reshape(-1))
                last = errno.EAGAIN
            gi, new, snap = gi[same], new[same], snap[same]
            if gi.size:
                flat = gi.reshape(-1)
                mm._zap_entries(vma, flat)
                w = pt.PTE_WRITE if vma.vm_flags & VM_WRITE else _U(0)
                pages = new.reshape(-1)
                pg.flags[pages] |= PG_ANON | PG_ANON_EXCLUSIVE
                pg.mapcount[pages] += 1
                mm._account(pages, +1)
                vma.pte[flat] = pt.mk_pte(pages, w | pt.PTE_DIRTY | pt.PTE_YOUNG | _HUGE)
                mm.maybe_huge = True
    return last


def check_collapse_result(err, start, end):
    if err:
        why = {errno.ENOMEM: "no free 2 MiB block for the new huge page",
               errno.EAGAIN: "a page is pinned, locked or being migrated",
               errno.EBUSY: "the memory cgroup cannot be charged a huge page",
               errno.EINVAL: "the range holds no anonymous memory that may become huge pages"}[err]
        raise oserror(err, f"MADV_COLLAPSE: {why}", start, end)
