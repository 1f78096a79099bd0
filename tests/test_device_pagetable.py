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


# -- 2 MiB leaves ----------------------------------------------------------------------------------
HUGE_VA = 0x7F0000000000 >> 12           # a 1 GiB-aligned vpn: 2 MiB-aligned heads below


def huge_dev(backend, **kw):
    return make_dev(backend, ram=4096, frames=2048, **kw)


def test_a_2mib_folio_is_one_command_and_one_entry(backend):
    from hmmgpu.device.pagetable import PTE_HUGE
    dev = huge_dev(backend)
    pt = dev.pt
    pt.map([HUGE_VA + 5 * 512], [1]).wait()                  # the directories above exist now
    nodes, before = pt.nr_nodes, dict(pt.stats)
    pt.map_huge([HUGE_VA], [BASE_PFN + 512], PTE_WRITE).wait()
    d = {k: pt.stats[k] - before[k] for k in before}
    assert (d["pt_commands"], d["pt_entries_updated"], d["pt_submissions"], d["pt_huge_maps"]) == (1, 1, 1, 1)
    assert pt.nr_nodes == nodes                                # no leaf table
    e = pt.lookup(HUGE_VA + np.arange(513))
    assert np.array_equal(pte_pfn(e[:512]), BASE_PFN + 512 + np.arange(512))
    assert ((e[:512] & np.uint64(0xFFF)) == PTE_VALID | PTE_WRITE | PTE_HUGE).all() and e[512] == 0
    # four folios consecutive in address and frames: one command, four entries
    before = dict(pt.stats)
    pt.map_huge(HUGE_VA + 512 * np.arange(8, 12), 1024 + 512 * np.arange(4), 0).wait()
    assert (pt.stats["pt_commands"] - before["pt_commands"], pt.stats["pt_entries_updated"]
            - before["pt_entries_updated"]) == (1, 4)
    assert np.array_equal(pte_pfn(pt.lookup(HUGE_VA + 8 * 512 + np.arange(2048))), 1024 + np.arange(2048))
    # a fresh 1 GiB range: the directories are linked first, still no leaf table
    far = HUGE_VA + (7 << 18)
    pt.map_huge([far], [0]).wait()
    assert pt.nr_nodes == nodes + 1 and np.array_equal(pte_pfn(pt.lookup(far + np.arange(512))), np.arange(512))


def test_huge_leaf_checks_change_nothing(backend):
    dev = huge_dev(backend)
    pt = dev.pt
    before = dict(pt.stats)
    bad = [([HUGE_VA + 8], [512], "not the first page of an aligned 2 MiB range"),
           ([HUGE_VA], [520], r"pfn 0x208 \(for vpn 0x7f0000000\) does not start 512 aligned"),
           ([HUGE_VA, HUGE_VA + 512], [3584, 4096], "pfn 0x1000"),              # past the end of RAM
           ([HUGE_VA], [BASE_PFN + 1536 + 512], "this device's memory"),      # past the device's frames
           ([HUGE_VA], [BASE_PFN - 512], "does not start 512 aligned")]       # neither RAM nor device
    for v, p, msg in bad:
        with pytest.raises(ValueError, match=msg):
            pt.map_huge(v, p)
    with pytest.raises(ValueError, match="virtual address space"):
        pt.map_huge([1 << 36], [0])
    with pytest.raises(ValueError, match="2 vpns but 1 pfns"):
        pt.map_huge([0, 512], [0])
    assert pt.stats == before and not pt.lookup(HUGE_VA + np.arange(1024)).any()


def test_huge_leaf_replaces_a_leaf_table_which_is_wiped_and_reused(backend):
    from hmmgpu.device.pagetable import PTE_HUGE
    dev = huge_dev(backend)
    pt = dev.pt
    pt.map(HUGE_VA + np.arange(0, 512, 3), np.arange(171), PTE_WRITE).wait()
    nodes = pt.nr_nodes
    pt.map_huge([HUGE_VA], [BASE_PFN], PTE_WRITE | PTE_ATOMIC).wait()
    e = pt.lookup(HUGE_VA + np.arange(512))
    assert np.array_equal(pte_pfn(e), BASE_PFN + np.arange(512)) and (e & np.uint64(PTE_HUGE)).all()
    # the replaced table is the next one a 4 KiB map needs: no growth, and nothing stale in it
    other = HUGE_VA + 3 * 512
    pt.map([other + 9], [77]).wait()
    assert pt.nr_nodes == nodes
    e = pt.lookup(other + np.arange(512))
    assert np.flatnonzero(e).tolist() == [9] and pte_pfn(e[9]) == 77
    assert np.array_equal(pte_pfn(pt.lookup(HUGE_VA + np.arange(512))), BASE_PFN + np.arange(512))


def test_partial_updates_split_the_leaf_first(backend):
    """unmap / protect / set_bits / map / invalidate_range over part of a 2 MiB leaf: the device
    copies it into a leaf table (flags, A/D bits and consecutive pfns), then acts on the part."""
    from hmmgpu.device.pagetable import PTE_HUGE
    from hmmgpu.device.testing import ToyDriver
    dev = huge_dev(backend)
    drv = ToyDriver(dev, 4096, migrate="none")
    pt = dev.pt
    heads = drv.vpn0 + 512 * np.arange(6)
    pt.map_huge(heads, 512 * np.arange(1, 7), PTE_WRITE | PTE_ATOMIC).wait()
    dev.jobs.memset(drv.base + 4096 * 512, 1, 4096)           # leaf 1: ACCESSED | DIRTY
    dev.jobs.reduce_sum(drv.base + 4096 * 1024, 4096)         # leaf 2: ACCESSED
    full = PTE_VALID | PTE_WRITE | PTE_ATOMIC
    ops = [lambda: pt.unmap([heads[0] + 7]),
           lambda: pt.protect(heads[1] + np.arange(100, 300)),
           lambda: pt.set_bits(heads[2] + np.arange(1), PTE_DIRTY),
           lambda: pt.map([heads[3] + 511], [BASE_PFN + 3]),
           lambda: pt.invalidate_range(heads[4] + 256, 512)]  # the second half of 4, the first of 5
    splits = pt.stats["pt_splits"]
    for op in ops:
        op()
    assert pt.stats["pt_splits"] - splits == 6
    e = pt.lookup(heads[0] + np.arange(6 * 512))
    assert not (e & np.uint64(PTE_HUGE)).any()
    pf, fl = pte_pfn(e).reshape(6, 512), (e & np.uint64(0xFFF)).reshape(6, 512)
    i = np.arange(512)
    want_pf = 512 * np.arange(1, 7)[:, None] + i
    want_pf[0, 7] = 0
    want_pf[3, 511] = BASE_PFN + 3
    want_pf[4, 256:] = want_pf[5, :256] = 0
    assert np.array_equal(pf, want_pf)
    want_fl = np.full((6, 512), full)
    want_fl[0, 7] = 0
    want_fl[1] |= PTE_ACCESSED | PTE_DIRTY
    want_fl[1, 100:300] = PTE_VALID | PTE_ACCESSED | PTE_DIRTY
    want_fl[2] |= PTE_ACCESSED
    want_fl[2, 0] |= PTE_DIRTY
    want_fl[3, 511] = PTE_VALID | PTE_WRITE
    want_fl[4, 256:] = want_fl[5, :256] = 0
    assert np.array_equal(fl, want_fl)


def test_whole_leaf_updates_act_on_the_one_entry(backend):
    from hmmgpu.device.pagetable import PTE_HUGE
    dev = huge_dev(backend)
    pt = dev.pt
    heads = HUGE_VA + 512 * np.arange(4)
    pt.map(HUGE_VA + 512 * 4 + np.arange(10), np.arange(10)).wait()     # a 4 KiB table beside them
    pt.map_huge(heads, 512 * np.arange(4), PTE_WRITE | PTE_ATOMIC).wait()
    v = HUGE_VA + np.arange(4 * 512)
    before = dict(pt.stats)
    pt.protect(v, clear=PTE_ATOMIC).wait()                              # four leaves, four entries
    pt.set_bits(v[:512], PTE_DIRTY).wait()
    assert pt.stats["pt_entries_updated"] - before["pt_entries_updated"] == 5
    assert pt.stats["pt_splits"] == before["pt_splits"]
    e = pt.lookup(v)
    assert (e & np.uint64(PTE_HUGE)).all() and not (e & np.uint64(PTE_ATOMIC)).any()
    assert ((e[:512] & np.uint64(PTE_DIRTY)) != 0).all() and not (e[512:] & np.uint64(PTE_DIRTY)).any()
    before = dict(pt.stats)
    pt.protect_range(HUGE_VA, 4 * 512 + 10).wait()                      # 4 entries + the table's run
    assert pt.stats["pt_commands"] - before["pt_commands"] == 5
    assert not (pt.lookup(np.concatenate((v, HUGE_VA + 2048 + np.arange(10)))) & np.uint64(PTE_WRITE)).any()
    pt.unmap(v[512:1024]).wait()                                        # leaf 1 whole
    pt.invalidate_range(HUGE_VA + 1024, 1 << 20)                        # leaves 2, 3 and the table
    assert pt.stats["pt_splits"] == before["pt_splits"]
    e = pt.lookup(v)
    assert (e[:512] & np.uint64(PTE_HUGE)).all() and not e[512:].any()
    assert not pt.lookup(HUGE_VA + 2048 + np.arange(10)).any()
    # an unmapped leaf leaves no table: a 4 KiB map there allocates one, with no split
    nodes = pt.nr_nodes
    pt.map([v[600]], [3]).wait()
    assert pt.nr_nodes == nodes + 1 and pt.stats["pt_splits"] == before["pt_splits"]
    assert np.flatnonzero(pt.lookup(v[512:1024])).tolist() == [88]


def test_huge_leaves_against_a_model(backend):
    """Random map / map_huge / unmap / protect / set_bits / range updates over 2 MiB regions,
    against a dense model of what lookup must answer (a leaf's pages carry PTE_HUGE until an
    update covering it in part splits it)."""
    _huge_model_run(backend)


def test_huge_model_through_the_vectorised_executor(monkeypatch):
    """The same on the NumPy executor with its Python-integer path for small buffers turned off."""
    import hmmgpu.fallback.pagetable as fp
    from hmmgpu.device.backend import get_backend
    monkeypatch.setattr(fp, "_FEW", 0)
    _huge_model_run(get_backend("numpy"))


def _huge_model_run(backend):
    from hmmgpu.device.pagetable import PTE_HUGE
    dev = huge_dev(backend, pt_initial_nodes=4)
    pt = dev.pt
    rng = np.random.default_rng(29)
    # six 2 MiB regions: four side by side, two in another 1 GiB range
    regions = np.concatenate((HUGE_VA + 512 * np.arange(4), HUGE_VA + (3 << 18) + 512 * np.arange(2)))
    universe = (regions[:, None] + np.arange(512)).reshape(-1)
    model = np.zeros(universe.size, np.uint64).reshape(6, 512)
    huge = np.zeros(6, bool)
    u64 = np.uint64

    def split_where(touched):                     # regions an update covers only in part
        t = touched.reshape(6, 512)
        part = huge & t.any(axis=1) & ~t.all(axis=1)
        model[part] &= ~u64(PTE_HUGE)
        huge[part] = False
        return t

    for step in range(60):
        op = rng.integers(0, 6)
        sel = rng.random(universe.size) < rng.choice([0.002, 0.05, 0.5, 1.0])
        if op == 0:                               # map_huge of some regions
            r = np.flatnonzero(rng.random(6) < 0.5)
            pf = np.where(rng.random(r.size) < 0.5, rng.integers(0, 8, r.size) * 512,
                          BASE_PFN + rng.integers(0, 4, r.size) * 512)
            fl = rng.choice([0, PTE_WRITE, PTE_WRITE | PTE_ATOMIC], size=r.size)
            pt.map_huge(regions[r], pf, fl)
            model[r] = ((pf[:, None] + np.arange(512)).astype(u64) << u64(12)) | \
                (fl | PTE_VALID | PTE_HUGE).astype(u64)[:, None]
            huge[r] = True
        elif op == 1:                             # 4 KiB map
            v = np.flatnonzero(sel)
            pf = rng.integers(0, 4096, v.size)
            pt.map(universe[v], pf, PTE_WRITE)
            hit = np.unique(v // 512)                 # a 4 KiB map splits any leaf it touches
            hit = hit[huge[hit]]
            model[hit] &= ~u64(PTE_HUGE)
            huge[hit] = False
            model.reshape(-1)[v] = (pf.astype(u64) << u64(12)) | u64(PTE_VALID | PTE_WRITE)
        elif op in (2, 3, 4):                     # unmap / protect / set_bits of a vpn set
            t = split_where(sel)
            bits = int(rng.choice([PTE_WRITE, PTE_ATOMIC, PTE_WRITE | PTE_ATOMIC]))
            flat = model.reshape(-1)
            valid = (flat & u64(PTE_VALID)) != 0
            if op == 2:
                pt.unmap(universe[sel])
                flat[sel] = 0
                huge[t.all(axis=1)] = False
            elif op == 3:
                pt.protect(universe[sel], clear=bits)
                flat[sel & valid] &= ~u64(bits)
            else:
                pt.set_bits(universe[sel], bits)
                flat[sel & valid] |= u64(bits)
        else:                                     # a range update of [a, b) in vpn space
            a, b = np.sort(rng.integers(0, universe.size, 2))
            lo, hi = int(universe[a]), int(universe[b]) + 1
            inside = (universe >= lo) & (universe < hi)
            t = split_where(inside)
            flat = model.reshape(-1)
            if rng.random() < 0.5:
                pt.invalidate_range(lo, hi - lo)
                flat[inside] = 0
                huge[t.all(axis=1)] = False
            else:
                pt.protect_range(lo, hi - lo)
                valid = (flat & u64(PTE_VALID)) != 0
                flat[inside & valid] &= ~u64(PTE_WRITE | PTE_ATOMIC)
        if step % 6 == 5:
            assert np.array_equal(pt.lookup(universe), model.reshape(-1)), f"step {step}"
    pt.flush().wait()
    assert np.array_equal(pt.lookup(universe), model.reshape(-1))
    assert pt.stats["pt_splits"] > 0 and pt.stats["pt_huge_maps"] > 0
