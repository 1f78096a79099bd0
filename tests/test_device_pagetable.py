"""The device page table: command-buffer updates, walks, and the directory shadow."""
import numpy as np
import pytest

from hmmgpu.device import EmulatedDevice
from hmmgpu.device.pagetable import (PTE_ACCESSED, PTE_ATOMIC, PTE_DIRTY, PTE_VALID, PTE_WRITE,
                                     pte_pfn)

BASE_PFN = 1 << 20


def make_dev(backend, ram=256, frames=256, **kw):
    host = backend.host_arena(ram)
    return EmulatedDevice(backend, frames, BASE_PFN, host, **kw)


def test_map_lookup_scattered_across_tables(backend):
    dev = make_dev(backend)
    rng = np.random.default_rng(1)
    # vpns in different level-1, level-2 and leaf tables, RAM and device pfns, mixed flags
    vpns = np.unique(rng.integers(0, 1 << 36, size=3000))
    pfns = np.where(rng.random(vpns.size) < 0.5, rng.integers(0, 256, vpns.size),
                    BASE_PFN + rng.integers(0, 256, vpns.size))
    flags = rng.choice([0, PTE_WRITE, PTE_WRITE | PTE_ATOMIC], size=vpns.size)
    dev.pt.map(vpns, pfns, flags).wait()
    e = dev.pt.lookup(vpns)
    assert np.array_equal(pte_pfn(e), pfns)
    assert np.array_equal(e & np.uint64(0xFFF), (flags | PTE_VALID).astype(np.uint64))
    others = np.setdiff1d(rng.integers(0, 1 << 36, size=2000), vpns)
    assert not dev.pt.lookup(others).any()
    assert dev.pt.nr_nodes > 3000 // 512


def test_last_one_wins_and_run_coalescing(backend):
    dev = make_dev(backend)
    v0 = 0x7F0000000
    vpns = np.arange(v0, v0 + 100_000)
    pfns = np.arange(100_000) % 200
    before = dev.pt.stats["pt_commands"]
    dev.pt.map(vpns, pfns).wait()
    # runs of 200 consecutive pfns (pfns wrap every 200 pages) plus the table links
    cmds = dev.pt.stats["pt_commands"] - before
    links = dev.pt.stats["pt_links"]
    assert cmds - links == 500
    dev.pt.map(np.array([v0 + 5, v0 + 5]), np.array([7, 9])).wait()
    assert pte_pfn(dev.pt.lookup([v0 + 5]))[0] == 9
    assert np.array_equal(pte_pfn(dev.pt.lookup(vpns[:5])), pfns[:5])


def test_unmap_protect_set_bits(backend):
    dev = make_dev(backend)
    v = np.arange(1000, 1600)
    dev.pt.map(v, np.arange(600) % 256, PTE_WRITE | PTE_ATOMIC).wait()
    dev.pt.unmap(v[::3]).wait()
    e = dev.pt.lookup(v)
    assert not e[::3].any()
    assert ((e[1::3] & np.uint64(PTE_VALID)) != 0).all()
    dev.pt.protect(v).wait()                       # write-protect + revoke atomic
    e = dev.pt.lookup(v)
    assert not e[::3].any(), "protect must not create entries"
    assert ((e[1::3] & np.uint64(0xFFF)) == PTE_VALID).all()
    dev.pt.set_bits(v[1::3], PTE_WRITE).wait()
    e = dev.pt.lookup(v)
    assert ((e[1::3] & np.uint64(0xFFF)) == PTE_VALID | PTE_WRITE).all()
    assert not e[::3].any()
    # unmapping where no table was ever allocated is a no-op
    dev.pt.unmap(np.arange(1 << 30, (1 << 30) + 10)).wait()
    dev.pt.invalidate(v)
    assert not dev.pt.lookup(v).any()


def test_pool_grows(backend):
    dev = make_dev(backend, pt_initial_nodes=4)
    vpns = np.arange(64) * (1 << 18) + 3             # 64 level-2 tables, 64 leaf tables
    dev.pt.map(vpns, np.arange(64)).wait()
    assert dev.pt.capacity >= dev.pt.nr_nodes > 128
    assert np.array_equal(pte_pfn(dev.pt.lookup(vpns)), np.arange(64))


def test_rejects_foreign_pfns_and_addresses(backend):
    dev = make_dev(backend)
    with pytest.raises(ValueError, match="neither system RAM"):
        dev.pt.map([1], [300])
    with pytest.raises(ValueError, match="virtual address space"):
        dev.pt.map([1 << 36], [1])
    assert not dev.pt.lookup([1]).any()


def test_million_entries_per_call(backend):
    dev = make_dev(backend)
    n = 1 << 20
    rng = np.random.default_rng(3)
    vpns = 0x7F0000000 + np.arange(n)
    pfns = rng.integers(0, 256, n)                    # scattered: no run coalescing
    dev.pt.map(vpns, pfns).wait()
    sample = rng.integers(0, n, 5000)
    assert np.array_equal(pte_pfn(dev.pt.lookup(vpns[sample])), pfns[sample])
    dev.pt.unmap(vpns).wait()
    assert not dev.pt.lookup(vpns[sample]).any()


def test_accessed_dirty_set_by_walker(backend):
    from hmmgpu.device.testing import ToyDriver
    dev = make_dev(backend)
    drv = ToyDriver(dev, 64, migrate="none")
    a = drv.region(4)
    drv.map(drv.vpns(a, 4)).wait()
    dev.jobs.reduce_sum(a, 2 * 4096)
    dev.jobs.memset(a + 2 * 4096, 1, 4096)
    e = dev.pt.lookup(drv.vpns(a, 4)) & np.uint64(PTE_ACCESSED | PTE_DIRTY)
    assert e.tolist() == [PTE_ACCESSED, PTE_ACCESSED, PTE_ACCESSED | PTE_DIRTY, 0]
    dev.pt.protect(drv.vpns(a, 4), clear=PTE_ACCESSED | PTE_DIRTY).wait()
    assert not (dev.pt.lookup(drv.vpns(a, 4)) & np.uint64(PTE_ACCESSED | PTE_DIRTY)).any()


def test_command_semantics_against_a_model(backend):
    """Random map / unmap / protect / set_bits sequences against a dense NumPy model."""
    from hmmgpu.device.pagetable import PTE_FLAGS_MASK
    dev = make_dev(backend, pt_initial_nodes=4)
    rng = np.random.default_rng(17)
    # three clusters of vpns: shared leaf tables, neighbouring tables, a distant level-1 table
    universe = np.concatenate((np.arange(0, 1500), np.arange(600_000, 601_000),
                               np.arange((5 << 27) + 100, (5 << 27) + 900)))
    model = np.zeros(universe.size, np.uint64)
    for step in range(40):
        sel = np.flatnonzero(rng.random(universe.size) < rng.choice([0.01, 0.2, 0.7]))
        op = rng.integers(0, 4)
        if op == 0:
            pf = np.where(rng.random(sel.size) < 0.5, rng.integers(0, 256, sel.size),
                          BASE_PFN + rng.integers(0, 256, sel.size))
            if rng.random() < 0.5:          # runs of consecutive pfns, to exercise coalescing
                pf = rng.integers(0, 200) + np.arange(sel.size) % 50
            fl = rng.choice([0, PTE_WRITE, PTE_WRITE | PTE_ATOMIC], size=sel.size)
            dev.pt.map(universe[sel], pf, fl)
            model[sel] = (pf.astype(np.uint64) << np.uint64(12)) | (fl | PTE_VALID).astype(np.uint64)
        elif op == 1:
            dev.pt.unmap(universe[sel])
            model[sel] = 0
        else:
            bits = int(rng.choice([PTE_WRITE, PTE_ATOMIC, PTE_WRITE | PTE_ATOMIC]))
            valid = (model[sel] & np.uint64(PTE_VALID)) != 0
            if op == 2:
                dev.pt.protect(universe[sel], clear=bits)
                model[sel[valid]] &= ~np.uint64(bits)
            else:
                dev.pt.set_bits(universe[sel], bits)
                model[sel[valid]] |= np.uint64(bits)
        if step % 8 == 7:
            assert np.array_equal(dev.pt.lookup(universe), model), f"step {step}"
    dev.pt.flush().wait()
    got = dev.pt.lookup(universe)
    assert np.array_equal(got, model)
    assert ((got & np.uint64(PTE_FLAGS_MASK)) != 0).sum() == (model != 0).sum()


def test_range_updates_touch_only_existing_tables(backend):
    """invalidate_range / protect_range over huge ranges (a whole address space) cost one command
    per run of existing leaf tables, and change exactly the entries inside the range."""
    dev = make_dev(backend)
    vpns = np.concatenate((np.arange(100, 1500), np.arange(1 << 30, (1 << 30) + 10),
                           [(1 << 36) - 1]))
    pfns = np.arange(vpns.size) % 256
    dev.pt.map(vpns, pfns, PTE_WRITE).wait()
    before = dev.pt.stats["pt_commands"]
    dev.pt.protect_range(0, 1 << 40).wait()                    # clipped to the 36-bit space
    assert not (dev.pt.lookup(vpns) & np.uint64(PTE_WRITE)).any()
    assert dev.pt.stats["pt_commands"] - before == 3           # three runs of tables
    before = dev.pt.stats["pt_commands"]
    dev.pt.invalidate_range(1 << 20, 1 << 20)                  # no table there: no command
    assert dev.pt.stats["pt_commands"] == before
    dev.pt.invalidate_range(300, 1000)                         # [300, 1300)
    e = dev.pt.lookup(vpns)
    inside = (vpns >= 300) & (vpns < 1300)
    assert not e[inside].any() and (e[~inside] & np.uint64(PTE_VALID)).all()
    dev.pt.invalidate_range(0, 1 << 52)                        # ULONG_MAX-sized: no arange
    assert not dev.pt.lookup(vpns).any()
    dev.pt.map(vpns[:5], pfns[:5]).wait()                      # the tables are still there
    assert (dev.pt.lookup(vpns[:5]) & np.uint64(PTE_VALID)).all()


def test_contexts_have_their_own_page_tables(backend):
    dev = make_dev(backend)
    a, b = dev.create_context(), dev.create_context()
    assert dev.contexts == [a, b] and a.pt is not b.pt is not dev.pt
    v = np.arange(40, 60)
    a.pt.map(v, np.arange(20), PTE_WRITE).wait()
    b.pt.map(v, BASE_PFN + np.arange(20), 0).wait()
    assert np.array_equal(pte_pfn(a.pt.lookup(v)), np.arange(20))
    assert np.array_equal(pte_pfn(b.pt.lookup(v)), BASE_PFN + np.arange(20))
    assert not dev.pt.lookup(v).any()
    a.pt.invalidate_range(40, 10)
    assert not a.pt.lookup(v[:10]).any() and (b.pt.lookup(v) & np.uint64(PTE_VALID)).all()
    b.destroy()
    assert dev.contexts == [a] and not b.pt.lookup(v).any() and b.pt.nr_nodes == 1
    assert (a.pt.lookup(v[10:]) & np.uint64(PTE_VALID)).all()
