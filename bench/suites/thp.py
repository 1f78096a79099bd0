"""thp: benchmark_thp_migration of hmm-tests.c: 2 MiB folios against the same bytes as 4 KiB pages.

Each size of the C sweep (a quarter of a THP to 128 THPs, plus 32 THPs = 64 MiB, where the
target is set) is mapped twice in one process on one System: once MADV_HUGEPAGE (THPs, which
dmirror migrates as 2 MiB device folios with MIGRATE_VMA_SELECT_COMPOUND and brings back as
THPs) and once MADV_NOHUGEPAGE (4 KiB pages), both written with the C pattern (``i & 0xFF``).
The RAM free list is shuffled first, as after a long uptime: 4 KiB pages land on scattered
frames, while a THP is a whole 2 MiB block by definition.  Ours is the THP region's migration,
the baseline the 4 KiB region's, timed alternately repeat by repeat (``ctx.compare``): the
migration to the device itself (migrate_vma_setup with MIGRATE_VMA_SELECT_COMPOUND, dmirror's
allocation and DMA copy, migrate_vma_pages, the device page-table update, migrate_vma_finalize),
HMM_DMIRROR_MIGRATE_TO_SYS back, and HMM_DMIRROR_MIGRATE_TO_DEV as benchmark_thp_migration times
it (the migration plus lib/test_hmm.c's read-back of every page through the device page table).
The ratio is 4 KiB time / THP time, the THP speed-up; below a THP (a quarter, a half) both
regions are small pages.  Target: >= 3 at 64 MiB on the NumPy fallback, for the migration both
ways (the 2025 series reports about 4x on hardware, where the per-page work of a 4 KiB
migration dominates; here that work is vectorised and the copy of the bytes, the same for both,
bounds the ratio: bench/RESULTS.md has the figures).
"""
import gc

import numpy as np

from ..measure import Skip
from ._common import PAGE, dmirror_migrate_steps, need, shuffle_free_list, size_label

NAME = "thp"
DESCRIPTION = "benchmark_thp_migration: migrate 2 MiB folios vs the same bytes as 4 KiB pages, both ways"
PMD = 2 << 20
TARGET_BYTES = 64 << 20


def sizes(ctx):
    if ctx.quick:
        return [PMD // 4, PMD, 4 * PMD]
    return [PMD // 4, PMD // 2, PMD, 2 * PMD, 4 * PMD, 8 * PMD, 32 * PMD, 128 * PMD]


class _Pair:
    """One System, a dmirror device, and the same bytes mapped as THPs and as 4 KiB pages."""

    def __init__(self, backend_name, nbytes):
        import hmmgpu
        dmirror = need("hmmgpu.drivers.dmirror", "the dmirror driver")
        self.nbytes = nbytes
        self.npages = nbytes // PAGE
        ram = 6 * max(nbytes, PMD) + (64 << 20)
        self.system = hmmgpu.System(backend=backend_name, ram_bytes=ram, hugetlb_pages=0)
        shuffle_free_list(self.system.phys)
        self.dev = dmirror.DMirrorDevice(self.system)
        self.proc = self.system.spawn()
        self.mirror = self.dev.open(self.proc)
        data = (np.arange(nbytes // 4, dtype=np.int64) & 0xFF).astype(np.int32).view(np.uint8)
        self.data = data
        self.addr = {}
        for kind, advice in (("thp", hmmgpu.MADV_HUGEPAGE), ("4k", hmmgpu.MADV_NOHUGEPAGE)):
            span = nbytes + PMD
            base = self.proc.mmap(span, 0x3, 0x22)
            a = (base + PMD - 1) & ~(PMD - 1)
            self.proc.madvise(a, nbytes, advice)
            self.proc.write(a, data)
            self.addr[kind] = a
        self.on_dev = {"thp": False, "4k": False}

    def to_dev(self, kind):
        """HMM_DMIRROR_MIGRATE_TO_DEV: the migration and the read-back."""
        r = self.mirror.migrate_to_dev(self.addr[kind], self.npages)
        assert r.cpages == self.npages
        self.on_dev[kind] = True

    def migrate(self, kind):
        """The migration to the device alone, the steps dmirror_migrate_to_device() takes."""
        hmm = need("hmmgpu.hmm", "the HMM core")
        dmirror_migrate_steps(self.mirror, self.addr[kind], self.nbytes, self.dev,
                              hmm.MIGRATE_VMA_SELECT_SYSTEM | hmm.MIGRATE_VMA_SELECT_COMPOUND)
        self.on_dev[kind] = True

    def to_sys(self, kind):
        self.mirror.migrate_to_sys(self.addr[kind], self.npages)
        self.on_dev[kind] = False

    def ensure(self, kind, on_dev):
        if self.on_dev[kind] != on_dev:
            (self.to_dev if on_dev else self.to_sys)(kind)

    def pmd_mapped(self, kind):
        from hmmgpu.mm import pgtable as pt
        return bool(pt.pte_huge(self.proc.pages(self.addr[kind], self.npages)).all())

    def close(self):
        try:
            self.mirror.close()
            self.proc.exit()
        except Exception:
            pass
        self.mirror = self.proc = self.dev = self.system = None
        gc.collect()


def run(ctx):
    if ctx.gpu:
        raise Skip("the THP sweep runs on the NumPy backend (its target is the fallback's)")
    for nbytes in sizes(ctx):
        ctx.progress(f"THP vs 4 KiB {size_label(nbytes)}")
        pair = _Pair(ctx.backend_name, nbytes)
        try:
            _measure(ctx, pair)
        finally:
            pair.close()


def _measure(ctx, pair):
    nbytes = pair.nbytes
    t_mig, b_mig = ctx.compare(lambda: pair.migrate("thp"), lambda: pair.migrate("4k"),
                               ours_setup=lambda: pair.ensure("thp", False),
                               base_setup=lambda: pair.ensure("4k", False))
    t_dev, b_dev = ctx.compare(lambda: pair.to_dev("thp"), lambda: pair.to_dev("4k"),
                               ours_setup=lambda: pair.ensure("thp", False),
                               base_setup=lambda: pair.ensure("4k", False))
    thp_on_dev = pair.pmd_mapped("thp")
    t_sys, b_sys = ctx.compare(lambda: pair.to_sys("thp"), lambda: pair.to_sys("4k"),
                               ours_setup=lambda: pair.ensure("thp", True),
                               base_setup=lambda: pair.ensure("4k", True))
    thp_back = pair.pmd_mapped("thp")
    pair.ensure("thp", False)
    pair.ensure("4k", False)
    for kind in ("thp", "4k"):
        got = pair.proc.read(pair.addr[kind], nbytes)
        assert np.array_equal(got, pair.data), f"the {kind} round trips corrupted the data"
    whole = nbytes >= PMD
    assert thp_on_dev == whole and thp_back == whole, "THPs were not migrated as 2 MiB folios"
    target = ">= 3" if nbytes == TARGET_BYTES else None
    note = (f"{nbytes // PMD} THP(s) as 2 MiB device folios, mapped by PMDs both ways" if whole
            else "below one THP: both regions are 4 KiB pages")
    for what, ours, base, tgt in (("THP migration to device", t_mig, b_mig, target),
                                  ("THP migration to system (HMM_DMIRROR_MIGRATE_TO_SYS)", t_sys, b_sys, target),
                                  ("THP HMM_DMIRROR_MIGRATE_TO_DEV (migration + read-back)", t_dev, b_dev, None)):
        ctx.figure(what, nbytes=nbytes, ours=ours, base=base, baseline_name="the same bytes as 4 KiB pages",
                   target=tgt, size=size_label(nbytes), note=note)
