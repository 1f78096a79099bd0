"""prefetch: explicit migration of a range to the device and its mapping in the device page table.

Ours: the UVM driver's prefetch (cudaMemPrefetchAsync: hmmgpu.drivers.uvm.UvmDriver.prefetch) of
CPU-written anonymous pages: migrate_vma_* into device memory from its PMM and the device
page-table map of the whole range in the same step (so a job runs with no fault), the clock
charged for the copy; between repeats (untimed) a prefetch to the CPU brings the range back.
Baselines in the same run: cudaMemPrefetchAsync of the same bytes of CPU-touched managed memory
(GPU; never more managed memory than half of what the GPU has free); the fastest plain NumPy copy
of the same pages (fallback; see _common.numpy_copy).
"""

from ._common import PAGE, Cuda, Workload, need, numpy_copy, size_label, uvm_driver

NAME = "prefetch"
DESCRIPTION = "explicit prefetch (migrate + map) vs cudaMemPrefetchAsync of managed memory"


def run(ctx):
    need("hmmgpu.device", "the device layer (EmulatedDevice)")
    uvm = need("hmmgpu.drivers.uvm", "the UVM driver (UvmDriver)")
    nbytes = (32 << 20) if ctx.quick else ((1 << 30) if ctx.gpu else (256 << 20))
    npages = nbytes // PAGE
    w = Workload(ctx.backend_name, npages, scattered=True, with_dmirror=False)
    gpu = uvm_driver(w)
    st = {"on_dev": False}

    def prefetch():
        st["on_dev"] = True
        moved = gpu.prefetch(w.addr, nbytes)
        assert moved == npages, moved

    def back():
        if st["on_dev"]:
            gpu.prefetch(w.addr, nbytes, device=uvm.CPU)
            st["on_dev"] = False
    try:
        if ctx.gpu:
            cu = Cuda(ctx)
            held = {}

            def managed_prefetch():
                held["mem"], held["view"] = cu.managed(nbytes)

                def to_cpu():
                    # a CPU write to every page brings the range back to the CPU, which is what
                    # "CPU-touched" means (and a prefetch to -1 fails on CuPy 14 with CUDA 13)
                    held["view"][::PAGE] = 1
                return lambda: cu.prefetch(held["mem"].ptr, nbytes, 0), to_cpu
            prep = ctx.baseline(managed_prefetch)
            fn, setup = (prep, None) if isinstance(prep, BaseException) else prep
            bname = "cudaMemPrefetchAsync of CPU-touched managed memory"
            target = ">= 0.9"
        else:
            fn, setup = numpy_copy(w.system.phys.ram.frames, w.pfns()), None
            bname = "fastest NumPy way"
            target = ">= 0.7"
        ctx.progress(f"prefetch {size_label(nbytes)}")
        ours, base = ctx.compare(prefetch, fn, ours_setup=back, base_setup=setup, base_device_only=ctx.gpu)
        back()
        moved = gpu.counters["num_pages_in"]
        if ctx.gpu:
            held.clear()
        ctx.figure("explicit prefetch: migrate_vma + device PT map", nbytes=nbytes, ours=ours, base=base,
                   baseline_name=bname, target=target, size=size_label(nbytes),
                   note=f"UvmDriver.prefetch; {moved:,} pages migrated and mapped device-local over the runs")
    finally:
        gpu.close()
        w.close()
