"""MirrorGpu: range checks, close(), fatal faults named by their page, whole drains serviced in
passes with one page-table update each, migrate on fault into its own page table, atomics."""
import errno

import numpy as np
import pytest

from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE
from hmmgpu.device import JobFault, UserJob
from hmmgpu.drivers import dmirror
from hmmgpu.drivers.mirrorgpu import MirrorGpu

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


@pytest.fixture
def rig(mm_system_factory):
    system = mm_system_factory(ram_bytes=96 << 20)
    proc = system.spawn()
    dev = dmirror.DMirrorDevice(system, memory="private", chunk_pages=8192, max_chunks=1)
    return system, proc, dev


def written(proc, npages, seed=0):
    a = proc.mmap(npages * PAGE_SIZE, RW, ANON)
    data = np.random.default_rng(seed).integers(0, 1 << 32, npages * PAGE_SIZE // 4, dtype=np.uint64)
    data = data.astype(np.uint32)
    proc.write(a, data)
    return a, int(data.sum(dtype=np.uint64))


def test_the_mirrored_range_is_checked(rig):
    system, proc, dev = rig
    a = proc.mmap(4 * PAGE_SIZE, RW, ANON)
    for s, e, why in ((a + 8, a + PAGE_SIZE, "page-aligned"), (a, a + 100, "page-aligned"),
                      (a, a, "empty"), (a + PAGE_SIZE, a, "empty")):
        with pytest.raises(OSError, match=why) as ei:
            MirrorGpu(system, proc, dev, s, e)
        assert ei.value.errno == errno.EINVAL
    assert dev.device.contexts == []                  # nothing was opened on the way


def test_jobs_and_services_after_close_raise_ebadf(rig):
    system, proc, dev = rig
    a, want = written(proc, 4)
    gpu = MirrorGpu(system, proc, dev, a, a + 4 * PAGE_SIZE, name="g")
    assert gpu.jobs.reduce_sum(a, 4 * PAGE_SIZE).value == want
    gpu.close()
    gpu.close()                                       # idempotent
    for fn in (lambda: gpu.jobs.reduce_sum(a, PAGE_SIZE), lambda: gpu.fault_range(a, a + PAGE_SIZE, False),
               lambda: gpu.service(None)):
        with pytest.raises(OSError, match="closed") as ei:
            fn()
        assert ei.value.errno == errno.EBADF
    proc.munmap(a, 4 * PAGE_SIZE)                     # the notifier is gone: nothing calls back


def test_a_fatal_fault_names_the_page_that_failed(rig):
    """reduce_sum over 4 pages whose last is PROT_NONE names the last page, not the start; a
    hole is EFAULT at its page; a write to a read-only mapping is EPERM at its page."""
    system, proc, dev = rig
    a, _ = written(proc, 8)
    proc.mprotect(a + 3 * PAGE_SIZE, PAGE_SIZE, PROT_NONE)
    proc.mprotect(a + 6 * PAGE_SIZE, 2 * PAGE_SIZE, PROT_READ)
    gpu = MirrorGpu(system, proc, dev, a, a + 16 * PAGE_SIZE)
    with pytest.raises(JobFault) as ei:
        gpu.jobs.reduce_sum(a, 4 * PAGE_SIZE)
    assert ei.value.errno == errno.EFAULT and ei.value.address == a + 3 * PAGE_SIZE
    assert f"0x{a + 3 * PAGE_SIZE:x}" in str(ei.value)
    with pytest.raises(JobFault) as ei:
        gpu.jobs.reduce_sum(a + 4 * PAGE_SIZE, 12 * PAGE_SIZE)          # pages 8.. are no VMA
    assert ei.value.errno == errno.EFAULT and ei.value.address == a + 8 * PAGE_SIZE
    with pytest.raises(JobFault) as ei:
        gpu.jobs.memset(a + 4 * PAGE_SIZE, 1, 4 * PAGE_SIZE)
    assert ei.value.errno == errno.EPERM and ei.value.address == a + 6 * PAGE_SIZE
    assert (proc.read(a + 6 * PAGE_SIZE, 2 * PAGE_SIZE) != 1).any()      # nothing written there
    gpu.close()


def test_a_cold_job_is_serviced_in_passes_with_one_update_each(rig):
    """6,000 faulting pages: passes of 20 x 256 faults, each one driver call answered by one
    page-table command buffer (its directory links and its leaves); lanes launched stay 2n."""
    system, proc, dev = rig
    n = 6000
    a, want = written(proc, n)
    gpu = MirrorGpu(system, proc, dev, a, a + n * PAGE_SIZE)
    calls = []
    svc = gpu.service
    gpu.ctx.service = lambda f: (calls.append(len(f)), svc(f))[1]
    sub0 = gpu.pt.stats["pt_submissions"]
    r = gpu.jobs.reduce_sum(a, n * PAGE_SIZE)
    assert r.value == want and r.faults == n
    assert calls == [5120, 880] and r.rounds == [n, 5120, 880] and sum(r.rounds) == 2 * n
    assert gpu.pt.stats["pt_submissions"] - sub0 <= 2 * len(calls)
    assert gpu.remote_maps == n and gpu.serviced_pages == n
    assert gpu.jobs.reduce_sum(a, n * PAGE_SIZE).faults == 0          # all mapped now
    gpu.close()


def test_sparse_faults_fault_in_only_their_pages(rig):
    """Faults 3 pages apart in untouched memory: one hmm_range_fault over the run asks for the
    faulted pages only, so the CPU allocates nothing for the pages in between."""
    system, proc, dev = rig
    a = proc.mmap(64 * PAGE_SIZE, RW, ANON)
    gpu = MirrorGpu(system, proc, dev, a, a + 64 * PAGE_SIZE)
    vpns = (a >> 12) + np.arange(0, 64, 3)
    from hmmgpu.device.faults import ACCESS_WRITE, FaultBatch
    f = FaultBatch(vpns.astype(np.uint64) << np.uint64(12), np.full(vpns.size, ACCESS_WRITE),
                   np.arange(vpns.size), np.zeros(vpns.size))
    before = proc.rss["anon"]
    assert gpu.service(f) is None
    assert proc.rss["anon"] - before == vpns.size
    ent = gpu.pt.lookup((a >> 12) + np.arange(64))
    assert np.flatnonzero(ent).tolist() == list(range(0, 64, 3))
    gpu.close()


def test_migrate_on_fault_maps_into_its_own_table(rig):
    """The faulted 2 MiB blocks migrate with MirrorGpu's own steps and are mapped local in its
    page table -- not in a dmirror open's; a shared mapping cannot migrate and maps remote; a
    CPU access brings pages back and the next job faults them in again."""
    system, proc, dev = rig
    n = 700
    a, want = written(proc, n)
    sh = proc.mmap(8 * PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    proc.write(sh, np.full(8 * PAGE_SIZE, 3, np.uint8))
    probe = dev.open(proc)                            # a dmirror open on the same mm
    lo, hi = min(a, sh), max(a + n * PAGE_SIZE, sh + 8 * PAGE_SIZE)
    gpu = MirrorGpu(system, proc, dev, lo, hi, migrate_on_fault=True)
    r = gpu.jobs.reduce_sum(a, n * PAGE_SIZE)
    assert r.value == want
    assert gpu.migrated_pages == n and gpu.local_maps == n and gpu.remote_maps == 0
    snap = probe.snapshot(a, n).data
    assert ((snap & 0xF0) == dmirror.PROT_DEV_PRIVATE_LOCAL).all()
    assert not probe.pt.lookup((a >> 12) + np.arange(n)).any()           # nothing mapped there
    ent = gpu.pt.lookup((a >> 12) + np.arange(n))
    assert dev.device.owns(ent >> np.uint64(12)).all()
    assert gpu.jobs.reduce_sum(sh, 8 * PAGE_SIZE).value == 8 * PAGE_SIZE // 4 * 0x03030303
    assert gpu.remote_maps == 8
    # the CPU reads it back: the device entries go, and the next job faults them in again
    back = proc.read(a, n * PAGE_SIZE).view(np.uint32)
    assert int(back.sum(dtype=np.uint64)) == want
    assert not gpu.pt.lookup((a >> 12) + np.arange(n)).any()
    r = gpu.jobs.reduce_sum(a, n * PAGE_SIZE)
    assert r.value == want and r.faults == n
    gpu.close()
    probe.close()


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


def test_write_and_atomic_faults_on_untouched_memory(rig):
    system, proc, dev = rig
    a = proc.mmap(8 * PAGE_SIZE, RW, ANON)
    gpu = MirrorGpu(system, proc, dev, a, a + 8 * PAGE_SIZE)
    gpu.jobs.memset(a, 0x5A, 4 * PAGE_SIZE)
    assert (proc.read(a, 4 * PAGE_SIZE) == 0x5A).all()
    r = gpu.jobs.run(ADD_JOB, 64, [a + 4 * PAGE_SIZE])
    assert r.faults == 1 and gpu.counters["num_atomic_faults"] >= 1
    got = proc.read(a + 4 * PAGE_SIZE, 32).view(np.uint64)
    lanes = np.arange(64)
    assert got.tolist() == [int((lanes[lanes % 4 == k] + 1).sum()) for k in range(4)]
    gpu.close()


def test_pages_in_another_devices_coherent_memory_move_home_first(rig):
    """A page in another device's coherent memory is not addressable by this device: the
    service moves it to system memory and maps it remotely, as dmirror does."""
    system, proc, dev = rig
    other = dmirror.DMirrorDevice(system, memory="coherent", chunk_pages=64, max_chunks=1)
    a, want = written(proc, 16)
    m = other.open(proc)
    assert m.migrate_to_dev(a, 16).cpages == 16
    gpu = MirrorGpu(system, proc, dev, a, a + 16 * PAGE_SIZE)
    assert gpu.jobs.reduce_sum(a, 16 * PAGE_SIZE).value == want
    ent = gpu.pt.lookup((a >> 12) + np.arange(16)) >> np.uint64(12)
    assert (ent < system.phys.nr_ram).all() and gpu.remote_maps == 16
    gpu.close()
    m.close()
