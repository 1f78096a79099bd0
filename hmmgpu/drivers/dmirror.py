"""dmirror: the kernel's HMM test driver (lib/test_hmm.c), as a Python device driver.

A ``DMirrorDevice`` is one /dev/hmm_dmirrorN, and it drives real (emulated)
hardware: one ``EmulatedDevice`` (hmmgpu/device) whose arena is the device's
memory, either device-private (the CPU cannot address it: pages migrated there
are mapped by device-private swap entries and fault back on CPU access) or
device-coherent (CPU-addressable, mapped by ordinary PTEs).  ``dev.open(proc)``
is open(): a ``DMirror`` bound to that process's address space, with

* an address space of the device of its own (``dev.device.create_context()``),
  as lib/test_hmm.c keeps one page table per open: ``m.pt`` IS that context's
  DevicePageTable, which holds no page references.  The mmu interval notifier
  registered over the whole address space invalidates it (``pt.invalidate_range``
  waits for the device to execute the unmap and for the job slices queued before
  it) and ignores the driver's own MMU_NOTIFY_MIGRATE events, which the
  migration code handles itself;
* read and write as device jobs: the built-in copy job between the mirrored range
  and this open's own bounce buffer (system RAM, as dmirror_bounce_init vmallocs
  one; mapped above every user address in this open's page table only, kept from
  one call to the next and given back at close), translating through ``m.pt``.
  Lanes that miss
  (or write a page mapped read-only) stop and land in the fault buffer; the job's
  service callback is ``dmirror_fault``: the fault/retry loop of
  ``dmirror_range_fault`` (``mmu_interval_read_begin``, ``hmm_range_fault`` under
  mmap_lock, then under the driver lock ``mmu_interval_read_retry`` before the
  device page table is written), whose EFAULT / EPERM cancel the job;
* the other ioctls as methods: migrate_to_dev, migrate_to_sys, snapshot,
  exclusive, check_exclusive, release, set_flags; each returns a
  ``DmirrorResult`` with ``data``, ``cpages`` and ``faults`` (the kernel's
  counters) or raises OSError with the kernel's errno;
* mmap(): a mixed map of zeroed driver pages when the handle is passed as ``fd``.

Device memory is hotplugged in chunks of ``chunk_pages``, each a
``memremap_pages`` of the device's own frames (a slice of its arena, at its pfns),
with a free list of pages and one of 2 MiB folios (``folio_free`` pushes freed
ones back): as in the kernel driver, the chunk a 2 MiB allocation adds goes to
folios, the others to pages.  Migrations ask for whole folios
(MIGRATE_VMA_SELECT_COMPOUND): a THP goes to a device folio and back to a THP,
each mapped by one PMD entry, and a failed 2 MiB allocation (FLAG_FAIL_ALLOC
forces one) takes 512 small pages, so the core splits the source folio; a small
page whose allocation FLAG_FAIL_ALLOC fails stays where it is.
Migrations copy on the device's DMA engine (``device.copy_pages``), one batch
per step.
The loops here are over VMAs, chunks and bounce-buffer pieces; every page-level
step is vectorised.
"""
import errno
import itertools
import threading

import numpy as np

from ..constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, TASK_SIZE
from ..device import EmulatedDevice, JobFault
from ..device.pagetable import PTE_ATOMIC, PTE_VALID, PTE_WRITE, pte_pfn
from ..errors import ProcessKilled, oserror
from ..hmm.debug import check_device_mappings
from ..hmm.exclusive import make_device_exclusive_range
from ..hmm.hmm import (HMM_PFN_ERROR, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID,
                       HMM_PFN_WRITE, HMM_RANGE_DEFAULT_TIMEOUT, HmmRange, hmm_pfn_to_map_order,
                       hmm_pfn_to_pfn, hmm_range_fault)
from ..hmm.memremap import (MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PRIVATE, DevPagemap,
                            is_device_coherent_page, is_device_private_page,
                            memremap_pages, memunmap_pages, pgmap_owner_is, zone_device_folio_init,
                            zone_device_page_init)
from ..hmm.migrate_device import (MIGRATE_PFN_COMPOUND, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_VALID,
                                  MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_COMPOUND,
                                  MIGRATE_VMA_SELECT_DEVICE_COHERENT,
                                  MIGRATE_VMA_SELECT_DEVICE_PRIVATE, MIGRATE_VMA_SELECT_SYSTEM,
                                  MigrateVma, migrate_device_coherent_pages,
                                  migrate_device_finalize, migrate_device_pages,
                                  migrate_device_range, migrate_pfn, migrate_pfn_to_pfn,
                                  migrate_vma_finalize, migrate_vma_pages, migrate_vma_setup)
from ..mm import pgtable as pt
from ..mm.mm import MM
from ..mm.notifier import (MMU_NOTIFY_MIGRATE, MMU_NOTIFY_RELEASE, MmuIntervalNotifier,
                           mmu_interval_notifier_insert, mmu_interval_notifier_remove,
                           mmu_interval_read_begin, mmu_interval_read_retry, mmu_interval_set_seq)
from ..mm.physmem import PG_LOCKED
from ..mm.validate import PTES_PER_PAGE, ULONG_MAX, check_buffer, check_user_range, raw_bytes, ulong
from ..mm.vma import VM_READ, VM_WRITE

_U = np.uint64
_MPFN_VALID = _U(MIGRATE_PFN_VALID)
_MPFN_MIGRATE = _U(MIGRATE_PFN_MIGRATE)
_MPFN_WRITE = _U(MIGRATE_PFN_WRITE)
_MPFN_COMPOUND = _U(MIGRATE_PFN_COMPOUND)
_NOT_MIGRATE = ~_MPFN_MIGRATE
_NR = HPAGE_PMD_NR
_ARANGE = np.arange(_NR, dtype=np.int64)

# HMM_DMIRROR_PROT_* of lib/test_hmm_uapi.h: one byte per page of a snapshot.
PROT_ERROR = 0xFF
PROT_NONE = 0x00
PROT_READ = 0x01
PROT_WRITE = 0x02
PROT_PMD = 0x04
PROT_PUD = 0x08
PROT_ZERO = 0x10
PROT_DEV_PRIVATE_LOCAL = 0x20
PROT_DEV_PRIVATE_REMOTE = 0x30
PROT_DEV_COHERENT_LOCAL = 0x40
PROT_DEV_COHERENT_REMOTE = 0x50

# HMM_DMIRROR_FLAGS: fail the next 2 MiB allocation (device folio on the way in, THP on the
# way back), which then falls back to 512 small pages as the kernel driver does; the flag is
# consumed by the next migration whether or not it had a 2 MiB entry.
FLAG_FAIL_ALLOC = 1 << 0

HMM_DMIRROR_MEMORY_DEVICE_PRIVATE = 1
HMM_DMIRROR_MEMORY_DEVICE_COHERENT = 2

DEVMEM_CHUNK_PAGES = (256 << 20) >> PAGE_SHIFT      # DEVMEM_CHUNK_SIZE, 256 MiB
# The device's memory is fixed when it is built (GPU memory is): max_chunks chunks, 8 unless
# given.  The kernel driver's chunk array starts at DEVMEM_CHUNKS_RESERVE (16) and grows.
DEVMEM_DEFAULT_CHUNKS = 8
DEVMEM_MAX_CHUNKS = 64
FAULT_CHUNK_PAGES = 1 << 14                          # pages per hmm_range_fault (the C driver: 64)
ULONG_MAX_PAGE = (1 << 64) - PAGE_SIZE
USER_VA_END = TASK_SIZE + PAGE_SIZE                  # every user address is below this

# The bounce buffer of read/write (struct dmirror_bounce): system RAM of the open's own, mapped
# at BOUNCE_VA of its address space: above every user address, so no mmu notifier range (they
# are clipped to USER_VA_END) ever unmaps it, and no ioctl can name it (their ranges must lie
# below TASK_SIZE).
BOUNCE_PAGES = 4096                                  # 16 MiB: longer ranges go a piece at a time
BOUNCE_VA = USER_VA_END

# Device page table entry bits (the C driver's xarray tags), as the hardware's PTE bits.  An
# exclusive (atomic) entry is VALID | ATOMIC without WRITE: dmirror_do_write stores only through
# WRITE-tagged entries, so a device write there faults and restores the CPU mapping first.
DPT_VALID = PTE_VALID
DPT_WRITE = PTE_WRITE
DPT_ATOMIC = PTE_ATOMIC


class DmirrorResult:
    """What an ioctl hands back: ``data`` (bytes read), ``cpages``, ``faults``."""

    __slots__ = ("data", "cpages", "faults")

    def __init__(self, data=None, cpages=0, faults=0):
        self.data, self.cpages, self.faults = data, int(cpages), int(faults)

    def __repr__(self):
        n = None if self.data is None else self.data.size
        return f"DmirrorResult(cpages={self.cpages}, faults={self.faults}, data={n} bytes)"


class _FreeList:
    """The free device pages: a stack in one array as large as the device (pages come off the
    top), so a page freed or taken costs the same however many are free."""

    def __init__(self, capacity):
        self.a = np.empty(capacity, dtype=np.int64)
        self.n = 0

    def pages(self):
        return self.a[:self.n]

    def push(self, pfns):
        """Onto the top: the next to come off."""
        self.a[self.n:self.n + pfns.size] = pfns
        self.n += pfns.size

    def push_under(self, pfns):
        """Under every page there: the last to come off."""
        k = pfns.size
        self.a[k:self.n + k] = self.a[:self.n]           # NumPy copies overlapping ranges safely
        self.a[:k] = pfns
        self.n += k

    def pop(self, k):
        """Up to ``k`` pages off the top, the topmost first."""
        k = min(int(k), self.n)
        got = self.a[self.n - k:self.n][::-1].copy()
        self.n -= k
        return got

    def keep(self, mask):
        """Only the pages where ``mask`` (over ``pages()``) is true stay, in order."""
        kept = self.a[:self.n][mask]
        self.a[:kept.size] = kept
        self.n = kept.size


class _Chunk:
    """struct dmirror_chunk: one memremap_pages of device memory (frames of slot ``slot``)."""

    def __init__(self, pgmap, slot):
        self.pgmap = pgmap
        self.slot = slot
        self.remove = False


class _DevmemOps:
    """dmirror_devmem_ops: {.folio_free, .migrate_to_ram}."""

    def __init__(self, mdevice):
        self.mdevice = mdevice

    def folio_free(self, heads, order):
        self.mdevice._devmem_free(heads, order)

    def migrate_to_ram(self, vmf):
        return self.mdevice._devmem_fault(vmf)


_device_ids = itertools.count()


class DMirrorDevice:
    """struct dmirror_device: /dev/hmm_dmirrorN.

    ``self.device`` is its EmulatedDevice: ``max_chunks`` (default DEVMEM_DEFAULT_CHUNKS) slots
    of ``chunk_pages`` frames, hotplugged one chunk at a time as pages are needed.  ``gpu``
    picks the GPU on the CuPy backend.
    """

    def __init__(self, system, memory="private", chunk_pages=DEVMEM_CHUNK_PAGES, max_chunks=None, gpu=0):
        if memory not in ("private", "coherent"):
            raise oserror(errno.EINVAL, f"memory must be 'private' or 'coherent', not {memory!r:.40}")
        self.system = system
        self.memory = memory
        self.zone_device_type = (HMM_DMIRROR_MEMORY_DEVICE_PRIVATE if memory == "private"
                                 else HMM_DMIRROR_MEMORY_DEVICE_COHERENT)
        self.id = next(_device_ids)
        self.chunk_pages = ulong(chunk_pages, "chunk_pages")
        self.max_chunks = DEVMEM_DEFAULT_CHUNKS if max_chunks is None else ulong(max_chunks, "max_chunks")
        if not 0 < self.chunk_pages <= DEVMEM_CHUNK_PAGES or not 0 < self.max_chunks <= DEVMEM_MAX_CHUNKS:
            raise oserror(errno.EINVAL, f"{self.max_chunks} chunks of {self.chunk_pages} pages: at most "
                          f"{DEVMEM_MAX_CHUNKS} chunks of at most {DEVMEM_CHUNK_PAGES} pages")
        self.gpu = gpu
        # The hardware: its arena holds max_chunks chunk slots; its pfns are taken now so that
        # every chunk hotplugs at the pfns its MMU knows.
        phys = system.phys
        nslots = self.max_chunks * self.chunk_pages
        base = phys.request_free_mem_region(nslots)
        # Only address space until a chunk is hotplugged (its memory is committed then), as the
        # C driver allocates a chunk's memory in dmirror_allocate_chunk.
        self.device = EmulatedDevice(system.backend, nslots, base, phys.ram, gpu=gpu,
                                     name=f"dmirror{self.id}", lazy_memory=True)
        self.chunks = []
        self.devmem_lock = threading.Lock()     # protects chunks
        self.lock = threading.Lock()            # protects the free lists and counters
        self._free = _FreeList(nslots)
        self._free_folios = _FreeList(nslots // _NR + 1)    # heads of free 2 MiB folios
        self.calloc = 0
        self.cfree = 0
        self.mirrors = []
        self.ops = _DevmemOps(self)
        # Build a list of free ZONE_DEVICE struct pages.
        self._allocate_chunk()

    def __repr__(self):
        return (f"DMirrorDevice({self.memory}, {len(self.chunks)} chunks, "
                f"{self.nr_allocated()} pages in use)")

    # -- open / close -----------------------------------------------------------------
    def open(self, proc):
        """dmirror_fops_open(): mirror ``proc``'s address space."""
        if not isinstance(getattr(proc, "mm", None), MM):
            raise oserror(errno.EINVAL, f"open() needs a process, not {type(proc).__name__}")
        if not proc.alive or proc.mm.dead:
            raise ProcessKilled(proc.pid, proc.killed_reason or "exited")
        m = DMirror(self, proc)
        with self.lock:
            self.mirrors.append(m)
        return m

    @property
    def is_private(self):
        return self.zone_device_type == HMM_DMIRROR_MEMORY_DEVICE_PRIVATE

    def select_device(self):
        return MIGRATE_VMA_SELECT_DEVICE_PRIVATE if self.is_private else MIGRATE_VMA_SELECT_DEVICE_COHERENT

    # -- device memory ----------------------------------------------------------------
    def nr_allocated(self):
        """Device pages handed out and not yet freed (calloc - cfree)."""
        return self.calloc - self.cfree

    def nr_free(self):
        """Free device pages, those of free folios included."""
        return self._free.n + self._free_folios.n * _NR

    def _allocate_chunk(self, large=False):
        """dmirror_allocate_chunk(): one more memremap_pages; False when out of device memory.
        A chunk taken for a 2 MiB allocation (``large``) goes to the folio free list."""
        used = {c.slot for c in self.chunks}
        slot = next((k for k in range(self.max_chunks) if k not in used), None)
        if slot is None:
            return False
        frame = slot * self.chunk_pages
        try:
            self.device.arena.commit(frame, self.chunk_pages)
        except MemoryError:
            return False
        pgmap = DevPagemap(MEMORY_DEVICE_PRIVATE if self.is_private else MEMORY_DEVICE_COHERENT,
                           self.ops, self, self.chunk_pages, gpu=self.gpu,
                           arena=self.device.arena.sub(frame, self.chunk_pages),
                           pfn_first=self.device.pfn_base + frame)
        try:
            first = memremap_pages(pgmap, self.system)
        except (OSError, MemoryError):
            return False
        self.chunks.append(_Chunk(pgmap, slot))
        pages = np.arange(first, first + self.chunk_pages, dtype=np.int64)
        folios = np.zeros(0, np.int64)
        if large:
            a = (-first) % _NR
            nb = (self.chunk_pages - a) // _NR
            folios = first + a + _NR * np.arange(nb, dtype=np.int64)
            pages = np.concatenate((pages[:a], pages[a + nb * _NR:]))
        with self.lock:
            # pages come off the top of the stack: the new chunk's go under the others,
            # lowest pfn on top
            self._free.push_under(pages[::-1])
            self._free_folios.push_under(folios[::-1])
        return True

    def alloc_pages(self, n):
        """dmirror_devmem_alloc_page() for ``n`` pages: up to n pfns, refcount 1 and locked.
        Out of small pages and chunks, free folios are broken up."""
        n = int(n)
        with self.devmem_lock:
            while self._free.n < n:
                if not self._allocate_chunk():
                    break
            with self.lock:
                short = n - self._free.n
                if short > 0 and self._free_folios.n:
                    heads = self._free_folios.pop(-(-short // _NR))
                    self._free.push(self.system.phys.folio_pages(heads)[::-1])
                got = self._free.pop(n)
                self.calloc += got.size
            # Still under devmem_lock: until its refcount is 1 a page taken off the free list
            # looks free to remove_chunks, which would unplug it under us.
            zone_device_page_init(self.system, got)
        return got

    def alloc_folios(self, n):
        """dmirror_devmem_alloc_page(is_large) for ``n`` 2 MiB folios: up to n heads, each
        folio refcount 1 and locked (zone_device_folio_init)."""
        n = int(n)
        with self.devmem_lock:
            while self._free_folios.n < n:
                if not self._allocate_chunk(large=True):
                    break
            with self.lock:
                if self._free_folios.n < n:
                    # no chunk left to add: whole free 2 MiB blocks among the free small pages
                    f = self._free.pages()
                    blocks, count = np.unique(f >> HPAGE_PMD_ORDER, return_counts=True)
                    whole = blocks[count == _NR][:n - self._free_folios.n]
                    if whole.size:
                        self._free.keep(~np.isin(f >> HPAGE_PMD_ORDER, whole))
                        self._free_folios.push((whole << HPAGE_PMD_ORDER)[::-1])
                got = self._free_folios.pop(n)
                self.calloc += got.size * _NR
            zone_device_folio_init(self.system, got, HPAGE_PMD_ORDER)    # as in alloc_pages
        return got

    def _devmem_free(self, heads, order):
        """dmirror_devmem_free(): the last reference to these folios went."""
        heads = np.asarray(heads, dtype=np.int64)
        with self.lock:
            self.cfree += int(heads.size) << int(order)
            removing = [c.pgmap for c in self.chunks if c.remove]
            if removing:
                keep = np.ones(heads.size, dtype=bool)
                for pgm in removing:
                    keep &= ~((heads >= pgm.pfn_first) & (heads < pgm.pfn_last))
                heads = heads[keep]
            if order == HPAGE_PMD_ORDER:
                self._free_folios.push(heads[::-1])
            elif order == 0:
                self._free.push(heads[::-1])
            else:
                self._free.push(self.system.phys.folio_pages(heads, order)[::-1])

    def _devmem_fault(self, vmf):
        """dmirror_devmem_fault(): migrate_to_ram for a CPU access to device-private pages.

        The kernel driver brings back vmf->address only (the whole folio, at its order, when
        the page is part of a 2 MiB one); the batched vm_fault of hmmgpu lists every faulting
        page of the range, and one migration covers them all (the span from the first to the
        last, widened to the 2 MiB folios among them).
        """
        addrs = np.asarray(vmf.addresses, dtype=np.int64)
        start, end = int(addrs.min()), int(addrs.max()) + PAGE_SIZE
        flags = self.select_device()
        if self.system.phys.pages.order[np.asarray(vmf.pages, dtype=np.int64)].any():
            start = max(vmf.vma.start, start & ~(PMD_SIZE - 1))
            end = min(vmf.vma.end, -(-end // PMD_SIZE) * PMD_SIZE)
            flags |= MIGRATE_VMA_SELECT_COMPOUND
        args = MigrateVma(vmf.vma, start, end, pgmap_owner=self, flags=flags, fault_page=vmf.page)
        if migrate_vma_setup(args):
            return VM_FAULT_SIGBUS
        with _migrating(args):
            ret = self._fault_alloc_and_copy(args, vmf.mm, self._mirror_of(vmf.page), cpu_fault=True)
            if ret:
                return ret
            migrate_vma_pages(args)
            # No device finalize step: _fault_alloc_and_copy already invalidated the
            # device page tables.
        return 0

    def _mirror_of(self, pfn):
        """rpage->zone_device_data: the open that migrated the device page ``pfn`` here."""
        key = int(self.system.phys.pages.zone_device_data[pfn])
        with self.lock:
            return next((m for m in self.mirrors if id(m) == key), None)

    def _fault_alloc_and_copy(self, args, mm, mirror=None, cpu_fault=False):
        """dmirror_devmem_fault_alloc_and_copy(): system pages for device pages, and the copy.

        ``mirror``: the open whose FLAG_FAIL_ALLOC the first page's allocation consumes (the
        one that migrated the faulting page, or HMM_DMIRROR_MIGRATE_TO_SYS's).  A 2 MiB page
        then comes back as 512 small ones; a small page gets VM_FAULT_OOM there.  After a CPU
        fault (``cpu_fault``) the fault is taken again (pagefault_out_of_memory) and, the flag
        spent, succeeds; HMM_DMIRROR_MIGRATE_TO_SYS ignores the return, which leaves that page
        and the rest of the PTRS_PER_PTE pages the C driver migrates in one migrate_vma on the
        device."""
        sel = device_selection(self.system, args.src, args.npages)
        if sel.size == 0:
            return 0
        fail_alloc = mirror is not None and mirror._take_fail_alloc()
        if fail_alloc and not args.src[sel[0]] & _MPFN_COMPOUND:
            fail_alloc = False
            if not cpu_fault:
                sel = sel[sel >= (int(sel[0]) // PTES_PER_PAGE + 1) * PTES_PER_PAGE]
                if sel.size == 0:
                    return 0
        # xa_erase() of the device mappings, in every mirror of this device on that mm
        self._erase_in_mirrors(mm, (args.start >> PAGE_SHIFT) + _positions(args.src, sel, args.npages))
        try:
            self._to_system(args.src, args.dst, sel, args.npages, fail_alloc)
        except OSError:
            return VM_FAULT_OOM
        return 0

    def _to_system(self, src, dst, sel, n, fail_alloc):
        """System memory for the device pages at ``sel``, and the copy (see ``pages_to_system``)."""
        pages_to_system(self.system, self.device, src, dst, sel, n, fail_alloc)

    def _erase_in_mirrors(self, mm, vpns, skip=None):
        """Invalidate the pages ``vpns`` in every open of this device on ``mm`` (but ``skip``):
        they all ignored the MMU_NOTIFY_MIGRATE that carried this device as owner."""
        with self.lock:
            mirrors = [m for m in self.mirrors if m.mm is mm and m is not skip]
        if not mirrors or vpns.size == 0:
            return
        for m in mirrors:
            with m.mutex:
                m.pt.invalidate(vpns)

    def remove_chunks(self):
        """dmirror_device_remove_chunks(): evict every device page to system memory, drop the chunks."""
        with self.devmem_lock:
            for chunk in list(self.chunks):
                with self.lock:
                    chunk.remove = True
                    pgm = chunk.pgmap
                    for fl in (self._free, self._free_folios):
                        f = fl.pages()
                        fl.keep((f < pgm.pfn_first) | (f >= pgm.pfn_last))
                try:
                    self._evict_chunk(chunk)
                    memunmap_pages(chunk.pgmap)
                except OSError:
                    # out of system memory (or a page still busy): keep the chunk in service
                    with self.lock:
                        chunk.remove = False
                        pg = self.system.phys.pages
                        f = np.arange(pgm.pfn_last - 1, pgm.pfn_first - 1, -1, dtype=np.int64)
                        self._free.push_under(f[pg.refcount[f] == 0])
                    self.chunks = [c for c in self.chunks if c.remove is False or c is chunk]
                    raise
            self.chunks = []
            with self.lock:
                self._free.n = 0
                self._free_folios.n = 0

    def _evict_chunk(self, chunk):
        """dmirror_device_evict_chunk(): migrate_device_range over the whole chunk."""
        pgm = chunk.pgmap
        n = pgm.nr_pages
        src = np.zeros(n, dtype=_U)
        dst = np.zeros(n, dtype=_U)
        migrate_device_range(self.system, src, pgm.pfn_first, n)
        sel = device_selection(self.system, src, n)
        if sel.size:
            try:
                self._to_system(src, dst, sel, n, False)
            except BaseException:
                # nothing to move to, or the copy failed: every page stays on the device
                migrate_device_pages(self.system, src, dst, n)
                migrate_device_finalize(self.system, src, dst, n)
                raise
            # No device page table needs fixing here: migrate_device_range unmapped every CPU
            # mapping of these pages under MMU_NOTIFY_CLEAR, which every mirror's notifier
            # applied, and a mirror maps nothing the CPU does not.
        migrate_device_pages(self.system, src, dst, n)
        migrate_device_finalize(self.system, src, dst, n)

    def _forget(self, mirror):
        with self.lock:
            if mirror in self.mirrors:
                self.mirrors.remove(mirror)


VM_FAULT_OOM = 0x1
VM_FAULT_SIGBUS = 0x2


def _pmd_runs(vpns, pfns, w, pmd, device):
    """Positions where 512 entries map one aligned 2 MiB folio at an aligned 2 MiB address with
    one permission (``pmd``: the entries hmm_range_fault gave order 9), in RAM or in this
    device's memory: what a 2 MiB device leaf can map."""
    cand = np.flatnonzero(pmd & ((vpns & (_NR - 1)) == 0) & ((pfns & (_NR - 1)) == 0))
    cand = cand[cand + _NR <= vpns.size]
    if cand.size == 0:
        return cand
    blk = cand[:, None] + _ARANGE
    ok = (pfns[blk] == pfns[cand][:, None] + _ARANGE).all(axis=1) & (w[blk] == w[cand][:, None]).all(axis=1)
    p = pfns[cand]
    ok &= ((p + _NR <= device.nr_ram) | ((p >= device.pfn_base) & (p + _NR <= device.pfn_base + device.nframes)))
    return cand[ok]


def pages_to_system(system, device, src, dst, sel, n, fail_alloc=False):
    """System memory for the device pages at ``sel`` (positions in ``src``) of ``device``, and the
    copy on its DMA engine (every driver of device-private memory brings pages home this way).

    A 2 MiB device folio gets a THP when a free 2 MiB block is left (``fail_alloc`` fails
    the first such allocation), 512 small pages otherwise, and then the core splits it.
    Fills ``dst``; raises OSError(ENOMEM) when system memory runs out."""
    phys = system.phys
    comp = (src[sel] & _MPFN_COMPOUND) != 0
    heads, small = sel[comp], sel[~comp]
    skip = 1 if fail_alloc and heads.size else 0
    got = phys.alloc_folios(heads.size - skip, zero=False) if heads.size > skip else np.zeros(0, np.int64)
    big = heads[skip:skip + got.size]
    rest = np.setdiff1d(heads, big)
    spfn = migrate_pfn_to_pfn(src[:n])
    members = (rest[:, None] + _ARANGE).reshape(-1)
    small_pos = np.concatenate((small, members))
    small_src = np.concatenate((spfn[small], (spfn[rest][:, None] + _ARANGE).reshape(-1)))
    wr = np.concatenate(((src[small] & _MPFN_WRITE) != 0, np.repeat((src[rest] & _MPFN_WRITE) != 0, _NR)))
    try:
        dpages = phys.alloc(small_pos.size, None, zero=False)
    except OSError:
        phys.put(phys.folio_pages(got))
        raise
    new = np.concatenate((phys.folio_pages(got), dpages))
    old = np.concatenate((phys.folio_pages(spfn[big]), small_src))
    phys.pages.flags[new] |= PG_LOCKED
    try:
        # the CPU may touch the new pages as soon as migrate_vma_pages maps them: wait
        device.copy_pages(new, old).wait()
    except BaseException:
        _release_new(phys, new)
        raise
    dst[big] = migrate_pfn(got) | _MPFN_COMPOUND | (src[big] & _MPFN_WRITE)
    dst[small_pos] = migrate_pfn(dpages) | np.where(wr, _MPFN_WRITE, _U(0))


def device_selection(system, src, n):
    """Positions of the src entries that are device pages to bring back (a folio's head)."""
    src = src[:n]
    spfn = migrate_pfn_to_pfn(src)
    sel = np.nonzero((spfn >= 0) & ((src & _MPFN_MIGRATE) != 0))[0]
    sp = spfn[sel]
    return sel[is_device_private_page(system, sp) | is_device_coherent_page(system, sp)]


def _positions(src, sel, n):
    """``sel`` with a COMPOUND entry standing for the 512 positions from it on."""
    comp = sel[(src[sel] & _MPFN_COMPOUND) != 0]
    if comp.size == 0:
        return sel
    members = (comp[:, None] + _ARANGE[1:]).reshape(-1)
    return np.concatenate((sel, members[members < n]))      # disjoint: sel holds heads, not tails


def _release_new(phys, pfns):
    """Give back destination pages that never made it into dst (unlock, drop the reference)."""
    phys.unlock(pfns)
    phys.put(pfns, unique=True)


class _migrating:
    """``with _migrating(args):`` the driver's steps between migrate_vma_setup and
    migrate_vma_finalize, which always runs: pages collected are never left locked
    behind migration entries.  If a step fails before migrate_vma_pages has moved
    anything, the migration is abandoned (every page stays where it was)."""

    def __init__(self, args):
        self.args = args

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        args = self.args
        if typ is not None and not _pages_ran(args):
            args.src[:args.npages] &= _NOT_MIGRATE
        migrate_vma_finalize(args)
        return False


def _pages_ran(args):
    return args._pages_started


def _bounce(parts):
    """The pages read, as one flat uint8 array (no copy when one read covered them all)."""
    if len(parts) == 1:
        return parts[0].reshape(-1)
    return np.concatenate(parts).reshape(-1) if parts else np.zeros(0, np.uint8)


def _err(ret, what, start, end):
    """A negative kernel return as the OSError the contract promises."""
    return oserror(-ret, what, start, end)


class _SnapshotOps:
    """dmirror_mrn_ops: a snapshot only needs the sequence to move."""

    def __init__(self, mirror):
        self.mirror = mirror

    def invalidate(self, mni, range, cur_seq):
        with self.mirror.mutex:
            mmu_interval_set_seq(mni, cur_seq)
        return True


class _DeviceFault:
    """The fault handler of one read or write: dmirror_fault() for its copy jobs' faults.

    Like dmirror_read/dmirror_write, a fault brings in everything from the first page the
    device cannot use to the end of the request, and ``count`` counts those fault-ins
    (``r.faults``).  The first such page is looked for from the start of the running job
    (``start``), not just in the batch: the device records faults in no promised order.  A
    batch whose pages an earlier batch of the same drain brought in needs nothing more.  A
    fault-in that fails cancels the job with its errno (EFAULT: no VMA or PROT_NONE, EPERM: a
    write to a read-only mapping, EBUSY: it kept racing with invalidations).
    """

    def __init__(self, mirror, end, write):
        self.mirror = mirror
        self.start = 0
        self.end = end
        self.write = write
        self.need = _U(DPT_VALID | (DPT_WRITE if write else 0))
        self.count = 0

    def _usable(self, vpns):
        return (self.mirror.pt.lookup(vpns) & self.need) == self.need

    def service(self, faults):
        vpn = faults.vpn
        ok = self._usable(vpn)
        if ok.all():
            return None
        first = int(vpn[~ok].min())
        before = np.arange(self.start >> PAGE_SHIFT, first, dtype=np.int64)
        if before.size:
            ok = self._usable(before)
            if not ok.all():
                first = int(before[np.argmin(ok)])
        ret = self.mirror._fault(first << PAGE_SHIFT, self.end, self.write)
        if ret:
            return np.full(len(faults), -ret, np.int64)
        self.count += 1
        return None


class _NoFault:
    """The handler of dmirror_do_read() alone: every miss is ENOENT."""

    start = 0

    @staticmethod
    def service(faults):
        return np.full(len(faults), errno.ENOENT, np.int64)


class DMirror:
    """struct dmirror: an open dmirror device, bound to one process's address space."""

    def __init__(self, mdevice, proc):
        self.mdevice = mdevice
        self.proc = proc
        self.mm = proc.mm
        self.system = mdevice.system
        # One address space of the device per open; its page table is the mirror's.
        self.ctx = mdevice.device.create_context(
            name=f"{mdevice.device.name}/pid{getattr(proc, 'pid', '?')}")
        self.pt = self.ctx.pt
        self.bounce_lock = threading.Lock()     # one read/write of this open at a time uses it
        self.bounce = np.zeros(0, np.int64)     # pfns of this open's bounce buffer (driver references)
        self.released = False                   # the mirrored address space went (exit_mmap)
        self.mutex = threading.RLock()
        self.flags = 0
        self.closed = False
        self.notifier = MmuIntervalNotifier()
        mmu_interval_notifier_insert(self.notifier, self.mm, 0, ULONG_MAX_PAGE, self)
        check_device_mappings(self.pt, self.notifier, self.system)   # DriverBug on a map without read_retry

    def __repr__(self):
        return f"DMirror({self.mdevice.memory}, pid={getattr(self.proc, 'pid', '?')})"

    # -- the mmu interval notifier (dmirror_min_ops) --------------------------------------
    def invalidate(self, mni, range, cur_seq):
        """dmirror_interval_invalidate()."""
        with self.mutex:
            # The sequence moves for every change, our own migrations' too: a fault-in that
            # read the PTEs before one began must not install what it read.
            mmu_interval_set_seq(mni, cur_seq)
            # Our own migrations drop the device entries of the pages they move (before
            # copying them) and keep the others'.
            if range.event == MMU_NOTIFY_MIGRATE and range.owner is self.mdevice:
                return True
            if range.event == MMU_NOTIFY_RELEASE:
                # exit_mmap(): the process is going, and with it what this open holds for it
                # (an exit closes its files; this handle only answers EINVAL from now on)
                self.released = True
                if self.bounce_lock.acquire(blocking=False):
                    try:
                        self._drop_bounce()
                    finally:
                        self.bounce_lock.release()
            # dmirror_do_update(); returns once the device can no longer use the old entries.
            # Clipped to user addresses: the range may be the whole address space, and the
            # bounce buffer sits above it.
            end = min(range.end, USER_VA_END)
            if range.start < end:
                v0 = range.start >> PAGE_SHIFT
                self.pt.invalidate_range(v0, ((end + PAGE_SIZE - 1) >> PAGE_SHIFT) - v0)
        return True

    # -- file operations ------------------------------------------------------------------
    def close(self):
        """dmirror_fops_release()."""
        if self.closed:
            return
        self.closed = True
        mmu_interval_notifier_remove(self.notifier)
        self.ctx.destroy()                  # empties self.pt and gives its tables back
        with self.bounce_lock:
            self._drop_bounce()
        self.mdevice._forget(self)

    def mmap(self, vma):
        """dmirror_fops_mmap(): fill a mixed map with zeroed driver pages."""
        self._check_open(vma.start, vma.end)
        phys = self.system.phys
        n = vma.npages
        pfns = phys.alloc(n, None, zero=True)
        try:
            vma.mm.vm_insert_pages(vma, vma.start + (np.arange(n, dtype=np.int64) << PAGE_SHIFT), pfns)
        finally:
            phys.put(pfns)      # the mapping holds its own reference

    def _check_open(self, start=None, end=None):
        """A call on a closed file is what a system call on a closed descriptor is: EBADF."""
        if self.closed:
            raise oserror(errno.EBADF, "dmirror file is closed", start, end)

    def _cmd(self, addr, npages):
        """dmirror_fops_unlocked_ioctl()'s checks: the __u64 fields of struct hmm_dmirror_cmd."""
        self._check_open()
        addr = ulong(addr, "address")
        npages = ulong(npages, "page count", addr)
        if addr & (PAGE_SIZE - 1):
            raise oserror(errno.EINVAL, "address is not page aligned", addr)
        end = addr + ((npages << PAGE_SHIFT) & ULONG_MAX)
        if end <= addr or end > ULONG_MAX:             # cmd.addr >= cmd.addr + (npages << PAGE_SHIFT)
            raise oserror(errno.EINVAL, f"bad page count {npages:#x}", addr)
        return addr, end

    def _user(self, start, end, err):
        """What the device may reach is below TASK_SIZE: beyond it there is no VMA, which
        hmm_range_fault answers with EFAULT and vma_lookup() with EINVAL."""
        check_user_range(start, end - start, "range", err)

    def _mm_alive(self, start, end):
        if getattr(self.mm, "dead", False):
            raise oserror(errno.EINVAL, "the mirrored process has exited", start, end)

    # -- device reads and writes ---------------------------------------------------------
    def _device_copy(self, start, end, write, handler, data=None):
        """The device copies [start, end) to (read) or from (``write``) this open's bounce
        buffer: copy jobs in this open's address space, one bounce-buffer piece at a time, faults
        going to ``handler.service`` (``handler.start`` is the piece's start).  Returns the bytes
        read (a read) or None."""
        dev = self.mdevice.device
        piece = BOUNCE_PAGES << PAGE_SHIFT
        parts = []
        with self.bounce_lock:
            bounce = self._bounce_pages(min((end - start) >> PAGE_SHIFT, BOUNCE_PAGES), start, end)
            try:
                for s in range(start, end, piece):         # one iteration per bounce-full
                    e = min(end, s + piece)
                    b = bounce[:(e - s) >> PAGE_SHIFT]
                    handler.start = s
                    if write:
                        i = (s - start) >> PAGE_SHIFT
                        dev.write_pages(b, data[i:i + b.size])
                        self.ctx.jobs.copy(s, BOUNCE_VA, e - s, service=handler.service)
                    else:
                        self.ctx.jobs.copy(BOUNCE_VA, s, e - s, service=handler.service)
                        parts.append(dev.read_pages(b))
            except JobFault as ex:
                what = "write" if write else "read"
                raise oserror(ex.errno, f"device {what} fault at 0x{ex.address:x} could not be serviced",
                              start, end) from ex
            finally:
                if self.released:              # the process exited while we used the buffer
                    self._drop_bounce()
        return None if write else _bounce(parts)

    def _drop_bounce(self):
        """dmirror_bounce_fini() of this open's buffer (bounce_lock held)."""
        self.system.phys.put(self.bounce)
        self.bounce = np.zeros(0, np.int64)

    def _bounce_pages(self, n, start, end):
        """This open's bounce buffer, at least ``n`` pages (dmirror_bounce_init); bounce_lock held.

        System RAM the open keeps (the driver's references) and maps at BOUNCE_VA of its own
        page table only, so nothing in it ever reaches another open or process."""
        if self.bounce.size >= n:
            return self.bounce
        phys = self.system.phys
        try:
            new = phys.alloc(n, None, zero=False)
        except OSError as ex:
            raise oserror(errno.ENOMEM, f"no system memory for a bounce buffer of {n} pages",
                          start, end) from ex
        # the device lets go of the old frames before they are freed
        self.pt.map(np.arange(n, dtype=np.int64) + (BOUNCE_VA >> PAGE_SHIFT), new, PTE_WRITE).wait()
        phys.put(self.bounce)
        self.bounce = new
        return new

    def _read_mapped(self, start, end, why):
        """dmirror_do_read() without faulting: the device reads what its page table maps
        already; a miss is ENOENT (the readback of migrate_to_dev and exclusive)."""
        try:
            return self._device_copy(start, end, False, _NoFault())
        except OSError as ex:
            if ex.errno != errno.ENOENT:
                raise
            raise oserror(errno.ENOENT, f"{why} ({ex.__cause__})", start, end) from None

    def read(self, addr, npages):
        """HMM_DMIRROR_READ: the device reads ``npages`` at ``addr`` through its page table."""
        start, end = self._cmd(addr, npages)
        check_buffer(end - start, self.system.phys, "device read", start, end)
        self._user(start, end, errno.EFAULT)
        self._mm_alive(start, end)
        f = _DeviceFault(self, end, write=False)
        data = self._device_copy(start, end, False, f)
        return DmirrorResult(data, (end - start) >> PAGE_SHIFT, f.count)

    def write(self, addr, data):
        """HMM_DMIRROR_WRITE: the device writes ``data`` (whole pages) at ``addr``."""
        buf = raw_bytes(data, addr if isinstance(addr, int) else None)
        npages = buf.size // PAGE_SIZE
        start, end = self._cmd(addr, npages)
        self._user(start, end, errno.EFAULT)
        self._mm_alive(start, end)
        f = _DeviceFault(self, end, write=True)
        self._device_copy(start, end, True, f, buf[:npages * PAGE_SIZE].reshape(npages, PAGE_SIZE))
        return DmirrorResult(None, npages, f.count)

    # -- the fault path ---------------------------------------------------------------------
    def _fault(self, start, end, write):
        """dmirror_fault(): hmm_range_fault the range in chunks into the device page table;
        0 or a negative errno."""
        rng = HmmRange(notifier=self.notifier, default_flags=HMM_PFN_REQ_FAULT | (
            HMM_PFN_REQ_WRITE if write else 0), pfn_flags_mask=0, dev_private_owner=self.mdevice)
        addr = start
        while addr < end:
            nxt = min(end, addr + (FAULT_CHUNK_PAGES << PAGE_SHIFT))
            rng.start, rng.end = addr, nxt
            rng.hmm_pfns = np.zeros((nxt - addr) >> PAGE_SHIFT, dtype=_U)
            ret = self._range_fault(rng)
            if ret:
                return ret
            addr = nxt
        return 0

    def _range_fault(self, rng):
        """dmirror_range_fault(): the notifier sequence protocol around hmm_range_fault()."""
        mm = self.mm
        for _ in range(HMM_RANGE_DEFAULT_TIMEOUT):
            rng.notifier_seq = mmu_interval_read_begin(rng.notifier)
            with mm.mmap_lock.read():
                ret = hmm_range_fault(rng)
            if ret:
                if ret == -errno.EBUSY:
                    continue
                return ret
            if self._move_unreachable(rng):
                continue                    # the pages moved: the sequence did too
            with self.mutex:
                if mmu_interval_read_retry(rng.notifier, rng.notifier_seq):
                    continue
                return self._do_fault(rng)
        return -errno.EBUSY

    def _move_unreachable(self, rng):
        """Pages the device cannot address -- another device's coherent memory, which the
        kernel driver reads with the CPU -- move to system memory first, as long-term GUP
        moves coherent pages it cannot pin.  True when some did."""
        e = rng.hmm_pfns
        ok = (e & _U(HMM_PFN_VALID)) != 0
        pfns = hmm_pfn_to_pfn(e[ok])
        far = pfns[(pfns >= self.system.phys.nr_ram) & ~self.mdevice.device.owns(pfns)]
        if far.size == 0:
            return False
        migrate_device_coherent_pages(self.system, np.unique(far))
        return True

    def _do_fault(self, rng):
        """dmirror_do_fault(): install what hmm_range_fault returned (driver mutex held)."""
        e = rng.hmm_pfns
        w = (e & _U(HMM_PFN_WRITE)) != 0
        if (rng.default_flags & HMM_PFN_WRITE) and not w.all():
            return -errno.EFAULT
        if ((e & _U(HMM_PFN_ERROR)) != 0).any() or ((e & _U(HMM_PFN_VALID)) == 0).any():
            return -errno.EFAULT
        # queued on the device's in-order queue: the replay that follows translates through it
        vpns = np.arange(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT, dtype=np.int64)
        pfns = hmm_pfn_to_pfn(e)
        if self.mm.maybe_huge:
            # what the CPU maps by a PMD (HMM_PFN_ORDER 9), the device maps by a 2 MiB leaf
            heads = _pmd_runs(vpns, pfns, w, hmm_pfn_to_map_order(e) == HPAGE_PMD_ORDER,
                              self.mdevice.device)
            if heads.size:
                self.pt.map_huge(vpns[heads], pfns[heads], np.where(w[heads], DPT_WRITE, 0))
                rest = np.ones(vpns.size, bool)
                rest[(heads[:, None] + _ARANGE).reshape(-1)] = False
                vpns, pfns, w = vpns[rest], pfns[rest], w[rest]
        if vpns.size:
            self.pt.map(vpns, pfns, np.where(w, DPT_WRITE, 0))
        return 0

    # -- migration ----------------------------------------------------------------------------
    def _vma_pieces(self, start, end):
        """vma_lookup() walk of the C driver: EINVAL at a hole or a VMA without read access."""
        addr = start
        while addr < end:
            vma = self.mm.find_vma(addr)
            if vma is None or not vma.vm_flags & VM_READ:
                raise oserror(errno.EINVAL, "no readable mapping here", addr, end)
            nxt = min(end, vma.end)
            yield vma, addr, nxt
            addr = nxt

    def migrate_to_dev(self, addr, npages):
        """HMM_DMIRROR_MIGRATE_TO_DEV: migrate the range to device memory and read it back."""
        start, end = self._cmd(addr, npages)
        check_buffer(end - start, self.system.phys, "migrate_to_dev readback", start, end)
        self._user(start, end, errno.EINVAL)
        self._mm_alive(start, end)
        with self.mm.mmap_lock.read():
            for vma, s, e in self._vma_pieces(start, end):
                args = MigrateVma(vma, s, e, pgmap_owner=self.mdevice,
                                  flags=MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND)
                ret = migrate_vma_setup(args)
                if ret:
                    raise _err(ret, "migrate_vma_setup failed", s, e)
                with _migrating(args):
                    self._migrate_alloc_and_copy(args)
                    migrate_vma_pages(args)
                    self._migrate_finalize_and_map(args)
        # Return the migrated data for verification, read by the device through its page table.
        data = self._read_back(start, end, "pages are not in device memory (not migratable: "
                               "shared, file-backed or on another device)")
        return DmirrorResult(data, (end - start) >> PAGE_SHIFT)

    def _read_back(self, start, end, why):
        """dmirror_do_read() of what the device page table maps, in one step: the device's MMU
        translates every page (pt.lookup, its walker) and its DMA engine copies the frames out.
        A page with no entry is ENOENT.  The driver mutex keeps invalidations out meanwhile, so
        no page can be freed between the translation and the copy."""
        vpns = np.arange(start >> PAGE_SHIFT, end >> PAGE_SHIFT, dtype=np.int64)
        with self.mutex:
            ent = self.pt.lookup(vpns)
            valid = (ent & _U(DPT_VALID)) != 0
            if np.count_nonzero(valid) < valid.size:
                a = start + (int(np.argmin(valid)) << PAGE_SHIFT)
                raise oserror(errno.ENOENT, f"{why} (no device mapping at 0x{a:x})", start, end)
            return self.mdevice.device.read_pages(pte_pfn(ent)).reshape(-1)

    def _migrate_alloc_and_copy(self, args):
        """dmirror_migrate_alloc_and_copy(): device pages for the collected ones, and the copy.

        A 2 MiB entry (a THP, or a 2 MiB hole) gets a device folio; when that allocation
        fails it gets 512 small pages, and the core splits the source folio.  FLAG_FAIL_ALLOC
        fails the allocation of the first entry, whichever size: a small one is left behind."""
        n = args.npages
        src = args.src[:n]
        spfn = migrate_pfn_to_pfn(src)
        phys = self.system.phys
        # Device pages (ours or another device's) are never copied device to device here.
        idx = (((src & _MPFN_MIGRATE) != 0) & (spfn < phys.nr_ram)).nonzero()[0]
        if idx.size == 0:
            return
        fail = self._take_fail_alloc()
        if fail and not src[idx[0]] & _MPFN_COMPOUND:
            # the first page's allocation fails and a small page has no fallback: it stays
            # where it is (the readback then finds it missing: ENOENT)
            fail = False
            idx = idx[1:]
            if idx.size == 0:
                return
        comp = (src[idx] & _MPFN_COMPOUND) != 0
        if np.count_nonzero(comp):
            big, dheads, small_pos, small_src, small_w = self._alloc_folios_for(idx, comp, spfn, src, fail)
        else:
            big = dheads = np.zeros(0, np.int64)
            small_pos, small_src, small_w = idx, spfn[idx], src[idx]
        dpages = self.mdevice.alloc_pages(small_pos.size)
        if dpages.size < small_pos.size:
            small_pos, small_src, small_w = small_pos[:dpages.size], small_src[:dpages.size], small_w[:dpages.size]
        if big.size:
            big_src = spfn[big][:, None]
            new = np.concatenate((phys.folio_pages(dheads), dpages))
            sp = np.concatenate((np.where(big_src >= 0, big_src + _ARANGE, -1).reshape(-1), small_src))
        else:
            new, sp = dpages, small_src
        if new.size == 0:
            return
        # The pages are about to move: no device may go on using the old ones meanwhile (a store
        # there after the copy would be lost).  A device that faults on them waits for the
        # migration entries to go and finds the pages where they now are.
        moving = small_pos if not big.size else np.concatenate((small_pos, (big[:, None] + _ARANGE).reshape(-1)))
        self.mdevice._erase_in_mirrors(self.mm, (args.start >> PAGE_SHIFT) + moving)
        dev = self.mdevice.device
        with_src = sp >= 0
        every = np.count_nonzero(with_src) == with_src.size
        try:
            # waited for: migrate_vma_finalize frees the source pages, which the CPU may reuse
            # at once
            if every:
                dev.copy_pages(new, sp).wait()
            else:
                if np.count_nonzero(with_src):
                    dev.copy_pages(new[with_src], sp[with_src]).wait()
                dev.fill_pages(new[~with_src], 0)
        except BaseException:
            _release_new(phys, new)
            raise
        hole_w = bool(args.vma.vm_flags & VM_WRITE)      # a hole filled in a writable VMA
        phys.pages.zone_device_data[new] = id(self)
        if big.size:
            bw = ((src[big] & _MPFN_WRITE) != 0) | ((spfn[big] < 0) & hole_w)
            args.dst[big] = migrate_pfn(dheads) | _MPFN_COMPOUND | (bw.astype(_U) << _U(3))
        sw = (small_w & _MPFN_WRITE) != 0
        if not every and hole_w:
            sw |= small_src < 0
        args.dst[small_pos] = migrate_pfn(dpages) | (sw.astype(_U) << _U(3))

    def _alloc_folios_for(self, idx, comp, spfn, src, fail):
        """Device folios for the 2 MiB entries among ``idx``: returns the heads that got one and
        the folios, then every small page wanted -- the small entries and the 512 pages of each
        2 MiB entry left without a folio -- with its source pfn (-1 for a hole) and src flags."""
        heads, small = idx[comp], idx[~comp]
        skip = 1 if fail else 0
        dheads = self.mdevice.alloc_folios(heads.size - skip) if heads.size > skip else np.zeros(0, np.int64)
        big = heads[skip:skip + dheads.size]
        rest = np.setdiff1d(heads, big)
        members = (rest[:, None] + _ARANGE).reshape(-1)
        rest_src = spfn[rest][:, None]
        small_pos = np.concatenate((small, members))
        small_src = np.concatenate((spfn[small], np.where(rest_src >= 0, rest_src + _ARANGE, -1).reshape(-1)))
        small_w = np.concatenate((src[small], np.repeat(src[rest], _NR)))
        return big, dheads, small_pos, small_src, small_w

    def _migrate_finalize_and_map(self, args):
        """dmirror_migrate_finalize_and_map(): map the new device pages in the device page table
        (a 2 MiB folio's 512 pages from its head entry).

        Other opens of this device dropped their entries for the pages before the copy (they
        ignored the MMU_NOTIFY_MIGRATE that carried this device as owner) and fault them in
        again when they need them."""
        src = args.src[:args.npages]
        dst = args.dst[:args.npages]
        dpfn = migrate_pfn_to_pfn(dst)
        sel = (((src & _MPFN_MIGRATE) != 0) & (dpfn >= 0)).nonzero()[0]
        if sel.size == 0:
            return
        pfns = dpfn[sel]
        w = (dst[sel] & _MPFN_WRITE) != 0
        comp = (dst[sel] & _MPFN_COMPOUND) != 0
        vpns = (args.start >> PAGE_SHIFT) + sel
        vma, spfn = args.vma, migrate_pfn_to_pfn(src[sel])
        i0 = vma.idx(args.start)

        def still():
            # behind our migration entries still, or a hole migrate_vma_pages filled with the
            # page (a 2 MiB folio: its head entry)
            cur = vma.pte[i0 + sel]
            moving = pt.is_migration(cur) & (pt.pte_pfn(cur) == spfn)
            return moving | ((spfn < 0) & (cur != 0) & (pt.pte_pfn(cur) == pfns))

        def do_map(ok):
            big = ok & comp
            if big.any():
                # a 2 MiB device folio: one 2 MiB leaf
                self.pt.map_huge(vpns[big], pfns[big], np.where(w[big], DPT_WRITE, 0))
            small = ok & ~comp
            if small.any():
                ws = w[small]
                self.pt.map(vpns[small], pfns[small],
                            DPT_WRITE if np.count_nonzero(ws) == ws.size else np.where(ws, DPT_WRITE, 0))

        self._map_checked(still, do_map)

    def _map_checked(self, check, do_map, tries=HMM_RANGE_DEFAULT_TIMEOUT):
        """Map what a migration or make_device_exclusive just set up, with the interval
        notifier's protocol (the C driver maps under its mutex and trusts the page locks, which
        a zap does not take): after read_begin, under the mutex, a sequence that did not move
        means every invalidation that touched the range has finished, so ``check()`` (the CPU
        entries are still what was set up: a mask) tells the truth, and ``do_map(mask)`` maps
        those.  True when every page was mapped."""
        for _ in range(tries):
            seq = mmu_interval_read_begin(self.notifier)
            with self.mutex:
                if mmu_interval_read_retry(self.notifier, seq):
                    continue
                with self.system.phys.lock:
                    ok = check()
                do_map(ok)
                return bool(ok.all())
        return False

    def migrate_to_sys(self, addr, npages):
        """HMM_DMIRROR_MIGRATE_TO_SYS: bring this device's pages in the range back to system memory."""
        start, end = self._cmd(addr, npages)
        self._user(start, end, errno.EINVAL)
        self._mm_alive(start, end)
        cpages = 0
        with self.mm.mmap_lock.read():
            for vma, s, e in self._vma_pieces(start, end):
                args = MigrateVma(vma, s, e, pgmap_owner=self.mdevice,
                                  flags=self.mdevice.select_device() | MIGRATE_VMA_SELECT_COMPOUND)
                ret = migrate_vma_setup(args)
                if ret:
                    raise _err(ret, "migrate_vma_setup failed", s, e)
                with _migrating(args):
                    ret = self.mdevice._fault_alloc_and_copy(args, self.mm, self)
                    migrate_vma_pages(args)
                    src = args.src[:args.npages]
                    cpages += int((((src & _MPFN_VALID) != 0)
                                   & ((src & _MPFN_MIGRATE) != 0)).sum())
                if ret:
                    raise oserror(errno.ENOMEM, "no system memory to migrate device pages back", s, e)
        return DmirrorResult(None, cpages)

    # -- snapshot -------------------------------------------------------------------------------
    def snapshot(self, addr, npages):
        """HMM_DMIRROR_SNAPSHOT: what the CPU page table says, one byte per page, no faults."""
        start, end = self._cmd(addr, npages)
        check_buffer((end - start) >> PAGE_SHIFT, self.system.phys, "snapshot", start, end)
        self._mm_alive(start, end)
        n = (end - start) >> PAGE_SHIFT
        out = np.zeros(n, dtype=np.uint8)
        cpages = 0
        cur = start
        while cur < end:
            nxt = min(end, cur + (FAULT_CHUNK_PAGES << PAGE_SHIFT))
            rng = HmmRange(start=cur, end=nxt, dev_private_owner=self.mdevice)
            perm = self._range_snapshot(rng)
            out[cpages:cpages + perm.size] = perm
            cpages += perm.size
            cur = nxt
        return DmirrorResult(out, cpages)

    def _range_snapshot(self, rng):
        """dmirror_range_snapshot(): a temporary notifier over the range, then hmm_range_fault."""
        mni = MmuIntervalNotifier()
        mmu_interval_notifier_insert(mni, self.mm, rng.start, rng.end - rng.start, _SnapshotOps(self))
        rng.notifier = mni
        try:
            for _ in range(HMM_RANGE_DEFAULT_TIMEOUT):
                rng.notifier_seq = mmu_interval_read_begin(mni)
                with self.mm.mmap_lock.read():
                    ret = hmm_range_fault(rng)
                if ret:
                    if ret == -errno.EBUSY:
                        continue
                    raise _err(ret, "snapshot failed", rng.start, rng.end)
                with self.mutex:
                    if mmu_interval_read_retry(mni, rng.notifier_seq):
                        continue
                    return self._mkentry(rng.hmm_pfns)
            raise oserror(errno.EBUSY, "snapshot kept racing with invalidations", rng.start, rng.end)
        finally:
            mmu_interval_notifier_remove(mni)

    def _mkentry(self, e):
        """dmirror_mkentry(), for every entry at once."""
        system = self.system
        perm = np.zeros(e.size, dtype=np.uint8)
        valid = (e & _U(HMM_PFN_VALID)) != 0
        err = (e & _U(HMM_PFN_ERROR)) != 0
        v = np.nonzero(valid & ~err)[0]
        if v.size:
            pfn = hmm_pfn_to_pfn(e[v])
            p = np.zeros(v.size, dtype=np.uint8)
            local = pgmap_owner_is(system, pfn, self.mdevice)
            devp = is_device_private_page(system, pfn)
            coh = is_device_coherent_page(system, pfn)
            p[devp] = np.where(local[devp], PROT_DEV_PRIVATE_LOCAL, PROT_DEV_PRIVATE_REMOTE)
            p[coh] = np.where(local[coh], PROT_DEV_COHERENT_LOCAL, PROT_DEV_COHERENT_REMOTE)
            p[~devp & ~coh & (pfn == system.phys.zero_pfn)] = PROT_ZERO
            p |= np.where((e[v] & _U(HMM_PFN_WRITE)) != 0, PROT_WRITE, PROT_READ).astype(np.uint8)
            order = hmm_pfn_to_map_order(e[v])
            p[order + PAGE_SHIFT == 21] |= PROT_PMD
            p[order + PAGE_SHIFT == 30] |= PROT_PUD
            perm[v] = p
        perm[err] = PROT_ERROR
        return perm

    # -- atomics ----------------------------------------------------------------------------------
    def exclusive(self, addr, npages):
        """HMM_DMIRROR_EXCLUSIVE: take the pages for device atomics, then read them back."""
        start, end = self._cmd(addr, npages)
        check_buffer(end - start, self.system.phys, "exclusive readback", start, end)
        self._user(start, end, errno.EFAULT)
        self._mm_alive(start, end)
        phys = self.system.phys
        for _ in range(HMM_RANGE_DEFAULT_TIMEOUT):
            far, mapped = None, False
            with self.mm.mmap_lock.read():
                pfns = make_device_exclusive_range(self.mm, start, end, None)
                if isinstance(pfns, int):
                    raise _err(pfns, "make_device_exclusive failed", start, end)
                got = np.nonzero(pfns >= 0)[0]
                p = pfns[got]
                try:
                    far = p[(p >= phys.nr_ram) & ~self.mdevice.device.owns(p)]
                    if far.size == 0:
                        # one try per round: the loop around makes them exclusive again
                        vpns = (start >> PAGE_SHIFT) + got
                        mapped = self._map_checked(
                            lambda: self._still_exclusive(start, got, p),
                            lambda ok: self.pt.map(vpns[ok], p[ok], DPT_ATOMIC), tries=1)
                finally:
                    # the caller's part of make_device_exclusive(): unlock, drop the references
                    phys.unlock(p)
                    phys.put(p)
            if far.size:
                # Another device's coherent memory, which this device cannot address (the C
                # driver would kmap it): to system RAM first, as a fault-in moves it.
                migrate_device_coherent_pages(self.system, np.unique(far))
            elif mapped:
                break
        else:
            raise oserror(errno.EBUSY, "exclusive kept racing with invalidations", start, end)
        data = self._read_mapped(start, end, "pages could not be made exclusive")
        return DmirrorResult(data, (end - start) >> PAGE_SHIFT)

    def _still_exclusive(self, start, idx, pfns):
        """Which of the pages at ``start + idx`` pages are still the device-exclusive entries of
        ``pfns`` (mmap_lock and the page-table lock held)."""
        addrs = start + (idx << PAGE_SHIFT)
        cur = np.zeros(idx.size, np.uint64)
        for v in self.mm.vmas_in(start, int(addrs[-1]) + PAGE_SIZE) if idx.size else ():
            sel = (addrs >= v.start) & (addrs < v.end)
            cur[sel] = v.pte[(addrs[sel] - v.start) >> PAGE_SHIFT]
        return pt.is_device_exclusive(cur) & (pt.pte_pfn(cur) == pfns)

    def check_exclusive(self, addr, npages):
        """HMM_DMIRROR_CHECK_EXCLUSIVE: EPERM while any page is still mapped for atomics."""
        start, end = self._cmd(addr, npages)
        # The device maps nothing where the CPU maps nothing: look where the VMAs are only.
        natomic, first = 0, None
        with self.mm.mmap_lock.read(), self.mutex:
            for v in self.mm.vmas_in(start, min(end, USER_VA_END)):
                s, e = max(v.start, start), min(v.end, end)
                ent = self.pt.lookup(np.arange(s >> PAGE_SHIFT, e >> PAGE_SHIFT, dtype=np.int64))
                atomic = (ent & _U(DPT_ATOMIC)) != 0
                if atomic.any():
                    natomic += int(atomic.sum())
                    first = first if first is not None else s + (int(np.argmax(atomic)) << PAGE_SHIFT)
        if natomic:
            raise oserror(errno.EPERM, f"{natomic} pages still mapped for device atomics "
                          f"(first at 0x{first:x})", start, end)
        return DmirrorResult(None, 0)

    # -- device-wide ------------------------------------------------------------------------------
    def release(self):
        """HMM_DMIRROR_RELEASE: evict every page of the device back to system memory."""
        self._check_open()
        self.mdevice.remove_chunks()
        return DmirrorResult(None, 0)

    def _take_fail_alloc(self):
        """FLAG_FAIL_ALLOC fails the next device or system page allocation of this open, once:
        True if it was set (and now is not)."""
        fail = bool(self.flags & FLAG_FAIL_ALLOC)
        self.flags &= ~FLAG_FAIL_ALLOC
        return fail

    def set_flags(self, flags):
        """HMM_DMIRROR_FLAGS."""
        self._check_open()
        self.flags = ulong(flags, "flags")
        return DmirrorResult(None, 0)
