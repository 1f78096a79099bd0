"""scaling: control-plane cost per page from 2^10 to 2^20 pages (flat within 1.5x is the target).

For each operation, the same work over N pages at the largest size and at each smaller size,
each in a System of its own sized for it, timed alternately repeat by repeat: CPU fault-in of
untouched anonymous memory (write faults, demand-zero), mprotect (write-protect), fork (the
page tables copied for COW), writeback (msync of a dirty shared mapping of a real file), munmap,
hmm_range_fault of present pages (REQ_FAULT, the sequence protocol around it), and the
migration of N pages to the device (migrate_vma_* through dmirror).

The ratio is the per-page cost at the smaller size over the per-page cost at the largest: 1.0
is flat, above 1 the largest size is cheaper per page (fixed per-call costs spread thinner),
below 1 it costs more per page.  The target ">= 0.67" says the largest size costs at most 1.5x
per page what a smaller one does.  Quick mode: 2^11 against 2^14; full: 2^10 .. 2^18 on the
fallback (1 GiB), up to 2^20 on a GPU machine.
"""
import gc
import os
import tempfile

import numpy as np

from ._common import PAGE, PRIV_ANON, RW, Workload

NAME = "scaling"
DESCRIPTION = "per-page cost of fault-in, mprotect, fork, writeback, munmap, hmm_range_fault, migrate"
OPS = ("fault-in", "mprotect", "fork", "writeback", "munmap", "hmm_range_fault", "migrate")
TARGET = ">= 0.67"
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
            fd, self._file = tempfile.mkstemp(prefix="hmmgpu-bench-")
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


def sizes(ctx):
    if ctx.quick:
        return [11], 14
    hi = 20 if ctx.gpu else 18
    return list(range(10, hi, 2)), hi


def run(ctx):
    small, big = sizes(ctx)
    label = ctx.label + ", host CPU time of the emulation"
    for op in OPS:
        ctx.progress(f"{op}, 2^{big} pages")
        lab_big = _Lab(ctx, op, 1 << big)
        try:
            for k in small:
                lab = _Lab(ctx, op, 1 << k)
                try:
                    ours, base = ctx.compare(lab_big.fn, lab.fn, ours_setup=lab_big.setup, base_setup=lab.setup)
                finally:
                    lab.close()
                ctx.cost(f"{op} per page", ours=ours, base=base, per=1 << big, base_per=1 << k,
                         baseline_name=f"itself at 2^{k} pages", target=TARGET, size=f"2^{big} / 2^{k} pages",
                         label=label)
        finally:
            lab_big.close()
