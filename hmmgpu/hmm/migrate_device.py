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

Large folios (the 2025 device-THP series): with MIGRATE_VMA_SELECT_COMPOUND, a
PMD mapping lying wholly in the range -- a THP, a device-private or coherent
2 MiB folio of the owner, the huge zero folio or an empty PMD -- is collected
whole: ``src`` keeps one entry per 4 KiB page, the head entry carries
MIGRATE_PFN_COMPOUND and the other 511 are 0.  A driver answers with a 2 MiB
destination (``dst`` head | MIGRATE_PFN_COMPOUND), migrated and mapped by a PMD
again, or with 512 small pages from the head on, and migrate_vma_pages splits
the source folio first (folio_split, ``ops.folio_split`` for a device folio).
A folio the range does not hold whole, or any large folio without the flag, is
split at collection as migrate_vma_split_folio() does.  The pfn-based
migrate_device_range / migrate_device_pfns mark a device folio's head
COMPOUND the same way.

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

from ..constants import HPAGE_PMD_NR, PAGE_SHIFT, PAGE_SIZE
from ..errors import oserror
from ..mm import pgtable as pt
from ..mm.huge_memory import split_folio, split_huge_pmd
from ..mm.migrate import folio_migrate_flags, folio_migrate_mapping, migrate_expected_refs
from ..mm.notifier import MMU_NOTIFY_MIGRATE, invalidation
from ..mm.physmem import PG_ANON, PG_DIRTY, PG_HEAD, PG_LOCKED, add_at
from ..mm.rmap import remove_migration_ptes, rmap_locked, try_to_migrate, vmas_for_pages
from ..mm.validate import pfn_array, ulong
from ..mm.vma import VM_DONTEXPAND, VM_HUGETLB, VM_IO, VM_MIXEDMAP, VM_PFNMAP, VM_WRITE, VMA, vma_is_anonymous
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
MIGRATE_PFN_COMPOUND = 1 << 4     # today's use of bit 4 (legacy.py clears its DEVICE bit first)
MIGRATE_PFN_ERROR = 1 << 5        # 2017 API
MIGRATE_PFN_SHIFT = 6

_MPFN_SHIFT = _U(MIGRATE_PFN_SHIFT)
_MPFN_VALID = _U(MIGRATE_PFN_VALID)
_MPFN_MIGRATE = _U(MIGRATE_PFN_MIGRATE)
_MPFN_WRITE = _U(MIGRATE_PFN_WRITE)
_MPFN_COMPOUND = _U(MIGRATE_PFN_COMPOUND)
_MPFN_FLAGS = _U((1 << MIGRATE_PFN_SHIFT) - 1)
_NR = HPAGE_PMD_NR
_ARANGE = np.arange(_NR, dtype=np.int64)
_HUGE = pt.PTE_HUGE
_NOT_MIGRATE = ~_MPFN_MIGRATE
_MPFN_VALID_MIGRATE = _U(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
_MPFN_WRITE_SHIFT = _U(3)                  # MIGRATE_PFN_WRITE is 1 << 3
_MIG_READ_TYPE = _U(pt.SWP_MIGRATION_READ)

MIGRATE_VMA_SELECT_SYSTEM = 1 << 0
MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1 << 1
MIGRATE_VMA_SELECT_DEVICE_COHERENT = 1 << 2
MIGRATE_VMA_SELECT_COMPOUND = 1 << 3

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
    pages) and ``npages`` are set by migrate_vma_setup.  The fields are the caller's, as in C:
    migrate_vma_setup checks them.
    """

    def __init__(self, vma=None, start=0, end=0, src=None, dst=None, pgmap_owner=None, flags=0,
                 fault_page=None):
        self.vma = vma
        self.start = start
        self.end = end
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
        self._compound = _EMPTY              # head positions of the 2 MiB folios collected whole
        self._choles = _EMPTY                # head positions of the 2 MiB holes collected whole
        self._moved = None                   # per position: its page moved (migrate_vma_pages)
        self._dpages = None                  # per position: the destination page

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
    always, even when it copied nothing.  Returns 0, or -EINVAL for a bad range, VMA, array or
    field (checked before anything changes).
    """
    try:
        nr = _check_migrate_vma(args)
    except OSError as ex:
        return -ex.errno
    vma = args.vma
    if vma.vm_flags & (VM_SPECIAL | VM_HUGETLB):
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
    args._moved = args._dpages = None
    if system.phys.nr_folios:
        _split_for_collect(args)
    _migrate_vma_collect(args)
    if args.cpages:
        args.cpages = migrate_device_unmap(args.src, args.npages, args.fault_page, args=args)
    debug.migration_started(args)
    # Pages are locked and unmapped: their contents are stable for the driver's copy.
    return 0


def _check_migrate_vma(args):
    """The caller's struct migrate_vma, checked before anything happens (OSError on a bad
    field): a VMA still in its address space, [start, end) inside it once rounded to pages,
    unsigned-long fields, uint64 src/dst arrays of one entry per page, and a fault page that
    exists.  Returns the page count; start and end are stored rounded, as the kernel does."""
    if not isinstance(args, MigrateVma):
        raise oserror(errno.EINVAL, "migrate_vma_setup needs a MigrateVma")
    vma = args.vma
    if not isinstance(vma, VMA) or vma.mm.find_vma(vma.start) is not vma:
        raise oserror(errno.EINVAL, "migrate_vma: not a VMA of a live address space")
    start = ulong(args.start, "migrate_vma.start") & ~(PAGE_SIZE - 1)
    end = ulong(args.end, "migrate_vma.end", start) & ~(PAGE_SIZE - 1)
    args.flags = ulong(args.flags, "migrate_vma.flags", start)
    if end <= start or start < vma.start or end > vma.end:
        raise oserror(errno.EINVAL, f"migrate_vma: range is empty or leaves {vma!r}", start, end)
    args.start, args.end = start, end
    nr = (end - start) >> PAGE_SHIFT
    for name in ("src", "dst"):
        if getattr(args, name) is not None:
            pfn_array(getattr(args, name), nr, f"migrate_vma.{name}", start, end)
    if args.fault_page is not None:
        fp = ulong(args.fault_page, "migrate_vma.fault_page", start)
        if fp >= vma.mm.system.phys.pages.n:
            raise oserror(errno.EINVAL, f"migrate_vma.fault_page: no pfn {fp:#x}", start, end)
        args.fault_page = fp
    return nr


def _check_pfn_arrays(system, npages, *arrays):
    """migrate_device_*(): ``npages`` an unsigned long, each array a uint64 array that long."""
    npages = ulong(npages, "npages")
    for i, a in enumerate(arrays):
        pfn_array(a, npages, ("src_pfns", "dst_pfns")[i])
    return npages


def _existing_pfns(system, pfns):
    """``pfns`` as an int64 array of pfns that exist, or EINVAL."""
    try:
        p = np.asarray(pfns)
    except (TypeError, ValueError):
        p = np.zeros((), object)
    if p.ndim != 1 or (p.size and p.dtype.kind not in "iu"):
        raise oserror(errno.EINVAL, "pfns must be a 1-D integer array")
    if p.size and (int(p.min()) < 0 or int(p.max()) >= system.phys.pages.n):
        raise oserror(errno.EINVAL, f"pfn outside the pfn space [0, {system.phys.pages.n:#x})")
    return p.astype(np.int64)


def _select(args, pte, pfn):
    """The collection rule for each entry: (hole, cand, swapped), where ``hole`` marks the
    entries the driver may fill (pte_none in an anonymous VMA; the zero pages), ``cand`` the
    pages taken, ``swapped`` whether any of those is a device-private entry."""
    vma = args.vma
    system = vma.mm.system
    phys = system.phys
    n = pte.size
    select = args.flags
    kind = pte & _PRESENT_SPECIAL
    hole = (pte == 0) if vma_is_anonymous(vma) else None
    cand = None
    if select & MIGRATE_VMA_SELECT_SYSTEM:
        zmask = phys.zero_mask(pfn)
        zero = ((pte & pt.PTE_PRESENT) != 0) & zmask
        hole = zero if hole is None else hole | zero
        # vm_normal_page(): special PTEs have no page; device pages are not system pages
        cand = (kind == pt.PTE_PRESENT) & ~zmask & (pfn < phys.nr_ram)
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
    return hole, cand, swapped


def _whole_groups(args, n):
    """Start positions (into the range) of the 2 MiB-aligned groups the range holds whole."""
    a0 = (-(args.start >> PAGE_SHIFT)) % _NR
    return np.arange(a0, n - _NR + 1, _NR, dtype=np.int64)


def _split_for_collect(args):
    """migrate_vma_split_folio(): a large folio this migration would take but cannot take
    whole (no MIGRATE_VMA_SELECT_COMPOUND, or the range holds only part of its PMD, or it is
    mapped by PTEs) is split first, in every mapping of it."""
    vma = args.vma
    system = vma.mm.system
    phys = system.phys
    n = (args.end - args.start) >> PAGE_SHIFT
    i0 = vma.idx(args.start)
    pte = vma.pte[i0:i0 + n].copy()
    pfn = (pte >> _PFN_SHIFT).astype(np.int64)
    _hole, cand, _ = _select(args, pte, pfn)
    if cand is None:
        return
    pos = cand.nonzero()[0]
    large = pos[phys.pages.order[pfn[pos]] != 0]
    if large.size == 0:
        return
    keep = np.zeros(large.size, bool)
    if args.flags & MIGRATE_VMA_SELECT_COMPOUND:
        g = _whole_groups(args, n)
        whole = np.zeros(n, bool)
        whole[(g[:, None] + _ARANGE).reshape(-1)] = True
        keep = whole[large] & ((pte[large] & _HUGE) != 0)
    heads = np.unique(phys.compound_head(pfn[large[~keep]]))
    if heads.size:
        split_folio(system, heads, vmas_for_pages(system, heads, vma.anon_id) + [vma])


def _migrate_vma_collect(args):
    """migrate_vma_collect() / migrate_vma_collect_pmd() / migrate_vma_collect_huge_pmd(), one
    pass over the PTE slice.

    Leaves in ``args._collected`` the positions and pfns of the pages it locked and unmapped
    (every page of a folio collected whole), for migrate_device_unmap.
    """
    vma = args.vma
    mm = vma.mm
    system = mm.system
    phys = system.phys
    pg = phys.pages
    n = (args.end - args.start) >> PAGE_SHIFT
    i0 = vma.idx(args.start)
    mpfn = args.src[:n]                       # zeroed by migrate_vma_setup
    compound = bool(args.flags & MIGRATE_VMA_SELECT_COMPOUND)
    with invalidation(mm, args.start, args.end, MMU_NOTIFY_MIGRATE, owner=args.pgmap_owner):
        with phys.lock:
            pte = vma.pte[i0:i0 + n].copy()
            pfn = (pte >> _PFN_SHIFT).astype(np.int64)
            hole, cand, swapped = _select(args, pte, pfn)
            cgroups = choles = _EMPTY
            if mm.maybe_huge or compound:
                cgroups, choles = _collect_huge(args, pte, pfn, hole, cand, compound)
            if cand is not None and phys.nr_folios:
                # a large folio still mapped by PTEs here (it changed since it was split): skip
                c = cand.nonzero()[0]
                cand[c[pg.order[pfn[c]] != 0]] = False
            cpages = 0
            h = _EMPTY
            if hole is not None:
                h = hole.nonzero()[0]
                if h.size:
                    mpfn[h] = _MPFN_MIGRATE
                    cpages = int(h.size)
            if choles.size:
                mpfn[choles] = _MPFN_MIGRATE | _MPFN_COMPOUND
                cpages += int(choles.size)
            args._holes = h
            args._choles = choles
            idx = _EMPTY if cand is None else cand.nonzero()[0]
            if idx.size:
                # folio_trylock(): a page someone else holds locked is simply skipped.
                p = pfn[idx]
                got = phys.trylock(p, unique=True)
                if np.count_nonzero(got) < got.size:
                    idx, p = idx[got], p[got]
            if cgroups.size:
                members = (cgroups[:, None] + _ARANGE).reshape(-1)
                got = phys.trylock(pfn[members], unique=True).reshape(cgroups.size, _NR)
                whole = got.all(axis=1)
                if not whole.all():
                    phys.unlock(pfn[members][got.reshape(-1) & np.repeat(~whole, _NR)])
                    cgroups = cgroups[whole]
                    members = (cgroups[:, None] + _ARANGE).reshape(-1)
                if cgroups.size:
                    idx = np.concatenate((idx, members))
                    p = pfn[idx]
            if idx.size:
                e = pte[idx]
                write = (e & _PRESENT_WRITE) == _PRESENT_WRITE
                if swapped or cgroups.size:
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
                # The mapping's reference becomes ours; its mapcount goes with the PTE (a
                # PMD's: set_pmd_migration_entry(), PTE_HUGE kept).
                vma.pte[i0 + idx] = (pu << _PFN_SHIFT) | ((_MIG_READ_TYPE + wbit) << _SWP_SHIFT) | (e & _HUGE)
                pg.mapcount[p] -= 1
                if cgroups.size:
                    # one src entry per folio, at its head; the other 511 stay 0
                    tails = (cgroups[:, None] + _ARANGE[1:]).reshape(-1)
                    mpfn[tails] = 0
                    mpfn[cgroups] |= _MPFN_COMPOUND
                    cpages += int(idx.size - tails.size)
                else:
                    cpages += int(idx.size)
            else:
                p = _EMPTY
            args._collected = (idx, p)
            args._compound = cgroups
            args.npages = n
            args.cpages = cpages


def _collect_huge(args, pte, pfn, hole, cand, compound):
    """The PMD mappings of the range: with MIGRATE_VMA_SELECT_COMPOUND, whole groups of the
    pages ``cand`` selects become folios to collect (their head positions, returned first)
    and whole empty or huge-zero groups 2 MiB holes (returned second).  Every other entry of
    a PMD mapping is left out (split_for_collect split what it had to), except the huge zero
    folio's, whose pages stay small holes as migrate_vma_collect_hole() makes them."""
    n = pte.size
    huge = (pte & _HUGE) != 0
    g = _whole_groups(args, n) if compound else _EMPTY
    cgroups = choles = _EMPTY
    if g.size:
        members = (g[:, None] + _ARANGE)
        if cand is not None:
            ok = cand[members].all(axis=1) & huge[g]
            cgroups = g[ok]
        if hole is not None:
            ok = hole[members].all(axis=1) & (huge[g] | (pte[g] == 0))
            choles = g[ok]
            hole[(choles[:, None] + _ARANGE).reshape(-1)] = False
    if cand is not None:
        cand &= ~huge
    return cgroups, choles


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
    return _migrate_device_unmap(args.vma.mm.system, src, npages, idx, p, cpages, args)


@rmap_locked
def _migrate_device_unmap(system, src, npages, idx, p, cpages, args):
    """The rmap part of migrate_device_unmap (rmap lock held: the VMAs it lists stay put)."""
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
    gone = int(np.count_nonzero(~ok))
    if args._compound.size:
        # a folio moves whole or not at all: one page that cannot takes the others back too
        okpos = np.ones(npages, bool)
        okpos[idx] = ok
        g = args._compound
        whole = okpos[(g[:, None] + _ARANGE)].all(axis=1)
        if not whole.all():
            okpos[(g[~whole][:, None] + _ARANGE).reshape(-1)] = False
            ok = okpos[idx]
            args._compound = g[whole]
            gone = int(np.count_nonzero(~ok)) - (_NR - 1) * int(np.count_nonzero(~whole))
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
    return cpages - gone


def migrate_vma_pages(args):
    """migrate_vma_pages(): move struct-page state (page cache slot, flags, memcg charge) to the
    destinations in ``args.dst`` and insert the holes the driver filled; entries that cannot
    move lose MIGRATE_PFN_MIGRATE in ``args.src``.  Every destination page must be locked and
    referenced (DriverBug otherwise).  The driver may now update its device page table; then
    migrate_vma_finalize."""
    if not isinstance(args, MigrateVma) or args.npages == 0:
        return
    system = args.vma.mm.system
    _check_destinations(system, args.src, args.dst, args.npages, args.pgmap_owner, "migrate_vma_pages", args)
    args._pages_started = True
    _migrate_device_pages(system, args.src, args.dst, args.npages, args)


def migrate_device_pages(system, src_pfns, dst_pfns, npages):
    """migrate_device_pages(): the second step of migrate_device_range() / _pfns(): move
    struct-page state to the destinations in ``dst_pfns`` (locked and referenced).  0, or
    -EINVAL when the arrays are not uint64 arrays of ``npages``."""
    try:
        npages = _check_pfn_arrays(system, npages, src_pfns, dst_pfns)
    except OSError as ex:
        return -ex.errno
    _check_destinations(system, src_pfns, dst_pfns, npages, None, "migrate_device_pages", None)
    _migrate_device_pages(system, src_pfns, dst_pfns, npages, None)
    return 0


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


def _expand(m, n):
    """Per position of a src or dst array: its pfn (-1 for none) and whether MIGRATE is set,
    a COMPOUND entry standing for the 512 pages from its own position on."""
    m = m[:n]
    pfn = migrate_pfn_to_pfn(m)
    mig = (m & _MPFN_MIGRATE) != 0
    comp = ((m & (_MPFN_COMPOUND | _MPFN_VALID)) == (_MPFN_COMPOUND | _MPFN_VALID)).nonzero()[0]
    if comp.size:
        members = comp[:, None] + _ARANGE[1:]
        inside = members < n
        pfn[members[inside]] = (pfn[comp][:, None] + _ARANGE[1:])[inside]
        mig[members[inside]] = np.broadcast_to(mig[comp][:, None], members.shape)[inside]
    return pfn, mig


def _dst_pages(system, dst, n, dpfn):
    """Every destination page the driver handed over: a COMPOUND entry's whole folio.
    ``dpfn``: the entries' pfns per position, which are the answer when none is COMPOUND."""
    dst = dst[:n]
    comp = (dst & _MPFN_COMPOUND) != 0
    if not np.count_nonzero(comp):
        return dpfn[dpfn >= 0]
    pfn = migrate_pfn_to_pfn(dst)
    return np.concatenate((pfn[~comp & (pfn >= 0)], system.phys.folio_pages(pfn[comp & (pfn >= 0)])))


def _split_unmapped(system, args, src, heads):
    """migrate_vma_split_unmapped_folio(): the folios whose src entries are at ``heads`` go
    to small pages (the destination gave small pages); their PMD migration entries become
    PTE ones and each page gets its own src entry, flags copied from the head's."""
    pfn = migrate_pfn_to_pfn(src[heads])
    if args is not None:
        vma = args.vma
        vmas = [vma] + (vmas_for_pages(system, pfn, vma.anon_id) if args._wide else [])
        args._compound = np.setdiff1d(args._compound, heads)
    else:
        vmas = vmas_for_pages(system, pfn, None)
    split_folio(system, pfn, vmas)
    flags = src[heads] & (_MPFN_FLAGS & ~_MPFN_COMPOUND)
    members = (heads[:, None] + _ARANGE).reshape(-1)
    src[members] = ((pfn[:, None] + _ARANGE).reshape(-1).astype(_U) << _MPFN_SHIFT) | np.repeat(flags, _NR)


def _compound_entries(system, src, dst, n, args):
    """What migrate_vma_pages does first for the 2 MiB entries: a folio whose destination is
    a 2 MiB folio stays whole; one whose destination starts with a small page is split; a
    2 MiB hole the driver filled with small pages becomes 512 holes; a small source with a
    2 MiB destination does not move.  Returns the head positions of the whole-folio moves,
    of the folios and of the holes that stay 2 MiB."""
    if args is not None:
        comp, choles = args._compound, args._choles
    else:
        c = ((src[:n] & _MPFN_COMPOUND) != 0).nonzero()[0]
        comp, choles = c[(src[c] & _MPFN_VALID) != 0], _EMPTY
    dflags = dst[comp]
    dvalid = (dflags & _MPFN_VALID) != 0
    dcomp = (dflags & _MPFN_COMPOUND) != 0
    src[comp[~dvalid]] &= _NOT_MIGRATE
    split = comp[dvalid & ~dcomp & ((src[comp] & _MPFN_MIGRATE) != 0)]
    if split.size:
        _split_unmapped(system, args, src, split)
    whole = comp[dvalid & dcomp]
    huge_holes = _EMPTY
    if choles.size:
        hf = dst[choles]
        hvalid = (hf & _MPFN_VALID) != 0
        hcomp = (hf & _MPFN_COMPOUND) != 0
        src[choles[~hvalid]] &= _NOT_MIGRATE
        small = choles[hvalid & ~hcomp & ((src[choles] & _MPFN_MIGRATE) != 0)]
        if small.size:
            members = (small[:, None] + _ARANGE).reshape(-1)
            members = members[members < n]
            src[members] = _MPFN_MIGRATE          # 512 holes, each with its own destination
            args._holes = np.union1d(args._holes, members)
            args._choles = np.setdiff1d(choles, small)
        huge_holes = choles[hvalid & hcomp]
    # a small source (page or hole) does not move to a 2 MiB destination
    big = ((dst[:n] & (_MPFN_COMPOUND | _MPFN_VALID)) == (_MPFN_COMPOUND | _MPFN_VALID)).nonzero()[0]
    if big.size > whole.size + huge_holes.size:
        stray = np.setdiff1d(big, np.concatenate((whole, huge_holes)))
        src[stray] &= _NOT_MIGRATE
    return whole, huge_holes


def _migrate_device_pages(system, src, dst, npages, args):
    phys = system.phys
    src = src[:npages]
    dst = dst[:npages]
    compound = args is None or args._compound.size or args._choles.size or (
        args.flags & MIGRATE_VMA_SELECT_COMPOUND)
    whole = huge_holes = _EMPTY
    if compound:
        whole, huge_holes = _compound_entries(system, src, dst, npages, args)
        dpfn, _ = _expand(dst, npages)
    else:
        dpfn = migrate_pfn_to_pfn(dst)
    # no destination: this page stays
    src[dpfn < 0] &= _NOT_MIGRATE
    mig = (src & _MPFN_MIGRATE) != 0
    if whole.size:
        # every page of a folio that moves whole moves
        members = (whole[:, None] + _ARANGE[1:]).reshape(-1)
        mig[members] = np.repeat(mig[whole], _NR - 1)
    if args is not None:
        have, spfn = args._collected          # setup's pages and holes: src is not decoded again
        holes = args._holes[mig[args._holes]]
        moving = mig[have]
        pages, old = have[moving], spfn[moving]
        args._dpages = dpfn
        args._moved = mig
    else:
        spfn, _ = _expand(src, npages)
        holes = (mig & (spfn < 0)).nonzero()[0]
        pages = (mig & (spfn >= 0)).nonzero()[0]
        old = spfn[pages]
    if holes.size or huge_holes.size:
        if args is None:
            src[holes] &= _NOT_MIGRATE
        else:
            _migrate_vma_insert(args, holes, dpfn[holes], huge_holes[mig[huge_holes]])
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
        if whole.size:
            # a folio moves whole or not at all
            okpos = np.ones(npages, bool)
            okpos[pages] = ok
            fail = ~okpos[whole[:, None] + _ARANGE].all(axis=1)
            okpos[(whole[fail][:, None] + _ARANGE).reshape(-1)] = False
            ok = okpos[pages]
        src[pages[~ok]] &= _NOT_MIGRATE
        mig[pages[~ok]] = False
        if np.count_nonzero(ok):
            folio_migrate_flags(system, new[ok], old[ok])


def _migrate_vma_insert(args, holes, newp, huge_holes):
    """migrate_vma_insert_page() for every hole at once, and migrate_vma_insert_huge_pmd_page()
    for the 2 MiB holes filled with a 2 MiB folio (``huge_holes``, head positions)."""
    vma = args.vma
    mm = vma.mm
    if mm.maybe_huge and holes.size:
        # a huge zero PMD the holes come from is split before its pages are replaced
        i0 = vma.idx(args.start)
        h = holes[(vma.pte[i0 + holes] & _HUGE) != 0]
        if h.size:
            split_huge_pmd(mm, vma, i0 + int(h[0]), i0 + int(h[-1]) + 1)
    first = min(int(holes[0]) if holes.size else args.npages,
                int(huge_holes[0]) if huge_holes.size else args.npages)
    addr = args.start + (first << PAGE_SHIFT)
    with invalidation(mm, addr, args.end, MMU_NOTIFY_MIGRATE, owner=args.pgmap_owner):
        if holes.size:
            _migrate_vma_insert_pages(args, holes, newp)
        if huge_holes.size:
            _migrate_vma_insert_huge(args, huge_holes)


def _migrate_vma_insert_huge(args, heads):
    """migrate_vma_insert_huge_pmd_page(): map each 2 MiB destination folio by one PMD where
    the range had an empty PMD or the huge zero folio."""
    vma = args.vma
    mm = vma.mm
    system = mm.system
    phys = system.phys
    pg = phys.pages
    src = args.src
    dhead = migrate_pfn_to_pfn(args.dst[heads])
    ztype = zone_device_type(system, dhead)
    ok = (ztype == 0) | (ztype == MEMORY_DEVICE_PRIVATE) | (ztype == MEMORY_DEVICE_COHERENT)
    memcg = mm.memcg
    i0 = vma.idx(args.start)
    with phys.lock:
        members = i0 + heads[:, None] + _ARANGE
        cur = vma.pte[members]
        hz = phys.huge_zero_pfn
        empty = ~(cur != 0).any(axis=1)
        if hz >= 0:
            empty |= ((cur[:, 0] & _HUGE) != 0) & (pt.pte_pfn(cur[:, 0]) == hz)
        ok &= empty
        if memcg is not None and np.count_nonzero(ok) and not memcg.try_charge(int(np.count_nonzero(ok)) * _NR):
            ok[:] = False                     # mem_cgroup_charge() failed
        src[heads[~ok]] &= _NOT_MIGRATE
        heads, dhead, ztype, members = heads[ok], dhead[ok], ztype[ok], members[ok]
        if heads.size == 0:
            return
        new = (dhead[:, None] + _ARANGE).reshape(-1)
        writable = bool(vma.vm_flags & VM_WRITE)
        devp = np.repeat(ztype == MEMORY_DEVICE_PRIVATE, _NR)
        ent = pt.mk_pte(new, pt.PTE_YOUNG | _HUGE | ((pt.PTE_WRITE | pt.PTE_DIRTY) if writable else _U(0)))
        if devp.any():
            ent[devp] = pt.mk_swp(new[devp], pt.SWP_DEVICE_PRIVATE_WRITE if writable
                                  else pt.SWP_DEVICE_PRIVATE_READ) | _HUGE
        pg.flags[new] |= PG_ANON
        pg.memcg[new] = -1 if memcg is None else memcg.id
        pg.refcount[new] += 1
        pg.mapcount[new] += 1
        vma.pte[members.reshape(-1)] = ent
        mm.add_rss("anon", int(new.size))
        mm.maybe_huge = True


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
        still = (cur == 0) | (pt.pte_present(cur) & ((cur & _HUGE) == 0) & phys.zero_mask(pt.pte_pfn(cur)))
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
    if not isinstance(args, MigrateVma) or args.npages == 0:
        return
    debug.migration_finalized(args)
    _migrate_device_finalize(args.vma.mm.system, args.src, args.dst, args.npages, args)


def migrate_device_finalize(system, src_pfns, dst_pfns, npages):
    """migrate_device_finalize(): the last step of migrate_device_range() / _pfns(), as
    migrate_vma_finalize.  0, or -EINVAL when the arrays are not uint64 arrays of ``npages``."""
    try:
        npages = _check_pfn_arrays(system, npages, src_pfns, dst_pfns)
    except OSError as ex:
        return -ex.errno
    _migrate_device_finalize(system, src_pfns, dst_pfns, npages, None)
    return 0


@rmap_locked
def _migrate_device_finalize(system, src, dst, npages, args):
    phys = system.phys
    src = src[:npages]
    dst = dst[:npages]
    if args is not None:
        have, s = args._collected            # the entries that hold a page: setup's
        if args._moved is not None:          # migrate_vma_pages ran: what it decided
            dpfn, mig = args._dpages, args._moved
        else:
            dpfn, _ = _expand(dst, npages)
            mig = np.zeros(npages, bool)
    else:
        spfn, mig = _expand(src, npages)
        dpfn, _ = _expand(dst, npages)
        have = (spfn >= 0).nonzero()[0]
        s = spfn[have]
    if have.size:
        moved = mig[have] & (dpfn[have] >= 0)
        target = np.where(moved, dpfn[have], s)
        tg = _rmap_targets(system, args, s)
        remove_migration_ptes(system, s, target, tg["vmas"], region=tg["region"],
                              positions=have if tg["region"] is not None else None)
    # Unlock and drop the references of the sources and of every destination: the ones that
    # were used are mapped now (remove_migration_ptes took the mapping's reference); unused
    # ones are freed, and so is each source that moved (a hole that was inserted holds its
    # own mapping reference).
    d = _dst_pages(system, dst, npages, dpfn)
    done = np.concatenate((s, d)) if d.size else s
    if done.size:
        phys.unlock(done)
        phys.put(done, unique=True)


def migrate_device_range(system, src_pfns, start, npages):
    """migrate_device_range(): select ``npages`` device pages from pfn ``start`` for eviction.

    Fills ``src_pfns`` (uint64) with migrate_pfn(pfn) | MIGRATE for every page in
    use that could be locked (a large folio's head also COMPOUND, its other entries 0),
    and unmaps them everywhere.  Returns 0, or -EINVAL when the pfns do not exist or the
    array is not a uint64 array of ``npages``.
    """
    pg = system.phys.pages
    try:
        npages = _check_pfn_arrays(system, npages, src_pfns)
        start = ulong(start, "start pfn")
        if start + npages > pg.n:
            raise oserror(errno.EINVAL, f"pfns [{start:#x}, {start + npages:#x}) do not exist "
                          f"(the pfn space ends at {pg.n:#x})")
    except OSError as ex:
        return -ex.errno
    _lock_pfns(system, src_pfns, np.arange(start, start + npages, dtype=np.int64))
    _unmap_by_pfn(system, src_pfns, npages)
    return 0


def migrate_device_pfns(system, src_pfns, pfns):
    """migrate_device_pfns(): like migrate_device_range for an arbitrary list of device pfns.

    As in mainline, ``pfns`` may be the count ``npages`` of raw pfns the caller put in
    ``src_pfns``; or the pfns themselves (an array), ``src_pfns`` then being filled.  0, or
    -EINVAL for pfns that do not exist or a bad array."""
    try:
        if isinstance(pfns, (int, np.integer)) and not isinstance(pfns, bool):
            pfns = _check_pfn_arrays(system, pfns, src_pfns)
            pfns = np.array(src_pfns[:pfns], dtype=np.int64)
        pfns = _existing_pfns(system, pfns)
        _check_pfn_arrays(system, pfns.size, src_pfns)
    except OSError as ex:
        return -ex.errno
    _lock_pfns(system, src_pfns, pfns)
    _unmap_by_pfn(system, src_pfns, pfns.size)
    return 0


def _lock_pfns(system, src_pfns, pfns):
    """migrate_device_pfn_lock() over ``pfns``, filling ``src_pfns``: each page in use that can
    be locked; a large folio is taken whole at its head (whose entry gets COMPOUND, the next
    ones 0) and a tail page listed alone is not taken (folio_get_nontail_page())."""
    phys = system.phys
    pg = phys.pages
    src_pfns[:pfns.size] = 0
    with phys.lock:
        used = np.nonzero(pg.refcount[pfns] > 0)[0]
        heads = _EMPTY
        if phys.nr_folios and used.size:
            o = pg.order[pfns[used]]
            large = o != 0
            if np.count_nonzero(large):
                lu = used[large]
                head = (pg.flags[pfns[lu]] & PG_HEAD) != 0
                heads = lu[head]
                # the folio's pages must follow its head in the list, as its src entries will
                span = np.minimum(heads[:, None] + _ARANGE, pfns.size - 1)
                heads = heads[(pfns[span] == pfns[heads][:, None] + _ARANGE).all(axis=1)]
                used = used[~large]
        p = pfns[used]
        add_at(pg.refcount, p, 1)
        got = phys.trylock(p)
        if (~got).any():
            phys.put(p[~got])
        if heads.size:
            members = phys.folio_pages(pfns[heads]).reshape(heads.size, _NR)
            hgot = phys.trylock(members.reshape(-1), unique=True).reshape(heads.size, _NR)
            whole = hgot.all(axis=1)
            phys.unlock(members.reshape(-1)[(hgot & ~whole[:, None]).reshape(-1)])
            heads, members = heads[whole], members[whole]
            pg.refcount[members.reshape(-1)] += 1
    src_pfns[used[got]] = migrate_pfn(p[got]) | _MPFN_MIGRATE
    if heads.size:
        tails = (heads[:, None] + _ARANGE[1:]).reshape(-1)
        src_pfns[tails[tails < pfns.size]] = 0
        src_pfns[heads] = migrate_pfn(pfns[heads]) | _MPFN_MIGRATE | _MPFN_COMPOUND


@rmap_locked
def _unmap_by_pfn(system, src, npages):
    """migrate_device_unmap() without a VMA: the rmap walk covers every address space."""
    phys = system.phys
    pg = phys.pages
    pfn, mig = _expand(src, npages)
    sel = np.nonzero((pfn >= 0) & mig)[0]
    if sel.size == 0:
        return
    p = pfn[sel]
    mapped = pg.mapcount[p] > 0
    vmas = vmas_for_pages(system, p, None)
    if mapped.any():
        try_to_migrate(system, p[mapped], vmas)
    with phys.lock:
        ok = (pg.mapcount[p] == 0) & (pg.refcount[p] == migrate_expected_refs(system, p)) & (pg.pincount[p] == 0)
    heads = ((src[:npages] & _MPFN_COMPOUND) != 0).nonzero()[0]
    if heads.size and not ok.all():
        # a folio moves whole or not at all
        okpos = np.ones(npages, bool)
        okpos[sel] = ok
        bad = heads[~okpos[np.minimum(heads[:, None] + _ARANGE, npages - 1)].all(axis=1)]
        okpos[np.minimum(bad[:, None] + _ARANGE, npages - 1).reshape(-1)] = False
        ok = okpos[sel]
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
    pfns = _existing_pfns(system, pfns)
    phys = system.phys
    src = np.zeros(pfns.size, dtype=_U)
    dst = np.zeros(pfns.size, dtype=_U)
    migrate_device_pfns(system, src, pfns)
    spfn, mig = _expand(src, pfns.size)
    want = mig & (spfn >= 0)
    heads = ((src & _MPFN_COMPOUND) != 0).nonzero()[0]
    taken = []
    try:
        if heads.size:
            # a whole folio where a free 2 MiB block is left, small pages (and a split) elsewhere
            got = phys.alloc_folios(heads.size, zero=False)
            h = heads[:got.size]
            taken.append(phys.folio_pages(got))
            phys.pages.flags[phys.folio_pages(got)] |= PG_LOCKED
            phys.copy(phys.folio_pages(got), phys.folio_pages(migrate_pfn_to_pfn(src[h])))
            dst[h] = migrate_pfn(got) | _MPFN_COMPOUND
            want[np.minimum(h[:, None] + _ARANGE, pfns.size - 1).reshape(-1)] = False
        sel = want.nonzero()[0]
        if sel.size:
            new = phys.alloc(sel.size, None, zero=False)
            taken.append(new)
            phys.pages.flags[new] |= PG_LOCKED
            phys.copy(new, spfn[sel])
            dst[sel] = migrate_pfn(new)
    except BaseException:
        # no memory to move to, or the copy failed: every page stays where it is, unlocked
        # and mapped again, and what was taken for the move goes back
        for t in taken:
            phys.unlock(t)
            phys.put(t, unique=True)
        dst[:] = 0
        migrate_device_pages(system, src, dst, pfns.size)
        migrate_device_finalize(system, src, dst, pfns.size)
        raise
    migrate_device_pages(system, src, dst, pfns.size)
    _, moved = _expand(src, pfns.size)
    migrate_device_finalize(system, src, dst, pfns.size)
    return moved
