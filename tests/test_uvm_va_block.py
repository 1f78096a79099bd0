"""VA-block residency and mappings (drivers/uvm/va_block.py): moves, read duplication, collapse."""
import numpy as np
import pytest

from hmmgpu.drivers.uvm.va_block import (UVM_ID_CPU, UVM_PROT_READ_ONLY, UVM_PROT_READ_WRITE, Topology, VaBlocks,
                                         group_sorted, uvm_gpu_id)

CPU, G0, G1 = UVM_ID_CPU, uvm_gpu_id(0), uvm_gpu_id(1)


def pages(*idx):
    m = np.zeros((1, 512), bool)
    m[0, list(idx)] = True
    return m


def frames_for(rows, base=0):
    return base + np.asarray(rows)[:, None] * 512 + np.arange(512)


def test_rows_are_stable_and_lookups_vectorised():
    v = VaBlocks(ngpus=1, capacity=1)
    r = v.rows_of_blocks([9, 3, 9, 7])
    assert r.tolist() == [2, 0, 2, 1] and v.blocks.tolist() == [3, 7, 9]     # new rows in block order
    assert v.rows_of_blocks([7, 3, 4], create=False).tolist() == [1, 0, -1]
    rows, pg = v.rows_of(np.array([9 << 21 | 5 << 12, 3 << 21]))
    assert rows.tolist() == [2, 0] and pg.tolist() == [5, 0]
    many = v.rows_of_blocks(np.arange(100, 1100))               # grows past its capacity
    assert many.tolist() == list(range(3, 1003))
    assert (v.start_of(many[:2]) == np.array([100, 101]) << 21).all()


def test_move_copies_from_the_closest_copy_and_drops_the_others():
    v = VaBlocks(ngpus=2)
    r = v.rows_of_blocks([0])
    ch = v.make_resident(r, pages(0, 1, 2), CPU)
    assert ch.populate.sum() == 3 and not ch.copied.any()      # first touch: nothing to copy
    v.make_resident(r, pages(1, 2), G1, frames=frames_for(r, 1000))
    ch = v.make_resident(r, pages(0, 1, 2), G0, frames=frames_for(r))
    # page 0 comes from the CPU, pages 1 and 2 from the peer GPU (peers before the CPU)
    assert ch.copy_from[0, :3].tolist() == [CPU, G1, G1]
    assert ch.dropped[CPU, 0, :3].tolist() == [True, False, False]
    assert ch.dropped[G1, 0, :3].tolist() == [False, True, True]
    assert sorted(ch.dropped_frames[G1].tolist()) == [1001, 1002]
    assert v.resident[:, r[0], :3].sum(axis=0).tolist() == [1, 1, 1]
    assert v.frame[G0, r[0], :3].tolist() == [0, 1, 2] and (v.frame[G1, r[0], :3] == -1).all()
    v.check()


def test_gpu_destination_needs_frames():
    v = VaBlocks(ngpus=1)
    r = v.rows_of_blocks([0])
    with pytest.raises(ValueError, match="need device frames"):
        v.make_resident(r, pages(4), G0)
    bad = frames_for(r)
    bad[0, 4] = -1
    with pytest.raises(ValueError, match="has no frame"):
        v.make_resident(r, pages(4), G0, frames=bad)


def test_read_mostly_pages_are_duplicated_and_collapse_on_a_write():
    v = VaBlocks(ngpus=2)
    r = v.rows_of_blocks([0])
    m = pages(*range(8))
    v.make_resident(r, m, CPU)
    v.map(r, m, CPU, UVM_PROT_READ_WRITE)
    # GPU 0 reads them with read duplication: a second copy, and the CPU loses write access
    ch = v.make_resident(r, m, G0, read_duplicate=True, frames=frames_for(r))
    assert ch.copied.sum() == 8 and not ch.dropped.any()
    assert ch.revoke_write[CPU].sum() == 8
    assert (v.prot[CPU, r[0], :8] == UVM_PROT_READ_ONLY).all()
    v.map(r, m, G0, UVM_PROT_READ_ONLY)
    ch = v.make_resident(r, m, G1, read_duplicate=True, frames=frames_for(r, 5000))
    v.map(r, m, G1, UVM_PROT_READ_ONLY)
    assert (v.resident_count(r)[0, :8] == 3).all()
    assert v.counters["num_read_duplicates"] == 16
    with pytest.raises(ValueError, match="read-duplicated page cannot be mapped writable"):
        v.map(r, m, G0, UVM_PROT_READ_WRITE)
    v.check()
    # GPU 1 writes pages 2 and 3: every other copy of them goes, and so do the mappings to them
    w = pages(2, 3)
    ch = v.make_resident(r, w, G1)
    assert not ch.copied.any()                                    # GPU 1 already has the data
    assert ch.dropped[CPU, 0].sum() == 2 and ch.dropped[G0, 0].sum() == 2
    assert sorted(ch.dropped_frames[G0].tolist()) == [2, 3]
    assert ch.unmap[CPU, 0].sum() == 2 and ch.unmap[G0, 0].sum() == 2 and not ch.unmap[G1].any()
    assert v.counters["num_read_duplicate_invalidates"] == 2
    v.map(r, w, G1, UVM_PROT_READ_WRITE)
    assert v.resident_count(r)[0, :8].tolist() == [3, 3, 1, 1, 3, 3, 3, 3]
    assert v.resident[G1, r[0], 2] and not v.resident[CPU, r[0], 2]
    v.check()


def test_remote_mappings_to_the_destination_survive_a_move():
    v = VaBlocks(ngpus=1)
    r = v.rows_of_blocks([0])
    m = pages(0)
    v.make_resident(r, m, G0, frames=frames_for(r))
    v.map(r, m, CPU, UVM_PROT_READ_WRITE, target=G0)            # a coherent CPU mapping GPU memory
    ch = v.make_resident(r, m, G0, frames=frames_for(r))
    assert not ch.unmap.any() and not ch.copied.any()
    with pytest.raises(ValueError, match="not resident where it points"):
        v.map(r, pages(1), CPU, UVM_PROT_READ_ONLY)


def test_drop_releases_frames_and_mappings():
    v = VaBlocks(ngpus=1)
    r = v.rows_of_blocks([0, 1])
    m = np.zeros((2, 512), bool)
    m[:, :4] = True
    v.make_resident(r, m, G0, frames=frames_for(r))
    v.map(r, m, G0, UVM_PROT_READ_WRITE)
    freed = v.drop(r, m, G0)
    assert sorted(freed.tolist()) == [0, 1, 2, 3, 512, 513, 514, 515]
    assert not v.resident[G0].any() and not (v.prot[G0] > 0).any()
    v.check()


def test_closest_resident_and_topology():
    v = VaBlocks(ngpus=2)
    r = v.rows_of_blocks([0])
    v.make_resident(r, pages(0, 1), CPU)
    v.make_resident(r, pages(1, 2), G1, read_duplicate=True, frames=frames_for(r))
    cl = v.closest_resident(r, G0)[0, :4].tolist()
    assert cl == [CPU, G1, G1, -1]
    assert v.closest_resident(r, CPU)[0, :3].tolist() == [CPU, CPU, G1]
    # page by page (what a fault batch asks: one answer per faulted page, not per block)
    assert v.closest_resident_pages(np.repeat(r, 4), [3, 2, 1, 0], G0).tolist() == [-1, G1, G1, CPU]
    assert v.resident_anywhere(np.array([r[0]])).tolist() == [True]
    t = Topology(3)
    assert t.can_all_access(np.array([0b011, 0b111]), np.array([CPU, G1])).tolist() == [True, False]
    assert t.closest_in(np.array([0b110, 0b001, 0]), G0).tolist() == [G0, CPU, -1]


def test_group_sorted_is_np_unique_and_rows_of_many_pages_are_rows_of_each():
    rng = np.random.default_rng(4)
    for x in (np.zeros(0, np.int64), np.array([7]), np.repeat(np.arange(5, 12), rng.integers(1, 9, 7)),
              rng.integers(0, 40, 300)):
        got = group_sorted(x)
        want = np.unique(x, return_inverse=True, return_counts=True)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    vb = VaBlocks()
    vb.rows_of_blocks(np.array([9, 3]))
    blocks = np.repeat(np.array([2, 3, 9, 11]), 300)       # many pages: looked up block by block
    rows = vb.rows_of_blocks(blocks)
    assert rows.tolist() == [vb.rows_of_blocks([b])[0] for b in blocks.tolist()]
    assert vb.blocks[rows].tolist() == blocks.tolist()
    assert vb.rows_of_blocks(blocks[::-1], create=False).tolist() == rows[::-1].tolist()
