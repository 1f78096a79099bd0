"""The DMA engine and the arenas: coalescing, scatter/gather copies, vectorised access."""
import numpy as np

from hmmgpu.device import EmulatedDevice
from hmmgpu.device.dma import coalesce_runs

BASE_PFN = 1 << 20
PAGE = 4096


def test_coalesce_runs():
    d = np.array([5, 6, 7, 1, 9, 10, 3])
    s = np.array([2, 3, 4, 0, 8, 11, 12])
    starts, lengths = coalesce_runs(d, s)
    assert starts.tolist() == [0, 3, 4, 5, 6] and lengths.tolist() == [3, 1, 1, 1, 1]
    assert coalesce_runs(np.zeros(0), np.zeros(0))[0].size == 0


def _batch(rng, n_long, long_len, n_scattered, dst_space, src_space):
    """Destination/source frame indices: some long contiguous runs, then scattered pages."""
    d = rng.permutation(dst_space)
    s = rng.permutation(src_space)
    dl = np.concatenate([np.arange(k * 1000, k * 1000 + long_len) for k in range(n_long)])
    sl = np.concatenate([np.arange(k * 1000 + 500, k * 1000 + 500 + long_len) for k in range(n_long)])
    used_d, used_s = set(dl.tolist()), set(sl.tolist())
    dsc = np.array([x for x in d.tolist() if x not in used_d][:n_scattered])   # test setup only
    ssc = np.array([x for x in s.tolist() if x not in used_s][:n_scattered])
    return np.concatenate((dl, dsc)), np.concatenate((sl, ssc))


def test_copy_pages_all_directions(backend):
    rng = np.random.default_rng(21)
    host = backend.host_arena(4000)
    dev = EmulatedDevice(backend, 4000, BASE_PFN, host)
    src_data = rng.integers(0, 256, (4000, PAGE), dtype=np.uint8)
    host.write(np.arange(4000), src_data)
    # RAM -> device: 3 runs of 100 pages (cudaMemcpyAsync each) + 300 scattered (one kernel)
    d, s = _batch(rng, 3, 100, 300, 4000, 4000)
    dev.copy_pages(BASE_PFN + d, s).wait()
    assert np.array_equal(dev.arena.read(d), src_data[s])
    if hasattr(dev.dma, "memcpy_calls"):
        assert dev.dma.memcpy_calls == 3 and dev.dma.kernel_launches == 1
    # device -> RAM, into other frames
    d2, s2 = _batch(rng, 2, 80, 200, 4000, 4000)
    dev_data = dev.arena.read(np.arange(4000))
    dev.copy_pages(d2, BASE_PFN + s2).wait()
    assert np.array_equal(host.read(d2), dev_data[s2])
    # device -> device (disjoint source and destination sets)
    dd = np.arange(0, 2000, 2)
    ss = rng.permutation(np.arange(1, 4000, 2))[:1000]
    before = dev.arena.read(np.arange(4000))
    dev.copy_pages(BASE_PFN + dd, BASE_PFN + ss).wait()
    after = dev.arena.read(np.arange(4000))
    assert np.array_equal(after[dd], before[ss])
    assert np.array_equal(after[1::2], before[1::2])
    assert dev.dma.pages_copied == 600 + 360 + 1000


def test_arena_vectorised_access(backend):
    rng = np.random.default_rng(2)
    for arena in (backend.host_arena(64), backend.device_arena(64)):
        idx = rng.permutation(64)[:20]
        data = rng.integers(0, 256, (20, PAGE), dtype=np.uint8)
        arena.write(idx, data)
        assert np.array_equal(arena.read(idx), data)
        arena.fill(idx[:5], 7)
        assert (arena.read(idx[:5]) == 7).all()
        got = arena.read_bytes(idx[5:8], [0, 100, 4000], [10, 20, 96])
        want = np.concatenate((data[5, :10], data[6, 100:120], data[7, 4000:4096]))
        assert np.array_equal(got, want)
        assert not arena.read(np.setdiff1d(np.arange(64), idx)).any()


def test_read_write_pages_by_pfn(backend):
    host = backend.host_arena(32)
    dev = EmulatedDevice(backend, 32, BASE_PFN, host)
    pf = np.array([3, BASE_PFN + 5, 7, BASE_PFN + 0])
    data = np.arange(4 * PAGE, dtype=np.uint32).astype(np.uint8).reshape(4, PAGE)
    dev.write_pages(pf, data)
    assert np.array_equal(dev.read_pages(pf), data)
    dev.fill_pages(pf[:2], 9)
    assert (dev.read_pages(pf[:2]) == 9).all()


def test_sub_arenas_are_views(backend):
    """Arena.sub: a slice of an arena's frames as an arena (a driver hotplugs its device memory
    in chunks): reads, writes, fills and DMA copies through it land in the parent's frames."""
    rng = np.random.default_rng(4)
    host = backend.host_arena(64)
    dev = EmulatedDevice(backend, 64, BASE_PFN, host)
    sub = dev.arena.sub(16, 32)
    assert sub.nframes == 32 and sub.kind == "device"
    data = rng.integers(0, 256, (8, PAGE), dtype=np.uint8)
    sub.write(np.arange(8), data)
    assert np.array_equal(dev.arena.read(np.arange(16, 24)), data)
    sub.fill(np.array([31]), 7)
    assert (dev.arena.read(np.array([47])) == 7).all()
    host.write(np.arange(4), data[:4])
    dev.dma.copy(sub, np.array([10, 11, 12, 20]), host, np.arange(4)).wait()
    assert np.array_equal(dev.arena.read(np.array([26, 27, 28, 36])), data[:4])
    assert np.array_equal(sub.read(np.array([20])), data[3:4])
    hsub = host.sub(2, 4)
    assert np.array_equal(hsub.read(np.arange(2)), data[2:4])
    assert hsub.host is not None and np.array_equal(hsub.host[0], data[2])


def test_copy_pages_with_one_consecutive_side(backend):
    """A batch whose destination (or source) is one run of consecutive frames, as a driver's
    fresh device pages are, of a length that is not a whole number of the engine's chunks."""
    rng = np.random.default_rng(5)
    host = backend.host_arena(2000)
    dev = EmulatedDevice(backend, 2000, BASE_PFN, host)
    data = rng.integers(0, 256, (2000, PAGE), dtype=np.uint8)
    host.write(np.arange(2000), data)
    n = 2 * 256 + 37
    scattered = rng.permutation(2000)[:n]
    run = np.arange(700, 700 + n)
    dev.copy_pages(BASE_PFN + run, scattered).wait()            # gathered into the run
    assert np.array_equal(dev.arena.read(run), data[scattered])
    back = rng.permutation(2000)[:n]
    dev.copy_pages(back, BASE_PFN + run).wait()                 # scattered from the run
    assert np.array_equal(host.read(back), data[scattered])
    assert np.array_equal(dev.arena.read(run[::-1]), data[scattered][::-1])


def test_a_2mib_folio_moves_with_one_contiguous_copy(backend):
    """A batch of three aligned 512-page folios (scattered among themselves, as migrate_vma hands
    them over) and scattered 4 KiB pages: three contiguous copies on either backend, the rest in
    one step, every byte where it belongs."""
    rng = np.random.default_rng(12)
    host = backend.host_arena(4096)
    dev = EmulatedDevice(backend, 2048, BASE_PFN, host)
    src_data = rng.integers(0, 256, (4096, PAGE), dtype=np.uint8)
    host.write(np.arange(4096), src_data)
    heads_s, heads_d = np.array([3, 1, 6]) * 512, np.array([0, 2, 1]) * 512
    s = np.concatenate([h + np.arange(512) for h in heads_s] + [rng.permutation(np.arange(2560, 3072))[:200]])
    d = np.concatenate([h + np.arange(512) for h in heads_d] + [1536 + rng.permutation(512)[:200]])
    dev.copy_pages(BASE_PFN + d, s).wait()
    assert np.array_equal(dev.arena.read(d), src_data[s])
    assert dev.dma.contiguous_copies == 3 and dev.stats()["dma_contiguous_copies"] == 3
    if hasattr(dev.dma, "memcpy_calls"):
        assert dev.dma.memcpy_calls == 3 and dev.dma.kernel_launches == 1
    # and back: one folio device -> RAM elsewhere, alone in its batch
    dev.copy_pages(np.arange(512), BASE_PFN + 512 + np.arange(512)).wait()
    assert np.array_equal(host.read(np.arange(512)), src_data[6 * 512:7 * 512])
    assert dev.dma.contiguous_copies == 4


def test_arena_runs_and_scattered_frames_agree(backend):
    """Arena read/write/fill take runs of consecutive frames as slices and the rest as one
    gather: every mix of the two must touch exactly the frames asked for, in order."""
    rng = np.random.default_rng(11)
    arena = backend.device_arena(512)
    ref = rng.integers(0, 256, (512, PAGE), dtype=np.uint8)
    arena.write(np.arange(512), ref)
    runs = np.concatenate((np.arange(40, 104), np.arange(300, 340), [7, 3], np.arange(200, 232)))
    for idx in (runs, rng.permutation(512)[:100], np.arange(128, 256)):
        assert np.array_equal(arena.read(idx), ref[idx])
        data = rng.integers(0, 256, (idx.size, PAGE), dtype=np.uint8)
        arena.write(idx, data)
        ref[idx] = data
        assert np.array_equal(arena.read(np.arange(512)), ref)
        arena.fill(idx[::2], 0x3C)
        ref[idx[::2]] = 0x3C
        assert np.array_equal(arena.read(np.arange(512)), ref)
