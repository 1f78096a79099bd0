"""hmm_range_fault(): mirror a range of a CPU page table, from mm/hmm.c.

A driver fills an ``HmmRange`` (the interval notifier it registered, the
sequence it read with ``mmu_interval_read_begin``, ``[start, end)``, an output
array ``hmm_pfns`` with one uint64 per page, and what it wants faulted in:
``default_flags`` for every page plus per-page requests in ``hmm_pfns`` kept by
``pfn_flags_mask``).  ``hmm_range_fault`` snapshots the CPU page table into
``hmm_pfns`` and faults in what was requested, with the per-entry rules of
mm/hmm.c:

* a present page: its pfn with VALID, and WRITE when the PTE is writable; a
  request for more (a write on a read-only PTE, anything on pte_none) faults;
* a page mapped by a PMD (a THP, the huge zero folio, a hugetlb page) or a
  device-private PMD entry of the owner also carries its map order,
  PMD_SHIFT - PAGE_SHIFT, in the HMM_PFN_ORDER field (hmm_pfn_to_map_order);
* the zero page is reported like any page (the driver sees it by its pfn);
* a device-private entry owned by ``dev_private_owner`` is reported (VALID,
  WRITE if the entry is writable) and never faulted, whatever was requested;
  one of another owner reads as 0 unless a fault is requested, which migrates
  it back to system memory through its pgmap's ``migrate_to_ram``;
* a device-exclusive entry faults (restoring the CPU mapping) when requested;
  a migration entry waits for the migration when a fault is requested;
* PROT_NONE VMAs, VM_IO/VM_PFNMAP VMAs, holes with no VMA and special PTEs are
  HMM_PFN_ERROR, or -EFAULT when a fault was requested for them;
* a write fault requested in a VMA without VM_WRITE is -EPERM;
* -EBUSY when the notifier sequence moved (the driver retries).

Return values follow the kernel: 0 or a negative errno.  Everything is one
vectorised pass per VMA; faults are taken per run of pages, and the walk then
restarts at the first faulted address exactly like ``hmm_vma_walk.last``.
"""
import errno

import numpy as np

from ..constants import PAGE_SHIFT, PAGE_SIZE
from ..errors import oserror
from ..mm import pgtable as pt
from ..mm.notifier import MmuIntervalNotifier, mmu_interval_check_retry
from ..mm.validate import check_buffer, pfn_array, ulong
from . import debug, mmcompat

_U = np.uint64

# enum hmm_pfn_flags (include/linux/hmm.h, 64-bit)
HMM_PFN_VALID = 1 << 63
HMM_PFN_WRITE = 1 << 62
HMM_PFN_ERROR = 1 << 61
HMM_PFN_DMA_MAPPED = 1 << 60      # sticky: carried from input to output
HMM_PFN_P2PDMA = 1 << 59
HMM_PFN_P2PDMA_BUS = 1 << 58
HMM_PFN_ORDER_SHIFT = 64 - 11
HMM_PFN_REQ_FAULT = HMM_PFN_VALID
HMM_PFN_REQ_WRITE = HMM_PFN_WRITE
HMM_PFN_FLAGS = ((1 << 64) - 1) & ~((1 << HMM_PFN_ORDER_SHIFT) - 1)
HMM_PFN_INOUT_FLAGS = HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS

HMM_RANGE_DEFAULT_TIMEOUT = 1000   # ms in Linux; here a bound on retries (deterministic)
_MAX_STALLS = 64                   # walk passes without progress before -EBUSY

_HMM_NEED_FAULT = 1
_HMM_NEED_WRITE_FAULT = 2


class HmmRange:
    """struct hmm_range: what ``hmm_range_fault`` fills in.

    ``notifier`` (the driver's MmuIntervalNotifier covering the range) and ``notifier_seq``
    (``mmu_interval_read_begin``'s value, set before each call); ``[start, end)`` page-aligned;
    ``hmm_pfns`` a uint64 array of (end - start) / PAGE_SIZE entries, input flags in, output
    entries out (left None, hmm_range_fault allocates one); ``default_flags``
    (HMM_PFN_REQ_FAULT, | HMM_PFN_REQ_WRITE) apply to every page, ``pfn_flags_mask`` selects
    the per-page input flags that also count; ``dev_private_owner``: device-private pages of the
    pgmap with this owner are returned as they are (the driver's own memory) instead of being
    migrated back to the CPU.  The fields are the caller's, as in C: hmm_range_fault checks them.
    """

    __slots__ = ("notifier", "notifier_seq", "start", "end", "hmm_pfns", "default_flags",
                 "pfn_flags_mask", "dev_private_owner")

    def __init__(self, notifier=None, start=0, end=0, hmm_pfns=None, default_flags=0,
                 pfn_flags_mask=0, dev_private_owner=None, notifier_seq=0):
        self.notifier = notifier
        self.notifier_seq = notifier_seq
        self.start = start
        self.end = end
        self.hmm_pfns = hmm_pfns
        self.default_flags = default_flags
        self.pfn_flags_mask = pfn_flags_mask
        self.dev_private_owner = dev_private_owner


def _check_range(range):
    """The caller's struct hmm_range, checked before anything happens (OSError on a bad field).

    Addresses and flags are unsigned longs (a negative flag word is its two's complement, as
    in C); the range is page aligned and not reversed; ``hmm_pfns`` is a writable uint64 array
    of at least one entry per page (allocated here when None, if RAM could hold it).  Returns
    the notifier's mm (None once it was removed)."""
    if not isinstance(range, HmmRange) or not isinstance(range.notifier, MmuIntervalNotifier):
        raise oserror(errno.EINVAL, "hmm_range_fault needs an HmmRange with an interval notifier")
    start = ulong(range.start, "hmm_range.start")
    end = ulong(range.end, "hmm_range.end", start)
    range.default_flags = ulong(range.default_flags, "hmm_range.default_flags", start)
    range.pfn_flags_mask = ulong(range.pfn_flags_mask, "hmm_range.pfn_flags_mask", start)
    if start & (PAGE_SIZE - 1) or end & (PAGE_SIZE - 1) or end < start:
        raise oserror(errno.EINVAL, "hmm_range: unaligned or reversed range", start, end)
    range.start, range.end = start, end
    npages = (end - start) >> PAGE_SHIFT
    mm = range.notifier.mm
    if range.hmm_pfns is None:
        if mm is not None:
            check_buffer(npages * 8, mm.system.phys, "hmm_pfns", start, end)
        range.hmm_pfns = np.zeros(npages, dtype=np.uint64)
    pfn_array(range.hmm_pfns, npages, "hmm_range.hmm_pfns", start, end)
    return mm


def hmm_pfn_to_pfn(hmm_pfns):
    """hmm_pfn_to_page()'s pfn for every output entry, vectorised (the flags stripped)."""
    return (np.asarray(hmm_pfns, dtype=_U) & _U(~HMM_PFN_FLAGS & ((1 << 64) - 1))).astype(np.int64)


def hmm_pfn_to_map_order(hmm_pfns):
    """hmm_pfn_to_map_order(): log2 of the CPU mapping's size in pages (9 for a PMD-mapped THP)
    for every output entry, so a driver can map a huge page with one device entry."""
    return ((np.asarray(hmm_pfns, dtype=_U) >> _U(HMM_PFN_ORDER_SHIFT)) & _U(0x1F)).astype(np.int64)


def hmm_pfn_flags_order(order):
    """hmm_pfn_flags_order(): ``order`` in the HMM_PFN_ORDER field."""
    return int(order) << HMM_PFN_ORDER_SHIFT


def _pmd_order_bits(pte):
    """HMM_PFN_ORDER = PMD_SHIFT - PAGE_SHIFT (9) where PTE_HUGE (bit 5) is set, 0 elsewhere:
    9 is bits 0 and 3 of the field, so two shifts of the one bit make it."""
    h = pte & pt.PTE_HUGE
    return (h << _ORDER_LO) | (h << _ORDER_HI)


def _need_fault(range, req_in, cpu_flags):
    """hmm_pte_need_fault() on arrays: 0, NEED_FAULT or NEED_FAULT|NEED_WRITE_FAULT."""
    req = (req_in & _U(range.pfn_flags_mask)) | _U(range.default_flags)
    rf = (req & _U(HMM_PFN_REQ_FAULT)) != 0
    wf = rf & ((req & _U(HMM_PFN_REQ_WRITE)) != 0) & ((cpu_flags & _U(HMM_PFN_WRITE)) == 0)
    nf = rf & (((cpu_flags & _U(HMM_PFN_VALID)) == 0) | wf)
    return nf.astype(np.int8) * _HMM_NEED_FAULT + wf.astype(np.int8) * _HMM_NEED_WRITE_FAULT


def _any_fault_possible(range):
    return bool((range.default_flags | range.pfn_flags_mask) & HMM_PFN_REQ_FAULT)


def _set(range, i0, i1, values):
    out = range.hmm_pfns
    out[i0:i1] = (out[i0:i1] & _U(HMM_PFN_INOUT_FLAGS)) | values


class _Walk:
    """struct hmm_vma_walk: where the next pass starts."""

    def __init__(self, range):
        self.range = range
        self.last = range.start


def hmm_range_fault(range):
    """hmm_range_fault() of mm/hmm.c: snapshot (and fault in, as asked) the CPU page table of
    ``range``, filling ``range.hmm_pfns``.

    Call with mmap_lock held for read, after ``range.notifier_seq =
    mmu_interval_read_begin(range.notifier)``.  Each output entry is HMM_PFN_VALID | pfn
    (| HMM_PFN_WRITE, | the map order), or HMM_PFN_ERROR, or 0 where nothing was asked.  Pages
    asked for with HMM_PFN_REQ_FAULT are faulted in like a CPU access (REQ_WRITE: a write
    fault, breaking COW); device-private pages of another owner migrate back to the CPU.
    Returns 0, or -EBUSY (an invalidation raced: read_begin again and retry), -EFAULT (no
    VMA, PROT_NONE, or a fault that failed), -EPERM (a write to a read-only mapping),
    -EINVAL (a field that is not what struct hmm_range holds: an unaligned or reversed range,
    an hmm_pfns that is not a uint64 array of one entry per page).  The result may be used
    only under the driver lock after ``mmu_interval_read_retry(range.notifier,
    range.notifier_seq)`` returned False.
    """
    try:
        mm = _check_range(range)
    except OSError as ex:
        return -ex.errno
    if mm is None:
        return -errno.EFAULT
    debug.check_no_unfinished_migration("hmm_range_fault", mm, range.start, range.end)
    walk = _Walk(range)
    stalled = 0
    while True:
        if mmu_interval_check_retry(range.notifier, range.notifier_seq):
            return -errno.EBUSY
        last = walk.last
        ret = _walk_page_range(mm, walk)
        # On -EBUSY the walk restarts at walk.last: entries below it hold their
        # output, entries from it on still hold their input.
        if ret != -errno.EBUSY:
            return ret
        # A pass that faulted and still stops at the same page made no progress; after
        # _MAX_STALLS of those the caller gets -EBUSY and retries with a fresh sequence, so a
        # page that never settles costs a bounded wait instead of a spin under mmap_lock.
        stalled = stalled + 1 if walk.last == last else 0
        if stalled >= _MAX_STALLS:
            return -errno.EBUSY


def _walk_page_range(mm, walk):
    range = walk.range
    addr = walk.last
    end = range.end
    if addr >= end:
        return 0
    for vma in list(mmcompat.vmas_in(mm, addr, end)):
        if vma.start > addr:
            ret = _walk_hole(walk, addr, min(vma.start, end))
            if ret:
                return ret
        s, e = max(addr, vma.start), min(end, vma.end)
        ret = _walk_vma(walk, vma, s, e)
        if ret:
            return ret
        addr = e
        if addr >= end:
            return 0
    if addr < end:
        return _walk_hole(walk, addr, end)
    return 0


def _idx(range, addr):
    return (addr - range.start) >> PAGE_SHIFT


def _walk_hole(walk, start, end):
    """No VMA here: ERROR, or -EFAULT if a fault was asked for."""
    range = walk.range
    i0, i1 = _idx(range, start), _idx(range, end)
    if _any_fault_possible(range) and _need_fault(range, range.hmm_pfns[i0:i1], _U(0)).any():
        return -errno.EFAULT
    _set(range, i0, i1, _U(HMM_PFN_ERROR))
    return 0


from ..mm.vma import VM_IO, VM_MIXEDMAP, VM_PFNMAP, VM_READ, VM_WRITE  # noqa: E402

_PRESENT_SPECIAL = pt.PTE_PRESENT | pt.PTE_SPECIAL
_WRITE_TO_HMM = _U(62 - 1)        # PTE_WRITE (bit 1) -> HMM_PFN_WRITE (bit 62)
_INOUT = _U(HMM_PFN_INOUT_FLAGS)
_VALID = _U(HMM_PFN_VALID)
_FAST_CHUNK = 1 << 16             # pages per pass of the fast path: temporaries stay in cache
_ORDER_LO = _U(HMM_PFN_ORDER_SHIFT - 5)
_ORDER_HI = _U(HMM_PFN_ORDER_SHIFT + 3 - 5)


def _fast_present(walk, vma, start, end):
    """The common case in one short pass: every entry a present, normal page, and the
    request uniform (no per-page flags), so nothing needs a fault unless a write is
    asked for a read-only entry.  Returns None when the general walk must run."""
    r = walk.range
    if r.pfn_flags_mask & (HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE):
        return None
    want_write = (r.default_flags & (HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)) == (
        HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    v0 = (start - vma.start) >> PAGE_SHIFT
    i0 = (start - r.start) >> PAGE_SHIFT
    n = (end - start) >> PAGE_SHIFT
    ptes, out = vma.pte, r.hmm_pfns
    huge = vma.mm.maybe_huge
    for k in range(0, n, _FAST_CHUNK):
        m = min(_FAST_CHUNK, n - k)
        pte = ptes[v0 + k:v0 + k + m]
        if not ((pte & _PRESENT_SPECIAL) == pt.PTE_PRESENT).all():
            return None
        if want_write and not (pte & pt.PTE_WRITE).all():
            return None
        o = out[i0 + k:i0 + k + m]
        o &= _INOUT
        o |= (pte >> _U(pt.PFN_SHIFT)) | _VALID | ((pte & pt.PTE_WRITE) << _WRITE_TO_HMM)
        if huge:
            o |= _pmd_order_bits(pte)
    return 0


def _walk_vma(walk, vma, start, end):
    range = walk.range
    if vma.vm_flags & VM_READ and not vma.vm_flags & (VM_IO | VM_PFNMAP):
        ret = _fast_present(walk, vma, start, end)
        if ret is not None:
            return ret
    i0, i1 = _idx(range, start), _idx(range, end)
    req = range.hmm_pfns[i0:i1]
    if (vma.vm_flags & (VM_IO | VM_PFNMAP)) or not (vma.vm_flags & VM_READ):
        # hmm_vma_walk_test(): no struct pages, or no read access (HMM assumes no
        # write-only mappings): a hard failure if a fault is requested.
        if _any_fault_possible(range) and _need_fault(range, req, _U(0)).any():
            return -errno.EFAULT
        _set(range, i0, i1, _U(HMM_PFN_ERROR))
        return 0

    system = vma.mm.system
    phys = system.phys
    v0, v1 = vma.idx(start), vma.idx(end)
    pte = np.asarray(vma.pte[v0:v1], dtype=_U)
    n = pte.size
    present = (pte & pt.PTE_PRESENT) != 0
    none = pte == 0
    swap = ~present & ~none
    pfn = (pte >> _U(pt.PFN_SHIFT)).astype(np.int64)

    cpu = np.zeros(n, dtype=_U)
    cpu[present] = _U(HMM_PFN_VALID)
    cpu[present & ((pte & pt.PTE_WRITE) != 0)] |= _U(HMM_PFN_WRITE)

    # Special PTEs: vm_normal_page() is NULL and the pfn is not the zero page.
    special = present & ((pte & pt.PTE_SPECIAL) != 0) & (pfn != phys.zero_pfn)
    if special.any() and (vma.vm_flags & VM_MIXEDMAP):
        # vm_insert_page()'d pages of a mixed map are ordinary refcounted pages in Linux.
        sp = pfn[special]
        ok = (sp < phys.nr_ram) & (phys.pages.refcount[np.clip(sp, 0, phys.pages.n - 1)] > 0)
        special[np.nonzero(special)[0][ok]] = False

    own = np.zeros(n, dtype=bool)
    stype = np.zeros(n, dtype=np.int64)
    if swap.any():
        stype = pt.swp_type(pte)
        devp = (stype == pt.SWP_DEVICE_PRIVATE_READ) | (stype == pt.SWP_DEVICE_PRIVATE_WRITE)
        if devp.any() and range.dev_private_owner is not None:
            from .memremap import pgmap_owner_is
            own[devp] = pgmap_owner_is(system, pfn[devp], range.dev_private_owner)

    if vma.mm.maybe_huge:
        # hmm_vma_handle_pmd(), hmm_vma_handle_absent_pmd(), hmm_vma_walk_hugetlb_entry(): a
        # PMD mapping's pages carry its order
        cpu |= np.where(present, _pmd_order_bits(pte), _U(0))
    out = np.zeros(n, dtype=_U)
    norm = present & ~special
    out[norm] = pfn[norm].astype(_U) | cpu[norm]
    if own.any():
        ocpu = np.where(stype[own] == pt.SWP_DEVICE_PRIVATE_WRITE, _U(HMM_PFN_VALID | HMM_PFN_WRITE),
                        _U(HMM_PFN_VALID))
        if vma.mm.maybe_huge:
            ocpu = ocpu | _pmd_order_bits(pte[own])
        out[own] = pfn[own].astype(_U) | ocpu
    out[special] = _U(HMM_PFN_ERROR)

    if not _any_fault_possible(range):
        _set(range, i0, i1, out)
        return 0

    # Non-present entries other than our own device memory fault with cpu_flags 0.
    eff_cpu = np.where(present | own, cpu, _U(0))
    eff_cpu[own] = out[own] & _U(HMM_PFN_VALID | HMM_PFN_WRITE)
    need = _need_fault(range, req, eff_cpu)
    need[own] = 0
    if special.any():
        bad = special & (_need_fault(range, req, _U(0)) != 0)
        if bad.any():
            k = int(np.argmax(bad))
            if k:
                _set(range, i0, i0 + k, out[:k])
            return -errno.EFAULT
        need[special] = 0
    if not need.any():
        _set(range, i0, i1, out)
        return 0

    k = int(np.argmax(need != 0))
    # Everything before the first fault is final output.
    if k:
        _set(range, i0, i0 + k, out[:k])
    walk.last = start + (k << PAGE_SHIFT)

    if (need & _HMM_NEED_WRITE_FAULT).any() and not (vma.vm_flags & VM_WRITE):
        return -errno.EPERM

    # Migration entries: wait for the migration, then walk again (-EBUSY).
    mig = (stype == pt.SWP_MIGRATION_READ) | (stype == pt.SWP_MIGRATION_WRITE)
    if mig[k]:
        mmcompat.migration_entry_wait(phys, int(pfn[k]))
        return -errno.EBUSY

    # hmm_vma_fault(): fault every page that needs it, by runs of the same kind.
    sel = np.nonzero((need != 0) & ~mig)[0]
    sel = sel[sel >= k]
    write = (need[sel] & _HMM_NEED_WRITE_FAULT) != 0
    for w in (True, False):
        idx = sel[write == w]
        if idx.size == 0:
            continue
        breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
        for run in np.split(idx, breaks):
            a = vma.start + ((v0 + int(run[0])) << PAGE_SHIFT)
            b = vma.start + ((v0 + int(run[-1]) + 1) << PAGE_SHIFT)
            err = mmcompat.handle_mm_fault(vma, a, b, w)
            if err:
                return err
    return -errno.EBUSY
