"""device: the emulated device's own engines, without the host kernel or HMM around them.

What the other suites measure through a whole process (mm, hmm_range_fault, migrate_vma_*,
dmirror), this one measures on an ``EmulatedDevice`` alone, so a reader can tell the engine's
cost from the control plane's:

* the DMA engine copying scattered 4 KiB pages host -> device and device -> host, against one
  pinned cudaMemcpyAsync of the same bytes (GPU) or the fastest plain NumPy copy of the same
  pages (fallback);
* 2 MiB folios (both backends): the DMA engine moving whole folios against the same bytes as
  scattered 4 KiB pages; the page table mapping them as 2 MiB leaves against 4 KiB leaves (the
  commands and entries per folio in the note); a reduce and a gather job over device-resident
  folios through 2 MiB leaves against the same jobs through 4 KiB leaves (two address spaces of
  one device over the same frames);
* GPU only: the reduce kernel walking the device page table over device pages and over system
  pages mapped remotely, against the same kernel on a flat array / on mapped pinned host memory
  (zero-copy); explicit prefetch (DMA of scattered system pages + page-table map) against
  cudaMemPrefetchAsync of CPU-touched managed memory; a fault-driven first touch of host-resident
  pages (the device layer's toy driver migrating 2 MiB blocks) against the same reduce kernel on
  CUDA managed memory first touched by the CPU.

Sizes: 1 GiB on a GPU (``options["device_bytes"]`` sets another: bench/device_bench.py --gib),
256 MiB on the fallback; quick: 64 MiB / 32 MiB.  The 2 MiB-folio rows: the same on a GPU, 64 MiB
on the fallback (quick: 8 MiB).
"""
import numpy as np

from ..measure import Unavailable
from ._common import PAGE, Cuda, numpy_copy, size_label

FOLIO = 512                   # 4 KiB pages in a 2 MiB folio

NAME = "device"
DESCRIPTION = ("the device's engines alone: DMA of scattered pages, page-table reduce, prefetch, first touch, "
               "2 MiB folios (DMA, 2 MiB leaves)")
VA = 0x7F0000000000


def _nbytes(ctx):
    if "device_bytes" in ctx.options:
        return int(ctx.options["device_bytes"]) // PAGE * PAGE
    if ctx.quick:
        return (64 << 20) if ctx.gpu else (32 << 20)
    return (1 << 30) if ctx.gpu else (256 << 20)


def _wanted(ctx, part):
    only = ctx.options.get("only")
    return only is None or part in only


def run(ctx):
    from hmmgpu.device import EmulatedDevice
    nbytes = _nbytes(ctx)
    npg = nbytes // PAGE
    be = ctx.backend
    rng = np.random.default_rng(0)
    host = be.host_arena(npg + 16)
    if ctx.gpu:
        _gpu(ctx, be, host, npg, rng)
        if _wanted(ctx, "thp"):
            _thp(ctx, be, host, nbytes)
        return
    host.frames[:npg] = 0x5A
    dev = EmulatedDevice(be, npg, 1 << 32, host)
    dsti, srci = rng.permutation(npg), rng.permutation(npg)
    ctx.progress(f"DMA engine, {size_label(nbytes)} of scattered pages")
    ours, base = ctx.compare(lambda: dev.dma.copy(dev.arena, dsti, host, srci), numpy_copy(host.frames, srci))
    ctx.figure("DMA engine: scattered pages host -> device", nbytes=nbytes, ours=ours, base=base,
               baseline_name="fastest NumPy way", target=">= 0.7", size=size_label(nbytes),
               note="the copy engine alone: no page table, no HMM")
    ours, base = ctx.compare(lambda: dev.dma.copy(host, srci, dev.arena, dsti), numpy_copy(host.frames, srci))
    ctx.figure("DMA engine: scattered pages device -> host", nbytes=nbytes, ours=ours, base=base,
               baseline_name="fastest NumPy way", target=">= 0.7", size=size_label(nbytes),
               note="the copy engine alone: no page table, no HMM")
    del dev
    if _wanted(ctx, "thp"):
        _thp(ctx, be, host, (8 << 20) if ctx.quick else min(nbytes, 64 << 20))


def _thp(ctx, be, host, nbytes):
    """The 2 MiB-folio rows (see the module docstring); ``host`` holds at least ``nbytes``."""
    from hmmgpu.device import EmulatedDevice
    from hmmgpu.device.pagetable import PTE_WRITE
    rng = np.random.default_rng(5)
    nf = max(nbytes // (FOLIO * PAGE), 2)
    nbytes = nf * FOLIO * PAGE
    npg, size = nf * FOLIO, size_label(nbytes)
    ramp = np.arange(FOLIO)
    dev = EmulatedDevice(be, npg + 2 * FOLIO, 1 << 32, host, slice_lanes=1 << 30)

    ctx.progress(f"2 MiB folios: DMA, {size}")
    fd = (rng.permutation(nf)[:, None] * FOLIO + ramp).reshape(-1)       # folios scattered among
    fs = (rng.permutation(nf)[:, None] * FOLIO + ramp).reshape(-1)       # themselves, whole inside
    sd, ss = rng.permutation(npg), rng.permutation(npg)
    before = dev.dma.contiguous_copies
    dev.dma.copy(dev.arena, fd, host, fs).wait()
    copies = dev.dma.contiguous_copies - before
    ours, base = ctx.compare(lambda: dev.dma.copy(dev.arena, fd, host, fs).wait(),
                             lambda: dev.dma.copy(dev.arena, sd, host, ss).wait())
    ctx.figure("DMA engine: 2 MiB folios host -> device", nbytes=nbytes, ours=ours, base=base,
               baseline_name="the same bytes as scattered 4 KiB pages, same engine", target=None, size=size,
               note=f"{nf} folios in {copies} contiguous copies")

    # one device, two address spaces over the same frames: folio j of the range at folio
    # perm[j] of the device memory; the range is data, then a folio each for gather's idx, dst
    total = npg + 2 * FOLIO
    frames = dev.pfn_base + (rng.permutation(total // FOLIO)[:, None] * FOLIO + ramp).reshape(-1)
    vpns = (VA >> 12) + np.arange(total)
    lanes = min(npg * 16, FOLIO * PAGE // 8)                            # idx fits its folio
    dev.fill_pages(frames[:npg], 0x5A)
    dev.write_pages(frames[npg:npg + FOLIO], rng.integers(0, npg * (PAGE // 4), FOLIO * PAGE // 8).view(np.uint8))
    small, huge = dev.create_context(name="4k"), dev.create_context(name="2m")
    counts = {}
    for name, sp, fn in (("4 KiB", small, lambda: small.pt.map(vpns, frames, PTE_WRITE).wait()),
                         ("2 MiB", huge, lambda: huge.pt.map_huge(vpns[::FOLIO], frames[::FOLIO], PTE_WRITE).wait())):
        fn()
        before = dict(sp.pt.stats)
        fn()
        counts[name] = tuple((sp.pt.stats[k] - before[k]) / (total // FOLIO)
                             for k in ("pt_commands", "pt_entries_updated"))
    ctx.progress(f"2 MiB folios: page-table map, {size}")
    ours, base = ctx.compare(lambda: huge.pt.map_huge(vpns[::FOLIO], frames[::FOLIO], PTE_WRITE).wait(),
                             lambda: small.pt.map(vpns, frames, PTE_WRITE).wait())
    ctx.cost("device page table: map device folios as 2 MiB leaves", ours=ours, base=base, per=total // FOLIO,
             unit="us/folio", scale=1e6, baseline_name="the same folios as 4 KiB leaves", target=None, size=size,
             note="per folio: %g command(s), %g entry with 2 MiB leaves; %g, %g with 4 KiB leaves"
             % (counts["2 MiB"] + counts["4 KiB"]))

    ctx.progress(f"2 MiB folios: jobs through 2 MiB leaves, {size}")
    assert small.jobs.reduce_sum(VA, nbytes).value == huge.jobs.reduce_sum(VA, nbytes).value
    ours, base = ctx.compare(lambda: huge.jobs.reduce_sum(VA, nbytes), lambda: small.jobs.reduce_sum(VA, nbytes))
    ctx.figure("reduce job via page table, device-resident 2 MiB folios", nbytes=nbytes, ours=ours, base=base,
               baseline_name="the same job through 4 KiB leaves", target=None, size=size,
               note="folios scattered in device memory; the whole job, host work included")
    idx, dst = VA + npg * PAGE, VA + (npg + FOLIO) * PAGE
    ours, base = ctx.compare(lambda: huge.jobs.gather(dst, VA, idx, lanes),
                             lambda: small.jobs.gather(dst, VA, idx, lanes))
    ctx.cost("gather job via page table, device-resident 2 MiB folios", ours=ours, base=base, per=lanes,
             unit="ns/lane", baseline_name="the same job through 4 KiB leaves", target=None, size=size,
             note="one random 4-byte load per lane, three translations")
    small.destroy()
    huge.destroy()


def _gpu(ctx, be, host, npg, rng):
    from hmmgpu.device import EmulatedDevice
    from hmmgpu.device.jobs import JobSpec
    from hmmgpu.device.testing import ToyDriver
    from hmmgpu.kernels.module import launch, load_module
    import cupy
    cu = Cuda(ctx)
    rt = cupy.cuda.runtime
    nbytes = npg * PAGE
    size = size_label(nbytes)
    stream = be.stream(0)
    host.host[:npg].reshape(-1).view(np.uint64)[::7] = np.uint64(0x0123456789ABCDEF)
    mod = load_module("jobs.cu", 0)

    if _wanted(ctx, "dma"):
        ctx.progress(f"DMA engine, {size}")
        dev = EmulatedDevice(be, npg, 1 << 32, host)
        dsti, srci = rng.permutation(npg), rng.permutation(npg)
        ptr_d, ptr_h = dev.arena.ptr, host.ptr
        ours, base = ctx.compare(lambda: dev.dma.copy(dev.arena, dsti, host, srci),
                                 lambda: cu.memcpy(ptr_d, ptr_h, nbytes), base_device_only=True)
        ctx.figure("DMA engine: scattered pages host -> device", nbytes=nbytes, ours=ours, base=base,
                   baseline_name="pinned cudaMemcpy H2D", target=">= 0.85", size=size)
        ours, base = ctx.compare(lambda: dev.dma.copy(host, srci, dev.arena, dsti),
                                 lambda: cu.memcpy(ptr_h, ptr_d, nbytes), base_device_only=True)
        ctx.figure("DMA engine: scattered pages device -> host", nbytes=nbytes, ours=ours, base=base,
                   baseline_name="pinned cudaMemcpy D2H", target=">= 0.85", size=size)
        del dev
        cupy.get_default_memory_pool().free_all_blocks()

    if _wanted(ctx, "reduce"):
        ctx.progress(f"reduce via page table, device pages, {size}")
        dev = EmulatedDevice(be, npg, 1 << 32, host, slice_lanes=1 << 30)
        dev.pt.map((VA >> 12) + np.arange(npg), dev.pfn_base + rng.permutation(npg)).wait()
        with stream:
            flat = cupy.ones(nbytes // 4, dtype=cupy.uint32)
            partials = cupy.zeros(npg, dtype=cupy.uint64)
        spec = JobSpec("reduce", npg, [VA, 0, nbytes // 16, np.zeros(npg, np.uint64)], warp=True)
        h = dev.jobs.ex.prepare(spec, 999)
        ours, base = ctx.compare(
            lambda: dev.jobs.ex.launch(h, None, 0, npg, dev.pt.nodes),
            lambda: launch(mod, "job_reduce_flat", 32 * npg, (flat, np.uint64(nbytes // 16), np.uint64(npg),
                                                              partials), stream))
        ctx.figure("reduce kernel via page table, device pages", nbytes=nbytes, ours=ours, base=base,
                   baseline_name="same kernel, flat device array", target=">= 0.8", size=size,
                   note="scattered device frames; the kernel alone")
        del dev, flat, h
        cupy.get_default_memory_pool().free_all_blocks()

    if _wanted(ctx, "remote"):
        ctx.progress(f"reduce via page table, remote RAM pages, {size}")
        dev = EmulatedDevice(be, 16, 1 << 32, host, slice_lanes=1 << 30)
        dev.pt.map((VA >> 12) + np.arange(npg), rng.permutation(npg)).wait()
        with stream:
            partials = cupy.zeros(npg, dtype=cupy.uint64)
        spec = JobSpec("reduce", npg, [VA, 0, nbytes // 16, np.zeros(npg, np.uint64)], warp=True)
        h = dev.jobs.ex.prepare(spec, 998)
        ours, base = ctx.compare(
            lambda: dev.jobs.ex.launch(h, None, 0, npg, dev.pt.nodes),
            lambda: launch(mod, "job_reduce_flat", 32 * npg, (np.uint64(host.ptr), np.uint64(nbytes // 16),
                                                              np.uint64(npg), partials), stream))
        ctx.figure("reduce kernel via page table, remote RAM pages", nbytes=nbytes, ours=ours, base=base,
                   baseline_name="same kernel, zero-copy read of pinned host memory", target=">= 0.85",
                   size=size, note="scattered system frames, mapped remotely")
        del dev, h
        cupy.get_default_memory_pool().free_all_blocks()

    if _wanted(ctx, "prefetch"):
        ctx.progress(f"explicit prefetch, {size}")
        held = {}

        def fresh_dev():
            held.pop("dev", None)
            cupy.get_default_memory_pool().free_all_blocks()
            held["dev"] = EmulatedDevice(be, npg, 1 << 32, host)
            held["src"] = rng.permutation(npg)

        def prefetch():
            dev = held["dev"]
            dev.copy_pages(dev.pfn_base + np.arange(npg), held["src"])
            dev.pt.map((VA >> 12) + np.arange(npg), dev.pfn_base + np.arange(npg))

        def managed():
            held["mem"], held["view"] = cu.managed(nbytes)

            def to_cpu():
                # the CPU write to every page brings the range back to the CPU (a prefetch to -1
                # fails on CuPy 14 with CUDA 13: see Cuda.prefetch)
                held["view"][::PAGE] = 0x5A
            return lambda: cu.prefetch(held["mem"].ptr, nbytes, 0), to_cpu
        prep = ctx.baseline(managed)
        fn, setup = (prep, None) if isinstance(prep, BaseException) else prep
        ours, base = ctx.compare(prefetch, fn, ours_setup=fresh_dev, base_setup=setup, base_device_only=True)
        ctx.figure("explicit prefetch: DMA + page-table map", nbytes=nbytes, ours=ours, base=base,
                   baseline_name="cudaMemPrefetchAsync of CPU-touched managed memory", target=">= 0.9",
                   size=size, note="scattered system frames -> device frames")
        held.clear()
        cupy.get_default_memory_pool().free_all_blocks()

    if _wanted(ctx, "fault"):
        for batch in (256, 4096):
            ctx.progress(f"fault-driven first touch, batch {batch}, {size}")
            held = {}

            def fresh_toy(batch=batch):
                held.pop("dev", None)
                held.pop("drv", None)
                cupy.get_default_memory_pool().free_all_blocks()
                dev = EmulatedDevice(be, npg, 1 << 32, host, slice_lanes=1 << 30,
                                     fault_buffer_entries=1 << 16, fault_batch_size=batch)
                drv = ToyDriver(dev, npg, migrate="all", block_pages=512)
                drv.backing[:] = rng.permutation(npg)           # data already in RAM, scattered
                drv.next_va = npg
                dev.service = drv.service
                held["dev"], held["drv"] = dev, drv

            def first_touch():
                held["dev"].jobs.reduce_sum(held["drv"].base, nbytes)

            def managed_touch():
                held["mem"], held["view"] = cu.managed(nbytes)
                with stream:
                    held["partials"] = cupy.zeros(npg, dtype=cupy.uint64)

                def cpu_touch():
                    held["view"][::PAGE] = 0x5A                   # the pages now live on the host
                return (lambda: launch(mod, "job_reduce_flat", 32 * npg,
                                       (np.uint64(held["mem"].ptr), np.uint64(nbytes // 16), np.uint64(npg),
                                        held["partials"]), stream)), cpu_touch
            prep = ctx.baseline(managed_touch)
            fn, setup = (prep, None) if isinstance(prep, BaseException) else prep
            ours, base = ctx.compare(first_touch, fn, ours_setup=fresh_toy, base_setup=setup)
            ctx.figure(f"fault-driven first touch, fault batch {batch}", nbytes=nbytes, ours=ours, base=base,
                       baseline_name="managed memory, CPU-touched, same reduce kernel", target=">= 1.0",
                       size=size, note="toy driver migrating 2 MiB blocks on fault; host work included")
            held.clear()
            cupy.get_default_memory_pool().free_all_blocks()
    if not any(_wanted(ctx, p) for p in ("dma", "reduce", "remote", "prefetch", "fault")):
        raise Unavailable(f"no figure selected by only={ctx.options.get('only')!r}")

