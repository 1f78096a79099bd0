"""UvmDriver's fault path where MirrorGpu's tests had it and tests/test_uvm_driver.py does not:
pages that cannot migrate (a shared mapping) are mapped remotely beside pages that migrate; a CPU
access takes migrated pages home and the next job faults them in again; write and atomic faults
on untouched memory, migrating and mapped remotely, an atomic fault serviced in one pass; an
munmap unmaps the device through the interval notifier and frees the device memory, and a job
there is then a fatal EFAULT."""
import errno

import numpy as np
import pytest

from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.device import JobFault, UserJob
from hmmgpu.drivers import uvm

from invariants import check_system

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
MB2 = 2 << 20


@pytest.fixture
def rig(mm_system_factory):
    system = mm_system_factory(ram_bytes=64 << 20)
    return system, system.spawn()


def written(proc, npages, seed=0, flags=ANON):
    a = proc.mmap(npages * PAGE_SIZE, RW, flags)
    data = np.random.default_rng(seed).integers(0, 1 << 32, npages * PAGE_SIZE // 4, dtype=np.uint64)
    data = data.astype(np.uint32)
    proc.write(a, data)
    return a, int(data.sum(dtype=np.uint64))


def entries(drv, addr, npages):
    """Device 0's page-table entries of ``npages`` pages at ``addr``, and which of them point
    into its own memory."""
    d = drv.device(0)
    ent = d.pt.lookup((addr >> 12) + np.arange(npages))
    return ent, (ent != 0) & d.hw.owns(ent >> np.uint64(12))


def test_shared_pages_are_mapped_remotely_beside_pages_that_migrate(rig):
    """A private range migrates on fault and is mapped in device memory; a shared mapping cannot
    migrate (migrate_vma leaves it), so its faults map the system pages remotely."""
    system, proc = rig
    n = 700
    a, want = written(proc, n)
    sh = proc.mmap(8 * PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    proc.write(sh, np.full(8 * PAGE_SIZE, 3, np.uint8))
    drv = uvm.UvmDriver(system, proc, device_bytes=4 * MB2)
    assert drv.jobs.reduce_sum(a, n * PAGE_SIZE).value == want
    c = drv.counters
    assert c["num_pages_in"] == n and c["num_map_remote"] == 0
    assert entries(drv, a, n)[1].all()
    assert drv.jobs.reduce_sum(sh, 8 * PAGE_SIZE).value == 8 * PAGE_SIZE // 4 * 0x03030303
    ent, local = entries(drv, sh, 8)
    assert ent.all() and not local.any() and (ent >> np.uint64(12) < system.phys.nr_ram).all()
    assert drv.counters["num_map_remote"] == 8 and drv.counters["num_pages_in"] == n
    drv.close()
    check_system(system)


def test_a_cpu_access_takes_pages_home_and_the_next_job_faults_them_in_again(rig):
    """Resident pages are not migrated again; the CPU reading them back faults them home (the
    device entries go); the next job faults on every page and migrates them again."""
    system, proc = rig
    n = 1024
    a, want = written(proc, n, seed=1)
    drv = uvm.UvmDriver(system, proc, device_bytes=4 * MB2, policy={"prefetch": "block"})
    assert drv.jobs.reduce_sum(a, n * PAGE_SIZE).value == want
    assert drv.counters["num_pages_in"] == n
    r = drv.jobs.reduce_sum(a, n * PAGE_SIZE)
    assert r.value == want and r.faults == 0 and drv.counters["num_pages_in"] == n
    back = proc.read(a, n * PAGE_SIZE).view(np.uint32)
    assert int(back.sum(dtype=np.uint64)) == want
    assert drv.counters["cpu_page_fault_count"] > 0
    assert not entries(drv, a, n)[0].any()
    r = drv.jobs.reduce_sum(a, n * PAGE_SIZE)
    assert r.value == want and r.faults == n and drv.counters["num_pages_in"] == 2 * n
    drv.close()
    check_system(system)


ADD_JOB = UserJob(
    "add_job",
    cuda_source=r"""
__device__ void add_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_atomic_add<unsigned long long>(L, a[0] + 8 * (lane % 4), lane + 1);
}
HMM_DEFINE_JOB(add_job, add_lane)
""",
    numpy_lane=lambda ctx, lanes, a: ctx.atomic_add(np.uint64(a[0]) + np.uint64(8) * (lanes % 4).astype(np.uint64),
                                                    (lanes + 1).astype(np.uint64)))


@pytest.mark.parametrize("remote", [False, True], ids=["migrate", "remote"])
def test_write_and_atomic_faults_on_untouched_memory(rig, remote):
    """A memset and atomic adds on pages nobody touched: migrated to zeroed device pages, or
    (preferring the CPU) demand-zero system pages mapped remotely, atomics granted on the link;
    either way the CPU reads what the device wrote."""
    system, proc = rig
    a = proc.mmap(8 * PAGE_SIZE, RW, ANON)
    drv = uvm.UvmDriver(system, proc, device_bytes=MB2, policy={"prefetch": "none"})
    if remote:
        drv.advise(a, 8 * PAGE_SIZE, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)
    drv.jobs.memset(a, 0x5A, 4 * PAGE_SIZE)
    assert (proc.read(a, 4 * PAGE_SIZE) == 0x5A).all()
    r = drv.jobs.run(ADD_JOB, 64, [a + 4 * PAGE_SIZE])
    assert r.faults >= 1 and drv.counters["num_atomic_faults"] >= 1
    lanes = np.arange(64)
    want = [int((lanes[lanes % 4 == k] + 1).sum()) for k in range(4)]
    assert proc.read(a + 4 * PAGE_SIZE, 32).view(np.uint64).tolist() == want
    c = drv.counters
    if remote:
        assert c["num_pages_in"] == 0 and c["num_map_remote"] == 5 and not entries(drv, a, 8)[1].any()
    else:
        assert c["num_map_remote"] == 0 and c["num_pages_in"] == 5      # (the CPU reads took them home)
    drv.close()
    check_system(system)


@pytest.mark.parametrize("remote", [False, True], ids=["migrate", "remote"])
def test_an_atomic_fault_is_serviced_in_one_pass(rig, remote):
    """One atomic fault on an untouched page: serviced once, and the replayed lanes' atomics land."""
    system, proc = rig
    a = proc.mmap(PAGE_SIZE, RW, ANON)
    drv = uvm.UvmDriver(system, proc, device_bytes=MB2, policy={"prefetch": "none"})
    if remote:
        drv.advise(a, PAGE_SIZE, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)
    r = drv.jobs.run(ADD_JOB, 64, [a])
    assert r.faults == 1 and len(r.rounds) == 2
    drv.close()


@pytest.mark.parametrize("remote", [False, True], ids=["migrate", "remote"])
def test_munmap_unmaps_the_device_and_a_job_there_is_efault(rig, remote):
    """The interval notifier invalidates the device page table on munmap; device pages of the
    range go back to the driver's memory; a job over the unmapped range is a fatal EFAULT."""
    system, proc = rig
    n = 16
    a, want = written(proc, n, seed=2)
    drv = uvm.UvmDriver(system, proc, device_bytes=MB2)
    if remote:
        drv.advise(a, n * PAGE_SIZE, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)
    assert drv.jobs.reduce_sum(a, n * PAGE_SIZE).value == want
    assert entries(drv, a, n)[0].all() and entries(drv, a, n)[1].all() != remote
    proc.munmap(a, n * PAGE_SIZE)
    assert not entries(drv, a, n)[0].any()
    s = drv.stats()
    assert s["device_free_bytes"] == s["device_bytes"]
    with pytest.raises(JobFault) as ei:
        drv.jobs.reduce_sum(a, n * PAGE_SIZE)
    assert ei.value.errno == errno.EFAULT and ei.value.address == a
    drv.close()
    check_system(system)
