"""HMM core benchmarks: migration throughput and hmm_range_fault per-page cost.

    PYTHONPATH=. python3 bench/hmm_bench.py [--backend numpy] [--max-mib 1024] [--reps 3] [--json out.json]

1. migrate_to_dev / migrate_to_sys of 64 MiB .. 1 GiB of *scattered* anonymous pages
   (the RAM allocator's free list is shuffled first, as after a long uptime, so no two
   pages of the buffer are adjacent frames), through dmirror, against a NumPy gather of
   the same frames (``frames[pfns]``) timed in the same run.  Ratio = baseline / ours
   (target >= 0.7).  Two figures per direction: the migration itself (migrate_vma_setup,
   device allocation, one DMA batch, migrate_vma_pages, the device page table update,
   migrate_vma_finalize), and the whole HMM_DMIRROR_MIGRATE_TO_DEV ioctl, which also
   reads every page back through the device page table for verification like the
   kernel driver (one more full copy).
2. hmm_range_fault per-page cost, 2^10 .. 2^20 pages (4 MiB .. 4 GiB of virtual memory
   mapped to the zero page, so no RAM is needed): snapshot (no fault requested) and
   REQ_FAULT over already-present entries; flatness = max/min of the per-page cost
   (target <= 1.5).

On the NumPy backend every figure is a "numpy fallback" figure: device memory is host
memory, copies are NumPy copies.
"""
import argparse
import json
import sys
import time

import numpy as np

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.drivers import dmirror
from hmmgpu.hmm import (HMM_PFN_REQ_FAULT, HmmRange, MIGRATE_VMA_SELECT_SYSTEM, MigrateVma,
                        MmuIntervalNotifier, hmm_range_fault, migrate_vma_finalize, migrate_vma_pages,
                        migrate_vma_setup, mmu_interval_notifier_insert, mmu_interval_read_begin,
                        mmu_interval_set_seq)
from hmmgpu.mm import pgtable as pt


def best(fn, reps):
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def shuffle_free_list(phys, seed=1):
    """Scatter future allocations: permute the RAM allocator's free stack."""
    n = phys._nfree
    phys._free[:n] = np.random.default_rng(seed).permutation(phys._free[:n])


def bench_migrate(backend, mib, reps):
    npages = (mib << 20) // PAGE_SIZE
    system = hmmgpu.System(backend=backend, ram_bytes=(2 * mib + 64) << 20)
    shuffle_free_list(system.phys)
    dev = dmirror.DMirrorDevice(system, memory="private")
    proc = system.spawn()
    m = dev.open(proc)
    addr = proc.mmap(npages * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    proc.write(addr, np.random.default_rng(2).integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8))
    vma = proc.mm.find_vma(addr)
    pfns = pt.pte_pfn(vma.pte)
    runs = np.count_nonzero(np.diff(pfns) != 1) + 1
    frames = system.phys.ram.frames if hasattr(system.phys.ram, "frames") else None

    def gather():
        return frames[pfns]

    def core_to_dev():
        with proc.mm.mmap_lock.read():
            args = MigrateVma(vma, addr, addr + npages * PAGE_SIZE, pgmap_owner=dev,
                              flags=MIGRATE_VMA_SELECT_SYSTEM)
            assert migrate_vma_setup(args) == 0
            m._migrate_alloc_and_copy(args)
            migrate_vma_pages(args)
            m._migrate_finalize_and_map(args)
            migrate_vma_finalize(args)

    def to_sys():
        r = m.migrate_to_sys(addr, npages)
        assert r.cpages == npages

    def ioctl_to_dev():
        r = m.migrate_to_dev(addr, npages)
        assert r.cpages == npages

    base = best(gather, reps) if frames is not None else float("nan")
    t_dev, t_sys, t_ioctl = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        core_to_dev()
        t_dev.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        to_sys()
        t_sys.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ioctl_to_dev()
        t_ioctl.append(time.perf_counter() - t0)
        to_sys()
    check = proc.read(addr, PAGE_SIZE * 8)
    assert (check == np.random.default_rng(2).integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8)[:PAGE_SIZE * 8]).all()
    m.close()
    proc.exit()
    out = dict(mib=mib, npages=npages, runs_of_contiguous_pfns=int(runs), gather_s=base,
               to_dev_s=min(t_dev), to_sys_s=min(t_sys), ioctl_to_dev_s=min(t_ioctl))
    out["ratio_to_dev"] = base / out["to_dev_s"]
    out["ratio_to_sys"] = base / out["to_sys_s"]
    out["ratio_ioctl_to_dev"] = base / out["ioctl_to_dev_s"]
    out["gib_s_to_dev"] = (mib / 1024) / out["to_dev_s"]
    out["gib_s_to_sys"] = (mib / 1024) / out["to_sys_s"]
    return out


class _Seq:
    def invalidate(self, mni, range, cur_seq):
        mmu_interval_set_seq(mni, cur_seq)
        return True


def bench_range_fault(backend, log2s, reps):
    system = hmmgpu.System(backend=backend, ram_bytes=64 << 20)
    proc = system.spawn()
    n_max = 1 << max(log2s)
    addr = proc.mmap(n_max * PAGE_SIZE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)
    proc.populate(addr, n_max * PAGE_SIZE)          # every PTE maps the zero page
    mni = MmuIntervalNotifier()
    mmu_interval_notifier_insert(mni, proc.mm, 0, 1 << 47, _Seq())
    rows = []
    for k in log2s:
        n = 1 << k
        pfns = np.zeros(n, np.uint64)
        inner = max(1, (1 << 20) // n)            # the same number of pages per timing
        res = {}
        for name, flags in (("snapshot", 0), ("req_fault", HMM_PFN_REQ_FAULT)):
            rng = HmmRange(notifier=mni, start=addr, end=addr + n * PAGE_SIZE, hmm_pfns=pfns,
                           default_flags=flags)

            def run():
                for _ in range(inner):
                    rng.notifier_seq = mmu_interval_read_begin(mni)
                    with proc.mm.mmap_lock.read():
                        assert hmm_range_fault(rng) == 0
            run()                                   # warm-up
            res[name] = best(run, reps) / (inner * n) * 1e9
        rows.append(dict(log2_pages=k, snapshot_ns_per_page=res["snapshot"],
                         req_fault_ns_per_page=res["req_fault"]))
    proc.exit()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--max-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    label = "numpy fallback" if a.backend == "numpy" else a.backend
    sizes = [s for s in (64, 256, 1024) if s <= a.max_mib]
    mig = []
    print(f"migration ({label}): ratio = NumPy gather of the same frames / ours (target >= 0.7)")
    print(f"{'MiB':>6} {'runs':>8} {'gather s':>9} {'to_dev s':>9} {'ratio':>6} {'to_sys s':>9} {'ratio':>6}"
          f" {'ioctl s':>9} {'ratio':>6}")
    for s in sizes:
        r = bench_migrate(a.backend, s, a.reps)
        mig.append(r)
        print(f"{s:6d} {r['runs_of_contiguous_pfns']:8d} {r['gather_s']:9.4f} {r['to_dev_s']:9.4f} "
              f"{r['ratio_to_dev']:6.2f} {r['to_sys_s']:9.4f} {r['ratio_to_sys']:6.2f} "
              f"{r['ioctl_to_dev_s']:9.4f} {r['ratio_ioctl_to_dev']:6.2f}", flush=True)
    log2s = list(range(10, 21, 2))
    rf = bench_range_fault(a.backend, log2s, a.reps)
    print(f"\nhmm_range_fault per-page cost ({label}), zero-page PTEs")
    print(f"{'pages':>8} {'snapshot ns/page':>17} {'REQ_FAULT ns/page':>18}")
    for r in rf:
        print(f"{1 << r['log2_pages']:8d} {r['snapshot_ns_per_page']:17.2f} {r['req_fault_ns_per_page']:18.2f}")
    for key in ("snapshot_ns_per_page", "req_fault_ns_per_page"):
        v = [r[key] for r in rf]
        rel = [x / v[-1] for x in v]
        print(f"{key} relative to 2^20: " + " ".join(f"2^{r['log2_pages']}:{x:.2f}" for r, x in zip(rf, rel))
              + f"  (target <= 1.5; max/min over all sizes {max(v) / min(v):.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(backend=label, migrate=mig, range_fault=rf), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
