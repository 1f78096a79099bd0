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
UVM's names (counters.py).  With tracing on (hmmgpu.trace) every decision -- what a drain
migrates, prefetches, duplicates or maps remotely, each eviction and its victim, thrashing hints,
access-counter notifications, read-duplicate collapses -- is an event on the ``NAME/policy``
track, stamped with the modelled time.
"""
import errno
import threading

import numpy as np

from ... import trace
from ...constants import PAGE_SHIFT, PAGE_SIZE
from ...device import EmulatedDevice, JobFault
from ...device.clock import EmulatedClock
from ...device.faults import ACCESS_ATOMIC
from ...device.pagetable import PTE_ACCESSED, PTE_WRITE
from ...errors import oserror
from ...hmm.debug import check_device_mappings
from ...hmm.hmm import (HMM_PFN_REQ_FAULT, HMM_PFN_VALID, HMM_RANGE_DEFAULT_TIMEOUT, HmmRange, hmm_pfn_to_pfn,
                        hmm_range_fault)
from ...hmm.memremap import MEMORY_DEVICE_PRIVATE, DevPagemap, memremap_pages, memunmap_pages, zone_device_page_init
from ...hmm.migrate_device import (MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                                   MIGRATE_VMA_SELECT_SYSTEM, MigrateVma, migrate_device_finalize,
                                   migrate_device_pages, migrate_device_range, migrate_pfn,
                                   migrate_pfn_to_pfn, migrate_vma_finalize, migrate_vma_pages, migrate_vma_setup)
from ...mm import pgtable as cpu_pt
from ...mm.notifier import (MMU_NOTIFY_SOFT_DIRTY, MmuIntervalNotifier, invalidation, mmu_interval_notifier_insert,
                            mmu_interval_notifier_remove, mmu_interval_read_begin, mmu_interval_read_retry,
                            mmu_interval_set_seq)
from ...mm.vma import VM_READ, VM_WRITE
from .._range_fault import RangeFaultMirror
from ..dmirror import VM_FAULT_OOM, VM_FAULT_SIGBUS, device_selection, pages_to_system
from . import counters as uvm_counters
from .access_counters import AccessCounterUnit, uvm_perf_access_counter_batch_count, uvm_perf_access_counter_threshold
from .perf_prefetch import PrefetchContext
from .perf_thrashing import uvm_perf_thrashing_threshold
from .pmm import CHUNK_STATE_TEMP_PINNED, FRAMES_PER_ROOT, UVM_CHUNK_SIZE_4K, UVM_CHUNK_SIZE_MAX, EvictionFailed, Pmm
from .registry import make_policies
from .va_block import (PAGES_PER_UVM_VA_BLOCK, UVM_ID_CPU, UVM_ID_INVALID, UVM_MAKE_RESIDENT_CAUSE_ACCESS_COUNTER,
                       UVM_MAKE_RESIDENT_CAUSE_API_MIGRATE, UVM_MAKE_RESIDENT_CAUSE_PREFETCH,
                       UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT, UVM_PROT_READ_WRITE, VaBlocks, uvm_gpu_id)

_U = np.uint64
_MIGRATE = _U(MIGRATE_PFN_MIGRATE)
_MWRITE = _U(MIGRATE_PFN_WRITE)
PAGES = PAGES_PER_UVM_VA_BLOCK
MIGRATE_GAP_PAGES = 64       # pages to migrate this close in one VMA share one migrate_vma
# evictions of one page within one job after which its faults in that job map it remotely: UVM's
# thrashing threshold (uvm_perf_thrashing_threshold), which is what a page bounced that often is
JOB_EVICTIONS_MAX = uvm_perf_thrashing_threshold
GPU = uvm_gpu_id(0)
PROCESSORS = {"cpu": UVM_ID_CPU, "gpu": GPU}
# cudaMemAdvise's advice, by the names of cudaMemoryAdvise (cudaMemAdviseSetReadMostly ...)
ADVICE = ("set_read_mostly", "unset_read_mostly", "set_preferred_location", "unset_preferred_location",
          "set_accessed_by", "unset_accessed_by")
API_PIECE_BLOCKS = 32        # an explicit prefetch migrates this many 2 MiB blocks per step
# Why pages migrate to the device, and how each cause is counted
CAUSE_FAULT, CAUSE_API, CAUSE_COUNTER = "fault", "api", "counter"


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
    """``drv.jobs``: the device's JobEngine.  Before a launch the driver catches up (frees,
    CPU-side events, pin expiry, read duplicates the CPU wrote); each job that ran is charged a
    kernel launch (a call its arguments refuse never launched), and then the access counters
    its remote accesses raised are serviced."""

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
            drv._step()
            try:
                result = attr(*args, **kwargs)
            except JobFault:
                drv._charge(drv.cost.launch_ns(), "launch")      # it ran, up to its fatal fault
                raise
            finally:
                drv._job_evicted[:] = 0
            drv._charge(drv.cost.launch_ns(), "launch")
            drv._after_job()
            return result
        return launch


class UvmDriver(RangeFaultMirror):
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
        ac = self.policies["access_counters"]
        self.access_counters = AccessCounterUnit(getattr(ac, "uvm_perf_access_counter_threshold",
                                                         uvm_perf_access_counter_threshold))
        self._ac_batch = getattr(ac, "uvm_perf_access_counter_batch_count", uvm_perf_access_counter_batch_count)
        self._vpn0 = start >> PAGE_SHIFT
        self.dev_private_owner = self       # hmm_range_fault leaves our pages device-private
        self._remote = np.zeros((end - start) >> PAGE_SHIFT, bool)   # mapped remotely (access counted)
        # How often each page was evicted during the job that runs now: a page evicted
        # JOB_EVICTIONS_MAX times that faults again in the same job is mapped remotely, not
        # migrated.  A job lane is replayed whole, so a pass whose pages outgrow device memory
        # (all lanes' rows of a matrix, plus a vector) evicted the half it needed next for the
        # half it needed now, and faulted on it again, forever; now each page moves in at most
        # JOB_EVICTIONS_MAX + 1 times per job, and every job finishes.
        self._job_evicted = np.zeros((end - start) >> PAGE_SHIFT, np.uint8)
        self._dup_pfn = np.full(nframes, -1, np.int64)       # a read duplicate's frame -> the CPU page it copies
        self._ndup = 0
        self._stale = []                     # invalidated ranges (vpns) that may hold read duplicates
        self._cpu_events = []                # (vpns, time, cause): migrations to the CPU, for the thrashing policy
        self._evicted = []                   # vpns evicted since the last step (accessed-by maps them again)
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

    def _decision(self, name, cat=trace.CAT_MIGRATE, **args):
        """A trace event for a policy decision, stamped with the modelled time (when tracing)."""
        if trace.enabled:
            trace.instant(name, cat, track=f"{self.name}/policy", modelled_ns=self.clock.now_ns, **args)

    # -- the mmu interval notifier op ---------------------------------------------------------
    def invalidate(self, mni, range, cur_seq):
        s, e = max(range.start, self.start), min(range.end, self.end)
        with self.lock:
            mmu_interval_set_seq(mni, cur_seq)
            if s >= e or (range.event == MMU_NOTIFY_SOFT_DIRTY and range.owner is self):
                return True          # our own soft-dirty reset changes no translation
            self.pt.invalidate_range(s >> PAGE_SHIFT, (e - s) >> PAGE_SHIFT)
            self._remote[(s >> PAGE_SHIFT) - self._vpn0:(e >> PAGE_SHIFT) - self._vpn0] = False
            if self._ndup:
                self._stale.append((s >> PAGE_SHIFT, e >> PAGE_SHIFT))   # collapsed at the next step
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
                self.blocks.resident[UVM_ID_CPU, rows[same], pg[same]] = True     # where HMM put them
            self.pmm.free(frames)

    def _alloc(self, n, owner):
        """``n`` 4 KiB device frames for VA block row ``owner``, TEMP_PINNED, evicting root chunks
        as the eviction policy chooses; fewer when nothing more can be evicted."""
        return self.pmm.alloc(n, UVM_CHUNK_SIZE_4K, owner, evict=self._evict, policy=self.policies["eviction"])

    def _evict(self, root, frames, owners):
        """Pmm's evict callback: every page of root chunk ``root`` back to system memory."""
        n = FRAMES_PER_ROOT
        dups = frames[self._dup_pfn[frames] >= 0]
        if dups.size:                    # read duplicates: the CPU's copy is as good, drop them
            self._collapse(self._frame_vpn[dups])
        gone = self._frame_vpn[frames[self._frame_vpn[frames] >= 0]]
        self._evicted.append(gone)
        k = gone - self._vpn0
        self._job_evicted[k] = np.minimum(self._job_evicted[k], JOB_EVICTIONS_MAX) + 1
        pfn0 = self.pfn_base + int(root) * n
        src = np.zeros(n, _U)
        dst = np.zeros(n, _U)
        self._decision("evict", trace.CAT_EVICT, root=int(root), policy=self.policies["eviction"].name,
                       pages=int(frames.size))
        with trace.span("evict", trace.CAT_EVICT, track=f"{self.name}/migrate", root=int(root)):
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
        if moved:
            self._cpu_events.append(((start >> PAGE_SHIFT) + sel, self.clock.now_ns,
                                     UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT))
        return 0

    # -- catching up: what happened since the driver last ran ---------------------------------------
    def _step(self):
        """Before a service or a launch: take freed device pages back, hand the CPU's migrations
        to the thrashing policy, unmap pages whose pin expired, and collapse read duplicates whose
        CPU page changed (an invalidation) or was written (its soft-dirty bit)."""
        self._reap()
        thr = self.policies["thrashing"]
        mm = self.proc.mm
        # the lock order everywhere: mmap_lock, then pmm_lock, then the driver lock
        with mm.mmap_lock.read(), self.pmm_lock:
            while self._cpu_events:
                vpns, t, cause = self._cpu_events.pop(0)
                rows, masks = self._masks(vpns)
                thr.on_migration(rows, masks, UVM_ID_CPU, t, cause=cause)
            rows, masks = thr.expire_pins(self.clock.now_ns)
            if rows.size:
                r, pg = np.nonzero(masks)
                vpns = self.blocks.blocks[rows[r]] * PAGES + pg
                with self.lock:
                    self.pt.invalidate(vpns)         # the next access faults and migrates
            if self._ndup:
                self._collapse(self._changed_duplicates())
            evicted = np.unique(np.concatenate(self._evicted)) if self._evicted else None
            self._evicted = []
        if evicted is not None and evicted.size:
            self._map_accessed_by(evicted)

    def _after_job(self):
        """After a job: its accesses through remote mappings go to the access counters (one per
        page the device's walker marked accessed); notifications are serviced in batches."""
        idx = np.flatnonzero(self._remote)
        if idx.size:
            vpns = idx + self._vpn0
            hit = vpns[(self.pt.lookup(vpns) & _U(PTE_ACCESSED)) != 0]
            if hit.size:
                self.pt.protect(hit, clear=PTE_ACCESSED).wait()
                self.access_counters.record(hit << PAGE_SHIFT)
        policy = self.policies["access_counters"]
        while self.access_counters.pending():
            notes = self.access_counters.fetch(self._ac_batch)
            self._count(num_access_counter_notifications=len(notes))
            self._decision("access counter notifications", notifications=len(notes))
            with self.pmm_lock:
                rows, masks = policy.on_notifications(notes, self.blocks, GPU, self.clock.now_ns)
                if rows.size:       # advice wins: pages preferring the CPU stay there
                    masks &= self.blocks.preferred_location[rows] != UVM_ID_CPU
                r, pg = np.nonzero(masks)
                vpns = self.blocks.blocks[rows[r]] * PAGES + pg
            vpns = vpns[(vpns >= self._vpn0) & (vpns < self._vpn0 + self._remote.size)]
            if vpns.size:
                moved = self._migrate_range(vpns, CAUSE_COUNTER)
                self._count(num_access_counter_migrations=moved)

    def _masks(self, vpns):
        """(unique rows, rows x 512 masks) of the pages ``vpns`` (rows created as needed)."""
        vpns = np.asarray(vpns, np.int64)
        ub, inv = np.unique(vpns // PAGES, return_inverse=True)
        rows = self.blocks.rows_of_blocks(ub)
        masks = np.zeros((ub.size, PAGES), bool)
        masks[inv, vpns % PAGES] = True
        return rows, masks

    # -- read duplication (cudaMemAdviseSetReadMostly) -----------------------------------------------
    def _duplicates(self, vpns):
        """Which of ``vpns`` are read-duplicated (a valid copy on the device and one on the CPU)."""
        rows = self.blocks.rows_of_blocks(vpns // PAGES, create=False)
        ok = rows >= 0
        pg = vpns % PAGES
        out = np.zeros(vpns.size, bool)
        f = self.blocks.frame[GPU, rows[ok], pg[ok]]
        out[ok] = (f >= 0) & (self._dup_pfn[np.maximum(f, 0)] >= 0)
        return out

    def _changed_duplicates(self):
        """The vpns of read duplicates to collapse: invalidated since, or written by the CPU
        (mmap_lock and pmm_lock held)."""
        frames = np.flatnonzero(self._dup_pfn >= 0)
        vpns = self._frame_vpn[frames]
        bad = np.zeros(vpns.size, bool)
        while self._stale:
            s, e = self._stale.pop()
            bad |= (vpns >= s) & (vpns < e)
        mm = self.proc.mm
        for vma in mm.vmas_in(int(vpns.min(initial=0)) << PAGE_SHIFT, (int(vpns.max(initial=0)) + 1) << PAGE_SHIFT):
            inside = (vpns >= vma.start >> PAGE_SHIFT) & (vpns < vma.end >> PAGE_SHIFT)
            if not inside.any():
                continue
            pte = vma.pte[vpns[inside] - (vma.start >> PAGE_SHIFT)]
            written = (~cpu_pt.pte_present(pte) | ((pte & cpu_pt.PTE_DIRTY) != 0)
                       | (cpu_pt.pte_pfn(pte) != self._dup_pfn[frames[inside]]))
            bad[inside] |= written
        return vpns[bad]

    def _collapse(self, vpns):
        """Drop the device copies of read-duplicated pages ``vpns`` (pmm_lock held): the CPU's
        copy is the page again (UvmEventTypeReadDuplicateInvalidate)."""
        vpns = np.unique(np.asarray(vpns, np.int64))
        if vpns.size == 0:
            return
        rows = self.blocks.rows_of_blocks(vpns // PAGES, create=False)
        pg = vpns % PAGES
        frames = self.blocks.frame[GPU, rows, pg]
        with self.lock:
            self.pt.invalidate(vpns)
        self.blocks.resident[GPU, rows, pg] = False
        self.blocks.frame[GPU, rows, pg] = -1
        self._frame_vpn[frames] = -1
        self._dup_pfn[frames] = -1
        self._ndup -= int(vpns.size)
        self.pmm.free(frames)
        self._count(num_read_duplicate_invalidates=vpns.size)
        self._decision("read duplicate collapse", pages=int(vpns.size))

    def _duplicate(self, vma, vpns):
        """Read-duplicate ``vpns`` (sorted, CPU pages of ``vma``): a device copy mapped read-only
        locally beside the CPU's, whose soft-dirty bits are reset first so that a CPU write shows.
        Returns the vpns duplicated."""
        frames = np.full(vpns.size, -1, np.int64)
        with self.pmm_lock:
            rows = self.blocks.rows_of_blocks(vpns // PAGES)
            for r in np.unique(rows):                       # one allocation per block
                idx = np.flatnonzero(rows == r)
                f = self._alloc(idx.size, int(r))
                frames[idx[:f.size]] = f
        have = frames >= 0
        unused = frames[~have]
        vpns, frames = vpns[have], frames[have]
        done = np.zeros(0, np.int64)
        mm = self.proc.mm
        try:
            if vpns.size:
                lo, hi = int(vpns[0]) << PAGE_SHIFT, (int(vpns[-1]) + 1) << PAGE_SHIFT
                with mm.mmap_lock.read():
                    with invalidation(mm, lo, hi, MMU_NOTIFY_SOFT_DIRTY, owner=self), mm.phys.lock:
                        i = vpns - (vma.start >> PAGE_SHIFT)           # clear_refs' soft-dirty reset
                        pte = vma.pte[i]
                        vma.pte[i] = np.where(cpu_pt.pte_present(pte), pte & ~cpu_pt.PTE_DIRTY, pte)
                done, pfns = self._copy_and_map_duplicates(vpns, frames)
        finally:
            with self.pmm_lock:
                keep = np.isin(vpns, done)
                spare = np.concatenate([unused[unused >= 0], frames[~keep]])
                if spare.size:
                    self.pmm.free(spare)
                f = frames[keep]
                if f.size:
                    r = self.blocks.rows_of_blocks(done // PAGES)
                    self.blocks.resident[GPU, r, done % PAGES] = True
                    self.blocks.resident[UVM_ID_CPU, r, done % PAGES] = True
                    self.blocks.frame[GPU, r, done % PAGES] = f
                    self._frame_vpn[f] = done
                    self._dup_pfn[f] = pfns
                    self._ndup += int(f.size)
                    self.pmm.unpin_allocated(f)
        self._count(num_read_duplicates=done.size, num_pages_in=done.size, bytes_xfer_htd=done.size * PAGE_SIZE)
        self._decision("read duplicate", pages=int(done.size))
        return done

    def _copy_and_map_duplicates(self, vpns, frames):
        """hmm_range_fault (read) of ``vpns``, the copy into ``frames``, the read-only local map
        under the sequence check; returns (vpns, CPU pfns) duplicated."""
        mm = self.proc.mm
        first, n = int(vpns[0]), int(vpns[-1]) - int(vpns[0]) + 1
        for _ in range(HMM_RANGE_DEFAULT_TIMEOUT):
            seq = mmu_interval_read_begin(self.mni)
            rng = HmmRange(notifier=self.mni, start=first << PAGE_SHIFT, end=(first + n) << PAGE_SHIFT,
                           dev_private_owner=self, notifier_seq=seq)
            req = np.zeros(n, _U)
            req[vpns - first] = _U(HMM_PFN_REQ_FAULT)
            rng.hmm_pfns, rng.pfn_flags_mask = req, HMM_PFN_REQ_FAULT
            with mm.mmap_lock.read():
                ret = hmm_range_fault(rng)
            if ret == -errno.EBUSY:
                continue
            if ret:
                break
            e = rng.hmm_pfns[vpns - first]
            pfns = hmm_pfn_to_pfn(e)
            ok = (((e & _U(HMM_PFN_VALID)) != 0) & (pfns >= 0) & (pfns < self.system.phys.nr_ram)
                  & (pfns != self.system.phys.zero_pfn))
            v, p, f = vpns[ok], pfns[ok], frames[ok]
            if v.size:
                self.device.copy_pages(self.pfn_base + f, p).wait()
                self._charge(self.cost.dma_ns("h2d", _runs_of(p)), "copy_h2d")
            with self.lock:
                if mmu_interval_read_retry(self.mni, seq):
                    continue
                if v.size:
                    self.pt.map(v, self.pfn_base + f, np.zeros(v.size, np.int64))     # read-only
            return v, p
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    # -- the fault path -------------------------------------------------------------------------
    def service(self, faults):
        """Service a drain of device faults (a FaultDrain, or any FaultBatch): 0 or an errno per
        fault (None when all were serviced)."""
        self._check_open("fault service")
        self._step()
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
        """Migrate (or read-duplicate) the faulted pages ``v`` (sorted) and what the prefetcher
        adds to device memory, mapping them locally; returns the mask of ``v`` mapped that way."""
        done = np.zeros(v.size, bool)
        mm = self.proc.mm
        plans = []
        with mm.mmap_lock.read():
            for vma, ok in self._vma_groups(v, w):
                lo = max(vma.start, self.start) >> PAGE_SHIFT
                hi = min(vma.end, self.end) >> PAGE_SHIFT
                plans.append((vma, ok) + self._plan(v[ok], w[ok], lo, hi))
        for vma, ok, need, extra, dup in plans:
            moved = [np.zeros(0, np.int64)]
            if dup.size:
                moved.append(self._duplicate(vma, dup))
            if need.size or extra.size:
                with mm.mmap_lock.read():
                    moved.append(self._migrate_in(vma, np.concatenate([need, extra]), need.size, CAUSE_FAULT))
            done[ok] = np.isin(v[ok], np.concatenate(moved))
        return done

    def _plan(self, fv, fw, lo, hi):
        """What the faults ``fv`` (sorted vpns, write mask ``fw``) of one VMA, whose mirrored part
        is [lo, hi), do: (pages to migrate, pages the prefetcher adds, pages to read-duplicate).

        As uvm_va_block_select_residency and the perf modules decide: a write to a read duplicate
        collapses it first; pages preferring the CPU stay there (mapped remotely); read faults on
        read-mostly pages duplicate; the thrashing policy pins (maps remotely) or throttles (the
        device naps on the clock) pages that bounce; the prefetch policy adds pages of the
        faulted blocks."""
        thr = self.policies["thrashing"]
        with self.pmm_lock:
            wdup = fv[fw & self._duplicates(fv)]
            if wdup.size:
                self._collapse(wdup)
            rows, faulted = self._masks(fv)
            ub = self.blocks.blocks[rows]
            ri = np.searchsorted(ub, fv // PAGES)
            pg = fv % PAGES
            resident = self.blocks.resident[GPU, rows]
            pref = self.blocks.preferred_location[rows[ri], pg].astype(np.int64)
            need = ~resident[ri, pg] & (pref != UVM_ID_CPU) & (self._job_evicted[fv - self._vpn0] < JOB_EVICTIONS_MAX)
            dup = need & ~fw & self.blocks.read_duplication[rows[ri], pg]
            need &= ~dup
            now = self.clock.now_ns
            k = np.flatnonzero(need)
            if k.size:
                hints = thr.get_hint(rows[ri[k]], pg[k], GPU, now, closest=np.full(k.size, UVM_ID_CPU),
                                     preferred=pref[k])
                pinned_away = hints.pin & (hints.residency != GPU)
                need[k[pinned_away]] = False
                if hints.pin.any() or hints.throttle.any():
                    self._decision("thrashing hint", pin=int(hints.pin.sum()), pinned_away=int(pinned_away.sum()),
                                   throttle=int(hints.throttle.sum()))
                if hints.throttle.any():                  # the faulting device naps until the period ends
                    with self._clock_lock:
                        self.clock.advance_to(int(hints.end_ns[hints.throttle].max()), "nap")
            first = np.clip(lo - ub * PAGES, 0, PAGES)
            outer = np.clip(hi - ub * PAGES, 0, PAGES)
            row_pref = np.full(rows.size, UVM_ID_INVALID, np.int64)
            row_pref[ri[::-1]] = pref[::-1]               # the first faulted page's, per block
            ctx = PrefetchContext(rows, faulted, GPU, resident=resident, first=first,
                                  outer=outer, thrashing=thr.thrashing_pages(rows), preferred_location=row_pref,
                                  first_touch=~self.blocks.resident_anywhere(rows), now_ns=now)
            extra = self.policies["prefetch"].prefetch(ctx)
            extra &= self.blocks.preferred_location[rows] != UVM_ID_CPU
            extra &= ~self.blocks.read_duplication[rows]
            if (self._job_evicted >= JOB_EVICTIONS_MAX).any():
                bv = ub[:, None] * PAGES + np.arange(PAGES)
                inside = (bv >= self._vpn0) & (bv < self._vpn0 + self._job_evicted.size)
                worn = self._job_evicted[np.clip(bv - self._vpn0, 0, self._job_evicted.size - 1)] >= JOB_EVICTIONS_MAX
                extra &= ~(inside & worn)
            extra[ri, pg] = False
            er, ep = np.nonzero(extra)
        self._decision("prefetch", policy=self.policies["prefetch"].name, faulted=int(need.sum()),
                       prefetched=int(er.size), duplicate=int(dup.sum()), remote=int(fv.size - need.sum() - dup.sum()))
        return fv[need], ub[er] * PAGES + ep, fv[dup]

    def _migrate_range(self, vpns, cause):
        """Migrate ``vpns`` (sorted, inside the mirrored range) to device memory VMA by VMA, in
        pieces of API_PIECE_BLOCKS blocks (so that one call larger than device memory evicts
        its own earlier pieces); returns how many pages moved."""
        mm = self.proc.mm
        moved = 0
        with mm.mmap_lock.read():
            for vma in mm.vmas_in(int(vpns[0]) << PAGE_SHIFT, (int(vpns[-1]) + 1) << PAGE_SHIFT):
                if not vma.vm_flags & VM_READ:
                    continue
                a = int(np.searchsorted(vpns, vma.start >> PAGE_SHIFT))
                b = int(np.searchsorted(vpns, vma.end >> PAGE_SHIFT))
                piece = vpns[a:b]
                cut = np.flatnonzero(np.diff(piece // (PAGES * API_PIECE_BLOCKS)) != 0) + 1
                for part in np.split(piece, cut):
                    if part.size:
                        moved += int(self._migrate_in(vma, part, 0, cause).size)
        return moved

    def _migrate_in(self, vma, want, nfault, cause):
        """Migrate pages ``want`` of ``vma`` (for CAUSE_FAULT the first ``nfault`` faulted, the
        rest prefetched) to device memory and map them; returns the vpns that moved."""
        with self.pmm_lock:
            gpu = self._duplicates(want)
            if gpu.any():
                self._collapse(want[gpu])
            rows = self.blocks.rows_of_blocks(want // PAGES)
            keep = ~self.blocks.resident[GPU, rows, want % PAGES]
            nfault = int(np.count_nonzero(keep[:nfault]))
            want = want[keep]
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
            live = self.pmm.state[-1][mf] == CHUNK_STATE_TEMP_PINNED    # a CPU fault may have taken some back
            mv, mf = mv[live], mf[live]
            self._frame_vpn[mf] = mv
            rows = self.blocks.rows_of_blocks(mv // PAGES)
            pg = mv % PAGES
            self.blocks.resident[GPU, rows, pg] = True
            self.blocks.frame[GPU, rows, pg] = mf
            self.blocks.resident[UVM_ID_CPU, rows, pg] = False
            self._remote[mv - self._vpn0] = False
            if mf.size:
                self.pmm.unpin_allocated(mf)
        nblocks = int(np.unique(mv // PAGES).size)
        self._charge(self.cost.block_service_ns(nblocks), "block_service")
        self._count(num_pages_in=mv.size)
        with self.pmm_lock:
            self._after_migration(mv, want, nfault, cause)
        return mv

    def _after_migration(self, mv, want, nfault, cause):
        """Counters and thrashing events of pages ``mv`` that moved to the device (pmm_lock held)."""
        thr, now = self.policies["thrashing"], self.clock.now_ns
        if mv.size == 0:
            return
        if cause == CAUSE_FAULT:
            pref = np.isin(mv, want[nfault:])
            self._count(num_prefetched_pages=int(pref.sum()))
            for sel, why in ((~pref, UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT),
                             (pref, UVM_MAKE_RESIDENT_CAUSE_PREFETCH)):
                if sel.any():
                    rows, masks = self._masks(mv[sel])
                    thr.on_migration(rows, masks, GPU, now, cause=why)
        else:
            rows, masks = self._masks(mv)
            why = (UVM_MAKE_RESIDENT_CAUSE_ACCESS_COUNTER if cause == CAUSE_COUNTER
                   else UVM_MAKE_RESIDENT_CAUSE_API_MIGRATE)
            thr.on_migration(rows, masks, GPU, now, cause=why)
            if cause == CAUSE_API:
                self._count(prefetch_bytes_xfer_htd=mv.size * PAGE_SIZE)

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
    def _map(self, vpns, pfns, flags):
        """RangeFaultMirror's page-table update (driver lock held): system pages are mapped
        remotely, this device's pages locally."""
        if vpns.size:
            self.pt.map(vpns, pfns, flags)
        rv = vpns[pfns < self.system.phys.nr_ram]
        self._remote[rv - self._vpn0] = True

    def _mapped(self, vpns, pfns):
        self._mapped_remote(vpns[pfns < self.system.phys.nr_ram])
        local = pfns[self.device.owns(pfns)]
        if local.size:               # uvm_pmm_gpu_mark_root_chunk_used: LRU sees the use
            with self.pmm_lock:
                self.pmm.mark_root_chunk_used(local - self.pfn_base)

    def _mapped_remote(self, vpns):
        """Bookkeeping of system pages the device now maps remotely (zero-copy): the CPU holds
        them, the device maps them (what the access counters look at), and the device reads them
        in place once (modelled as one zero-copy read of each page)."""
        if vpns.size == 0:
            return
        with self.pmm_lock:
            rows = self.blocks.rows_of_blocks(vpns // PAGES)
            pg = vpns % PAGES
            self.blocks.resident[UVM_ID_CPU, rows, pg] = True
            self.blocks.prot[GPU, rows, pg] = UVM_PROT_READ_WRITE
            self.blocks.map_target[GPU, rows, pg] = UVM_ID_CPU
        self._count(num_map_remote=vpns.size)
        self._charge(self.cost.remote_ns(vpns.size * PAGE_SIZE), "remote")

    # -- cudaMemAdvise and cudaMemPrefetchAsync -----------------------------------------------------
    def _api_range(self, start, length, what):
        """Validate an API range: page-aligned, inside the mirrored range; returns vpns [s, e)."""
        ok = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (start, length))
        if not ok or start % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise oserror(errno.EINVAL, f"{what}: the range must be page-aligned and not empty", start,
                          start + length if ok else start)
        if start < self.start or start + length > self.end:
            raise oserror(errno.EINVAL, f"{what}: the range is not inside the mirrored "
                          f"[0x{self.start:x}, 0x{self.end:x})", start, start + length)
        return int(start) >> PAGE_SHIFT, (int(start) + int(length)) >> PAGE_SHIFT

    @staticmethod
    def _processor(p, what, start):
        pid = PROCESSORS.get(p, p) if isinstance(p, str) else p
        if pid not in PROCESSORS.values():
            raise oserror(errno.EINVAL, f"{what}: no processor {p!r}; processors: cpu, gpu", start)
        return int(pid)

    def advise(self, start, length, advice, processor="gpu"):
        """cudaMemAdvise of [start, start + length): ``advice`` one of ADVICE, ``processor``
        "cpu" or "gpu" (for the preferred location and accessed-by).

        set_preferred_location: faults of the other processor map the pages remotely instead of
        migrating them (the CPU cannot map device memory, so its faults still migrate), and the
        prefetcher and access counters leave them; set_accessed_by("gpu"): the device maps the
        pages where they are now (no faults) and again after they come back to the CPU;
        set_read_mostly: a device read fault makes a read-only device copy beside the CPU's
        (read duplication), collapsed to one copy on the first write by either side.  The unset
        forms undo them (unset_read_mostly collapses the duplicates).  EINVAL for a range that is
        not page-aligned inside the mirrored range, an unknown advice or processor."""
        self._check_open("advise")
        s, e = self._api_range(start, length, "advise")
        if advice not in ADVICE:
            raise oserror(errno.EINVAL, f"advise: no advice {advice!r}; advice: {', '.join(ADVICE)}", start)
        pid = self._processor(processor, "advise", start)
        self._step()
        vpns = np.arange(s, e, dtype=np.int64)
        with self.pmm_lock:
            rows, masks = self._masks(vpns)
            if advice.endswith("preferred_location"):
                val = pid if advice.startswith("set") else UVM_ID_INVALID
                self.blocks.preferred_location[rows] = np.where(masks, val, self.blocks.preferred_location[rows])
            elif advice.endswith("accessed_by"):
                bit = np.uint32(1 << pid)
                cur = self.blocks.accessed_by[rows]
                new = cur | bit if advice.startswith("set") else cur & ~bit
                self.blocks.accessed_by[rows] = np.where(masks, new, cur)
            else:
                self.blocks.read_duplication[rows] = np.where(masks, advice.startswith("set"),
                                                              self.blocks.read_duplication[rows])
                if advice.startswith("unset"):
                    self._collapse(vpns[self._duplicates(vpns)])
        if advice == "set_accessed_by" and pid == GPU:
            self._map_accessed_by(vpns)

    def _map_accessed_by(self, vpns):
        """Map the pages of ``vpns`` the device has accessed-by advice for where they are now:
        hmm_range_fault without faulting anything in, valid entries mapped."""
        rows = self.blocks.rows_of_blocks(vpns // PAGES, create=False)
        ok = rows >= 0
        ok[ok] = (self.blocks.accessed_by[rows[ok], vpns[ok] % PAGES] >> GPU) & 1 == 1
        vpns = vpns[ok]
        if vpns.size == 0:
            return
        mm = self.proc.mm
        for _ in range(HMM_RANGE_DEFAULT_TIMEOUT):
            seq = mmu_interval_read_begin(self.mni)
            got, busy = [], False
            with mm.mmap_lock.read():
                for vma in mm.vmas_in(int(vpns[0]) << PAGE_SHIFT, (int(vpns[-1]) + 1) << PAGE_SHIFT):
                    a = int(np.searchsorted(vpns, vma.start >> PAGE_SHIFT))
                    b = int(np.searchsorted(vpns, vma.end >> PAGE_SHIFT))
                    if a == b or not vma.vm_flags & VM_READ:
                        continue
                    first, n = int(vpns[a]), int(vpns[b - 1]) - int(vpns[a]) + 1
                    rng = HmmRange(notifier=self.mni, start=first << PAGE_SHIFT, end=(first + n) << PAGE_SHIFT,
                                   dev_private_owner=self, notifier_seq=seq)
                    ret = hmm_range_fault(rng)
                    if ret == -errno.EBUSY:
                        busy = True
                        break
                    if ret == 0:
                        e = rng.hmm_pfns.copy()
                        e[~np.isin(np.arange(first, first + n), vpns[a:b])] = 0
                        got.append((first, e))
            if busy:
                continue
            v, p, f = self._entries(got)
            with self.lock:
                if mmu_interval_read_retry(self.mni, seq):
                    continue
                if v.size:
                    self.pt.map(v, p, f)
                rv = v[p < self.system.phys.nr_ram]
                self._remote[rv - self._vpn0] = True
            self._mapped_remote(rv)
            return

    def prefetch(self, start, length, dst="gpu"):
        """cudaMemPrefetchAsync of [start, start + length) to ``dst`` ("gpu" or "cpu"): the pages
        migrate there (to the device: mapped locally, evicting as needed; to the CPU: through
        migrate_vma, as a CPU fault would bring them).  Returns the number of pages moved.  EINVAL
        for a range that is not page-aligned inside the mirrored range or an unknown ``dst``."""
        self._check_open("prefetch")
        s, e = self._api_range(start, length, "prefetch")
        pid = self._processor(dst, "prefetch", start)
        self._step()
        vpns = np.arange(s, e, dtype=np.int64)
        if pid == GPU:
            return self._migrate_range(vpns, CAUSE_API)
        moved = self._migrate_out(vpns)
        self._map_accessed_by(vpns)
        return moved

    def _migrate_out(self, vpns):
        """Bring the device pages among ``vpns`` (sorted) back to system memory, VMA by VMA
        (migrate_vma of the device-private pages, the copy, pages and finalize)."""
        mm = self.proc.mm
        moved = [np.zeros(0, np.int64)]
        with self.pmm_lock:
            d = self._duplicates(vpns)
            if d.any():
                self._collapse(vpns[d])
        with mm.mmap_lock.read():
            for vma in mm.vmas_in(int(vpns[0]) << PAGE_SHIFT, (int(vpns[-1]) + 1) << PAGE_SHIFT):
                s = max(vma.start, int(vpns[0]) << PAGE_SHIFT)
                e = min(vma.end, (int(vpns[-1]) + 1) << PAGE_SHIFT)
                args = MigrateVma(vma, s, e, pgmap_owner=self, flags=MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
                if migrate_vma_setup(args):
                    continue
                try:
                    sel = device_selection(self.system, args.src, args.npages)
                    if sel.size:
                        pages_to_system(self.system, self.device, args.src, args.dst, sel, args.npages)
                    migrate_vma_pages(args)
                finally:
                    migrate_vma_finalize(args)
                moved.append((s >> PAGE_SHIFT) + sel)
        moved = np.concatenate(moved)
        self._charge(self.cost.dma_ns("d2h", _runs_of(moved)), "copy_d2h")
        self._count(num_pages_out=moved.size, bytes_xfer_dth=moved.size * PAGE_SIZE,
                    prefetch_bytes_xfer_dth=moved.size * PAGE_SIZE)
        if moved.size:
            self._cpu_events.append((moved, self.clock.now_ns, UVM_MAKE_RESIDENT_CAUSE_API_MIGRATE))
        self._step()
        return int(moved.size)

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
            if self._ndup:
                self._collapse(self._frame_vpn[self._dup_pfn >= 0])
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
