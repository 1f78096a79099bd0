"""migrate_vma_*() and migrate_device_*() of mm/migrate_device.c.

A driver migrates a range of one VMA in three steps, with its own copy in between:

1. ``migrate_vma_setup(args)``: collect the range under an MMU_NOTIFY_MIGRATE
   invalidation carrying ``args.pgmap_owner`` (so the driver can ignore its own
   migration), lock every page it selects, replace its PTEs by migration
   entries, unmap any other mapping through the reverse map
   (``try_to_migrate``) and give back the pages that cannot move (pinned,
   locked elsewhere, mapped where the rmap cannot reach).  ``args.src[i]`` then
   says, per page: MIGRATE_PFN_MIGRATE if it may move, VALID + pfn if there is a
   source page (none for pte_none and the zero page: "holes", which an anonymous
   VMA lets the driver fill directly on the device), WRITE if it was writable.
2. the driver allocates destination pages (locked, one reference), copies, and
   fills ``args.dst`` (``migrate_pfn(pfn)`` [| MIGRATE_PFN_WRITE]); an empty dst
   entry means "not this page".
3. ``migrate_vma_pages(args)`` moves struct-page state (page-cache slot, flags,
   memcg charge) and inserts holes; then ``migrate_vma_finalize(args)`` points
   every migration entry at the new page (or back at the old one), unlocks and
   drops the references: migrated sources reach refcount 0 and are freed
   (device ones through their pgmap's ``page_free``).

Selection follows the kernel: MIGRATE_VMA_SELECT_SYSTEM takes system pages
(and the zero page / pte_none as holes), SELECT_DEVICE_PRIVATE the device-private
entries whose pgmap owner is ``pgmap_owner``, SELECT_DEVICE_COHERENT present
coherent pages of that owner.  Page-cache pages are collected but never move to
device memory (migrate_vma_pages drops them), and holes are only filled in
private anonymous VMAs.  ``migrate_device_range`` evicts pages by pfn (a driver
freeing its memory) with the same unmap/pages/finalize machinery.

The rss counters do not change across a migration (device pages count like
the pages they replace); the memcg charge moves with the data.  Every step is
vectorised over the whole range.
"""
import errno

import numpy as np

from ..constants import PAGE_SHIFT, PAGE_SIZE
from ..mm import pgtable as pt
from ..mm.migrate import folio_migrate_flags, folio_migrate_mapping, migrate_expected_refs
from ..mm.notifier import MMU_NOTIFY_MIGRATE, invalidation
from ..mm.physmem import PG_ANON, PG_DIRTY, PG_LOCKED, add_at
from ..mm.rmap import remove_migration_ptes, try_to_migrate, vmas_for_pages
from ..mm.vma import VM_DONTEXPAND, VM_IO, VM_MIXEDMAP, VM_PFNMAP, VM_WRITE, vma_is_anonymous
from . import debug
from .memremap import (MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PRIVATE, is_device_coherent_page,
                       is_device_private_page, pgmap_owner_is, zone_device_type)

_U = np.uint64
_EMPTY = np.zeros(0, np.int64)
_PFN_SHIFT = _U(pt.PFN_SHIFT)
_SWP_SHIFT = _U(pt.SWP_SHIFT)
_SWP_TYPE = _U(0xF)
_PRESENT_SPECIAL = pt.PTE_PRESENT | pt.PTE_SPECIAL
_PRESENT_WRITE = pt.PTE_PRESENT | pt.PTE_WRITE
_PRESENT_DIRTY = pt.PTE_PRESENT | pt.PTE_DIRTY

MIGRATE_PFN_VALID = 1 << 0
MIGRATE_PFN_MIGRATE = 1 << 1
MIGRATE_PFN_LOCKED = 1 << 2       # the 2017 API's bit; today every collected page is locked
MIGRATE_PFN_WRITE = 1 << 3
MIGRATE_PFN_DEVICE = 1 << 4       # 2017 API
MIGRATE_PFN_ERROR = 1 << 5        # 2017 API
MIGRATE_PFN_SHIFT = 6

_MPFN_SHIFT = _U(MIGRATE_PFN_SHIFT)
_MPFN_VALID = _U(MIGRATE_PFN_VALID)
_MPFN_MIGRATE = _U(MIGRATE_PFN_MIGRATE)
_MPFN_WRITE = _U(MIGRATE_PFN_WRITE)
_NOT_MIGRATE = ~_MPFN_MIGRATE
_MPFN_VALID_MIGRATE = _U(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
_MPFN_WRITE_SHIFT = _U(3)                  # MIGRATE_PFN_WRITE is 1 << 3
_MIG_READ_TYPE = _U(pt.SWP_MIGRATION_READ)

MIGRATE_VMA_SELECT_SYSTEM = 1 << 0
MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1 << 1
MIGRATE_VMA_SELECT_DEVICE_COHERENT = 1 << 2

VM_SPECIAL = VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP


def migrate_pfn(pfns):
    """migrate_pfn(): pfn << MIGRATE_PFN_SHIFT | MIGRATE_PFN_VALID, vectorised."""
    return (np.asarray(pfns, dtype=np.int64).astype(_U) << _MPFN_SHIFT) | _MPFN_VALID


def migrate_pfn_to_pfn(mpfns):
    """The pfn of each entry, -1 where MIGRATE_PFN_VALID is clear (migrate_pfn_to_page NULL)."""
    m = np.asarray(mpfns, dtype=_U)
    pfn = (m >> _MPFN_SHIFT).astype(np.int64)
    pfn[(m & _MPFN_VALID) == 0] = -1
    return pfn


class MigrateVma:
    """struct migrate_vma: one migration of [start, end) of ``vma`` (page-aligned, one VMA).

    ``src``/``dst``: uint64 arrays of (end - start) / PAGE_SIZE entries (allocated if None);
    ``pgmap_owner``: the driver's owner cookie (its pgmaps' ``owner``), carried by the
    MMU_NOTIFY_MIGRATE invalidation so the driver can skip its own; ``flags``:
    MIGRATE_VMA_SELECT_SYSTEM / _DEVICE_PRIVATE / _DEVICE_COHERENT; ``fault_page``: the
    device-private pfn whose CPU fault migrate_to_ram is serving.  ``cpages`` (collected
    pages) and ``npages`` are set by migrate_vma_setup.
    """

    def __init__(self, vma=None, start=0, end=0, src=None, dst=None, pgmap_owner=None, flags=0,
                 fault_page=None):
        self.vma = vma
        self.start = int(start)
        self.end = int(end)
        self.src = src
        self.dst = dst
        self.pgmap_owner = pgmap_owner
        self.flags = flags
        self.fault_page = fault_page
        self.npages = 0
        self.cpages = 0
        self._wide = False        # some page was mapped outside [start, end) of vma
        self._pages_started = False
        self._collected = (_EMPTY, _EMPTY)   # positions and pfns of the pages collected
        self._holes = _EMPTY                 # positions of the holes collected

    def __repr__(self):
        return (f"MigrateVma([0x{self.start:x}, 0x{self.end:x}), npages={self.npages}, "
                f"cpages={self.cpages}, flags=0x{self.flags:x})")


def _rmap_targets(system, args, pfns):
    if args is not None and not args._wide and args.vma is not None:
        v = args.vma
        i0 = v.idx(args.start)
        return dict(region=(v, i0, i0 + args.npages), vmas=None)
    fam = args.vma.anon_id if args is not None and args.vma is not None else None
    return dict(region=None, vmas=vmas_for_pages(system, pfns, fam))


def migrate_vma_setup(args):
    """migrate_vma_setup() of mm/migrate_device.c: collect, lock and unmap the pages to migrate.

    Call with mmap_lock held for read.  Afterwards ``args.src[i]`` is migrate_pfn(pfn) |
    MIGRATE_PFN_MIGRATE (| MIGRATE_PFN_WRITE) for a page that may move, MIGRATE_PFN_MIGRATE
    alone for a hole the driver may fill, or 0; ``args.cpages`` counts them.  The driver then
    allocates and locks destination pages, copies, fills ``args.dst`` with migrate_pfn(new)
    (0: leave this page), and calls migrate_vma_pages and migrate_vma_finalize -- finalize
    always, even when it copied nothing.  Returns 0, or -EINVAL for a bad range, VMA or array.
    """
    vma = args.vma
    args.start &= ~(PAGE_SIZE - 1)
    args.end &= ~(PAGE_SIZE - 1)
    nr = (args.end - args.start) >> PAGE_SHIFT
    if vma is None or (vma.vm_flags & VM_SPECIAL):
        return -errno.EINVAL
    if nr <= 0:
        return -errno.EINVAL
    if args.start < vma.start or args.start >= vma.end:
        return -errno.EINVAL
    if args.end <= vma.start or args.end > vma.end:
        return -errno.EINVAL
    fresh = args.src is None and args.dst is None
    if args.src is None:
        args.src = np.zeros(nr, dtype=_U)
    if args.dst is None:
        args.dst = np.zeros(nr, dtype=_U)
    if args.src.size < nr or args.dst.size < nr:
        return -errno.EINVAL
    debug.check_no_unfinished_migration("migrate_vma_setup", vma.mm, args.start, args.end, args)
    system = vma.mm.system
    if args.fault_page is not None and not is_device_private_page(system, [args.fault_page])[0]:
        return -errno.EINVAL
    if not fresh:                             # the caller's arrays: zero what we use
        args.src[:nr] = 0
        args.dst[:nr] = 0
    args.cpages = 0
    args.npages = 0
    args._wide = False
    _migrate_vma_collect(args)
    if args.cpages:
        args.cpages = migrate_device_unmap(args.src, args.npages, args.fault_page, args=args)
    debug.migration_started(args)
    # Pages are locked and unmapped: their contents are stable for the driver's copy.
    return 0


def _migrate_vma_collect(args):
    """migrate_vma_collect() / migrate_vma_collect_pmd(), one pass over the PTE slice.

    Leaves in ``args._collected`` the positions and pfns of the pages it locked and unmapped,
    for migrate_device_unmap.
    """
    vma = args.vma
    mm = vma.mm
    system = mm.system
    phys = system.phys
    pg = phys.pages
    n = (args.end - args.start) >> PAGE_SHIFT
    i0 = vma.idx(args.start)
    select = args.flags
    mpfn = args.src[:n]                       # zeroed by migrate_vma_setup
    with invalidation(mm, args.start, args.end, MMU_NOTIFY_MIGRATE, owner=args.pgmap_owner):
        with phys.lock:
            pte = vma.pte[i0:i0 + n].copy()
            pfn = (pte >> _PFN_SHIFT).astype(np.int64)
            kind = pte & _PRESENT_SPECIAL
            # holes: pte_none in an anonymous VMA, and the zero page, which the driver fills
            hole = (pte == 0) if vma_is_anonymous(vma) else None
            cand = None
            if select & MIGRATE_VMA_SELECT_SYSTEM:
                zero = ((pte & pt.PTE_PRESENT) != 0) & (pfn == phys.zero_pfn)
                hole = zero if hole is None else hole | zero
                # vm_normal_page(): special PTEs have no page; device pages are not system pages
                cand = (kind == pt.PTE_PRESENT) & (pfn != phys.zero_pfn) & (pfn < phys.nr_ram)
            swapped = False
            if select & MIGRATE_VMA_SELECT_DEVICE_PRIVATE:
                swp = ((kind == 0) & (pte != 0)).nonzero()[0]
                if swp.size:
                    t = (pte[swp] >> _SWP_SHIFT) & _SWP_TYPE
                    d = swp[(t == pt.SWP_DEVICE_PRIVATE_READ) | (t == pt.SWP_DEVICE_PRIVATE_WRITE)]
                    d = d[pgmap_owner_is(system, pfn[d], args.pgmap_owner)]
                    if d.size:
                        cand = np.zeros(n, bool) if cand is None else cand
                        cand[d] = swapped = True
            if select & MIGRATE_VMA_SELECT_DEVICE_COHERENT:
                d = ((kind == pt.PTE_PRESENT) & (pfn >= phys.nr_ram)).nonzero()[0]
                if d.size:
                    d = d[is_device_coherent_page(system, pfn[d]) & pgmap_owner_is(system, pfn[d],
                                                                                   args.pgmap_owner)]
                    cand = np.zeros(n, bool) if cand is None else cand
                    cand[d] = True
            cpages = 0
            h = _EMPTY
            if hole is not None:
                h = hole.nonzero()[0]
                if h.size:
                    mpfn[h] = _MPFN_MIGRATE
                    cpages = int(h.size)
            args._holes = h
            idx = _EMPTY if cand is None else cand.nonzero()[0]
            if idx.size:
                # folio_trylock(): a page someone else holds locked is simply skipped.
                p = pfn[idx]
                got = phys.trylock(p, unique=True)
                if np.count_nonzero(got) < got.size:
                    idx, p = idx[got], p[got]
            if idx.size:
                e = pte[idx]
                write = (e & _PRESENT_WRITE) == _PRESENT_WRITE
                if swapped:
                    write |= ((e & pt.PTE_PRESENT) == 0) & (
                        ((e >> _SWP_SHIFT) & _SWP_TYPE) == pt.SWP_DEVICE_PRIVATE_WRITE)
                wbit = write.astype(_U)
                pu = p.astype(_U)
                mpfn[idx] = (pu << _MPFN_SHIFT) | _MPFN_VALID_MIGRATE | (wbit << _MPFN_WRITE_SHIFT)
                if not vma_is_anonymous(vma):
                    # a dirty PTE of a file page: the page is dirty (anon pages need no bit)
                    d = p[(e & _PRESENT_DIRTY) == _PRESENT_DIRTY]
                    d = d[(pg.flags[d] & PG_ANON) == 0]
                    if d.size:
                        pg.flags[d] |= PG_DIRTY
                # The mapping's reference becomes ours; its mapcount goes with the PTE.
                vma.pte[i0 + idx] = (pu << _PFN_SHIFT) | ((_MIG_READ_TYPE + wbit) << _SWP_SHIFT)
                pg.mapcount[p] -= 1
                cpages += int(idx.size)
            else:
                p = _EMPTY
            args._collected = (idx, p)
            args.npages = n
            args.cpages = cpages


def migrate_device_unmap(src, npages, fault_page=None, args=None):
    """migrate_device_unmap(): unmap every other mapping, give back what cannot move.

    ``args`` is the migrate_vma being set up (its collect step said which entries hold
    pages).  Returns the number of entries still selected (holes included).
    """
    src = src[:npages]
    idx, p = args._collected
    cpages = args.cpages
    if idx.size == 0:
        return cpages
    system = args.vma.mm.system
    phys = system.phys
    pg = phys.pages
    if np.count_nonzero(pg.mapcount[p]):
        # mapped somewhere else too (a fork child, another mapping of the file)
        mapped = p[pg.mapcount[p] > 0]
        args._wide = True
        i0 = args.vma.idx(args.start)
        try_to_migrate(system, mapped, vmas_for_pages(system, mapped, args.vma.anon_id),
                       skip=(args.vma, i0, i0 + args.npages))
    with phys.lock:
        # our reference (the mapping's) and the page cache's are the only ones allowed
        ok = (pg.mapcount[p] == 0) & (pg.pincount[p] == 0) & (
            pg.refcount[p] - (pg.mapping[p] >= 0) == 1)
    if np.count_nonzero(ok) == ok.size:
        return cpages
    bad = idx[~ok]
    src[bad] &= _NOT_MIGRATE
    bp = p[~ok]
    tg = _rmap_targets(system, args, bp)
    remove_migration_ptes(system, bp, bp, tg["vmas"], region=tg["region"],
                          positions=bad if tg["region"] is not None else None)
    phys.unlock(bp)
    phys.put(bp, unique=True)
    src[bad] = 0
    args._collected = (idx[ok], p[ok])
    return cpages - int(bad.size)


def migrate_vma_pages(args):
    """migrate_vma_pages(): move struct-page state (page cache slot, flags, memcg charge) to the
    destinations in ``args.dst`` and insert the holes the driver filled; entries that cannot
    move lose MIGRATE_PFN_MIGRATE in ``args.src``.  Every destination page must be locked and
    referenced (DriverBug otherwise).  The driver may now update its device page table; then
    migrate_vma_finalize."""
    if args.npages == 0:
        return
    system = args.vma.mm.system
    _check_destinations(system, args.src, args.dst, args.npages, args.pgmap_owner, "migrate_vma_pages", args)
    args._pages_started = True
    _migrate_device_pages(system, args.src, args.dst, args.npages, args)


def migrate_device_pages(system, src_pfns, dst_pfns, npages):
    """migrate_device_pages(): the second step of migrate_device_range() / _pfns(): move
    struct-page state to the destinations in ``dst_pfns`` (locked and referenced)."""
    _check_destinations(system, src_pfns, dst_pfns, npages, None, "migrate_device_pages", None)
    _migrate_device_pages(system, src_pfns, dst_pfns, npages, None)


def _check_destinations(system, src, dst, npages, owner, what, args):
    if not debug.enabled:
        return
    moving = (src[:npages] & _U(MIGRATE_PFN_MIGRATE)) != 0
    try:
        debug.check_destinations(system, migrate_pfn_to_pfn(dst[:npages]), moving, owner, what, args)
    except debug.DriverBug:
        # Abandon the migration: finalize then puts every source back and touches no
        # destination it cannot trust (the driver's own pages stay with it).
        src[:npages] &= ~_U(MIGRATE_PFN_MIGRATE)
        dst[:npages] = 0
        raise


def _migrate_device_pages(system, src, dst, npages, args):
    phys = system.phys
    src = src[:npages]
    dst = dst[:npages]
    dpfn = migrate_pfn_to_pfn(dst)
    # no destination: this page stays
    src[dpfn < 0] &= _NOT_MIGRATE
    mig = (src & _MPFN_MIGRATE) != 0
    if args is not None:
        have, spfn = args._collected          # setup's pages and holes: src is not decoded again
        holes = args._holes[mig[args._holes]]
        moving = mig[have]
        pages, old = have[moving], spfn[moving]
    else:
        spfn = migrate_pfn_to_pfn(src)
        holes = (mig & (spfn < 0)).nonzero()[0]
        pages = (mig & (spfn >= 0)).nonzero()[0]
        old = spfn[pages]
    if holes.size:
        if args is None:
            src[holes] &= _NOT_MIGRATE
        else:
            addr = args.start + (int(holes[0]) << PAGE_SHIFT)
            with invalidation(args.vma.mm, addr, args.end, MMU_NOTIFY_MIGRATE, owner=args.pgmap_owner):
                _migrate_vma_insert_pages(args, holes, dpfn[holes])
    if pages.size == 0:
        return
    new = dpfn[pages]
    pg = phys.pages
    with phys.lock:
        ztype = zone_device_type(system, new)
        if np.count_nonzero(ztype):
            # Only anonymous memory goes to device memory (page-cache pages stay), and only to
            # private or coherent device memory.
            keep = (pg.mapping[old] < 0) | (ztype == 0)
            keep &= (ztype == 0) | (ztype == MEMORY_DEVICE_PRIVATE) | (ztype == MEMORY_DEVICE_COHERENT)
            ok = np.zeros(pages.size, dtype=bool)
            if np.count_nonzero(keep):
                ok[keep] = folio_migrate_mapping(system, new[keep], old[keep])
        else:
            ok = folio_migrate_mapping(system, new, old)
        if np.count_nonzero(ok) == ok.size:
            folio_migrate_flags(system, new, old)
            return
        src[pages[~ok]] &= _NOT_MIGRATE
        if np.count_nonzero(ok):
            folio_migrate_flags(system, new[ok], old[ok])


def _migrate_vma_insert_pages(args, holes, newp):
    """migrate_vma_insert_page(), for every hole at once."""
    vma = args.vma
    mm = vma.mm
    system = mm.system
    phys = system.phys
    pg = phys.pages
    src = args.src
    if not vma_is_anonymous(vma):
        src[holes] &= _NOT_MIGRATE
        return
    devp = is_device_private_page(system, newp)
    coh = is_device_coherent_page(system, newp)
    bad_type = (newp >= phys.nr_ram) & ~devp & ~coh
    if bad_type.any():
        src[holes[bad_type]] &= _NOT_MIGRATE
        holes, newp, devp = holes[~bad_type], newp[~bad_type], devp[~bad_type]
    if holes.size == 0:
        return
    memcg = mm.memcg
    i0 = vma.idx(args.start)
    with phys.lock:
        cur = vma.pte[i0 + holes]
        still = (cur == 0) | (pt.pte_present(cur) & (pt.pte_pfn(cur) == phys.zero_pfn))
        if (~still).any():
            src[holes[~still]] &= _NOT_MIGRATE
            holes, newp, devp = holes[still], newp[still], devp[still]
        if holes.size == 0:
            return
        if memcg is not None and not memcg.try_charge(int(holes.size)):
            # mem_cgroup_charge() failed: nothing is inserted
            src[holes] &= _NOT_MIGRATE
            return
        writable = bool(vma.vm_flags & VM_WRITE)
        ent = pt.mk_pte(newp, pt.PTE_YOUNG | ((pt.PTE_WRITE | pt.PTE_DIRTY) if writable else _U(0)))
        if devp.any():
            ent[devp] = pt.mk_swp(newp[devp], pt.SWP_DEVICE_PRIVATE_WRITE if writable else pt.SWP_DEVICE_PRIVATE_READ)
        pg.flags[newp] |= PG_ANON
        pg.memcg[newp] = -1 if memcg is None else memcg.id
        pg.refcount[newp] += 1
        pg.mapcount[newp] += 1
        vma.pte[i0 + holes] = ent
        mm.add_rss("anon", int(holes.size))
        src[holes] = _MPFN_MIGRATE


def migrate_vma_finalize(args):
    """migrate_vma_finalize(): point every migration entry at the new page (or back at the old
    one where the page did not move), unlock both, and drop the references: migrated sources
    reach refcount 0 and are freed (device ones through their pgmap's ``page_free``)."""
    if args.npages == 0:
        return
    debug.migration_finalized(args)
    _migrate_device_finalize(args.vma.mm.system, args.src, args.dst, args.npages, args)


def migrate_device_finalize(system, src_pfns, dst_pfns, npages):
    """migrate_device_finalize(): the last step of migrate_device_range() / _pfns(), as
    migrate_vma_finalize."""
    _migrate_device_finalize(system, src_pfns, dst_pfns, npages, None)


def _migrate_device_finalize(system, src, dst, npages, args):
    phys = system.phys
    src = src[:npages]
    dst = dst[:npages]
    dpfn = migrate_pfn_to_pfn(dst)
    if args is not None:
        have, s = args._collected            # the entries that hold a page: setup's
    else:
        spfn = migrate_pfn_to_pfn(src)
        have = (spfn >= 0).nonzero()[0]
        s = spfn[have]
    if have.size:
        moved = ((src[have] & _MPFN_MIGRATE) != 0) & (dpfn[have] >= 0)
        target = np.where(moved, dpfn[have], s)
        tg = _rmap_targets(system, args, s)
        remove_migration_ptes(system, s, target, tg["vmas"], region=tg["region"],
                              positions=have if tg["region"] is not None else None)
    # Unlock and drop the references of the sources and of every destination: the ones that
    # were used are mapped now (remove_migration_ptes took the mapping's reference); unused
    # ones are freed, and so is each source that moved (a hole that was inserted holds its
    # own mapping reference).
    d = dpfn[dpfn >= 0]
    done = np.concatenate((s, d)) if d.size else s
    if done.size:
        phys.unlock(done)
        phys.put(done, unique=True)


def migrate_device_range(system, src_pfns, start, npages):
    """migrate_device_range(): select ``npages`` device pages from pfn ``start`` for eviction.

    Fills ``src_pfns`` (uint64) with migrate_pfn(pfn) | MIGRATE for every page in
    use that could be locked, and unmaps them everywhere.  Returns 0.
    """
    phys = system.phys
    pg = phys.pages
    pfns = np.arange(start, start + npages, dtype=np.int64)
    src_pfns[:npages] = 0
    with phys.lock:
        used = pg.refcount[pfns] > 0
        p = pfns[used]
        pg.refcount[p] += 1                    # folio_get_nontail_page()
        got = phys.trylock(p, unique=True)
        if (~got).any():
            phys.put(p[~got], unique=True)
        p = p[got]
    sel = p - start
    src_pfns[sel] = migrate_pfn(p) | _MPFN_MIGRATE
    _unmap_by_pfn(system, src_pfns, npages)
    return 0


def migrate_device_pfns(system, src_pfns, pfns):
    """migrate_device_pfns(): like migrate_device_range for an arbitrary list of pfns."""
    phys = system.phys
    pg = phys.pages
    pfns = np.asarray(pfns, dtype=np.int64)
    src_pfns[:pfns.size] = 0
    with phys.lock:
        used = np.nonzero(pg.refcount[pfns] > 0)[0]
        p = pfns[used]
        add_at(pg.refcount, p, 1)
        got = phys.trylock(p)
        if (~got).any():
            phys.put(p[~got])
    src_pfns[used[got]] = migrate_pfn(p[got]) | _MPFN_MIGRATE
    _unmap_by_pfn(system, src_pfns, pfns.size)
    return 0


def _unmap_by_pfn(system, src, npages):
    """migrate_device_unmap() without a VMA: the rmap walk covers every address space."""
    phys = system.phys
    pg = phys.pages
    pfn = migrate_pfn_to_pfn(src[:npages])
    sel = np.nonzero((pfn >= 0) & ((src[:npages] & _MPFN_MIGRATE) != 0))[0]
    if sel.size == 0:
        return
    p = pfn[sel]
    mapped = pg.mapcount[p] > 0
    vmas = vmas_for_pages(system, p, None)
    if mapped.any():
        try_to_migrate(system, p[mapped], vmas)
    with phys.lock:
        ok = (pg.mapcount[p] == 0) & (pg.refcount[p] == migrate_expected_refs(system, p)) & (pg.pincount[p] == 0)
    bad = sel[~ok]
    if bad.size:
        bp = pfn[bad]
        remove_migration_ptes(system, bp, bp, vmas)
        phys.unlock(bp)
        phys.put(bp, unique=True)
        src[bad] = 0


def migrate_device_coherent_pages(system, pfns):
    """migrate_device_coherent_folio(): move coherent pages to system RAM (long-term GUP).

    Returns a mask of the pages that moved.
    """
    pfns = np.asarray(pfns, dtype=np.int64)
    src = np.zeros(pfns.size, dtype=_U)
    dst = np.zeros(pfns.size, dtype=_U)
    migrate_device_pfns(system, src, pfns)
    sel = np.nonzero((src & _MPFN_MIGRATE) != 0)[0]
    if sel.size:
        new = system.phys.alloc(sel.size, None, zero=False)
        system.phys.pages.flags[new] |= PG_LOCKED
        system.phys.copy(new, migrate_pfn_to_pfn(src[sel]))
        dst[sel] = migrate_pfn(new)
    migrate_device_pages(system, src, dst, pfns.size)
    moved = (src & _MPFN_MIGRATE) != 0
    migrate_device_finalize(system, src, dst, pfns.size)
    return moved
