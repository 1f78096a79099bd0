"""scaling: control-plane cost per page from 2^12 to 2^20 pages (flat within 1.5x is the target).

For each operation, the same work over N pages at the largest size and at each smaller size,
each in a System of its own sized for it, timed alternately repeat by repeat: CPU fault-in of
untouched anonymous memory (write faults, demand-zero), mprotect (write-protect), fork (the
page tables copied for COW), writeback (msync of a dirty shared mapping of a real file), munmap,
hmm_range_fault of present pages (REQ_FAULT, the sequence protocol around it), and the
migration of N pages to the device (migrate_vma_* through dmirror).

The ratio is the per-page cost at the smaller size over the per-page cost at the largest: 1.0
is flat, above 1 the largest size is cheaper per page (fixed per-call costs spread thinner),
below 1 it costs more per page.  The target ">= 0.67" says the largest size costs at most 1.5x
per page what a smaller one does.  A sample of a smaller size is 2^(largest - smaller) calls, so
it covers as many pages as one of the largest (and mprotect, hmm_range_fault and fault-in run
32, 32 and 4 times per sample at every size: a few ns per page, or in-cache at the smaller size).  Quick mode: 2^15 against 2^12;
full: 2^18 (1 GiB; 2^20 on a GPU machine) against 2^12 and 2^15, writeback at most 2^16 and,
on the fallback, migrate at most 2^17 (a run stays under 3 GiB).

Then the device side: a fault-driven reduce job over CPU-written (host-resident, scattered)
pages on a fresh UVM driver (hmmgpu.drivers.uvm.UvmDriver) that has mapped nothing, the range
preferring the CPU (cudaMemAdvise SetPreferredLocation), so every page is a device fault
serviced by hmm_range_fault and mapped remotely, at 32 MiB .. 1 GiB against itself at 8 MiB
(quick: 32 MiB), timed alternately; the target ">= 0.77" says 1 GiB costs at most 1.3x per page
what 8 MiB does.

Last, the costs that must not grow with how much there is (``_fixed_costs``), each against its
baseline in the same run, timed alternately: mmap in an address space of 10^4 VMAs against mmap
beside a single VMA (get_unmapped_area and the VMA tree; target within 1.5x), a one-page
mprotect in a 2^18-page VMA against one in a 2^10-page VMA (splitting and merging the VMA and
its page table; within 1.5x), and 10^4 one-page migrations against one migration of the same
10^4 pages (migrate_vma's cost per call; at most 20x); and the cost of one call for one page
of pt.map, munmap, migrate_vma, dmirror's migrate_to_dev, fork and exit (no baseline: the
figure itself).
"""
import gc
import os
import tempfile
import time

import numpy as np

from ._common import PAGE, PRIV_ANON, RW, Workload, frames_sum, need, size_label, uvm_driver

NAME = "scaling"
DESCRIPTION = "per-page cost of fault-in, mprotect, fork, writeback, munmap, hmm_range_fault, migrate"
OPS = ("fault-in", "mprotect", "fork", "writeback", "munmap", "hmm_range_fault", "migrate")
TARGET = ">= 0.67"
CHEAP = {"mprotect": 32, "hmm_range_fault": 32, "fault-in": 4}   # several calls per sample
FAULT_TARGET = ">= 0.77"          # 1 / 1.3
MAP_SHARED = 0x01
PROT_READ = 0x1


class _Seq:
    """An mmu interval notifier op that only moves the sequence (nothing is mirrored)."""

    def invalidate(self, mni, range, cur_seq):
        from hmmgpu.mm.notifier import mmu_interval_set_seq
        mmu_interval_set_seq(mni, cur_seq)
        return True


class _Lab:
    """One operation over ``n`` pages in a System of its own: ``setup()`` (untimed), ``fn()``
    (timed), ``close()``."""

    def __init__(self, ctx, op, n):
        import hmmgpu
        self.n, self.nbytes = n, n * PAGE
        self.st = {"a": None, "child": None}
        self.w = self.system = self.proc = None
        self._file = None
        if op == "migrate":
            self.w = Workload(ctx.backend_name, n, scattered=False, ram_extra_pages=4096)
            self.st["on"] = False
            self.setup, self.fn = self._back, self._to_dev
            return
        self.system = hmmgpu.System(backend=ctx.backend_name, ram_bytes=(2 * n + 4096) * PAGE)
        self.proc = self.system.spawn()
        self.setup, self.fn = {
            "fault-in": (self._remap, lambda: self.proc.populate(self.st["a"], self.nbytes, write=True)),
            "mprotect": (self._writable, lambda: self.proc.mprotect(self.st["a"], self.nbytes, PROT_READ)),
            "fork": (self._reap, lambda: self.st.__setitem__("child", self.proc.fork())),
            "writeback": (self._dirty, lambda: self.proc.msync(self.st["f"], self.nbytes)),
            "munmap": (self._populated, self._munmap),
            "hmm_range_fault": (None, self._range_fault),
        }[op]
        if op in ("mprotect", "fork", "hmm_range_fault"):
            self._populated()
        if op == "writeback":
            # a file in memory where there is one (tmpfs): the host's own disk writeback would
            # be part of the figure otherwise
            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            fd, self._file = tempfile.mkstemp(prefix="hmmgpu-bench-", dir=shm)
            os.ftruncate(fd, self.nbytes)
            self.st["f"] = self.proc.mmap(self.nbytes, RW, MAP_SHARED, fd)
            os.close(fd)
            self._data = np.full(self.nbytes, 7, np.uint8)
        if op == "hmm_range_fault":
            from hmmgpu.hmm import (HMM_PFN_REQ_FAULT, HmmRange, MmuIntervalNotifier,
                                    mmu_interval_notifier_insert)
            self.mni = MmuIntervalNotifier()
            mmu_interval_notifier_insert(self.mni, self.proc.mm, self.st["a"], self.nbytes, _Seq())
            self.rng = HmmRange(notifier=self.mni, start=self.st["a"], end=self.st["a"] + self.nbytes,
                                hmm_pfns=np.zeros(n, np.uint64), default_flags=HMM_PFN_REQ_FAULT)

    # setups
    def _remap(self):
        if self.st["a"] is not None:
            self.proc.munmap(self.st["a"], self.nbytes)
        self.st["a"] = self.proc.mmap(self.nbytes, RW, PRIV_ANON)

    def _populated(self):
        self._remap()
        self.proc.populate(self.st["a"], self.nbytes, write=True)

    def _writable(self):
        self.proc.mprotect(self.st["a"], self.nbytes, RW)

    def _reap(self):
        if self.st["child"] is not None:
            self.st["child"].exit()
            self.st["child"] = None

    def _dirty(self):
        self.proc.write(self.st["f"], self._data)

    def _back(self):
        if self.st["on"]:
            self.w.to_sys()
            self.st["on"] = False

    # timed
    def _munmap(self):
        self.proc.munmap(self.st["a"], self.nbytes)
        self.st["a"] = None

    def _range_fault(self):
        from hmmgpu.hmm import hmm_range_fault, mmu_interval_read_begin
        self.rng.notifier_seq = mmu_interval_read_begin(self.mni)
        with self.proc.mm.mmap_lock.read():
            assert hmm_range_fault(self.rng) == 0

    def _to_dev(self):
        self.w.to_dev()
        self.st["on"] = True

    def close(self):
        if self.w is not None:
            self.w.close()
        else:
            self._reap()
            self.proc.exit()
        if self._file is not None:
            os.unlink(self._file)
        # a System's reference cycles would keep its RAM arena alive into the next size
        self.w = self.system = self.proc = None
        gc.collect()


def sizes(ctx, op):
    """(smaller sizes, the largest) in log2 pages for ``op``."""
    if ctx.quick:
        return [12], 15
    hi = 20 if ctx.gpu else 18
    if op == "writeback":
        hi = min(hi, 16)          # every sample writes the whole file back: 256 MiB is plenty
    if op == "migrate" and not ctx.gpu:
        hi = min(hi, 17)          # RAM, device memory and the pages coming back: 1.5 GiB at 2^17
    return [12, 15][:1 if hi <= 15 else 2], hi


def run(ctx):
    label = ctx.label + ", host CPU time of the emulation"
    for op in OPS:
        small, big = sizes(ctx, op)
        ctx.progress(f"{op}, 2^{big} pages")
        lab_big = _Lab(ctx, op, 1 << big)
        try:
            for k in small:
                lab = _Lab(ctx, op, 1 << k)
                try:
                    # the smaller size runs 2^(big-k) times per sample: as many pages as the largest
                    inner = CHEAP.get(op, 1)
                    ours, base = ctx.compare(lab_big.fn, lab.fn, ours_setup=lab_big.setup, base_setup=lab.setup,
                                             ours_inner=inner, base_inner=inner << (big - k))
                finally:
                    lab.close()
                ctx.cost(f"{op} per page", ours=ours, base=base, per=inner << big, base_per=inner << big,
                         baseline_name=f"itself at 2^{k} pages", target=TARGET, size=f"2^{big} / 2^{k} pages",
                         label=label)
        finally:
            lab_big.close()
    fault_driven(ctx)
    _fixed_costs(ctx)


class _FaultJob:
    """A fault-driven reduce over ``nbytes`` of CPU-written scattered pages: ``setup()`` opens a
    driver that has mapped nothing, the range preferring the CPU (untimed), ``fn()`` runs the
    job (timed)."""

    def __init__(self, ctx, nbytes):
        self.uvm = need("hmmgpu.drivers.uvm", "the UVM driver (UvmDriver)")
        self.nbytes = nbytes
        self.w = Workload(ctx.backend_name, nbytes // PAGE, scattered=True, ram_extra_pages=4096,
                          with_dmirror=False)
        self.expect = frames_sum(self.w.system.phys.ram.host, self.w.pfns())
        self.gpu = None
        self.rounds = 0

    def setup(self):
        if self.gpu is not None:
            self.gpu.close()
        uvm, w = self.uvm, self.w
        self.gpu = uvm_driver(w)
        self.gpu.advise(w.addr, self.nbytes, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)

    def fn(self):
        r = self.gpu.jobs.reduce_sum(self.w.addr, self.nbytes)
        assert r.value == self.expect, "fault-driven reduce computed a wrong sum"
        self.rounds = len(r.rounds)

    def close(self):
        if self.gpu is not None:
            self.gpu.close()
        self.w.close()
        self.w = self.gpu = None
        gc.collect()


def fault_driven(ctx):
    base_bytes = 8 << 20
    sizes = [32 << 20] if ctx.quick else [32 << 20, 128 << 20, 512 << 20, 1 << 30]
    label = ctx.label + ", host CPU time of the emulation" if not ctx.gpu else ctx.label
    small = _FaultJob(ctx, base_bytes)
    try:
        for nbytes in sizes:
            ctx.progress(f"fault-driven reduce, {size_label(nbytes)} against {size_label(base_bytes)}")
            big = _FaultJob(ctx, nbytes)
            try:
                ours, base = ctx.compare(big.fn, small.fn, ours_setup=big.setup, base_setup=small.setup)
            finally:
                big.close()
            ctx.cost("fault-driven reduce per page (remote map)", ours=ours, base=base,
                     per=nbytes // PAGE, base_per=base_bytes // PAGE,
                     baseline_name=f"itself at {size_label(base_bytes)}", target=FAULT_TARGET,
                     size=f"{size_label(nbytes)} / {size_label(base_bytes)}", label=label,
                     note=f"{big.rounds} / {small.rounds} rounds (launch, fetch, service, replay)")
    finally:
        small.close()


def _mmap_costs(ctx):
    """mmap among 10^4 VMAs against mmap beside one: each repeat maps 32 one-page areas (they
    are unmapped again, untimed, before the next)."""
    import hmmgpu
    system = hmmgpu.System(backend=ctx.backend_name, ram_bytes=64 << 20)
    per = 32
    procs = {}
    for nvmas in (1, 10 ** 4):
        p = system.spawn()
        for i in range(nvmas):       # alternate protections: neighbours never merge
            p.mmap(PAGE, RW if i % 2 else PROT_READ, PRIV_ANON)
        procs[nvmas] = (p, [])

    def maps(nvmas):
        p, made = procs[nvmas]
        for _ in range(per):
            made.append(p.mmap(PAGE, RW, PRIV_ANON))

    def unmaps(nvmas):
        p, made = procs[nvmas]
        while made:
            p.munmap(made.pop(), PAGE)
    many, one = ctx.compare(lambda: maps(10 ** 4), lambda: maps(1), ours_setup=lambda: unmaps(10 ** 4),
                            base_setup=lambda: unmaps(1))
    ctx.cost("mmap of one page among 10^4 VMAs", ours=many, base=one, per=per, unit="us/call", scale=1e6,
             baseline_name="mmap of one page beside 1 VMA", target=TARGET, size="10^4 VMAs",
             label=ctx.label + ", host CPU time of the emulation")
    for p, _ in procs.values():
        p.exit()


def _mprotect_costs(ctx):
    """A one-page mprotect (and back) in the middle of a 2^18-page VMA against a 2^10-page one."""
    import hmmgpu
    system = hmmgpu.System(backend=ctx.backend_name, ram_bytes=64 << 20)
    procs = {}
    for k in (10, 18):
        p = system.spawn()
        a = p.mmap((1 << k) * PAGE, RW, PRIV_ANON)
        p.populate(a, 1024 * PAGE, write=True)
        procs[k] = (p, a + 512 * PAGE)
    reps = 20

    def flip(k):
        p, a = procs[k]
        for _ in range(reps):
            p.mprotect(a, PAGE, PROT_READ)      # split in three
            p.mprotect(a, PAGE, RW)             # and merged back
    big, small = ctx.compare(lambda: flip(18), lambda: flip(10))
    ctx.cost("1-page mprotect in a 2^18-page VMA", ours=big, base=small, per=2 * reps, unit="us/call",
             scale=1e6, baseline_name="1-page mprotect in a 2^10-page VMA", target=TARGET, size="2^18 pages",
             label=ctx.label + ", host CPU time of the emulation")
    for p, _ in procs.values():
        p.exit()


def _migrate_range(w, addr, npages):
    """migrate_vma_setup, dmirror's alloc-and-copy, migrate_vma_pages, its device page-table
    map, migrate_vma_finalize: one migration of [addr, +npages) to the device."""
    from hmmgpu import hmm
    with w.proc.mm.mmap_lock.read():
        args = hmm.MigrateVma(w.proc.mm.find_vma(addr), addr, addr + npages * PAGE, pgmap_owner=w.dev,
                              flags=hmm.MIGRATE_VMA_SELECT_SYSTEM)
        if hmm.migrate_vma_setup(args):
            raise OSError("migrate_vma_setup failed")
        w.mirror._migrate_alloc_and_copy(args)
        hmm.migrate_vma_pages(args)
        w.mirror._migrate_finalize_and_map(args)
        hmm.migrate_vma_finalize(args)


def _migrate_costs(ctx):
    """n one-page migrations against one migration of the same n pages (n = 10^4; 10^3 quick)."""
    n = 10 ** 3 if ctx.quick else 10 ** 4
    w = Workload(ctx.backend_name, n, scattered=True, ram_extra_pages=4096)
    try:
        def singles():
            for i in range(n):
                _migrate_range(w, w.addr + i * PAGE, 1)

        def back():
            w.mirror.migrate_to_sys(w.addr, n)
        many, one = ctx.compare(singles, lambda: _migrate_range(w, w.addr, n), ours_setup=back,
                                base_setup=back, repeat=min(ctx.repeat, 3))
        back()
        ctx.cost(f"{n:,} one-page migrations", ours=many, base=one, per=n, unit="us/page", scale=1e6,
                 baseline_name=f"one migration of the {n:,} pages", target=">= 0.05", size=f"{n:,} pages",
                 note="target: at most 20x one call", label=ctx.label + ", host CPU time of the emulation")
        _call_costs(ctx, w)
    finally:
        w.close()


def _call_costs(ctx, w):
    """What one call for one page costs, however small: the median of many calls."""
    reps = 20 if ctx.quick else 200
    label = ctx.label + ", host CPU time of the emulation"
    # the device's own page table: a dmirror open's mirrors the process, and a map there without
    # the notifier sequence check would be a driver bug (hmmgpu.hmm.debug)
    pt = w.dev.device.pt
    vpn, pfn = np.array([1 << 30], np.int64), np.array([7], np.int64)
    p = w.proc
    small = p.mmap(PAGE, RW, PRIV_ANON)
    p.populate(small, PAGE, write=True)

    def mapped():
        a = p.mmap(PAGE, RW, PRIV_ANON)
        p.populate(a, PAGE, write=True)
        return a
    spare = []
    figures = (("pt.map of 1 page", lambda: pt.map(vpn, pfn), None),
               ("munmap of 1 page", lambda: p.munmap(spare.pop(), PAGE), lambda: spare.append(mapped())),
               ("migrate_vma of 1 page", lambda: _migrate_range(w, small, 1),
                lambda: w.mirror.migrate_to_sys(small, 1)),
               ("dmirror migrate_to_dev of 1 page", lambda: w.mirror.migrate_to_dev(small, 1),
                lambda: w.mirror.migrate_to_sys(small, 1)))
    for name, fn, setup in figures:
        ts = []
        for _ in range(reps):
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        ctx.row(f"fixed cost: {name}", ours=sorted(ts)[reps // 2] * 1e6, ours_unit="us/call",
                baseline_name="-", baseline=None, ratio=None, target=None, label=label,
                note=f"median of {reps} calls")
    p.munmap(small, PAGE)
    q = w.system.spawn()              # fork and exit: a small process (two one-page VMAs)
    for prot in (RW, PROT_READ):
        q.populate(q.mmap(PAGE, prot, PRIV_ANON), PAGE)
    children = []

    def forks():
        children.extend(q.fork() for _ in range(20))

    def exits():
        while children:
            children.pop().exit()
    t_fork = ctx.time(forks, setup=exits)
    t_exit = ctx.time(exits, setup=forks)
    exits()
    q.exit()
    for name, t in (("fork of a process with 2 one-page VMAs", t_fork), ("exit of that child", t_exit)):
        ctx.row(f"fixed cost: {name}", ours=t.median / 20 * 1e6, ours_unit="us/call", baseline_name="-",
                baseline=None, ratio=None, target=None, label=label, note="median of 20 calls per repeat")


def _fixed_costs(ctx):
    ctx.progress("fixed costs per call")
    for measure in (_mmap_costs, _mprotect_costs, _migrate_costs):
        measure(ctx)
        gc.collect()
