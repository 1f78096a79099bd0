"""DriverBug: each check catches a bug planted in docs/drivers.md's driver, at the call that
broke the rule, and stays quiet for the driver as written (tests/test_docs.py runs that)."""
import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE, DriverBug
from hmmgpu.hmm import debug

from test_docs import python_blocks

N = 32


def driver_class(replace=None):
    """The guide's TinyDriver, with ``replace`` = (line as written, planted bug) applied."""
    code = python_blocks("drivers.md")[0]
    if replace is not None:
        old, new = replace
        assert old in code, f"the guide's driver no longer has {old!r}"
        code = code.replace(old, new)
    ns = {"__name__": "__planted__"}
    exec(compile(code, "planted driver", "exec"), ns)
    return ns["TinyDriver"]


@pytest.fixture
def world():
    system = hmmgpu.System(backend="numpy", ram_bytes=32 << 20)
    proc = system.spawn()
    addr = proc.mmap(N * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    data = np.arange(N * PAGE_SIZE // 4, dtype=np.uint32)
    proc.write(addr, data)
    return system, proc, addr, data


def test_destination_pages_not_locked(world):
    system, proc, addr, data = world
    Driver = driver_class(("        hmm.zone_device_page_init(self.system, pfns)\n",
                           "        self.system.phys.pages.refcount[pfns] = 1      # planted: not locked\n"))
    drv = Driver(system, proc, addr, addr + N * PAGE_SIZE)
    with pytest.raises(DriverBug, match=r"migrate_vma_pages: destination page pfn 0x[0-9a-f]+ \(entry 0 of "
                                        r"\[0x[0-9a-f]+, 0x[0-9a-f]+\)\) is not locked"):
        drv.migrate(addr, addr + N * PAGE_SIZE)
    # the driver's finally: migrate_vma_finalize ran; nothing moved, the data is intact
    assert (proc.read(addr, N * PAGE_SIZE).view(np.uint32) == data).all()


def test_destination_outside_the_drivers_pgmap(world):
    system, proc, addr, data = world
    # planted: args.dst names pages away from the ones the driver allocated and copied into
    Driver = driver_class(("                args.dst[sel] = hmm.migrate_pfn(dst) | (args.src[sel] & WRITE)\n",
                           "                args.dst[sel] = hmm.migrate_pfn(dst + self.skew) | (args.src[sel] & WRITE)\n"))
    other = Driver(system, proc.fork(), addr, addr + N * PAGE_SIZE)      # another device's memory
    drv = Driver(system, proc, addr, addr + N * PAGE_SIZE)
    drv.skew = other.pgmap.pfn_first - drv.pgmap.pfn_first
    with pytest.raises(DriverBug, match=r"is in DevPagemap\(private, .*not in a dev_pagemap of this "
                                        r"migration's pgmap_owner"):
        drv.migrate(addr, addr + N * PAGE_SIZE)
    drv.skew = 1 << 30
    with pytest.raises(DriverBug, match="is not memory of this machine"):
        drv.migrate(addr, addr + N * PAGE_SIZE)
    assert (proc.read(addr, N * PAGE_SIZE).view(np.uint32) == data).all()


def test_device_mapping_without_the_sequence_check(world):
    system, proc, addr, data = world
    Driver = driver_class(("                if hmm.mmu_interval_read_retry(self.mni, rng.notifier_seq):\n"
                           "                    continue\n", ""))
    drv = Driver(system, proc, addr, addr + N * PAGE_SIZE)
    with pytest.raises(DriverBug, match=r"device mapping at 0x[0-9a-f]+ installed without the notifier "
                                        r"sequence check: mmu_interval_read_retry\(\) was not called"):
        drv.device.jobs.reduce_sum(addr, N * PAGE_SIZE)
    # as written, the same job maps everything
    drv = driver_class()(system, proc, addr, addr + N * PAGE_SIZE)
    assert drv.device.jobs.reduce_sum(addr, N * PAGE_SIZE).value == int(data.sum(dtype=np.uint64))


def test_a_map_after_an_invalidation_without_the_lock(world):
    """read_retry said yes, then an invalidation slipped in before the map (the driver dropped
    its lock in between): the check sees the sequence moved."""
    system, proc, addr, data = world
    Driver = driver_class()
    drv = Driver(system, proc, addr, addr + N * PAGE_SIZE)
    from hmmgpu import hmm
    rng = hmm.HmmRange(notifier=drv.mni, start=addr, end=addr + PAGE_SIZE, default_flags=hmm.HMM_PFN_REQ_FAULT)
    rng.notifier_seq = hmm.mmu_interval_read_begin(drv.mni)
    with proc.mm.mmap_lock.read():
        assert hmm.hmm_range_fault(rng) == 0
    assert not hmm.mmu_interval_read_retry(drv.mni, rng.notifier_seq)
    proc.mprotect(addr + PAGE_SIZE, PAGE_SIZE, PROT_READ)       # an invalidation of the range
    with pytest.raises(DriverBug, match="an invalidation ran after mmu_interval_read_retry"):
        drv.device.pt.map([addr // PAGE_SIZE], hmm.hmm_pfn_to_pfn(rng.hmm_pfns))


def test_missing_finalize(world):
    system, proc, addr, data = world
    Driver = driver_class(("                hmm.migrate_vma_finalize(args)\n        return int(moved.size)\n",
                           "                pass                       # planted: no finalize\n"
                           "        return int(moved.size)\n"))
    drv = Driver(system, proc, addr, addr + N * PAGE_SIZE)
    half = addr + (N // 2) * PAGE_SIZE
    assert drv.migrate(addr, half) == N // 2
    # another range is fine: a driver may run several migrations before finalizing them all
    assert drv.migrate(half, half + 4 * PAGE_SIZE) == 4
    with pytest.raises(DriverBug, match=r"migrate_vma_setup of \[0x[0-9a-f]+, 0x[0-9a-f]+\): the migration of "
                                        r"\[0x[0-9a-f]+, 0x[0-9a-f]+\) has had migrate_vma_pages but no "
                                        r"migrate_vma_finalize"):
        drv.migrate(addr, addr + N * PAGE_SIZE)
    from hmmgpu import hmm
    rng = hmm.HmmRange(notifier=drv.mni, start=half - PAGE_SIZE, end=half + PAGE_SIZE,
                       default_flags=hmm.HMM_PFN_REQ_FAULT)
    rng.notifier_seq = hmm.mmu_interval_read_begin(drv.mni)
    with proc.mm.mmap_lock.read(), pytest.raises(DriverBug, match="hmm_range_fault of .* has had "
                                                                  "migrate_vma_pages but no"):
        hmm.hmm_range_fault(rng)
    debug._pending.migrations.clear()             # the test's own thread goes on cleanly


def test_setup_again_without_finalize(world):
    system, proc, addr, data = world
    from hmmgpu import hmm
    vma = proc.mm.find_vma(addr)
    args = hmm.MigrateVma(vma, addr, addr + PAGE_SIZE, flags=hmm.MIGRATE_VMA_SELECT_SYSTEM, pgmap_owner=object())
    with proc.mm.mmap_lock.read():
        assert hmm.migrate_vma_setup(args) == 0 and args.cpages == 1
        with pytest.raises(DriverBug, match="set up again before migrate_vma_finalize"):
            hmm.migrate_vma_setup(args)
        hmm.migrate_vma_finalize(args)
        assert hmm.migrate_vma_setup(args) == 0            # finalized: a new migration is fine
        hmm.migrate_vma_finalize(args)


def test_zone_device_page_init_of_a_used_page(world):
    system, proc, addr, data = world
    drv = driver_class()(system, proc, addr, addr + N * PAGE_SIZE)
    pfns = drv.alloc(2)
    from hmmgpu import hmm
    with pytest.raises(DriverBug, match="handed out while still referenced"):
        hmm.zone_device_page_init(system, pfns)
    with pytest.raises(DriverBug, match="is not device memory"):
        hmm.zone_device_page_init(system, np.array([5]))


def test_checks_can_be_turned_off(world, monkeypatch):
    system, proc, addr, data = world
    monkeypatch.setattr(debug, "enabled", False)
    Driver = driver_class(("                if hmm.mmu_interval_read_retry(self.mni, rng.notifier_seq):\n"
                           "                    continue\n", ""))
    drv = Driver(system, proc, addr, addr + N * PAGE_SIZE)
    assert drv.device.jobs.reduce_sum(addr, N * PAGE_SIZE).value == int(data.sum(dtype=np.uint64))
