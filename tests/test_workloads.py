"""Workloads (hmmgpu/workloads): every program runs on the emulated device through a real driver
(UvmDriver over the HMM core: faults mapped remotely through hmm_range_fault, or migrated on
fault) and its result matches plain NumPy exactly; sizing by footprint; parameters and errors; trace files and replay.
The backend-parametrised runs are gpu-marked for CuPy, so tests/test_workloads_cuda_cpu.py runs
the CUDA lanes through the CPU shim of the CUDA builtins."""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu import workloads as W
from hmmgpu.workloads.patterns import MODES
from hmmgpu.constants import PMD_SIZE
from hmmgpu.drivers import uvm
from hmmgpu.workloads import replay

# small instances: (footprint in bytes, parameters); loops cut into several launches
SMALL = {
    "gemm": (3 * 48 * 48 * 4, {"step": 20}),
    "2dconv": (2 * 64 * 64 * 4, {}),
    "atax": (100_000, {"step": 50}),
    "mvt": (100_000, {"step": 50}),
    "bicg": (100_000, {"step": 50}),
    "gesummv": (200_000, {"step": 50}),
    "fdtd-2d": (60_000, {"tmax": 3}),
    "hotspot": (40_000, {"sim_time": 3}),
    "pathfinder": (420_000, {}),
    "srad": (6 * 48 * 48 * 4, {"niter": 2, "roi": (0, 20, 0, 30)}),
    "backprop": (150_000, {}),
    "bfs": (200_000, {"degree": 6}),
    "kmeans": (100_000, {"reps": 3}),
    "streaming": (300_000, {"threads": 1024, "step": 16, "loops": 2}),
    "block_streaming": (300_000, {"threads": 1024, "step": 16, "loops": 2}),
    "random_warp": (300_000, {"threads": 512, "page_size": "4K", "step": 16, "loops": 2}),
}
PROGRAMS = sorted(SMALL)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend_name(request):
    return request.param


def run_on_uvm(w, backend="numpy", remote=False, device_bytes=None):
    """Set ``w`` up in a new process and run it on UvmDriver with ``device_bytes`` of device
    memory (None: enough for every array); ``remote``: the arrays prefer the CPU, so the faults
    map them remotely through hmm_range_fault (zero-copy) instead of migrating them.  Returns
    ``w`` and the driver's counters."""
    system = hmmgpu.System(backend=backend, ram_bytes=4 * w.footprint + (32 << 20))
    proc = system.spawn()
    w.setup(proc)
    lo, hi = w.extent
    if device_bytes is None:
        device_bytes = ((hi - 1) // PMD_SIZE - lo // PMD_SIZE + 1) * PMD_SIZE
    drv = uvm.UvmDriver(system, proc, device_bytes=device_bytes)
    try:
        if remote:
            for r in w.regions.values():
                drv.advise(r.addr, r.length, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)
        w.run(drv)
        return w, drv.counters
    finally:
        drv.close()


def small(name, **kw):
    fp, params = SMALL[name]
    return W.get(name)(fp, seed=3, **dict(params, **kw))


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_matches_numpy(name, backend_name):
    """The result is exact, the run went through device faults, and the check is not vacuous:
    one corrupted word in every array makes it fail."""
    w, counters = run_on_uvm(small(name), backend_name, remote=True)
    assert counters["num_pages_in"] == 0 and counters["num_map_remote"] > 0
    c = w.check()
    assert c.ok, c
    s = w.summary()
    assert s["faults"] > 0 and s["replays"] > 0 and s["launches"] == len(w.results)
    for r in w.regions.values():                   # flip one word in the middle of each array
        off = (r.nbytes // 2) & ~3
        word = w.proc.read(r.addr + off, 4).view(np.uint32)
        w.proc.write(r.addr + off, word ^ np.uint32(0x5A5A5A5A))
    c = w.check()
    assert not c.ok and c.detail, c


@pytest.mark.parametrize("name", PROGRAMS)
def test_sizing_by_footprint(name):
    """The instance for a footprint maps at most that many bytes, and is the largest that does:
    twice the footprint gives a larger one."""
    cls = W.get(name)
    fp = SMALL[name][0]
    params = SMALL[name][1]
    w = cls(fp, **params)
    assert w.footprint <= fp
    bigger = cls(2 * fp + (64 << 10), **params)
    assert bigger.footprint > w.footprint and bigger.footprint <= 2 * fp + (64 << 10)
    d = cls()
    assert d.dims == cls.default_dims and W.default_footprint(name) == d.footprint
    with pytest.raises(ValueError, match="smallest instance"):
        cls(4096, **params)


def test_arrays_are_2mib_aligned_and_unmapped_on_close():
    w = small("atax")
    system = hmmgpu.System(backend="numpy", ram_bytes=32 << 20)
    proc = system.spawn()
    w.setup(proc)
    assert set(w.regions) == {"A", "x", "y", "tmp"}
    assert all(r.addr % PMD_SIZE == 0 for r in w.regions.values())
    lo, hi = w.extent
    assert all(lo <= r.addr and r.addr + r.length <= hi for r in w.regions.values())
    assert np.array_equal(w.read("A", np.float32, w.A.shape), w.A)       # the CPU wrote the input
    a = w.addr("x")
    w.close()
    with pytest.raises(OSError) as e:
        proc.read(a, 4)
    assert e.value.errno == errno.EFAULT


def test_registry_and_parameters():
    assert {"gemm", "2dconv", "atax", "mvt", "bicg", "gesummv", "fdtd-2d", "hotspot", "pathfinder",
            "srad", "backprop", "bfs", "kmeans", "streaming", "block_streaming", "random_warp",
            "trace"} == set(W.WORKLOADS)
    assert W.get("GEMM") is W.Gemm
    with pytest.raises(ValueError, match="gemm"):
        W.get("nope")
    with pytest.raises(TypeError, match="unknown parameter.*tmax"):
        W.Gemm(tmax=3)
    with pytest.raises(ValueError, match="positive"):
        W.Gemm(0)
    with pytest.raises(RuntimeError, match="setup"):
        W.Gemm(1 << 20).run(None)


def test_oversubscription_sample_modes():
    """The three hinted modes need a driver with advise and prefetch and say so on another; an
    unknown mode or page size is refused."""
    class JobsOnly:
        """A driver that runs jobs and has neither advise nor prefetch."""

        def __init__(self, drv):
            self.jobs = drv.jobs

    for mode in ("zero_copy", "prefetch_once_and_hints", "stripe_gpu_cpu"):
        w = W.Streaming(1 << 20, mode=mode)
        system = hmmgpu.System(backend="numpy", ram_bytes=4 * w.footprint + (32 << 20))
        proc = system.spawn()
        w.setup(proc)
        drv = uvm.UvmDriver(system, proc, device_bytes=PMD_SIZE)
        with pytest.raises(ValueError, match="advise and prefetch.*not JobsOnly"):
            w.run(JobsOnly(drv))
        drv.close()
    with pytest.raises(ValueError, match="page_fault"):
        W.RandomWarp(1 << 22, mode="pagefault")
    with pytest.raises(ValueError, match="2M"):
        W.RandomWarp(1 << 22, page_size="1M")
    with pytest.raises(ValueError, match="multiple"):
        W.BlockStreaming(1 << 20, threads=1000)
    w = W.RandomWarp(5 << 20)                  # 2 MiB pages: two of them fit
    assert w.geometry() == (2, (2 << 20) // 4)


def test_bfs_builds_its_graph_in_process_memory():
    w, _ = run_on_uvm(small("bfs"))
    n = w.dims["n"]
    assert np.array_equal(w.read("offsets", np.int32), w.offsets)
    assert np.array_equal(w.read("adjacency", np.int32), w.adj)
    assert w.sizes.sum() == w.adj.size == 2 * (w.p["degree"] * n // 2)
    assert w.levels >= 3                      # one launch per level, then one that changes nothing
    assert len(w.results) == w.levels


# ------------------------------------------------------------------------------------------------
# trace files

def _trace(rng, npages=48, n=600, kinds=(0, 1)):
    base = 0x7F12_3450_0000                   # three 2 MiB blocks, the middle one untouched
    pages = np.concatenate([rng.integers(0, 200, npages // 2), rng.integers(1024, 1100, npages // 2)])
    vaddr = base + pages[rng.integers(0, npages, n)] * 4096 + rng.integers(0, 4096, n)
    return np.arange(n) // 3, vaddr.astype(np.uint64), rng.choice(kinds, n).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_trace_file_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    order, vaddr, access = _trace(rng, kinds=(0, 1, 2))
    path = tmp_path / ("t" + suffix)
    W.save_trace(path, order[::-1], vaddr[::-1], access[::-1])
    t = W.load_trace(path)
    k = np.argsort(order[::-1], kind="stable")           # sorted by order, ties in file order
    assert np.array_equal(t.order, order[::-1][k]) and np.array_equal(t.vaddr, vaddr[::-1][k])
    assert np.array_equal(t.access, access[::-1][k]) and len(t) == order.size


def test_trace_csv_errors_name_line_and_field(tmp_path):
    def bad(text, *match):
        p = tmp_path / "bad.csv"
        p.write_text(text)
        with pytest.raises(W.TraceFormatError) as e:
            W.load_trace(p)
        for m in match:
            assert m in str(e.value), str(e.value)

    bad("order,addr,access\n1,0x1000,r\n", "line 1", "vaddr missing")
    bad("# a comment\norder,vaddr,access\n0,0x1000,r\n\n1,0x1zz0,w\n", "line 5", "field 'vaddr'", "'0x1zz0'")
    bad("order,vaddr,access\n0,4096,read\n1,8192,x\n", "line 3", "field 'access'", "'x'")
    bad("order,vaddr,access\n0,4096\n", "line 2", "2 fields")
    bad("order,vaddr,access\nfirst,4096,r\n", "line 2", "field 'order'")
    bad("order,vaddr,access\n0,0x800000000000,r\n", "line 2", "not a user address")
    bad("order,vaddr,access\n", "no records")
    t = tmp_path / "ok.csv"
    t.write_text("ACCESS, vaddr ,Order,extra\nW,0x2000,5,x\nread,4096,2,y\n")
    tr = W.load_trace(t)
    assert tr.order.tolist() == [2, 5] and tr.vaddr.tolist() == [4096, 0x2000] and tr.access.tolist() == [0, 1]


def test_trace_npz_errors_name_array_and_record(tmp_path):
    def bad(match, **arrays):
        p = tmp_path / "bad.npz"
        np.savez(p, **arrays)
        with pytest.raises(W.TraceFormatError, match=match):
            W.load_trace(p)

    o, v = np.arange(4), np.arange(4) * 4096
    bad("access.*missing", order=o, vaddr=v)
    bad("record 2, field 'access'.*7", order=o, vaddr=v, access=np.array([0, 1, 7, 0]))
    bad("record 1, field 'access'.*'x'", order=o, vaddr=v, access=np.array(["r", "x", "w", "a"]))
    bad("record 3, field 'vaddr'", order=o, vaddr=np.array([0, 1, 2, 1 << 48]), access=np.zeros(4, int))
    bad("shape", order=o, vaddr=v[:3], access=np.zeros(4, int))
    bad("float", order=o * 1.0, vaddr=v, access=np.zeros(4, int))
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip file")
    with pytest.raises(W.TraceFormatError, match="readable"):
        W.load_trace(p)


def test_trace_replay(tmp_path, backend_name):
    """Reads and writes replayed in batches through UvmDriver: the layout keeps the trace's
    offsets within 2 MiB blocks, the final memory and every read are as the accesses say."""
    rng = np.random.default_rng(2)
    order, vaddr, access = _trace(rng)
    path = tmp_path / "t.npz"
    W.save_trace(path, order, vaddr, access)
    w = W.TraceReplay(path=str(path), batch=64, seed=1)
    assert w.dims == {"records": 600, "segments": 2}
    assert w.footprint < 2 * PMD_SIZE
    run_on_uvm(w, backend_name, remote=True)
    assert all(r.addr % PMD_SIZE == w.align_of(k) for k, r in w.regions.items())
    assert np.array_equal(w.vaddr % np.uint64(PMD_SIZE), w.trace.vaddr % np.uint64(PMD_SIZE))
    assert len(w.results) == -(-600 // 64) and w.summary()["faults"] > 0
    assert w.check().ok, w.check()
    w.values[np.flatnonzero(w.trace.access == 0)[5]] ^= np.uint64(1)      # a read that saw wrong data
    c = w.check()
    assert not c.ok and "reads wrong" in c.detail


def test_trace_replay_atomics_and_same_batch_races(backend_name):
    """Atomics add up exactly (system pages mapped remotely: the link carries the device's
    atomics); a read racing a write or an atomic of its own batch may see either, but one batch
    later must see the result."""
    page = 0x7F00_0040_0000
    # word 0x10 of the page: written in batch 0, read in batches 0 and 1; word 0x28 (an atomic
    # slot): 3 atomics in batch 0, read in batch 0 and 1
    vaddr = np.array([page + 0x10, page + 0x10, page + 0x28, page + 0x28, page + 0x20, page + 0x28,
                      page + 0x10, page + 0x28], np.uint64)
    access = np.array([1, 0, 2, 2, 2, 0, 0, 0], np.uint8)
    batch_of = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    t = W.Trace(batch_of, vaddr, access)
    w, _ = run_on_uvm(W.TraceReplay(trace=t, batch=6, seed=1), backend_name, remote=True)
    assert w.check().ok, w.check()
    init = w.words0["seg0"]
    w0 = lambda off: int(init[off // 8])  # noqa: E731
    st = int(replay.stamp(w.vaddr[0]))                # the stamp of the word at its replayed address
    assert int(w.values[6]) == st
    assert int(w.values[7]) == w0(0x28) + 3
    assert int(w.values[1]) in (w0(0x10), st)
    assert w0(0x28) <= int(w.values[5]) <= w0(0x28) + 3
    w.values[7] += np.uint64(1)                       # one batch later the count must be exact
    assert not w.check().ok


def test_trace_replay_needs_a_trace():
    with pytest.raises(ValueError, match="path="):
        W.TraceReplay()
    with pytest.raises(ValueError, match="cannot be sized"):
        W.TraceReplay(1 << 20, path="x.csv")
    with pytest.raises(FileNotFoundError):
        W.TraceReplay(path="/nonexistent/trace.csv")


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_on_the_uvm_driver(name):
    """Every program on the UVM driver (migration on fault, the density prefetcher) matches NumPy."""
    w, c = run_on_uvm(small(name))
    assert w.check().ok, w.check()
    assert c["num_pages_in"] > 0


@pytest.mark.parametrize("name", ["streaming", "block_streaming"])
def test_program_on_the_uvm_driver_oversubscribed(name):
    """Working sets of three times the device memory (2 MiB): root chunks are evicted and the
    result is still exact.  (Programs that re-read their working set at random, random_warp or
    kmeans, thrash at 3x as they would under nvidia-uvm -- every pass evicts a root chunk -- and
    take minutes in the emulation: the policies bench suite is the place for them.)"""
    w, c = run_on_uvm(W.get(name)(6 << 20, seed=3, **SMALL[name][1]), device_bytes=PMD_SIZE)
    assert w.check().ok, w.check()
    assert c["num_evictions"] > 0


@pytest.mark.parametrize("name", ["streaming", "block_streaming", "random_warp"])
def test_the_sample_modes_on_the_uvm_driver(name):
    """The four modes of NVIDIA's oversubscription sample at 1.5x device memory, exact each, with
    what each mode is for: zero_copy reads system memory in place (no page migrates to the
    device), prefetch_once_and_hints and stripe_gpu_cpu place data by prefetch (fewer faults than
    page_fault), stripe_gpu_cpu leaves one page in three on the CPU, mapped remotely."""
    params = dict(SMALL[name][1], loops=2)
    if name == "random_warp":
        params["page_size"] = "64K"
    got = {}
    for mode in MODES:
        w, c = run_on_uvm(W.get(name)(3 << 20, seed=3, mode=mode, **params), device_bytes=PMD_SIZE)
        assert w.check().ok, (mode, w.check())
        got[mode] = c
    # only the unhinted arrays (the per-thread sums, random_warp's state) come to the device
    rest = sum(r.length for k, r in w.regions.items() if k != "data") // 4096
    assert got["zero_copy"]["num_pages_in"] <= rest and got["zero_copy"]["num_map_remote"] > 0
    for mode in ("prefetch_once_and_hints", "stripe_gpu_cpu"):
        assert got[mode]["gpu_page_fault_count"] < got["page_fault"]["gpu_page_fault_count"], mode
    assert got["stripe_gpu_cpu"]["num_map_remote"] > 0


def test_stripes_follow_the_sample():
    s = W.Streaming(1 << 20)
    assert s.stripes(6, 1.5, 100).tolist() == [True, True, True, False, True, True]      # R/(R-1) = 3
    assert s.stripes(5, 3.0, 100).tolist() == [False, False, False, True, False]         # R > 2
    assert s.stripes(4, 1.0, 100).all() and s.stripes(4, 1.0, 2).tolist() == [True, True, False, False]
