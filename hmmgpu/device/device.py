"""EmulatedDevice: one emulated GPU -- its memory, MMU, fault buffer, compute and copy engines.

This is the hardware a driver (dmirror, svm) programs.  It knows pfns and virtual addresses,
never processes or VMAs: the driver resolves those through the HMM core and tells the device
what to map.

    dev = EmulatedDevice(backend, nframes, pfn_base, host_arena, gpu=0,
                         fault_buffer_entries=None, fault_batch_size=256,
                         max_batches_per_service=20, replay_policy="batch_flush",
                         slice_lanes=65536, service=None)

Memory
    dev.arena                 this device's frames (Arena of kind "device"); global pfns
                              [pfn_base, pfn_base + nframes) are frames [0, nframes) of it.
                              With lazy_memory=True only address space until the driver calls
                              dev.arena.commit(first, n) for the frames it is about to use
    dev.host_arena            system RAM, pfns [0, nr_ram) (the backend's host arena)
    dev.owns(pfns)            bool mask: which pfns are this device's frames
    dev.can_address(pfns)     bool mask: which pfns it reaches: system RAM, its own frames, an
                              enabled peer's frames
    dev.read_pages(pfns) / dev.write_pages(pfns, data) / dev.fill_pages(pfns, value)
                              CPU-side access by global pfn (any pfn it can address), vectorised
    dev.copy_pages(dst_pfns, src_pfns) -> Fence
                              the DMA engine by global pfn (RAM <-> device, device <-> device,
                              either side an enabled peer's: one DMA batch per (destination
                              memory, source memory) pair)
    dev.dma                   the DmaEngine itself (arena + frame-index form)
    The device writes system RAM asynchronously (copies, remote stores): a CPU access through
    ``host_arena.host`` sees them after the Fence of that work (read_pages waits by itself).

Peers (cudaDeviceEnablePeerAccess; several devices of one system, as a multi-GPU driver has)
    dev.enable_peer_access(peer)   from now on ``dev`` addresses ``peer``'s frames: its page
                              tables map them (pt.map, map_huge), its jobs load, store and add
                              atomically through such entries, copy_pages reaches them.  One
                              direction (``peer.enable_peer_access(dev)`` for the other); twice
                              does nothing; ValueError for the device itself, another backend,
                              another system RAM, overlapping pfns, or a peer past MAX_PEERS (7)
    dev.disable_peer_access(peer)  stop (ValueError if not enabled): maps of its pfns are refused
                              again, and an entry left pointing at them is a fatal fault (the job
                              fails with EFAULT naming the address): unmap first
    dev.peers                 the enabled peers still alive (a tuple, in enabling order)
    dev.peer_ranges()         their ((pfn_base, nframes), ...)
    A device holds its peers by weak reference: no cycle, each is freed with its last reference,
    and a peer that went away is dropped as if disabled (no slice launched after that reaches
    it).  On the GPU the kernels get a table of the peers' frames (hmm.cuh: hmm_frame, reached
    only when a pfn is neither the device's own nor RAM); emulated devices of one GPU share its
    memory and queue; devices on two GPUs get CUDA peer access from enable_peer_access, a peer
    copy or job slice runs after the work queued on the peer's GPU before it, and the peer's
    later work after a peer copy (stream events, no host wait; a job's round ends with a host
    wait anyway).

MMU (dev.pt, a DevicePageTable; hmmgpu/device/pagetable.py has the entry encoding)
    dev.pt.map(vpns, pfns, flags=PTE_WRITE) -> Fence     PTE_WRITE | PTE_ATOMIC; VALID implied
    dev.pt.map_huge(head_vpns, head_pfns, flags=PTE_WRITE) -> Fence
                              2 MiB leaves: one entry per aligned 2 MiB folio (every update
                              below splits one that it covers only in part)
    dev.pt.unmap(vpns) -> Fence
    dev.pt.protect(vpns, clear=PTE_WRITE | PTE_ATOMIC) -> Fence
    dev.pt.set_bits(vpns, bits) -> Fence
    dev.pt.invalidate(vpns, downgrade=None)   unmap (or clear ``downgrade`` bits) and return
                              only when the device executed it AND every job slice queued
                              before it retired: call this from an mmu notifier
    dev.pt.invalidate_range(start_vpn, npages, downgrade=None) / unmap_range / protect_range
                              the same over a range, costing one command per run of existing
                              tables whatever its size (a notifier may cover the address space)
    dev.pt.release()          drop every entry and table (the address space goes away)
    dev.pt.flush() -> Fence
    dev.pt.lookup(vpns) -> uint64 entries     (tests, snapshot)
    A pfn in an entry must be system RAM, this device's own memory or an enabled peer's
    (ValueError naming the pfn otherwise; a 2 MiB leaf's 512 frames all in one of them).

Address spaces (contexts)
    ctx = dev.create_context(service=None, name=None)
                              one more address space, as a GPU has one page table per VA
                              space: ``ctx.pt`` (a DevicePageTable, as dev.pt) and ``ctx.jobs``
                              (a JobEngine, as dev.jobs) translating through it, faults going to
                              ``ctx.service``; ``ctx.destroy()``.  dev.pt / dev.jobs / dev.service
                              are the default address space.  Memory, DMA, fault buffer, counters
                              and the queue are the device's: one job at a time per device.

Jobs (dev.jobs, a JobEngine; hmmgpu/device/jobs.py)
    dev.jobs.memset(addr, value, nbytes) / copy(dst, src, nbytes) / axpy(a, x, y, n) /
    reduce_sum(addr, nbytes) / gather(dst, src, idx, n) / list_chase(heads) /
    tree_search(root, keys) / run(UserJob, nlanes, args)      -> JobResult
    A UserJob carries a CUDA lane (hmmgpu/kernels/hmm.cuh: hmm_load / hmm_store /
    hmm_atomic_add over virtual addresses) and a NumPy lane with the same context API; array
    arguments (NumPy arrays, or Zeros(n) made on the device) are lane-private scratch returned in
    ``result.outputs``.  A job runs in slices of ``slice_lanes`` lanes (the preemption points).
    Each takes ``service=``; the default is ``dev.service``, the driver's fault handler:
    ``service(faults)`` gets a FaultBatch -- with the default replay policy a FaultDrain, every
    batch of one service pass (up to 20 x 256 records) in one call -- (NumPy arrays vaddr,
    access, lane, job; one entry per page, deduplicated, sorted by address), maps what it can
    through dev.pt (one map call, no wait: the replay is queued behind it), and returns None,
    or a bool/errno array marking the faults it cannot service (no VMA, PROT_NONE): the job is
    then cancelled with JobFault (an OSError naming the faulting address).  Only the lanes whose
    faults were serviced are replayed.

Observability
    dev.counters              UVM fault_stats names: num_read_faults, num_write_faults,
                              num_atomic_faults, num_duplicate_faults, num_fatal_faults,
                              num_fault_batches, num_replays, num_buffer_overflows
    dev.stats()               counters + page-table, DMA and job-engine figures
    dev.fault_buffer          capacity (default: what a slice can raise, 4 records a lane, at
                              most 2^22 records: 128 MiB),
                              batch_size (256, uvm_perf_fault_batch_count), max_batches (20,
                              uvm_perf_fault_max_batches_per_service), policy (REPLAY_BLOCK,
                              REPLAY_BATCH, REPLAY_BATCH_FLUSH (default), REPLAY_ONCE; see
                              hmmgpu/device/faults.py)
    On the CuPy backend ``dev.stats()`` also has ``kernel_launches`` and ``host_syncs`` (the
    backend's totals): a fault round costs at most 3 launches and 1 host synchronisation.
    Chrome-trace events (job rounds, fault services, invalidations, DMA) go to hmmgpu.trace
    when tracing is on.

Concurrency
    dev.lock (an RLock) orders page-table submissions against job slices: a job releases it
    between slices, so an invalidation from another thread gets in at the next slice boundary.
    The device executes everything (updates, slices, copies) in order on one queue;
    dev.synchronize() waits for all of it.  One job runs at a time per device.
"""
import collections
import threading
import weakref

import numpy as np

from ..constants import PAGE_SIZE
from ._trace import span
from .hw import DONE, MAX_PEERS
from .faults import (DEFAULT_FAULT_BATCH, DEFAULT_REPLAY_POLICY, FAULT_COUNTERS, MAX_BATCHES_PER_SERVICE,
                     MAX_FAULT_BUFFER_ENTRIES, MAX_FAULTS_PER_LANE, FaultBuffer)
from .jobs import DEFAULT_SLICE_LANES, JobEngine
from .pagetable import DevicePageTable


class EmulatedDevice:
    def __init__(self, backend, nframes, pfn_base, host_arena, gpu=0, *,
                 fault_buffer_entries=None, fault_batch_size=DEFAULT_FAULT_BATCH,
                 max_batches_per_service=MAX_BATCHES_PER_SERVICE, replay_policy=DEFAULT_REPLAY_POLICY,
                 slice_lanes=DEFAULT_SLICE_LANES, pt_initial_nodes=64, service=None, name=None,
                 lazy_memory=False):
        if pfn_base < host_arena.nframes:
            raise ValueError(f"device pfns start at 0x{pfn_base:x}, inside system RAM "
                             f"[0, 0x{host_arena.nframes:x})")
        self.backend = backend
        self.gpu = int(gpu)
        self.name = name or f"{backend.name}-dev@0x{pfn_base:x}"
        self.nframes = int(nframes)
        self.pfn_base = int(pfn_base)
        self.host_arena = host_arena
        self.nr_ram = int(host_arena.nframes)
        self.lock = threading.RLock()
        # fences of job slices not yet seen done, oldest first (they complete in queue order)
        self.inflight = collections.deque()
        self.counters = dict.fromkeys(FAULT_COUNTERS, 0)
        self.service = service
        # enabled peers, as weak references (no cycle between two devices that address each
        # other); peer_epoch counts changes, so the executors refresh their peer tables
        self._peer_refs = []
        self.peer_epoch = 0
        self.arena = backend.device_arena(self.nframes, self.gpu, lazy=lazy_memory)
        self.dma = backend.dma_engine(self.gpu)
        self._pt_initial_nodes = pt_initial_nodes
        self.pt = self._new_pagetable(self.name)
        if fault_buffer_entries is None:           # what one slice of lanes can raise
            fault_buffer_entries = min(int(slice_lanes) * MAX_FAULTS_PER_LANE, MAX_FAULT_BUFFER_ENTRIES)
        self.fault_buffer = FaultBuffer(backend.fault_buffer_hw(fault_buffer_entries, self.gpu),
                                        fault_buffer_entries, fault_batch_size, self.counters,
                                        max_batches=max_batches_per_service, policy=replay_policy)
        # the engines see the device through weak proxies: no reference cycle, so dropping the
        # last reference to the device frees its memory at once, not at the next gc pass
        me = weakref.proxy(self)
        self.jobs = JobEngine(me, backend.job_executor(me), slice_lanes)
        self.contexts = []                       # live DeviceContexts besides the default one
        self._next_context = 1

    def _new_pagetable(self, track):
        # Every page table of the device shares its lock and in-flight slices: the device has one
        # queue, so an invalidation in any address space waits for the slices queued before it.
        me = weakref.ref(self)

        def peer_ranges():                         # read at each map that leaves RAM and own memory
            dev = me()
            return () if dev is None else dev.peer_ranges()
        return DevicePageTable(self.backend.pagetable_hw(self.gpu), nr_ram=self.nr_ram,
                               pfn_base=self.pfn_base, nframes=self.nframes, lock=self.lock,
                               initial_nodes=self._pt_initial_nodes, inflight=self.inflight,
                               track=track, peer_ranges=peer_ranges)

    def create_context(self, service=None, name=None):
        """A new address space of this device (a GPU VA space / channel): a DeviceContext with
        its own page table ``ctx.pt`` and a job engine ``ctx.jobs`` that translates through it."""
        with self.lock:
            cid = self._next_context
            self._next_context += 1
            ctx = DeviceContext(self, cid, service, name or f"{self.name}/ctx{cid}")
            self.contexts.append(ctx)
        return ctx

    def __repr__(self):
        return (f"EmulatedDevice({self.name}, {self.nframes} frames at pfn 0x{self.pfn_base:x}, "
                f"{self.backend.name})")

    # -- peers ---------------------------------------------------------------------------------
    def enable_peer_access(self, peer):
        """cudaDeviceEnablePeerAccess: from now on this device addresses ``peer``'s frames (its
        page tables may map them, its jobs load, store and add atomically through such entries,
        its DMA engine copies to and from them).  One direction: call ``peer.enable_peer_access
        (self)`` for the other.  Enabling twice does nothing.  ValueError: ``peer`` is this
        device, has another backend or another system RAM, overlaps this device's pfns or
        another peer's, or would be peer number MAX_PEERS + 1.  On CuPy, devices on two
        physical GPUs get CUDA peer access (cudaDeviceEnablePeerAccess) here."""
        if peer is self:
            raise ValueError(f"{self.name}: a device cannot enable peer access to itself")
        if not isinstance(peer, EmulatedDevice):
            raise TypeError(f"{self.name}: peer access needs an EmulatedDevice, not {type(peer).__name__}")
        if peer.backend is not self.backend:
            raise ValueError(f"{self.name}: peer {peer.name} runs on another backend "
                             f"({peer.backend.name}); peers must share one")
        if peer.host_arena is not self.host_arena:
            raise ValueError(f"{self.name}: peer {peer.name} has another system RAM: its pfns mean "
                             "other frames")
        with self.lock:
            live = self._live_peers()
            if any(q is peer for q in live):
                return
            for base, n, what in ((self.pfn_base, self.nframes, "this device's"),
                                  *((q.pfn_base, q.nframes, f"peer {q.name}'s") for q in live)):
                if peer.pfn_base < base + n and base < peer.pfn_base + peer.nframes:
                    raise ValueError(f"{self.name}: peer {peer.name}'s pfns [0x{peer.pfn_base:x}, "
                                     f"0x{peer.pfn_base + peer.nframes:x}) overlap {what} memory "
                                     f"[0x{base:x}, 0x{base + n:x})")
            if len(live) >= MAX_PEERS:
                raise ValueError(f"{self.name}: already {MAX_PEERS} peers (the most a device addresses)")
            self.backend.enable_peer(self.gpu, peer.gpu)
            self._peer_refs.append(weakref.ref(peer))
            self.peer_epoch += 1

    def disable_peer_access(self, peer):
        """cudaDeviceDisablePeerAccess: this device stops addressing ``peer``'s frames.  Maps of
        them are refused again, and an entry left pointing at them is a fatal fault (EFAULT)
        for a job that uses it: unmap first.  ValueError when access was not enabled."""
        with self.lock:
            if not any(r() is peer for r in self._peer_refs):
                raise ValueError(f"{self.name}: peer access to {getattr(peer, 'name', peer)} is not enabled")
            self._peer_refs = [r for r in self._peer_refs if r() is not None and r() is not peer]
            self.peer_epoch += 1

    def _live_peers(self):
        """The enabled peers still alive; a peer that went away is dropped (and no longer
        addressed: the epoch moves, so the next launch drops it from the kernels' table)."""
        refs = self._peer_refs
        if not refs:
            return ()
        peers = [r() for r in refs]
        if any(q is None for q in peers):
            with self.lock:
                self._peer_refs = [r for r in self._peer_refs if r() is not None]
                self.peer_epoch += 1
            peers = [q for q in peers if q is not None]
        return tuple(peers)

    @property
    def peers(self):
        """The devices this one addresses (enabled and alive), in the order they were enabled."""
        return self._live_peers()

    def peer_ranges(self):
        """((pfn_base, nframes), ...) of every peer's memory."""
        return tuple((q.pfn_base, q.nframes) for q in self._live_peers())

    def can_address(self, pfns):
        """Bool mask: which pfns this device reaches -- system RAM, its own frames, an enabled
        peer's frames."""
        p = np.asarray(pfns, dtype=np.int64)
        ok = ((p >= 0) & (p < self.nr_ram)) | self.owns(p)
        for base, n in self.peer_ranges():       # at most MAX_PEERS
            ok |= (p >= base) & (p < base + n)
        return ok

    # -- memory by global pfn ------------------------------------------------------------------
    def owns(self, pfns):
        p = np.asarray(pfns, dtype=np.int64)
        return (p >= self.pfn_base) & (p < self.pfn_base + self.nframes)

    def _locate(self, pfns):
        """(pfns as int64, memories, which): memories[0] is system RAM, [1] this device's, then
        each peer's, as (arena, first pfn); which[i] is the memory of pfns[i].  ValueError
        naming the first pfn this device cannot address."""
        p = np.asarray(pfns, dtype=np.int64).reshape(-1)
        peers = self._live_peers()
        mems = [(self.host_arena, 0), (self.arena, self.pfn_base)] + [(q.arena, q.pfn_base) for q in peers]
        own = self.owns(p)
        which = own.view(np.int8)
        if np.count_nonzero(own) == own.size:
            return p, mems, which
        ok = own | ((p >= 0) & (p < self.nr_ram))
        for k, q in enumerate(peers):             # at most MAX_PEERS
            m = (p >= q.pfn_base) & (p < q.pfn_base + q.nframes)
            if m.any():
                which = which.copy() if which.base is own else which
                which[m] = 2 + k
                ok |= m
        if not ok.all():
            raise ValueError(f"{self.name}: pfn 0x{int(p[~ok][0]):x} is neither system RAM, this device's "
                             "memory nor an enabled peer's")
        return p, mems, which

    def _groups(self, pfns):
        """(pfns, [(arena, positions or None for all, frame indices)]) per memory the pfns use."""
        p, mems, which = self._locate(pfns)
        kinds = np.flatnonzero(np.bincount(which, minlength=len(mems))).tolist() if p.size else []
        out = []
        for k in kinds:
            arena, base = mems[k]
            pos = None if len(kinds) == 1 else np.flatnonzero(which == k)
            out.append((arena, pos, (p if pos is None else p[pos]) - base))
        return p, out

    def read_pages(self, pfns):
        p, groups = self._groups(pfns)
        if len(groups) == 1 and groups[0][0] is self.arena:
            with self.lock:
                return self.arena.read(groups[0][2])      # one gather, no second copy
        out = np.empty((p.size, PAGE_SIZE), dtype=np.uint8)
        with self.lock:
            for arena, pos, idx in groups:
                if arena is self.host_arena:
                    self.synchronize()      # a queued copy may still be writing system RAM
                out[slice(None) if pos is None else pos] = arena.read(idx)
        return out

    def write_pages(self, pfns, data):
        p, groups = self._groups(pfns)
        data = np.asarray(data, dtype=np.uint8).reshape(p.size, PAGE_SIZE)
        with self.lock:
            for arena, pos, idx in groups:
                if arena is self.host_arena:
                    self.synchronize()
                arena.write(idx, data if pos is None else data[pos])

    def fill_pages(self, pfns, value=0):
        _, groups = self._groups(pfns)
        with self.lock:
            for arena, _, idx in groups:
                if arena is self.host_arena:
                    self.synchronize()
                arena.fill(idx, value)

    def _side(self, p):
        """1 if every pfn of ``p`` is this device's, 0 if every one is system RAM, else None."""
        if p.size <= 16:
            lst = p.tolist()
            lo, hi = (min(lst), max(lst)) if lst else (0, -1)
        else:
            lo, hi = int(p.min()), int(p.max())
        if self.pfn_base <= lo and hi < self.pfn_base + self.nframes:
            return 1
        if 0 <= lo and hi < self.nr_ram:
            return 0
        return None

    def copy_pages(self, dst_pfns, src_pfns):
        """Copy frames by global pfn on the DMA engine; returns the Fence of the whole batch.
        Either side may be system RAM, this device's memory or an enabled peer's: one DMA
        batch per (destination memory, source memory) pair."""
        d = np.asarray(dst_pfns, dtype=np.int64).reshape(-1)
        s = np.asarray(src_pfns, dtype=np.int64).reshape(-1)
        dk, sk = self._side(d), self._side(s)
        if dk is not None and sk is not None and d.size == s.size:
            # the usual batch: every page one way (RAM -> device, or back): one DMA batch
            with span("dma copy", "migrate", self.name, npages=int(d.size)), self.lock:
                return self.dma.copy(self.arena if dk else self.host_arena, d - self.pfn_base if dk else d,
                                     self.arena if sk else self.host_arena, s - self.pfn_base if sk else s)
        d, mems, dw = self._locate(dst_pfns)
        s, _, sw = self._locate(src_pfns)
        if d.size != s.size:
            raise ValueError(f"{self.name}: copy of {s.size} source pages to {d.size} destinations")
        fence = DONE
        with span("dma copy", "migrate", self.name, npages=int(d.size)), self.lock:
            kind = dw.astype(np.int64) * len(mems) + sw     # (destination, source) memory pairs
            kinds = [int(kind[0])] if d.size and (kind == kind[0]).all() else np.unique(kind).tolist()
            other = {q.gpu for q in self._live_peers()} - {self.gpu}
            for g in other:                     # a peer on another GPU: after its queued work
                self.backend.queue_after(self.gpu, g)
            for k in kinds:
                (da, db), (sa, sb) = mems[k // len(mems)], mems[k % len(mems)]
                m = slice(None) if len(kinds) == 1 else kind == k
                fence = self.dma.copy(da, d[m] - db, sa, s[m] - sb)
            for g in other:                     # and its later work after this copy
                self.backend.queue_after(g, self.gpu)
        return fence                             # one in-order queue: the last fence covers all

    def synchronize(self):
        """Wait for everything queued on the device (updates, slices, copies)."""
        self.backend.fence(self.gpu).wait()

    def stats(self):
        s = dict(self.counters)
        s.update(self.pt.stats)
        s.update({"dma_batches": self.dma.batches, "dma_pages_copied": self.dma.pages_copied,
                  "dma_bytes_copied": self.dma.bytes_copied, "dma_contiguous_copies": self.dma.contiguous_copies,
                  "jobs": self.jobs.next_job_id - 1, "lanes_launched": self.jobs.lanes_launched})
        for k in ("memcpy_calls", "kernel_launches"):
            if hasattr(self.dma, k):
                s["dma_" + k] = getattr(self.dma, k)
        s.update(getattr(self.backend, "counters", None) or {})     # CuPy: launches, host syncs
        return s


class DeviceContext:
    """One address space of an EmulatedDevice (``dev.create_context()``), as a GPU runs one page
    table per VA space (a channel's instance block points at it).

    ``ctx.pt`` is a DevicePageTable of its own (same API and encoding as ``dev.pt``);
    ``ctx.jobs`` is a JobEngine (same API as ``dev.jobs``) whose lanes translate through
    ``ctx.pt`` and whose faults go to ``ctx.service`` unless a job names its own.  Everything
    else is the device's: memory, DMA engine, fault buffer, counters, lock and queue (one job
    at a time per device; an invalidation in any context waits for the slices queued before it).
    ``ctx.destroy()`` drops the page table (waiting for queued work first) and the context.
    """

    def __init__(self, device, cid, service, name):
        self.device = weakref.proxy(device)      # the device owns its contexts (no cycle)
        self.id = cid
        self.name = name
        self.service = service
        self.pt = device._new_pagetable(name)
        self.jobs = JobEngine(self.device, device.jobs.ex, device.jobs.slice_lanes,
                              space=weakref.proxy(self), queue=device.jobs.queue)
        self.live = True

    def __repr__(self):
        return f"DeviceContext({self.name}, {'live' if self.live else 'destroyed'})"

    def destroy(self):
        if not self.live:
            return
        self.live = False
        self.pt.release()
        with self.device.lock:
            if self in self.device.contexts:
                self.device.contexts.remove(self)
