"""make_device_exclusive(): give a device atomic access to pages (mm/rmap.c).

Some buses cannot carry a device's atomic operations to system memory, so the
device needs the page to itself for a while.  The driver asks for it: the pages
are faulted in for writing (like GUP with FOLL_WRITE), an MMU_NOTIFY_EXCLUSIVE
invalidation carrying ``owner`` runs (the driver may skip its own), and each
present PTE becomes a device-exclusive entry that keeps the page's reference
and mapcount.  The first CPU access restores the PTE (after an
MMU_NOTIFY_EXCLUSIVE invalidation with no owner, which revokes the device's
access): mm.py's fault path does that, and fork restores them before copying.

Each returned page is locked and holds a reference for the caller, who maps it
in the device and then unlocks and puts it, as lib/test_hmm.c does.  A PMD
mapping in the range is split first (get_user_pages with FOLL_SPLIT_PMD); a
hugetlb mapping cannot be made exclusive (-EOPNOTSUPP).
"""
import errno

import numpy as np

from ..constants import PAGE_SHIFT, PAGE_SIZE
from ..errors import oserror
from ..mm import pgtable as pt
from ..mm.huge_memory import split_huge_pmd
from ..mm.mm import MM
from ..mm.notifier import MMU_NOTIFY_EXCLUSIVE, invalidation
from ..mm.physmem import PG_ANON, PG_DIRTY, add_at
from ..mm.validate import ulong
from ..mm.vma import VM_HUGETLB, VM_IO, VM_PFNMAP, VM_WRITE


def make_device_exclusive_range(mm, start, end, owner=None):
    """Exclusive access to [start, end): a pfn per page (int64 array, -1 where it failed),
    or a negative errno when the range cannot be faulted in for writing (-EFAULT)."""
    try:
        if not isinstance(mm, MM):
            raise oserror(errno.EINVAL, "make_device_exclusive needs an address space")
        start = ulong(start, "start")
        end = ulong(end, "end", start)
    except OSError as ex:
        return -ex.errno
    if start & (PAGE_SIZE - 1) or end & (PAGE_SIZE - 1) or end <= start:
        return -errno.EINVAL
    phys = mm.system.phys
    pg = phys.pages
    cur = start
    pieces = []
    for v in mm.vmas_in(start, end):
        if v.start > cur:
            return -errno.EFAULT
        if not v.vm_flags & VM_WRITE or v.vm_flags & (VM_IO | VM_PFNMAP):
            return -errno.EFAULT
        if v.vm_flags & VM_HUGETLB:
            return -errno.EOPNOTSUPP
        s, e = cur, min(v.end, end)
        pieces.append((v, s, e))
        cur = e
        if cur >= end:
            break
    if cur < end:
        return -errno.EFAULT
    # the range is mapped: the output is no larger than the page tables that exist
    out = np.full((end - start) >> PAGE_SHIFT, -1, dtype=np.int64)
    for v, s, e in pieces:
        try:
            mm.handle_mm_fault(v, s, e, True)          # get_user_pages(FOLL_WRITE | FOLL_SPLIT_PMD)
        except OSError:
            return -errno.EFAULT
        i0, i1 = v.idx(s), v.idx(e - 1) + 1
        split_huge_pmd(mm, v, i0, i1)
        with phys.lock:
            pte = v.pte[i0:i1].copy()
            ok = pt.pte_present(pte) & ((pte & pt.PTE_SPECIAL) == 0) & (pt.pte_pfn(pte) != phys.zero_pfn)
            idx = np.nonzero(ok)[0]
            p = pt.pte_pfn(pte[idx])
            add_at(pg.refcount, p, 1)
            got = phys.trylock(p)
            if (~got).any():
                phys.put(p[~got])
            idx, p = idx[got], p[got]
        if idx.size == 0:
            continue
        with invalidation(mm, s, e, MMU_NOTIFY_EXCLUSIVE, owner=owner):
            with phys.lock:
                cur_pte = v.pte[i0 + idx]
                same = cur_pte == pte[idx]
                if (~same).any():
                    phys.unlock(p[~same])
                    phys.put(p[~same])
                idx, p, cur_pte = idx[same], p[same], cur_pte[same]
                write = (cur_pte & pt.PTE_WRITE) != 0
                dirty = (cur_pte & pt.PTE_DIRTY) != 0
                d = p[dirty]
                pg.flags[d[(pg.flags[d] & PG_ANON) == 0]] |= PG_DIRTY
                v.pte[i0 + idx] = pt.mk_swp(p, np.where(write, pt.SWP_DEVICE_EXCLUSIVE_WRITE,
                                                        pt.SWP_DEVICE_EXCLUSIVE_READ))
        out[((s - start) >> PAGE_SHIFT) + idx] = p
    return out


def make_device_exclusive(mm, addr, owner=None):
    """make_device_exclusive() for one page: its pfn (locked, referenced) or a negative errno."""
    try:
        addr = ulong(addr, "address")
    except OSError as ex:
        return -ex.errno
    r = make_device_exclusive_range(mm, addr, addr + PAGE_SIZE, owner)
    if isinstance(r, int):
        return r
    return int(r[0]) if r[0] >= 0 else -errno.EBUSY
