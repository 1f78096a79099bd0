"""Device-layer micro-benchmarks (GPU only): each figure against its baseline, in the same run.

    PYTHONPATH=. python3 bench/device_bench.py [--gib 1] [--reps 5] [--json out.json]
    PYTHONPATH=. python3 bench/device_bench.py --cpu     # the NumPy-fallback figures only

Times are CUDA-event medians after a warm-up (end-to-end figures also give host wall time).
  1. migrate 1 GiB of scattered 4 KiB pages host->device and device->host on the DMA engine
     vs one pinned cudaMemcpyAsync of 1 GiB each way;
  2. streaming reduce through the device page table over device-resident pages (scattered
     frames) vs the same kernel over a flat device array;
  3. the same reduce over system-RAM pages mapped remotely (zero-copy over PCIe, scattered
     frames) vs the flat kernel reading the same number of bytes of mapped host memory;
  4. explicit prefetch: DMA of 1 GiB of scattered system pages + page-table map vs
     cudaMemPrefetchAsync of CPU-touched managed memory;
  5. fault-driven first touch: a reduce job over 1 GiB whose pages all live in system RAM,
     serviced by a toy driver that migrates 2 MiB blocks, vs the same reduce kernel on CUDA
     managed memory first touched by the CPU.
"""
import argparse
import ctypes
import json
import statistics
import sys
import time

import numpy as np

PAGE = 4096


def control_plane(backend_name, reps=3):
    """Page-table map + unmap cost per page, 2**10 .. 2**20 pages per call, scattered pfns."""
    from hmmgpu.device import EmulatedDevice
    from hmmgpu.device.backend import get_backend
    be = get_backend(backend_name)
    host = be.host_arena(4096)
    dev = EmulatedDevice(be, 16, 1 << 32, host)
    rng = np.random.default_rng(1)
    per_page = {}
    for k in range(10, 21, 2):
        n = 1 << k
        vpns = 0x7F0000000 + np.arange(n)
        pfns = rng.integers(0, 4096, n)
        ts = []
        for _ in range(max(reps, (1 << 16) // n) + 1):   # small calls: more repeats, one warm-up
            t0 = time.perf_counter()
            dev.pt.map(vpns, pfns).wait()
            dev.pt.invalidate(vpns)
            ts.append(time.perf_counter() - t0)
        ts = ts[1:]
        per_page[n] = statistics.median(ts) / n
    ref = per_page[1 << 20]
    print(f"control plane ({backend_name}): map+invalidate per page, relative to 2^20 pages:", flush=True)
    for n, t in per_page.items():
        print(f"  {n:8d} pages  {t * 1e9:8.1f} ns/page  x{t / ref:5.2f}", flush=True)
    return {str(n): t for n, t in per_page.items()}


def fallback_dma(mib=256, reps=5):
    """NumPy fallback: scattered page migration vs a NumPy gather of the same frames."""
    from hmmgpu.device import EmulatedDevice
    from hmmgpu.device.backend import get_backend
    be = get_backend("numpy")
    n = mib * 256
    host = be.host_arena(n)
    host.frames[:] = 0x5A
    dev = EmulatedDevice(be, n, 1 << 32, host)
    rng = np.random.default_rng(2)
    d, s = rng.permutation(n), rng.permutation(n)
    dev.dma.copy(dev.arena, d, host, s)
    t_dma = statistics.median(_wall(lambda: dev.dma.copy(dev.arena, d, host, s), reps))
    buf = np.empty((n, 4096), np.uint8)
    buf[:] = 1                      # the baseline writes into memory that is already there
    # the faster of NumPy's two gathers: fancy indexing (new array) and take into a buffer
    t_np = min(statistics.median(_wall(lambda: np.take(host.frames, s, axis=0, out=buf), reps)),
               statistics.median(_wall(lambda: host.frames[s], reps)))
    print(f"numpy fallback: migrate {mib} MiB scattered pages {n * 4096 / t_dma / 1e9:6.2f} GB/s, "
          f"NumPy gather {n * 4096 / t_np / 1e9:6.2f} GB/s, ratio {t_np / t_dma:4.2f} (target >= 0.7)",
          flush=True)
    return {"migrate_s": t_dma, "gather_s": t_np, "ratio": t_np / t_dma}


def _wall(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default="dma,reduce,remote,prefetch,fault")
    ap.add_argument("--cpu", action="store_true", help="only the figures that need no GPU (numpy backend)")
    opt = ap.parse_args()
    if opt.cpu:
        res = {"date": time.strftime("%Y-%m-%d"), "numpy": np.__version__,
               "fallback_dma": fallback_dma(), "control_plane_numpy": control_plane("numpy")}
        if opt.json:
            with open(opt.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0

    import cupy
    from hmmgpu.device import EmulatedDevice
    from hmmgpu.device.backend import get_backend
    from hmmgpu.device.testing import ToyDriver
    from hmmgpu.kernels.backend import cudaMemcpyDefault, launch, load_module

    be = get_backend("cupy")
    info = be.info()
    stream = be.stream(0)
    rt = cupy.cuda.runtime
    npg = int(opt.gib * (1 << 30)) // PAGE
    nbytes = npg * PAGE
    rng = np.random.default_rng(0)
    results = {"date": time.strftime("%Y-%m-%d"), "device": info.get("name"),
               "driver": info.get("driver"), "cuda_runtime": info.get("cuda_runtime"),
               "cupy": info.get("cupy"), "pcie": f"gen{info.get('pcie_gen')} x{info.get('pcie_width')}",
               "bytes": nbytes, "figures": {}}

    def events_time(fn, reps=opt.reps, warmup=1):
        for _ in range(warmup):
            fn()
        stream.synchronize()
        ts, ws = [], []
        for _ in range(reps):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            w0 = time.perf_counter()
            e0.record(stream)
            fn()
            e1.record(stream)
            e1.synchronize()
            ws.append(time.perf_counter() - w0)
            ts.append(cupy.cuda.get_elapsed_time(e0, e1) / 1e3)
        return statistics.median(ts), statistics.median(ws)

    def record(name, t, base_t, target, note=""):
        r = base_t / t
        results["figures"][name] = {"time_s": t, "baseline_s": base_t, "ratio": r, "target": target,
                                    "GBps": nbytes / t / 1e9, "baseline_GBps": nbytes / base_t / 1e9,
                                    "note": note}
        print(f"{name:44s} {nbytes / t / 1e9:8.1f} GB/s  baseline {nbytes / base_t / 1e9:8.1f} GB/s  "
              f"ratio {r:5.2f} (target >= {target}) {note}", flush=True)

    host = be.host_arena(npg + 16)
    host.host[:npg] = rng.integers(0, 256, (npg, PAGE), dtype=np.uint8) if npg <= 65536 else 0x5A
    if npg > 65536:   # random bytes are slow to make; a cheap pattern that is not all zeros
        host.host[:npg].reshape(-1).view(np.uint64)[::7] = np.uint64(0x0123456789ABCDEF)
    only = set(opt.only.split(","))

    if "dma" in only:
        dev = EmulatedDevice(be, npg, 1 << 32, host)
        ptr_d, ptr_h = dev.arena.ptr, host.ptr
        t_h2d, _ = events_time(lambda: rt.memcpyAsync(ptr_d, ptr_h, nbytes, cudaMemcpyDefault, stream.ptr))
        t_d2h, _ = events_time(lambda: rt.memcpyAsync(ptr_h, ptr_d, nbytes, cudaMemcpyDefault, stream.ptr))
        dsti, srci = rng.permutation(npg), rng.permutation(npg)
        t_sh2d, w = events_time(lambda: dev.dma.copy(dev.arena, dsti, host, srci))
        record("migrate scattered pages H2D (DMA engine)", t_sh2d, t_h2d, 0.85,
               f"wall {nbytes / w / 1e9:.1f} GB/s")
        t_sd2h, w = events_time(lambda: dev.dma.copy(host, srci, dev.arena, dsti))
        record("migrate scattered pages D2H (DMA engine)", t_sd2h, t_d2h, 0.85,
               f"wall {nbytes / w / 1e9:.1f} GB/s")
        del dev
        cupy.get_default_memory_pool().free_all_blocks()

    if "reduce" in only:
        dev = EmulatedDevice(be, npg, 1 << 32, host, slice_lanes=1 << 30)
        frames = rng.permutation(npg)
        va = 0x7F0000000000
        dev.pt.map((va >> 12) + np.arange(npg), dev.pfn_base + frames).wait()
        with stream:
            flat = cupy.ones(nbytes // 4, dtype=cupy.uint32)
            partials = cupy.zeros(npg, dtype=cupy.uint64)
        mod = load_module("jobs.cu", 0)
        t_flat, _ = events_time(lambda: launch(mod, "job_reduce_flat", 32 * npg,
                                               (flat, np.uint64(nbytes // 16), np.uint64(npg), partials), stream))
        from hmmgpu.device.jobs import JobSpec
        spec = JobSpec("reduce", npg, [va, 0, nbytes // 16, np.zeros(npg, np.uint64)], warp=True)
        h = dev.jobs.ex.prepare(spec, 999)
        t_pt, _ = events_time(lambda: dev.jobs.ex.launch(h, None, 0, npg, dev.pt.nodes))
        record("reduce via page table, device pages (kernel)", t_pt, t_flat, 0.8)
        t_job, w = events_time(lambda: dev.jobs.reduce_sum(va, nbytes))
        record("reduce via page table, device pages (job e2e)", t_job, t_flat, 0.8,
               f"wall {nbytes / w / 1e9:.1f} GB/s")
        del dev, flat, h
        cupy.get_default_memory_pool().free_all_blocks()

    if "remote" in only:
        dev = EmulatedDevice(be, 16, 1 << 32, host, slice_lanes=1 << 30)
        frames = rng.permutation(npg)
        va = 0x7F0000000000
        dev.pt.map((va >> 12) + np.arange(npg), frames).wait()
        with stream:
            partials = cupy.zeros(npg, dtype=cupy.uint64)
        mod = load_module("jobs.cu", 0)
        t_zc, _ = events_time(lambda: launch(mod, "job_reduce_flat", 32 * npg,
                                             (np.uint64(host.ptr), np.uint64(nbytes // 16), np.uint64(npg),
                                              partials), stream), reps=3)
        from hmmgpu.device.jobs import JobSpec
        spec = JobSpec("reduce", npg, [va, 0, nbytes // 16, np.zeros(npg, np.uint64)], warp=True)
        h = dev.jobs.ex.prepare(spec, 998)
        t_pt, _ = events_time(lambda: dev.jobs.ex.launch(h, None, 0, npg, dev.pt.nodes), reps=3)
        record("reduce via page table, remote RAM pages", t_pt, t_zc, 0.85, "scattered frames")
        del dev, h
        cupy.get_default_memory_pool().free_all_blocks()

    if "prefetch" in only:
        # explicit prefetch: 1 GiB of scattered system pages migrated by the DMA engine and mapped,
        # vs cudaMemPrefetchAsync of CPU-touched managed memory to the GPU
        free, _ = rt.memGetInfo()
        if free < 3 * nbytes:
            print(f"skipping prefetch figure: {free} bytes free", flush=True)
        else:
            ts = []
            for rep in range(3):
                dev = EmulatedDevice(be, npg, 1 << 32, host)
                src = rng.permutation(npg)
                va = 0x7F0000000000
                stream.synchronize()
                e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
                e0.record(stream)
                dev.copy_pages(dev.pfn_base + np.arange(npg), src)
                dev.pt.map((va >> 12) + np.arange(npg), dev.pfn_base + np.arange(npg))
                e1.record(stream)
                e1.synchronize()
                ts.append(cupy.cuda.get_elapsed_time(e0, e1) / 1e3)
                del dev
                cupy.get_default_memory_pool().free_all_blocks()
            mts = []
            try:
                for rep in range(3):
                    mem = cupy.cuda.malloc_managed(nbytes)
                    hv = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(mem.ptr))
                    hv[:] = 0x5A
                    stream.synchronize()
                    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
                    e0.record(stream)
                    rt.memPrefetchAsync(mem.ptr, nbytes, 0, stream.ptr)
                    e1.record(stream)
                    e1.synchronize()
                    mts.append(cupy.cuda.get_elapsed_time(e0, e1) / 1e3)
                    del mem, hv
                record("explicit prefetch (DMA + PT map)", statistics.median(ts), statistics.median(mts), 0.9,
                       "scattered system frames -> device frames")
            except Exception as e:          # the managed-memory API differs across CUDA versions
                print(f"prefetch baseline failed ({type(e).__name__}: {e}); ours "
                      f"{nbytes / statistics.median(ts) / 1e9:.1f} GB/s", flush=True)

    if "fault" in only:
        free, total = rt.memGetInfo()
        if free < 3 * nbytes:
            print(f"skipping fault-driven figure: {free} bytes free", flush=True)
        else:
            for batch in (256, 4096):
                ts, ws = [], []
                for rep in range(3):
                    dev = EmulatedDevice(be, npg, 1 << 32, host, slice_lanes=1 << 30,
                                         fault_buffer_entries=1 << 16, fault_batch_size=batch)
                    drv = ToyDriver(dev, npg, migrate="all", block_pages=512)
                    drv.backing[:] = rng.permutation(npg)          # data already in RAM, scattered
                    drv.next_va = npg
                    dev.service = drv.service
                    stream.synchronize()
                    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
                    w0 = time.perf_counter()
                    e0.record(stream)
                    r = dev.jobs.reduce_sum(drv.base, nbytes)
                    e1.record(stream)
                    e1.synchronize()
                    ws.append(time.perf_counter() - w0)
                    ts.append(cupy.cuda.get_elapsed_time(e0, e1) / 1e3)
                    if rep == 0:
                        print(f"  fault-driven (batch {batch}): rounds {len(r.rounds)}, services {drv.calls}, "
                              f"counters {dev.counters}", flush=True)
                    del dev, drv
                    cupy.get_default_memory_pool().free_all_blocks()
                t_ours = statistics.median(ws)
                # CUDA managed memory, first touched by the CPU, then the same reduce kernel
                mts = []
                mod = load_module("jobs.cu", 0)
                for rep in range(3):
                    mem = cupy.cuda.malloc_managed(nbytes)
                    hostview = np.ctypeslib.as_array(
                        (ctypes.c_uint8 * nbytes).from_address(mem.ptr))
                    hostview[:] = 0x5A                              # pages now live on the host
                    with stream:
                        partials = cupy.zeros(npg, dtype=cupy.uint64)
                    stream.synchronize()
                    w0 = time.perf_counter()
                    launch(mod, "job_reduce_flat", 32 * npg,
                           (np.uint64(mem.ptr), np.uint64(nbytes // 16), np.uint64(npg), partials), stream)
                    stream.synchronize()
                    mts.append(time.perf_counter() - w0)
                    del mem, hostview, partials
                t_man = statistics.median(mts)
                record(f"fault-driven first touch, batch {batch} (wall)", t_ours, t_man, 1.0,
                       f"gpu-events {nbytes / statistics.median(ts) / 1e9:.1f} GB/s; managed {t_man * 1e3:.1f} ms")

    results["control_plane_cupy"] = control_plane("cupy")
    print(json.dumps({k: v for k, v in results.items() if k != "figures"}), flush=True)
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
