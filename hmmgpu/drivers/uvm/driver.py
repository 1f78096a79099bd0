"""UvmDriver: nvidia-uvm's fault path, oversubscription and heuristics on the HMM core.

One driver (it replaced MirrorGpu, the fault-batching driver it grew from): it mirrors the
whole address space of a process into ``ndevices`` devices of its own (each an EmulatedDevice whose memory is one device-private
``dev_pagemap``, managed by its own ``Pmm`` in 2 MiB root chunks split to 64 KiB and 4 KiB),
runs device jobs (``drv.jobs``, ``drv.device(i).jobs``), and services each device's drains of
replayable faults as uvm_gpu_replayable_faults.c / uvm_va_block.c do a batch:

1. faults split by VMA (no VMA or PROT_NONE is fatal EFAULT, a write to a read-only VMA EPERM,
   each fault named by its own address);
2. per VA block (2 MiB), the faulted pages plus what the prefetch policy chooses
   (``perf_prefetch``; the density prefetcher at 51% by default) that are not yet resident on
   the faulting device get device memory from its PMM.  When the PMM runs out it evicts whole
   root chunks chosen by the eviction policy (UVM's LRU by default): their pages go back to
   system memory through migrate_device_range, a copy on the DMA engine, migrate_device_pages
   and migrate_device_finalize, as HMM drivers evict (data intact; rss and memcg move with the
   pages).  The chunks of the batch in progress are pinned, so they are never the victims;
   when nothing can be evicted the allocation comes back short and the faulted pages it could
   not serve are mapped remotely (zero-copy) instead: every pass makes progress, which is what
   keeps eviction under oversubscription from livelocking (UVM bug #1223);
3. the pages migrate with migrate_vma_setup / the copy / migrate_vma_pages -- from system
   memory, or from a peer device's memory (device-private pages of this driver: a
   device-to-device copy on the DMA engine) -- and are mapped locally in the device page table
   before migrate_vma_finalize; every other faulted page is mapped through hmm_range_fault
   under one mmu_interval_read_begin / read_retry (its own device pages locally, system pages
   and a peer's pages remotely), one page-table command buffer per drain.

The devices are peers (a PCIe machine's topology, va_block.Topology): each maps the others'
memory (cudaMemAdviseSetAccessedBy, thrashing pins) and copies to and from it.  A CPU access to
a device page faults into ``migrate_to_ram`` (the pgmap's op), which brings the pages home.
Device pages are freed through the pgmap's ``folio_free`` whoever drops the last reference (a
CPU fault, an eviction, a migration to a peer, the process unmapping them); the driver takes
those frees back into the PMM and its VA-block residency at its next step.

Time is one EmulatedClock (``drv.clock``; ``drv.modelled_time`` in seconds) advanced by the
CostModel of ``profile`` for every fault batch, copy (H2D / D2H / peer), remote access, replay
and job launch, whichever device does it (the devices' work is serialised on that one clock);
``drv.counters`` has UVM's names (counters.py), summed over the devices, and
``drv.device(i).counters`` one device's.  With tracing on (hmmgpu.trace) every decision -- what
a drain migrates, prefetches, duplicates or maps remotely, each eviction and its victim,
thrashing hints, access-counter notifications, read-duplicate collapses -- is an event on the
``NAME/policy`` track, stamped with the modelled time.
"""
import errno
import threading

import numpy as np

from ... import trace
from ...constants import PAGE_SHIFT, PAGE_SIZE, TASK_SIZE
from ...device import EmulatedDevice, JobFault
from ...device.clock import EmulatedClock
from ...device.faults import ACCESS_ATOMIC
from ...device.hw import MAX_PEERS
from ...device.pagetable import PTE_ACCESSED, PTE_ATOMIC, PTE_WRITE
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
                       UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT, UVM_PROT_READ_WRITE, VaBlocks, group_sorted,
                       uvm_gpu_id)

_U = np.uint64
_MIGRATE = _U(MIGRATE_PFN_MIGRATE)
_MWRITE = _U(MIGRATE_PFN_WRITE)
PAGES = PAGES_PER_UVM_VA_BLOCK
MIGRATE_GAP_PAGES = 64       # pages to migrate this close in one VMA share one migrate_vma
# evictions of one page within one job after which its faults in that job map it remotely: UVM's
# thrashing threshold (uvm_perf_thrashing_threshold), which is what a page bounced that often is
JOB_EVICTIONS_MAX = uvm_perf_thrashing_threshold
CPU = -1                     # cudaCpuDeviceId: the CPU where advise and prefetch take a device
DEFAULT_DEVICE_BYTES = 64 << 20
# cudaMemAdvise's advice, by the names of cudaMemoryAdvise (cudaMemAdviseSetReadMostly ...)
SET_READ_MOSTLY, UNSET_READ_MOSTLY = "set_read_mostly", "unset_read_mostly"
SET_PREFERRED_LOCATION, UNSET_PREFERRED_LOCATION = "set_preferred_location", "unset_preferred_location"
SET_ACCESSED_BY, UNSET_ACCESSED_BY = "set_accessed_by", "unset_accessed_by"
ADVICE = (SET_READ_MOSTLY, UNSET_READ_MOSTLY, SET_PREFERRED_LOCATION, UNSET_PREFERRED_LOCATION, SET_ACCESSED_BY,
          UNSET_ACCESSED_BY)
API_PIECE_BLOCKS = 32        # an explicit prefetch migrates this many 2 MiB blocks per step
# Why pages migrate to a device, and how each cause is counted
CAUSE_FAULT, CAUSE_API, CAUSE_COUNTER = "fault", "api", "counter"


class _DevmemOps:
    """One device's dev_pagemap_ops: folio_free and migrate_to_ram."""

    def __init__(self, driver, gpu):
        self.driver, self.gpu = driver, gpu

    def folio_free(self, heads, order):
        # Called from whichever thread dropped the last reference, maybe under mm locks: only
        # queued here (list.append is atomic); the driver takes the frees at its next step.
        self.gpu.freed.append(np.array(heads, np.int64))

    def migrate_to_ram(self, vmf):
        return self.driver._cpu_fault(vmf)


class _Jobs:
    """``drv.device(i).jobs``: the device's JobEngine.  Before a launch the driver catches up
    (frees, CPU-side events, pin expiry, read duplicates the CPU wrote); each job that ran is
    charged a kernel launch (a call its arguments refuse never launched), and then the access
    counters its remote accesses raised are serviced."""

    LAUNCHES = frozenset(("memset", "copy", "axpy", "reduce_sum", "gather", "list_chase", "tree_search", "run",
                          "submit"))

    def __init__(self, gpu, engine):
        self._gpu, self._engine = gpu, engine

    def __getattr__(self, name):
        attr = getattr(self._engine, name)
        if name not in self.LAUNCHES:
            return attr
        g = self._gpu
        drv = g.drv

        def launch(*args, **kwargs):
            drv._check_open("job")
            drv._step()
            try:
                result = attr(*args, **kwargs)
            except JobFault:
                drv._charge(drv.cost.launch_ns(), "launch")      # it ran, up to its fatal fault
                raise
            finally:
                drv.blocks.job_evicted[g.id] = 0
            drv._charge(drv.cost.launch_ns(), "launch")
            drv._after_job(g)
            return result
        return launch


class UvmGpu(RangeFaultMirror):
    """One device of a UvmDriver (``drv.device(i)``): ``jobs`` (its job engine), ``pt`` (its
    device page table), ``hw`` (its EmulatedDevice), ``pmm`` (its device memory), ``counters``
    (its UVM counters), ``index`` (0-based) and ``id`` (its UVM processor id, index + 1).  Its
    fault service is the driver's, for this device."""

    def __init__(self, drv, index, device_bytes):
        self.drv = drv
        self.index, self.id = int(index), uvm_gpu_id(index)
        self.name = f"{drv.name}{index}"
        self.system, self.proc, self.lock = drv.system, drv.proc, drv.lock
        self.dev_private_owner = drv         # hmm_range_fault leaves every device's pages device-private
        self.device_bytes = int(device_bytes)
        nframes = self.device_bytes // PAGE_SIZE
        phys = drv.system.phys
        base = phys.request_free_mem_region(nframes)
        # device i on GPU i of the machine, round robin where there are fewer GPUs than devices
        gpu = self.index % drv.system.backend.gpu_count()
        self.hw = self.device = EmulatedDevice(drv.system.backend, nframes, base, phys.ram, gpu=gpu, name=self.name,
                                               service=self.service)
        self.pt = self.hw.pt
        self.pgmap = DevPagemap(MEMORY_DEVICE_PRIVATE, _DevmemOps(drv, self), drv, nframes, arena=self.hw.arena,
                                pfn_first=base)
        self.pfn_base = memremap_pages(self.pgmap, drv.system)
        self.pmm = Pmm(self.device_bytes, clock=drv.clock)
        self.frame_vpn = np.full(nframes, -1, np.int64)      # device frame -> the vpn it holds
        self.dup_pfn = np.full(nframes, -1, np.int64)        # a read duplicate's frame -> the CPU page it copies
        self.ndup = 0
        self.freed = []                                      # pfns folio_free handed back
        self.evicted = []                                    # vpns evicted since the last step
        self._counters = uvm_counters.new_counters()
        ac = drv.policy["access_counters"]
        self.access_counters = AccessCounterUnit(getattr(ac, "uvm_perf_access_counter_threshold",
                                                         uvm_perf_access_counter_threshold))
        self.jobs = _Jobs(self, self.hw.jobs)

    def __repr__(self):
        return f"UvmGpu({self.name}, {self.device_bytes >> 20} MiB, {self.pmm.free_bytes() >> 20} MiB free)"

    def owns(self, pfns):
        return self.hw.owns(pfns)

    def service(self, faults):
        """This device's fault handler: the driver's service of a drain (see UvmDriver)."""
        return self.drv._service(self, faults)

    @property
    def counters(self):
        """This device's counters (counters.COUNTER_NAMES): its fault_stats, transfers, events."""
        self.drv._reap()
        c = dict(self._counters)
        for k in ("num_read_faults", "num_write_faults", "num_atomic_faults", "num_duplicate_faults",
                  "num_fault_batches", "num_replays"):
            c[k] += int(self.hw.counters[k])
        return c

    # RangeFaultMirror's hooks
    def _map(self, vpns, pfns, flags):
        self.drv._map(self, vpns, pfns, flags)

    def _mapped(self, vpns, pfns):
        self.drv._mapped(self, vpns, pfns)

    def evict_root(self, root, frames, owners):
        """Pmm's evict callback."""
        self.drv._evict(self, root, frames, owners)


class UvmDriver:
    """A UVM-class driver mirroring the whole address space of ``proc`` into ``ndevices``
    devices (see the module docstring).

    ``device_bytes``: each device's memory (a positive multiple of 2 MiB; below the working set
    is oversubscription); ``policy``: {"prefetch", "eviction", "thrashing", "access_counters"}
    -> a policy object or its name (POLICY_NAMES; missing keys take nvidia-uvm's defaults);
    ``profile``: the cost model's profile (name, path or dict); ``seed`` seeds the random
    policies; device ``i`` is named ``f"{name}{i}"`` (its trace tracks, its errors).  After ``close()`` jobs, services, advice and prefetches raise OSError(EBADF).
    """

    def __init__(self, system, proc, device_bytes=DEFAULT_DEVICE_BYTES, ndevices=1, profile="h100", seed=0,
                 policy=None, name="gpu"):
        if (isinstance(device_bytes, bool) or not isinstance(device_bytes, (int, np.integer))
                or device_bytes <= 0 or device_bytes % UVM_CHUNK_SIZE_MAX):
            raise oserror(errno.EINVAL, f"UvmDriver '{name}': device_bytes={device_bytes!r} is not a positive "
                          "multiple of 2 MiB")
        if (isinstance(ndevices, bool) or not isinstance(ndevices, (int, np.integer))
                or not 1 <= ndevices <= MAX_PEERS + 1):
            raise oserror(errno.EINVAL, f"UvmDriver '{name}': ndevices={ndevices!r} is not a number of devices "
                          f"from 1 to {MAX_PEERS + 1} (each device is a peer of every other, and a device "
                          f"addresses at most {MAX_PEERS} peers)")
        self.ndevices = int(ndevices)
        self.policy = make_policies(policy, seed=seed, nprocs=self.ndevices + 1)   # errors before any change
        self.system, self.proc = system, proc
        self.start, self.end = 0, TASK_SIZE
        self.name = name
        self.seed = int(seed)
        self.clock = EmulatedClock(profile)
        self.cost = self.clock.model
        self._clock_lock = threading.Lock()
        self.device_bytes = int(device_bytes)
        self.lock = threading.RLock()        # the notifier's sequence and the device page tables
        self.pmm_lock = threading.RLock()    # the PMMs, the VA blocks, the counters; never taken under self.lock
        self.blocks = VaBlocks(ngpus=self.ndevices)
        self._counters = uvm_counters.new_counters()     # the CPU's side: cpu_page_fault_count
        self._ac_batch = getattr(self.policy["access_counters"], "uvm_perf_access_counter_batch_count",
                                 uvm_perf_access_counter_batch_count)
        self._stale = []                     # invalidated ranges (vpns) that may hold read duplicates
        self._cpu_events = []                # (vpns, time, cause): migrations to the CPU, for the thrashing policy
        self.closed = False
        self.gpus = []
        try:
            for i in range(self.ndevices):
                self.gpus.append(UvmGpu(self, i, self.device_bytes))
            for g in self.gpus:              # a PCIe machine: every device a peer of every other
                for h in self.gpus:
                    if h is not g:
                        g.hw.enable_peer_access(h.hw)
        except BaseException:
            for g in self.gpus:
                memunmap_pages(g.pgmap)
            raise
        self.mni = MmuIntervalNotifier()
        for g in self.gpus:
            g.mni = self.mni
        mmu_interval_notifier_insert(self.mni, proc.mm, self.start, self.end - self.start, self)
        for g in self.gpus:
            check_device_mappings(g.pt, self.mni, system)   # DriverBug on a map without read_retry

    def __repr__(self):
        return (f"UvmDriver({self.name}, {self.ndevices} x {self.device_bytes >> 20} MiB, "
                f"t={self.clock.now:.6f} s)")

    def device(self, i):
        """Device ``i`` (a UvmGpu: ``.jobs``, ``.pt``, ``.hw``, ``.pmm``, ``.counters``)."""
        return self.gpus[self._device_index(i, "device")]

    def _device_index(self, i, what, cpu=False):
        ok = isinstance(i, (int, np.integer)) and not isinstance(i, bool)
        if ok and cpu and int(i) == CPU:
            return CPU
        if not ok or not 0 <= int(i) < self.ndevices:
            where = "uvm.CPU or " if cpu else ""
            raise oserror(errno.EINVAL, f"{what}: no device {i!r}; devices: {where}0 to {self.ndevices - 1}")
        return int(i)

    def _check_open(self, what):
        if self.closed:
            raise oserror(errno.EBADF, f"UvmDriver '{self.name}' is closed: no {what} after close()")

    @property
    def jobs(self):
        """Device 0's job engine (memset, reduce_sum, list_chase, run, ...); each launch costs clock time."""
        self._check_open("job")
        return self.gpus[0].jobs

    @property
    def modelled_time(self):
        """Seconds on the emulated clock since the driver was made."""
        return self.clock.now

    def _charge(self, ns, what):
        with self._clock_lock:
            self.clock.advance(ns, what)

    def _count(self, g, **deltas):
        with self._clock_lock:
            uvm_counters.add(self._counters if g is None else g._counters, **deltas)

    def _decision(self, g, name, cat=trace.CAT_MIGRATE, **args):
        """A trace event for a policy decision about device ``g`` (None: the CPU), stamped with
        the modelled time (when tracing)."""
        if trace.enabled:
            trace.instant(name, cat, track=f"{'cpu' if g is None else g.name}/policy", modelled_ns=self.clock.now_ns,
                          **args)

    def _gpu_of(self, pfns):
        """Per pfn: the index of the device whose memory holds it (-1: none of ours)."""
        out = np.full(np.shape(pfns), -1, np.int64)
        for g in self.gpus:
            out[g.owns(pfns)] = g.index
        return out

    # -- the mmu interval notifier op ---------------------------------------------------------
    def invalidate(self, mni, range, cur_seq):
        s, e = max(range.start, self.start), min(range.end, self.end)
        with self.lock:
            mmu_interval_set_seq(mni, cur_seq)
            if s >= e or (range.event == MMU_NOTIFY_SOFT_DIRTY and range.owner is self):
                return True          # our own soft-dirty reset changes no translation
            for g in self.gpus:
                g.pt.invalidate_range(s >> PAGE_SHIFT, (e - s) >> PAGE_SHIFT)
            rows, masks = self.blocks.rows_in(s >> PAGE_SHIFT, e >> PAGE_SHIFT)
            if rows.size:
                self.blocks.remote[:, rows] &= ~masks
            if any(g.ndup for g in self.gpus):
                self._stale.append((s >> PAGE_SHIFT, e >> PAGE_SHIFT))   # collapsed at the next step
        return True

    # -- device memory ------------------------------------------------------------------------
    def _reap(self):
        """Take the device pages freed since the last step (folio_free) back: out of their VA
        blocks' residency (where the block still names that frame) and into the PMMs."""
        if not any(g.freed for g in self.gpus):
            return
        with self.pmm_lock:
            for g in self.gpus:
                got = []
                while g.freed:
                    got.append(g.freed.pop())
                if not got:
                    continue
                frames = np.unique(np.concatenate(got)) - g.pfn_base
                vpn = g.frame_vpn[frames]
                g.frame_vpn[frames] = -1
                held = vpn >= 0
                if held.any():
                    rows = self.blocks.rows_of_blocks(vpn[held] // PAGES, create=False)
                    pg = vpn[held] % PAGES
                    same = self.blocks.frame[g.id, rows, pg] == frames[held]
                    r, p = rows[same], pg[same]
                    self.blocks.resident[g.id, r, p] = False
                    self.blocks.frame[g.id, r, p] = -1
                    # where HMM put them, unless they moved to another device
                    self.blocks.resident[UVM_ID_CPU, r, p] = ~self.blocks.resident[1:, r, p].any(axis=0)
                g.pmm.free(frames)

    def _alloc(self, g, rows, nfirst=None):
        """4 KiB frames of device ``g`` for pages whose VA block rows are ``rows`` (-1 for a page
        that got none), TEMP_PINNED, evicting root chunks as the eviction policy chooses: one PMM
        request per block, in row order -- the first ``nfirst`` pages' blocks (the faulted pages)
        before the rest's (pmm_lock held)."""
        rows = np.asarray(rows, np.int64)
        n = rows.size if nfirst is None else int(nfirst)
        pos, counts, owners = [], [], []
        for part in (np.arange(n), np.arange(n, rows.size)):
            if part.size:
                u, inv, cnt = group_sorted(rows[part])
                pos.append(part[np.argsort(inv, kind="stable")])     # block by block, in page order
                counts.append(cnt)
                owners.append(u)
        frames = np.full(rows.size, -1, np.int64)
        if not pos:
            return frames
        pos, counts = np.concatenate(pos), np.concatenate(counts)
        got_frames, got = g.pmm.alloc_many(counts, UVM_CHUNK_SIZE_4K, np.concatenate(owners), evict=g.evict_root,
                                           policy=self.policy["eviction"])
        rank = np.arange(pos.size) - np.repeat(np.cumsum(counts) - counts, counts)
        frames[pos[rank < np.repeat(got, counts)]] = got_frames     # a short request: its first pages
        return frames

    def _evict(self, g, root, frames, owners):
        """Every page of root chunk ``root`` of device ``g`` back to system memory."""
        n = FRAMES_PER_ROOT
        dups = frames[g.dup_pfn[frames] >= 0]
        if dups.size:                    # read duplicates: the CPU's copy is as good, drop them
            self._collapse(g, g.frame_vpn[dups])
        gone = g.frame_vpn[frames[g.frame_vpn[frames] >= 0]]
        g.evicted.append(gone)
        rows = self.blocks.rows_of_blocks(gone // PAGES, create=False)
        je = self.blocks.job_evicted[g.id]
        je[rows, gone % PAGES] = np.minimum(je[rows, gone % PAGES], JOB_EVICTIONS_MAX) + 1
        pfn0 = g.pfn_base + int(root) * n
        src = np.zeros(n, _U)
        dst = np.zeros(n, _U)
        self._decision(g, "evict", trace.CAT_EVICT, root=int(root), policy=self.policy["eviction"].name,
                       pages=int(frames.size))
        with trace.span("evict", trace.CAT_EVICT, track=f"{g.name}/migrate", root=int(root)):
            migrate_device_range(self.system, src, pfn0, n)
            sel = device_selection(self.system, src, n)
            if sel.size:
                try:
                    pages_to_system(self.system, g.hw, src, dst, sel, n)
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
        self._count(g, num_evictions=1, num_pages_evicted=moved, num_pages_out=moved, bytes_xfer_dth=moved * PAGE_SIZE)
        left, _, _ = g.pmm.allocated_under(int(root))
        if left.size:            # pages a CPU fault or a migration holds: try another root
            raise EvictionFailed(int(root))

    def _to_system(self, src, dst, sel, npages):
        """System pages for the device pages at ``sel`` of a migration out, each device copying
        its own on its DMA engine; returns [(device, positions)] (raises OSError(ENOMEM))."""
        owner = self._gpu_of(migrate_pfn_to_pfn(src[sel]))
        done = []
        for g in self.gpus:
            mine = sel[owner == g.index]
            if mine.size:
                pages_to_system(self.system, g.hw, src, dst, mine, npages)
                done.append((g, mine))
        return done

    def _charge_out(self, done, cpu_fault=False, api=False):
        """Clock and counters of pages copied to system memory ([(device, positions)])."""
        for g, pos in done:
            self._charge(self.cost.dma_ns("d2h", _runs_of(pos)), "copy_d2h")
            n = int(pos.size)
            self._count(g, num_pages_out=n, bytes_xfer_dth=n * PAGE_SIZE, prefetch_bytes_xfer_dth=n * PAGE_SIZE * api)

    def _cpu_fault(self, vmf):
        """migrate_to_ram: a CPU access to pages of these devices brings them home (after the
        thrashing policy's naps, if it throttles the CPU)."""
        addrs = np.asarray(vmf.addresses, dtype=np.int64)
        self._cpu_throttle(np.unique(addrs >> PAGE_SHIFT))
        start, end = int(addrs.min()), int(addrs.max()) + PAGE_SIZE
        args = MigrateVma(vmf.vma, start, end, pgmap_owner=self, flags=MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                          fault_page=vmf.page)
        if migrate_vma_setup(args):
            return VM_FAULT_SIGBUS
        done = []
        try:
            sel = device_selection(self.system, args.src, args.npages)
            if sel.size:
                try:
                    done = self._to_system(args.src, args.dst, sel, args.npages)
                except OSError:
                    args.src[:args.npages] &= ~_MIGRATE
                    return VM_FAULT_OOM
            migrate_vma_pages(args)
        finally:
            migrate_vma_finalize(args)
        self._charge_out(done)
        self._count(None, cpu_page_fault_count=addrs.size)
        if sel.size:
            self._cpu_events.append(((start >> PAGE_SHIFT) + sel, self.clock.now_ns,
                                     UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT))
        return 0

    def _cpu_throttle(self, vpns):
        """As uvm_va_space_cpu_fault throttles: while the thrashing policy's hint for a CPU fault
        on ``vpns`` is THROTTLE, the faulting thread sleeps until the throttling period ends (a
        nap on the clock) and asks again.  A pin on the CPU needs nothing here: the fault
        migrates the pages home, and the policy keeps them there."""
        thr = self.policy["thrashing"]
        for _ in range(2):              # after a nap the period is over: the second hint is not a throttle
            with self.pmm_lock:
                self._cpu_events_to_policy()
                rows = self.blocks.rows_of_blocks(vpns // PAGES)
                pg = vpns % PAGES
                closest = self.blocks.closest_resident_pages(rows, pg, UVM_ID_CPU)
                pref = self.blocks.preferred_location[rows, pg].astype(np.int64)
                hints = thr.get_hint(rows, pg, UVM_ID_CPU, self.clock.now_ns, closest=closest, preferred=pref)
            if not hints.throttle.any():
                return
            end = int(hints.end_ns[hints.throttle].max())
            self._decision(None, "thrashing hint", throttle=int(hints.throttle.sum()), until_ns=end)
            with self._clock_lock:
                self.clock.advance_to(end, "cpu_nap")

    def _cpu_events_to_policy(self):
        """Hand the CPU's migrations since the last step to the thrashing policy (pmm_lock held)."""
        thr = self.policy["thrashing"]
        while self._cpu_events:
            vpns, t, cause = self._cpu_events.pop(0)
            rows, masks = self._masks(vpns)
            thr.on_migration(rows, masks, UVM_ID_CPU, t, cause=cause)

    # -- catching up: what happened since the driver last ran ---------------------------------------
    def _step(self):
        """Before a service or a launch: take freed device pages back, hand the CPU's migrations
        to the thrashing policy, unmap pages whose pin expired, and collapse read duplicates whose
        CPU page changed (an invalidation) or was written (its soft-dirty bit)."""
        self._reap()
        thr = self.policy["thrashing"]
        mm = self.proc.mm
        # the lock order everywhere: mmap_lock, then pmm_lock, then the driver lock
        with mm.mmap_lock.read(), self.pmm_lock:
            self._cpu_events_to_policy()
            rows, masks = thr.expire_pins(self.clock.now_ns)
            if rows.size:
                r, pg = np.nonzero(masks)
                vpns = self.blocks.blocks[rows[r]] * PAGES + pg
                with self.lock:
                    for g in self.gpus:
                        g.pt.invalidate(vpns)         # the next access faults and migrates
            stale, self._stale = self._stale, []
            for g in self.gpus:
                if g.ndup:
                    self._collapse(g, self._changed_duplicates(g, stale))
            evicted = []
            for g in self.gpus:
                evicted.extend(g.evicted)
                g.evicted = []
        if evicted:
            evicted = np.unique(np.concatenate(evicted))
            for g in self.gpus:
                if evicted.size:
                    self._map_accessed_by(g, evicted)

    def _after_job(self, g):
        """After a job of device ``g``: its accesses through remote mappings go to its access
        counters (one per page the device's walker marked accessed); notifications are serviced
        in batches."""
        r, pg = np.nonzero(self.blocks.remote[g.id, :self.blocks.nblocks])
        if r.size:
            vpns = self.blocks.blocks[r] * PAGES + pg
            hit = vpns[(g.pt.lookup(vpns) & _U(PTE_ACCESSED)) != 0]
            if hit.size:
                g.pt.protect(hit, clear=PTE_ACCESSED).wait()
                g.access_counters.record(hit << PAGE_SHIFT)
        policy = self.policy["access_counters"]
        while g.access_counters.pending():
            notes = g.access_counters.fetch(self._ac_batch)
            self._count(g, num_access_counter_notifications=len(notes))
            self._decision(g, "access counter notifications", notifications=len(notes))
            with self.pmm_lock:
                rows, masks = policy.on_notifications(notes, self.blocks, g.id, self.clock.now_ns)
                if rows.size:       # advice wins: pages preferring another processor stay there
                    pref = self.blocks.preferred_location[rows]
                    masks &= (pref == UVM_ID_INVALID) | (pref == g.id)
                r, pg = np.nonzero(masks)
                vpns = self.blocks.blocks[rows[r]] * PAGES + pg
            if vpns.size:
                moved = self._migrate_range(g, np.sort(vpns), CAUSE_COUNTER)
                self._count(g, num_access_counter_migrations=moved)

    def _masks(self, vpns):
        """(unique rows, rows x 512 masks) of the pages ``vpns`` (rows created as needed)."""
        vpns = np.asarray(vpns, np.int64)
        ub, inv, _ = group_sorted(vpns // PAGES)
        rows = self.blocks.rows_of_blocks(ub)
        masks = np.zeros((ub.size, PAGES), bool)
        masks[inv, vpns % PAGES] = True
        return rows, masks

    # -- read duplication (cudaMemAdviseSetReadMostly) -----------------------------------------------
    def _duplicates(self, g, vpns):
        """Which of ``vpns`` have a read duplicate on device ``g`` (a valid copy there and one on
        the CPU)."""
        out = np.zeros(vpns.size, bool)
        if not g.ndup:
            return out
        rows = self.blocks.rows_of_blocks(vpns // PAGES, create=False)
        ok = rows >= 0
        pg = vpns % PAGES
        f = self.blocks.frame[g.id, rows[ok], pg[ok]]
        out[ok] = (f >= 0) & (g.dup_pfn[np.maximum(f, 0)] >= 0)
        return out

    def _collapse_all(self, vpns):
        """Drop every device's read duplicates among ``vpns`` (pmm_lock held)."""
        for g in self.gpus:
            d = self._duplicates(g, vpns)
            if d.any():
                self._collapse(g, vpns[d])

    def _changed_duplicates(self, g, stale):
        """The vpns of device ``g``'s read duplicates to collapse: in a ``stale`` range
        (invalidated since), or written by the CPU (mmap_lock and pmm_lock held)."""
        frames = np.flatnonzero(g.dup_pfn >= 0)
        vpns = g.frame_vpn[frames]
        bad = np.zeros(vpns.size, bool)
        for s, e in stale:
            bad |= (vpns >= s) & (vpns < e)
        mm = self.proc.mm
        for vma in mm.vmas_in(int(vpns.min(initial=0)) << PAGE_SHIFT, (int(vpns.max(initial=0)) + 1) << PAGE_SHIFT):
            inside = (vpns >= vma.start >> PAGE_SHIFT) & (vpns < vma.end >> PAGE_SHIFT)
            if not inside.any():
                continue
            pte = vma.pte[vpns[inside] - (vma.start >> PAGE_SHIFT)]
            written = (~cpu_pt.pte_present(pte) | ((pte & cpu_pt.PTE_DIRTY) != 0)
                       | (cpu_pt.pte_pfn(pte) != g.dup_pfn[frames[inside]]))
            bad[inside] |= written
        return vpns[bad]

    def _collapse(self, g, vpns):
        """Drop device ``g``'s copies of read-duplicated pages ``vpns`` (pmm_lock held): the
        CPU's copy is the page again (UvmEventTypeReadDuplicateInvalidate)."""
        vpns = np.unique(np.asarray(vpns, np.int64))
        if vpns.size == 0:
            return
        rows = self.blocks.rows_of_blocks(vpns // PAGES, create=False)
        pg = vpns % PAGES
        frames = self.blocks.frame[g.id, rows, pg]
        with self.lock:
            g.pt.invalidate(vpns)
        self.blocks.resident[g.id, rows, pg] = False
        self.blocks.frame[g.id, rows, pg] = -1
        g.frame_vpn[frames] = -1
        g.dup_pfn[frames] = -1
        g.ndup -= int(vpns.size)
        g.pmm.free(frames)
        self._count(g, num_read_duplicate_invalidates=vpns.size)
        self._decision(g, "read duplicate collapse", pages=int(vpns.size))

    def _duplicate(self, g, vma, vpns):
        """Read-duplicate ``vpns`` (sorted, CPU pages of ``vma``) on device ``g``: a device copy
        mapped read-only locally beside the CPU's, whose soft-dirty bits are reset first so that
        a CPU write shows.  Returns the vpns duplicated."""
        with self.pmm_lock:
            frames = self._alloc(g, self.blocks.rows_of_blocks(vpns // PAGES))
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
                done, pfns = self._copy_and_map_duplicates(g, vpns, frames)
        finally:
            with self.pmm_lock:
                keep = np.isin(vpns, done)
                spare = np.concatenate([unused[unused >= 0], frames[~keep]])
                if spare.size:
                    g.pmm.free(spare)
                f = frames[keep]
                if f.size:
                    r = self.blocks.rows_of_blocks(done // PAGES)
                    self.blocks.resident[g.id, r, done % PAGES] = True
                    self.blocks.resident[UVM_ID_CPU, r, done % PAGES] = True
                    self.blocks.frame[g.id, r, done % PAGES] = f
                    g.frame_vpn[f] = done
                    g.dup_pfn[f] = pfns
                    g.ndup += int(f.size)
                    g.pmm.unpin_allocated(f)
        self._count(g, num_read_duplicates=done.size, num_pages_in=done.size, bytes_xfer_htd=done.size * PAGE_SIZE)
        self._decision(g, "read duplicate", pages=int(done.size))
        return done

    def _copy_and_map_duplicates(self, g, vpns, frames):
        """hmm_range_fault (read) of ``vpns``, the copy into ``frames`` of device ``g``, the
        read-only local map under the sequence check; returns (vpns, CPU pfns) duplicated."""
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
                g.hw.copy_pages(g.pfn_base + f, p).wait()
                self._charge(self.cost.dma_ns("h2d", _runs_of(p)), "copy_h2d")
            with self.lock:
                if mmu_interval_read_retry(self.mni, seq):
                    continue
                if v.size:
                    g.pt.map(v, g.pfn_base + f, np.zeros(v.size, np.int64))     # read-only
            return v, p
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    # -- the fault path -------------------------------------------------------------------------
    def _service(self, g, faults):
        """Service a drain of device ``g``'s faults (a FaultDrain, or any FaultBatch): 0 or an
        errno per fault (None when all were serviced)."""
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
        self._count(g, gpu_page_fault_count=pos.size)
        if trace.enabled:
            kinds = np.bincount(faults.access.astype(np.int64), minlength=3)
            trace.instant("fault", trace.CAT_FAULT, track=f"{g.name}/faults", pages=len(faults),
                          first=hex(int(faults.vaddr.min())), last=hex(int(faults.vaddr.max())),
                          read=int(kinds[0]), write=int(kinds[1]), atomic=int(kinds[2]))
        with trace.span("uvm service", trace.CAT_FAULT, track=f"{g.name}/faults", faults=int(pos.size)):
            if pos.size:
                done = self._migrate_faulted(g, v[pos], w[pos])
                pos = pos[~done]
            if pos.size:
                errs[order[pos]] = g._fault_pages(v[pos], w[pos], v[pos][at[pos]])
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

    def _migrate_faulted(self, g, v, w):
        """Migrate (or read-duplicate) the faulted pages ``v`` (sorted) of device ``g`` and what
        the prefetcher adds to its memory, mapping them locally; returns the mask of ``v``
        mapped that way."""
        done = np.zeros(v.size, bool)
        mm = self.proc.mm
        plans = []
        with mm.mmap_lock.read():
            for vma, ok in self._vma_groups(v, w):
                plans.append((vma, ok) + self._plan(g, v[ok], w[ok], vma.start >> PAGE_SHIFT,
                                                    vma.end >> PAGE_SHIFT))
        for vma, ok, need, extra, dup in plans:
            moved = [np.zeros(0, np.int64)]
            if dup.size:
                moved.append(self._duplicate(g, vma, dup))
            if need.size or extra.size:
                with mm.mmap_lock.read():
                    moved.append(self._migrate_in(g, vma, np.concatenate([need, extra]), need.size, CAUSE_FAULT))
            done[ok] = np.isin(v[ok], np.concatenate(moved))
        return done

    def _plan(self, g, fv, fw, lo, hi):
        """What the faults ``fv`` (sorted vpns, write mask ``fw``) of device ``g`` in one VMA,
        [lo, hi) in vpns, do: (pages to migrate, pages the prefetcher adds, pages to
        read-duplicate).

        As uvm_va_block_select_residency and the perf modules decide: a write to a read duplicate
        collapses it first; pages preferring another processor stay there (mapped remotely);
        read faults on read-mostly pages duplicate; the thrashing policy pins (maps remotely) or
        throttles (the device naps on the clock) pages that bounce; the prefetch policy adds
        pages of the faulted blocks."""
        thr = self.policy["thrashing"]
        with self.pmm_lock:
            if fw.any():
                self._collapse_all(fv[fw])
            rows, faulted = self._masks(fv)
            ub = self.blocks.blocks[rows]
            ri = np.searchsorted(ub, fv // PAGES)
            pg = fv % PAGES
            resident = self.blocks.resident[g.id, rows]
            pref = self.blocks.preferred_location[rows[ri], pg].astype(np.int64)
            worn = self.blocks.job_evicted[g.id, rows] >= JOB_EVICTIONS_MAX
            need = ~resident[ri, pg] & ((pref == UVM_ID_INVALID) | (pref == g.id)) & ~worn[ri, pg]
            dup = need & ~fw & self.blocks.read_duplication[rows[ri], pg]
            need &= ~dup
            now = self.clock.now_ns
            k = np.flatnonzero(need)
            if k.size:
                closest = self.blocks.closest_resident_pages(rows[ri[k]], pg[k], g.id)
                hints = thr.get_hint(rows[ri[k]], pg[k], g.id, now,
                                     closest=np.where(closest >= 0, closest, UVM_ID_CPU), preferred=pref[k])
                pinned_away = hints.pin & (hints.residency != g.id)
                need[k[pinned_away]] = False
                if hints.pin.any() or hints.throttle.any():
                    self._decision(g, "thrashing hint", pin=int(hints.pin.sum()),
                                   pinned_away=int(pinned_away.sum()), throttle=int(hints.throttle.sum()))
                if hints.throttle.any():                  # the faulting device naps until the period ends
                    with self._clock_lock:
                        self.clock.advance_to(int(hints.end_ns[hints.throttle].max()), "nap")
            first = np.clip(lo - ub * PAGES, 0, PAGES)
            outer = np.clip(hi - ub * PAGES, 0, PAGES)
            row_pref = np.full(rows.size, UVM_ID_INVALID, np.int64)
            row_pref[ri[::-1]] = pref[::-1]               # the first faulted page's, per block
            ctx = PrefetchContext(rows, faulted, g.id, resident=resident, first=first,
                                  outer=outer, thrashing=thr.thrashing_pages(rows), preferred_location=row_pref,
                                  first_touch=~self.blocks.resident_anywhere(rows), now_ns=now)
            extra = self.policy["prefetch"].prefetch(ctx)
            bpref = self.blocks.preferred_location[rows]
            extra &= (bpref == UVM_ID_INVALID) | (bpref == g.id)
            extra &= ~self.blocks.read_duplication[rows]
            extra &= ~worn
            extra[ri, pg] = False
            er, ep = np.nonzero(extra)
        self._decision(g, "prefetch", policy=self.policy["prefetch"].name, faulted=int(need.sum()),
                       prefetched=int(er.size), duplicate=int(dup.sum()), remote=int(fv.size - need.sum() - dup.sum()))
        return fv[need], ub[er] * PAGES + ep, fv[dup]

    def _migrate_range(self, g, vpns, cause):
        """Migrate ``vpns`` (sorted) to device ``g``'s memory VMA by VMA, in pieces of
        API_PIECE_BLOCKS blocks (so that one call larger than device memory evicts its own
        earlier pieces); returns how many pages moved."""
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
                        moved += int(self._migrate_in(g, vma, part, 0, cause).size)
        return moved

    def _migrate_in(self, g, vma, want, nfault, cause):
        """Migrate pages ``want`` of ``vma`` (for CAUSE_FAULT the first ``nfault`` faulted, the
        rest prefetched) to device ``g``'s memory -- from system memory or a peer's -- and map
        them; returns the vpns that moved."""
        with self.pmm_lock:
            self._collapse_all(want)
            rows = self.blocks.rows_of_blocks(want // PAGES)
            keep = ~self.blocks.resident[g.id, rows, want % PAGES]
            nfault = int(np.count_nonzero(keep[:nfault]))
            want = want[keep]
        with self.pmm_lock:
            # device memory first, faulted pages before prefetched ones, one request per block
            frames = self._alloc(g, rows[keep], nfault)
        have = frames >= 0
        order = np.argsort(want[have], kind="stable")
        vp, fr = want[have][order], frames[have][order]
        moved_v, moved_f, unused = [], [], [np.zeros(0, np.int64)]
        cut = np.flatnonzero(np.diff(vp) > MIGRATE_GAP_PAGES) + 1
        pieces = []
        flags = MIGRATE_VMA_SELECT_SYSTEM | (MIGRATE_VMA_SELECT_DEVICE_PRIVATE if self.ndevices > 1 else 0)
        try:
            for pv, pf in zip(np.split(vp, cut), np.split(fr, cut)):       # one migrate_vma per run
                if pv.size == 0:
                    continue
                args = MigrateVma(vma, int(pv[0]) << PAGE_SHIFT, (int(pv[-1]) + 1) << PAGE_SHIFT, pgmap_owner=self,
                                  flags=flags)
                if migrate_vma_setup(args) != 0:
                    unused.append(pf)
                    continue
                pieces.append(args)
                k = pv - int(pv[0])
                go = (args.src[k] & _MIGRATE) != 0
                if go.any() and self.ndevices > 1:       # not the pages already on this device
                    go[go] = ~g.owns(migrate_pfn_to_pfn(args.src[k[go]]))
                unused.append(pf[~go])
                if go.any():
                    self._copy_in(g, args, k[go], pf[go])
                migrate_vma_pages(args)
                mv, mf = self._moved(g, args)
                moved_v.append(mv)
                moved_f.append(mf)
            mv = np.concatenate(moved_v) if moved_v else np.zeros(0, np.int64)
            mf = np.concatenate(moved_f) if moved_f else np.zeros(0, np.int64)
            with self.lock:                     # the pages are locked: no CPU access races
                if mv.size:
                    self._map_local(g, pieces)
        finally:
            for args in pieces:
                migrate_vma_finalize(args)
        with self.pmm_lock:
            self._reap()                        # destinations that did not make it, sources on peers
            unused = np.concatenate(unused)
            if unused.size:
                g.pmm.free(unused)
            live = g.pmm.state[-1][mf] == CHUNK_STATE_TEMP_PINNED    # a CPU fault may have taken some back
            mv, mf = mv[live], mf[live]
            g.frame_vpn[mf] = mv
            rows = self.blocks.rows_of_blocks(mv // PAGES)
            pg = mv % PAGES
            self.blocks.resident[g.id, rows, pg] = True
            self.blocks.frame[g.id, rows, pg] = mf
            self.blocks.resident[UVM_ID_CPU, rows, pg] = False
            self.blocks.remote[g.id, rows, pg] = False
            if mf.size:
                g.pmm.unpin_allocated(mf)
        nblocks = group_sorted(mv // PAGES)[0].size
        self._charge(self.cost.block_service_ns(nblocks), "block_service")
        self._count(g, num_pages_in=mv.size)
        with self.pmm_lock:
            self._after_migration(g, mv, want, nfault, cause)
        return mv

    def _after_migration(self, g, mv, want, nfault, cause):
        """Counters and thrashing events of pages ``mv`` that moved to device ``g`` (pmm_lock held)."""
        thr, now = self.policy["thrashing"], self.clock.now_ns
        if mv.size == 0:
            return
        if cause == CAUSE_FAULT:
            pref = np.isin(mv, want[nfault:])
            self._count(g, num_prefetched_pages=int(pref.sum()))
            for sel, why in ((~pref, UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT),
                             (pref, UVM_MAKE_RESIDENT_CAUSE_PREFETCH)):
                if sel.any():
                    rows, masks = self._masks(mv[sel])
                    thr.on_migration(rows, masks, g.id, now, cause=why)
        else:
            rows, masks = self._masks(mv)
            why = (UVM_MAKE_RESIDENT_CAUSE_ACCESS_COUNTER if cause == CAUSE_COUNTER
                   else UVM_MAKE_RESIDENT_CAUSE_API_MIGRATE)
            thr.on_migration(rows, masks, g.id, now, cause=why)
            if cause == CAUSE_API:
                self._count(g, prefetch_bytes_xfer_htd=mv.size * PAGE_SIZE)

    def _copy_in(self, g, args, k, frames):
        """Device pages of ``g`` for positions ``k`` of a migration (frames from its PMM): their
        struct pages taken, the source pages copied in -- system memory over H2D, a peer's
        memory device to device -- (holes zeroed), ``args.dst`` filled."""
        dpfn = g.pfn_base + frames
        zone_device_page_init(self.system, dpfn)
        spfn = migrate_pfn_to_pfn(args.src[k])
        has = spfn >= 0
        if has.any():
            # waited for: migrate_vma_finalize frees the source pages, which the CPU may reuse
            g.hw.copy_pages(dpfn[has], spfn[has]).wait()
            ram = spfn[has] < self.system.phys.nr_ram
            if ram.any():
                self._charge(self.cost.dma_ns("h2d", _runs_of(spfn[has][ram])), "copy_h2d")
                self._count(g, bytes_xfer_htd=int(ram.sum()) * PAGE_SIZE)
            if (~ram).any():
                self._charge(self.cost.dma_ns("peer", _runs_of(spfn[has][~ram])), "copy_peer")
                self._count(g, bytes_xfer_dtd=int((~ram).sum()) * PAGE_SIZE)
                for h in self.gpus:
                    n = int(np.count_nonzero(h.owns(spfn[has][~ram])))
                    if n:
                        self._count(h, num_pages_out=n)
        if (~has).any():
            g.hw.fill_pages(dpfn[~has], 0)
        wr = ((args.src[k] & _MWRITE) != 0) | (~has & bool(args.vma.vm_flags & VM_WRITE))
        args.dst[k] = migrate_pfn(dpfn) | np.where(wr, _MWRITE, _U(0))

    def _moved(self, g, args):
        """(vpns, device frames of ``g``) of the pages of a migration that moved."""
        src, dst = args.src[:args.npages], args.dst[:args.npages]
        dpfn = migrate_pfn_to_pfn(dst)
        k = np.flatnonzero(((src & _MIGRATE) != 0) & (dpfn >= 0))
        return (args.start >> PAGE_SHIFT) + k, dpfn[k] - g.pfn_base

    def _map_local(self, g, pieces):
        """One page-table command buffer for every page that moved to ``g`` (driver lock held):
        writable pages read-write-atomic, as UVM maps a GPU's own memory (UVM_PROT_READ_WRITE_ATOMIC;
        atomics on local memory are native)."""
        vs, ps, fs = [], [], []
        for args in pieces:
            src, dst = args.src[:args.npages], args.dst[:args.npages]
            dpfn = migrate_pfn_to_pfn(dst)
            k = np.flatnonzero(((src & _MIGRATE) != 0) & (dpfn >= 0))
            vs.append((args.start >> PAGE_SHIFT) + k)
            ps.append(dpfn[k])
            fs.append(np.where((dst[k] & _MWRITE) != 0, PTE_WRITE | PTE_ATOMIC, 0))
        g.pt.map(np.concatenate(vs), np.concatenate(ps), np.concatenate(fs))

    # -- faulted pages that stay where they are: hmm_range_fault ----------------------------------
    def _map(self, g, vpns, pfns, flags):
        """RangeFaultMirror's page-table update for device ``g`` (driver lock held): system pages
        and a peer's pages are mapped remotely (atomics only where an atomic fault asked), its
        own pages locally, read-write-atomic where writable (the bookkeeping follows in
        ``_mapped``, without this lock)."""
        if vpns.size:
            own = g.owns(pfns) & ((flags & PTE_WRITE) != 0)
            g.pt.map(vpns, pfns, np.where(own, flags | PTE_ATOMIC, flags))

    def _mapped(self, g, vpns, pfns):
        remote = ~g.owns(pfns)
        self._mapped_remote(g, vpns[remote], pfns[remote])
        local = pfns[~remote]
        if local.size:               # uvm_pmm_gpu_mark_root_chunk_used: LRU sees the use
            with self.pmm_lock:
                g.pmm.mark_root_chunk_used(local - g.pfn_base)

    def _mapped_remote(self, g, vpns, pfns):
        """Bookkeeping of pages device ``g`` now maps remotely (zero-copy system memory, or a
        peer's memory): the holder keeps them, ``g`` maps them (what its access counters look
        at), and reads them in place once (modelled as one remote read of each page)."""
        if vpns.size == 0:
            return
        where = np.where(pfns < self.system.phys.nr_ram, UVM_ID_CPU, self._gpu_of(pfns) + 1)
        with self.pmm_lock:
            rows = self.blocks.rows_of_blocks(vpns // PAGES)
            pg = vpns % PAGES
            cpu = where == UVM_ID_CPU
            self.blocks.resident[UVM_ID_CPU, rows[cpu], pg[cpu]] = True
            self.blocks.prot[g.id, rows, pg] = UVM_PROT_READ_WRITE
            self.blocks.map_target[g.id, rows, pg] = where
            # an invalidation since the map may leave this flag stale: harmless, the access
            # counters only count entries the device's walker marked accessed
            self.blocks.remote[g.id, rows, pg] = True
        self._count(g, num_map_remote=vpns.size)
        npeer = int(np.count_nonzero(where != UVM_ID_CPU))
        self._charge(self.cost.remote_ns((vpns.size - npeer) * PAGE_SIZE)
                     + self.cost.remote_ns(npeer * PAGE_SIZE, peer=True), "remote")

    # -- cudaMemAdvise and cudaMemPrefetchAsync -----------------------------------------------------
    def _api_range(self, start, length, what):
        """Validate an API range: page-aligned, not empty, inside the user address space;
        returns vpns [s, e)."""
        ok = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (start, length))
        if not ok or start % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise oserror(errno.EINVAL, f"{what}: the range must be page-aligned and not empty", start,
                          start + length if ok else start)
        if start < 0 or start + length > TASK_SIZE:
            raise oserror(errno.EINVAL, f"{what}: the range is outside the user address space "
                          f"[0, 0x{TASK_SIZE:x})", start, start + length)
        return int(start) >> PAGE_SHIFT, (int(start) + int(length)) >> PAGE_SHIFT

    def advise(self, addr, length, advice, device=0):
        """cudaMemAdvise of [addr, addr + length): ``advice`` one of ADVICE (uvm.SET_READ_MOSTLY,
        SET_PREFERRED_LOCATION, SET_ACCESSED_BY and the UNSET_ forms), ``device`` a device index
        or uvm.CPU (for the preferred location and accessed-by).

        SET_PREFERRED_LOCATION: faults of other processors map the pages remotely instead of
        migrating them (the CPU cannot map device memory, so its faults still migrate), and the
        prefetcher and access counters leave them; SET_ACCESSED_BY(device): the device maps the
        pages where they are now (no faults) and again after they move; SET_READ_MOSTLY: a device
        read fault makes a read-only device copy beside the CPU's (read duplication), collapsed to
        one copy on the first write by any processor.  The UNSET_ forms undo them
        (UNSET_READ_MOSTLY collapses the duplicates).  EINVAL for a range that is not
        page-aligned in the user address space, an unknown advice or device; nothing changes
        then.  Pages of the range that no VMA maps are left alone."""
        self._check_open("advise")
        s, e = self._api_range(addr, length, "advise")
        if advice not in ADVICE:
            raise oserror(errno.EINVAL, f"advise: no advice {advice!r}; advice: {', '.join(ADVICE)}", addr)
        d = self._device_index(device, "advise", cpu=True)
        pid = UVM_ID_CPU if d == CPU else uvm_gpu_id(d)
        self._step()
        vpns = self._mapped_vpns(s, e)
        if vpns.size == 0:
            return
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
                    self._collapse_all(vpns)
        if advice == SET_ACCESSED_BY and d != CPU:
            self._map_accessed_by(self.gpus[d], vpns)

    def _mapped_vpns(self, s, e):
        """The vpns of [s, e) that some VMA maps (sorted)."""
        out = []
        for vma in self.proc.mm.vmas_in(s << PAGE_SHIFT, e << PAGE_SHIFT):
            out.append(np.arange(max(s, vma.start >> PAGE_SHIFT), min(e, vma.end >> PAGE_SHIFT), dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _map_accessed_by(self, g, vpns):
        """Map the pages of ``vpns`` that device ``g`` has accessed-by advice for where they are
        now: hmm_range_fault without faulting anything in, valid entries mapped."""
        rows = self.blocks.rows_of_blocks(vpns // PAGES, create=False)
        ok = rows >= 0
        ok[ok] = (self.blocks.accessed_by[rows[ok], vpns[ok] % PAGES] >> g.id) & 1 == 1
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
            v, p, f = g._entries(got)
            with self.lock:
                if mmu_interval_read_retry(self.mni, seq):
                    continue
                self._map(g, v, p, f)
            self._mapped(g, v, p)
            return

    def prefetch(self, addr, length, device=0):
        """cudaMemPrefetchAsync of [addr, addr + length) to device ``device`` (an index) or
        uvm.CPU: the pages migrate there (to a device: mapped locally, evicting as needed, from
        system memory or a peer; to the CPU: through migrate_vma, as a CPU fault would bring
        them).  Returns the number of pages moved.  EINVAL for a range that is not page-aligned
        in the user address space or an unknown device; pages no VMA maps are left alone."""
        self._check_open("prefetch")
        s, e = self._api_range(addr, length, "prefetch")
        d = self._device_index(device, "prefetch", cpu=True)
        self._step()
        vpns = self._mapped_vpns(s, e)
        if vpns.size == 0:
            return 0
        if d != CPU:
            return self._migrate_range(self.gpus[d], vpns, CAUSE_API)
        moved = self._migrate_out(vpns)
        for g in self.gpus:
            self._map_accessed_by(g, vpns)
        return moved

    def _migrate_out(self, vpns, api=True):
        """Bring the device pages among ``vpns`` (sorted) back to system memory, VMA by VMA
        (migrate_vma of the device-private pages, the copies, pages and finalize)."""
        mm = self.proc.mm
        moved = [np.zeros(0, np.int64)]
        with self.pmm_lock:
            self._collapse_all(vpns)
        with mm.mmap_lock.read():
            for vma in mm.vmas_in(int(vpns[0]) << PAGE_SHIFT, (int(vpns[-1]) + 1) << PAGE_SHIFT):
                s = max(vma.start, int(vpns[0]) << PAGE_SHIFT)
                e = min(vma.end, (int(vpns[-1]) + 1) << PAGE_SHIFT)
                args = MigrateVma(vma, s, e, pgmap_owner=self, flags=MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
                if migrate_vma_setup(args):
                    continue
                done = []
                try:
                    sel = device_selection(self.system, args.src, args.npages)
                    if sel.size:
                        done = self._to_system(args.src, args.dst, sel, args.npages)
                    migrate_vma_pages(args)
                finally:
                    migrate_vma_finalize(args)
                self._charge_out(done, api=api)
                moved.append((s >> PAGE_SHIFT) + sel)
        moved = np.concatenate(moved)
        if moved.size:
            self._cpu_events.append((moved, self.clock.now_ns, UVM_MAKE_RESIDENT_CAUSE_API_MIGRATE))
        self._step()
        return int(moved.size)

    # -- reporting and teardown ---------------------------------------------------------------------
    @property
    def counters(self):
        """UVM's counters (counters.COUNTER_NAMES) summed over the devices, with the CPU's
        (cpu_page_fault_count) and the thrashing policy's; ``drv.device(i).counters`` has one
        device's."""
        c = dict(self._counters)
        for g in self.gpus:
            for k, v in g.counters.items():
                c[k] += v
        c.update(self.policy["thrashing"].counters())
        for k, val in self.blocks.counters.items():
            c[k] += int(val)
        return c

    def stats(self):
        """The devices' figures (page tables, DMA engines, jobs, device memory and what is free of
        it: summed over the devices) with the counters and the clock."""
        s = {}
        for g in self.gpus:
            for k, v in g.hw.stats().items():
                s[k] = s.get(k, 0) + v
        s.update(getattr(self.system.backend, "counters", None) or {})     # the backend's totals, once
        s.update(self.counters)
        s.update({"modelled_s": self.clock.now, "ndevices": self.ndevices,
                  "device_bytes": self.ndevices * self.device_bytes,
                  "device_free_bytes": sum(g.pmm.free_bytes() for g in self.gpus),
                  "root_chunks_evicted": sum(g.pmm.stats["root_chunks_evicted"] for g in self.gpus)})
        return s

    def close(self):
        """Stop mirroring: every device page goes back to system memory, the notifier and the
        device memory go (idempotent)."""
        if self.closed:
            return
        self.closed = True
        mmu_interval_notifier_remove(self.mni)
        for g in self.gpus:
            g.hw.synchronize()
        with self.pmm_lock:
            self._reap()
            for g in self.gpus:
                if g.ndup:
                    self._collapse(g, g.frame_vpn[g.dup_pfn >= 0])
                for r in np.flatnonzero(g.pmm.alloc_list >= 0):
                    try:
                        g.pmm.evict_root_chunk(int(r), g.evict_root)
                    except EvictionFailed:
                        continue             # memunmap_pages below names the pages still in use
        for g in self.gpus:
            g.pt.release()
            memunmap_pages(g.pgmap)


def _runs_of(pfns):
    """Lengths of the runs of consecutive pfns in ``pfns`` (as the DMA engine coalesces them)."""
    p = np.asarray(pfns, np.int64)
    if p.size == 0:
        return np.zeros(0, np.int64)
    cut = np.flatnonzero(np.diff(p) != 1) + 1
    return np.diff(np.concatenate([[0], cut, [p.size]]))
