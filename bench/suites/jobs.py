"""jobs: a device job walking the emulated device page table, on device-resident pages and on
system pages mapped remotely (zero-copy), through a process's mirrored address space.

Ours: ``reduce_sum`` (a streaming read of every 32-bit word) on an EmulatedDevice whose page
table was filled by HMM (hmm_range_fault, after a warm-up job took the faults), so the timed
runs translate every access through the page table and take no fault.  Baselines in the same
run: the same reduce kernel on a flat device array, and on the mapped pinned host memory
(zero-copy read) of the same bytes (GPU); a NumPy sum over a flat array of the same bytes
(fallback).
"""
import numpy as np

from ._common import PAGE, Cuda, Workload, need, size_label

NAME = "jobs"
DESCRIPTION = "page-table-walking device jobs (device-resident, remote system pages) vs a flat array"


def run(ctx):
    need("hmmgpu.device", "the device layer (EmulatedDevice)")
    from hmmgpu.drivers.mirrorgpu import MirrorGpu
    nbytes = (32 << 20) if ctx.quick else ((1 << 30) if ctx.gpu else (64 << 20))
    w = Workload(ctx.backend_name, nbytes // PAGE, scattered=True)
    gpu = None
    try:
        gpu = MirrorGpu(w.system, w.proc, w.dev, w.addr, w.addr + w.nbytes, name="bench-gpu")
        data = np.ascontiguousarray(w.proc.read(w.addr, nbytes))      # before anything migrates
        expect = int(data.view(np.uint32).sum(dtype=np.uint64))
        job = gpu.jobs

        def reduce():
            r = job.reduce_sum(w.addr, nbytes)
            return r

        for where in ("device-resident", "remote system"):
            ctx.progress(f"reduce over {where} pages")
            if where == "device-resident":
                w.to_dev()
            else:
                w.to_sys()
            r = reduce()                       # warm-up: takes the faults, fills the page table
            assert r.value == expect, (r.value, expect)
            faults_before = gpu.counters["num_read_faults"]
            if ctx.gpu:
                cu = Cuda(ctx)
                if where == "device-resident":
                    bname, target = "same kernel, flat device array", ">= 0.8"
                else:
                    bname, target = "same kernel, zero-copy read of pinned host memory", ">= 0.85"

                def flat_kernel():
                    cp = cu.cp
                    kern = cu.reduce_kernel()
                    partials = cp.zeros(nbytes // PAGE, dtype=cp.uint64)
                    if where == "device-resident":
                        flat = cp.ones(nbytes // 4, dtype=cp.uint32)
                        return lambda: kern(flat, nbytes, partials)
                    host = w.system.phys.ram
                    return lambda: kern(int(host.ptr), nbytes, partials)
                base_fn = ctx.baseline(flat_kernel)
            else:
                flat = data.view(np.uint32)
                base_fn = lambda: flat.sum(dtype=np.uint64)      # noqa: E731
                bname = "NumPy sum over a flat array"
                target = ">= 0.8" if where == "device-resident" else ">= 0.85"
            ours, base = ctx.compare(reduce, base_fn, base_device_only=ctx.gpu)
            assert gpu.counters["num_read_faults"] == faults_before, "timed jobs faulted"
            ctx.figure(f"reduce job via page table, {where} pages", nbytes=nbytes, ours=ours, base=base,
                       baseline_name=bname, target=target, size=size_label(nbytes),
                       note="scattered frames; page table filled by hmm_range_fault beforehand")
    finally:
        if gpu is not None:
            gpu.close()
        w.close()
