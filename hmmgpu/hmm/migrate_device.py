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
from .memremap import is_device_coherent_page, is_device_private_page, pgmap_owner_is

_U = np.uint64

MIGRATE_PFN_VALID = 1 << 0
MIGRATE_PFN_MIGRATE = 1 << 1
MIGRATE_PFN_LOCKED = 1 << 2       # the 2017 API's bit; today every collected page is locked
MIGRATE_PFN_WRITE = 1 << 3
MIGRATE_PFN_DEVICE = 1 << 4       # 2017 API
MIGRATE_PFN_ERROR = 1 << 5        # 2017 API
MIGRATE_PFN_SHIFT = 6

MIGRATE_VMA_SELECT_SYSTEM = 1 << 0
MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1 << 1
MIGRATE_VMA_SELECT_DEVICE_COHERENT = 1 << 2

VM_SPECIAL = VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP


def migrate_pfn(pfns):
    """migrate_pfn(): pfn << MIGRATE_PFN_SHIFT | MIGRATE_PFN_VALID, vectorised."""
    return (np.asarray(pfns, dtype=np.int64).astype(_U) << _U(MIGRATE_PFN_SHIFT)) | _U(MIGRATE_PFN_VALID)


def migrate_pfn_to_pfn(mpfns):
    """The pfn of each entry, -1 where MIGRATE_PFN_VALID is clear (migrate_pfn_to_page NULL)."""
    m = np.asarray(mpfns, dtype=_U)
    return np.where((m & _U(MIGRATE_PFN_VALID)) != 0, (m >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64), -1)


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
    """migrate_vma_collect() / migrate_vma_collect_pmd(), one pass over the PTE slice."""
    vma = args.vma
    mm = vma.mm
    system = mm.system
    phys = system.phys
    pg = phys.pages
    n = (args.end - args.start) >> PAGE_SHIFT
    i0 = vma.idx(args.start)
    with invalidation(mm, args.start, args.end, MMU_NOTIFY_MIGRATE, owner=args.pgmap_owner):
        with phys.lock:
            pte = vma.pte[i0:i0 + n].copy()
            present = pt.pte_present(pte)
            none = pte == 0
            t = pt.swp_type(pte)
            pfn = pt.pte_pfn(pte)
            mpfn = np.zeros(n, dtype=_U)
            cpages = 0
            if vma_is_anonymous(vma):
                mpfn[none] = _U(MIGRATE_PFN_MIGRATE)
                cpages += int(none.sum())
            cand = np.zeros(n, dtype=bool)
            devp = (t == pt.SWP_DEVICE_PRIVATE_READ) | (t == pt.SWP_DEVICE_PRIVATE_WRITE)
            if devp.any() and args.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE:
                cand[devp] = pgmap_owner_is(system, pfn[devp], args.pgmap_owner)
            zero = present & (pfn == phys.zero_pfn)
            if args.flags & MIGRATE_VMA_SELECT_SYSTEM:
                mpfn[zero] = _U(MIGRATE_PFN_MIGRATE)
                cpages += int(zero.sum())
            # vm_normal_page(): special PTEs have no page to migrate
            page = present & ~zero & ((pte & pt.PTE_SPECIAL) == 0)
            if page.any():
                is_dev = page & (pfn >= phys.nr_ram)
                if args.flags & MIGRATE_VMA_SELECT_SYSTEM:
                    cand |= page & ~is_dev
                if is_dev.any() and args.flags & MIGRATE_VMA_SELECT_DEVICE_COHERENT:
                    d = np.nonzero(is_dev)[0]
                    ok = is_device_coherent_page(system, pfn[d]) & pgmap_owner_is(system, pfn[d],
                                                                                   args.pgmap_owner)
                    cand[d[ok]] = True
            idx = np.nonzero(cand)[0]
            if idx.size:
                # folio_trylock(): a page someone else holds locked is simply skipped.
                got = phys.trylock(pfn[idx], unique=True)
                idx = idx[got]
            if idx.size:
                p = pfn[idx]
                write = (present[idx] & ((pte[idx] & pt.PTE_WRITE) != 0)) | (t[idx] == pt.SWP_DEVICE_PRIVATE_WRITE)
                mpfn[idx] = migrate_pfn(p) | _U(MIGRATE_PFN_MIGRATE) | np.where(write, _U(MIGRATE_PFN_WRITE), _U(0))
                dirty = present[idx] & ((pte[idx] & pt.PTE_DIRTY) != 0)
                d = p[dirty]
                pg.flags[d[(pg.flags[d] & PG_ANON) == 0]] |= PG_DIRTY
                # The mapping's reference becomes ours; its mapcount goes with the PTE.
                vma.pte[i0 + idx] = pt.mk_swp(p, np.where(write, pt.SWP_MIGRATION_WRITE, pt.SWP_MIGRATION_READ))
                pg.mapcount[p] -= 1
                cpages += int(idx.size)
            args.src[:n] = mpfn
            args.npages = n
            args.cpages = cpages


def migrate_device_unmap(src, npages, fault_page=None, args=None):
    """migrate_device_unmap(): unmap every other mapping, give back what cannot move.

    Returns the number of entries still selected (holes included).
    """
    src = src[:npages]
    if args is not None:
        system = args.vma.mm.system
    else:
        system = _system_of(src)
    if system is None:
        return int(((src & _U(MIGRATE_PFN_MIGRATE)) != 0).sum())
    phys = system.phys
    pg = phys.pages
    pfn = migrate_pfn_to_pfn(src)
    sel = np.nonzero((pfn >= 0) & ((src & _U(MIGRATE_PFN_MIGRATE)) != 0))[0]
    if sel.size:
        p = pfn[sel]
        mapped = pg.mapcount[p] > 0
        if mapped.any():
            skip = None
            if args is not None:
                args._wide = True
                i0 = args.vma.idx(args.start)
                skip = (args.vma, i0, i0 + args.npages)
            fam = args.vma.anon_id if args is not None else None
            try_to_migrate(system, p[mapped], vmas_for_pages(system, p[mapped], fam), skip=skip)
        with phys.lock:
            extra = np.zeros(p.size, np.int32)
            if fault_page is not None:
                extra[p == fault_page] = 0   # our do_swap_page holds no extra reference
            ok = (pg.mapcount[p] == 0) & (pg.refcount[p] == migrate_expected_refs(system, p, extra)) & (
                pg.pincount[p] == 0)
        bad = sel[~ok]
        if bad.size:
            src[bad] &= ~_U(MIGRATE_PFN_MIGRATE)
            bp = pfn[bad]
            tg = _rmap_targets(system, args, bp)
            remove_migration_ptes(system, bp, bp, tg["vmas"], region=tg["region"],
                                  positions=bad if tg["region"] is not None else None)
            phys.unlock(bp)
            phys.put(bp, unique=True)
            src[bad] = 0
    return int(((src & _U(MIGRATE_PFN_MIGRATE)) != 0).sum())


def _system_of(src):
    return getattr(src, "_system", None)


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
    spfn = migrate_pfn_to_pfn(src)
    dpfn = migrate_pfn_to_pfn(dst)
    mig = (src & _U(MIGRATE_PFN_MIGRATE)) != 0
    # no destination: this page stays
    src[(dpfn < 0)] &= ~_U(MIGRATE_PFN_MIGRATE)
    mig &= dpfn >= 0
    holes = np.nonzero(mig & (spfn < 0))[0]
    if holes.size:
        if args is None:
            src[holes] &= ~_U(MIGRATE_PFN_MIGRATE)
        else:
            addr = args.start + (int(holes[0]) << PAGE_SHIFT)
            with invalidation(args.vma.mm, addr, args.end, MMU_NOTIFY_MIGRATE, owner=args.pgmap_owner):
                _migrate_vma_insert_pages(args, holes, dpfn[holes])
    pages = np.nonzero(mig & (spfn >= 0))[0]
    if pages.size == 0:
        return
    old, new = spfn[pages], dpfn[pages]
    pg = phys.pages
    with phys.lock:
        keep = np.ones(pages.size, dtype=bool)
        to_dev = is_device_private_page(system, new) | is_device_coherent_page(system, new)
        # Only anonymous memory goes to device memory (page-cache pages stay).
        keep &= ~(to_dev & (pg.mapping[old] >= 0))
        other_zd = (new >= phys.nr_ram) & ~to_dev
        keep &= ~other_zd
        ok = np.zeros(pages.size, dtype=bool)
        if keep.any():
            ok[keep] = folio_migrate_mapping(system, new[keep], old[keep])
        src[pages[~ok]] &= ~_U(MIGRATE_PFN_MIGRATE)
        if ok.any():
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
        src[holes] &= ~_U(MIGRATE_PFN_MIGRATE)
        return
    devp = is_device_private_page(system, newp)
    coh = is_device_coherent_page(system, newp)
    bad_type = (newp >= phys.nr_ram) & ~devp & ~coh
    if bad_type.any():
        src[holes[bad_type]] &= ~_U(MIGRATE_PFN_MIGRATE)
        holes, newp, devp = holes[~bad_type], newp[~bad_type], devp[~bad_type]
    if holes.size == 0:
        return
    memcg = mm.memcg
    i0 = vma.idx(args.start)
    with phys.lock:
        cur = vma.pte[i0 + holes]
        still = (cur == 0) | (pt.pte_present(cur) & (pt.pte_pfn(cur) == phys.zero_pfn))
        if (~still).any():
            src[holes[~still]] &= ~_U(MIGRATE_PFN_MIGRATE)
            holes, newp, devp = holes[still], newp[still], devp[still]
        if holes.size == 0:
            return
        if memcg is not None and not memcg.try_charge(int(holes.size)):
            # mem_cgroup_charge() failed: nothing is inserted
            src[holes] &= ~_U(MIGRATE_PFN_MIGRATE)
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
        src[holes] = _U(MIGRATE_PFN_MIGRATE)


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
    spfn = migrate_pfn_to_pfn(src)
    dpfn = migrate_pfn_to_pfn(dst)
    mig = (src & _U(MIGRATE_PFN_MIGRATE)) != 0
    # destinations that were not used: unlock and free them
    unused = (dpfn >= 0) & ((spfn < 0) | ~mig)
    # (a hole that was inserted holds its own mapping reference now; drop the driver's)
    if unused.any():
        u = dpfn[unused]
        phys.unlock(u)
        phys.put(u, unique=True)
    have = np.nonzero(spfn >= 0)[0]
    if have.size == 0:
        return
    s = spfn[have]
    moved = mig[have] & (dpfn[have] >= 0)
    target = np.where(moved, dpfn[have], s)
    tg = _rmap_targets(system, args, s)
    remove_migration_ptes(system, s, target, tg["vmas"], region=tg["region"],
                          positions=have if tg["region"] is not None else None)
    phys.unlock(s)
    phys.put(s, unique=True)
    if moved.any():
        d = target[moved]
        phys.unlock(d)
        phys.put(d, unique=True)


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
    src_pfns[sel] = migrate_pfn(p) | _U(MIGRATE_PFN_MIGRATE)
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
    src_pfns[used[got]] = migrate_pfn(p[got]) | _U(MIGRATE_PFN_MIGRATE)
    _unmap_by_pfn(system, src_pfns, pfns.size)
    return 0


def _unmap_by_pfn(system, src, npages):
    """migrate_device_unmap() without a VMA: the rmap walk covers every address space."""
    phys = system.phys
    pg = phys.pages
    pfn = migrate_pfn_to_pfn(src[:npages])
    sel = np.nonzero((pfn >= 0) & ((src[:npages] & _U(MIGRATE_PFN_MIGRATE)) != 0))[0]
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
    sel = np.nonzero((src & _U(MIGRATE_PFN_MIGRATE)) != 0)[0]
    if sel.size:
        new = system.phys.alloc(sel.size, None, zero=False)
        system.phys.pages.flags[new] |= PG_LOCKED
        system.phys.copy(new, migrate_pfn_to_pfn(src[sel]))
        dst[sel] = migrate_pfn(new)
    migrate_device_pages(system, src, dst, pfns.size)
    moved = (src & _U(MIGRATE_PFN_MIGRATE)) != 0
    migrate_device_finalize(system, src, dst, pfns.size)
    return moved
