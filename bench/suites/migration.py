"""migration: anonymous pages to device memory and back, scattered and contiguous frames.

Ours is the migration itself through the HMM core and dmirror (migrate_vma_setup, device page
allocation, one DMA-engine batch, migrate_vma_pages, the device page-table update,
migrate_vma_finalize) and, back, HMM_DMIRROR_MIGRATE_TO_SYS.  Baselines in the same run: one
pinned cudaMemcpyAsync of the same bytes each way (GPU), or a NumPy gather of the same frames
(fallback).  "scattered": the RAM free list is shuffled first, so no two pages are adjacent
frames; "contiguous": pages faulted in order into consecutive frames.
"""
import numpy as np

from ._common import PAGE, Cuda, Workload, gather_baseline, size_label

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

    t_dev = ctx.time(to_dev, setup=back_to_sys)
    t_sys = ctx.time(to_sys, setup=ensure_dev)
    back_to_sys()
    # the data survived the round trips
    first = w.proc.read(w.addr, PAGE).view(np.uint64)
    assert first[1] == np.uint64(0x0123456789ABCDEF), "migration corrupted the data"
    note = f"{runs:,} run(s) of contiguous frames in {npages:,} pages"
    if gpu:
        cu = Cuda(ctx)
        host = w.system.phys.ram
        dev_arena = w.dev.chunks[0].pgmap.arena
        b_h2d = ctx.baseline(lambda: ctx.time(lambda: cu.memcpy(dev_arena.ptr, host.ptr, nbytes), device_only=True))
        b_d2h = ctx.baseline(lambda: ctx.time(lambda: cu.memcpy(host.ptr, dev_arena.ptr, nbytes), device_only=True))
        pairs = (("to device", t_dev, b_h2d, "pinned cudaMemcpy H2D"),
                 ("to system", t_sys, b_d2h, "pinned cudaMemcpy D2H"))
    else:
        b = gather_baseline(ctx, w.system.phys.ram.frames, w.pfns())
        pairs = (("to device", t_dev, b, "NumPy gather of the same frames"),
                 ("to system", t_sys, b, "NumPy gather of the same frames"))
    for direction, ours, base, bname in pairs:
        ctx.figure(f"migrate {layout} anon pages {direction}", nbytes=nbytes, ours=ours, base=base,
                   baseline_name=bname, target=target if gpu else ">= 0.7", size=size_label(nbytes), note=note)
