"""MirrorGpu: a GPU-like driver that mirrors part of a process, in the manner of NVIDIA's UVM.

Where dmirror (lib/test_hmm.c) answers ioctls, MirrorGpu runs device jobs: its EmulatedDevice
context takes replayable faults in batches, services each run of faulted pages with the
textbook HMM loop (mmu_interval_read_begin, hmm_range_fault, mmu_interval_read_retry under the
driver lock, then the device page table), maps system pages remotely (zero-copy) and its own
device pages locally, and can migrate each faulted 2 MiB block first (migrate on fault).  The
demo (`hmmgpu demo`) and the bench suites drive it.
"""
import threading

import numpy as np

from .. import trace


class MirrorGpu:
    """A GPU-like device that mirrors ``[start, end)`` of a process, built on the HMM core.

    Its hardware is the dmirror device's ``EmulatedDevice`` (whose memory holds the pages that
    dmirror migrates there): MirrorGpu opens an address space of its own on it (a device
    context: its own page table and job engine).  Its fault handler is the textbook HMM driver
    loop: ``mmu_interval_read_begin``, ``hmm_range_fault`` under mmap_lock, then under the driver
    lock ``mmu_interval_read_retry`` before the device page table is written.  System pages are
    mapped remotely (zero-copy); device-private pages of the dmirror device are mapped locally.
    The mmu interval notifier unmaps the device page table on every invalidation, and returns
    only after the device has executed the unmap.

    ``migrate_on_fault=True`` makes it a fault-driven migrating driver (as UVM is): each faulted
    run of pages, widened to its 2 MiB blocks within the mirrored range, is first migrated to
    device memory with migrate_vma_* (pages that cannot migrate -- shared, file-backed -- stay
    where they are and are mapped remotely), then mapped locally.
    """

    BLOCK_PAGES = 512            # 2 MiB, UVM's va_block

    def __init__(self, system, proc, dmdev, start, end, name="gpu0", migrate_on_fault=False):
        from ..hmm.debug import check_device_mappings
        from ..mm.notifier import MmuIntervalNotifier, mmu_interval_notifier_insert
        self.system, self.proc, self.dmdev = system, proc, dmdev
        self.start, self.end = int(start), int(end)
        self.name = name
        # dmirror's EmulatedDevice is the hardware; we open an address space (context) of our own
        self.device = dmdev.device
        self.ctx = self.device.create_context(service=self.service, name=name)
        self.jobs, self.pt = self.ctx.jobs, self.ctx.pt
        self.counters = self.device.counters      # the device's UVM fault_stats (all its contexts)
        self.lock = threading.RLock()
        self.serviced_pages = 0
        self.local_maps = 0
        self.remote_maps = 0
        self.invalidated_pages = 0
        self.migrated_pages = 0
        self.migrate_on_fault = bool(migrate_on_fault)
        self._mirror = None
        self._resident = set()       # 2 MiB blocks this driver migrated and nothing moved since
        self._migrating = False
        self.mni = MmuIntervalNotifier()
        mmu_interval_notifier_insert(self.mni, proc.mm, self.start, self.end - self.start, self)
        check_device_mappings(self.pt, self.mni, system)     # DriverBug on a map without read_retry

    # the mmu interval notifier op
    def invalidate(self, mni, range, cur_seq):
        from ..mm.notifier import mmu_interval_set_seq
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

    def fault_range(self, start, end, write):
        """Mirror [start, end) into the device page table: 0 or a positive errno.

        The HMM driver loop: mmu_interval_read_begin, hmm_range_fault (REQ_FAULT, +REQ_WRITE)
        under mmap_lock, then under the driver lock mmu_interval_read_retry before the device
        page table is written.  Device-private pages of the dmirror device map local.
        """
        import errno as _errno
        from ..device.pagetable import PTE_WRITE
        from ..hmm import (HMM_PFN_ERROR, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_WRITE,
                          HmmRange, hmm_pfn_to_pfn, hmm_range_fault, mmu_interval_read_begin,
                          mmu_interval_read_retry)
        rng = HmmRange(notifier=self.mni, start=start, end=end,
                       default_flags=HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0),
                       dev_private_owner=self.dmdev)
        for _ in range(1000):
            rng.notifier_seq = mmu_interval_read_begin(self.mni)
            with self.proc.mm.mmap_lock.read():
                ret = hmm_range_fault(rng)
            if ret == -_errno.EBUSY:
                continue
            if ret:
                return -ret
            with self.lock:
                if mmu_interval_read_retry(self.mni, rng.notifier_seq):
                    continue
                e = rng.hmm_pfns
                if ((e & np.uint64(HMM_PFN_ERROR)) != 0).any():
                    return _errno.EFAULT
                pfns = hmm_pfn_to_pfn(e)
                flags = np.where((e & np.uint64(HMM_PFN_WRITE)) != 0, PTE_WRITE, 0)
                local = int(np.count_nonzero(self.device.owns(pfns)))
                self.local_maps += local
                self.remote_maps += int(pfns.size - local)
                vpns = np.arange(start >> 12, end >> 12, dtype=np.int64)
                self.pt.map(vpns, pfns, flags).wait()
                self.serviced_pages += int(vpns.size)
            return 0
        return _errno.EBUSY

    def migrate(self, start, end):
        """migrate_vma_* of [start, end) to this device's memory, VMA by VMA; pages migrated."""
        from .. import hmm
        if self._mirror is None:
            self._mirror = self.dmdev.open(self.proc)      # dmirror's allocator and copy steps
        m = self._mirror
        done = 0
        with self.proc.mm.mmap_lock.read():
            addr = start
            while addr < end:
                vma = self.proc.mm.find_vma(addr)
                if vma is None or vma.start >= end:
                    break
                s, e = max(addr, vma.start), min(end, vma.end)
                args = hmm.MigrateVma(vma, s, e, pgmap_owner=self.dmdev, flags=hmm.MIGRATE_VMA_SELECT_SYSTEM)
                if hmm.migrate_vma_setup(args) == 0:
                    m._migrate_alloc_and_copy(args)
                    hmm.migrate_vma_pages(args)
                    m._migrate_finalize_and_map(args)
                    hmm.migrate_vma_finalize(args)
                    done += int(getattr(args, "cpages", 0) or 0)
                addr = e
        self.migrated_pages += done
        return done

    def service(self, faults):
        """Service one batch of device faults: one fault_range per run of consecutive pages."""
        import errno as _errno
        vpn = faults.vpn
        write = faults.write
        if trace.enabled:                     # one instant per faulting page, only while tracing
            now = trace.now_us()
            for a, acc in zip(faults.vaddr.tolist(), faults.access.tolist()):
                trace.event("fault", trace.CAT_FAULT, now, None, track=f"{self.name}/faults",
                            vaddr=hex(a), access=("read", "write", "atomic")[min(int(acc), 2)])
        errs = np.zeros(len(faults), dtype=np.int64)
        out_of_range = (vpn < (self.start >> 12)) | (vpn >= (self.end >> 12))
        errs[out_of_range] = _errno.EFAULT
        order = np.argsort(vpn, kind="stable")
        v, w = vpn[order], write[order]
        brk = np.flatnonzero((np.diff(v) != 1) | (w[1:] != w[:-1])) + 1
        if self.migrate_on_fault:
            ok = v[~out_of_range[order]]
            if ok.size:
                # whole 2 MiB blocks of the faulted pages, clipped to the mirrored range
                blocks = np.unique(ok // self.BLOCK_PAGES)
                blocks = blocks[[int(b) not in self._resident for b in blocks]]
                bbrk = np.flatnonzero(np.diff(blocks) != 1) + 1
                for grp in (np.split(blocks, bbrk) if blocks.size else ()):
                    s = max(int(grp[0]) * self.BLOCK_PAGES << 12, self.start)
                    e = min((int(grp[-1]) + 1) * self.BLOCK_PAGES << 12, self.end)
                    with trace.span("migrate on fault", trace.CAT_MIGRATE, track=f"{self.name}/migrate",
                                    npages=(e - s) >> 12):
                        self._migrating = True
                        try:
                            self.migrate(s, e)
                        finally:
                            self._migrating = False
                    self._resident.update(int(b) for b in grp)
        for lo, hi in zip(np.concatenate(([0], brk)), np.concatenate((brk, [v.size]))):
            idx = order[lo:hi]
            if out_of_range[idx[0]]:
                continue
            err = self.fault_range(int(v[lo]) << 12, (int(v[hi - 1]) + 1) << 12, bool(w[lo]))
            if err:
                errs[idx] = err
        return errs if errs.any() else None

    def close(self):
        from ..mm.notifier import mmu_interval_notifier_remove
        mmu_interval_notifier_remove(self.mni)
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None
        self.ctx.destroy()
        self.device.synchronize()

    def stats(self):
        s = dict(self.device.stats())
        s.update(getattr(self.pt, "stats", {}) or {})     # this address space's page table
        s.update({"hmm_serviced_pages": self.serviced_pages, "num_local_maps": self.local_maps,
                  "num_remote_maps": self.remote_maps, "invalidated_pages": self.invalidated_pages,
                  "num_pages_in": self.migrated_pages})
        return s
