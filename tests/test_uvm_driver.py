"""UvmDriver: the UVM-class driver on the HMM core -- oversubscription with eviction (data intact,
rss and memcg right), the eviction policy's choice of root chunk, the density prefetcher through
the fault path, progress of a 3x-oversubscribed working set beside a CPU faulting thread, the
same modelled time and counters from the same seed, policies by name, argument errors."""
import errno
import threading

import numpy as np
import pytest

from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu import workloads as W
from hmmgpu.drivers.uvm import POLICY_NAMES, Fifo, UvmDriver, make_policies
from hmmgpu.drivers.uvm.counters import COUNTER_NAMES

from invariants import check_system

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
MB2 = 2 << 20
BLOCK = MB2 // PAGE_SIZE
GPU = 1


def blocks_mmap(proc, nblocks):
    """``nblocks`` 2 MiB-aligned blocks of anonymous memory (one spare block to align in)."""
    a = proc.mmap((nblocks + 1) * MB2, RW, ANON)
    return -(-a // MB2) * MB2


def fill(proc, addr, npages, seed):
    data = np.random.default_rng(seed).integers(0, 1 << 32, npages * PAGE_SIZE // 4, dtype=np.uint64)
    data = data.astype(np.uint32)
    proc.write(addr, data)
    return data


def on_gpu(drv, addr, npages):
    """Per page: is it resident on the device (the driver's VA-block state)."""
    v = (addr >> 12) + np.arange(npages)
    rows = drv.blocks.rows_of_blocks(v // BLOCK, create=False)
    return np.where(rows >= 0, drv.blocks.resident[GPU, np.maximum(rows, 0), v % BLOCK], False)


def streaming(fp=3 << 20):
    return W.get("streaming")(fp, seed=3, threads=1024, step=16, loops=2)


def run_workload(system_factory, w, frac, policies=None, seed=0):
    system = system_factory(ram_bytes=4 * w.footprint + (32 << 20))
    proc = system.spawn()
    w.setup(proc)
    lo, hi = w.extent
    nb = max(1, -(-int(w.footprint * frac) // MB2))
    drv = UvmDriver(system, proc, lo, hi, device_bytes=nb * MB2, policies=policies, seed=seed)
    w.run(drv)
    return system, proc, drv


def test_data_intact_at_half_the_footprint(mm_system_factory):
    """Device memory of half the working set: root chunks are evicted to system memory and the
    program's result is still exact, on the device and after close; refcounts, mapcounts, rss
    and memcg charges agree with the page tables throughout."""
    w = streaming()
    system, proc, drv = run_workload(mm_system_factory, w, 0.5)
    c = drv.counters()
    assert c["num_evictions"] > 0 and c["num_pages_evicted"] > 0 and c["bytes_xfer_dth"] > 0
    assert c["num_pages_in"] > drv.device_bytes // PAGE_SIZE          # more came in than fits
    assert w.check().ok, w.check()
    check_system(system)
    rss = dict(proc.rss)
    drv.close()
    assert w.check().ok and dict(proc.rss) == rss
    check_system(system)
    assert drv.pmm.free_bytes() == drv.device_bytes


def test_counters_have_uvm_names_and_the_clock_moves(mm_system_factory):
    w = streaming()
    _, _, drv = run_workload(mm_system_factory, w, 2.0)
    c = drv.counters()
    assert list(c) == list(COUNTER_NAMES)
    assert c["num_pages_in"] > 0 and c["bytes_xfer_htd"] > 0 and c["num_replays"] > 0
    spent = drv.clock.spent
    assert {"fault_batch", "replay", "launch", "copy_h2d", "block_service"} <= set(spent)
    assert drv.clock.now_ns == sum(spent.values()) > 0
    drv.close()


@pytest.mark.parametrize("policy, victim", [("lru", "b"), ("fifo", "a")])
def test_the_eviction_policy_picks_the_root_chunk(mm_system_factory, policy, victim):
    """Two root chunks of device memory, blocks a, b, c touched in turn (whole blocks: the
    "block" prefetcher).  Between b and c, a CPU access to one page of a and the device's touch
    of it again reuse a's root: LRU then evicts b's root (the least recently used), FIFO a's
    (allocated first)."""
    system = mm_system_factory(ram_bytes=64 << 20)
    proc = system.spawn()
    base = blocks_mmap(proc, 3)
    data = fill(proc, base, 3 * BLOCK, seed=1)
    drv = UvmDriver(system, proc, base, base + 3 * MB2, device_bytes=2 * MB2,
                    policies={"eviction": policy, "prefetch": "block"})
    a, b, c = base, base + MB2, base + 2 * MB2
    drv.jobs.reduce_sum(a, PAGE_SIZE)
    drv.jobs.reduce_sum(b, PAGE_SIZE)
    assert on_gpu(drv, a, BLOCK).all() and on_gpu(drv, b, BLOCK).all()
    assert drv.pmm.stats["root_chunks_evicted"] == 0
    proc.read(a + 7 * PAGE_SIZE, 4)                  # the CPU takes one page of a home ...
    assert drv.counters()["cpu_page_fault_count"] == 1 and not on_gpu(drv, a + 7 * PAGE_SIZE, 1)[0]
    drv.jobs.reduce_sum(a + 7 * PAGE_SIZE, 16)      # ... and the device brings it back
    drv.jobs.reduce_sum(c, PAGE_SIZE)
    assert drv.counters()["num_evictions"] == 1 and on_gpu(drv, c, BLOCK).all()
    gone, kept = (b, a) if victim == "b" else (a, b)
    assert not on_gpu(drv, gone, BLOCK).any() and on_gpu(drv, kept, BLOCK).all()
    assert np.array_equal(proc.read(base, 3 * MB2).view(np.uint32), data)
    drv.close()


def test_density_prefetch_at_threshold_51(mm_system_factory):
    """262 faulted pages of a 2 MiB block (just over 51%) bring the other 250 along; 256 (50%)
    bring nothing: that block stays half on the device."""
    system = mm_system_factory(ram_bytes=64 << 20)
    proc = system.spawn()
    base = blocks_mmap(proc, 2)
    fill(proc, base, 2 * BLOCK, seed=2)
    drv = UvmDriver(system, proc, base, base + 2 * MB2)
    drv.jobs.memset(base, 0, 262 * PAGE_SIZE)
    assert on_gpu(drv, base, BLOCK).all()
    assert drv.counters()["num_prefetched_pages"] == BLOCK - 262
    drv.jobs.memset(base + MB2, 0, 256 * PAGE_SIZE)
    got = on_gpu(drv, base + MB2, BLOCK)
    assert got[:256].all() and not got[256:].any()
    assert drv.counters()["num_prefetched_pages"] == BLOCK - 262
    drv.close()


def test_three_times_oversubscribed_with_a_cpu_thread_makes_progress(mm_system_factory):
    """A working set of 3x device memory streamed by device jobs while a CPU thread keeps
    writing pages of the same range (each CPU write of a device page faults it home): every job
    finishes, both sides' data are right, and the driver evicted and took CPU faults."""
    system = mm_system_factory(ram_bytes=48 << 20)
    proc = system.spawn()
    nblocks = 6
    base = blocks_mmap(proc, nblocks)
    gpu_part = 4 * BLOCK                              # the device's pages: blocks 0..3
    cpu_addr, cpu_pages = base + 4 * MB2, 2 * BLOCK   # the CPU's: blocks 4..5
    drv = UvmDriver(system, proc, base, base + nblocks * MB2, device_bytes=2 * MB2)
    fill(proc, base, nblocks * BLOCK, seed=3)
    stop, errors, rounds = threading.Event(), [], [0]

    def cpu():
        try:
            k = 0
            while not stop.is_set() or k < 4:
                page = (k * 37) % cpu_pages
                proc.write(cpu_addr + page * PAGE_SIZE, np.full(PAGE_SIZE // 4, k, np.uint32))
                k += 1
            rounds[0] = k
        except BaseException as ex:                   # reported by the main thread
            errors.append(ex)

    t = threading.Thread(target=cpu)
    t.start()
    try:
        for value in range(1, 4):
            drv.jobs.memset(base, value, gpu_part * PAGE_SIZE)
            drv.jobs.reduce_sum(cpu_addr, cpu_pages * PAGE_SIZE)    # the device reads the CPU's pages
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert (proc.read(base, gpu_part * PAGE_SIZE) == 3).all()
    last = rounds[0] - 1
    page = (last * 37) % cpu_pages
    assert (proc.read(cpu_addr + page * PAGE_SIZE, PAGE_SIZE).view(np.uint32) == last).all()
    c = drv.counters()
    assert c["num_evictions"] > 0
    drv.close()
    check_system(system)


def test_same_seed_same_modelled_time_and_counters(mm_system_factory):
    runs = []
    for _ in range(2):
        w = streaming()
        _, _, drv = run_workload(mm_system_factory, w, 0.5, policies={"eviction": "random"}, seed=7)
        runs.append((drv.clock.now_ns, drv.counters(), dict(drv.clock.spent)))
        drv.close()
    assert runs[0] == runs[1]
    assert runs[0][1]["num_evictions"] > 0


def test_policies_by_name():
    assert set(POLICY_NAMES["eviction"]) == {"lru", "lfu", "fifo", "random"}
    assert set(POLICY_NAMES["prefetch"]) == {"density", "none", "sequential", "block"}
    p = make_policies({"eviction": "fifo", "prefetch": "none"})
    assert isinstance(p["eviction"], Fifo) and type(p["prefetch"]).__name__ == "NoPrefetch"
    assert type(p["thrashing"]).__name__ == "UvmThrashing"
    mine = Fifo()
    assert make_policies({"eviction": mine})["eviction"] is mine
    with pytest.raises(ValueError, match="lru"):
        make_policies({"eviction": "lru2"})
    with pytest.raises(ValueError, match="families"):
        make_policies({"evict": "lru"})
    with pytest.raises(TypeError):
        make_policies({"prefetch": mine})


def test_arguments_are_checked_and_close_is_final(mm_system_factory):
    system = mm_system_factory(ram_bytes=64 << 20)
    proc = system.spawn()
    a = blocks_mmap(proc, 1)
    for s, e, kw, why in ((a + 8, a + PAGE_SIZE, {}, "page-aligned"), (a, a, {}, "empty"),
                          (a, a + MB2, {"device_bytes": 4096}, "multiple of 2 MiB"),
                          (a, a + MB2, {"device_bytes": 0}, "multiple of 2 MiB")):
        with pytest.raises(OSError, match=why) as ei:
            UvmDriver(system, proc, s, e, **kw)
        assert ei.value.errno == errno.EINVAL
    data = fill(proc, a, 4, seed=4)
    drv = UvmDriver(system, proc, a, a + MB2, name="g")
    assert drv.jobs.reduce_sum(a, 4 * PAGE_SIZE).value == int(data.sum(dtype=np.uint64))
    drv.close()
    drv.close()
    for fn in (lambda: drv.jobs.reduce_sum(a, PAGE_SIZE), lambda: drv.service(None)):
        with pytest.raises(OSError, match="closed") as ei:
            fn()
        assert ei.value.errno == errno.EBADF
    assert np.array_equal(proc.read(a, 4 * PAGE_SIZE).view(np.uint32), data)
