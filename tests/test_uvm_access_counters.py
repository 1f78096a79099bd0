"""Access counters (drivers/uvm/access_counters.py) and the counter names (counters.py)."""
import numpy as np
import pytest

from hmmgpu.drivers.uvm import access_counters as ac
from hmmgpu.drivers.uvm import counters
from hmmgpu.drivers.uvm.access_counters import AccessCounterUnit, UvmAccessCounters
from hmmgpu.drivers.uvm.va_block import UVM_ID_CPU, UVM_PROT_READ_WRITE, VaBlocks, uvm_gpu_id

CPU, GPU = UVM_ID_CPU, uvm_gpu_id(0)
BLOCK = 5
BASE = BLOCK << 21


def test_defaults_are_nvidia_uvms():
    assert (ac.uvm_perf_access_counter_migration_enable, ac.uvm_perf_access_counter_batch_count,
            ac.uvm_perf_access_counter_threshold) == (-1, 256, 256)
    assert ac.UVM_ACCESS_COUNTER_GRANULARITY == 2 << 20
    assert UvmAccessCounters().knobs()["uvm_perf_access_counter_threshold"] == 256


def test_a_region_notifies_when_its_counter_reaches_the_threshold():
    u = AccessCounterUnit()
    # 255 remote reads spread over the first 1 MiB: no notification yet
    assert u.record(BASE + np.arange(255) * 4096) == 0 and u.pending() == 0
    # another region's accesses do not add to this one
    u.record([(BLOCK + 1) << 21] * 100)
    assert u.record([BASE + (20 << 16)]) == 1
    n = u.fetch()
    assert n.address.tolist() == [BASE] and n.counter_value.tolist() == [256]
    # the 64 KiB sub-regions touched: 0..15 (the first MiB) and 20
    assert int(n.sub_granularity[0]) == 0xFFFF | (1 << 20)
    # the counter starts over
    assert u.record(BASE + np.arange(255) * 4096) == 0
    assert u.record([BASE], counts=[1]) == 1


def test_counts_and_batches():
    u = AccessCounterUnit(threshold=10)
    regions = np.arange(600) << 21
    u.record(np.repeat(regions, 10))
    assert u.pending() == 600 and u.num_notifications == 600
    first = u.fetch(256)
    assert len(first) == 256 and (np.diff(first.address) > 0).all()
    assert len(u.fetch(256)) == 256 and len(u.fetch(256)) == 88 and len(u.fetch()) == 0
    u.record(regions[:3], counts=[4, 20, 9])
    assert u.pending() == 1
    with pytest.raises(ValueError, match="outside"):
        AccessCounterUnit(threshold=0)


def _blocks_with_cpu_pages_mapped_by_the_gpu():
    v = VaBlocks(ngpus=1)
    r = v.rows_of_blocks([BLOCK])
    m = np.ones((1, 512), bool)
    v.make_resident(r, m, CPU)
    v.map(r, m, GPU, UVM_PROT_READ_WRITE)        # remote mapping of system memory
    return v, r


def test_crossing_256_migrates_the_touched_region_when_enabled():
    v, r = _blocks_with_cpu_pages_mapped_by_the_gpu()
    u = AccessCounterUnit()
    u.record(BASE + (np.arange(256) % 32) * 4096 + (3 << 16))     # pages 48..79: sub-regions 3 and 4
    notes = u.fetch()
    pol = UvmAccessCounters(uvm_perf_access_counter_migration_enable=1)
    rows, masks = pol.on_notifications(notes, v, GPU)
    assert rows.tolist() == [r[0]]
    assert np.flatnonzero(masks[0]).tolist() == list(range(48, 80))
    assert pol.num_notifications == 1
    # once the pages are on the GPU a repeated notification asks for nothing
    v.make_resident(rows, masks, GPU, frames=np.arange(512)[None])
    assert pol.on_notifications(notes, v, GPU)[0].size == 0


def test_migrations_are_off_by_default_on_a_pcie_machine():
    v, r = _blocks_with_cpu_pages_mapped_by_the_gpu()
    u = AccessCounterUnit()
    u.record([BASE] * 256)
    notes = u.fetch()
    assert UvmAccessCounters().on_notifications(notes, v, GPU)[0].size == 0
    assert UvmAccessCounters(ats=True).on_notifications(notes, v, GPU)[0].size == 1
    assert UvmAccessCounters(ats=True, uvm_perf_access_counter_migration_enable=0).on_notifications(
        notes, v, GPU)[0].size == 0


def test_stale_notifications_are_dropped():
    v = VaBlocks(ngpus=1)
    r = v.rows_of_blocks([BLOCK])
    v.make_resident(r, np.ones((1, 512), bool), CPU)                # resident but not mapped by the GPU
    u = AccessCounterUnit()
    u.record([BASE] * 256 + [(BLOCK + 9) << 21] * 256)              # and one region with no block
    pol = UvmAccessCounters(uvm_perf_access_counter_migration_enable=1)
    assert pol.on_notifications(u.fetch(), v, GPU)[0].size == 0
    assert pol.num_notifications == 2


def test_several_notifications_of_one_block_merge():
    v, r = _blocks_with_cpu_pages_mapped_by_the_gpu()
    u = AccessCounterUnit(threshold=1)
    u.record([BASE + (1 << 16)])
    u.record([BASE + (9 << 16)])
    notes = u.fetch()
    assert len(notes) == 2
    rows, masks = UvmAccessCounters(uvm_perf_access_counter_migration_enable=1).on_notifications(notes, v, GPU)
    assert rows.tolist() == [r[0]] and np.flatnonzero(masks[0]).tolist() == list(range(16, 32)) + list(range(144, 160))


def test_counter_names():
    c = counters.new_counters()
    for name in ("num_read_faults", "num_write_faults", "num_duplicate_faults", "num_replays", "num_pages_in",
                 "num_pages_out", "num_evictions", "num_prefetched_pages", "num_throttle", "num_pin_local",
                 "num_pin_remote", "num_access_counter_notifications", "num_read_duplicates",
                 "num_read_duplicate_invalidates", "num_map_remote"):
        assert c[name] == 0
    counters.add(c, num_evictions=2, num_pages_evicted=1024)
    assert c["num_evictions"] == 2
    with pytest.raises(KeyError, match="num_evictionz"):
        counters.add(c, num_evictionz=1)
