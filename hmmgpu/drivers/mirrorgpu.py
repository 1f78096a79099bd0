"""MirrorGpu: a GPU-like driver that mirrors part of a process, in the manner of NVIDIA's UVM.

Where dmirror (lib/test_hmm.c) answers ioctls, MirrorGpu runs device jobs: its EmulatedDevice
context takes replayable faults, and the device's service loop hands it a whole drain at a time
(every batch of one pass, sorted by address).  It services a drain as UVM's
uvm_hmm_va_block_service_locked() path does a batch: faults split by VMA (no VMA or PROT_NONE is
fatal EFAULT, a write to a read-only VMA EPERM, each fault named by its own address), one
hmm_range_fault per run of faulted pages in a VMA under one mmu_interval_read_begin /
read_retry, and one device page-table command buffer for the whole drain, never waited for (the
replay is queued behind it on the device's queue).  System pages are mapped remotely (zero-copy),
its own device pages locally.  With migrate on fault, the faulted 2 MiB blocks first migrate to
device memory through migrate_vma_* with MirrorGpu's own allocate-and-copy step, and the new
device pages are mapped straight into its page table before migrate_vma_finalize; only the
faulted pages that did not migrate go through hmm_range_fault.  The demo (`hmmgpu demo`) and the
bench suites drive it.
"""
import errno
import threading

import numpy as np

from .. import trace
from ..constants import PAGE_SHIFT, PAGE_SIZE
from ..device.faults import ACCESS_ATOMIC
from ..device.pagetable import PTE_WRITE
from ..errors import oserror
from ..hmm import (MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_SYSTEM, MigrateVma,
                   MmuIntervalNotifier, migrate_pfn, migrate_pfn_to_pfn, migrate_vma_finalize, migrate_vma_pages,
                   migrate_vma_setup, mmu_interval_notifier_insert, mmu_interval_notifier_remove,
                   mmu_interval_set_seq)
from ..hmm.debug import check_device_mappings
from ..mm.vma import VM_WRITE
from ._range_fault import RangeFaultMirror

_U = np.uint64


class MirrorGpu(RangeFaultMirror):
    """A GPU-like device that mirrors ``[start, end)`` of a process, built on the HMM core.

    Its hardware is the dmirror device's ``EmulatedDevice`` (whose memory holds the pages that
    dmirror migrates there): MirrorGpu opens an address space of its own on it (a device
    context: its own page table and job engine, ``gpu.jobs``).  Its fault handler ``service``
    takes a whole drain of faults (see the module docstring); the mmu interval notifier unmaps
    the device page table on every invalidation and returns only after the device executed it.

    ``migrate_on_fault=True`` makes it a fault-driven migrating driver (as UVM is): each faulted
    run of pages, widened to its 2 MiB blocks within the mirrored range, is first migrated to
    device memory (pages that cannot migrate -- shared, file-backed -- stay where they are and
    are mapped remotely).  ``start`` and ``end`` must be page-aligned with ``start < end``
    (EINVAL otherwise); after ``close()`` jobs and services raise OSError(EBADF).
    """

    BLOCK_PAGES = 512            # 2 MiB, UVM's va_block

    def __init__(self, system, proc, dmdev, start, end, name="gpu0", migrate_on_fault=False):
        start, end = int(start), int(end)
        if start % PAGE_SIZE or end % PAGE_SIZE:
            raise oserror(errno.EINVAL, f"MirrorGpu '{name}': the mirrored range must be page-aligned",
                          start, end)
        if end <= start:
            raise oserror(errno.EINVAL, f"MirrorGpu '{name}': the mirrored range is empty", start, end)
        self.system, self.proc, self.dmdev = system, proc, dmdev
        self.dev_private_owner = dmdev      # hmm_range_fault leaves dmirror's pages device-private
        self.start, self.end = start, end
        self.name = name
        # dmirror's EmulatedDevice is the hardware; we open an address space (context) of our own
        self.device = dmdev.device
        self.ctx = self.device.create_context(service=self.service, name=name)
        self.pt = self.ctx.pt
        self.counters = self.device.counters      # the device's UVM fault_stats (all its contexts)
        self.lock = threading.RLock()
        self.serviced_pages = 0
        self.local_maps = 0
        self.remote_maps = 0
        self.invalidated_pages = 0
        self.migrated_pages = 0
        self.migrate_on_fault = bool(migrate_on_fault)
        self._resident = set()       # 2 MiB blocks this driver migrated and nothing moved since
        self._migrating = False
        self.closed = False
        self.mni = MmuIntervalNotifier()
        mmu_interval_notifier_insert(self.mni, proc.mm, self.start, self.end - self.start, self)
        check_device_mappings(self.pt, self.mni, system)     # DriverBug on a map without read_retry

    def _check_open(self, what):
        if self.closed:
            raise oserror(errno.EBADF, f"MirrorGpu '{self.name}' is closed: no {what} after close()",
                          self.start, self.end)

    @property
    def jobs(self):
        """The job engine of this address space (memset, reduce_sum, list_chase, run, ...)."""
        self._check_open("job")
        return self.ctx.jobs

    # the mmu interval notifier op
    def invalidate(self, mni, range, cur_seq):
        s, e = max(range.start, self.start), min(range.end, self.end)
        with self.lock:
            mmu_interval_set_seq(mni, cur_seq)
            if s < e and not self._migrating and self._resident:
                b0, b1 = (s >> 12) // self.BLOCK_PAGES, ((e >> 12) - 1) // self.BLOCK_PAGES
                if b1 - b0 < 4096:
                    self._resident.difference_update(np.arange(b0, b1 + 1).tolist())
                else:
                    self._resident.clear()
            if s < e:
                self.pt.invalidate_range(s >> 12, (e - s) >> 12)
                self.invalidated_pages += (e - s) >> 12
        return True

    # -- the fault path -------------------------------------------------------------------------
    def service(self, faults):
        """Service a drain of device faults (a FaultDrain, or any FaultBatch): 0 or an errno per
        fault (None when all were serviced)."""
        self._check_open("fault service")
        vpn, write, atomic = faults.vpn, faults.write, faults.access == ACCESS_ATOMIC
        errs = np.zeros(len(faults), np.int64)
        order = np.arange(vpn.size) if (vpn.size < 2 or (vpn[1:] >= vpn[:-1]).all()) \
            else np.argsort(vpn, kind="stable")
        v, w, at = vpn[order], write[order], atomic[order]
        inside = (v >= self.start >> PAGE_SHIFT) & (v < self.end >> PAGE_SHIFT)
        errs[order[~inside]] = errno.EFAULT
        pos = np.flatnonzero(inside)
        if trace.enabled:                     # the drain's faults, one instant per drain
            kinds = np.bincount(faults.access.astype(np.int64), minlength=3)
            trace.instant("fault", trace.CAT_FAULT, track=f"{self.name}/faults", pages=len(faults),
                          first=hex(int(faults.vaddr.min())), last=hex(int(faults.vaddr.max())),
                          read=int(kinds[0]), write=int(kinds[1]), atomic=int(kinds[2]))
        with trace.span("hmm service", trace.CAT_FAULT, track=f"{self.name}/faults", faults=int(pos.size)):
            if pos.size and self.migrate_on_fault:
                done = self._migrate_on_fault(v[pos])
                pos = pos[~done]
            if pos.size:
                e = self._fault_pages(v[pos], w[pos], v[pos][at[pos]])
                errs[order[pos]] = e
        return errs if errs.any() else None

    def _map(self, vpns, pfns, flags):
        """One page-table command buffer for all of a drain's entries (driver lock held).  Not
        waited for: the replay is queued behind it on the device's queue."""
        if vpns.size == 0:
            return
        local = int(np.count_nonzero(self.device.owns(pfns)))
        self.local_maps += local
        self.remote_maps += int(pfns.size - local)
        self.pt.map(vpns, pfns, flags)
        self.serviced_pages += int(vpns.size)

    # -- migrate on fault -----------------------------------------------------------------------
    def _migrate_on_fault(self, v):
        """Migrate the 2 MiB blocks of faulted pages ``v`` (sorted) that are not resident yet and
        map what moved; returns the mask of ``v`` mapped that way."""
        blocks = np.unique(v // self.BLOCK_PAGES)
        blocks = blocks[[int(b) not in self._resident for b in blocks]]   # one per faulted block
        if blocks.size == 0:
            return np.zeros(v.size, bool)
        mapped = []
        cut = np.flatnonzero(np.diff(blocks) != 1) + 1
        with trace.span("migrate on fault", trace.CAT_MIGRATE, track=f"{self.name}/migrate",
                        blocks=int(blocks.size)):
            self._migrating = True
            try:
                for grp in np.split(blocks, cut):     # one per run of consecutive blocks
                    s = max(int(grp[0]) * self.BLOCK_PAGES << PAGE_SHIFT, self.start)
                    e = min((int(grp[-1]) + 1) * self.BLOCK_PAGES << PAGE_SHIFT, self.end)
                    mapped.append(self.migrate(s, e))
                    self._resident.update(grp.tolist())
            finally:
                self._migrating = False
        moved = np.concatenate(mapped)
        return np.isin(v, moved) if moved.size else np.zeros(v.size, bool)

    def migrate(self, start, end):
        """migrate_vma_* of [start, end) to this device's memory, VMA by VMA, the new pages
        mapped into this address space before migrate_vma_finalize; returns the vpns mapped."""
        mm = self.proc.mm
        done = []
        with mm.mmap_lock.read():
            pieces = []
            try:
                for vma in mm.vmas_in(start, end):    # one per VMA
                    args = MigrateVma(vma, max(start, vma.start), min(end, vma.end), pgmap_owner=self,
                                      flags=MIGRATE_VMA_SELECT_SYSTEM)
                    if migrate_vma_setup(args) != 0:
                        continue
                    pieces.append(args)
                    self._alloc_and_copy(args)
                    migrate_vma_pages(args)
                with self.lock:                       # the pages are locked: no CPU access races
                    done = self._map_migrated(pieces)
            finally:
                for args in pieces:
                    migrate_vma_finalize(args)
        n = sum(int(d.size) for d in done)
        self.migrated_pages += n
        return np.concatenate(done) if done else np.zeros(0, np.int64)

    def _alloc_and_copy(self, args):
        """Device pages for the collected system pages (zeroed for holes), and the copy."""
        src = args.src[:args.npages]
        idx = np.flatnonzero((src & _U(MIGRATE_PFN_MIGRATE)) != 0)
        if idx.size == 0:
            return
        dpages = self.dmdev.alloc_pages(idx.size)     # locked, one reference each
        idx = idx[:dpages.size]
        if idx.size == 0:
            return
        spfn = migrate_pfn_to_pfn(src[idx])
        has = spfn >= 0
        try:
            if has.any():
                # waited for: migrate_vma_finalize frees the source pages, which the CPU may
                # reuse at once
                self.device.copy_pages(dpages[has], spfn[has]).wait()
            if (~has).any():
                self.device.fill_pages(dpages[~has], 0)
        except BaseException:
            self.system.phys.unlock(dpages)
            self.system.phys.put(dpages, unique=True)
            raise
        wr = ((src[idx] & _U(MIGRATE_PFN_WRITE)) != 0) | (~has & bool(args.vma.vm_flags & VM_WRITE))
        args.dst[idx] = migrate_pfn(dpages) | np.where(wr, _U(MIGRATE_PFN_WRITE), _U(0))

    def _map_migrated(self, pieces):
        """One page-table command buffer for every page that moved (driver lock held)."""
        vs, ps, fs = [], [], []
        for args in pieces:
            src, dst = args.src[:args.npages], args.dst[:args.npages]
            dpfn = migrate_pfn_to_pfn(dst)
            k = np.flatnonzero(((src & _U(MIGRATE_PFN_MIGRATE)) != 0) & (dpfn >= 0))
            vs.append((args.start >> PAGE_SHIFT) + k)
            ps.append(dpfn[k])
            fs.append(np.where((dst[k] & _U(MIGRATE_PFN_WRITE)) != 0, PTE_WRITE, 0))
        if not vs:
            return []
        vpns = np.concatenate(vs)
        if vpns.size:
            self.pt.map(vpns, np.concatenate(ps), np.concatenate(fs))
            self.local_maps += int(vpns.size)
            self.serviced_pages += int(vpns.size)
        return vs

    def fault_range(self, start, end, write):
        """Mirror [start, end) into the device page table (every page faulted in, as a prefetch
        would): 0 or the first positive errno."""
        self._check_open("fault service")
        v = np.arange(start >> PAGE_SHIFT, end >> PAGE_SHIFT, dtype=np.int64)
        errs = self._fault_pages(v, np.full(v.size, bool(write)))
        bad = np.flatnonzero(errs)
        return int(errs[bad[0]]) if bad.size else 0

    def close(self):
        """Stop mirroring: the notifier goes, the address space is destroyed (idempotent)."""
        if self.closed:
            return
        self.closed = True
        mmu_interval_notifier_remove(self.mni)
        self.ctx.destroy()
        self.device.synchronize()

    def stats(self):
        s = dict(self.device.stats())
        s.update(getattr(self.pt, "stats", {}) or {})     # this address space's page table
        s.update({"hmm_serviced_pages": self.serviced_pages, "num_local_maps": self.local_maps,
                  "num_remote_maps": self.remote_maps, "invalidated_pages": self.invalidated_pages,
                  "num_pages_in": self.migrated_pages})
        return s
