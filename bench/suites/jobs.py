"""jobs: a device job walking the emulated device page table, on device-resident pages and on
system pages mapped remotely (zero-copy), through a process's address space mirrored by the UVM
driver (hmmgpu.drivers.uvm.UvmDriver).

Ours: ``reduce_sum`` (a streaming read of every 32-bit word) on the driver's device, its page
table filled beforehand, so the timed runs translate every access through the page table and
take no fault: device-resident pages were prefetched (cudaMemPrefetchAsync: migrated and mapped
local); remote pages were brought back to the CPU, advised to prefer it (cudaMemAdvise
SetPreferredLocation: faults map them remotely, nothing migrates) and mapped by hmm_range_fault
when a warm-up job took the faults.  Each timed job is a launch of the driver's (its clock, the
access-counter and CPU-event bookkeeping around it).  Baselines in the same run: the same reduce
kernel on a flat device array, and on the mapped pinned host memory (zero-copy read) of the same
bytes (GPU); on the fallback a NumPy sum over a flat array of the same bytes (device-resident)
and a NumPy gather + sum of the same scattered frames (remote).

A list chase follows: one lane walks a linked list of 4,096 nodes laid out in shuffled order
(as the demo builds it, the pages preferring the CPU and mapped remotely as the demo's are),
page table warm, cost per step against the target of 2 us per step; and the demo's cold
pointer-chase step (that list and lookups in a 4,096-node search tree, on a driver that has
mapped nothing yet) against 50 ms.
"""
import numpy as np

from ._common import PAGE, PRIV_ANON, RW, Cuda, Workload, need, numpy_gather_sum, size_label, target_row, uvm_driver

CHASE_NODES = 1 << 12
CHASE_TARGET_US = 2.0
COLD_CHASE_TARGET_MS = 50.0

NAME = "jobs"
DESCRIPTION = "page-table-walking device jobs (device-resident, remote system pages) vs a flat array"


def run(ctx):
    need("hmmgpu.device", "the device layer (EmulatedDevice)")
    uvm = need("hmmgpu.drivers.uvm", "the UVM driver (UvmDriver)")
    nbytes = (32 << 20) if ctx.quick else ((1 << 30) if ctx.gpu else (64 << 20))
    w = Workload(ctx.backend_name, nbytes // PAGE, scattered=True, with_dmirror=False)
    drv = None
    try:
        drv = uvm_driver(w)
        data = np.ascontiguousarray(w.proc.read(w.addr, nbytes))      # before anything migrates
        expect = int(data.view(np.uint32).sum(dtype=np.uint64))
        job = drv.jobs

        def reduce():
            r = job.reduce_sum(w.addr, nbytes)
            return r

        for where in ("device-resident", "remote system"):
            ctx.progress(f"reduce over {where} pages")
            if where == "device-resident":
                assert drv.prefetch(w.addr, nbytes) == nbytes // PAGE
                how = "page table filled by the prefetch (migrate_vma, mapped local)"
            else:
                drv.prefetch(w.addr, nbytes, device=uvm.CPU)
                drv.advise(w.addr, nbytes, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)
                how = "preferred location CPU; page table filled by hmm_range_fault beforehand"
            r = reduce()                       # warm-up: takes the faults, if any, fills the page table
            assert r.value == expect, (r.value, expect)
            faults_before = drv.counters["num_read_faults"]
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
            elif where == "device-resident":
                flat = data.view(np.uint32)
                base_fn = lambda: flat.sum(dtype=np.uint64)      # noqa: E731
                bname = "NumPy sum over a flat array"
                target = ">= 0.9"
            else:
                base_fn = numpy_gather_sum(w.system.phys.ram.frames, w.pfns())
                bname = "NumPy gather + sum of the same frames"
                target = ">= 0.8"
            ours, base = ctx.compare(reduce, base_fn, base_device_only=ctx.gpu)
            assert drv.counters["num_read_faults"] == faults_before, "timed jobs faulted"
            ctx.figure(f"reduce job via page table, {where} pages", nbytes=nbytes, ours=ours, base=base,
                       baseline_name=bname, target=target, size=size_label(nbytes),
                       note=f"scattered frames; {how}")
    finally:
        if drv is not None:
            drv.close()
        w.close()
    chase(ctx)


def _build_chase(proc, seed=7):
    """The demo's data: a linked list of CHASE_NODES {next, value} nodes in shuffled slots and a
    balanced search tree of CHASE_NODES {left, right, key, value} nodes, CPU pointers."""
    rng = np.random.default_rng(seed)
    n = CHASE_NODES
    heap = proc.mmap(n * 16 + n * 32, RW, PRIV_ANON)
    order = rng.permutation(n)
    addr_of = heap + order.astype(np.int64) * 16
    nodes = np.zeros((n, 2), np.uint64)
    vals = rng.integers(1, 1 << 20, n).astype(np.uint64)
    nodes[order[:-1], 0] = addr_of[1:].astype(np.uint64)
    nodes[order, 1] = vals
    proc.write(heap, nodes)
    keys = np.sort(rng.choice(1 << 30, n, replace=False)).astype(np.uint64)
    slot = rng.permutation(n)
    taddr = heap + n * 16 + slot.astype(np.int64) * 32
    tree = np.zeros((n, 4), np.uint64)
    # the balanced tree over sorted keys, level by level (index ranges [lo, hi) per node)
    lo, hi, parent, side = np.array([0]), np.array([n]), np.array([-1]), np.array([0])
    while lo.size:
        mid = (lo + hi) // 2
        tree[slot[mid], 2] = keys[mid]
        tree[slot[mid], 3] = keys[mid] * np.uint64(3) + np.uint64(1)
        has = parent >= 0
        tree[slot[parent[has]], side[has]] = taddr[mid[has]].astype(np.uint64)
        left, right = mid > lo, hi > mid + 1
        lo, hi, parent, side = (np.concatenate((lo[left], mid[right] + 1)),
                                np.concatenate((mid[left], hi[right])),
                                np.concatenate((mid[left], mid[right])),
                                np.concatenate((np.zeros(left.sum(), int), np.ones(right.sum(), int))))
    proc.write(heap + n * 16, tree)
    root = int(taddr[n // 2])
    return heap, n * 48, int(addr_of[0]), int(vals.sum(dtype=np.uint64)), keys, root


def chase(ctx):
    """The list chase per step (warm page table) and the demo's cold pointer-chase step."""
    import hmmgpu
    from hmmgpu.drivers import uvm
    system = hmmgpu.System(backend=ctx.backend_name, ram_bytes=64 << 20)
    proc = system.spawn()
    heap, nbytes, head, total, keys, root = _build_chase(proc)
    length = (nbytes + PAGE - 1) & ~(PAGE - 1)
    st = {"gpu": None}

    def fresh():
        """A driver that has mapped nothing, the heap preferring the CPU (as in the demo)."""
        if st["gpu"] is not None:
            st["gpu"].close()
        st["gpu"] = uvm.UvmDriver(system, proc, device_bytes=2 << 20)
        st["gpu"].advise(heap, length, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)

    def walk():
        r = st["gpu"].jobs.list_chase([head], max_steps=CHASE_NODES + 1)
        assert int(r.value[0][0]) == total and int(r.value[1][0]) == CHASE_NODES, r.value
        return r

    def demo_step():
        walk()
        probe = keys[::7]
        t = st["gpu"].jobs.tree_search(root, probe)
        assert (np.asarray(t.value[0]) == probe * np.uint64(3) + np.uint64(1)).all()
    try:
        ctx.progress("list chase, warm page table")
        fresh()
        walk()                                      # takes the faults
        warm = ctx.time(walk)
        target_row(ctx, "list chase per step (one lane, warm page table)",
                   [s / CHASE_NODES for s in warm.samples], CHASE_TARGET_US, "us/step", 1e6,
                   size=f"{CHASE_NODES:,} nodes", note="nodes in shuffled order over 16 pages, mapped remotely")
        ctx.progress("the demo's pointer-chase step, cold")
        cold = ctx.time(demo_step, setup=fresh)
        target_row(ctx, "demo pointer-chase step (cold: list + 586 tree lookups)", cold.samples,
                   COLD_CHASE_TARGET_MS, "ms", 1e3, size=f"{CHASE_NODES:,} + {CHASE_NODES:,} nodes",
                   note="a fresh driver each repeat: every page faults once and is mapped remotely")
    finally:
        if st["gpu"] is not None:
            st["gpu"].close()
        proc.exit()
