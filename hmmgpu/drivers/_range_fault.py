"""The hmm_range_fault side of a mirroring driver's fault service (each device of UvmDriver, a
UvmGpu, mixes it in): faulted pages split by VMA into runs, one hmm_range_fault per run under
one mmu_interval_read_begin, one device page-table update for all of them under the driver lock
after mmu_interval_read_retry -- the loop of Documentation/mm/hmm.rst's driver example.

A driver that mixes ``RangeFaultMirror`` in has ``proc``, ``system``, ``device``, ``mni`` and
``lock``, names the owner of its device-private pages in ``dev_private_owner``, and implements
``_map(vpns, pfns, flags)`` (called with ``lock`` held, the sequence checked) and optionally
``_mapped(vpns, pfns)`` (called after the lock is dropped).
"""
import errno

import numpy as np

from ..constants import PAGE_SHIFT
from ..device.pagetable import PTE_ATOMIC, PTE_WRITE
from ..hmm import (HMM_PFN_ERROR, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID, HMM_PFN_WRITE,
                   HMM_RANGE_DEFAULT_TIMEOUT, HmmRange, hmm_pfn_to_pfn, hmm_range_fault,
                   migrate_device_coherent_pages, mmu_interval_read_begin, mmu_interval_read_retry)
from ..mm.vma import VM_READ, VM_WRITE

_U = np.uint64
RUN_GAP_PAGES = 512          # faulted pages this close in one VMA share one hmm_range_fault


class RangeFaultMirror:
    """hmm_range_fault-based fault service (see the module docstring)."""

    def _mapped(self, vpns, pfns):
        """After a successful update of the device page table (no lock held): bookkeeping."""

    def _runs(self, v, w):
        """The hmm_range_fault calls for sorted faulted pages ``v`` (write mask ``w``): per VMA,
        runs of faults at most RUN_GAP_PAGES apart.  Returns (runs, errs): a run is (first, last
        position, vma, positions); errs holds EFAULT / EPERM where a fault can never be serviced."""
        errs = np.zeros(v.size, np.int64)
        runs = []
        covered = np.zeros(v.size, bool)
        for vma in self.proc.mm.vmas_in(int(v[0]) << PAGE_SHIFT, (int(v[-1]) + 1) << PAGE_SHIFT):
            a = int(np.searchsorted(v, vma.start >> PAGE_SHIFT))
            b = int(np.searchsorted(v, vma.end >> PAGE_SHIFT))
            if a == b:
                continue
            covered[a:b] = True
            if not vma.vm_flags & VM_READ:          # PROT_NONE: HMM assumes no write-only maps
                errs[a:b] = errno.EFAULT
                continue
            ok = np.arange(a, b)
            if not vma.vm_flags & VM_WRITE:
                bad = w[a:b]
                errs[a:b][bad] = errno.EPERM
                ok = ok[~bad]
            if ok.size == 0:
                continue
            cut = np.flatnonzero(np.diff(v[ok]) > RUN_GAP_PAGES) + 1
            for piece in np.split(ok, cut):           # one per run of nearby faults
                runs.append((int(piece[0]), int(piece[-1]), vma, piece))
        errs[~covered] = errno.EFAULT                 # no VMA there
        return runs, errs

    def _fault_pages(self, v, w, atomic=None):
        """hmm_range_fault every run of ``v`` (sorted vpns, write mask ``w``) under one sequence
        read, then one page-table update for all of them; returns an errno per page.  The
        writable pages in ``atomic`` (vpns that took an atomic fault) are mapped with
        PTE_ATOMIC: the emulated link carries device atomics to system memory."""
        mm = self.proc.mm
        for _ in range(HMM_RANGE_DEFAULT_TIMEOUT):
            seq = mmu_interval_read_begin(self.mni)
            with mm.mmap_lock.read():
                runs, errs = self._runs(v, w)
                got, busy = [], False
                for lo, hi, vma, piece in runs:       # one hmm_range_fault per run
                    rng = self._range(v, w, lo, hi, piece, seq)
                    ret = hmm_range_fault(rng)
                    if ret == -errno.EBUSY:
                        busy = True
                        break
                    if ret:
                        errs[piece] = -ret
                        continue
                    got.append((int(v[lo]), rng.hmm_pfns))
            if busy:
                continue
            vpns, pfns, flags = self._entries(got, atomic)
            if self._move_unreachable(pfns):
                continue
            with self.lock:
                if mmu_interval_read_retry(self.mni, seq):
                    continue
                self._map(vpns, pfns, flags)
            self._mapped(vpns, pfns)
            return errs
        return np.full(v.size, errno.EBUSY, np.int64)

    def _range(self, v, w, lo, hi, piece, seq):
        first, npages = int(v[lo]), int(v[hi]) - int(v[lo]) + 1
        dense = piece.size == npages
        rng = HmmRange(notifier=self.mni, start=first << PAGE_SHIFT, end=(first + npages) << PAGE_SHIFT,
                       dev_private_owner=self.dev_private_owner, notifier_seq=seq)
        ww = w[piece]
        if dense and (ww.all() or not ww.any()):      # every page, one kind: no per-page flags
            rng.default_flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if ww[0] else 0)
        else:                                         # only the faulted pages are faulted in
            req = np.zeros(npages, _U)
            k = v[piece] - first
            req[k] = _U(HMM_PFN_REQ_FAULT)
            req[k[ww]] |= _U(HMM_PFN_REQ_WRITE)
            rng.hmm_pfns = req
            rng.pfn_flags_mask = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE
        return rng

    @staticmethod
    def _entries(got, atomic=None):
        """The (vpns, pfns, PTE flags) of every valid entry hmm_range_fault returned; the
        writable pages in ``atomic`` get PTE_ATOMIC."""
        if not got:
            z = np.zeros(0, np.int64)
            return z, z, z
        vs, ps, fs = [], [], []
        for first, e in got:
            ok = np.flatnonzero(((e & _U(HMM_PFN_VALID)) != 0) & ((e & _U(HMM_PFN_ERROR)) == 0))
            vs.append(first + ok)
            ps.append(hmm_pfn_to_pfn(e[ok]))
            fs.append(np.where((e[ok] & _U(HMM_PFN_WRITE)) != 0, PTE_WRITE, 0))
        vpns, pfns, flags = (np.concatenate(x) for x in (vs, ps, fs))
        if atomic is not None and atomic.size:
            flags[(flags != 0) & np.isin(vpns, atomic)] |= PTE_ATOMIC
        return vpns, pfns, flags

    def _move_unreachable(self, pfns):
        """Pages this device cannot address (another driver's coherent device memory; not RAM,
        its own frames or an enabled peer's) move to system memory first, as dmirror does; True
        when some did (the caller walks again)."""
        far = pfns[(pfns >= self.system.phys.nr_ram) & ~self.device.can_address(pfns)]
        if far.size == 0:
            return False
        migrate_device_coherent_pages(self.system, np.unique(far))
        return True
