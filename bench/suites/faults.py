"""faults: a device job touching memory it has never mapped, every page a device fault.

Three figures, all through a process's address space mirrored by the UVM driver
(hmmgpu.drivers.uvm.UvmDriver: fault buffer -> batches -> the driver's service -> device page
table -> replay), a fresh driver (nothing mapped, nothing resident) for each repeat:

* host-resident, remote map: a reduce job over data the CPU wrote, the range advised to prefer
  the CPU (cudaMemAdvise SetPreferredLocation): faults map the system pages remotely through
  hmm_range_fault (zero-copy; nothing migrates);
* host-resident, migrate on fault: the same job with the driver's default placement (pages
  migrate to the faulting device) and the whole-block prefetch policy ("block"): each faulted
  2 MiB block migrates to device memory (migrate_vma_*) before it is mapped -- what CUDA managed
  memory does;
* untouched: a memset job over freshly mmap'ed anonymous memory preferring the CPU; each write
  fault allocates a zeroed page in system memory (demand-zero, through hmm_range_fault) and maps
  it remotely.

Every job is a launch of the driver's: its service also runs the policies (prefetch, thrashing,
access counters) and charges the emulated clock, which MirrorGpu, the driver these figures were
first measured with, did not.  Baselines in the same run: CUDA managed memory with the same
access pattern -- CPU-written then read by the same reduce kernel, and freshly allocated then
first touched by a fill kernel (GPU); a NumPy gather + sum of the same frames, and a NumPy fill
of a fresh array (fallback).

A fourth figure splits the remote-map reduce at 256 MiB (quick: 8 MiB) into the device's work
(time inside the job engine's executor) and the host's control plane (everything else: fault
buffer drain, the driver's service with hmm_range_fault, page-table updates, replay), per
faulting page, against the target of 0.5 us (UVM's whole on-demand path costs about 0.7 us per
4 KiB page on an H100).
"""
import time

import numpy as np

from ._common import (PAGE, PRIV_ANON, RW, Cuda, DeviceClock, Workload, frames_sum, need,
                      numpy_fresh_fill, numpy_gather_sum, size_label, target_row, uvm_driver)

CONTROL_PLANE_TARGET_US = 0.5

NAME = "faults"
DESCRIPTION = "a device job faulting on host-resident and untouched memory vs CUDA managed memory"


def run(ctx):
    need("hmmgpu.device", "the device layer (EmulatedDevice)")
    uvm = need("hmmgpu.drivers.uvm", "the UVM driver (UvmDriver)")
    nbytes = (16 << 20) if ctx.quick else ((1 << 30) if ctx.gpu else (64 << 20))
    npages = nbytes // PAGE
    w = Workload(ctx.backend_name, npages, scattered=True, ram_extra_pages=npages + 16384, with_dmirror=False)
    st = {"gpu": None, "region": None}

    def fresh_gpu(start, migrate=False):
        """A new driver (closing the last one brings whatever it migrated home); without
        ``migrate`` the range prefers the CPU, so its faults map it remotely."""
        if st["gpu"] is not None:
            st["gpu"].close()
        if migrate:
            st["gpu"] = uvm_driver(w, policy={"prefetch": "block"})
        else:
            st["gpu"] = uvm_driver(w)
            st["gpu"].advise(start, nbytes, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)

    try:
        expect = frames_sum(w.system.phys.ram.host, w.pfns())
        if ctx.gpu:
            cu = Cuda(ctx)
            cp = cu.cp
            held = {}

            def managed_read():
                kern = cu.reduce_kernel()
                partials = cp.zeros(npages, dtype=cp.uint64)
                held["mem"], held["view"] = cu.managed(nbytes)

                def cpu_write():
                    held["view"][::PAGE] = 1       # the CPU touches every page: they live on the host
                return lambda: kern(int(held["mem"].ptr), nbytes, partials), cpu_write

            def fresh_managed():
                held.pop("m", None)
                cp.get_default_memory_pool().free_all_blocks()
                held["m"], _ = cu.managed(nbytes)

            def first_touch():
                return cp.ndarray((nbytes,), cp.uint8, memptr=held["m"]).fill(0x5A)
            read_base = ctx.baseline(managed_read)
            zero_base = (first_touch, fresh_managed)
            bname = "managed memory, CPU-written, same reduce kernel"
            bname_zero = "fresh managed memory, first touch by a fill kernel"
            targets = (None, ">= 1.0", ">= 1.0")
        else:
            read_base = (numpy_gather_sum(w.system.phys.ram.frames, w.pfns()), None)
            zero_base = (numpy_fresh_fill(nbytes, 0x5A), None)
            bname = "NumPy gather + sum of the same frames"
            bname_zero = "NumPy fill of a fresh array"
            targets = (">= 0.5", None, ">= 0.5")

        # host-resident data, a new device (empty page table) for each repeat
        ctx.progress("job faulting on host-resident pages")
        faults = {}

        def reduce():
            hw = st["gpu"].device(0).hw
            before = dict(hw.counters)
            r = st["gpu"].jobs.reduce_sum(w.addr, nbytes)
            assert r.value == expect, "reduce over faulted pages computed a wrong sum"
            faults["n"] = r.faults
            faults["rounds"] = len(r.rounds)
            faults["counts"] = {k: v - before[k] for k, v in hw.counters.items()}

        def unpack(b):
            return (b, None) if isinstance(b, BaseException) else b
        fn, setup = unpack(read_base)
        ours, base = ctx.compare(reduce, fn, ours_setup=lambda: fresh_gpu(w.addr), base_setup=setup)
        fstats = faults["counts"]
        # the same, with a driver that migrates each faulted 2 MiB block to device memory first
        ctx.progress("job faulting with migration on fault")
        fn, setup = unpack(read_base)
        ours_mig, base_mig = ctx.compare(reduce, fn, ours_setup=lambda: fresh_gpu(w.addr, migrate=True),
                                         base_setup=setup)
        migrated = st["gpu"].counters["num_pages_in"]
        # untouched anonymous memory, a new mapping and device each repeat
        ctx.progress("job faulting on untouched pages")

        def new_region():
            if st["region"] is not None:
                w.proc.munmap(st["region"], nbytes)
            st["region"] = w.proc.mmap(nbytes, RW, PRIV_ANON)
            fresh_gpu(st["region"])
        fn, setup = unpack(zero_base)
        ours_zero, base_zero = ctx.compare(lambda: st["gpu"].jobs.memset(st["region"], 0x5A, nbytes), fn,
                                           ours_setup=new_region, base_setup=setup)
        check = w.proc.read(st["region"], PAGE)
        assert (check == 0x5A).all(), "memset job result not visible to the CPU"
        if ctx.gpu:
            held.clear()
        note = (f"{faults.get('n', 0):,} faults per run in {faults.get('rounds', 0)} rounds; "
                f"{fstats.get('num_fault_batches', 0)} batches, {fstats.get('num_replays', 0)} replays, "
                f"{fstats.get('num_duplicate_faults', 0)} duplicates, "
                f"{fstats.get('num_buffer_overflows', 0)} overflows (last run)")
        ctx.figure("reduce job faulting on host-resident pages (remote map)", nbytes=nbytes, ours=ours,
                   base=base, baseline_name=bname, target=targets[0], size=size_label(nbytes),
                   note=f"preferred location CPU; {note}")
        ctx.figure("reduce job faulting on host-resident pages (migrate on fault)", nbytes=nbytes,
                   ours=ours_mig, base=base_mig, baseline_name=bname, target=targets[1], size=size_label(nbytes),
                   note=f"whole 2 MiB blocks (prefetch policy 'block') migrated with migrate_vma_* before "
                        f"mapping; {migrated:,} pages in the last run")
        ctx.figure("memset job faulting on untouched pages (demand-zero)", nbytes=nbytes, ours=ours_zero,
                   base=base_zero, baseline_name=bname_zero, target=targets[2], size=size_label(nbytes),
                   note="preferred location CPU: zeroed system pages, mapped remotely")
    finally:
        if st["gpu"] is not None:
            st["gpu"].close()
        w.close()
    control_plane(ctx, (8 << 20) if ctx.quick else (256 << 20))


def control_plane(ctx, nbytes):
    """Host control-plane cost per faulting page of the remote-map reduce (see the docstring);
    on the GPU also the kernel launches and host synchronisations per fault round."""
    uvm = need("hmmgpu.drivers.uvm", "the UVM driver (UvmDriver)")
    npages = nbytes // PAGE
    ctx.progress(f"host control plane per faulting page, {size_label(nbytes)}")
    w = Workload(ctx.backend_name, npages, scattered=True, ram_extra_pages=16384, with_dmirror=False)
    calls = getattr(ctx.backend, "counters", None)
    gpu = None
    try:
        expect = frames_sum(w.system.phys.ram.host, w.pfns())
        host, device, counts = [], [], {}
        for i in range(ctx.warmup + ctx.repeat):
            if gpu is not None:
                gpu.close()
            gpu = uvm_driver(w)
            gpu.advise(w.addr, nbytes, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)
            ctx.sync()
            hw = gpu.device(0).hw
            before = dict(hw.counters)
            c0 = dict(calls) if calls is not None else None
            with DeviceClock(hw.jobs) as clk:
                t0 = time.perf_counter()
                r = gpu.jobs.reduce_sum(w.addr, nbytes)
                ctx.sync()
                total = time.perf_counter() - t0
            assert r.value == expect, "reduce over faulted pages computed a wrong sum"
            if i >= ctx.warmup:
                host.append((total - clk.seconds) / r.faults)
                device.append(clk.seconds / r.faults)
                counts = {k: hw.counters[k] - before[k] for k in before}
                counts["rounds"] = len(r.rounds)
                counts["lanes_launched"] = sum(r.rounds)
                if calls is not None:
                    counts.update({k: calls[k] - c0[k] for k in calls})
        note = (f"device (executor) {float(np.median(device)) * 1e6:.2f} us/page; "
                f"{counts['rounds']} rounds, {counts['lanes_launched']:,} lanes launched, "
                f"{counts['num_fault_batches']} batches, {counts['num_replays']} replays, "
                f"{counts['num_buffer_overflows']} overflows")
        target_row(ctx, "host control plane per faulting page (remote map)", host, CONTROL_PLANE_TARGET_US,
                   "us/page", 1e6, size=size_label(nbytes), note=note)
        if calls is not None:            # the CuPy backend counts its launches and syncs
            rounds = counts["rounds"]
            for key, what, limit in (("kernel_launches", "kernel launches", 3), ("host_syncs", "host syncs", 1)):
                per = counts[key] / rounds
                ctx.row(f"{what} per fault round", ours=per, ours_unit=f"{what}/round",
                        baseline_name=f"target: {limit}", baseline=limit, ratio=limit / per,
                        spread=(limit / per,) * 3, target=">= 1", size=size_label(nbytes),
                        note=f"{counts[key]} over {rounds} rounds (one job; its output read included)")
    finally:
        if gpu is not None:
            gpu.close()
        w.close()
