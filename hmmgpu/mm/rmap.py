"""The reverse map for migration: try_to_migrate() and remove_migration_ptes() of mm/rmap.c
and mm/migrate.c.

Linux finds every mapping of a page through its anon_vma (anonymous pages) or
its address_space (file pages).  Here the same question is answered per VMA:
the anonymous pages of a VMA can only be mapped by VMAs of the same fork family
(``vma.anon_id``, shared by parent and children), and a page-cache page only by
VMAs of that file (``vma.file.id == page.mapping``).  ``rmap_vmas`` yields those
candidate VMAs; each is then searched with one vectorised ``np.isin`` over its
PTE array, never a loop over pages.

Reference rule (see mm.py's ``_zap``): present, device-private and
device-exclusive entries hold a reference and a mapcount; migration entries hold
neither.  try_to_migrate turns mappings into migration entries and drops both;
remove_migration_ptes installs the new page (or the old one, when a migration
is abandoned) and takes them again.  PTE_HUGE goes through both: a PMD mapping
becomes a PMD migration entry (set_pmd_migration_entry) and maps the new folio
by a PMD again (remove_migration_pmd); a migration that split the folio has
cleared the bit on its migration entries first.
"""
import functools

import numpy as np

from ..constants import PAGE_SHIFT
from . import pgtable as pt
from .notifier import MMU_NOTIFY_CLEAR, invalidation
from .physmem import MEMORY_DEVICE_PRIVATE, PG_ANON, PG_DIRTY

_U = np.uint64
_PFN = _U(pt.PFN_SHIFT)
_MIG_KIND = pt.PTE_PRESENT | pt.SWP_MASK
_MIG_READ = _U(pt.SWP_MIGRATION_READ << pt.SWP_SHIFT)
_MIG_WRITE = _U(pt.SWP_MIGRATION_WRITE << pt.SWP_SHIFT)
_SWP = _U(pt.SWP_SHIFT)
_DEVP_READ = _U(pt.SWP_DEVICE_PRIVATE_READ)
_PRESENT_YOUNG = pt.PTE_PRESENT | pt.PTE_YOUNG
_WRITE_DIRTY = pt.PTE_WRITE | pt.PTE_DIRTY
_HUGE = pt.PTE_HUGE


def _mapped_entries(system, new, writable, huge):
    """The entries that map ``new`` where migration entries were: a device-private page
    becomes a device-private entry, anything else a present, young PTE (dirty too when
    writable); writability and PTE_HUGE (``huge``, the bit itself) come from the migration
    entry."""
    w = writable.astype(_U)
    devp = system.phys.zone_device_type(new) == MEMORY_DEVICE_PRIVATE
    ndev = np.count_nonzero(devp)
    if ndev == devp.size:                       # every page went to device-private memory
        return (new.astype(_U) << _PFN) | ((_DEVP_READ + w) << _SWP) | huge
    out = (new.astype(_U) << _PFN) | _PRESENT_YOUNG | (w * _WRITE_DIRTY) | huge
    if ndev:
        out[devp] = pt.mk_swp(new[devp], pt.SWP_DEVICE_PRIVATE_READ + w[devp]) | huge[devp]
    return out


def rmap_locked(fn):
    """Run ``fn(system, ...)`` holding the rmap lock (physmem's ``rmap_lock``): no VMA is
    split, merged, moved, added or removed while the walk lists and updates mappings."""
    @functools.wraps(fn)
    def call(system, *args, **kwargs):
        with system.phys.rmap_lock:
            return fn(system, *args, **kwargs)
    return call


def rmap_vmas(system, anon_ids=None, mappings=None, everything=False):
    """Candidate VMAs that may map pages of the given fork families / page caches."""
    anon_ids = set() if anon_ids is None else set(int(a) for a in anon_ids)
    mappings = set() if mappings is None else set(int(m) for m in mappings)
    out = []
    for proc in list(system.processes):
        mm = proc.mm
        if getattr(mm, "dead", False):
            continue
        for v in list(mm.vmas):
            if everything or v.anon_id in anon_ids or (v.file is not None and v.file.id in mappings):
                out.append(v)
    return out


def vmas_for_pages(system, pfns, family=None):
    """rmap_walk() candidates for ``pfns``: the fork family given, plus the files they cache.

    Without a family (pages found by pfn, like migrate_device_range), every VMA
    of every process is a candidate.
    """
    pfns = np.asarray(pfns, dtype=np.int64)
    maps = np.unique(system.phys.pages.mapping[pfns]) if pfns.size else np.zeros(0, np.int64)
    maps = maps[maps >= 0]
    if family is None:
        return rmap_vmas(system, everything=True)
    return rmap_vmas(system, anon_ids=[family], mappings=maps.tolist())


def _maps_one_of(pte, pfns):
    """Entries that map one of ``pfns`` (sorted): present, device-private or device-exclusive."""
    t = pt.swp_type(pte)
    mappable = pt.pte_present(pte) | ((t >= pt.SWP_DEVICE_PRIVATE_READ) & (t <= pt.SWP_DEVICE_EXCLUSIVE_WRITE))
    return (pte != 0) & mappable & np.isin(pt.pte_pfn(pte), pfns, assume_unique=False)


@rmap_locked
def try_to_migrate(system, pfns, vmas, skip=None):
    """try_to_migrate(): replace every other mapping of ``pfns`` by a migration entry.

    ``pfns`` are locked by the caller, who also holds a reference on each, so
    dropping the mappings' references never frees them.  Returns how many
    mappings were replaced.
    """
    pfns = np.unique(np.asarray(pfns, dtype=np.int64))
    if pfns.size == 0:
        return 0
    phys = system.phys
    pg = phys.pages
    done = 0
    for v in vmas:
        idx = np.nonzero(_maps_one_of(v.pte, pfns))[0]
        if skip is not None and skip[0] is v:
            idx = idx[(idx < skip[1]) | (idx >= skip[2])]
        if idx.size == 0:
            continue
        lo = v.start + (int(idx[0]) << PAGE_SHIFT)
        hi = v.start + ((int(idx[-1]) + 1) << PAGE_SHIFT)
        with invalidation(v.mm, lo, hi, MMU_NOTIFY_CLEAR):
            with phys.lock:
                # The entries were found without the page-table lock: convert only those that
                # still map one of the pages.  Another thread may have zapped some meanwhile (a
                # child's exit, MADV_DONTNEED): an empty entry read as pfn 0 would put the zero page.
                cur = v.pte[idx]
                still = _maps_one_of(cur, pfns)
                idx, cur = idx[still], cur[still]
                cp = pt.pte_pfn(cur)
                ct = pt.swp_type(cur)
                present = pt.pte_present(cur)
                write = (present & ((cur & pt.PTE_WRITE) != 0)) | (ct == pt.SWP_DEVICE_PRIVATE_WRITE) | (
                    ct == pt.SWP_DEVICE_EXCLUSIVE_WRITE)
                dirty = present & ((cur & pt.PTE_DIRTY) != 0)
                d = cp[dirty]
                pg.flags[d[(pg.flags[d] & PG_ANON) == 0]] |= PG_DIRTY
                v.pte[idx] = pt.mk_swp(cp, np.where(write, pt.SWP_MIGRATION_WRITE,
                                                    pt.SWP_MIGRATION_READ)) | (cur & _HUGE)
                pg.mapcount[cp] -= 1          # a page appears once per VMA
                phys.put(cp, unique=True)
                done += int(idx.size)
    return done


@rmap_locked
def remove_migration_ptes(system, src, dst, vmas, region=None, positions=None):
    """remove_migration_ptes(): every migration entry for src[i] now maps dst[i].

    ``dst[i] == src[i]`` restores the original page (an abandoned migration).
    A device-private destination becomes a device-private entry; anything else a
    present PTE.  Writability comes from the migration entry.  ``region`` =
    (vma, i0, i1) limits the search to one slice when the caller knows no other
    mapping exists (nothing went through try_to_migrate); ``positions`` (indices
    into that slice, one per src) says exactly where each src's entry is, so no
    search is needed at all.
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    if src.size == 0:
        return 0
    phys = system.phys
    pg = phys.pages
    if region is not None and positions is not None:
        v, i0, i1 = region
        idx = i0 + np.asarray(positions, dtype=np.int64)
        with phys.lock:
            pte = v.pte[idx]
            kind = pte & _MIG_KIND
            writable = kind == _MIG_WRITE
            hit = (writable | (kind == _MIG_READ)) & ((pte >> _PFN) == src.astype(_U))
            new = dst
            if np.count_nonzero(hit) < hit.size:
                idx, writable, new, pte = idx[hit], writable[hit], dst[hit], pte[hit]
            v.pte[idx] = _mapped_entries(system, new, writable, pte & _HUGE)
            pg.refcount[new] += 1
            pg.mapcount[new] += 1
        return int(idx.size)
    order = np.argsort(src, kind="stable")
    ssrc, sdst = src[order], dst[order]
    done = 0
    targets = [region] if region is not None else [(v, 0, v.npages) for v in vmas]
    with phys.lock:
        for v, i0, i1 in targets:
            pte = v.pte[i0:i1]
            mig = pt.is_migration(pte)
            if not np.count_nonzero(mig):
                continue
            p = pt.pte_pfn(pte)
            pos = np.searchsorted(ssrc, p)
            pos = np.minimum(pos, ssrc.size - 1)
            hit = mig & (ssrc[pos] == p)
            idx = np.nonzero(hit)[0]
            if idx.size == 0:
                continue
            new = sdst[pos[idx]]
            writable = pt.swp_type(pte[idx]) == pt.SWP_MIGRATION_WRITE
            v.pte[i0 + idx] = _mapped_entries(system, new, writable, pte[idx] & _HUGE)
            pg.refcount[new] += 1             # once per VMA
            pg.mapcount[new] += 1
            done += int(idx.size)
    return done
