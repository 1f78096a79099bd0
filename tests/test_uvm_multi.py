"""UvmDriver over several devices (issue 13, item 9): device-to-device migration on the DMA engine
when another device faults on a page (migrate_vma of the driver's own device-private pages), the
peer's memory mapped remotely under SetAccessedBy and under a thrashing pin, explicit prefetch
from peer to peer, CPU faults on pages spread over devices, eviction and counters per device.
Each test checks the bytes as well as the bookkeeping."""
import numpy as np
import pytest

from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.drivers import uvm
from invariants import check_system

MB2 = 2 << 20
BLOCK = MB2 // PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


@pytest.fixture
def rig(mm_system_factory):
    """rig(nblocks, ndevices, device_bytes, **driver keywords) -> (system, proc, base, data, drv):
    ``nblocks`` 2 MiB blocks of random data in a new process, under a UvmDriver."""
    return lambda *a, **kw: make_rig(mm_system_factory, *a, **kw)


def make_rig(mm_system_factory, nblocks=2, ndevices=2, device_bytes=8 * MB2, **kw):
    system = mm_system_factory(ram_bytes=64 << 20)
    proc = system.spawn()
    a = proc.mmap((nblocks + 1) * MB2, RW, ANON)
    base = -(-a // MB2) * MB2
    data = np.random.default_rng(11).integers(0, 1 << 32, nblocks * MB2 // 4, dtype=np.uint64).astype(np.uint32)
    proc.write(base, data)
    drv = uvm.UvmDriver(system, proc, device_bytes=device_bytes, ndevices=ndevices, **kw)
    return system, proc, base, data, drv


def resident(drv, dev, addr, npages):
    """Per page: resident on device ``dev`` (VA-block state)."""
    v = (addr >> 12) + np.arange(npages)
    rows = drv.blocks.rows_of_blocks(v // BLOCK, create=False)
    return np.where(rows >= 0, drv.blocks.resident[dev + 1, np.maximum(rows, 0), v % BLOCK], False)


def total(data, first=0, n=None):
    return int(data[first:None if n is None else first + n].sum(dtype=np.uint64))


def test_a_fault_on_a_peers_page_migrates_it_device_to_device(rig):
    """Device 1 reads a block device 0 holds: the pages move peer to peer (bytes_xfer_dtd, no
    system memory in between), device 0 forgets them and frees its frames, the sum is exact."""
    system, proc, base, data, drv = rig(policy={"prefetch": "none"})
    words = MB2 // 4
    assert drv.device(0).jobs.reduce_sum(base, MB2).value == total(data, 0, words)
    assert resident(drv, 0, base, BLOCK).all()
    rss = proc.rss["anon"]
    assert drv.device(1).jobs.reduce_sum(base, MB2).value == total(data, 0, words)
    assert resident(drv, 1, base, BLOCK).all() and not resident(drv, 0, base, BLOCK).any()
    c0, c1 = drv.device(0).counters, drv.device(1).counters
    assert c1["bytes_xfer_dtd"] == MB2 and c1["bytes_xfer_htd"] == 0 and c1["num_pages_in"] == BLOCK
    assert c0["num_pages_out"] == BLOCK and c0["bytes_xfer_dth"] == 0
    assert drv.device(0).pmm.free_bytes() == drv.device_bytes
    assert proc.rss["anon"] == rss                      # device pages count as anon wherever they are
    assert "copy_peer" in drv.clock.spent
    drv.close()
    assert np.array_equal(proc.read(base, 2 * MB2).view(np.uint32), data)
    check_system(system)


def test_accessed_by_maps_the_peers_memory_remotely(rig):
    """SetAccessedBy(device 1) on pages device 0 holds: device 1 maps them where they are (peer
    memory), its job takes no fault and moves nothing; a store through that mapping lands in
    device 0's copy, which the CPU then reads."""
    system, proc, base, data, drv = rig()
    assert drv.prefetch(base, MB2, device=0) == BLOCK
    drv.advise(base, MB2, uvm.SET_ACCESSED_BY, device=1)
    r = drv.device(1).jobs.reduce_sum(base, MB2)
    assert r.faults == 0 and r.value == total(data, 0, MB2 // 4)
    assert resident(drv, 0, base, BLOCK).all() and not resident(drv, 1, base, BLOCK).any()
    assert drv.device(1).counters["num_map_remote"] == BLOCK and drv.device(1).counters["num_pages_in"] == 0
    drv.device(1).jobs.memset(base, 7, PAGE_SIZE)
    assert resident(drv, 0, base, 1)[0]
    assert (proc.read(base, PAGE_SIZE) == 7).all()
    drv.close()
    check_system(system)


def test_prefetch_between_devices_and_home(rig):
    system, proc, base, data, drv = rig()
    assert drv.prefetch(base, 2 * MB2, device=0) == 2 * BLOCK
    assert drv.prefetch(base, MB2, device=1) == BLOCK
    assert resident(drv, 1, base, BLOCK).all() and resident(drv, 0, base + MB2, BLOCK).all()
    assert drv.device(1).counters["bytes_xfer_dtd"] == MB2
    # a CPU read of pages spread over both devices brings each home from where it is
    assert np.array_equal(proc.read(base + MB2 - 4 * PAGE_SIZE, 8 * PAGE_SIZE).view(np.uint32),
                          data[(MB2 - 4 * PAGE_SIZE) // 4:(MB2 + 4 * PAGE_SIZE) // 4])
    assert drv.prefetch(base, 2 * MB2, device=uvm.CPU) == 2 * BLOCK - 8
    assert not resident(drv, 0, base, 2 * BLOCK).any() and not resident(drv, 1, base, 2 * BLOCK).any()
    drv.close()
    assert np.array_equal(proc.read(base, 2 * MB2).view(np.uint32), data)
    check_system(system)


def test_each_device_evicts_its_own_memory(rig):
    """Device 0 has one root chunk and sweeps three blocks: it evicts its own chunks; device 1,
    holding a block of its own, keeps it."""
    system, proc, base, data, drv = rig(nblocks=4, device_bytes=MB2)
    assert drv.prefetch(base + 3 * MB2, MB2, device=1) == BLOCK
    for k in range(3):
        assert drv.device(0).jobs.reduce_sum(base + k * MB2, MB2).value == total(data, k * MB2 // 4, MB2 // 4)
    assert drv.device(0).counters["num_evictions"] >= 2 and drv.device(1).counters["num_evictions"] == 0
    assert resident(drv, 1, base + 3 * MB2, BLOCK).all()
    c = drv.counters
    assert c["num_evictions"] == drv.device(0).counters["num_evictions"]
    assert c["num_pages_in"] == drv.device(0).counters["num_pages_in"] + drv.device(1).counters["num_pages_in"]
    drv.close()
    assert np.array_equal(proc.read(base, 4 * MB2).view(np.uint32), data)
    check_system(system)


def test_a_page_two_devices_fight_over_is_pinned_and_mapped_from_the_peer(rig):
    """Two devices writing the same page in turn, well inside the lapse: the thrashing policy
    throttles, then pins the page; the other device then maps it from its peer: no more
    migrations, every store lands."""
    system, proc, base, data, drv = rig(policy={"prefetch": "none",
                                                "thrashing": uvm.UvmThrashing(nprocs=3, uvm_perf_thrashing_pin_threshold=2)})
    for i in range(24):
        drv.device(i % 2).jobs.memset(base + (i % 2) * 16, i + 1, 16)
    c = drv.counters
    assert c["num_thrashing"] > 0 and c["num_pin_remote"] + c["num_pin_local"] > 0
    moved = c["num_pages_in"]
    drv.device(0).jobs.memset(base, 200, 16)
    drv.device(1).jobs.memset(base + 16, 201, 16)
    assert drv.counters["num_pages_in"] == moved
    assert drv.counters["num_map_remote"] > 0
    assert (proc.read(base, 16) == 200).all() and (proc.read(base + 16, 16) == 201).all()
    drv.close()
    check_system(system)


def test_a_device_index_is_checked(rig):
    system, proc, base, data, drv = rig()
    for bad in (2, -2, True, "gpu1"):
        with pytest.raises(OSError):
            drv.device(bad)
        with pytest.raises(OSError):
            drv.prefetch(base, PAGE_SIZE, device=bad)
    with pytest.raises(ValueError, match="tracks 2 processors"):
        uvm.UvmDriver(system, proc, ndevices=2, policy={"thrashing": uvm.UvmThrashing()})
    drv.close()
