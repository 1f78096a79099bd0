"""Every CUDA kernel against its NumPy twin, byte for byte, on random page tables.

One scenario (random memory, a random device page table mixing system-RAM and device frames,
read-only and missing entries, a toy driver that maps remotely or migrates on faults) is run on
both backends; memory, page-table entries (ACCESSED/DIRTY included), job outputs and the faults
each job raised must be identical.
"""
import numpy as np
import pytest

from hmmgpu.device import EmulatedDevice, UserJob
from hmmgpu.device.backend import get_backend
from hmmgpu.device.pagetable import PTE_ATOMIC, PTE_WRITE
from hmmgpu.device.testing import ToyDriver

BASE_PFN = 1 << 20
PAGE = 4096

SCALE_JOB = UserJob(
    "scale_job",
    cuda_source=r"""
__device__ void scale_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u32 v = hmm_load<hmm_u32>(L, a[0] + 4 * lane);
    hmm_store<hmm_u32>(L, a[1] + 4 * lane, v * 3u + 1u);
    hmm_atomic_add<unsigned long long>(L, a[2] + 8 * (lane % 64), (hmm_u64)v);
}
HMM_DEFINE_JOB(scale_job, scale_lane)
""",
    numpy_lane=lambda ctx, lanes, a: (
        ctx.store(np.uint64(a[1]) + np.uint64(4) * lanes.astype(np.uint64),
                  ctx.load(np.uint64(a[0]) + np.uint64(4) * lanes.astype(np.uint64), np.uint32)
                  * np.uint32(3) + np.uint32(1)),
        ctx.atomic_add(np.uint64(a[2]) + np.uint64(8) * (lanes % 64).astype(np.uint64),
                       ctx.load(np.uint64(a[0]) + np.uint64(4) * lanes.astype(np.uint64),
                                np.uint32).astype(np.uint64))))


def scenario(backend, seed):
    rng = np.random.default_rng(seed)
    host = backend.host_arena(1500)
    # one batch per drain: the device reports faults in any order, and a batch boundary in a
    # different place would let the toy driver hand out device frames in a different order
    dev = EmulatedDevice(backend, 1024, BASE_PFN, host, fault_buffer_entries=1 << 16,
                         fault_batch_size=1 << 16, slice_lanes=300)
    drv = ToyDriver(dev, 2048, migrate="odd")
    dev.service = drv.service
    dev.write_pages(np.arange(1500), rng.integers(0, 256, (1500, PAGE), dtype=np.uint8))
    dev.arena.write(np.arange(1024), rng.integers(0, 256, (1024, PAGE), dtype=np.uint8))
    regions = {}
    for name, n in (("x", 40), ("y", 40), ("z", 40), ("src", 8), ("idx", 16), ("dst", 8), ("acc", 1)):
        regions[name] = drv.region(n, None, rng)
    fx = rng.standard_normal(40 * 1024).astype(np.float32)
    drv.map(drv.vpns(regions["x"], 40)).wait()
    dev.write_pages(drv.backing[drv.vpns(regions["x"], 40) - drv.vpn0], fx.view(np.uint8))
    fy = rng.standard_normal(40 * 1024).astype(np.float32)
    dev.write_pages(drv.backing[drv.vpns(regions["y"], 40) - drv.vpn0], fy.view(np.uint8))
    iv = rng.integers(0, 8 * 1024, 16 * 512).astype(np.int64)
    dev.write_pages(drv.backing[drv.vpns(regions["idx"], 16) - drv.vpn0], iv.view(np.uint8))
    dev.write_pages(drv.backing[drv.vpns(regions["acc"], 1) - drv.vpn0], np.zeros(PAGE, np.uint8))
    # a random device page table over the window: remote, migrated, read-only, missing
    allv = drv.vpns(drv.base, drv.next_va)
    pick = rng.random(allv.size)
    pre = allv[pick < 0.6]
    flags = rng.choice([0, PTE_WRITE, PTE_WRITE | PTE_ATOMIC], size=pre.size)
    mig = pre[(pick[pick < 0.6] < 0.2)]
    newf = drv.alloc_dev(mig.size)
    dev.copy_pages(newf, drv.backing[mig - drv.vpn0]).wait()
    drv.backing[mig - drv.vpn0] = newf
    dev.pt.map(pre, drv.backing[pre - drv.vpn0], flags).wait()

    out = {}
    R = regions
    jobs = [
        ("memset", lambda: dev.jobs.memset(R["z"] + 32, 0xC3, 30 * PAGE + 48)),
        ("copy", lambda: dev.jobs.copy(R["z"] + 31 * PAGE, R["y"] + 16, 8 * PAGE + 64)),
        ("axpy", lambda: dev.jobs.axpy(np.float32(-1.75), R["x"], R["y"], 40 * 1024)),
        ("reduce", lambda: dev.jobs.reduce_sum(R["z"] + 16, 39 * PAGE + 32)),
        ("gather", lambda: dev.jobs.gather(R["dst"], R["src"], R["idx"], 8 * 1024)),
        ("user", lambda: dev.jobs.run(SCALE_JOB, 8 * 1024, [R["src"], R["dst"], R["acc"]])),
    ]
    for name, fn in jobs:
        mark = len(drv.serviced)
        r = fn()
        faults = drv.serviced[mark:]
        fs = (np.concatenate([v for v, _ in faults]), np.concatenate([a for _, a in faults])) \
            if faults else (np.zeros(0, np.int64), np.zeros(0, np.uint8))
        o = np.lexsort((fs[1], fs[0]))
        out[name] = {"value": r.value, "rounds": r.rounds, "faults": (fs[0][o], fs[1][o]),
                     "outputs": r.outputs}
    # chases over structures built in process memory
    from test_device_jobs import _lists, _tree
    lb, heads, _ = _lists(rng, drv, 100, 30, 24)
    drv.map(drv.vpns(lb, 24)[rng.random(24) < 0.5]).wait()
    out["list_few"] = dev.jobs.list_chase(heads[:5]).value      # the fallback's scalar path
    out["list"] = dev.jobs.list_chase(heads).value
    tb, root, keys, _ = _tree(rng, drv, 2000, 24)
    drv.map(drv.vpns(tb, 24)[rng.random(24) < 0.3], flags=0).wait()
    out["tree_few"] = dev.jobs.tree_search(root, np.concatenate((keys[700:720], keys[:3] + np.uint64(1)))).value
    out["tree"] = dev.jobs.tree_search(root, np.concatenate((keys[:700], keys[:50] + np.uint64(1)))).value
    out["pt"] = dev.pt.lookup(drv.vpns(drv.base, drv.next_va))
    out["ram"] = host.read(np.arange(1500))
    out["devmem"] = dev.arena.read(np.arange(1024))
    out["counters"] = dict(dev.counters)
    return out


def _eq(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _eq(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _eq(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a.view(np.uint8) if a.dtype.kind == "f" else a,
                              b.view(np.uint8) if b.dtype.kind == "f" else b), \
            f"{where}: {int(np.count_nonzero(a != b))} elements differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cuda_kernels_match_numpy_twins(seed):
    ref = scenario(get_backend("numpy"), seed)
    got = scenario(get_backend("cupy"), seed)
    assert sum(len(ref[k]["faults"][0]) for k in ("memset", "copy", "axpy", "reduce", "gather", "user")) > 0
    _eq(ref, got, "scenario")


def test_scalar_chases_match_the_vectorised_twins(monkeypatch):
    """The fallback's scalar path for a few pointer-chasing lanes and its vectorised path give
    the same scenario: outputs, memory, page-table A/D bits, faults, counters."""
    import hmmgpu.fallback.jobs as fj
    ref = scenario(get_backend("numpy"), 1)
    monkeypatch.setattr(fj, "SCALAR_LANES", 0)
    _eq(ref, scenario(get_backend("numpy"), 1), "scenario")


def test_scenario_runs_on_numpy():
    """The parity scenario itself, on the fallback (so CI exercises it without a GPU)."""
    out = scenario(get_backend("numpy"), 0)
    assert out["counters"]["num_replays"] > 0
    assert (out["list"][1] == 30).all()


def thp_scenario(backend, seed):
    """Jobs over 2 MiB leaves on both memories, read-only and read-write, with the splits that
    faults and partial updates cause between jobs: the same memory, entries (A/D bits of the
    leaves and of the tables split from them), outputs and faults on both backends."""
    from hmmgpu.device.pagetable import PTE_HUGE
    rng = np.random.default_rng(seed)
    host = backend.host_arena(2600)
    dev = EmulatedDevice(backend, 1024, BASE_PFN, host, fault_buffer_entries=1 << 16,
                         fault_batch_size=1 << 16, slice_lanes=300)
    drv = ToyDriver(dev, 2048 + 64, migrate="none")
    dev.service = drv.service
    dev.write_pages(np.arange(2600), rng.integers(0, 256, (2600, PAGE), dtype=np.uint8))
    dev.arena.write(np.arange(1024), rng.integers(0, 256, (1024, PAGE), dtype=np.uint8))
    drv.next_ram = 512
    a = drv.region(2048)                               # four leaves on aligned RAM runs
    for j in (1, 3):                                   # leaves 1 and 3 live in device memory
        i = np.arange(512 * j, 512 * (j + 1))
        drv.backing[i] = BASE_PFN + 512 * (j // 2) + np.arange(512)
    f = rng.standard_normal(2 * 16 * 1024).astype(np.float32)
    dev.write_pages(drv.backing[np.r_[1100:1116, 1596:1612]], f.view(np.uint8))   # axpy's x (leaf 2), y (3)
    idx = drv.region(8, rng.integers(0, 2048 * 1024, 8 * 512).astype(np.int64).view(np.uint8))
    dst = drv.region(8)
    heads = drv.vpns(a, 2048)[::512]
    dev.pt.map_huge(heads, drv.backing[heads - drv.vpn0],
                    np.array([PTE_WRITE | PTE_ATOMIC, 0, PTE_WRITE, PTE_WRITE | PTE_ATOMIC])).wait()
    drv.map(drv.vpns(idx, 8)[rng.random(8) < 0.5]).wait()
    out = {}
    jobs = [
        ("memset", lambda: dev.jobs.memset(a + 32, 0xC3, 30 * PAGE + 48)),                   # leaf 0
        ("copy", lambda: dev.jobs.copy(a + 700 * PAGE + 16, a + 300 * PAGE + 64, 8 * PAGE)),  # into read-only leaf 1
        ("protect", lambda: dev.pt.protect(drv.vpns(a + 1600 * PAGE, 12))),                  # part of leaf 3
        ("axpy", lambda: dev.jobs.axpy(np.float32(-1.75), a + 1100 * PAGE, a + 1596 * PAGE, 16 * 1024)),
        ("reduce", lambda: dev.jobs.reduce_sum(a + 500 * PAGE + 16, 40 * PAGE + 32)),        # leaves 0, 1
        ("reduce2", lambda: dev.jobs.reduce_sum(a + 1520 * PAGE + 16, 100 * PAGE)),          # 2, 3 (split)
        ("gather", lambda: dev.jobs.gather(dst, a, idx, 8 * 512)),
        ("user", lambda: dev.jobs.run(SCALE_JOB, 8 * 1024, [a + 512 * PAGE, a + 1536 * PAGE, dst])),
    ]
    for name, fn in jobs:
        mark = len(drv.serviced)
        r = fn()
        faults = drv.serviced[mark:]
        fs = (np.concatenate([v for v, _ in faults]), np.concatenate([a for _, a in faults])) \
            if faults else (np.zeros(0, np.int64), np.zeros(0, np.uint8))
        o = np.lexsort((fs[1], fs[0]))
        out[name] = {"faults": (fs[0][o], fs[1][o])} if name == "protect" else \
            {"value": r.value, "rounds": r.rounds, "faults": (fs[0][o], fs[1][o]), "outputs": r.outputs}
    # pointer chases over nodes in the leaves (next = 0 or another node)
    nodes = np.uint64(a) + (rng.permutation(2048 * PAGE // 16)[:600] * 16).astype(np.uint64)
    nxt = np.where(rng.random(600) < 0.8, np.roll(nodes, 1), 0).astype(np.uint64)
    w = drv.data(a, 2048).view(np.uint64).copy()
    w[((nodes - np.uint64(a)) // np.uint64(8)).astype(np.int64)] = nxt
    dev.write_pages(drv.backing[:2048], w.view(np.uint8))
    out["list_few"] = dev.jobs.list_chase(nodes[:5], max_steps=40).value
    out["list"] = dev.jobs.list_chase(nodes[:200], max_steps=40).value
    out["pt"] = dev.pt.lookup(drv.vpns(drv.base, drv.next_va))
    out["ram"] = host.read(np.arange(2600))
    out["devmem"] = dev.arena.read(np.arange(1024))
    out["counters"] = dict(dev.counters)
    out["splits"] = dev.pt.stats["pt_splits"]
    out["huge"] = (out["pt"][:2048] & np.uint64(PTE_HUGE)) != 0
    return out


@pytest.mark.gpu
def test_cuda_kernels_match_numpy_twins_through_2mib_leaves():
    ref = thp_scenario(get_backend("numpy"), 3)
    got = thp_scenario(get_backend("cupy"), 3)
    _eq(ref, got, "thp scenario")


def test_thp_scenario_runs_on_numpy(monkeypatch):
    """The 2 MiB-leaf scenario on the fallback: writes into the read-only leaf fault and split
    it, the partial protect splits another, the rest stay one entry; the scalar chase path agrees
    with the vectorised one."""
    import hmmgpu.fallback.jobs as fj
    out = thp_scenario(get_backend("numpy"), 3)
    assert out["splits"] == 2 and len(out["copy"]["faults"][0]) == 9
    assert out["huge"].reshape(4, 512).all(axis=1).tolist() == [True, False, True, False]
    monkeypatch.setattr(fj, "SCALAR_LANES", 0)
    _eq(out, thp_scenario(get_backend("numpy"), 3), "thp scenario")
