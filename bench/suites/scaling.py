"""scaling: control-plane cost per page from 2^10 to 2^20 pages (flat within 1.5x is the target).

For each size N, in a fresh System: CPU fault-in of N untouched anonymous pages (write
faults, demand-zero), fork (copying the page tables, COW), munmap, hmm_range_fault of N
present pages (REQ_FAULT, the sequence protocol around it), and the migration of N pages to
the device (migrate_vma_* through dmirror).  The ratio is the per-page cost at N over the
per-page cost at the largest N of the same run (the baseline).  Quick mode: 2^10 .. 2^13;
full: up to 2^20 on a GPU machine, 2^18 on the fallback (1 GiB).

Then the device side: a fault-driven reduce job over CPU-written (host-resident, scattered)
pages on a device that has mapped nothing, every page a device fault serviced by
hmm_range_fault and mapped remotely, from 8 MiB to 1 GiB (quick: 8 to 32 MiB); its per-page
cost against itself at 8 MiB, within 1.3x.
"""
import gc

import numpy as np

from ._common import PAGE, PRIV_ANON, RW, Workload, frames_sum, need, size_label

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
    if have_hmm and have_dm:
        fault_driven(ctx)
    if not have_hmm or not have_dm:
        missing = [x for x, ok in (("hmm_range_fault (hmmgpu.hmm)", have_hmm), ("migrate (dmirror)", have_dm))
                   if not ok]
        ctx.row("not measured: " + ", ".join(missing), ours=None, ours_unit="", baseline_name="-",
                baseline=None, ratio=None, target=None, note="pieces not there yet")


def _fault_driven_once(ctx, nbytes):
    from hmmgpu.drivers.mirrorgpu import MirrorGpu
    w = Workload(ctx.backend_name, nbytes // PAGE, scattered=True, ram_extra_pages=4096)
    st = {"gpu": None}
    try:
        expect = frames_sum(w.system.phys.ram.frames, w.pfns())

        def fresh():
            if st["gpu"] is not None:
                st["gpu"].close()
            st["gpu"] = MirrorGpu(w.system, w.proc, w.dev, w.addr, w.addr + nbytes, name="bench-gpu")

        def reduce():
            r = st["gpu"].jobs.reduce_sum(w.addr, nbytes)
            assert r.value == expect, "fault-driven reduce computed a wrong sum"
            st["rounds"] = len(r.rounds)
        t = ctx.time(reduce, setup=fresh)
        return t.median / (nbytes // PAGE), st["rounds"]
    finally:
        if st["gpu"] is not None:
            st["gpu"].close()
        w.close()


def fault_driven(ctx):
    sizes = [8 << 20, 16 << 20, 32 << 20] if ctx.quick else [8 << 20, 32 << 20, 128 << 20, 512 << 20,
                                                             1 << 30]
    per, rounds = {}, {}
    for nbytes in sizes:
        ctx.progress(f"fault-driven reduce, {size_label(nbytes)}")
        per[nbytes], rounds[nbytes] = _fault_driven_once(ctx, nbytes)
        gc.collect()
    ref = per[sizes[0]]
    for nbytes in sizes:
        ctx.row("fault-driven reduce per page (remote map)", ours=per[nbytes] * 1e9, ours_unit="ns/page",
                baseline_name=f"itself at {size_label(sizes[0])}", baseline=ref * 1e9,
                ratio=per[nbytes] / ref, target="within 1.3x", size=size_label(nbytes),
                note=f"{rounds[nbytes]} rounds (launch, drain, service, replay)")
