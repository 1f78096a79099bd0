"""dmirror: the kernel's HMM test driver (lib/test_hmm.c), as a Python device driver.

A ``DMirrorDevice`` is one /dev/hmm_dmirrorN: a device with its own memory,
either device-private (the CPU cannot address it: pages migrated there are
mapped by device-private swap entries and fault back on CPU access) or
device-coherent (CPU-addressable, mapped by ordinary PTEs).  ``dev.open(proc)``
is open(): a ``DMirror`` bound to that process's address space, with

* a device page table of its own (``MirrorPageTable``), which holds no page
  references: the mmu interval notifier registered over the whole address
  space clears entries when they become stale (and ignores the driver's own
  MMU_NOTIFY_MIGRATE events, which the migration code handles itself);
* the fault/retry loop of ``dmirror_range_fault``: ``mmu_interval_read_begin``,
  ``hmm_range_fault`` under mmap_lock, then under the driver lock
  ``mmu_interval_read_retry`` before the device page table is updated;
* the ioctls as methods: read, write, migrate_to_dev, migrate_to_sys, snapshot,
  exclusive, check_exclusive, release, set_flags; each returns a
  ``DmirrorResult`` with ``data``, ``cpages`` and ``faults`` (the kernel's
  counters) or raises OSError with the kernel's errno;
* mmap(): a mixed map of zeroed driver pages when the handle is passed as ``fd``.

Device memory comes in chunks of DEVMEM_CHUNK_PAGES, each a ``memremap_pages``
of its own, with a free list of pages (``page_free`` pushes freed pages back).
Data moves through ``phys.copy``: one DMA-engine batch per migration step.
The loops here are over VMAs and chunks; every page-level step is vectorised.
"""
import errno
import itertools
import threading

import numpy as np

from ..constants import PAGE_SHIFT, PAGE_SIZE
from ..errors import oserror
from ..hmm.exclusive import make_device_exclusive_range
from ..hmm.hmm import (HMM_PFN_ERROR, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID,
                       HMM_PFN_WRITE, HMM_RANGE_DEFAULT_TIMEOUT, HmmRange, hmm_pfn_to_map_order,
                       hmm_pfn_to_pfn, hmm_range_fault)
from ..hmm.memremap import (MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PRIVATE, DevPagemap,
                            is_device_coherent_page, is_device_private_page, is_zone_device_page,
                            memremap_pages, memunmap_pages, pgmap_owner_is, zone_device_page_init)
from ..hmm.migrate_device import (MIGRATE_PFN_MIGRATE, MIGRATE_PFN_VALID, MIGRATE_PFN_WRITE,
                                  MIGRATE_VMA_SELECT_DEVICE_COHERENT,
                                  MIGRATE_VMA_SELECT_DEVICE_PRIVATE, MIGRATE_VMA_SELECT_SYSTEM,
                                  MigrateVma, migrate_device_finalize, migrate_device_pages,
                                  migrate_device_range, migrate_pfn, migrate_pfn_to_pfn,
                                  migrate_vma_finalize, migrate_vma_pages, migrate_vma_setup)
from ..mm.notifier import (MMU_NOTIFY_MIGRATE, MmuIntervalNotifier, mmu_interval_notifier_insert,
                           mmu_interval_notifier_remove, mmu_interval_read_begin,
                           mmu_interval_read_retry, mmu_interval_set_seq)
from ..mm.physmem import PG_LOCKED
from ..mm.vma import VM_READ, VM_WRITE

_U = np.uint64

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

# HMM_DMIRROR_FLAGS: fail the next device (huge) page allocation.  Without THP
# the allocation falls back to small pages, as the kernel driver does.
FLAG_FAIL_ALLOC = 1 << 0

HMM_DMIRROR_MEMORY_DEVICE_PRIVATE = 1
HMM_DMIRROR_MEMORY_DEVICE_COHERENT = 2

DEVMEM_CHUNK_PAGES = (256 << 20) >> PAGE_SHIFT      # DEVMEM_CHUNK_SIZE, 256 MiB
FAULT_CHUNK_PAGES = 1 << 14                          # pages per hmm_range_fault (the C driver: 64)
ULONG_MAX_PAGE = (1 << 64) - PAGE_SIZE

# Device page table entries (the C driver's xarray tags, as bits).
DPT_VALID = 1
DPT_WRITE = 2
DPT_ATOMIC = 4
_DPT_SHIFT = 12
_LEAF_BITS = 9
_LEAF = 1 << _LEAF_BITS


class DmirrorResult:
    """What an ioctl hands back: ``data`` (bytes read), ``cpages``, ``faults``."""

    __slots__ = ("data", "cpages", "faults")

    def __init__(self, data=None, cpages=0, faults=0):
        self.data, self.cpages, self.faults = data, int(cpages), int(faults)

    def __repr__(self):
        n = None if self.data is None else self.data.size
        return f"DmirrorResult(cpages={self.cpages}, faults={self.faults}, data={n} bytes)"


class MirrorPageTable:
    """The mirror's device page table: sorted leaf keys + a (nleaves, 512) uint64 array.

    Every lookup, store and range erase is a vectorised searchsorted over the
    leaf keys; no per-page Python objects, no dict.  Like the C driver's
    xarray it holds no page references.
    """

    def __init__(self):
        self.keys = np.zeros(0, dtype=np.int64)
        self.leaves = np.zeros((0, _LEAF), dtype=_U)

    def _locate(self, vpns):
        blk = vpns >> _LEAF_BITS
        pos = np.searchsorted(self.keys, blk)
        ok = pos < self.keys.size
        ok[ok] = self.keys[pos[ok]] == blk[ok]
        return pos, ok

    def lookup(self, vpns):
        vpns = np.asarray(vpns, dtype=np.int64)
        out = np.zeros(vpns.size, dtype=_U)
        if self.keys.size == 0 or vpns.size == 0:
            return out
        pos, ok = self._locate(vpns)
        out[ok] = self.leaves[pos[ok], vpns[ok] & (_LEAF - 1)]
        return out

    def store(self, vpns, entries):
        vpns = np.asarray(vpns, dtype=np.int64)
        if vpns.size == 0:
            return
        blk = vpns >> _LEAF_BITS
        if blk.size > 1 and (blk[1:] >= blk[:-1]).all():      # sorted: the common case
            blk = blk[np.concatenate(([True], blk[1:] != blk[:-1]))]
        else:
            blk = np.unique(blk)
        new = blk[~self._locate(blk << _LEAF_BITS)[1]] if self.keys.size else blk
        if new.size:
            keys = np.concatenate((self.keys, new))
            order = np.argsort(keys, kind="stable")
            leaves = np.concatenate((self.leaves, np.zeros((new.size, _LEAF), dtype=_U)))
            self.keys, self.leaves = keys[order], leaves[order]
        pos, _ = self._locate(vpns)
        self.leaves[pos, vpns & (_LEAF - 1)] = entries

    def erase_range(self, start, end):
        """Clear every entry for addresses in [start, end)."""
        if self.keys.size == 0 or end <= start:
            return
        v0, v1 = start >> PAGE_SHIFT, -(-end // PAGE_SIZE)
        b0, b1 = v0 >> _LEAF_BITS, (v1 - 1) >> _LEAF_BITS
        i0 = int(np.searchsorted(self.keys, b0))
        i1 = int(np.searchsorted(self.keys, b1, side="right"))
        if i0 >= i1:
            return
        vpn = (self.keys[i0:i1, None] << _LEAF_BITS) + np.arange(_LEAF, dtype=np.int64)
        rows = self.leaves[i0:i1]
        rows[(vpn >= v0) & (vpn < v1)] = 0

    def erase_pfns(self, pfns):
        """Clear every entry that points at one of ``pfns``."""
        if self.keys.size == 0:
            return
        ent = self.leaves
        hit = ((ent & _U(DPT_VALID)) != 0) & np.isin((ent >> _U(_DPT_SHIFT)).astype(np.int64), pfns)
        ent[hit] = 0

    def count(self):
        return int(((self.leaves & _U(DPT_VALID)) != 0).sum())


class _Chunk:
    """struct dmirror_chunk: one memremap_pages of device memory."""

    def __init__(self, pgmap):
        self.pgmap = pgmap
        self.remove = False


class _DevmemOps:
    """dmirror_devmem_ops: {.page_free, .migrate_to_ram}."""

    def __init__(self, mdevice):
        self.mdevice = mdevice

    def page_free(self, pfns):
        self.mdevice._devmem_free(pfns)

    def migrate_to_ram(self, vmf):
        return self.mdevice._devmem_fault(vmf)


_device_ids = itertools.count()


class DMirrorDevice:
    """struct dmirror_device: /dev/hmm_dmirrorN."""

    def __init__(self, system, memory="private", chunk_pages=DEVMEM_CHUNK_PAGES, max_chunks=None, gpu=0):
        if memory not in ("private", "coherent"):
            raise ValueError(f"memory must be 'private' or 'coherent', not {memory!r}")
        self.system = system
        self.memory = memory
        self.zone_device_type = (HMM_DMIRROR_MEMORY_DEVICE_PRIVATE if memory == "private"
                                 else HMM_DMIRROR_MEMORY_DEVICE_COHERENT)
        self.id = next(_device_ids)
        self.chunk_pages = int(chunk_pages)
        self.max_chunks = max_chunks
        self.gpu = gpu
        self.chunks = []
        self.devmem_lock = threading.Lock()     # protects chunks
        self.lock = threading.Lock()            # protects the free list and counters
        self._free = np.zeros(0, dtype=np.int64)
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
        return int(self._free.size)

    def _allocate_chunk(self):
        """dmirror_allocate_chunk(): one more memremap_pages; False when out of device memory."""
        if self.max_chunks is not None and len(self.chunks) >= self.max_chunks:
            return False
        pgmap = DevPagemap(MEMORY_DEVICE_PRIVATE if self.is_private else MEMORY_DEVICE_COHERENT,
                           self.ops, self, self.chunk_pages, gpu=self.gpu)
        try:
            first = memremap_pages(pgmap, self.system)
        except (OSError, MemoryError):
            return False
        self.chunks.append(_Chunk(pgmap))
        with self.lock:
            # pages come off the end of the stack: keep low pfns first
            self._free = np.concatenate((np.arange(first + self.chunk_pages - 1, first - 1, -1,
                                                   dtype=np.int64), self._free))
        return True

    def alloc_pages(self, n):
        """dmirror_devmem_alloc_page() for ``n`` pages: up to n pfns, refcount 1 and locked."""
        n = int(n)
        with self.devmem_lock:
            while self.nr_free() < n:
                if not self._allocate_chunk():
                    break
            with self.lock:
                k = min(n, self._free.size)
                got = self._free[self._free.size - k:][::-1].copy()
                self._free = self._free[:self._free.size - k]
                self.calloc += k
        zone_device_page_init(self.system, got)
        return got

    def _devmem_free(self, pfns):
        """dmirror_devmem_free(): a device page's last reference went."""
        pfns = np.asarray(pfns, dtype=np.int64)
        with self.lock:
            self.cfree += int(pfns.size)
            removing = [c.pgmap for c in self.chunks if c.remove]
            if removing:
                keep = np.ones(pfns.size, dtype=bool)
                for pgm in removing:
                    keep &= ~((pfns >= pgm.pfn_first) & (pfns < pgm.pfn_last))
                pfns = pfns[keep]
            self._free = np.concatenate((self._free, pfns[::-1]))

    def _devmem_fault(self, vmf):
        """dmirror_devmem_fault(): migrate_to_ram for a CPU access to device-private pages.

        The kernel driver brings back vmf->address only; the batched vm_fault of
        hmmgpu lists every faulting page of the range, and one migration covers
        them all (the span from the first to the last).
        """
        addrs = np.asarray(vmf.addresses, dtype=np.int64)
        args = MigrateVma(vmf.vma, int(addrs.min()), int(addrs.max()) + PAGE_SIZE,
                          pgmap_owner=self, flags=self.select_device(), fault_page=vmf.page)
        if migrate_vma_setup(args):
            return VM_FAULT_SIGBUS
        with _migrating(args):
            ret = self._fault_alloc_and_copy(args, vmf.mm)
            if ret:
                return ret
            migrate_vma_pages(args)
            # No device finalize step: _fault_alloc_and_copy already invalidated the
            # device page tables.
        return 0

    def _fault_alloc_and_copy(self, args, mm):
        """dmirror_devmem_fault_alloc_and_copy(): system pages for device pages, and the copy."""
        src = args.src[:args.npages]
        spfn = migrate_pfn_to_pfn(src)
        sel = np.nonzero((spfn >= 0) & ((src & _U(MIGRATE_PFN_MIGRATE)) != 0))[0]
        if sel.size == 0:
            return 0
        sp = spfn[sel]
        devok = is_device_private_page(self.system, sp) | is_device_coherent_page(self.system, sp)
        sel, sp = sel[devok], sp[devok]
        phys = self.system.phys
        try:
            dpages = phys.alloc(sel.size, None, zero=False)
        except OSError:
            return VM_FAULT_OOM
        phys.pages.flags[dpages] |= PG_LOCKED
        addrs = args.start + (sel << PAGE_SHIFT)
        # xa_erase() of the device mappings, in every mirror of this device on that mm
        self._erase_in_mirrors(mm, addrs)
        try:
            phys.copy(dpages, sp)
        except BaseException:
            _release_new(phys, dpages)
            raise
        wr = (src[sel] & _U(MIGRATE_PFN_WRITE)) != 0
        args.dst[sel] = migrate_pfn(dpages) | np.where(wr, _U(MIGRATE_PFN_WRITE), _U(0))
        return 0

    def _erase_in_mirrors(self, mm, addrs, skip=None):
        with self.lock:
            mirrors = [m for m in self.mirrors if m.mm is mm and m is not skip]
        if not mirrors or addrs.size == 0:
            return
        vpns = addrs >> PAGE_SHIFT
        for m in mirrors:
            with m.mutex:
                ent = m.pt.lookup(vpns)
                live = ent != 0
                if live.any():
                    m.pt.store(vpns[live], _U(0))

    def remove_chunks(self):
        """dmirror_device_remove_chunks(): evict every device page to system memory, drop the chunks."""
        with self.devmem_lock:
            for chunk in list(self.chunks):
                with self.lock:
                    chunk.remove = True
                    pgm = chunk.pgmap
                    f = self._free
                    self._free = f[(f < pgm.pfn_first) | (f >= pgm.pfn_last)]
                try:
                    self._evict_chunk(chunk)
                    memunmap_pages(chunk.pgmap)
                except OSError:
                    # out of system memory (or a page still busy): keep the chunk in service
                    with self.lock:
                        chunk.remove = False
                        pg = self.system.phys.pages
                        f = np.arange(pgm.pfn_last - 1, pgm.pfn_first - 1, -1, dtype=np.int64)
                        self._free = np.concatenate((f[pg.refcount[f] == 0], self._free))
                    self.chunks = [c for c in self.chunks if c.remove is False or c is chunk]
                    raise
            self.chunks = []
            with self.lock:
                self._free = np.zeros(0, dtype=np.int64)

    def _evict_chunk(self, chunk):
        """dmirror_device_evict_chunk(): migrate_device_range over the whole chunk."""
        pgm = chunk.pgmap
        n = pgm.nr_pages
        src = np.zeros(n, dtype=_U)
        dst = np.zeros(n, dtype=_U)
        migrate_device_range(self.system, src, pgm.pfn_first, n)
        spfn = migrate_pfn_to_pfn(src)
        sel = np.nonzero((spfn >= 0) & ((src & _U(MIGRATE_PFN_MIGRATE)) != 0))[0]
        if sel.size:
            phys = self.system.phys
            try:
                dpages = phys.alloc(sel.size, None, zero=False)
            except OSError:
                # nothing to move to: every page stays on the device
                migrate_device_pages(self.system, src, dst, n)
                migrate_device_finalize(self.system, src, dst, n)
                raise
            phys.pages.flags[dpages] |= PG_LOCKED
            phys.copy(dpages, spfn[sel])
            wr = (src[sel] & _U(MIGRATE_PFN_WRITE)) != 0
            dst[sel] = migrate_pfn(dpages) | np.where(wr, _U(MIGRATE_PFN_WRITE), _U(0))
            with self.lock:
                mirrors = list(self.mirrors)
            for m in mirrors:
                with m.mutex:
                    m.pt.erase_pfns(spfn[sel])
        migrate_device_pages(self.system, src, dst, n)
        migrate_device_finalize(self.system, src, dst, n)

    def _forget(self, mirror):
        with self.lock:
            if mirror in self.mirrors:
                self.mirrors.remove(mirror)


VM_FAULT_OOM = 0x1
VM_FAULT_SIGBUS = 0x2


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
            args.src[:args.npages] &= ~_U(MIGRATE_PFN_MIGRATE)
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


class DMirror:
    """struct dmirror: an open dmirror device, bound to one process's address space."""

    def __init__(self, mdevice, proc):
        self.mdevice = mdevice
        self.proc = proc
        self.mm = proc.mm
        self.system = mdevice.system
        self.pt = MirrorPageTable()
        self.mutex = threading.RLock()
        self.flags = 0
        self.closed = False
        self.notifier = MmuIntervalNotifier()
        mmu_interval_notifier_insert(self.notifier, self.mm, 0, ULONG_MAX_PAGE, self)

    def __repr__(self):
        return f"DMirror({self.mdevice.memory}, pid={getattr(self.proc, 'pid', '?')})"

    # -- the mmu interval notifier (dmirror_min_ops) --------------------------------------
    def invalidate(self, mni, range, cur_seq):
        """dmirror_interval_invalidate()."""
        # Our own migrations handle the device page table themselves.
        if range.event == MMU_NOTIFY_MIGRATE and range.owner is self.mdevice:
            return True
        with self.mutex:
            mmu_interval_set_seq(mni, cur_seq)
            self.pt.erase_range(range.start, range.end)
        return True

    # -- file operations ------------------------------------------------------------------
    def close(self):
        """dmirror_fops_release()."""
        if self.closed:
            return
        self.closed = True
        mmu_interval_notifier_remove(self.notifier)
        self.pt = MirrorPageTable()
        self.mdevice._forget(self)

    def mmap(self, vma):
        """dmirror_fops_mmap(): fill a mixed map with zeroed driver pages."""
        phys = self.system.phys
        n = vma.npages
        pfns = phys.alloc(n, None, zero=True)
        try:
            vma.mm.vm_insert_pages(vma, vma.start + (np.arange(n, dtype=np.int64) << PAGE_SHIFT), pfns)
        finally:
            phys.put(pfns)      # the mapping holds its own reference

    def _cmd(self, addr, npages):
        """dmirror_fops_unlocked_ioctl()'s checks."""
        if self.closed:
            raise oserror(errno.EINVAL, "dmirror file is closed")
        addr, npages = int(addr), int(npages)
        if addr & (PAGE_SIZE - 1):
            raise oserror(errno.EINVAL, "address is not page aligned", addr)
        if npages <= 0 or addr + (npages << PAGE_SHIFT) >= 1 << 64:
            raise oserror(errno.EINVAL, f"bad page count {npages}", addr)
        return addr, addr + (npages << PAGE_SHIFT)

    def _mm_alive(self, start, end):
        if getattr(self.mm, "dead", False):
            raise oserror(errno.EINVAL, "the mirrored process has exited", start, end)

    # -- device reads and writes ---------------------------------------------------------
    def _do_read(self, start, end, parts):
        """dmirror_do_read(): copy what the device page table maps (appended to ``parts``);
        returns the number of pages copied."""
        vpns = np.arange(start >> PAGE_SHIFT, end >> PAGE_SHIFT, dtype=np.int64)
        ent = self.pt.lookup(vpns)
        ok = (ent & _U(DPT_VALID)) != 0
        k = vpns.size if ok.all() else int(np.argmin(ok))
        if k:
            pfns = (ent[:k] >> _U(_DPT_SHIFT)).astype(np.int64)
            parts.append(self.system.phys.read(pfns))
        return k

    def _do_write(self, start, end, bounce, done):
        """dmirror_do_write(): store through entries tagged writable; returns pages written."""
        vpns = np.arange(start >> PAGE_SHIFT, end >> PAGE_SHIFT, dtype=np.int64)
        ent = self.pt.lookup(vpns)
        ok = (ent & _U(DPT_VALID | DPT_WRITE | DPT_ATOMIC)) == _U(DPT_VALID | DPT_WRITE)
        k = vpns.size if ok.all() else int(np.argmin(ok))
        if k:
            pfns = (ent[:k] >> _U(_DPT_SHIFT)).astype(np.int64)
            self.system.phys.write(pfns, bounce[done:done + k])
        return k

    def read(self, addr, npages):
        """HMM_DMIRROR_READ: the device reads ``npages`` at ``addr`` through its page table."""
        start, end = self._cmd(addr, npages)
        self._mm_alive(start, end)
        n = (end - start) >> PAGE_SHIFT
        parts = []
        cpages = faults = 0
        cur = start
        while True:
            with self.mutex:
                cpages += self._do_read(cur, end, parts)
            if cpages == n:
                break
            cur = start + (cpages << PAGE_SHIFT)
            self._fault(cur, end, write=False)
            faults += 1
        return DmirrorResult(_bounce(parts), cpages, faults)

    def write(self, addr, data):
        """HMM_DMIRROR_WRITE: the device writes ``data`` (whole pages) at ``addr``."""
        buf = np.ascontiguousarray(np.asarray(data)).view(np.uint8).reshape(-1) if isinstance(
            data, np.ndarray) else np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        npages = buf.size // PAGE_SIZE
        start, end = self._cmd(addr, npages)
        self._mm_alive(start, end)
        bounce = buf[:npages * PAGE_SIZE].reshape(npages, PAGE_SIZE)
        cpages = faults = 0
        cur = start
        while True:
            with self.mutex:
                cpages += self._do_write(cur, end, bounce, cpages)
            if cpages == npages:
                break
            cur = start + (cpages << PAGE_SHIFT)
            self._fault(cur, end, write=True)
            faults += 1
        return DmirrorResult(None, cpages, faults)

    # -- the fault path ---------------------------------------------------------------------
    def _fault(self, start, end, write):
        """dmirror_fault(): hmm_range_fault the range in chunks into the device page table."""
        rng = HmmRange(notifier=self.notifier, default_flags=HMM_PFN_REQ_FAULT | (
            HMM_PFN_REQ_WRITE if write else 0), pfn_flags_mask=0, dev_private_owner=self.mdevice)
        addr = start
        while addr < end:
            nxt = min(end, addr + (FAULT_CHUNK_PAGES << PAGE_SHIFT))
            rng.start, rng.end = addr, nxt
            rng.hmm_pfns = np.zeros((nxt - addr) >> PAGE_SHIFT, dtype=_U)
            ret = self._range_fault(rng)
            if ret:
                raise _err(ret, "device %s fault" % ("write" if write else "read"), addr, nxt)
            addr = nxt

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
            with self.mutex:
                if mmu_interval_read_retry(rng.notifier, rng.notifier_seq):
                    continue
                return self._do_fault(rng)
        return -errno.EBUSY

    def _do_fault(self, rng):
        """dmirror_do_fault(): install what hmm_range_fault returned (driver mutex held)."""
        e = rng.hmm_pfns
        w = (e & _U(HMM_PFN_WRITE)) != 0
        if (rng.default_flags & HMM_PFN_WRITE) and not w.all():
            return -errno.EFAULT
        if ((e & _U(HMM_PFN_ERROR)) != 0).any() or ((e & _U(HMM_PFN_VALID)) == 0).any():
            return -errno.EFAULT
        pfns = hmm_pfn_to_pfn(e)
        ent = (pfns.astype(_U) << _U(_DPT_SHIFT)) | _U(DPT_VALID) | np.where(w, _U(DPT_WRITE), _U(0))
        self.pt.store(np.arange(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT, dtype=np.int64), ent)
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
        self._mm_alive(start, end)
        with self.mm.mmap_lock.read():
            for vma, s, e in self._vma_pieces(start, end):
                args = MigrateVma(vma, s, e, pgmap_owner=self.mdevice, flags=MIGRATE_VMA_SELECT_SYSTEM)
                ret = migrate_vma_setup(args)
                if ret:
                    raise _err(ret, "migrate_vma_setup failed", s, e)
                with _migrating(args):
                    self._migrate_alloc_and_copy(args)
                    migrate_vma_pages(args)
                    self._migrate_finalize_and_map(args)
        # Return the migrated data for verification.
        n = (end - start) >> PAGE_SHIFT
        parts = []
        with self.mutex:
            cpages = self._do_read(start, end, parts)
        if cpages < n:
            raise oserror(errno.ENOENT, f"{n - cpages} pages are not in device memory "
                          "(not migratable: shared, file-backed or on another device)", start, end)
        return DmirrorResult(_bounce(parts), cpages)

    def _migrate_alloc_and_copy(self, args):
        """dmirror_migrate_alloc_and_copy(): device pages for the collected ones, and the copy."""
        src = args.src[:args.npages]
        sel = (src & _U(MIGRATE_PFN_MIGRATE)) != 0
        spfn = migrate_pfn_to_pfn(src)
        has = spfn >= 0
        if has.any():
            # Device pages (ours or another device's) are never copied device to device here.
            zd = np.zeros(src.size, dtype=bool)
            zd[has] = is_zone_device_page(self.system, spfn[has])
            sel &= ~zd
        idx = np.nonzero(sel)[0]
        if idx.size == 0:
            return
        if self.flags & FLAG_FAIL_ALLOC:
            # the injected failure hits the huge allocation; small pages follow
            self.flags &= ~FLAG_FAIL_ALLOC
        dpages = self.mdevice.alloc_pages(idx.size)
        idx = idx[:dpages.size]
        if idx.size == 0:
            return
        sp = spfn[idx]
        phys = self.system.phys
        with_src = sp >= 0
        try:
            if with_src.any():
                phys.copy(dpages[with_src], sp[with_src])
            if (~with_src).any():
                phys.fill(dpages[~with_src], 0)
        except BaseException:
            _release_new(phys, dpages)
            raise
        wr = ((src[idx] & _U(MIGRATE_PFN_WRITE)) != 0) | (~with_src & bool(args.vma.vm_flags & VM_WRITE))
        phys.pages.zone_device_data[dpages] = id(self)
        args.dst[idx] = migrate_pfn(dpages) | np.where(wr, _U(MIGRATE_PFN_WRITE), _U(0))

    def _migrate_finalize_and_map(self, args):
        """dmirror_migrate_finalize_and_map(): map the new device pages in the device page table."""
        src = args.src[:args.npages]
        dst = args.dst[:args.npages]
        dpfn = migrate_pfn_to_pfn(dst)
        sel = np.nonzero(((src & _U(MIGRATE_PFN_MIGRATE)) != 0) & (dpfn >= 0))[0]
        if sel.size == 0:
            return
        w = (dst[sel] & _U(MIGRATE_PFN_WRITE)) != 0
        ent = (dpfn[sel].astype(_U) << _U(_DPT_SHIFT)) | _U(DPT_VALID) | np.where(w, _U(DPT_WRITE), _U(0))
        # Other opens of this device on this mm ignored the MMU_NOTIFY_MIGRATE too (it
        # carries our owner): their entries for these pages are stale now.  (The kernel's
        # test driver leaves them; a real driver cannot.)
        self.mdevice._erase_in_mirrors(self.mm, args.start + (sel << PAGE_SHIFT), skip=self)
        with self.mutex:
            self.pt.store((args.start >> PAGE_SHIFT) + sel, ent)

    def migrate_to_sys(self, addr, npages):
        """HMM_DMIRROR_MIGRATE_TO_SYS: bring this device's pages in the range back to system memory."""
        start, end = self._cmd(addr, npages)
        self._mm_alive(start, end)
        cpages = 0
        with self.mm.mmap_lock.read():
            for vma, s, e in self._vma_pieces(start, end):
                args = MigrateVma(vma, s, e, pgmap_owner=self.mdevice, flags=self.mdevice.select_device())
                ret = migrate_vma_setup(args)
                if ret:
                    raise _err(ret, "migrate_vma_setup failed", s, e)
                with _migrating(args):
                    ret = self.mdevice._fault_alloc_and_copy(args, self.mm)
                    migrate_vma_pages(args)
                    src = args.src[:args.npages]
                    cpages += int((((src & _U(MIGRATE_PFN_VALID)) != 0)
                                   & ((src & _U(MIGRATE_PFN_MIGRATE)) != 0)).sum())
                if ret:
                    raise oserror(errno.ENOMEM, "no system memory to migrate device pages back", s, e)
        return DmirrorResult(None, cpages)

    # -- snapshot -------------------------------------------------------------------------------
    def snapshot(self, addr, npages):
        """HMM_DMIRROR_SNAPSHOT: what the CPU page table says, one byte per page, no faults."""
        start, end = self._cmd(addr, npages)
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
        self._mm_alive(start, end)
        with self.mm.mmap_lock.read():
            pfns = make_device_exclusive_range(self.mm, start, end, None)
            if isinstance(pfns, int):
                raise _err(pfns, "make_device_exclusive failed", start, end)
            got = np.nonzero(pfns >= 0)[0]
            p = pfns[got]
            ent = (p.astype(_U) << _U(_DPT_SHIFT)) | _U(DPT_VALID | DPT_ATOMIC)
            with self.mutex:
                self.pt.store((start >> PAGE_SHIFT) + got, ent)
            phys = self.system.phys
            phys.unlock(p)
            phys.put(p)
        n = (end - start) >> PAGE_SHIFT
        parts = []
        with self.mutex:
            cpages = self._do_read(start, end, parts)
        if cpages < n:
            raise oserror(errno.ENOENT, "pages could not be made exclusive", start, end)
        return DmirrorResult(_bounce(parts), cpages)

    def check_exclusive(self, addr, npages):
        """HMM_DMIRROR_CHECK_EXCLUSIVE: EPERM while any page is still mapped for atomics."""
        start, end = self._cmd(addr, npages)
        with self.mutex:
            ent = self.pt.lookup(np.arange(start >> PAGE_SHIFT, end >> PAGE_SHIFT, dtype=np.int64))
        atomic = (ent & _U(DPT_ATOMIC)) != 0
        if atomic.any():
            a = start + (int(np.argmax(atomic)) << PAGE_SHIFT)
            raise oserror(errno.EPERM, f"{int(atomic.sum())} pages still mapped for device atomics "
                          f"(first at 0x{a:x})", start, end)
        return DmirrorResult(None, 0)

    # -- device-wide ------------------------------------------------------------------------------
    def release(self):
        """HMM_DMIRROR_RELEASE: evict every page of the device back to system memory."""
        if self.closed:
            raise oserror(errno.EINVAL, "dmirror file is closed")
        self.mdevice.remove_chunks()
        return DmirrorResult(None, 0)

    def set_flags(self, flags):
        """HMM_DMIRROR_FLAGS."""
        self.flags = int(flags)
        return DmirrorResult(None, 0)
