"""migration: anonymous pages to device memory and back, scattered and contiguous frames.

Ours is the migration itself through the HMM core and dmirror (migrate_vma_setup, device page
allocation, one DMA-engine batch, migrate_vma_pages, the device page-table update,
migrate_vma_finalize) and, back, HMM_DMIRROR_MIGRATE_TO_SYS.  Baselines in the same run: one
pinned cudaMemcpyAsync of the same bytes each way (GPU), or a NumPy gather of the same frames
(fallback).  "scattered": the RAM free list is shuffled first, so no two pages are adjacent
frames; "contiguous": pages faulted in order into consecutive frames.

On the fallback the suite also times dmirror's two ioctls over 64 MiB of scattered pages
(``_dmirror_ioctls``): HMM_DMIRROR_MIGRATE_TO_DEV, which copies every page twice (the migration,
then the read-back through the device page table that lib/test_hmm.c returns), against two
NumPy gathers of the same frames, and HMM_DMIRROR_MIGRATE_TO_SYS against one.
"""
import numpy as np

from ._common import PAGE, Cuda, Workload, pick_gather, size_label

NAME = "migration"
DESCRIPTION = "migrate anon pages to device and back (scattered vs contiguous) vs cudaMemcpy / NumPy gather"


def sizes(ctx):
    if ctx.quick:
        return [4 << 20]
    return [1 << 30] if ctx.gpu else [256 << 20]


def run(ctx, backend_name=None, nbytes_list=None, target=">= 0.85"):
    backend_name = backend_name or ctx.backend_name
    gpu = backend_name == "cupy"
    for nbytes in (nbytes_list or sizes(ctx)):
        for layout in ("scattered", "contiguous"):
            ctx.progress(f"{layout} {size_label(nbytes)}")
            w = Workload(backend_name, nbytes // PAGE, scattered=(layout == "scattered"))
            try:
                _measure(ctx, w, layout, gpu, target)
            finally:
                w.close()
    if not gpu and nbytes_list is None:
        _dmirror_ioctls(ctx)


def _dmirror_ioctls(ctx):
    """The ioctls as a user calls them, against NumPy gathers of the same frames."""
    nbytes = (4 << 20) if ctx.quick else (64 << 20)
    ctx.progress(f"dmirror ioctls {size_label(nbytes)}")
    w = Workload("numpy", nbytes // PAGE, scattered=True)
    try:
        gather = pick_gather(ctx, w.system.phys.ram.frames, w.pfns())
        m, n = w.mirror, w.npages
        state = {"on_dev": False}

        def to_dev():
            r = m.migrate_to_dev(w.addr, n)
            assert r.cpages == n and r.data.size == nbytes
            state["on_dev"] = True

        def to_sys():
            assert m.migrate_to_sys(w.addr, n).cpages == n
            state["on_dev"] = False

        def on_sys():
            if state["on_dev"]:
                to_sys()

        def on_dev():
            if not state["on_dev"]:
                to_dev()

        def two_gathers():
            gather()
            gather()
        t_dev, b_dev = ctx.compare(to_dev, two_gathers, ours_setup=on_sys)
        t_sys, b_sys = ctx.compare(to_sys, gather, ours_setup=on_dev)
        on_sys()
        note = f"{w.runs():,} run(s) of contiguous frames in {n:,} pages"
        ctx.figure("dmirror HMM_DMIRROR_MIGRATE_TO_DEV ioctl (migration + read-back)", nbytes=nbytes,
                   ours=t_dev, base=b_dev, baseline_name="two NumPy gathers of the same frames",
                   target=">= 0.7", size=size_label(nbytes), note=note)
        ctx.figure("dmirror HMM_DMIRROR_MIGRATE_TO_SYS ioctl", nbytes=nbytes, ours=t_sys, base=b_sys,
                   baseline_name="NumPy gather of the same frames", target=">= 0.7",
                   size=size_label(nbytes), note=note)
    finally:
        w.close()


def _measure(ctx, w, layout, gpu, target):
    nbytes, npages = w.nbytes, w.npages
    runs = w.runs()
    state = {"on_dev": False}

    def to_dev():
        w.to_dev()
        state["on_dev"] = True

    def back_to_sys():
        if state["on_dev"]:
            w.to_sys()
            state["on_dev"] = False

    def ensure_dev():
        if not state["on_dev"]:
            w.to_dev()
            state["on_dev"] = True

    def to_sys():
        w.to_sys()
        state["on_dev"] = False

    note = f"{runs:,} run(s) of contiguous frames in {npages:,} pages"
    if gpu:
        cu = Cuda(ctx)
        host = w.system.phys.ram
        dev_arena = w.dev.chunks[0].pgmap.arena
        base_dev = lambda: cu.memcpy(dev_arena.ptr, host.ptr, nbytes)      # noqa: E731
        base_sys = lambda: cu.memcpy(host.ptr, dev_arena.ptr, nbytes)      # noqa: E731
        names = ("pinned cudaMemcpy H2D", "pinned cudaMemcpy D2H")
    else:
        base_dev = base_sys = pick_gather(ctx, w.system.phys.ram.frames, w.pfns())
        names = ("NumPy gather of the same frames",) * 2
    t_dev, b_dev = ctx.compare(to_dev, base_dev, ours_setup=back_to_sys, base_device_only=gpu)
    t_sys, b_sys = ctx.compare(to_sys, base_sys, ours_setup=ensure_dev, base_device_only=gpu)
    back_to_sys()
    # the data survived the round trips
    first = w.proc.read(w.addr, PAGE).view(np.uint64)
    assert first[1] == np.uint64(0x0123456789ABCDEF), "migration corrupted the data"
    pairs = (("to device", t_dev, b_dev, names[0]), ("to system", t_sys, b_sys, names[1]))
    for direction, ours, base, bname in pairs:
        ctx.figure(f"migrate {layout} anon pages {direction}", nbytes=nbytes, ours=ours, base=base,
                   baseline_name=bname, target=target if gpu else ">= 0.7", size=size_label(nbytes), note=note)
