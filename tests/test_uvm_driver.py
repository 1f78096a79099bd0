"""UvmDriver: the UVM-class driver on the HMM core -- oversubscription with eviction (data intact,
rss and memcg right), the eviction policy's choice of root chunk, the density prefetcher through
the fault path, progress of a 3x-oversubscribed working set beside a CPU faulting thread, the
same modelled time and counters from the same seed, policies by name, argument errors, fatal
faults; then one test per policy effect: thrashing throttled then pinned (and not without the
policy), an access counter crossing 256 migrating its region, read duplication and its collapse,
preferred location and accessed-by, prefetch both ways; every decision a trace event."""
import errno
import threading

import numpy as np
import pytest

from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE
from hmmgpu import workloads as W
from hmmgpu.device import JobFault
from hmmgpu.drivers import uvm
from hmmgpu.drivers.uvm import POLICY_NAMES, Fifo, UvmAccessCounters, UvmDriver, UvmThrashing, make_policies
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
    nb = max(1, -(-int(w.footprint * frac) // MB2))
    drv = UvmDriver(system, proc, device_bytes=nb * MB2, policy=policies, seed=seed)
    w.run(drv)
    return system, proc, drv


def test_data_intact_at_half_the_footprint(mm_system_factory):
    """Device memory of half the working set: root chunks are evicted to system memory and the
    program's result is still exact, on the device and after close; refcounts, mapcounts, rss
    and memcg charges agree with the page tables throughout."""
    w = streaming()
    system, proc, drv = run_workload(mm_system_factory, w, 0.5)
    c = drv.counters
    assert c["num_evictions"] > 0 and c["num_pages_evicted"] > 0 and c["bytes_xfer_dth"] > 0
    assert c["num_pages_in"] > drv.device_bytes // PAGE_SIZE          # more came in than fits
    assert w.check().ok, w.check()
    check_system(system)
    rss = dict(proc.rss)
    drv.close()
    assert w.check().ok and dict(proc.rss) == rss
    check_system(system)
    assert drv.device(0).pmm.free_bytes() == drv.device_bytes


def test_counters_have_uvm_names_and_the_clock_moves(mm_system_factory):
    w = streaming()
    _, _, drv = run_workload(mm_system_factory, w, 2.0)
    c = drv.counters
    assert list(c) == list(COUNTER_NAMES)
    assert c["num_pages_in"] > 0 and c["bytes_xfer_htd"] > 0 and c["num_replays"] > 0
    spent = drv.clock.spent
    assert {"fault_batch", "replay", "launch", "copy_h2d", "block_service"} <= set(spent)
    assert drv.clock.now_ns == sum(spent.values()) > 0
    drv.close()


@pytest.mark.parametrize("touch", ["cpu", "remap"])
@pytest.mark.parametrize("policy, victim", [("lru", "b"), ("fifo", "a")])
def test_the_eviction_policy_picks_the_root_chunk(mm_system_factory, policy, victim, touch):
    """Two root chunks of device memory, blocks a, b, c touched in turn (whole blocks: the
    "block" prefetcher).  Between b and c, a's root is used again -- a CPU access to one page of
    a and the device's touch of it (a chunk freed and allocated again), or an invalidation of a's
    mappings and the device's touch that maps its pages again (uvm_pmm_gpu_mark_root_chunk_used)
    -- so LRU then evicts b's root (the least recently used), FIFO a's (allocated first)."""
    system = mm_system_factory(ram_bytes=64 << 20)
    proc = system.spawn()
    base = blocks_mmap(proc, 3)
    data = fill(proc, base, 3 * BLOCK, seed=1)
    drv = UvmDriver(system, proc, device_bytes=2 * MB2, policy={"eviction": policy, "prefetch": "block"})
    a, b, c = base, base + MB2, base + 2 * MB2
    drv.jobs.reduce_sum(a, PAGE_SIZE)
    drv.jobs.reduce_sum(b, PAGE_SIZE)
    assert on_gpu(drv, a, BLOCK).all() and on_gpu(drv, b, BLOCK).all()
    assert drv.device(0).pmm.stats["root_chunks_evicted"] == 0
    if touch == "cpu":
        proc.read(a + 7 * PAGE_SIZE, 4)               # the CPU takes one page of a home ...
        assert drv.counters["cpu_page_fault_count"] == 1 and not on_gpu(drv, a + 7 * PAGE_SIZE, 1)[0]
    else:
        proc.mprotect(a, MB2, PROT_READ)              # a's device mappings are invalidated ...
        proc.mprotect(a, MB2, RW)
    assert drv.jobs.reduce_sum(a + 7 * PAGE_SIZE, 16).faults == 1     # ... and the device touches a again
    drv.jobs.reduce_sum(c, PAGE_SIZE)
    assert drv.counters["num_evictions"] == 1 and on_gpu(drv, c, BLOCK).all()
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
    drv = UvmDriver(system, proc)
    drv.jobs.memset(base, 0, 262 * PAGE_SIZE)
    assert on_gpu(drv, base, BLOCK).all()
    assert drv.counters["num_prefetched_pages"] == BLOCK - 262
    drv.jobs.memset(base + MB2, 0, 256 * PAGE_SIZE)
    got = on_gpu(drv, base + MB2, BLOCK)
    assert got[:256].all() and not got[256:].any()
    assert drv.counters["num_prefetched_pages"] == BLOCK - 262
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
    drv = UvmDriver(system, proc, device_bytes=2 * MB2)
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
    c = drv.counters
    assert c["num_evictions"] > 0
    drv.close()
    check_system(system)


def test_a_job_whose_pass_outgrows_device_memory_finishes(mm_system_factory, monkeypatch):
    """BICG's second kernel: each of 1,024 lanes reads its row of A (4 MiB, two VA blocks) and the
    vectors, so one pass needs more pages than the two root chunks hold.  Each drain brought one
    half of A in by evicting the other, the replayed lanes faulted on that half, and the job never
    ended.  A page evicted JOB_EVICTIONS_MAX (UVM's thrashing threshold, 3) times during a job is
    now mapped remotely when it faults again in that job: the job ends, its result exact."""
    calls = [0]
    real = UvmDriver._service

    def service(self, g, faults):
        calls[0] += 1
        assert calls[0] < 2000, "the fault path is livelocked: 2,000 passes"
        return real(self, g, faults)

    monkeypatch.setattr(UvmDriver, "_service", service)
    w = W.get("bicg")(seed=0)
    system, proc, drv = run_workload(mm_system_factory, w, 0.99)
    assert drv.device_bytes < w.footprint
    assert w.check()
    c = drv.counters
    assert c["num_evictions"] > 0 and c["num_map_remote"] > 0
    drv.close()
    check_system(system)


def test_every_decision_is_a_trace_event(mm_system_factory):
    from hmmgpu import trace
    t = trace.enable()
    try:
        w = streaming()
        _, _, drv = run_workload(mm_system_factory, w, 0.5)
        drv.close()
    finally:
        trace.disable()
    names = {e[1] for e in t.events if e[5] == "gpu0/policy"}
    assert {"prefetch", "evict"} <= names
    ev = [e[6] for e in t.events if e[1] == "evict" and e[5] == "gpu0/policy"]
    assert ev and all(a["policy"] == "lru" and a["modelled_ns"] > 0 for a in ev)


def test_same_seed_same_modelled_time_and_counters(mm_system_factory):
    runs = []
    for _ in range(2):
        w = streaming()
        _, _, drv = run_workload(mm_system_factory, w, 0.5, policies={"eviction": "random"}, seed=7)
        runs.append((drv.clock.now_ns, drv.counters, dict(drv.clock.spent)))
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
    for kw, why in (({"device_bytes": 4096}, "multiple of 2 MiB"), ({"device_bytes": 0}, "multiple of 2 MiB"),
                    ({"device_bytes": True}, "multiple of 2 MiB"), ({"ndevices": 0}, "number of devices"),
                    ({"ndevices": 1.0}, "number of devices"), ({"ndevices": 9}, "at most 7 peers")):
        with pytest.raises(OSError, match=why) as ei:
            UvmDriver(system, proc, **kw)
        assert ei.value.errno == errno.EINVAL
    for kw in ({"policy": {"eviction": "mru"}}, {"policy": {"evict": "lru"}}):
        with pytest.raises(ValueError):
            UvmDriver(system, proc, **kw)
    data = fill(proc, a, 4, seed=4)
    drv = UvmDriver(system, proc, name="g")
    assert drv.jobs.reduce_sum(a, 4 * PAGE_SIZE).value == int(data.sum(dtype=np.uint64))
    drv.close()
    drv.close()
    for fn in (lambda: drv.jobs.reduce_sum(a, PAGE_SIZE), lambda: drv.device(0).service(None),
               lambda: drv.prefetch(a, PAGE_SIZE), lambda: drv.advise(a, PAGE_SIZE, uvm.SET_READ_MOSTLY)):
        with pytest.raises(OSError, match="closed") as ei:
            fn()
        assert ei.value.errno == errno.EBADF
    assert np.array_equal(proc.read(a, 4 * PAGE_SIZE).view(np.uint32), data)


# -- P2: one test per policy effect and per piece of advice -----------------------------------------
def rig(system_factory, nblocks=2, **kw):
    system = system_factory(ram_bytes=48 << 20)
    proc = system.spawn()
    base = blocks_mmap(proc, nblocks)
    data = fill(proc, base, nblocks * BLOCK, seed=5)
    return system, proc, base, data, UvmDriver(system, proc, **kw)


def test_a_page_bounced_within_the_lapse_is_throttled_then_pinned(mm_system_factory):
    """A page the device writes and the CPU writes in turn (each bounce well inside the 500 us
    lapse): detected as thrashing at the third event, the device is throttled (it naps on the
    clock), and after pin_threshold throttling periods the page is pinned on the CPU and mapped
    remotely: no more migrations, no more faults, both sides' writes land."""
    _, proc, base, _, drv = rig(mm_system_factory, policy={
        "prefetch": "none", "thrashing": UvmThrashing(uvm_perf_thrashing_pin_threshold=2)})
    for i in range(24):
        drv.jobs.memset(base, i + 1, 16)
        proc.write(base + 16, np.full(4, i, np.uint32))
    c = drv.counters
    assert c["num_thrashing"] > 0 and c["num_throttle"] > 0 and drv.clock.spent["nap"] > 0
    assert c["num_pin_remote"] > 0 and c["num_map_remote"] > 0
    pages_in, faults = c["num_pages_in"], c["gpu_page_fault_count"]
    drv.jobs.memset(base, 99, 16)
    proc.write(base + 16, np.full(4, 7, np.uint32))
    c = drv.counters
    assert c["num_pages_in"] == pages_in and c["gpu_page_fault_count"] == faults
    assert not on_gpu(drv, base, 1)[0]
    assert (proc.read(base, 16) == 99).all() and (proc.read(base + 16, 16).view(np.uint32) == 7).all()
    drv.close()


def test_the_cpu_is_throttled_too(mm_system_factory):
    """The CPU side of the same bounce: once the page thrashes, a CPU fault on it while the CPU is
    throttled sleeps until the throttling period ends (a cpu_nap on the clock, counted as the
    CPU's throttle in thrashing_stats) and then migrates the page home; the data stays right."""
    _, proc, base, _, drv = rig(mm_system_factory, policy={"prefetch": "none"})
    thr = drv.policy["thrashing"]
    for i in range(6):
        drv.jobs.memset(base, i + 1, 16)
        proc.write(base + 16, np.full(4, i, np.uint32))
    assert thr.stats["num_throttle"][0] > 0 and drv.clock.spent["cpu_nap"] > 0
    assert drv.counters["num_throttle"] == int(thr.stats["num_throttle"].sum())
    assert (proc.read(base, 16) == 6).all() and (proc.read(base + 16, 16).view(np.uint32) == 5).all()
    drv.close()


def test_without_thrashing_mitigation_the_page_keeps_bouncing(mm_system_factory):
    _, proc, base, _, drv = rig(mm_system_factory, policy={"prefetch": "none", "thrashing": "none"})
    for i in range(24):
        drv.jobs.memset(base, i + 1, 16)
        proc.write(base + 16, np.full(4, i, np.uint32))
    c = drv.counters
    assert c["num_pages_in"] == 24 and c["num_throttle"] == c["num_pin_remote"] == 0
    assert "cpu_nap" not in drv.clock.spent and "nap" not in drv.clock.spent
    drv.close()


def test_an_access_counter_crossing_256_migrates_its_region(mm_system_factory):
    """Pages preferring the CPU are mapped remotely; once the advice is gone the device's reads
    through those mappings count per 2 MiB region, and a region crossing the threshold (256)
    raises a notification whose touched 64 KiB sub-regions migrate (migration enabled).  With
    migration at its default (off without ATS) the notification is counted and nothing moves."""
    for enable, moves in ((1, True), (-1, False)):
        _, proc, base, data, drv = rig(mm_system_factory, policy={
            "prefetch": "none", "access_counters": UvmAccessCounters(uvm_perf_access_counter_migration_enable=enable)})
        drv.advise(base, MB2, uvm.SET_PREFERRED_LOCATION, uvm.CPU)
        drv.jobs.reduce_sum(base, 300 * PAGE_SIZE)
        assert not on_gpu(drv, base, BLOCK).any() and drv.counters["num_map_remote"] == 300
        assert drv.counters["num_access_counter_notifications"] == 1      # 300 pages: one crossing
        drv.advise(base, MB2, uvm.UNSET_PREFERRED_LOCATION, uvm.CPU)
        drv.jobs.reduce_sum(base, 300 * PAGE_SIZE)
        c = drv.counters
        assert c["num_access_counter_notifications"] == 2
        if moves:
            assert c["num_access_counter_migrations"] == 300 and on_gpu(drv, base, 300).all()
        else:
            assert c["num_access_counter_migrations"] == 0 and not on_gpu(drv, base, BLOCK).any()
        r = drv.jobs.reduce_sum(base, 300 * PAGE_SIZE)
        assert r.value == int(data[:300 * PAGE_SIZE // 4].sum(dtype=np.uint64)) and r.faults == 0
        drv.close()


def test_read_mostly_duplicates_and_collapses_on_a_write(mm_system_factory):
    """Read-mostly pages read by the device get a device copy beside the CPU's (both valid: the
    CPU reads its own without a fault); a device write collapses the copies to the device's, a
    CPU write collapses them to the CPU's; the data stays right throughout."""
    _, proc, base, data, drv = rig(mm_system_factory, policy={"prefetch": "none"})
    drv.advise(base, MB2, uvm.SET_READ_MOSTLY)
    n = 8
    want = int(data[:n * PAGE_SIZE // 4].sum(dtype=np.uint64))
    assert drv.jobs.reduce_sum(base, n * PAGE_SIZE).value == want
    c = drv.counters
    assert c["num_read_duplicates"] == n and on_gpu(drv, base, n).all()
    assert np.array_equal(proc.read(base, n * PAGE_SIZE).view(np.uint32), data[:n * PAGE_SIZE // 4])
    assert drv.counters["cpu_page_fault_count"] == 0                  # the CPU's copy is valid
    assert drv.jobs.reduce_sum(base, n * PAGE_SIZE).faults == 0        # so is the device's
    drv.jobs.memset(base, 5, 16)                                        # a device write: page 0
    c = drv.counters
    assert c["num_read_duplicate_invalidates"] == 1 and on_gpu(drv, base, 1)[0]
    assert (proc.read(base, 16) == 5).all()                          # the CPU faults it home
    proc.write(base + 3 * PAGE_SIZE, np.full(4, 9, np.uint32))        # a CPU write: page 3
    r = drv.jobs.reduce_sum(base + 3 * PAGE_SIZE, PAGE_SIZE)
    page3 = data[3 * PAGE_SIZE // 4:4 * PAGE_SIZE // 4].astype(np.uint64)
    assert r.value == int(page3[4:].sum()) + 4 * 9
    assert drv.counters["num_read_duplicate_invalidates"] == 2
    assert drv.counters["num_read_duplicates"] == n + 1           # page 3 read again: duplicated again
    drv.advise(base, MB2, uvm.UNSET_READ_MOSTLY)                       # the other 7 collapse
    assert drv.counters["num_read_duplicate_invalidates"] == 2 + (n - 1)
    assert not on_gpu(drv, base + PAGE_SIZE, n - 1).any()
    drv.close()


def test_preferred_location_cpu_maps_remotely_and_accessed_by_avoids_faults(mm_system_factory):
    _, proc, base, data, drv = rig(mm_system_factory)
    drv.advise(base, MB2, uvm.SET_PREFERRED_LOCATION, uvm.CPU)
    drv.jobs.reduce_sum(base, 64 * PAGE_SIZE)
    c = drv.counters
    assert c["num_pages_in"] == 0 and c["num_map_remote"] == 64
    drv.advise(base + MB2, MB2, uvm.SET_ACCESSED_BY, 0)        # mapped where they are: no faults
    r = drv.jobs.reduce_sum(base + MB2, MB2)
    assert r.faults == 0 and r.value == int(data[BLOCK * PAGE_SIZE // 4:].sum(dtype=np.uint64))
    drv.close()


def test_prefetch_to_the_device_and_back(mm_system_factory):
    """prefetch(range, device 0) migrates and maps the range (a job then takes no fault);
    prefetch(range, uvm.CPU) brings it home (the CPU then takes no fault); a bad range or device
    is EINVAL."""
    _, proc, base, data, drv = rig(mm_system_factory)
    assert drv.prefetch(base, 2 * MB2, 0) == 2 * BLOCK
    assert on_gpu(drv, base, 2 * BLOCK).all()
    r = drv.jobs.reduce_sum(base, 2 * MB2)
    assert r.faults == 0 and r.value == int(data.sum(dtype=np.uint64))
    c = drv.counters
    assert c["prefetch_bytes_xfer_htd"] == 4 * MB2 // 2 and c["num_prefetched_pages"] == 0
    assert drv.prefetch(base, MB2, uvm.CPU) == BLOCK
    assert not on_gpu(drv, base, BLOCK).any()
    assert np.array_equal(proc.read(base, MB2).view(np.uint32), data[:BLOCK * PAGE_SIZE // 4])
    assert drv.counters["cpu_page_fault_count"] == 0
    for bad in ((base + 1, MB2, 0), (base, 0, 0), (-MB2, MB2, 0), (base, MB2, 1), (base, MB2, "gpu")):
        with pytest.raises(OSError) as ei:
            drv.prefetch(*bad)
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        drv.advise(base, MB2, "set_read_often")
    assert ei.value.errno == errno.EINVAL
    drv.close()


def test_a_fatal_fault_names_the_page_that_failed(mm_system_factory):
    """reduce_sum over pages whose fourth is PROT_NONE names that page (EFAULT); a
    hole past the VMA is EFAULT at its page; a write to a read-only mapping is EPERM at its page,
    and nothing is written there; the pages before the bad one were serviced (migrated)."""
    system = mm_system_factory(ram_bytes=48 << 20)
    proc = system.spawn()
    a = blocks_mmap(proc, 1)
    fill(proc, a, 8, seed=6)
    proc.munmap(a + 8 * PAGE_SIZE, MB2 - 8 * PAGE_SIZE)
    proc.mprotect(a + 3 * PAGE_SIZE, PAGE_SIZE, PROT_NONE)
    proc.mprotect(a + 6 * PAGE_SIZE, 2 * PAGE_SIZE, PROT_READ)
    drv = UvmDriver(system, proc, policy={"prefetch": "none"})
    with pytest.raises(JobFault) as ei:
        drv.jobs.reduce_sum(a, 4 * PAGE_SIZE)
    assert ei.value.errno == errno.EFAULT and ei.value.address == a + 3 * PAGE_SIZE
    assert on_gpu(drv, a, 3).all()
    with pytest.raises(JobFault) as ei:
        drv.jobs.reduce_sum(a + 4 * PAGE_SIZE, 12 * PAGE_SIZE)
    assert ei.value.errno == errno.EFAULT and ei.value.address == a + 8 * PAGE_SIZE
    with pytest.raises(JobFault) as ei:
        drv.jobs.memset(a + 4 * PAGE_SIZE, 1, 4 * PAGE_SIZE)
    assert ei.value.errno == errno.EPERM and ei.value.address == a + 6 * PAGE_SIZE
    assert (proc.read(a + 6 * PAGE_SIZE, 2 * PAGE_SIZE) != 1).any()
    assert drv.counters["num_pages_in"] > 0
    drv.close()


# -- the hmm_range_fault path (pages that stay in system memory) ------------------------------------
def remote_only(system, proc, a, n, **kw):
    """A driver whose faults map the pages remotely (their preferred location is the CPU)."""
    drv = UvmDriver(system, proc, **kw)
    drv.advise(a, n * PAGE_SIZE, uvm.SET_PREFERRED_LOCATION, uvm.CPU)
    return drv


def test_a_cold_job_is_serviced_in_passes_with_one_update_each(mm_system_factory):
    """6,000 faulting pages: passes of 20 x 256 faults, each one driver call answered by one
    page-table command buffer; lanes launched stay 2n; the fault batches cost the clock."""
    system = mm_system_factory(ram_bytes=64 << 20)
    proc = system.spawn()
    n = 6000
    a = proc.mmap(n * PAGE_SIZE, RW, ANON)
    data = fill(proc, a, n, seed=7)
    drv = remote_only(system, proc, a, n)
    calls = []
    hw = drv.device(0).hw
    svc = hw.service
    hw.service = lambda f: (calls.append(len(f)), svc(f))[1]
    sub0 = drv.device(0).pt.stats["pt_submissions"]
    r = drv.jobs.reduce_sum(a, n * PAGE_SIZE)
    assert r.value == int(data.sum(dtype=np.uint64)) and r.faults == n
    assert calls == [5120, 880] and r.rounds == [n, 5120, 880]
    # one command buffer per call, and one after the job (the access counters' accessed bits)
    assert drv.device(0).pt.stats["pt_submissions"] - sub0 <= 2 * len(calls) + 1
    c = drv.counters
    assert c["num_map_remote"] == n and c["num_pages_in"] == 0 and c["num_fault_batches"] == 24
    assert drv.clock.spent["fault_batch"] == drv.cost.fault_batch_ns(24)
    assert drv.jobs.reduce_sum(a, n * PAGE_SIZE).faults == 0          # all mapped now
    drv.close()


def test_sparse_faults_fault_in_only_their_pages(mm_system_factory):
    """Faults 3 pages apart in untouched memory: one hmm_range_fault over the run asks for the
    faulted pages only, so the CPU allocates nothing for the pages in between."""
    from hmmgpu.device.faults import ACCESS_WRITE, FaultBatch
    system = mm_system_factory(ram_bytes=48 << 20)
    proc = system.spawn()
    a = proc.mmap(64 * PAGE_SIZE, RW, ANON)
    drv = remote_only(system, proc, a, 64)
    vpns = (a >> 12) + np.arange(0, 64, 3)
    f = FaultBatch(vpns.astype(np.uint64) << np.uint64(12), np.full(vpns.size, ACCESS_WRITE),
                   np.arange(vpns.size), np.zeros(vpns.size))
    before = proc.rss["anon"]
    assert drv.device(0).service(f) is None
    assert proc.rss["anon"] - before == vpns.size
    ent = drv.device(0).pt.lookup((a >> 12) + np.arange(64))
    assert np.flatnonzero(ent).tolist() == list(range(0, 64, 3))
    drv.close()


def test_pages_in_another_devices_coherent_memory_move_home_first(mm_system_factory):
    """A page in another device's coherent memory is not addressable by this device: with the
    CPU preferred, the service moves it to system memory and maps it remotely."""
    from hmmgpu.drivers import dmirror
    system = mm_system_factory(ram_bytes=48 << 20)
    proc = system.spawn()
    other = dmirror.DMirrorDevice(system, memory="coherent", chunk_pages=64, max_chunks=1)
    a = proc.mmap(16 * PAGE_SIZE, RW, ANON)
    data = fill(proc, a, 16, seed=8)
    m = other.open(proc)
    assert m.migrate_to_dev(a, 16).cpages == 16
    drv = remote_only(system, proc, a, 16)
    assert drv.jobs.reduce_sum(a, 16 * PAGE_SIZE).value == int(data.sum(dtype=np.uint64))
    ent = drv.device(0).pt.lookup((a >> 12) + np.arange(16)) >> np.uint64(12)
    assert (ent < system.phys.nr_ram).all() and drv.counters["num_map_remote"] == 16
    drv.close()
    m.close()
