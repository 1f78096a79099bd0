"""Accesses no driver can service: misaligned ones, and page-table entries pointing outside memory.

On a GPU either would be a sticky CUDA error that kills the context for the whole process; the
device must instead record a fatal fault, and the job is cancelled with EFAULT naming the
address -- identically on both backends (the NumPy twin used to round a misaligned address
down silently).  The device stays usable afterwards.
"""
import errno

import numpy as np
import pytest

from hmmgpu.device import EmulatedDevice, JobFault, UserJob
from hmmgpu.device.pagetable import PT_OP_MAP, PTE_VALID, PTE_WRITE, make_commands
from hmmgpu.device.testing import ToyDriver

BASE_PFN = 1 << 20
PAGE = 4096

# lane i loads a u64 at a[0] + a[1] * i and stores it at a[2] + 8 * i
COPY64_JOB = UserJob(
    "copy64_job",
    cuda_source=r"""
__device__ void copy64_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 v = hmm_load<hmm_u64>(L, a[0] + a[1] * lane);
    hmm_store<hmm_u64>(L, a[2] + 8 * lane, v);
}
HMM_DEFINE_JOB(copy64_job, copy64_lane)
""",
    numpy_lane=lambda ctx, lanes, a: ctx.store(
        np.uint64(a[2]) + np.uint64(8) * lanes.astype(np.uint64),
        ctx.load(np.uint64(a[0]) + np.uint64(a[1]) * lanes.astype(np.uint64), np.uint64)))


def setup(backend):
    host = backend.host_arena(64)
    dev = EmulatedDevice(backend, 64, BASE_PFN, host)
    drv = ToyDriver(dev, 256, migrate="none")
    dev.service = drv.service
    return dev, drv


def test_misaligned_load_is_a_fatal_fault_and_nothing_is_stored(backend):
    dev, drv = setup(backend)
    src = drv.region(1, np.arange(PAGE // 8, dtype=np.uint64).view(np.uint8))
    dst = drv.region(1, np.zeros(PAGE, np.uint8))
    # lanes 0..7 read 12 bytes apart: lanes 1, 3, 5, 7 are 4 bytes off an 8-byte boundary
    with pytest.raises(JobFault) as ei:
        dev.jobs.run(COPY64_JOB, 8, [src, 12, dst])
    e = ei.value
    assert e.errno == errno.EFAULT
    assert e.address == src + 12 and f"0x{src + 12:x}" in str(e)
    assert "misaligned 8-byte" in str(e) and e.lane == 1
    assert dev.counters["num_fatal_faults"] == 4
    # the misaligned lanes stopped in the probe pass: they stored nothing
    out = drv.data(dst, 1).view(np.uint64)
    assert (out[1:8:2] == 0).all()
    # the device survives: an aligned run of the same job works and the buffer is empty
    dev.jobs.run(COPY64_JOB, 8, [src, 16, dst])
    assert drv.data(dst, 1).view(np.uint64)[:8].tolist() == list(range(0, 16, 2))


def test_misaligned_list_node_cancels_the_chase(backend):
    dev, drv = setup(backend)
    mem = np.zeros(PAGE // 8, np.uint64)
    base = drv.region(1, None)
    mem[0], mem[1] = base + 32, 5               # node 0 -> node at +32
    mem[4], mem[5] = base + 68, 7               # node at +32 -> a node 4 bytes off
    dev.write_pages(drv.backing[drv.vpns(base, 1) - drv.vpn0], mem.view(np.uint8))
    with pytest.raises(JobFault, match=f"misaligned 8-byte access.*|0x{base + 68:x}") as ei:
        dev.jobs.list_chase(np.array([base], np.uint64))
    assert ei.value.address == base + 68 and ei.value.errno == errno.EFAULT
    # an aligned list on the same device still walks
    mem[4] = 0
    dev.write_pages(drv.backing[drv.vpns(base, 1) - drv.vpn0], mem.view(np.uint8))
    sums, steps = dev.jobs.list_chase(np.array([base], np.uint64)).value
    assert sums.tolist() == [12] and steps.tolist() == [2]


def _wild_entry(dev, vpn):
    """Point ``vpn`` at a pfn past system RAM and device memory, as a corrupted table would
    (DevicePageTable.map refuses such a pfn, so the command goes to the hardware directly)."""
    dev.pt.map(np.array([vpn]), np.array([1]), PTE_WRITE).wait()     # builds the tables
    wild = BASE_PFN + dev.nframes + 5
    cmds = make_commands(PT_OP_MAP, [vpn], [1], [(wild << 12) | PTE_VALID | PTE_WRITE])
    with dev.lock:
        dev.pt.hw.execute(dev.pt.nodes, cmds)
    dev.pt.flush().wait()


def test_entry_outside_memory_is_a_fatal_fault(backend):
    dev, drv = setup(backend)
    a = drv.region(2, np.full(2 * PAGE, 7, np.uint8))
    drv.map(drv.vpns(a, 2)).wait()
    _wild_entry(dev, (a >> 12) + 1)
    with pytest.raises(JobFault, match="outside system RAM") as ei:
        dev.jobs.memset(a, 1, 2 * PAGE)                 # bulk job: a warp per lane
    assert ei.value.address == a + PAGE and ei.value.errno == errno.EFAULT
    data = drv.data(a, 2)
    assert (data[:PAGE] == 1).all() and (data[PAGE:] == 7).all()   # lane 0 ran; lane 1 wrote nothing
    with pytest.raises(JobFault, match="outside system RAM") as ei:
        dev.jobs.run(COPY64_JOB, 1, [a + PAGE + 8, 0, a])  # lane job: hmm_xlate
    assert ei.value.address == a + PAGE + 8
    assert dev.counters["num_fatal_faults"] == 2
    dev.jobs.memset(a, 3, PAGE)                          # the device is still usable
    assert (drv.data(a, 1) == 3).all()
