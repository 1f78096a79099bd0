"""scaling: control-plane cost per page from 2^10 to 2^20 pages (flat within 1.5x is the target).

For each size N, in a fresh System: CPU fault-in of N untouched anonymous pages (write
faults, demand-zero), fork (copying the page tables, COW), munmap, hmm_range_fault of N
present pages (REQ_FAULT, the sequence protocol around it), and the migration of N pages to
the device (migrate_vma_* through dmirror).  The ratio is the per-page cost at N over the
per-page cost at the largest N of the same run (the baseline).  Quick mode: 2^10 .. 2^13;
full: up to 2^20 on a GPU machine, 2^18 on the fallback (1 GiB).

Then the costs that must not depend on how much there is (``_fixed_costs``), each against
its baseline in the same run: mmap in an address space of 10^4 VMAs against one of a single
VMA (get_unmapped_area and the VMA tree), a one-page mprotect in a 2^18-page VMA against one
in a 2^10-page VMA (the split and merge of the VMA and its page table), and 10^4 one-page
migrations against one migration of the same 10^4 pages (migrate_vma's cost per call);
also the cost of one call of pt.map, fork + exit, munmap and migrate_vma for a single page.
"""
import gc

import numpy as np

import time

from ._common import PAGE, PRIV_ANON, RW, Workload, need

NAME = "scaling"
DESCRIPTION = "per-page cost of fault-in, fork, munmap, hmm_range_fault, migrate at 2^10..2^20 pages"


class _Seq:
    def invalidate(self, mni, range, cur_seq):
        from hmmgpu.mm.notifier import mmu_interval_set_seq
        mmu_interval_set_seq(mni, cur_seq)
        return True


def _measure(ctx, n, have_hmm):
    import hmmgpu
    out = {}
    system = hmmgpu.System(backend=ctx.backend_name, ram_bytes=(2 * n + 4096) * PAGE)
    proc = system.spawn()
    nbytes = n * PAGE
    st = {"a": None, "child": None}

    def remap():
        if st["a"] is not None:
            proc.munmap(st["a"], nbytes)
        st["a"] = proc.mmap(nbytes, RW, PRIV_ANON)
    out["fault-in"] = ctx.time(lambda: proc.populate(st["a"], nbytes, write=True), setup=remap)

    def reap():
        if st["child"] is not None:
            st["child"].exit()
            st["child"] = None
    out["fork"] = ctx.time(lambda: st.__setitem__("child", proc.fork()), setup=reap)
    reap()
    if have_hmm:
        from hmmgpu.hmm import (HMM_PFN_REQ_FAULT, HmmRange, MmuIntervalNotifier, hmm_range_fault,
                                mmu_interval_notifier_insert, mmu_interval_read_begin)
        mni = MmuIntervalNotifier()
        mmu_interval_notifier_insert(mni, proc.mm, st["a"], nbytes, _Seq())
        rng = HmmRange(notifier=mni, start=st["a"], end=st["a"] + nbytes,
                       hmm_pfns=np.zeros(n, np.uint64), default_flags=HMM_PFN_REQ_FAULT)

        def rf():
            rng.notifier_seq = mmu_interval_read_begin(mni)
            with proc.mm.mmap_lock.read():
                assert hmm_range_fault(rng) == 0
        out["hmm_range_fault"] = ctx.time(rf)

    def populate_fresh():
        remap()
        proc.populate(st["a"], nbytes, write=True)
    out["munmap"] = ctx.time(lambda: (proc.munmap(st["a"], nbytes), st.__setitem__("a", None)),
                             setup=populate_fresh)
    proc.exit()
    return out


def _migrate(ctx, n):
    w = Workload(ctx.backend_name, n, scattered=False, ram_extra_pages=4096)
    try:
        st = {"on": False}

        def back():
            if st["on"]:
                w.to_sys()
                st["on"] = False

        def to():
            w.to_dev()
            st["on"] = True
        return ctx.time(to, setup=back)
    finally:
        w.close()


def _mmap_costs(ctx):
    """mmap with 10^4 VMAs against mmap with one: each sample maps 32 one-page areas (they
    are unmapped again, untimed, before the next)."""
    import hmmgpu
    system = hmmgpu.System(backend=ctx.backend_name, ram_bytes=64 << 20)
    per = 32
    procs = {}
    for nvmas in (1, 10 ** 4):
        p = system.spawn()
        for i in range(nvmas):       # alternate protections: neighbours never merge
            p.mmap(PAGE, RW if i % 2 else 0x1, PRIV_ANON)
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
    ctx.row("mmap of one page among 10^4 VMAs", ours=many.median / per * 1e6, ours_unit="us/call",
            baseline_name="mmap of one page beside 1 VMA", baseline=one.median / per * 1e6,
            ratio=many.median / one.median, target="within 1.5x", size="10^4 VMAs",
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
            p.mprotect(a, PAGE, 0x1)       # split in three
            p.mprotect(a, PAGE, RW)        # and merged back
    big, small = ctx.compare(lambda: flip(18), lambda: flip(10))
    ctx.row("1-page mprotect in a 2^18-page VMA", ours=big.median / (2 * reps) * 1e6, ours_unit="us/call",
            baseline_name="1-page mprotect in a 2^10-page VMA", baseline=small.median / (2 * reps) * 1e6,
            ratio=big.median / small.median, target="within 1.5x", size="2^18 pages",
            label=ctx.label + ", host CPU time of the emulation")
    for p, _ in procs.values():
        p.exit()


def _migrate_range(w, addr, npages):
    """migrate_vma_setup, dmirror's alloc-and-copy, migrate_vma_pages, its device page-table
    map, migrate_vma_finalize: one migration of [addr, +npages) to the device."""
    hmm = need("hmmgpu.hmm", "the HMM core")
    m = w.mirror
    with w.proc.mm.mmap_lock.read():
        args = hmm.MigrateVma(w.proc.mm.find_vma(addr), addr, addr + npages * PAGE, pgmap_owner=w.dev,
                              flags=hmm.MIGRATE_VMA_SELECT_SYSTEM)
        if hmm.migrate_vma_setup(args):
            raise OSError("migrate_vma_setup failed")
        m._migrate_alloc_and_copy(args)
        hmm.migrate_vma_pages(args)
        m._migrate_finalize_and_map(args)
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
                                base_setup=back, repeat=3)
        back()
        ctx.row(f"{n:,} one-page migrations", ours=many.median / n * 1e6, ours_unit="us/call",
                baseline_name=f"one migration of the {n:,} pages", baseline=one.median * 1e6,
                baseline_unit="us", ratio=many.median / one.median, target="<= 20x",
                meets=many.median <= 20 * one.median, size=f"{n:,} pages",
                label=ctx.label + ", host CPU time of the emulation")
        _call_costs(ctx, w)
    finally:
        w.close()


def _call_costs(ctx, w):
    """The cost of one call for one page: what every call pays, however small."""
    import numpy as np
    reps = 20 if ctx.quick else 200
    pt = w.mirror.pt
    vpn, pfn = np.array([1 << 30], np.int64), np.array([7], np.int64)
    figures = {"pt.map of 1 page": lambda: pt.map(vpn, pfn)}
    p = w.proc
    small = p.mmap(PAGE, RW, PRIV_ANON)
    p.populate(small, PAGE, write=True)

    def mapped():
        a = p.mmap(PAGE, RW, PRIV_ANON)
        p.populate(a, PAGE, write=True)
        return a
    spare = []
    figures["munmap of 1 page"] = (lambda: p.munmap(spare.pop(), PAGE),
                                   lambda: spare.append(mapped()))
    figures["migrate_vma of 1 page"] = (lambda: _migrate_range(w, small, 1), lambda: w.mirror.migrate_to_sys(small, 1))
    figures["dmirror migrate_to_dev of 1 page (the ioctl)"] = (
        lambda: w.mirror.migrate_to_dev(small, 1), lambda: w.mirror.migrate_to_sys(small, 1))
    for name, f in figures.items():
        fn, setup = f if isinstance(f, tuple) else (f, None)
        ts = []
        for _ in range(reps):
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        ctx.row(f"fixed cost: {name}", ours=ts[reps // 2] * 1e6, ours_unit="us/call", baseline_name="-",
                baseline=None, ratio=None, target=None, label=ctx.label + ", host CPU time of the emulation",
                note=f"median of {reps} calls")
    q = w.system.spawn()              # fork and exit: a small process (two one-page VMAs)
    for prot in (RW, 0x1):
        q.populate(q.mmap(PAGE, prot, PRIV_ANON), PAGE)
    children = []

    def forks():
        children.extend(q.fork() for _ in range(20))

    def exits():
        while children:
            children.pop().exit()
    t_fork = ctx.time(forks, setup=exits)
    t_exit = ctx.time(exits, setup=forks)
    for name, t in (("fork of a process with 2 one-page VMAs", t_fork), ("exit of that child", t_exit)):
        ctx.row(f"fixed cost: {name}", ours=t.median / 20 * 1e6, ours_unit="us/call", baseline_name="-",
                baseline=None, ratio=None, target=None, label=ctx.label + ", host CPU time of the emulation")
    exits()
    q.exit()
    p.munmap(small, PAGE)


def _fixed_costs(ctx):
    ctx.progress("fixed costs per call")
    _mmap_costs(ctx)
    gc.collect()
    _mprotect_costs(ctx)
    gc.collect()
    try:
        need("hmmgpu.drivers.dmirror", "dmirror")
    except Exception:
        return
    _migrate_costs(ctx)
    gc.collect()


def run(ctx):
    try:
        need("hmmgpu.hmm", "the HMM core")
        have_hmm = True
    except Exception:
        have_hmm = False
    try:
        need("hmmgpu.drivers.dmirror", "dmirror")
        have_dm = True
    except Exception:
        have_dm = False
    hi = 13 if ctx.quick else (20 if ctx.gpu else 18)
    exps = list(range(10, hi + 1, 1 if ctx.quick else 2))
    if exps[-1] != hi:
        exps.append(hi)
    per = {}
    for k in exps:
        n = 1 << k
        ctx.progress(f"2^{k} pages")
        t = _measure(ctx, n, have_hmm)
        gc.collect()        # the System's reference cycles would keep its RAM arena alive
        if have_dm:
            t["migrate"] = _migrate(ctx, n)
        per[n] = {op: tm.median / n for op, tm in t.items()}
    big = max(per)
    for op in per[big]:
        ref = per[big][op]
        for n in sorted(per):
            ctx.row(f"{op} per page", ours=per[n][op] * 1e9, ours_unit="ns/page",
                    baseline_name=f"itself at 2^{big.bit_length() - 1}", baseline=ref * 1e9,
                    ratio=per[n][op] / ref, target="within 1.5x", size=f"2^{n.bit_length() - 1} pages",
                    label=ctx.label + ", host CPU time of the emulation")
    if not have_hmm or not have_dm:
        missing = [x for x, ok in (("hmm_range_fault (hmmgpu.hmm)", have_hmm), ("migrate (dmirror)", have_dm))
                   if not ok]
        ctx.row("not measured: " + ", ".join(missing), ours=None, ours_unit="", baseline_name="-",
                baseline=None, ratio=None, target=None, note="pieces not there yet")
    _fixed_costs(ctx)
