"""faults: a device job touching memory it has never mapped, every page a device fault.

Three figures, all through a process's mirrored address space (fault buffer -> batches ->
hmm_range_fault -> device page table -> replay):

* host-resident, remote map: a reduce job over data the CPU wrote; faults map the system pages
  remotely (zero-copy; nothing migrates);
* host-resident, migrate on fault: the same job with a driver that migrates each faulted 2 MiB
  block to device memory (migrate_vma_*) before mapping it -- what CUDA managed memory does;
* untouched: a memset job over freshly mmap'ed anonymous memory; each write fault allocates
  a zeroed page (demand-zero) and maps it.

Baselines in the same run: CUDA managed memory with the same access pattern -- CPU-written
then read by the same reduce kernel, and freshly allocated then first touched by a fill
kernel (GPU); a NumPy gather + sum of the same frames, and a NumPy fill of a fresh array
(fallback).
"""
import numpy as np

from ._common import PAGE, PRIV_ANON, RW, Cuda, Workload, need, size_label

NAME = "faults"
DESCRIPTION = "a device job faulting on host-resident and untouched memory vs CUDA managed memory"


def run(ctx):
    need("hmmgpu.device", "the device layer (EmulatedDevice)")
    from hmmgpu.drivers.mirrorgpu import MirrorGpu
    nbytes = (16 << 20) if ctx.quick else ((1 << 30) if ctx.gpu else (64 << 20))
    npages = nbytes // PAGE
    w = Workload(ctx.backend_name, npages, scattered=True, ram_extra_pages=npages + 16384)
    st = {"gpu": None, "region": None}

    def fresh_gpu(start, migrate=False):
        if st["gpu"] is not None:
            st["gpu"].close()
        st["gpu"] = MirrorGpu(w.system, w.proc, w.dev, start, start + nbytes, name="bench-gpu",
                              migrate_on_fault=migrate)

    def fresh_gpu_data_home():
        w.mirror.migrate_to_sys(w.addr, npages)           # whatever the last run migrated
        fresh_gpu(w.addr, migrate=True)

    try:
        expect = int(w.proc.read(w.addr, nbytes).view(np.uint32).sum(dtype=np.uint64))
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
            frames = w.system.phys.ram.frames
            pfns = w.pfns()
            out = np.empty((npages, PAGE), np.uint8)

            def gather_sum():
                np.take(frames, pfns, axis=0, out=out)
                out.view(np.uint32).sum(dtype=np.uint64)
            read_base = (gather_sum, None)
            zero_base = (lambda: np.empty(nbytes, np.uint8).fill(0x5A), None)
            bname = "NumPy gather + sum of the same frames"
            bname_zero = "NumPy fill of a fresh array"
            targets = (None, None, None)

        # host-resident data, a new device (empty page table) for each repeat
        ctx.progress("job faulting on host-resident pages")
        faults = {}

        def reduce():
            r = st["gpu"].jobs.reduce_sum(w.addr, nbytes)
            assert r.value == expect, "reduce over faulted pages computed a wrong sum"
            faults["n"] = r.faults

        def unpack(b):
            return (b, None) if isinstance(b, BaseException) else b
        fn, setup = unpack(read_base)
        ours, base = ctx.compare(reduce, fn, ours_setup=lambda: fresh_gpu(w.addr), base_setup=setup)
        fstats = dict(st["gpu"].counters)
        # the same, with a driver that migrates each faulted 2 MiB block to device memory first
        ctx.progress("job faulting with migration on fault")
        fn, setup = unpack(read_base)
        ours_mig, base_mig = ctx.compare(reduce, fn, ours_setup=fresh_gpu_data_home, base_setup=setup)
        migrated = st["gpu"].migrated_pages
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
        note = (f"{faults.get('n', 0):,} faults per run; {fstats.get('num_fault_batches', 0)} batches, "
                f"{fstats.get('num_duplicate_faults', 0)} duplicates (first device)")
        ctx.figure("reduce job faulting on host-resident pages (remote map)", nbytes=nbytes, ours=ours,
                   base=base, baseline_name=bname, target=targets[0], size=size_label(nbytes), note=note)
        ctx.figure("reduce job faulting on host-resident pages (migrate on fault)", nbytes=nbytes,
                   ours=ours_mig, base=base_mig, baseline_name=bname, target=targets[1], size=size_label(nbytes),
                   note=f"2 MiB blocks migrated with migrate_vma_* before mapping; {migrated:,} pages in the last run")
        ctx.figure("memset job faulting on untouched pages (demand-zero)", nbytes=nbytes, ours=ours_zero,
                   base=base_zero, baseline_name=bname_zero, target=targets[2], size=size_label(nbytes))
    finally:
        if st["gpu"] is not None:
            st["gpu"].close()
        w.close()
