"""struct mm_struct: an address space, its faults and its system calls.

Stands for mm/mmap.c, mm/memory.c (faults, zap, copy_page_range), mm/mprotect.c,
mm/mremap.c, mm/madvise.c, mm/msync.c and mm/gup.c.  Every range operation is one
vectorised pass over a VMA's PTE slice; the loops here are over VMAs, never
over pages.

Locking: the system calls that change the VMA tree take ``mmap_lock`` for
writing; faults, GUP and HMM take it for reading.  A PTE changes state under
``phys.lock`` (the page-table lock), and a fault allocates before it takes that
lock and re-checks that the entries did not move meanwhile (``pte_same``).
"""
import contextlib
import errno
import functools

import numpy as np

from ..constants import (HPAGE_PMD_NR, MADV_COLLAPSE, MADV_DONTNEED, MADV_FREE, MADV_HUGEPAGE, MADV_NOHUGEPAGE,
                         MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MAP_ANONYMOUS,
                         MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_HUGETLB, MAP_POPULATE,
                         MAP_PRIVATE, MAP_SHARED, MMAP_BASE, MMAP_MIN_ADDR, MREMAP_DONTUNMAP,
                         MREMAP_FIXED, MREMAP_MAYMOVE, MS_ASYNC, MS_INVALIDATE, MS_SYNC, PAGE_MASK,
                         PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE, TASK_SIZE)
from ..errors import BusError, ProcessKilled, SegmentationFault, oserror
from . import huge_memory, hugetlb
from . import pgtable as pt
from .filemap import PageCache, open_file_cache
from .locks import RWLock
from .notifier import (MMU_NOTIFY_CLEAR, MMU_NOTIFY_EXCLUSIVE, MMU_NOTIFY_PROTECTION_PAGE,
                       MMU_NOTIFY_PROTECTION_VMA, MMU_NOTIFY_UNMAP, NotifierSubscriptions,
                       invalidation)
from .physmem import (PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_HUGETLB, PG_LOCKED, PG_SWAPBACKED,
                      PG_ZONE_DEVICE, add_at)
from .rmap import vmas_for_pages
from .validate import (check_aligned, check_buffer, check_flags, check_map_budget,
                       check_no_wrap, check_user_range, ulong)
from .vma import (VM_ACCESS, VM_DONTEXPAND, VM_PFNMAP, VM_MAYEXEC, VM_MAYREAD, VM_MAYSHARE, VM_MAYWRITE, VM_MIXEDMAP, VM_READ,
                  VM_HUGEPAGE, VM_HUGETLB, VM_NOHUGEPAGE, VM_SHARED, VM_WRITE, VMA, prot_to_vm,
                  ptes_compact, ptes_join, vma_is_anonymous)
from .vmatree import VmaTree

FAULT_FLAG_WRITE = 0x1
VM_FAULT_OOM = 0x1
VM_FAULT_SIGBUS = 0x2
VM_FAULT_SIGSEGV = 0x40

_RSS_KINDS = ("anon", "file", "shmem")
_RSS_FLAGS = PG_ANON | PG_SWAPBACKED | PG_HUGETLB
_PFN_SHIFT = np.uint64(pt.PFN_SHIFT)
_SWP_PRESENT = pt.SWP_MASK | pt.PTE_PRESENT
_MIG_READ = np.uint64(pt.SWP_MIGRATION_READ << pt.SWP_SHIFT)
_MIG_WRITE = np.uint64(pt.SWP_MIGRATION_WRITE << pt.SWP_SHIFT)
_PRESENT_DIRTY = pt.PTE_PRESENT | pt.PTE_DIRTY
_EXCL_READ = np.uint64(pt.SWP_DEVICE_EXCLUSIVE_READ << pt.SWP_SHIFT)
_EXCL_WRITE = np.uint64(pt.SWP_DEVICE_EXCLUSIVE_WRITE << pt.SWP_SHIFT)
_EMPTY = np.zeros(0, np.int64)
_MAX_FAULT_ROUNDS = 64


def _zero(phys, pfns):
    """phys.zero_mask() inline while there is no huge zero folio: the fault path's hot sites."""
    return pfns == phys.zero_pfn if phys.huge_zero_pfn < 0 else phys.zero_mask(pfns)


def page_align(n):
    return (int(n) + PAGE_SIZE - 1) & PAGE_MASK


_PROT_BITS = PROT_READ | PROT_WRITE | PROT_EXEC


def _vma_change(method):
    """Run an MM method that changes VMA bounds, PTE arrays or the VMA set under the rmap lock
    (physmem's ``rmap_lock``), so that a reverse-map walk of another process never sees a VMA
    half split.  Taken before the page-table lock: methods that hold both start here."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self.phys.rmap_lock:
            return method(self, *args, **kwargs)
    return call


class VmFault:
    """struct vm_fault for a device-private fault, batched.

    ``address``/``page`` are the first faulting page as in Linux; ``addresses``
    and ``pages`` (NumPy arrays) are every faulting page of the same pgmap in the
    range, so a driver may bring them all back in one migration.
    """

    def __init__(self, mm, vma, addresses, pages, flags):
        self.mm, self.vma, self.flags = mm, vma, flags
        self.addresses = addresses
        self.pages = pages
        self.address = int(addresses[0])
        self.page = int(pages[0])
        self.pgmap = None


class MM:
    """One process's address space."""

    def __init__(self, system, owner=None):
        self.system = system
        self.phys = system.phys
        self.owner = owner
        self.vmas = VmaTree()
        self.mmap_lock = RWLock(on_idle=self._reap_if_oom_victim)
        self.notifiers = NotifierSubscriptions()
        self.rss = {k: 0 for k in _RSS_KINDS}
        self.memcg = None
        self.dead = False
        self.oom_victim = False
        # Some entry may be a PMD mapping (huge_memory.py): until one is made, nothing looks.
        self.maybe_huge = False

    def __repr__(self):
        return f"MM(pid={getattr(self.owner, 'pid', '?')}, {len(self.vmas)} vmas)"

    def _reap_if_oom_victim(self):
        """The OOM killer chose this process while one of its own threads held mmap_lock: it
        is torn down as soon as nobody holds the lock, whichever call it was in (a system
        call, a device fault serviced for a driver), so its memory really comes back."""
        owner = self.owner
        if self.oom_victim and owner is not None and owner.alive:
            self.system._reap(owner, owner.killed_reason or "killed by the OOM killer")

    # -- the VMA tree ---------------------------------------------------------------
    @_vma_change
    def _insert(self, vma):
        self.vmas.insert(vma)

    @_vma_change
    def _remove(self, vma):
        self.vmas.remove(vma)

    def find_vma(self, addr):
        """The VMA containing ``addr``, or None."""
        return self.vmas.find(addr)

    def vmas_in(self, start, end):
        """VMAs overlapping [start, end), in address order."""
        return self.vmas.overlapping(start, end)

    @_vma_change
    def _split_at(self, addr):
        """Make ``addr`` a VMA boundary if it falls inside one (splitting a PMD mapping that
        straddles it first, as vma_adjust_trans_huge() does)."""
        v = self.find_vma(addr)
        if v is not None and v.start < addr:
            huge_memory.split_huge_pmd_edges(self, v, v.idx(addr), v.idx(addr))
            right = v.split(addr)
            self.vmas.update(v)
            self._insert(right)

    @_vma_change
    def _try_merge(self, addr):
        """vma_merge(): join the VMAs meeting at ``addr`` when nothing tells them apart."""
        nxt = self.find_vma(addr)
        prev = self.find_vma(addr - 1) if addr else None
        if prev is None or nxt is None or prev is nxt or prev.end != nxt.start:
            return
        if (prev.vm_flags != nxt.vm_flags or prev.file is not nxt.file or prev.driver is not None
                or nxt.driver is not None or prev.anon_id != nxt.anon_id or prev.vm_flags & VM_HUGETLB):
            return
        if prev.file is not None and prev.pgoff + prev.npages != nxt.pgoff:
            return
        prev.pte = ptes_join(prev.pte, nxt.pte)
        prev.end = nxt.end
        self._remove(nxt)
        self.vmas.update(prev)
        if prev.file is not None:
            prev.file.nr_mappings -= 1

    # -- rss -------------------------------------------------------------------------
    def _rss_counts(self, pfns):
        """(anon, file, shmem) page counts of ``pfns``; the zero pages and hugetlb pages
        (HugetlbPages, not rss) count nowhere."""
        kind = self.phys.pages.flags[pfns] & _RSS_FLAGS
        anon = np.count_nonzero(kind & PG_ANON)
        shmem = np.count_nonzero(kind == PG_SWAPBACKED)
        zero = np.count_nonzero(_zero(self.phys, pfns))          # their flags say neither
        if self.maybe_huge:
            tlb = (kind & PG_HUGETLB) != 0
            tlb_anon = np.count_nonzero(tlb & ((kind & PG_ANON) != 0))     # private hugetlb
            tlb_shared = np.count_nonzero(tlb) - tlb_anon
            return anon - tlb_anon, pfns.size - anon - shmem - zero - tlb_shared, shmem
        return anon, pfns.size - anon - shmem - zero, shmem

    def _account(self, pfns, sign):
        anon, file, shmem = self._rss_counts(np.asarray(pfns, dtype=np.int64))
        rss = self.rss              # Python ints, as proc.rss hands them out (JSON, repr)
        rss["anon"] += sign * int(anon)
        rss["file"] += sign * int(file)
        rss["shmem"] += sign * int(shmem)

    def add_rss(self, kind, n):
        self.rss[kind] += int(n)

    # -- mapping and unmapping pages (the rmap side) --------------------------------
    def _map(self, vma, idx, pfns, flags, take_ref=True):
        """Install present PTEs for counted pages (refcount/mapcount/rss)."""
        pg = self.phys.pages
        counted = pfns[~_zero(self.phys, pfns)]
        # one VMA maps a page at most once, except a driver's mixed map (vm_insert_page)
        unique = vma.driver is None
        if take_ref:
            add_at(pg.refcount, counted, 1, unique)
        add_at(pg.mapcount, counted, 1, unique)
        self._account(pfns, +1)
        vma.pte[idx] = pt.mk_pte(pfns, flags)

    def _zap(self, vma, i0, i1):
        """zap_pte_range(): clear PTEs [i0, i1) of ``vma`` and drop what they held.

        Present, device-private and device-exclusive entries hold a reference and
        a mapcount; migration entries hold neither (try_to_migrate dropped them)
        but are still counted in rss.
        """
        with self.phys.lock:
            ptes = vma.pte[i0:i1]
            live = (ptes != 0).nonzero()[0]
            if live.size == 0:
                return
            if live.size < ptes.size:
                ptes = ptes[live]
            pfns = (ptes >> _PFN_SHIFT).astype(np.int64)
            pg = self.phys.pages
            self._account(pfns, -1)
            # what the entries held: not migration entries (try_to_migrate dropped those), not
            # the zero page
            kind = ptes & _SWP_PRESENT
            held = (kind != _MIG_READ) & (kind != _MIG_WRITE) & ~_zero(self.phys, pfns)
            dirty = (ptes & _PRESENT_DIRTY) == _PRESENT_DIRTY
            if np.count_nonzero(dirty):
                d = pfns[dirty]
                pg.flags[d[(pg.flags[d] & PG_ANON) == 0]] |= PG_DIRTY
            counted = pfns if np.count_nonzero(held) == held.size else pfns[held]
            unique = vma.driver is None          # see _map
            add_at(pg.mapcount, counted, -1, unique)
            vma.pte[i0:i1] = 0
            self.phys.put(counted, unique=unique)

    def _zap_entries(self, vma, idx):
        """_zap() of the entries at ``idx`` of an anonymous VMA (present or none); phys.lock held."""
        ptes = vma.pte[idx]
        live = ptes != 0
        pfns = (ptes[live] >> _PFN_SHIFT).astype(np.int64)
        self._account(pfns, -1)
        counted = pfns[~self.phys.zero_mask(pfns)]
        add_at(self.phys.pages.mapcount, counted, -1, True)
        vma.pte[idx] = 0
        self.phys.put(counted, unique=True)

    def vm_insert_pages(self, vma, addrs, pfns):
        """vm_insert_page() for many pages: a driver fills its mixed mapping."""
        addrs = np.asarray(addrs, dtype=np.int64)
        pfns = np.asarray(pfns, dtype=np.int64)
        if ((addrs < vma.start) | (addrs >= vma.end)).any():
            raise oserror(errno.EFAULT, "address outside the VMA", vma.start, vma.end)
        idx = (addrs - vma.start) >> PAGE_SHIFT
        if (vma.pte[idx] != 0).any():
            raise oserror(errno.EBUSY, "vm_insert_page over a populated PTE", vma.start, vma.end)
        flags = pt.PTE_YOUNG | (pt.PTE_WRITE if (vma.vm_flags & (VM_WRITE | VM_SHARED)) == (VM_WRITE | VM_SHARED) else 0)
        with self.phys.lock:
            self._map(vma, idx, pfns, flags)

    # -- faults ----------------------------------------------------------------------
    def handle_mm_fault(self, vma, start, end, write, unshare=False):
        """Fault in every page of [start, end) in ``vma`` for a read or a write.

        The caller holds mmap_lock and has checked that the VMA allows the access.
        Raises BusError for pages past the end of a file or a driver mapping
        with no page.
        """
        i0, i1 = vma.idx(start), vma.idx(end - 1) + 1
        # Linux takes a fault per page and retries a fault until it succeeds.  Rounds that
        # leave fewer entries to fault in (a driver bringing back one page per migrate_to_ram)
        # are progress; only rounds that make none count towards the bound, a livelock guard.
        best, stalled = None, 0
        while True:
            left = self._fault_round(vma, i0, i1, write, unshare)
            if not left:
                return
            if best is None or left < best:
                best, stalled = left, 0
            else:
                stalled += 1
                if stalled >= _MAX_FAULT_ROUNDS:
                    raise oserror(errno.EAGAIN, f"fault made no progress in {_MAX_FAULT_ROUNDS} rounds",
                                  start, end)

    def _fault_round(self, vma, i0, i1, write, unshare=False):
        """One pass; returns how many entries needed work when it started (0: every entry is
        present, and writable for a write).

        ``unshare`` (FOLL_PIN for reading, Linux 5.19+ gup_must_unshare): an anonymous
        page that another process may still share is copied first, so that the pin
        and this process's mapping stay the same page.
        """
        phys = self.phys
        if vma.vm_flags & VM_HUGETLB:
            if hugetlb.hugetlb_fault(self, vma, i0, i1, write, unshare):
                return 0
            # another round: what is still to fault in, the measure of its progress
            with phys.lock:
                ptes = vma.pte[i0:i1]
                return max(1, int(np.count_nonzero(~(pt.pte_write(ptes) if write else pt.pte_present(ptes)))))
        thp = self.system.thp
        if self.maybe_huge or thp == "always" or (thp == "madvise" and vma.vm_flags & VM_HUGEPAGE):
            huge_memory.huge_pmd_fault(self, vma, i0, i1, write, unshare)
        with phys.lock:
            snap = vma.pte[i0:i1].copy()
        swp = pt.is_swap(snap)
        if swp.any():
            self._fault_nonpresent(vma, i0, snap, swp, write)
            return int(swp.sum())
        present = pt.pte_present(snap)
        pfns = pt.pte_pfn(snap)
        pg = phys.pages
        need_new = ~present
        if write:
            need_new |= present & ~pt.pte_write(snap)
        elif unshare and vma.cow:
            fl = pg.flags[pfns]
            shared = (present & ~phys.zero_mask(pfns) & ((fl & PG_ANON) != 0)
                      & ((fl & PG_ANON_EXCLUSIVE) == 0))
            solo = shared & (pg.refcount[pfns] == 1)
            if solo.any():
                # wp_can_reuse_anon_folio(): we are its only user again; claim it, no copy
                with phys.lock:
                    p = pfns[solo]
                    p = p[pg.refcount[p] == 1]
                    pg.flags[p] |= PG_ANON_EXCLUSIVE
            need_new |= shared & ~solo
        pending = int(need_new.sum())
        if not pending:
            if write:
                self._mark_dirty(vma, i0, i1)
            return 0
        # Decide, per entry, what the fault does (pages are allocated before the
        # page-table lock is taken; the entries are re-checked afterwards).
        none = snap == 0
        rel = np.nonzero(need_new)[0]
        is_none = none[rel]
        if vma.driver is not None and is_none.any():
            a = vma.start + ((i0 + int(rel[is_none][0])) << PAGE_SHIFT)
            raise BusError(a, "driver mapping has no page here", "write" if write else "read")
        file_idx = None
        if vma.file is not None and is_none.any():
            file_idx = vma.pgoff + i0 + rel[is_none]
            limit = vma.file.file_pages()
            beyond = file_idx >= limit
            if beyond.any():
                a = vma.start + ((i0 + int(rel[is_none][beyond][0])) << PAGE_SHIFT)
                raise BusError(a, f"page {int(file_idx[beyond][0])} is past the end of {vma.file.name}",
                               "write" if write else "read")
        cache_pfns = np.full(rel.size, -1, np.int64)
        if file_idx is not None:
            cache_pfns[is_none] = vma.file.find_get(file_idx, self.memcg)
        old = np.where(is_none, cache_pfns, pfns[rel])
        oldc = np.maximum(old, 0)
        if write and not vma.shared:
            # private write: reuse an anonymous page this process owns, copy anything else
            fl = pg.flags[oldc]
            reuse = (~is_none & ~_zero(phys, old) & ((fl & PG_ANON) != 0)
                     & (((fl & PG_ANON_EXCLUSIVE) != 0) | (pg.refcount[oldc] == 1)))
            copy_new = ~reuse
        elif write:
            reuse = np.ones(rel.size, bool)          # shared mapping: the page itself
            copy_new = ~reuse
        else:
            reuse = np.zeros(rel.size, bool)
            copy_new = ~is_none                      # only unshare copies on a read
        n_new = int(copy_new.sum())
        new = phys.alloc(n_new, self.memcg, zero=False) if n_new else np.zeros(0, np.int64)
        if n_new:
            srcs = old[copy_new]
            from_zero = _zero(phys, srcs) | (srcs < 0)
            if from_zero.any():
                phys.fill(new[from_zero], 0)
            if (~from_zero).any():
                phys.copy(new[~from_zero], srcs[~from_zero])
        replaced = copy_new & ~is_none
        if replaced.any():
            # wp_page_copy(): the PTE is about to point at another page; mirrors must drop it
            r = i0 + rel[replaced]
            guard = invalidation(self, vma.start + (int(r[0]) << PAGE_SHIFT),
                                 vma.start + ((int(r[-1]) + 1) << PAGE_SHIFT), MMU_NOTIFY_CLEAR)
        else:
            guard = contextlib.nullcontext()
        with guard, phys.lock:
            if not np.array_equal(vma.pte[i0:i1], snap):
                phys.put(new)              # raced with another fault or a migration: retry
                return pending
            idx = i0 + rel
            young = pt.PTE_YOUNG
            wflags = pt.PTE_WRITE | pt.PTE_DIRTY | young
            # 1. entries upgraded in place (shared write, reuse of our own anon page)
            up = reuse & ~is_none
            if up.any():
                vma.pte[idx[up]] |= wflags
                d = old[up]
                pg.flags[d[(pg.flags[d] & PG_ANON) == 0]] |= PG_DIRTY
                pg.flags[d[(pg.flags[d] & PG_ANON) != 0]] |= PG_ANON_EXCLUSIVE
            # 2. pte_none getting an existing page: zero page or page-cache page
            fill = is_none & ~copy_new
            if fill.any():
                p = old[fill]
                if not write and vma_is_anonymous(vma):
                    p = np.full(int(fill.sum()), phys.zero_pfn, np.int64)
                self._map(vma, idx[fill], p, young | (wflags if write else 0))
                if write:
                    pg.flags[p] |= PG_DIRTY
            # 3. new anonymous pages: demand zero on a write, COW and unshare copies
            if n_new:
                gone = old[replaced]
                if gone.size:
                    counted = gone[~phys.zero_mask(gone)]
                    self._account(gone, -1)
                    add_at(pg.mapcount, counted, -1)
                    vma.pte[idx[replaced]] = 0
                    phys.put(counted)
                pg.flags[new] |= PG_ANON | PG_ANON_EXCLUSIVE
                self._map(vma, idx[copy_new], new, wflags if write else young | pt.PTE_DIRTY,
                          take_ref=False)
        return pending

    def _mark_dirty(self, vma, i0, i1):
        with self.phys.lock:
            # Only entries still present: a zap (MADV_DONTNEED holds mmap_lock for reading
            # too) may have cleared some since the fault looked, and a bit OR-ed into an empty
            # entry would make a non-present entry of no known type.  The caller re-checks
            # under this lock and faults again.
            ptes = vma.pte[i0:i1]
            present = pt.pte_present(ptes)
            vma.pte[i0:i1] = np.where(present, ptes | (pt.PTE_DIRTY | pt.PTE_YOUNG), ptes)
            if vma.file is not None or vma.driver is not None:
                p = pt.pte_pfn(ptes[present])
                p = p[(self.phys.pages.flags[p] & PG_ANON) == 0]
                self.phys.pages.flags[p] |= PG_DIRTY

    def _fault_nonpresent(self, vma, i0, snap, swp, write):
        """do_swap_page() for HMM's special entries."""
        types = pt.swp_type(snap)
        pfns = pt.pte_pfn(snap)
        rel = np.nonzero(swp)[0]
        addrs = vma.start + ((i0 + rel) << PAGE_SHIFT)
        t = types[rel]
        p = pfns[rel]
        mig = (t == pt.SWP_MIGRATION_READ) | (t == pt.SWP_MIGRATION_WRITE)
        if mig.any():
            self.phys.wait_unlocked(int(p[mig][0]))
            return
        excl = (t == pt.SWP_DEVICE_EXCLUSIVE_READ) | (t == pt.SWP_DEVICE_EXCLUSIVE_WRITE)
        if excl.any():
            # remove_device_exclusive_entry(): folio_lock_or_retry first -- a driver holds the
            # page locked from make_device_exclusive until its device maps it
            locked = p[excl][(self.phys.pages.flags[p[excl]] & PG_LOCKED) != 0]
            if locked.size:
                self.phys.wait_unlocked(int(locked[0]))
                return
            self.remove_device_exclusive_entries(vma, addrs[excl])
            return
        owners = self.phys.pages.pgmap[p]
        own = owners == owners[0]
        pgmap = self.phys.pgmaps[int(owners[0])]
        vmf = VmFault(self, vma, addrs[own], p[own], FAULT_FLAG_WRITE if write else 0)
        vmf.pgmap = pgmap
        ret = pgmap.ops.migrate_to_ram(vmf)
        if ret and ret & (VM_FAULT_SIGBUS | VM_FAULT_OOM | VM_FAULT_SIGSEGV):
            raise BusError(vmf.address, f"migrate_to_ram of the device page failed (vm_fault 0x{ret:x})",
                           "write" if write else "read")

    def remove_device_exclusive_entries(self, vma, addrs):
        """remove_device_exclusive_entry(): the CPU touched pages a device holds for atomics."""
        addrs = np.asarray(addrs, dtype=np.int64)
        with invalidation(self, int(addrs.min()), int(addrs.max()) + PAGE_SIZE, MMU_NOTIFY_EXCLUSIVE):
            with self.phys.lock:
                idx = (addrs - vma.start) >> PAGE_SHIFT
                ptes = vma.pte[idx]
                still = pt.is_device_exclusive(ptes)
                idx, ptes = idx[still], ptes[still]
                w = pt.swp_type(ptes) == pt.SWP_DEVICE_EXCLUSIVE_WRITE
                flags = np.where(w, pt.PTE_WRITE | pt.PTE_DIRTY, np.uint64(0)).astype(np.uint64)
                vma.pte[idx] = pt.mk_pte(pt.pte_pfn(ptes), pt.PTE_YOUNG) | flags

    # -- CPU loads and stores -------------------------------------------------------
    def _access_pieces(self, addr, n, write):
        """Check a CPU access of [addr, addr+n): returns [(vma, start, end)] or raises."""
        kind = "write" if write else "read"
        end = addr + n
        if n > TASK_SIZE or addr > TASK_SIZE - n:
            raise SegmentationFault(addr, "address outside the user address space", kind)
        cur = addr & PAGE_MASK
        pieces = []
        for v in self.vmas_in(cur, end):
            if v.start > cur:
                break
            ok = (v.vm_flags & VM_WRITE) if write else (v.vm_flags & VM_ACCESS)  # x86: W and X imply R
            if not ok:
                raise SegmentationFault(max(cur, addr), f"{v!r} does not allow {kind}s", kind)
            s, e = cur, min(v.end, page_align(end))
            pieces.append((v, s, e))
            cur = e
            if cur >= end:
                break
        if cur < end:
            raise SegmentationFault(max(cur, addr), "no mapping here", kind)
        return pieces

    def access(self, addr, n, write, data=None):
        """A CPU load (returns bytes as uint8 array) or store of ``data``."""
        addr = ulong(addr, "address")
        n = ulong(n, "byte count", addr)
        if n == 0:
            return np.zeros(0, np.uint8)
        if data is None:
            check_buffer(n, self.phys, "CPU load", addr)
        with self.mmap_lock.read():
            # Permissions of the whole range are checked first: a store that would SIGSEGV
            # part-way changes nothing.  Then each VMA's piece is faulted and copied in
            # address order, as a CPU's store sequence would: two views of one page (a
            # shared and a private mapping of a file, say) see the earlier bytes.
            pieces = self._access_pieces(addr, n, write)
            out = [] if data is None else None
            for v, s, e in pieces:
                lo, hi = max(s, addr), min(e, addr + n)
                chunk = None if data is None else data[lo - addr:hi - addr]
                got = self._access_piece(v, s, e, lo, hi, write, chunk)
                if out is not None:
                    out.append(got)
            if out is None:
                return None
            return out[0] if len(out) == 1 else np.concatenate(out)

    def _access_piece(self, v, s, e, lo, hi, write, data):
        """Fault [s, e) of ``v`` in and copy the bytes [lo, hi) under the page-table lock."""
        for _ in range(_MAX_FAULT_ROUNDS):
            self.handle_mm_fault(v, s, e, write)
            with self.phys.lock:
                # the entries may have moved (a migration, an invalidation) between the
                # fault and the copy: check under the page-table lock and retry
                ptes = v.pte[v.idx(s):v.idx(e - 1) + 1]
                if (pt.pte_write(ptes) if write else pt.pte_present(ptes)).all():
                    return self._copy_bytes(pt.pte_pfn(ptes), lo - s, hi - lo, data)
        raise oserror(errno.EAGAIN, "CPU access kept racing with page-table changes", lo, hi)

    def _copy_bytes(self, pfns, off, n, data):
        phys = self.phys
        whole = off == 0 and n == pfns.size * PAGE_SIZE
        if data is None:
            pages = phys.read(pfns).reshape(-1)       # a fresh gather: no second copy needed
            return pages if whole else pages[off:off + n].copy()
        if whole:
            phys.write(pfns, data)
            return None
        buf = np.empty(pfns.size * PAGE_SIZE, np.uint8)
        if off:
            buf[:PAGE_SIZE] = phys.read(pfns[:1]).reshape(-1)
        if (off + n) % PAGE_SIZE:
            buf[-PAGE_SIZE:] = phys.read(pfns[-1:]).reshape(-1)
        buf[off:off + n] = data
        phys.write(pfns, buf)
        return None

    # -- mmap / munmap -----------------------------------------------------------------
    def _free_hint(self, hint, length, align):
        """The hint of a mmap without MAP_FIXED, as Linux takes it: rounded down to the page
        (round_hint_to_min), raised to mmap_min_addr, rounded down to ``align`` (a huge page's
        size for hugetlb), and used when [hint, hint + length) is free.  None otherwise."""
        hint &= PAGE_MASK
        if hint and hint < MMAP_MIN_ADDR:
            hint = MMAP_MIN_ADDR
        hint -= hint % align
        if hint and hint + length <= TASK_SIZE and not self.vmas_in(hint, hint + length):
            return hint
        return None

    def get_unmapped_area(self, length, hint=0):
        """Top-down search below MMAP_BASE, honouring a free hint first (see _free_hint)."""
        got = self._free_hint(hint, length, PAGE_SIZE)
        if got is not None:
            return got
        cand = self.vmas.empty_area_rev(length, MMAP_MIN_ADDR, MMAP_BASE)
        if cand is None:
            raise oserror(errno.ENOMEM, f"no free range of {length} bytes in the address space")
        return cand

    def mmap(self, length, prot, flags, fd=None, offset=0, addr=0):
        addr = ulong(addr, "mmap address")
        length = ulong(length, "mmap length", addr)
        prot = ulong(prot, "mmap prot", addr)
        flags = ulong(flags, "mmap flags", addr)
        offset = ulong(offset, "mmap offset", addr)
        if length == 0:
            raise oserror(errno.EINVAL, "mmap length must not be 0", addr)
        check_aligned(offset, "mmap offset")
        mtype = flags & (MAP_SHARED | MAP_PRIVATE)
        if mtype not in (MAP_SHARED, MAP_PRIVATE):
            raise oserror(errno.EINVAL, "mmap flags need exactly one of MAP_SHARED and MAP_PRIVATE", addr)
        check_flags(prot, _PROT_BITS, "prot", addr)
        length = page_align(length)
        if length == 0 or length > TASK_SIZE:
            raise oserror(errno.ENOMEM, "mmap length is larger than the user address space", addr)
        huge = bool(flags & MAP_HUGETLB)
        if huge:
            # ksys_mmap_pgoff(): MAP_HUGETLB is for anonymous memory (hugetlbfs files aside)
            if not flags & MAP_ANONYMOUS:
                raise oserror(errno.EINVAL, "MAP_HUGETLB needs MAP_ANONYMOUS (hugetlbfs files are not "
                              "emulated)", addr, addr + length)
            length = -(-length // PMD_SIZE) * PMD_SIZE
            if length > TASK_SIZE:
                raise oserror(errno.ENOMEM, "mmap length is larger than the user address space", addr)
        fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)
        if fixed:
            check_aligned(addr, "MAP_FIXED address")
            if huge and addr % PMD_SIZE:
                raise oserror(errno.EINVAL, "MAP_HUGETLB | MAP_FIXED address is not 2 MiB aligned",
                              addr, addr + length)
            check_user_range(addr, length, "MAP_FIXED", errno.ENOMEM)
            if addr < MMAP_MIN_ADDR:
                raise oserror(errno.EPERM, f"MAP_FIXED below mmap_min_addr 0x{MMAP_MIN_ADDR:x}",
                              addr, addr + length)
        anonymous = bool(flags & MAP_ANONYMOUS)
        if anonymous:
            offset = 0          # do_mmap(): an anonymous mapping ignores the offset
        driver = None
        cache = None
        vm_flags = prot_to_vm(prot) | VM_MAYREAD | VM_MAYEXEC | VM_MAYWRITE
        if huge:
            vm_flags |= VM_HUGETLB | VM_DONTEXPAND
        if not anonymous:
            if fd is None or (isinstance(fd, int) and fd < 0):
                raise oserror(errno.EBADF, "file mapping without a file descriptor", addr)
            if hasattr(fd, "mmap") and not isinstance(fd, int):
                driver = fd
                vm_flags |= VM_MIXEDMAP
            else:
                cache, vm_flags = self._file_mapping_checks(fd, prot, flags, vm_flags, addr, length)
        if mtype == MAP_SHARED:
            vm_flags |= VM_MAYSHARE
            if vm_flags & VM_MAYWRITE or anonymous:
                vm_flags |= VM_SHARED
        vma = None
        try:
            with self.mmap_lock.write():
                if flags & MAP_FIXED_NOREPLACE and self.vmas_in(addr, addr + length):
                    raise oserror(errno.EEXIST, "MAP_FIXED_NOREPLACE over an existing mapping",
                                  addr, addr + length)
                if flags & MAP_FIXED:
                    start = addr
                elif huge:
                    start = self._hugetlb_unmapped_area(length, addr)
                elif anonymous and mtype == MAP_PRIVATE and not addr:
                    start = self._anon_unmapped_area(length)
                else:
                    start = self.get_unmapped_area(length, addr)
                self._check_budget(start, start + length, length >> PAGE_SHIFT)
                if anonymous and mtype == MAP_SHARED:
                    # shmem_zero_setup(): an object of exactly the mapping's size
                    cache = PageCache(self.system, self.system._new_cache_id(), name=f"shmem@0x{start:x}",
                                      size_pages=length >> PAGE_SHIFT)
                    self.system._register_cache(cache)
                vma = VMA(self, start, start + length, vm_flags, cache, offset >> PAGE_SHIFT, driver,
                          anon_id=self.system._anon_family(self))
                if cache is not None:
                    # taken before MAP_FIXED unmaps what is there, which may be this file's last mapping
                    cache.nr_mappings += 1
                if flags & MAP_FIXED:
                    self._munmap_locked(start, length)
                if huge:
                    hugetlb.hugetlb_populate(self, vma)
                self._insert(vma)
                if driver is not None:
                    try:
                        driver.mmap(vma)
                    except BaseException:
                        self._zap(vma, 0, vma.npages)
                        self._remove(vma)
                        raise
        except BaseException:
            if cache is not None:
                if vma is not None:             # the mapping's reference was taken
                    cache.nr_mappings -= 1
                if cache.nr_mappings == 0:
                    cache.unmapped()
            raise
        if flags & MAP_POPULATE:
            # __mm_populate(ignore_errors=1): the mapping stands whatever the fault-in met
            try:
                self.populate(start, start + length, bool(prot & PROT_WRITE))
            except ProcessKilled:
                raise
            except OSError:
                pass
        return start

    def _hugetlb_unmapped_area(self, length, hint):
        """hugetlb_get_unmapped_area(): a 2 MiB aligned free range."""
        got = self._free_hint(hint, length, PMD_SIZE)
        if got is not None:
            return got
        return self._pmd_aligned_area(length)

    def _pmd_aligned_area(self, length):
        start = self.get_unmapped_area(length + PMD_SIZE)
        return -(-start // PMD_SIZE) * PMD_SIZE

    def _anon_unmapped_area(self, length):
        """__get_unmapped_area() for private anonymous memory without a hint: since Linux 6.7
        (thp_get_unmapped_area) a length that is a multiple of 2 MiB gets a 2 MiB aligned
        range, so that the whole of it can be THP-mapped; anything else, or no room for the
        padding, the plain search."""
        if length % PMD_SIZE == 0:
            try:
                return self._pmd_aligned_area(length)
            except OSError:
                pass
        return self.get_unmapped_area(length)

    def _check_hugetlb_edges(self, start, end, what):
        """hugetlb_split(): a hugetlb VMA may only be cut on a 2 MiB boundary (EINVAL)."""
        for v in self.vmas_in(start, end):
            if v.vm_flags & VM_HUGETLB:
                for a in (start, end):
                    if v.start < a < v.end and a % PMD_SIZE:
                        raise oserror(errno.EINVAL, f"{what}: 0x{a:x} cuts a hugetlb mapping off a 2 MiB "
                                      "boundary", start, end)

    def _check_budget(self, start, end, npages):
        """``npages`` more pages mapped over [start, end) (what is mapped there now goes)."""
        gone = sum(min(v.end, end) - max(v.start, start) for v in self.vmas_in(start, end)) >> PAGE_SHIFT
        total = self.vmas.size >> PAGE_SHIFT         # mm->total_vm
        check_map_budget(total - gone + npages, self.phys, start, end)

    def _file_mapping_checks(self, fd, prot, flags, vm_flags, addr, length):
        import fcntl
        import os
        import stat
        try:
            st = os.fstat(fd)
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except (OSError, TypeError):
            raise oserror(errno.EBADF, f"file descriptor {fd!r} is not open", addr) from None
        if not stat.S_ISREG(st.st_mode):
            raise oserror(errno.ENODEV, f"file descriptor {fd} is not a regular file", addr)
        if mode == os.O_WRONLY:
            raise oserror(errno.EACCES, f"file descriptor {fd} is open write-only", addr)
        if mode == os.O_RDONLY:
            if flags & MAP_SHARED and prot & PROT_WRITE:
                raise oserror(errno.EACCES, f"PROT_WRITE on a MAP_SHARED mapping of read-only fd {fd}",
                              addr, addr + length)
            if flags & MAP_SHARED:
                # do_mmap(): a shared mapping of a read-only file can never become writable
                vm_flags &= ~VM_MAYWRITE
        return open_file_cache(self.system, fd), vm_flags

    def populate(self, start, end, write):
        """MAP_POPULATE / mm_populate(): fault the range in."""
        start, end = ulong(start, "populate start"), ulong(end, "populate end")
        with self.mmap_lock.read():
            for v in self.vmas_in(start, end):
                if v.vm_flags & VM_ACCESS and v.driver is None:
                    self.handle_mm_fault(v, max(start, v.start), min(end, v.end),
                                         write and bool(v.vm_flags & VM_WRITE))

    def munmap(self, addr, length):
        addr = ulong(addr, "munmap address")
        length = ulong(length, "munmap length", addr)
        check_aligned(addr, "munmap address")
        check_user_range(addr, length, "munmap")
        length = page_align(length)
        if length == 0:
            raise oserror(errno.EINVAL, "munmap length must not be 0", addr)
        with self.mmap_lock.write():
            self._munmap_locked(addr, length)

    def _munmap_locked(self, start, length):
        end = start + length
        vmas = self.vmas_in(start, end)
        if not vmas:
            return
        if self.maybe_huge:
            self._check_hugetlb_edges(start, end, "munmap")
        self._split_at(start)
        self._split_at(end)
        vmas = self.vmas_in(start, end)
        lo, hi = max(start, vmas[0].start), min(end, vmas[-1].end)
        with invalidation(self, lo, hi, MMU_NOTIFY_UNMAP):
            for v in vmas:
                self._zap(v, 0, v.npages)
                self._remove(v)
        self._compact_around(start, end)
        for v in vmas:
            self._release_backing(v)

    @_vma_change
    def _compact_around(self, start, end):
        """[start, end) was unmapped: a neighbour left holding little of a page table it
        shared with what went gets a table of its own (ptes_compact), so the rest is freed.
        It costs at most a few times what the unmap did."""
        for a in (start - PAGE_SIZE, end):
            v = self.find_vma(a)
            if v is not None:
                ptes_compact(v)

    def _release_backing(self, vma):
        f = vma.file
        if f is not None:
            f.nr_mappings -= 1
            if f.nr_mappings == 0:
                f.unmapped()

    # -- mprotect ----------------------------------------------------------------------
    def mprotect(self, addr, length, prot):
        addr = ulong(addr, "mprotect address")
        length = ulong(length, "mprotect length", addr)
        prot = ulong(prot, "mprotect prot", addr)
        check_aligned(addr, "mprotect address")
        check_flags(prot, _PROT_BITS, "prot", addr)
        if length == 0:
            return
        length = page_align(length)
        if length == 0:
            raise oserror(errno.ENOMEM, "mprotect: range wraps past 2**64", addr)
        end = check_user_range(addr, length, "mprotect", errno.ENOMEM)
        new = prot_to_vm(prot)
        with self.mmap_lock.write():
            first = self.find_vma(addr)
            if first is None:
                raise oserror(errno.ENOMEM, "mprotect: range is not mapped", addr, end)
            # the whole range must allow the new protection before anything changes
            if self.maybe_huge:
                self._check_hugetlb_edges(addr, end, "mprotect")
            cur = addr
            for v in self.vmas_in(addr, end):
                if v.start > cur:
                    break
                if new & VM_WRITE and not v.vm_flags & VM_MAYWRITE:
                    raise oserror(errno.EACCES, f"mprotect: {v!r} can never be writable "
                                  "(shared mapping of a read-only file)", max(v.start, addr), min(v.end, end))
                cur = v.end
            self._split_at(addr)
            self._split_at(end)
            cur = addr
            for v in self.vmas_in(addr, end):
                if v.start > cur:
                    # mprotect_fixup() stops at the hole; what came before stays changed (Linux)
                    raise oserror(errno.ENOMEM, "mprotect: range has a hole", cur, v.start)
                old = v.vm_flags
                v.vm_flags = (old & ~VM_ACCESS) | new
                if (old & VM_ACCESS) != new:
                    with invalidation(self, v.start, v.end, MMU_NOTIFY_PROTECTION_VMA):
                        if not new & VM_WRITE or not v.shared:
                            with self.phys.lock:
                                v.pte[:] = pt.pte_wrprotect(v.pte)
                cur = v.end
            for v in self.vmas_in(addr, end):
                self._try_merge(v.start)
            self._try_merge(end)
            if cur < end:
                raise oserror(errno.ENOMEM, "mprotect: range is not fully mapped", cur, end)

    # -- madvise / msync -----------------------------------------------------------------
    _KNOWN_ADVICE = {MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_DONTNEED, MADV_FREE,
                     MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_COLLAPSE}

    def madvise(self, addr, length, advice):
        addr = ulong(addr, "madvise address")
        length = ulong(length, "madvise length", addr)
        advice = ulong(advice, "madvise advice", addr)
        if advice not in self._KNOWN_ADVICE:
            raise oserror(errno.EINVAL, f"madvise: unknown advice {advice}", addr)
        check_aligned(addr, "madvise address")
        if length == 0:
            return
        aligned = page_align(length)
        if aligned == 0:
            raise oserror(errno.EINVAL, "madvise: length wraps past 2**64", addr)
        end = check_no_wrap(addr, aligned, "madvise")
        if advice in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
            return self._madvise_hugepage(addr, end, advice)
        with self.mmap_lock.read():
            vmas = self.vmas_in(addr, end)
            if advice == MADV_FREE:
                bad = [v for v in vmas if not vma_is_anonymous(v)]
                if bad:
                    raise oserror(errno.EINVAL, "MADV_FREE works on private anonymous memory only",
                                  max(bad[0].start, addr), min(bad[0].end, end))
            if advice == MADV_DONTNEED:
                # madvise_dontneed_free_valid_vma(): a hugetlb range starts on a huge page and
                # ends on one (rounded down)
                for v in vmas:
                    if v.vm_flags & VM_HUGETLB and max(v.start, addr) % PMD_SIZE:
                        raise oserror(errno.EINVAL, "MADV_DONTNEED: a hugetlb range must start on a "
                                      "2 MiB boundary", max(v.start, addr), min(v.end, end))
            last = 0
            for v in vmas:
                s, e = max(v.start, addr), min(v.end, end)
                if advice in (MADV_DONTNEED, MADV_FREE):
                    if v.vm_flags & VM_HUGETLB:
                        e = s + (e - s) // PMD_SIZE * PMD_SIZE
                        if e == s:
                            continue
                    # MADV_FREE may discard at any time before the next write; we discard at once,
                    # as memory pressure would.  A PMD mapping straddling an edge splits first.
                    huge_memory.split_huge_pmd_edges(self, v, v.idx(s), v.idx(e - 1) + 1)
                    with invalidation(self, s, e, MMU_NOTIFY_CLEAR):
                        self._zap(v, v.idx(s), v.idx(e - 1) + 1)
                elif advice == MADV_COLLAPSE:
                    last = huge_memory.madvise_collapse(self, v, s, e) or last
            covered = sum(min(v.end, end) - max(v.start, addr) for v in vmas)
            if covered < end - addr:
                raise oserror(errno.ENOMEM, "madvise: part of the range is not mapped", addr, end)
            if advice == MADV_COLLAPSE:
                huge_memory.check_collapse_result(last, addr, end)

    def _madvise_hugepage(self, addr, end, advice):
        """MADV_HUGEPAGE / MADV_NOHUGEPAGE: the VMAs of the range (split at its edges, as
        madvise_update_vma() does) get VM_HUGEPAGE or VM_NOHUGEPAGE.  Existing PMD mappings
        stay; only later faults and collapses look at the flags."""
        with self.mmap_lock.write():
            vmas = self.vmas_in(addr, end)
            covered = sum(min(v.end, end) - max(v.start, addr) for v in vmas)
            if vmas:
                self._split_at(addr)
                self._split_at(end)
                for v in self.vmas_in(addr, end):
                    if advice == MADV_HUGEPAGE:
                        v.vm_flags = (v.vm_flags | VM_HUGEPAGE) & ~VM_NOHUGEPAGE
                    else:
                        v.vm_flags = (v.vm_flags | VM_NOHUGEPAGE) & ~VM_HUGEPAGE
                for v in self.vmas_in(addr, end):
                    self._try_merge(v.start)
                self._try_merge(end)
            if covered < end - addr:
                raise oserror(errno.ENOMEM, "madvise: part of the range is not mapped", addr, end)

    def msync(self, addr, length, flags=MS_SYNC):
        addr = ulong(addr, "msync address")
        length = ulong(length, "msync length", addr)
        flags = ulong(flags, "msync flags", addr)
        check_flags(flags, MS_ASYNC | MS_SYNC | MS_INVALIDATE, "msync flag", addr)
        check_aligned(addr, "msync address")
        if flags & MS_ASYNC and flags & MS_SYNC:
            raise oserror(errno.EINVAL, "msync: MS_ASYNC and MS_SYNC together", addr)
        end = check_no_wrap(addr, page_align(length), "msync", errno.ENOMEM)
        if end == addr:
            return
        with self.mmap_lock.read():
            # mm/msync.c: holes are skipped (what is mapped after one is synced too) and
            # reported at the end; MS_ASYNC, which writes nothing, stops at the first
            cur, hole = addr, None
            for v in self.vmas_in(addr, end):
                if v.start > cur:
                    hole = cur if hole is None else hole
                    if not flags & MS_SYNC:
                        break
                if v.shared and v.file is not None and not v.file.shmem and flags & MS_SYNC:
                    s, e = max(v.start, addr), min(v.end, end)
                    self.system.writeback_range(v.file, v.pgoff + v.idx(s), v.pgoff + v.idx(e - 1) + 1)
                cur = v.end
            if hole is None and cur < end:
                hole = cur
            if hole is not None:
                raise oserror(errno.ENOMEM, "msync: part of the range is not mapped", hole, end)

    def mkclean(self, vma, i0, i1):
        """page_vma_mkclean_one() over PTEs [i0, i1) of a shared file VMA.

        Dirty bits move into the pages and the entries become clean and read-only
        under an MMU_NOTIFY_PROTECTION_PAGE invalidation, so that any later store
        (the CPU's, or a device's through hmm_range_fault) write-faults and dirties
        the page again: nothing written after a writeback is ever lost.
        """
        ptes = vma.pte[i0:i1]
        hit = np.nonzero(pt.pte_present(ptes) & ((ptes & (pt.PTE_WRITE | pt.PTE_DIRTY)) != 0))[0]
        if hit.size == 0:
            return
        lo, hi = i0 + int(hit[0]), i0 + int(hit[-1]) + 1
        with invalidation(self, vma.start + (lo << PAGE_SHIFT), vma.start + (hi << PAGE_SHIFT),
                          MMU_NOTIFY_PROTECTION_PAGE):
            with self.phys.lock:
                ptes = vma.pte[lo:hi]
                present = pt.pte_present(ptes)
                d = present & ((ptes & pt.PTE_DIRTY) != 0)
                p = pt.pte_pfn(ptes[d])
                p = p[(self.phys.pages.flags[p] & PG_ANON) == 0]
                self.phys.pages.flags[p] |= PG_DIRTY
                vma.pte[lo:hi] = np.where(present, ptes & ~(pt.PTE_WRITE | pt.PTE_DIRTY), ptes)

    # -- mremap ----------------------------------------------------------------------------
    def mremap(self, old_addr, old_size, new_size, flags, new_addr=0):
        old_addr = ulong(old_addr, "mremap address")
        old_size = ulong(old_size, "mremap old size", old_addr)
        new_size = ulong(new_size, "mremap new size", old_addr)
        flags = ulong(flags, "mremap flags", old_addr)
        new_addr = ulong(new_addr, "mremap new address", old_addr)
        check_flags(flags, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, "mremap flag", old_addr)
        check_aligned(old_addr, "mremap address")
        if flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE:
            raise oserror(errno.EINVAL, "mremap: MREMAP_FIXED needs MREMAP_MAYMOVE", old_addr)
        if flags & MREMAP_DONTUNMAP and (not flags & MREMAP_MAYMOVE or old_size != new_size):
            raise oserror(errno.EINVAL, "mremap: MREMAP_DONTUNMAP needs MREMAP_MAYMOVE and equal sizes",
                          old_addr)
        old_size, new_size = page_align(old_size), page_align(new_size)
        if new_size == 0 or old_size == 0:
            raise oserror(errno.EINVAL, "mremap: zero size (duplicating shared mappings is not emulated)",
                          old_addr)
        if new_size > TASK_SIZE:
            raise oserror(errno.EINVAL, f"mremap: new size {new_size:#x} is larger than the user "
                          "address space", old_addr)
        if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
            check_aligned(new_addr, "mremap new address")
            check_user_range(new_addr, new_size, "mremap new range")
            if new_addr < old_addr + old_size and old_addr < new_addr + new_size:
                raise oserror(errno.EINVAL, "mremap: old and new ranges overlap", new_addr, new_addr + new_size)
        with self.mmap_lock.write():
            # Everything is checked before anything changes: a rejected mremap leaves the
            # address space as it was.
            vma = self.find_vma(old_addr)
            if vma is None or old_size > vma.end - old_addr:
                raise oserror(errno.EFAULT, "mremap: old range is not one mapping", old_addr,
                              min(old_addr + old_size, 1 << 64))
            if vma.vm_flags & VM_HUGETLB:
                # Linux 5.17+: sizes in whole huge pages, 2 MiB aligned addresses, and no growing
                # (the pool's reservation cannot be split)
                old_size = -(-old_size // PMD_SIZE) * PMD_SIZE
                new_size = -(-new_size // PMD_SIZE) * PMD_SIZE
                if old_addr % PMD_SIZE or (flags & MREMAP_FIXED and new_addr % PMD_SIZE):
                    raise oserror(errno.EINVAL, "mremap: a hugetlb mapping moves between 2 MiB aligned "
                                  "addresses", old_addr, old_addr + old_size)
                if new_size > old_size:
                    raise oserror(errno.EINVAL, "mremap: a hugetlb mapping cannot grow", old_addr,
                                  old_addr + new_size)
                if old_size > vma.end - old_addr:
                    raise oserror(errno.EFAULT, "mremap: old range is not one mapping", old_addr,
                                  old_addr + old_size)
            if flags & MREMAP_DONTUNMAP and vma.vm_flags & (VM_DONTEXPAND | VM_PFNMAP):
                raise oserror(errno.EINVAL, "mremap: MREMAP_DONTUNMAP on a VM_DONTEXPAND/VM_PFNMAP mapping",
                              old_addr, old_addr + old_size)
            # where a move goes: as a new mapping of that kind would (no hint)
            unmapped_area = self._anon_unmapped_area if vma_is_anonymous(vma) else self.get_unmapped_area
            if not flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
                if new_size <= old_size:
                    if new_size < old_size:
                        self._munmap_locked(old_addr + new_size, old_size - new_size)
                    return old_addr
                # grow in place when the VMA ends here and the room after it is free
                if vma.end == old_addr + old_size and not self.vmas_in(vma.end, old_addr + new_size) \
                        and old_addr + new_size <= TASK_SIZE:
                    self._check_budget(vma.end, old_addr + new_size, (new_size - old_size) >> PAGE_SHIFT)
                    extra = (old_addr + new_size - vma.end) >> PAGE_SHIFT
                    with self.phys.rmap_lock:
                        vma.pte = np.concatenate((vma.pte, np.zeros(extra, np.uint64)))
                        vma.end = old_addr + new_size
                        self.vmas.update(vma)
                    return old_addr
                if not flags & MREMAP_MAYMOVE:
                    raise oserror(errno.ENOMEM, "mremap: cannot grow in place and MREMAP_MAYMOVE not given",
                                  old_addr, old_addr + new_size)
                dest = unmapped_area(new_size)
            elif flags & MREMAP_FIXED:
                dest = new_addr
            else:
                dest = unmapped_area(new_size)
            kept = 0 if flags & MREMAP_DONTUNMAP else old_size
            self._check_budget(dest, dest + new_size, (new_size - kept) >> PAGE_SHIFT)
            if flags & MREMAP_FIXED:
                self._munmap_locked(dest, new_size)
            return self._move_vma(vma, old_addr, old_size, dest, new_size, bool(flags & MREMAP_DONTUNMAP))

    @_vma_change
    def _move_vma(self, vma, old_addr, old_size, dest, new_size, dontunmap):
        """move_vma(): the PTEs of [old_addr, +old_size) move to ``dest`` without copying pages."""
        self._split_at(old_addr)
        self._split_at(old_addr + old_size)
        src = self.find_vma(old_addr)
        keep = min(old_size, new_size)
        if new_size < old_size:
            self._munmap_locked(old_addr + new_size, old_size - new_size)
            src = self.find_vma(old_addr)
        with invalidation(self, old_addr, old_addr + keep, MMU_NOTIFY_UNMAP):
            with self.phys.lock:
                pte = np.zeros(new_size >> PAGE_SHIFT, np.uint64)
                pte[:keep >> PAGE_SHIFT] = src.pte[:keep >> PAGE_SHIFT]
                if (dest - old_addr) % PMD_SIZE and self.maybe_huge:
                    # move_huge_pmd() needs both ends PMD-aligned; elsewhere the PMDs split
                    pte &= ~pt.PTE_HUGE
                moved = VMA(self, dest, dest + new_size, src.vm_flags, src.file, src.pgoff, src.driver,
                            src.anon_id, pte)
                if dontunmap:
                    src.pte[:] = 0          # the pages went with the move; the old range refaults empty
                else:
                    self._remove(src)
        if not dontunmap:
            self._compact_around(old_addr, old_addr + old_size)
        if moved.file is not None and dontunmap:
            moved.file.nr_mappings += 1
        self._insert(moved)
        return dest

    # -- GUP ----------------------------------------------------------------------------------
    def get_user_pages(self, addr, npages, write, longterm=False, pin=True):
        """__get_user_pages(): fault in and return the pfns (NumPy) of [addr, +npages)."""
        addr = ulong(addr, "GUP address") & PAGE_MASK     # start is rounded down, as in Linux
        npages = ulong(npages, "GUP page count", addr)
        if npages == 0:
            return np.zeros(0, np.int64)
        if npages > TASK_SIZE >> PAGE_SHIFT:
            raise oserror(errno.EFAULT, f"GUP of {npages:#x} pages: more than the user address space", addr)
        end = check_user_range(addr, npages * PAGE_SIZE, "GUP", errno.EFAULT)
        kind = "write" if write else "read"
        with self.mmap_lock.read():
            cur = addr
            vmas = []
            for v in self.vmas_in(addr, end):
                if v.start > cur:
                    break
                need = VM_WRITE if write else VM_READ
                if not v.vm_flags & need:
                    raise oserror(errno.EFAULT, f"GUP for {kind}: {v!r} does not allow it",
                                  max(v.start, addr), min(v.end, end))
                vmas.append(v)
                cur = v.end
            if cur < end:
                raise oserror(errno.EFAULT, "GUP: range is not mapped", max(cur, addr), end)
            for _ in range(_MAX_FAULT_ROUNDS):
                for v in vmas:
                    s, e = max(v.start, addr), min(v.end, end)
                    self.handle_mm_fault(v, s, e, write, unshare=pin and not write)
                    if longterm:
                        self._migrate_longterm(v, s, e)
                with self.phys.lock:
                    parts = []
                    for v in vmas:
                        s, e = max(v.start, addr), min(v.end, end)
                        ptes = v.pte[v.idx(s):v.idx(e - 1) + 1]
                        ok = pt.pte_write(ptes) if write else pt.pte_present(ptes)
                        if not ok.all():
                            break
                        parts.append(pt.pte_pfn(ptes))
                    else:
                        pfns = np.concatenate(parts)
                        if longterm and not self.phys.longterm_pinnable(pfns).all():
                            continue
                        return pfns
            raise oserror(errno.EAGAIN, "GUP kept racing with page-table changes", addr, end)

    def _migrate_longterm(self, vma, s, e):
        """check_and_migrate_movable_pages(): no long-term pin may stay on device memory whose
        node does not allow it (folio_is_longterm_pinnable)."""
        with self.phys.lock:
            i0, i1 = vma.idx(s), vma.idx(e - 1) + 1
            ptes = vma.pte[i0:i1]
            p = pt.pte_pfn(ptes)
            dev = pt.pte_present(ptes) & ~self.phys.longterm_pinnable(p)
            if not dev.any():
                return
            idx = i0 + np.nonzero(dev)[0]
            old = p[dev]
            if (self.phys.pages.mapcount[old] > 1).any():
                raise oserror(errno.EBUSY, "long-term pin of device-coherent pages mapped more than once",
                              s, e)
            huge = np.count_nonzero(ptes[dev] & pt.PTE_HUGE)
        if huge:
            # the pages move one by one: their PMD mappings and their folios split first
            heads = np.unique(self.phys.compound_head(old))
            huge_memory.split_folio(self.system, heads, vmas_for_pages(self.system, heads, vma.anon_id))
            return self._migrate_longterm(vma, s, e)
        new = self.phys.alloc(old.size, self.memcg, zero=False)
        with invalidation(self, s, e, MMU_NOTIFY_CLEAR):
            with self.phys.lock:
                self.phys.copy(new, old)
                pg = self.phys.pages
                for f in ("flags", "mapping", "index"):
                    getattr(pg, f)[new] = getattr(pg, f)[old]
                pg.flags[new] &= ~PG_ZONE_DEVICE  # that bit belongs to the device frame
                flags = vma.pte[idx] & (pt.PTE_WRITE | pt.PTE_DIRTY | pt.PTE_YOUNG)
                pg.mapcount[new] = 1
                pg.mapcount[old] -= 1
                vma.pte[idx] = pt.mk_pte(new, 0) | flags
                if vma.file is not None:
                    vma.file.replace(old, new)
                    pg.refcount[new] += 1
                    self.phys.put(old)
                self.phys.put(old)

    # -- fork and exit -------------------------------------------------------------------------
    def dup_into(self, child):
        """dup_mmap(): copy every VMA into ``child``, COW for private mappings."""
        child.maybe_huge = self.maybe_huge
        for v in self.vmas:
            if v.cow and self.maybe_huge:
                self._split_pinned_huge(v)
            if v.cow:
                kind = v.pte & _SWP_PRESENT
                ex = ((kind == _EXCL_READ) | (kind == _EXCL_WRITE)).nonzero()[0]
                if ex.size:
                    # copy_nonpresent_pte(): exclusive entries are restored, then copied as present
                    self.remove_device_exclusive_entries(v, v.start + (ex << PAGE_SHIFT))
                with invalidation(self, v.start, v.end, MMU_NOTIFY_PROTECTION_PAGE):
                    self._copy_ptes(v, child)
            else:
                self._copy_ptes(v, child)

    def _split_pinned_huge(self, v):
        """copy_huge_pmd(): a THP that may be pinned is not shared with the child; its PMD is
        split and the 4 KiB path copies the pinned pages."""
        huge = np.nonzero(((v.pte & pt.PTE_HUGE) != 0) & ((v.pte & pt.PTE_PRESENT) != 0))[0]
        if huge.size == 0:
            return
        p = (v.pte[huge] >> _PFN_SHIFT).astype(np.int64)
        pinned = huge[(self.phys.pages.pincount[p] > 0) & ((self.phys.pages.flags[p] & PG_HUGETLB) == 0)]
        base = v.start >> PAGE_SHIFT
        huge_memory.split_huge_pmd_groups(self, v, np.unique(pinned - (base + pinned) % HPAGE_PMD_NR))

    @_vma_change
    def _copy_ptes(self, v, child):
        """copy_page_range() for one VMA: the child's entries, its references and rss."""
        phys = self.phys
        pg = phys.pages
        spare = _EMPTY
        if v.cow:
            # page_needs_cow_for_dma(): pinned anonymous pages are copied for the child at
            # once; allocate the copies before taking the page-table lock (the OOM killer may
            # run).  Our mmap_lock is held for writing, so no new pin can appear meanwhile.
            p_all = (v.pte >> _PFN_SHIFT).astype(np.int64)
            # (a pinned hugetlb page is shared like the others: copy_hugetlb_page_range()'s
            # early copy of it is not emulated)
            maybe = np.count_nonzero(((v.pte & pt.PTE_PRESENT) != 0) & (pg.pincount[p_all] > 0)
                                     & ((pg.flags[p_all] & (PG_ANON | PG_HUGETLB)) == PG_ANON))
            if maybe:
                spare = phys.alloc(maybe, child.memcg, zero=False)
        with phys.lock:
            src = v.pte.copy()
            cv = VMA(child, v.start, v.end, v.vm_flags, v.file, v.pgoff, v.driver, v.anon_id, src)
            if v.file is not None:
                v.file.nr_mappings += 1
            used = src.nonzero()[0]                    # every entry but pte_none
            e = src[used]
            p = (e >> _PFN_SHIFT).astype(np.int64)
            kind = e & _SWP_PRESENT
            # references and mapcounts: every entry but migration entries and the zero page
            ref = (kind != _MIG_READ) & (kind != _MIG_WRITE) & ~phys.zero_mask(p)
            counted = p if np.count_nonzero(ref) == ref.size else p[ref]
            add_at(pg.refcount, counted, 1, v.driver is None)
            add_at(pg.mapcount, counted, 1, v.driver is None)
            if v.cow and used.size:
                anon = (pg.flags[p] & PG_ANON) != 0
                pinned = (ref & anon & ((kind & pt.PTE_PRESENT) != 0) & (pg.pincount[p] > 0)
                          & ((pg.flags[p] & PG_HUGETLB) == 0)) if spare.size else None
                shared = anon if pinned is None else anon & ~pinned
                pg.flags[p[shared & ref]] &= ~PG_ANON_EXCLUSIVE
                if pinned is None:
                    v.pte[:] = pt.pte_wrprotect(v.pte)
                    src = pt.pte_wrprotect(src)
                else:
                    pin = used[pinned]
                    keep = v.pte[pin]
                    v.pte[:] = pt.pte_wrprotect(v.pte)
                    v.pte[pin] = keep
                    src = pt.pte_wrprotect(src)
                    old = p[pinned]
                    new, unused = spare[:old.size], spare[old.size:]
                    phys.put(unused)                 # pins released meanwhile need no copy
                    if old.size:
                        phys.copy(new, old)
                        pg.flags[new] |= PG_ANON | PG_ANON_EXCLUSIVE
                        pg.mapcount[new] = 1
                        add_at(pg.mapcount, old, -1)
                        phys.put(old)
                        # copy_present_page(): the copy gets the VMA's protection (maybe_mkwrite)
                        w = pt.PTE_WRITE if v.vm_flags & VM_WRITE else np.uint64(0)
                        src[pin] = pt.mk_pte(new, w | pt.PTE_DIRTY | pt.PTE_YOUNG)
                        p = (src[used] >> _PFN_SHIFT).astype(np.int64)
                cv.pte = src
            elif spare.size:
                phys.put(spare)
            child._insert(cv)
        child._account(p, +1)

    def teardown(self):
        """exit_mmap(): every mapping goes (UNMAP events after the RELEASE).

        What the process wrote through its shared file mappings is written back first, even
        where another process still maps the file: in Linux a read(2) of the file sees it at
        once through the page cache; here the file sees it when it is written back.  A write
        error is raised once the address space is gone all the same."""
        from .notifier import mmu_notifier_release
        with self.mmap_lock.write():
            try:
                for v in list(self.vmas):
                    if v.shared and v.file is not None and not v.file.shmem:
                        self.system.writeback_range(v.file, v.pgoff, v.pgoff + v.npages)
            finally:
                mmu_notifier_release(self)
                for v in list(self.vmas):
                    with invalidation(self, v.start, v.end, MMU_NOTIFY_UNMAP):
                        self._zap(v, 0, v.npages)
                    self._remove(v)
                    self._release_backing(v)
                self.dead = True

