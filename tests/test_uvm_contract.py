"""The UVM-class driver as CONTRACT.md writes it, and only with the names it uses: what an outside
test written against that page does.  One small test per promise: the constructor and its
keywords, drv.jobs and drv.device(i).jobs, advise with uvm.SET_* / UNSET_* and a device index or
uvm.CPU, prefetch to a device or uvm.CPU, drv.policy with nvidia-uvm's knob names, drv.counters
as a dict, drv.modelled_time, oversubscription when device_bytes is below the working set,
replacement policy objects through policy=, close()."""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu.drivers import uvm

MB = 1 << 20
RW = hmmgpu.PROT_READ | hmmgpu.PROT_WRITE
ANON = hmmgpu.MAP_PRIVATE | hmmgpu.MAP_ANONYMOUS


@pytest.fixture
def proc_with_data():
    system = hmmgpu.System(backend="numpy", ram_bytes=96 * MB)
    proc = system.spawn()
    addr = proc.mmap(8 * MB, RW, ANON)
    data = np.arange(8 * MB // 4, dtype=np.uint32)
    proc.write(addr, data)
    return system, proc, addr, data


def test_the_constructor_and_the_job_api(proc_with_data):
    system, proc, addr, data = proc_with_data
    drv = uvm.UvmDriver(system, proc, device_bytes=64 << 20, ndevices=1, profile="h100", seed=0)
    assert drv.jobs.reduce_sum(addr, 8 * MB).value == int(data.sum(dtype=np.uint64))
    assert drv.device(0).jobs.reduce_sum(addr, MB).value == int(data[:MB // 4].sum(dtype=np.uint64))
    assert isinstance(drv.counters, dict) and drv.counters["num_pages_in"] == 8 * MB // hmmgpu.PAGE_SIZE
    assert drv.modelled_time > 0
    drv.close()
    assert np.array_equal(proc.read(addr, 8 * MB).view(np.uint32), data)


def test_the_whole_address_space_is_mirrored(proc_with_data):
    """No range to give: memory mapped after the driver was made is mirrored too."""
    system, proc, addr, data = proc_with_data
    drv = uvm.UvmDriver(system, proc, device_bytes=64 << 20)
    later = proc.mmap(2 * MB, RW, ANON)
    proc.write(later, np.full(2 * MB // 4, 3, np.uint32))
    assert drv.jobs.reduce_sum(later, 2 * MB).value == 3 * (2 * MB // 4)
    drv.close()


def test_oversubscription_below_the_working_set(proc_with_data):
    system, proc, addr, data = proc_with_data
    drv = uvm.UvmDriver(system, proc, device_bytes=4 * MB)
    for _ in range(2):                      # two sweeps in 2 MiB jobs: 8 MiB through 4 MiB
        total = sum(drv.jobs.reduce_sum(addr + k * 2 * MB, 2 * MB).value for k in range(4))
        assert total == int(data.sum(dtype=np.uint64))
    assert drv.counters["num_evictions"] > 0
    drv.close()
    assert np.array_equal(proc.read(addr, 8 * MB).view(np.uint32), data)


def test_advise_and_prefetch(proc_with_data):
    system, proc, addr, data = proc_with_data
    drv = uvm.UvmDriver(system, proc, device_bytes=64 << 20)
    assert drv.prefetch(addr, 2 * MB, device=0) == 2 * MB // hmmgpu.PAGE_SIZE
    assert drv.jobs.reduce_sum(addr, 2 * MB).faults == 0
    assert drv.prefetch(addr, 2 * MB, device=uvm.CPU) == 2 * MB // hmmgpu.PAGE_SIZE
    drv.advise(addr + 2 * MB, 2 * MB, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)
    drv.jobs.reduce_sum(addr + 2 * MB, 2 * MB)
    assert drv.counters["num_map_remote"] == 2 * MB // hmmgpu.PAGE_SIZE
    drv.advise(addr + 2 * MB, 2 * MB, uvm.UNSET_PREFERRED_LOCATION, device=uvm.CPU)
    drv.advise(addr + 4 * MB, 2 * MB, uvm.SET_ACCESSED_BY, device=0)
    assert drv.jobs.reduce_sum(addr + 4 * MB, 2 * MB).faults == 0
    drv.advise(addr + 4 * MB, 2 * MB, uvm.UNSET_ACCESSED_BY, device=0)
    drv.advise(addr + 6 * MB, 2 * MB, uvm.SET_READ_MOSTLY)
    drv.jobs.reduce_sum(addr + 6 * MB, 2 * MB)
    assert drv.counters["num_read_duplicates"] > 0
    drv.advise(addr + 6 * MB, 2 * MB, uvm.UNSET_READ_MOSTLY)
    for bad in (lambda: drv.advise(addr, 4096, "set_read_often"), lambda: drv.prefetch(addr, 4096, device=5),
                lambda: drv.prefetch(addr + 1, 4096)):
        with pytest.raises(OSError) as ei:
            bad()
        assert ei.value.errno == errno.EINVAL
    drv.close()
    assert np.array_equal(proc.read(addr, 8 * MB).view(np.uint32), data)


def test_policies_by_object_with_nvidia_uvm_knob_names(proc_with_data):
    system, proc, addr, data = proc_with_data
    mine = uvm.DensityPrefetcher(uvm_perf_prefetch_threshold=90)
    drv = uvm.UvmDriver(system, proc, device_bytes=64 << 20, policy={"prefetch": mine, "eviction": uvm.Fifo()})
    assert drv.policy["prefetch"] is mine and drv.policy["prefetch"].uvm_perf_prefetch_threshold == 90
    assert drv.policy["thrashing"].uvm_perf_thrashing_threshold == 3
    assert drv.policy["access_counters"].uvm_perf_access_counter_threshold == 256
    assert drv.jobs.reduce_sum(addr, MB).value == int(data[:MB // 4].sum(dtype=np.uint64))
    drv.close()
