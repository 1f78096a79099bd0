"""migration: anonymous pages to device memory and back, scattered and contiguous frames.

Ours is the migration itself through the HMM core and dmirror (migrate_vma_setup, device page
allocation, one DMA-engine batch, migrate_vma_pages, the device page-table update,
migrate_vma_finalize) and, back, HMM_DMIRROR_MIGRATE_TO_SYS.  Baselines in the same run: one
pinned cudaMemcpyAsync of the same bytes each way (GPU), or the fastest plain NumPy copy of the
same pages (fallback: fancy indexing, np.take into a buffer, or one contiguous copy of as many
bytes, whichever is fastest in the run).  "scattered": the RAM free list is shuffled first, so
no two pages are adjacent frames; "contiguous": pages faulted in order into consecutive frames.

On the fallback the suite also times dmirror's two ioctls as a user calls them, over 64 MiB of
scattered pages (``_dmirror_ioctls``): HMM_DMIRROR_MIGRATE_TO_DEV, which copies every page twice
(the migration, then the read-back through the device page table that lib/test_hmm.c returns),
against the same NumPy copy done twice, and HMM_DMIRROR_MIGRATE_TO_SYS against it done once.
"""

from ..measure import BestOf
from ._common import PAGE, Cuda, Workload, numpy_copy, size_label

NAME = "migration"
DESCRIPTION = "migrate anon pages to device and back (scattered vs contiguous) vs cudaMemcpy / NumPy copy"
QUICK_BYTES = 32 << 20


def sizes(ctx):
    if ctx.quick:
        return [QUICK_BYTES]
    return [1 << 30] if ctx.gpu else [256 << 20]


def run(ctx, backend_name=None, nbytes_list=None, target=">= 0.85", layouts=("scattered", "contiguous")):
    backend_name = backend_name or ctx.backend_name
    gpu = backend_name == "cupy"
    for nbytes in (nbytes_list or sizes(ctx)):
        for layout in layouts:
            ctx.progress(f"{layout} {size_label(nbytes)}")
            w = Workload(backend_name, nbytes // PAGE, scattered=(layout == "scattered"))
            try:
                _measure(ctx, w, layout, gpu, target)
            finally:
                w.close()
    if not gpu and nbytes_list is None:
        _dmirror_ioctls(ctx)


def _twice(best):
    """The same BestOf candidates, each doing its copy twice."""
    return BestOf([(name, lambda fn=fn: (fn(), fn())) for name, fn, _setup in best.candidates])


def _dmirror_ioctls(ctx):
    """HMM_DMIRROR_MIGRATE_TO_DEV and _TO_SYS as a user calls them, against NumPy copies."""
    nbytes = (4 << 20) if ctx.quick else (64 << 20)
    ctx.progress(f"dmirror ioctls {size_label(nbytes)}")
    w = Workload("numpy", nbytes // PAGE, scattered=True)
    try:
        m, n = w.mirror, w.npages
        once = numpy_copy(w.system.phys.ram.frames, w.pfns())
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
        t_dev, b_dev = ctx.compare(to_dev, _twice(once), ours_setup=on_sys)
        t_sys, b_sys = ctx.compare(to_sys, once, ours_setup=on_dev)
        on_sys()
        note = f"{w.runs():,} run(s) of contiguous frames in {n:,} pages"
        ctx.figure("dmirror HMM_DMIRROR_MIGRATE_TO_DEV ioctl (migration + read-back)", nbytes=nbytes,
                   ours=t_dev, base=b_dev, baseline_name="fastest NumPy way, twice", target=">= 0.7",
                   size=size_label(nbytes), note=note)
        ctx.figure("dmirror HMM_DMIRROR_MIGRATE_TO_SYS ioctl", nbytes=nbytes, ours=t_sys, base=b_sys,
                   baseline_name="fastest NumPy way", target=">= 0.7", size=size_label(nbytes), note=note)
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
        # buffers of their own: copying over the live arenas would overwrite migrated device
        # pages and RAM frames from pfn 0 (the zero page included)
        cu = Cuda(ctx)
        host_buf = cu.cp.cuda.alloc_pinned_memory(nbytes)
        dev_buf = cu.cp.empty(nbytes, dtype=cu.cp.uint8)
        base_dev = lambda: cu.memcpy(dev_buf.data.ptr, host_buf.ptr, nbytes)      # noqa: E731
        base_sys = lambda: cu.memcpy(host_buf.ptr, dev_buf.data.ptr, nbytes)      # noqa: E731
        names = ("pinned cudaMemcpy H2D", "pinned cudaMemcpy D2H")
    else:
        base_dev = base_sys = numpy_copy(w.system.phys.ram.frames, w.pfns())
        names = ("fastest NumPy way",) * 2
    t_dev, b_dev = ctx.compare(to_dev, base_dev, ours_setup=back_to_sys, base_device_only=gpu)
    t_sys, b_sys = ctx.compare(to_sys, base_sys, ours_setup=ensure_dev, base_device_only=gpu)
    back_to_sys()
    w.check_pattern()                     # the data survived the round trips, every page of it
    pairs = (("to device", t_dev, b_dev, names[0]), ("to system", t_sys, b_sys, names[1]))
    for direction, ours, base, bname in pairs:
        ctx.figure(f"migrate {layout} anon pages {direction}", nbytes=nbytes, ours=ours, base=base,
                   baseline_name=bname, target=target if gpu else ">= 0.7", size=size_label(nbytes), note=note)
