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
pages on a device that has mapped nothing, every page a device fault serviced by
hmm_range_fault and mapped remotely, at 32 MiB .. 1 GiB against itself at 8 MiB (quick: 32
MiB), timed alternately; the target ">= 0.77" says 1 GiB costs at most 1.3x per page what
8 MiB does.
"""
import gc
import os
import tempfile

import numpy as np

from ._common import PAGE, PRIV_ANON, RW, Workload, frames_sum, size_label

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


class _FaultJob:
    """A fault-driven reduce over ``nbytes`` of CPU-written scattered pages: ``setup()`` opens a
    device that has mapped nothing (untimed), ``fn()`` runs the job (timed)."""

    def __init__(self, ctx, nbytes):
        from hmmgpu.drivers.mirrorgpu import MirrorGpu
        self.MirrorGpu = MirrorGpu
        self.nbytes = nbytes
        self.w = Workload(ctx.backend_name, nbytes // PAGE, scattered=True, ram_extra_pages=4096)
        self.expect = frames_sum(self.w.system.phys.ram.frames, self.w.pfns())
        self.gpu = None
        self.rounds = 0

    def setup(self):
        if self.gpu is not None:
            self.gpu.close()
        w = self.w
        self.gpu = self.MirrorGpu(w.system, w.proc, w.dev, w.addr, w.addr + self.nbytes, name="bench-gpu")

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
