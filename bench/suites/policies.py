"""policies: the UVM driver's policies under oversubscription, on the emulated clock.

One workload (``streaming``: lanes sweeping its arrays in order, several loops) runs on
UvmDriver with device memory of 1/0.5, 1/1.0, 1/1.25 and 1/1.5 of its footprint (the
oversubscription is footprint / device memory; quick mode: 6 MiB, one loop, 1.0 and 1.5 only), under
each eviction policy (with the default
prefetcher) and each prefetch policy (with the default eviction).  A row's figure is the
modelled time (the EmulatedClock, h100 profile); its baseline is the default policies (LRU +
density) at the same oversubscription *in the same run*, ratio = baseline / ours (higher is
better); wall time and the counters that explain the difference are in the note.

Calibration rows: with the default profile the model reproduces CUDA managed memory on the
profiled H100 within 20% -- a job touching each 4 KiB page of CPU-resident memory on demand
(measured 5.7 GB/s) and an explicit prefetch (cudaMemPrefetchAsync, measured 46.2 GB/s); the
ratio is modelled / measured, inside 0.8 .. 1.2 to pass.
"""
import time

from ._common import PAGE, RW, PRIV_ANON, need, size_label

NAME = "policies"
DESCRIPTION = "UVM eviction and prefetch policies at oversubscription 0.5-1.5 (modelled time) + calibration"

RATIOS = (0.5, 1.0, 1.25, 1.5)
MB2 = 2 << 20


def _run(backend, footprint, ratio, policies, loops):
    import hmmgpu
    from hmmgpu import workloads as W
    from hmmgpu.drivers.uvm import UvmDriver
    w = W.get("streaming")(footprint, seed=3, threads=4096, step=16, loops=loops)
    system = hmmgpu.System(backend=backend, ram_bytes=4 * w.footprint + (64 << 20))
    proc = system.spawn()
    w.setup(proc)
    dev = max(1, -(-int(w.footprint / ratio) // MB2)) * MB2
    drv = UvmDriver(system, proc, device_bytes=dev, policy=policies, seed=1)
    t0 = time.perf_counter()
    try:
        w.run(drv)
        wall = time.perf_counter() - t0
        ok = w.check().ok
        c = drv.counters
        modelled = drv.modelled_time
    finally:
        drv.close()
    if not ok:
        raise AssertionError(f"streaming at {ratio}x with {policies}: wrong result")
    return modelled, wall, c, w.footprint / dev


def _note(wall, c, over):
    return (f"footprint / device memory {over:.2f}; wall {wall:.2f} s; {c['num_evictions']} evictions, {c['num_pages_in']:,} pages in, "
            f"{c['num_prefetched_pages']:,} prefetched, {c['num_pages_out']:,} out, "
            f"{c['num_map_remote']:,} remote, {c['num_throttle']} throttles")


def run(ctx):
    need("hmmgpu.drivers.uvm.driver", "the UVM driver (UvmDriver)")
    from hmmgpu.drivers.uvm import POLICY_NAMES
    from hmmgpu.drivers.uvm.registry import DEFAULT_NAMES
    # 15 blocks: device memory of footprint / ratio is a whole number of 2 MiB chunks at every ratio
    footprint, loops, ratios = ((6 << 20), 1, (1.0, 1.5)) if ctx.quick else ((30 << 20), 2, RATIOS)
    configs = [{"eviction": e} for e in sorted(POLICY_NAMES["eviction"]) if e != DEFAULT_NAMES["eviction"]]
    configs += [{"prefetch": p} for p in sorted(POLICY_NAMES["prefetch"]) if p != DEFAULT_NAMES["prefetch"]]
    for ratio in ratios:
        ctx.progress(f"policies: {ratio}x oversubscription")
        base_t, base_wall, base_c, over = _run(ctx.backend_name, footprint, ratio, None, loops)
        ctx.row(f"streaming {ratio}x: default (lru + density)", ours=base_t * 1e3, ours_unit="ms modelled",
                baseline_name="itself", baseline=base_t * 1e3, ratio=1.0, spread=(1.0,) * 3,
                target=None,
                size=size_label(footprint), note=_note(base_wall, base_c, over))
        for cfg in configs:
            t, wall, c, over = _run(ctx.backend_name, footprint, ratio, cfg, loops)
            (fam, name), = cfg.items()
            ctx.row(f"streaming {ratio}x: {fam} {name}", ours=t * 1e3, ours_unit="ms modelled",
                    baseline_name="default policies, same oversubscription", baseline=base_t * 1e3,
                    ratio=base_t / t, spread=(base_t / t,) * 3, target=None, size=size_label(footprint),
                    note=_note(wall, c, over))
    _calibration(ctx)


def _calibration(ctx):
    import numpy as np

    import hmmgpu
    from hmmgpu.device.clock import load_profile
    from hmmgpu.drivers.uvm import UvmDriver
    cal = load_profile("h100").calibration
    nbytes = (16 << 20) if ctx.quick else (256 << 20)
    for what, measured in (("on-demand touch of CPU-resident memory", cal["on_demand_gbps"]),
                           ("prefetch (cudaMemPrefetchAsync)", cal["prefetch_gbps"])):
        ctx.progress(f"calibration: {what}")
        system = hmmgpu.System(backend=ctx.backend_name, ram_bytes=2 * nbytes + (64 << 20))
        proc = system.spawn()
        a = proc.mmap(nbytes + MB2, RW, PRIV_ANON)
        a = -(-a // MB2) * MB2
        proc.write(a, np.ones(nbytes // 4, np.uint32))              # CPU-resident
        drv = UvmDriver(system, proc, device_bytes=nbytes, name="calibration")
        try:
            t0 = drv.clock.now
            if what.startswith("prefetch"):
                drv.prefetch(a, nbytes, 0)
            else:
                drv.jobs.reduce_sum(a, nbytes)
            gbps = nbytes / (drv.clock.now - t0) / 1e9
            assert drv.counters["num_pages_in"] == nbytes // PAGE
        finally:
            drv.close()
        r = gbps / measured
        ctx.row(f"calibration: {what}", ours=gbps, ours_unit="GB/s modelled", baseline_name="CUDA managed memory "
                "on the profiled H100 (profile calibration)", baseline=measured, ratio=r, spread=(r, r, r),
                target=">= 0.8",
                meets=bool(0.8 <= r <= 1.2), size=size_label(nbytes),
                note="ratio = modelled / measured; passes inside 0.8 .. 1.2 (within 20%)")
