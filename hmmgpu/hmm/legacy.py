"""The 2017 HMM API (HMM v25, Linux 4.14) as a thin layer over the modern one.

What the seed documents (reference/hmm-v25-cover-letter-and-doc.txt) describe:

* ``hmm_mirror_register(mirror, mm)``: the driver's ``ops.sync_cpu_device_pagetables``
  (or the doc's ``ops.update(mirror, action, start, end)``) hears every CPU page
  table update, through a full mmu notifier; ``ops.release`` when the mm goes;
* ``hmm_vma_get_pfns`` / ``hmm_vma_fault`` snapshot / fault a range into a
  ``hmm_pfn_t`` array, and ``hmm_vma_range_done`` says whether an update hit the
  range meanwhile (the driver then starts again), the protocol of section 4;
* ``hmm_devmem_add(ops, device, size)`` / ``hmm_devmem_remove``: un-addressable
  device memory with ``ops.free`` and ``ops.fault`` (section 5);
* ``migrate_vma(ops, vma, start, end, src, dst, private)`` with
  ``alloc_and_copy`` and ``finalize_and_map`` (section 6).

Differences, on purpose: a device page is free at refcount 0 (today's rule),
not at 1 (the 2 -> 1 transition of reference/zone-device-refcount-thread.txt);
``ops.free`` receives a NumPy array of pfns (batched, as everything here), not
one page; pfn arrays are NumPy uint64.
"""
import errno
import threading

import numpy as np

from ..constants import PAGE_SHIFT, PAGE_SIZE
from ..errors import oserror
from ..mm import pgtable as pt
from ..mm.mm import MM
from ..mm.notifier import (MmuIntervalNotifier, MmuNotifier, mmu_interval_notifier_insert,
                           mmu_interval_notifier_remove, mmu_interval_read_begin,
                           mmu_interval_set_seq, mmu_notifier_range_blockable, mmu_notifier_register,
                           mmu_notifier_unregister)
from ..mm.validate import pfn_array, ulong
from ..mm.vma import VM_READ, VMA
from .hmm import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_RANGE_DEFAULT_TIMEOUT, HmmRange, hmm_range_fault
from .memremap import (ANY_OWNER, MEMORY_DEVICE_PRIVATE, DevPagemap, is_device_private_page,
                       memremap_pages, memunmap_pages)
from .migrate_device import (MIGRATE_PFN_DEVICE, MIGRATE_PFN_LOCKED, MIGRATE_PFN_MIGRATE,
                             MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                             MIGRATE_VMA_SELECT_SYSTEM, VM_SPECIAL, MigrateVma, migrate_pfn_to_pfn,
                             migrate_vma_finalize, migrate_vma_pages, migrate_vma_setup)

_U = np.uint64

# hmm_pfn_t flags of the 2017 include/linux/hmm.h
HMM_PFN_VALID = 1 << 0
HMM_PFN_READ = 1 << 1
HMM_PFN_WRITE = 1 << 2
HMM_PFN_ERROR = 1 << 3
HMM_PFN_EMPTY = 1 << 4
HMM_PFN_SPECIAL = 1 << 5
HMM_PFN_DEVICE_UNADDRESSABLE = 1 << 6
HMM_PFN_SHIFT = 7

HMM_UPDATE_INVALIDATE = 0


def hmm_pfn_t_from_pfn(pfns):
    """hmm_pfn_t_from_pfn(): 2017 hmm_pfn_t entries (pfn << HMM_PFN_SHIFT | HMM_PFN_VALID)."""
    return (np.asarray(pfns, dtype=np.int64).astype(_U) << _U(HMM_PFN_SHIFT)) | _U(HMM_PFN_VALID)


def hmm_pfn_t_to_pfn(entries):
    """hmm_pfn_t_to_pfn(): the pfn of each 2017 entry, -1 where HMM_PFN_VALID is clear."""
    e = np.asarray(entries, dtype=_U)
    return np.where((e & _U(HMM_PFN_VALID)) != 0, (e >> _U(HMM_PFN_SHIFT)).astype(np.int64), -1)


class HmmUpdate:
    """struct hmm_update."""

    __slots__ = ("start", "end", "event", "blockable")

    def __init__(self, start, end, event=HMM_UPDATE_INVALIDATE, blockable=True):
        self.start, self.end, self.event, self.blockable = start, end, event, blockable


class HmmMirror:
    """struct hmm_mirror: ``ops`` has sync_cpu_device_pagetables(mirror, update) (or update()), release()."""

    def __init__(self, ops):
        self.ops = ops
        self.hmm = None


class LegacyRange:
    """The 2017 struct hmm_range: start, end, pfns, and ``valid`` cleared by CPU updates."""

    def __init__(self):
        self.start = self.end = 0
        self.pfns = None
        self.valid = False
        self.vma = None


class Hmm(MmuNotifier):
    """struct hmm: one per mm, the full mmu notifier the mirrors hang off."""

    def __init__(self, mm):
        super().__init__()
        self.mm = mm
        self.owner_mm = mm
        self.lock = threading.Lock()
        self.mirrors = []
        self.ranges = []

    def invalidate_range_start(self, mn, range):
        """The mm's full notifier: mark the ranges being snapshotted invalid, tell the mirrors."""
        with self.lock:
            for r in self.ranges:
                if range.start < r.end and r.start < range.end:
                    r.valid = False
            mirrors = list(self.mirrors)
        update = HmmUpdate(range.start, range.end, HMM_UPDATE_INVALIDATE, mmu_notifier_range_blockable(range))
        for m in mirrors:
            f = getattr(m.ops, "sync_cpu_device_pagetables", None)
            if f is not None:
                f(m, update)
            else:
                m.ops.update(m, HMM_UPDATE_INVALIDATE, range.start, range.end)

    def invalidate_range_end(self, mn, range):
        """Nothing to do: the 2017 mirrors act at the start."""

    def release(self, mn, mm):
        """The mm goes away: every range is invalid and every mirror released."""
        with self.lock:
            for r in self.ranges:
                r.valid = False
            mirrors = list(self.mirrors)
            self.mirrors.clear()
        for m in mirrors:
            f = getattr(m.ops, "release", None)
            if f is not None:
                f(m)


def _hmm_of(mm, create=False):
    h = getattr(mm, "_hmm_legacy", None)
    if h is None and create:
        h = Hmm(mm)
        mm._hmm_legacy = h
        mmu_notifier_register(h, mm)
    return h


def hmm_mirror_register(mirror, mm):
    """hmm_mirror_register(): 0, or -EINVAL."""
    if not isinstance(mm, MM) or not isinstance(mirror, HmmMirror) or mirror.ops is None:
        return -errno.EINVAL
    h = _hmm_of(mm, create=True)
    with h.lock:
        h.mirrors.append(mirror)
    mirror.hmm = h
    return 0


def hmm_mirror_unregister(mirror):
    """hmm_mirror_unregister(): stop mirroring; the last mirror of an mm drops its notifier."""
    h = mirror.hmm
    if h is None:
        return
    with h.lock:
        if mirror in h.mirrors:
            h.mirrors.remove(mirror)
        last = not h.mirrors
    mirror.hmm = None
    if last and h.mm is not None:
        mm = h.mm
        mmu_notifier_unregister(h, mm)     # clears the notifier's mm
        mm._hmm_legacy = None


def _check(vma, start, end, pfns):
    """The caller's arguments: (0, start, end), or (-EINVAL, ...) for a VMA that is not one of
    a live address space, a range not page aligned inside it, a ``pfns`` that is not a uint64
    array of one entry per page, or an mm without a registered mirror."""
    try:
        if not isinstance(vma, VMA) or vma.mm.find_vma(vma.start) is not vma:
            return -errno.EINVAL, 0, 0
        start, end = ulong(start, "start"), ulong(end, "end")
        if vma.vm_flags & VM_SPECIAL:
            return -errno.EINVAL, start, end
        if start < vma.start or start >= vma.end or end <= vma.start or end > vma.end:
            return -errno.EINVAL, start, end
        if start & (PAGE_SIZE - 1) or end & (PAGE_SIZE - 1):
            return -errno.EINVAL, start, end
        pfn_array(pfns, (end - start) >> PAGE_SHIFT, "pfns", start, end)
    except OSError as ex:
        return -ex.errno, 0, 0
    h = _hmm_of(vma.mm)
    if h is None or not h.mirrors:
        return -errno.EINVAL, start, end       # the caller must have registered a mirror
    return 0, start, end


def _snapshot(vma, start, end):
    """The 2017 hmm_vma_walk(): one hmm_pfn_t per page, straight from the PTEs."""
    phys = vma.mm.system.phys
    pte = np.asarray(vma.pte[vma.idx(start):vma.idx(end - 1) + 1], dtype=_U)
    out = np.zeros(pte.size, dtype=_U)
    pfn = pt.pte_pfn(pte)
    present = pt.pte_present(pte)
    out[pte == 0] = _U(HMM_PFN_EMPTY)
    special = present & ((pte & pt.PTE_SPECIAL) != 0)
    norm = present & ~special
    out[norm] = hmm_pfn_t_from_pfn(pfn[norm]) | _U(HMM_PFN_READ) | np.where(
        (pte[norm] & pt.PTE_WRITE) != 0, _U(HMM_PFN_WRITE), _U(0))
    out[special] = _U(HMM_PFN_SPECIAL)
    devp = pt.is_device_private(pte)
    if devp.any():
        w = pt.swp_type(pte[devp]) == pt.SWP_DEVICE_PRIVATE_WRITE
        out[devp] = (hmm_pfn_t_from_pfn(pfn[devp]) | _U(HMM_PFN_READ | HMM_PFN_DEVICE_UNADDRESSABLE)
                     | np.where(w, _U(HMM_PFN_WRITE), _U(0)))
    if phys is None:
        return out
    return out


def _track(vma, range, start, end, pfns):
    h = _hmm_of(vma.mm)
    range.start, range.end, range.pfns, range.vma = start, end, pfns, vma
    with h.lock:
        range.valid = True
        if range not in h.ranges:
            h.ranges.append(range)


def hmm_vma_get_pfns(vma, range, start, end, pfns):
    """hmm_vma_get_pfns(): snapshot [start, end) without faulting; 0, -EINVAL or -EPERM."""
    ret, start, end = _check(vma, start, end, pfns)
    if ret:
        return ret
    if not vma.vm_flags & VM_READ:
        pfns[:(end - start) >> PAGE_SHIFT] = 0
        return -errno.EPERM
    _track(vma, range, start, end, pfns)
    pfns[:(end - start) >> PAGE_SHIFT] = _snapshot(vma, start, end)
    return 0


_retries = range


class _NoopOps:
    def invalidate(self, mni, range, cur_seq):
        mmu_interval_set_seq(mni, cur_seq)
        return True


def hmm_vma_fault(vma, range, start, end, pfns, write, block=True):
    """hmm_vma_fault(): fault in what is missing (and read-only, for a write), then snapshot.

    0, or -EAGAIN (the range was invalidated, call again), -EPERM, -EFAULT, -EINVAL.
    """
    ret, start, end = _check(vma, start, end, pfns)
    if ret:
        return ret
    if not vma.vm_flags & VM_READ:
        pfns[:(end - start) >> PAGE_SHIFT] = 0
        return -errno.EPERM
    mni = MmuIntervalNotifier()
    mmu_interval_notifier_insert(mni, vma.mm, start, end - start, _NoopOps())
    try:
        rng = HmmRange(notifier=mni, start=start, end=end,
                       default_flags=HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0))
        for _ in _retries(HMM_RANGE_DEFAULT_TIMEOUT if block else 1):
            rng.notifier_seq = mmu_interval_read_begin(mni)
            ret = hmm_range_fault(rng)
            if ret != -errno.EBUSY:
                break
    finally:
        mmu_interval_notifier_remove(mni)
    if ret == -errno.EBUSY:
        ret = -errno.EAGAIN
    if ret:
        hmm_vma_range_done(vma, range)
        return ret
    # Track the range from the snapshot on: our own faults (COW breaks) do not invalidate it.
    _track(vma, range, start, end, pfns)
    pfns[:(end - start) >> PAGE_SHIFT] = _snapshot(vma, start, end)
    return 0


def hmm_vma_range_done(vma, range):
    """hmm_vma_range_done(): stop tracking ``range``; True if no CPU update hit it."""
    h = _hmm_of(vma.mm)
    if h is None:
        return False
    with h.lock:
        if range in h.ranges:
            h.ranges.remove(range)
        valid = range.valid
        range.valid = False
    return valid


# -- device memory (section 5) ------------------------------------------------------------------

class HmmDevmem:
    """struct hmm_devmem: ``pfn_first``, ``pfn_last``, ``ops`` (free, fault), ``device``."""

    def __init__(self, ops, device, pagemap):
        self.ops, self.device, self.pagemap = ops, device, pagemap
        self.pfn_first, self.pfn_last = pagemap.pfn_first, pagemap.pfn_last


class _DevmemPagemapOps:
    def __init__(self):
        self.devmem = None

    def page_free(self, pfns):
        self.devmem.ops.free(self.devmem, pfns)

    def migrate_to_ram(self, vmf):
        return self.devmem.ops.fault(self.devmem, vmf.vma, vmf.address, vmf.page, vmf.flags, None)


def hmm_devmem_add(ops, device, size, system=None):
    """hmm_devmem_add(): ``size`` bytes of un-addressable device memory; an HmmDevmem.

    ``system`` defaults to ``device.system``.  Raises OSError like the kernel's ERR_PTR.
    """
    system = system if system is not None else getattr(device, "system", None)
    if system is None or device is None:
        raise oserror(errno.EINVAL, "hmm_devmem_add needs a device (with .system, or a system)")
    size = ulong(size, "size")
    pops = _DevmemPagemapOps()
    pgmap = DevPagemap(MEMORY_DEVICE_PRIVATE, pops, owner=device, nr_pages=-(-size // PAGE_SIZE))
    memremap_pages(pgmap, system)
    devmem = HmmDevmem(ops, device, pgmap)
    pops.devmem = devmem
    return devmem


def hmm_devmem_remove(devmem):
    """hmm_devmem_remove(): every page must be free again (EBUSY otherwise)."""
    memunmap_pages(devmem.pagemap)


# -- migration (section 6) ------------------------------------------------------------------------

def migrate_vma(ops, vma, start, end, src, dst, private=None):
    """The 2017 migrate_vma(): collect, ``ops.alloc_and_copy``, migrate, ``ops.finalize_and_map``.

    ``src``/``dst`` are uint64 arrays of (end - start) / PAGE_SIZE entries.  Any
    system page and any device page is a candidate (2017 had no owners); pages
    that cannot move are skipped, never an error.  Returns 0 or -EINVAL.
    """
    try:
        start, end = ulong(start, "start"), ulong(end, "end")
        if vma is None or start & (PAGE_SIZE - 1) or end & (PAGE_SIZE - 1) or end <= start:
            return -errno.EINVAL
        n = (end - start) >> PAGE_SHIFT
        pfn_array(src, n, "src", start, end)
        pfn_array(dst, n, "dst", start, end)
    except OSError as ex:
        return -ex.errno
    args = MigrateVma(vma, start, end, src=src, dst=dst, pgmap_owner=ANY_OWNER,
                      flags=MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    ret = migrate_vma_setup(args)
    if ret:
        return ret
    if not args.cpages:
        return 0
    # 2017 flags: collected pages are locked; device pages are flagged as such.
    s = src[:n]
    pfn = migrate_pfn_to_pfn(s)
    sel = (s & _U(MIGRATE_PFN_MIGRATE)) != 0
    s[sel & (pfn >= 0)] |= _U(MIGRATE_PFN_LOCKED)
    has = pfn >= 0
    if has.any():
        dev = np.zeros(n, dtype=bool)
        dev[has] = is_device_private_page(vma.mm.system, pfn[has])
        s[dev] |= _U(MIGRATE_PFN_DEVICE)
    ops.alloc_and_copy(vma, src, dst, start, end, private)
    dst[:n] &= ~_U(MIGRATE_PFN_LOCKED | MIGRATE_PFN_DEVICE)
    s &= ~_U(MIGRATE_PFN_LOCKED | MIGRATE_PFN_DEVICE)
    migrate_vma_pages(args)
    ops.finalize_and_map(vma, src, dst, start, end, private)
    migrate_vma_finalize(args)
    return 0
