"""UvmDriver: nvidia-uvm's fault path, oversubscription and heuristics on the HMM core.

One driver, grown from MirrorGpu: it mirrors ``[start, end)`` of a process into a device of its
own (an EmulatedDevice whose memory is one device-private ``dev_pagemap``, managed by ``Pmm`` in
2 MiB root chunks split to 64 KiB and 4 KiB), runs device jobs (``drv.jobs``), and services
each drain of replayable faults as uvm_gpu_replayable_faults.c / uvm_va_block.c do a batch:

1. faults split by VMA (no VMA or PROT_NONE is fatal EFAULT, a write to a read-only VMA EPERM,
   each fault named by its own address);
2. per VA block (2 MiB), the faulted pages plus what the prefetch policy chooses
   (``perf_prefetch``; the density prefetcher at 51% by default) that are not yet resident on
   the device get device memory from the PMM.  When the PMM runs out it evicts whole root
   chunks chosen by the eviction policy (UVM's LRU by default): their pages go back to system
   memory through migrate_device_range, a copy on the DMA engine, migrate_device_pages and
   migrate_device_finalize, as HMM drivers evict (data intact; rss and memcg move with the
   pages).  The chunks of the batch in progress are pinned, so they are never the victims;
   when nothing can be evicted the allocation comes back short and the faulted pages it could
   not serve are mapped remotely (zero-copy) instead: every pass makes progress, which is what
   keeps eviction under oversubscription from livelocking (UVM bug #1223);
3. the pages migrate with migrate_vma_setup / the copy / migrate_vma_pages and are mapped
   locally in the device page table before migrate_vma_finalize; every other faulted page is
   mapped through hmm_range_fault under one mmu_interval_read_begin / read_retry (its own
   device pages locally, system pages remotely), one page-table command buffer per drain.

A CPU access to a device page faults into ``migrate_to_ram`` (the pgmap's op), which brings the
pages home.  Device pages are freed through the pgmap's ``folio_free`` whoever drops the last
reference (a CPU fault, an eviction, the process unmapping them); the driver takes those frees
back into the PMM and its VA-block residency at its next step.

Time is an EmulatedClock (``drv.clock``) advanced by the CostModel of ``profile`` for every
fault batch, copy (H2D / D2H), remote access, replay and job launch; ``drv.counters()`` has
UVM's names (counters.py).
"""
import errno
import threading

import numpy as np

from ... import trace
from ...constants import PAGE_SHIFT, PAGE_SIZE
from ...device import EmulatedDevice, JobFault
from ...device.clock import EmulatedClock
from ...device.faults import ACCESS_ATOMIC
from ...device.pagetable import PTE_ATOMIC, PTE_WRITE
from ...errors import oserror
from ...hmm.debug import check_device_mappings
from ...hmm.hmm import (HMM_PFN_ERROR, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID, HMM_PFN_WRITE,
                        HMM_RANGE_DEFAULT_TIMEOUT, HmmRange, hmm_pfn_to_pfn, hmm_range_fault)
from ...hmm.memremap import MEMORY_DEVICE_PRIVATE, DevPagemap, memremap_pages, memunmap_pages, zone_device_page_init
from ...hmm.migrate_device import (MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                                   MIGRATE_VMA_SELECT_SYSTEM, MigrateVma, migrate_device_coherent_pages,
                                   migrate_device_finalize, migrate_device_pages, migrate_device_range, migrate_pfn,
                                   migrate_pfn_to_pfn, migrate_vma_finalize, migrate_vma_pages, migrate_vma_setup)
from ...mm.notifier import (MmuIntervalNotifier, mmu_interval_notifier_insert, mmu_interval_notifier_remove,
                            mmu_interval_read_begin, mmu_interval_read_retry, mmu_interval_set_seq)
from ...mm.vma import VM_READ, VM_WRITE
from ..dmirror import VM_FAULT_OOM, VM_FAULT_SIGBUS, device_selection, pages_to_system
from . import counters as uvm_counters
from .perf_prefetch import PrefetchContext
from .pmm import CHUNK_STATE_TEMP_PINNED, FRAMES_PER_ROOT, UVM_CHUNK_SIZE_4K, UVM_CHUNK_SIZE_MAX, EvictionFailed, Pmm
from .registry import make_policies
from .va_block import PAGES_PER_UVM_VA_BLOCK, UVM_ID_CPU, VaBlocks, uvm_gpu_id

_U = np.uint64
_MIGRATE = _U(MIGRATE_PFN_MIGRATE)
_MWRITE = _U(MIGRATE_PFN_WRITE)
PAGES = PAGES_PER_UVM_VA_BLOCK
RUN_GAP_PAGES = 512          # faulted pages this close in one VMA share one hmm_range_fault
MIGRATE_GAP_PAGES = 64       # pages to migrate this close in one VMA share one migrate_vma
GPU = uvm_gpu_id(0)


class _DevmemOps:
    """The pgmap's dev_pagemap_ops: folio_free and migrate_to_ram."""

    def __init__(self, driver):
        self.driver = driver

    def folio_free(self, heads, order):
        # Called from whichever thread dropped the last reference, maybe under mm locks: only
        # queued here (list.append is atomic); the driver takes the frees at its next step.
        self.driver._freed.append(np.array(heads, np.int64))

    def migrate_to_ram(self, vmf):
        return self.driver._cpu_fault(vmf)


class _Jobs:
    """``drv.jobs``: the device's JobEngine, each job that ran charged a kernel launch (a call
    its arguments refuse never launched)."""

    LAUNCHES = frozenset(("memset", "copy", "axpy", "reduce_sum", "gather", "list_chase", "tree_search", "run",
                          "submit"))

    def __init__(self, driver, engine):
        self._driver, self._engine = driver, engine

    def __getattr__(self, name):
        attr = getattr(self._engine, name)
        if name not in self.LAUNCHES:
            return attr
        drv = self._driver

        def launch(*args, **kwargs):
            drv._check_open("job")
            try:
                result = attr(*args, **kwargs)
            except JobFault:
                drv._charge(drv.cost.launch_ns(), "launch")      # it ran, up to its fatal fault
                raise
            drv._charge(drv.cost.launch_ns(), "launch")
            return result
        return launch


class UvmDriver:
    """A UVM-class GPU driver mirroring ``[start, end)`` of ``proc`` (see the module docstring).

    ``device_bytes``: device memory (a positive multiple of 2 MiB; None: enough for the whole
    range); ``policies``: {"prefetch", "eviction", "thrashing", "access_counters"} -> a policy
    object or its name (POLICY_NAMES; missing keys take nvidia-uvm's defaults); ``profile``:
    the cost model's profile (name, path or dict); ``seed`` seeds the random policies.
    ``start`` and ``end`` must be page-aligned with ``start < end`` (EINVAL otherwise); after
    ``close()`` jobs and services raise OSError(EBADF).
    """

    def __init__(self, system, proc, start, end, device_bytes=None, policies=None, profile="h100", seed=0,
                 name="gpu0"):
        start, end = int(start), int(end)
        if start % PAGE_SIZE or end % PAGE_SIZE:
            raise oserror(errno.EINVAL, f"UvmDriver '{name}': the mirrored range must be page-aligned", start, end)
        if end <= start:
            raise oserror(errno.EINVAL, f"UvmDriver '{name}': the mirrored range is empty", start, end)
        if device_bytes is None:
            nblocks = ((end - 1) // UVM_CHUNK_SIZE_MAX) - (start // UVM_CHUNK_SIZE_MAX) + 1
            device_bytes = nblocks * UVM_CHUNK_SIZE_MAX
        if (isinstance(device_bytes, bool) or not isinstance(device_bytes, (int, np.integer))
                or device_bytes <= 0 or device_bytes % UVM_CHUNK_SIZE_MAX):
            raise oserror(errno.EINVAL, f"UvmDriver '{name}': device_bytes={device_bytes!r} is not a positive "
                          "multiple of 2 MiB", start, end)
        self.policies = make_policies(policies, seed=seed)       # ValueError/TypeError before any change
        self.system, self.proc = system, proc
        self.start, self.end = start, end
        self.name = name
        self.seed = int(seed)
        self.clock = EmulatedClock(profile)
        self.cost = self.clock.model
        self._clock_lock = threading.Lock()
        self.device_bytes = int(device_bytes)
        nframes = self.device_bytes // PAGE_SIZE
        phys = system.phys
        base = phys.request_free_mem_region(nframes)
        self.device = EmulatedDevice(system.backend, nframes, base, phys.ram, name=name, service=self.service)
        self.pt = self.device.pt
        self.pgmap = DevPagemap(MEMORY_DEVICE_PRIVATE, _DevmemOps(self), self, nframes,
                                arena=self.device.arena, pfn_first=base)
        self.pfn_base = memremap_pages(self.pgmap, system)
        self.pmm = Pmm(self.device_bytes, clock=self.clock)
        self.blocks = VaBlocks(ngpus=1)
        self._frame_vpn = np.full(nframes, -1, np.int64)       # device frame -> the vpn it holds
        self._freed = []                                        # pfns folio_free handed back
        self.lock = threading.RLock()        # the notifier's sequence and the device page table
        self.pmm_lock = threading.RLock()    # the PMM, the VA blocks, the counters; never taken under self.lock
        self._counters = uvm_counters.new_counters()
        self.closed = False
        self._jobs = _Jobs(self, self.device.jobs)
        self.mni = MmuIntervalNotifier()
        mmu_interval_notifier_insert(self.mni, proc.mm, self.start, self.end - self.start, self)
        check_device_mappings(self.pt, self.mni, system)     # DriverBug on a map without read_retry

    def __repr__(self):
        return (f"UvmDriver({self.name}, [0x{self.start:x}, 0x{self.end:x}), {self.device_bytes >> 20} MiB, "
                f"t={self.clock.now:.6f} s)")

    def _check_open(self, what):
        if self.closed:
            raise oserror(errno.EBADF, f"UvmDriver '{self.name}' is closed: no {what} after close()",
                          self.start, self.end)

    @property
    def jobs(self):
        """The job engine (memset, reduce_sum, list_chase, run, ...); each launch costs clock time."""
        self._check_open("job")
        return self._jobs

    def _charge(self, ns, what):
        with self._clock_lock:
            self.clock.advance(ns, what)

    def _count(self, **deltas):
        with self._clock_lock:
            uvm_counters.add(self._counters, **deltas)

    # -- the mmu interval notifier op ---------------------------------------------------------
    def invalidate(self, mni, range, cur_seq):
        s, e = max(range.start, self.start), min(range.end, self.end)
        with self.lock:
            mmu_interval_set_seq(mni, cur_seq)
            if s < e:
                self.pt.invalidate_range(s >> PAGE_SHIFT, (e - s) >> PAGE_SHIFT)
        return True

    # -- device memory ------------------------------------------------------------------------
    def _reap(self):
        """Take the device pages freed since the last step (folio_free) back: out of their VA
        blocks' residency (where the block still names that frame) and into the PMM."""
        if not self._freed:
            return
        with self.pmm_lock:
            got = []
            while self._freed:
                got.append(self._freed.pop())
            frames = np.unique(np.concatenate(got)) - self.pfn_base
            vpn = self._frame_vpn[frames]
            self._frame_vpn[frames] = -1
            held = vpn >= 0
            if held.any():
                rows = self.blocks.rows_of_blocks(vpn[held] // PAGES, create=False)
                pg = vpn[held] % PAGES
                same = self.blocks.frame[GPU, rows, pg] == frames[held]
                self.blocks.resident[GPU, rows[same], pg[same]] = False
                self.blocks.frame[GPU, rows[same], pg[same]] = -1
            self.pmm.free(frames)

    def _alloc(self, n, owner):
        """``n`` 4 KiB device frames for VA block row ``owner``, TEMP_PINNED, evicting root chunks
        as the eviction policy chooses; fewer when nothing more can be evicted."""
        return self.pmm.alloc(n, UVM_CHUNK_SIZE_4K, owner, evict=self._evict, policy=self.policies["eviction"])

    def _evict(self, root, frames, owners):
        """Pmm's evict callback: every page of root chunk ``root`` back to system memory."""
        n = FRAMES_PER_ROOT
        pfn0 = self.pfn_base + int(root) * n
        src = np.zeros(n, _U)
        dst = np.zeros(n, _U)
        with trace.span("evict", trace.CAT_MIGRATE, track=f"{self.name}/migrate", root=int(root)):
            migrate_device_range(self.system, src, pfn0, n)
            sel = device_selection(self.system, src, n)
            if sel.size:
                try:
                    pages_to_system(self.system, self.device, src, dst, sel, n)
                except OSError as ex:                                   # system memory is full
                    migrate_device_pages(self.system, src, dst, n)      # nothing moves
                    migrate_device_finalize(self.system, src, dst, n)
                    self._reap()
                    raise EvictionFailed(int(root)) from ex
            migrate_device_pages(self.system, src, dst, n)
            migrate_device_finalize(self.system, src, dst, n)
        self._reap()
        moved = int(np.count_nonzero(migrate_pfn_to_pfn(dst[sel]) >= 0)) if sel.size else 0
        self._charge(self.cost.dma_ns("d2h", _runs_of(sel)), "copy_d2h")
        self._count(num_evictions=1, num_pages_evicted=moved, num_pages_out=moved, bytes_xfer_dth=moved * PAGE_SIZE)
        left, _, _ = self.pmm.allocated_under(int(root))
        if left.size:            # pages a CPU fault or a migration holds: try another root
            raise EvictionFailed(int(root))

    def _cpu_fault(self, vmf):
        """migrate_to_ram: a CPU access to pages of this device brings them home."""
        addrs = np.asarray(vmf.addresses, dtype=np.int64)
        start, end = int(addrs.min()), int(addrs.max()) + PAGE_SIZE
        args = MigrateVma(vmf.vma, start, end, pgmap_owner=self, flags=MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                          fault_page=vmf.page)
        if migrate_vma_setup(args):
            return VM_FAULT_SIGBUS
        moved = 0
        try:
            sel = device_selection(self.system, args.src, args.npages)
            if sel.size:
                try:
                    pages_to_system(self.system, self.device, args.src, args.dst, sel, args.npages)
                except OSError:
                    args.src[:args.npages] &= ~_MIGRATE
                    return VM_FAULT_OOM
                moved = int(sel.size)
            migrate_vma_pages(args)
        finally:
            migrate_vma_finalize(args)
        self._charge(self.cost.dma_ns("d2h", _runs_of(sel)), "copy_d2h")
        self._count(cpu_page_fault_count=addrs.size, num_pages_out=moved, bytes_xfer_dth=moved * PAGE_SIZE)
        return 0

    # -- the fault path -------------------------------------------------------------------------
    def service(self, faults):
        """Service a drain of device faults (a FaultDrain, or any FaultBatch): 0 or an errno per
        fault (None when all were serviced)."""
        self._check_open("fault service")
        self._reap()
        self._charge(self.cost.fault_batch_ns(getattr(faults, "nbatches", 1)), "fault_batch")
        self._charge(self.cost.replay_ns(), "replay")
        vpn, write, atomic = faults.vpn, faults.write, faults.access == ACCESS_ATOMIC
        errs = np.zeros(len(faults), np.int64)
        order = np.arange(vpn.size) if (vpn.size < 2 or (vpn[1:] >= vpn[:-1]).all()) \
            else np.argsort(vpn, kind="stable")
        v, w, at = vpn[order], write[order], atomic[order]
        inside = (v >= self.start >> PAGE_SHIFT) & (v < self.end >> PAGE_SHIFT)
        errs[order[~inside]] = errno.EFAULT
        pos = np.flatnonzero(inside)
        self._count(gpu_page_fault_count=pos.size)
        if trace.enabled:
            kinds = np.bincount(faults.access.astype(np.int64), minlength=3)
            trace.instant("fault", trace.CAT_FAULT, track=f"{self.name}/faults", pages=len(faults),
                          first=hex(int(faults.vaddr.min())), last=hex(int(faults.vaddr.max())),
                          read=int(kinds[0]), write=int(kinds[1]), atomic=int(kinds[2]))
        with trace.span("uvm service", trace.CAT_FAULT, track=f"{self.name}/faults", faults=int(pos.size)):
            if pos.size:
                done = self._migrate_faulted(v[pos], w[pos])
                pos = pos[~done]
            if pos.size:
                errs[order[pos]] = self._fault_pages(v[pos], w[pos], v[pos][at[pos]])
        return errs if errs.any() else None

    def _vma_groups(self, v, w):
        """Per VMA that may hold device pages (readable, anonymous or not, writable for the write
        faults): (vma, positions of ``v`` in it).  Faults that will be errors are left out."""
        out = []
        for vma in self.proc.mm.vmas_in(int(v[0]) << PAGE_SHIFT, (int(v[-1]) + 1) << PAGE_SHIFT):
            a = int(np.searchsorted(v, vma.start >> PAGE_SHIFT))
            b = int(np.searchsorted(v, vma.end >> PAGE_SHIFT))
            if a == b or not vma.vm_flags & VM_READ:
                continue
            ok = np.arange(a, b)
            if not vma.vm_flags & VM_WRITE:
                ok = ok[~w[a:b]]
            if ok.size:
                out.append((vma, ok))
        return out

    def _migrate_faulted(self, v, w):
        """Migrate the faulted pages ``v`` (sorted) and what the prefetcher adds to device memory,
        mapping them locally; returns the mask of ``v`` mapped that way."""
        done = np.zeros(v.size, bool)
        mm = self.proc.mm
        with mm.mmap_lock.read():
            for vma, ok in self._vma_groups(v, w):
                lo = max(vma.start, self.start) >> PAGE_SHIFT
                hi = min(vma.end, self.end) >> PAGE_SHIFT
                want, nfault = self._choose_pages(v[ok], lo, hi)
                if want.size:
                    moved = self._migrate_in(vma, want, nfault)
                    done[ok] = np.isin(v[ok], moved)
        return done

    def _choose_pages(self, fv, lo, hi):
        """The faulted vpns ``fv`` of one VMA (its mirrored part is [lo, hi)) not resident on the
        device, then the pages the prefetch policy adds: (vpns, how many of them faulted)."""
        with self.pmm_lock:
            bnum = fv // PAGES
            ub, inv = np.unique(bnum, return_inverse=True)
            rows = self.blocks.rows_of_blocks(ub)
            faulted = np.zeros((ub.size, PAGES), bool)
            faulted[inv, fv % PAGES] = True
            resident = self.blocks.resident[GPU, rows]
            first = np.clip(lo - ub * PAGES, 0, PAGES)
            outer = np.clip(hi - ub * PAGES, 0, PAGES)
            thrashing = self.policies["thrashing"].thrashing_pages(rows)
            ctx = PrefetchContext(rows, faulted, GPU, resident=resident, first=first, outer=outer,
                                  thrashing=thrashing, first_touch=~self.blocks.resident_anywhere(rows),
                                  now_ns=self.clock.now_ns)
            extra = self.policies["prefetch"].prefetch(ctx)
        need = faulted & ~resident
        ri, pg = np.nonzero(need)
        fvp = ub[ri] * PAGES + pg
        ri, pg = np.nonzero(extra & ~need & ~resident)
        pvp = ub[ri] * PAGES + pg
        return np.concatenate([fvp, pvp]), int(fvp.size)

    def _migrate_in(self, vma, want, nfault, prefetch_cause=False):
        """Migrate pages ``want`` of ``vma`` (the first ``nfault`` faulted, the rest prefetched)
        to device memory and map them; returns the vpns that moved."""
        frames = np.full(want.size, -1, np.int64)
        with self.pmm_lock:
            # device memory first, faulted pages before prefetched ones, one allocation per block
            for part in (np.arange(nfault), np.arange(nfault, want.size)):
                if part.size == 0:
                    continue
                rows = self.blocks.rows_of_blocks(want[part] // PAGES)
                for r in np.unique(rows):
                    idx = part[rows == r]
                    f = self._alloc(idx.size, int(r))
                    frames[idx[:f.size]] = f
        have = frames >= 0
        order = np.argsort(want[have], kind="stable")
        vp, fr = want[have][order], frames[have][order]
        moved_v, moved_f, unused = [], [], [np.zeros(0, np.int64)]
        cut = np.flatnonzero(np.diff(vp) > MIGRATE_GAP_PAGES) + 1
        pieces = []
        try:
            for pv, pf in zip(np.split(vp, cut), np.split(fr, cut)):       # one migrate_vma per run
                if pv.size == 0:
                    continue
                args = MigrateVma(vma, int(pv[0]) << PAGE_SHIFT, (int(pv[-1]) + 1) << PAGE_SHIFT, pgmap_owner=self,
                                  flags=MIGRATE_VMA_SELECT_SYSTEM)
                if migrate_vma_setup(args) != 0:
                    unused.append(pf)
                    continue
                pieces.append(args)
                k = pv - int(pv[0])
                go = (args.src[k] & _MIGRATE) != 0
                unused.append(pf[~go])
                if go.any():
                    self._copy_in(args, k[go], pf[go])
                migrate_vma_pages(args)
                mv, mf = self._moved(args)
                moved_v.append(mv)
                moved_f.append(mf)
            mv = np.concatenate(moved_v) if moved_v else np.zeros(0, np.int64)
            mf = np.concatenate(moved_f) if moved_f else np.zeros(0, np.int64)
            with self.lock:                     # the pages are locked: no CPU access races
                if mv.size:
                    self._map_local(pieces)
        finally:
            for args in pieces:
                migrate_vma_finalize(args)
        with self.pmm_lock:
            self._reap()                        # destinations that did not make it
            unused = np.concatenate(unused)
            if unused.size:
                self.pmm.free(unused)
            self._frame_vpn[mf] = mv
            rows = self.blocks.rows_of_blocks(mv // PAGES)
            pg = mv % PAGES
            self.blocks.resident[GPU, rows, pg] = True
            self.blocks.frame[GPU, rows, pg] = mf
            self.blocks.resident[UVM_ID_CPU, rows, pg] = False
            live = self.pmm.state[-1][mf] == CHUNK_STATE_TEMP_PINNED    # a CPU fault may have taken some back
            if live.any():
                self.pmm.unpin_allocated(mf[live])
        nblocks = int(np.unique(mv // PAGES).size)
        pref = int(np.count_nonzero(np.isin(mv, want[nfault:]))) if want.size > nfault else 0
        self._count(num_pages_in=mv.size, num_prefetched_pages=pref)
        self._charge(self.cost.block_service_ns(nblocks), "block_service")
        return mv

    def _copy_in(self, args, k, frames):
        """Device pages for positions ``k`` of a migration (frames from the PMM): their struct
        pages taken, the system pages copied in (holes zeroed), ``args.dst`` filled."""
        dpfn = self.pfn_base + frames
        zone_device_page_init(self.system, dpfn)
        spfn = migrate_pfn_to_pfn(args.src[k])
        has = spfn >= 0
        if has.any():
            # waited for: migrate_vma_finalize frees the source pages, which the CPU may reuse
            self.device.copy_pages(dpfn[has], spfn[has]).wait()
            self._charge(self.cost.dma_ns("h2d", _runs_of(spfn[has])), "copy_h2d")
            self._count(bytes_xfer_htd=int(has.sum()) * PAGE_SIZE)
        if (~has).any():
            self.device.fill_pages(dpfn[~has], 0)
        wr = ((args.src[k] & _MWRITE) != 0) | (~has & bool(args.vma.vm_flags & VM_WRITE))
        args.dst[k] = migrate_pfn(dpfn) | np.where(wr, _MWRITE, _U(0))

    def _moved(self, args):
        """(vpns, device frames) of the pages of a migration that moved."""
        src, dst = args.src[:args.npages], args.dst[:args.npages]
        dpfn = migrate_pfn_to_pfn(dst)
        k = np.flatnonzero(((src & _MIGRATE) != 0) & (dpfn >= 0))
        return (args.start >> PAGE_SHIFT) + k, dpfn[k] - self.pfn_base

    def _map_local(self, pieces):
        """One page-table command buffer for every page that moved (driver lock held)."""
        vs, ps, fs = [], [], []
        for args in pieces:
            src, dst = args.src[:args.npages], args.dst[:args.npages]
            dpfn = migrate_pfn_to_pfn(dst)
            k = np.flatnonzero(((src & _MIGRATE) != 0) & (dpfn >= 0))
            vs.append((args.start >> PAGE_SHIFT) + k)
            ps.append(dpfn[k])
            fs.append(np.where((dst[k] & _MWRITE) != 0, PTE_WRITE, 0))
        self.pt.map(np.concatenate(vs), np.concatenate(ps), np.concatenate(fs))

    # -- faulted pages that stay where they are: hmm_range_fault ----------------------------------
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
        read, then one page-table update for all of them; returns an errno per page.  System
        pages are mapped remotely, this device's pages locally; the writable pages in ``atomic``
        get PTE_ATOMIC (the emulated link carries device atomics to system memory)."""
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
                if vpns.size:
                    self.pt.map(vpns, pfns, flags)
            remote = int(np.count_nonzero(pfns < self.system.phys.nr_ram))
            self._count(num_map_remote=remote)
            self._charge(self.cost.remote_ns(remote * PAGE_SIZE), "remote")
            return errs
        return np.full(v.size, errno.EBUSY, np.int64)

    def _range(self, v, w, lo, hi, piece, seq):
        first, npages = int(v[lo]), int(v[hi]) - int(v[lo]) + 1
        dense = piece.size == npages
        rng = HmmRange(notifier=self.mni, start=first << PAGE_SHIFT, end=(first + npages) << PAGE_SHIFT,
                       dev_private_owner=self, notifier_seq=seq)
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
        """Pages this device cannot address (another device's coherent memory) move to system
        memory first; True when some did (the caller walks again)."""
        far = pfns[(pfns >= self.system.phys.nr_ram) & ~self.device.owns(pfns)]
        if far.size == 0:
            return False
        migrate_device_coherent_pages(self.system, np.unique(far))
        return True

    # -- reporting and teardown ---------------------------------------------------------------------
    def counters(self):
        """UVM's counters (counters.COUNTER_NAMES): fault_stats, thrashing_stats, transfers, events."""
        self._reap()
        c = dict(self._counters)
        dc = self.device.counters
        for k in ("num_read_faults", "num_write_faults", "num_atomic_faults", "num_duplicate_faults",
                  "num_fault_batches", "num_replays"):
            c[k] += int(dc[k])
        c.update(self.policies["thrashing"].counters())
        for k, val in self.blocks.counters.items():
            c[k] += int(val)
        return c

    def stats(self):
        """The device's figures (its page table, DMA engine, jobs) with the counters and the clock."""
        s = dict(self.device.stats())
        s.update(self.counters())
        s.update({"modelled_s": self.clock.now, "device_bytes": self.device_bytes,
                  "device_free_bytes": self.pmm.free_bytes(), "root_chunks_evicted":
                  self.pmm.stats["root_chunks_evicted"]})
        return s

    def close(self):
        """Stop mirroring: every device page goes back to system memory, the notifier and the
        device memory go (idempotent)."""
        if self.closed:
            return
        self.closed = True
        mmu_interval_notifier_remove(self.mni)
        self.device.synchronize()
        with self.pmm_lock:
            self._reap()
            for r in np.flatnonzero(self.pmm.alloc_list >= 0):
                try:
                    self.pmm.evict_root_chunk(int(r), self._evict)
                except EvictionFailed:
                    continue             # memunmap_pages below names the pages still in use
        self.pt.release()
        memunmap_pages(self.pgmap)


def _runs_of(pfns):
    """Lengths of the runs of consecutive pfns in ``pfns`` (as the DMA engine coalesces them)."""
    p = np.asarray(pfns, np.int64)
    if p.size == 0:
        return np.zeros(0, np.int64)
    cut = np.flatnonzero(np.diff(p) != 1) + 1
    return np.diff(np.concatenate([[0], cut, [p.size]]))
