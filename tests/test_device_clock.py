"""The emulated clock, the wall clock and the cost model (hmmgpu/device/clock.py).

The calibration tests replay the two CUDA managed-memory runs the H100 profile was calibrated on,
step by step through the real density prefetcher and VA-block residency, and check the modelled
throughput within 20% of what was measured.
"""
import json

import numpy as np
import pytest

from hmmgpu.device import clock as ck
from hmmgpu.device.clock import CostModel, EmulatedClock, ProfileError, WallClock, load_profile
from hmmgpu.drivers.uvm.perf_prefetch import DensityPrefetcher, PrefetchContext
from hmmgpu.drivers.uvm.va_block import VaBlocks, uvm_gpu_id

GiB = 1 << 30
GPU = uvm_gpu_id(0)


def test_h100_profile_has_the_measured_figures():
    p = load_profile()
    assert p.name == "h100"
    assert (p.h2d_gbps, p.d2h_gbps, p.memcpy_page_us, p.gather_gbps, p.zero_copy_gbps, p.kernel_launch_us) == \
        (54.7, 55.0, 8.3, 50.0, 50.7, 7.5)
    assert p.calibration == {"on_demand_gbps": 5.7, "prefetch_gbps": 46.2}
    assert "h100" in ck.available_profiles()


def test_stored_service_latencies_are_the_derivation():
    p = load_profile("h100")
    block_us, fault_us = ck.derive_service_latencies(p.as_dict(), **p.calibration)
    assert (p.block_service_us, p.fault_batch_us) == (block_us, fault_us)
    # the derivation written in the module docstring
    assert block_us == pytest.approx(3.435, abs=1e-3)
    assert fault_us == pytest.approx(144.547, abs=1e-3)


def test_profile_without_derived_fields_derives_them(tmp_path):
    d = load_profile().as_dict()
    del d["block_service_us"], d["fault_batch_us"]
    p = load_profile(d)
    assert (p.block_service_us, p.fault_batch_us) == (3.435, 144.547)
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(d))
    assert load_profile(str(f)).fault_batch_us == 144.547


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(h2d_gbps=-1), "'h2d_gbps' must be a positive number"),
    (lambda d: d.update(h2d_gbps="fast"), "'h2d_gbps' must be a positive number"),
    (lambda d: d.update(h2d_gbps=True), "'h2d_gbps' must be a positive number"),
    (lambda d: d.pop("gather_gbps"), "missing field 'gather_gbps'"),
    (lambda d: d.update(h2d_gbs=1.0), "unknown field(s) 'h2d_gbs'"),
    (lambda d: d.update(calibration={"on_demand_gbps": 5.7}), "'calibration.prefetch_gbps'"),
    (lambda d: d.update(calibration=[1]), "'calibration' must be an object"),
    (lambda d: d.update(name=3), "'name' must be a string"),
])
def test_bad_profiles_are_refused_naming_the_field(tmp_path, edit, message):
    d = json.loads(open(ck.profile_path("h100")).read())
    edit(d)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ProfileError) as e:
        load_profile(str(f))
    assert message in str(e.value) and "bad.json" in str(e.value)


def test_unknown_profile_and_broken_json(tmp_path):
    with pytest.raises(ProfileError, match="no profile 'a800'.*h100"):
        load_profile("a800")
    f = tmp_path / "broken.json"
    f.write_text("{")
    with pytest.raises(ProfileError, match="broken.json: not valid JSON"):
        load_profile(str(f))


def test_impossible_calibration_is_refused():
    d = load_profile().as_dict()
    del d["block_service_us"], d["fault_batch_us"]
    d["calibration"] = {"on_demand_gbps": 5.7, "prefetch_gbps": 60.0}     # faster than the gather kernel
    with pytest.raises(ProfileError, match="prefetch_gbps"):
        load_profile(d)


def test_cost_model_prices_copies_as_the_dma_engine_does():
    m = CostModel()
    # one memcpyAsync per page costs the measured 8.3 us
    assert m.memcpy_per_page_ns("h2d", 1) == 8300
    assert m.memcpy_per_page_ns("h2d", 1000) == pytest.approx(8.3e6, rel=1e-6)
    # one big pinned copy runs at the measured bandwidth
    assert GiB / m.memcpy_ns("h2d", GiB) == pytest.approx(54.7, rel=1e-3)
    assert GiB / m.memcpy_ns("d2h", GiB) == pytest.approx(55.0, rel=1e-3)
    # scattered pages: one gather kernel (launch + 50 GB/s)
    assert m.gather_ns("h2d", GiB) == 7500 + round(GiB / 50.0)
    # a batch: runs >= 64 pages are memcpys, the rest one gather kernel
    ns = m.dma_ns("h2d", np.array([100, 3, 1, 64]))
    assert ns == m.memcpy_ns("h2d", 164 * 4096, calls=2) + m.gather_ns("h2d", 4 * 4096)
    assert m.dma_ns("h2d", np.ones(256, np.int64)) == m.gather_ns("h2d", 256 * 4096)
    assert m.dma_ns("h2d", []) == 0
    assert m.remote_ns(50_700) == 1000
    assert (m.launch_ns(2), m.replay_ns(), m.fault_batch_ns(), m.block_service_ns()) == (15000, 7500, 144547, 3435)
    with pytest.raises(ValueError, match="direction 'sideways'"):
        m.memcpy_ns("sideways", 4096)


def test_emulated_clock_moves_only_when_charged():
    c = EmulatedClock()
    assert c.now_ns == 0 and c.kind == "emulated"
    c.advance(c.model.fault_batch_ns(), "fault_batch")
    c.advance(500, "replay")
    c.advance(500, "replay")
    assert c.now_ns == 144547 + 1000
    assert c.spent == {"fault_batch": 144547, "replay": 1000}
    assert c.advance_to(100, "nap") == c.now_ns            # the past: nothing happens
    c.advance_to(200_000, "nap")
    assert c.now_ns == 200_000 and c.spent["nap"] == 200_000 - 145547
    assert c.now == pytest.approx(200e-6)
    with pytest.raises(ValueError, match="cannot go back"):
        c.advance(-1)


def test_wall_clock_has_the_same_interface():
    w = WallClock()
    assert w.kind == "wall"
    t0 = w.now_ns
    w.advance(10 ** 9, "copy_h2d")                        # recorded, not waited for
    assert w.spent == {"copy_h2d": 10 ** 9}
    assert w.now_ns - t0 < 10 ** 9
    deadline = w.now_ns + 1_000_000
    w.advance_to(deadline)
    assert w.now_ns >= deadline
    for clock in (w, EmulatedClock()):
        assert {"now_ns", "now", "advance", "advance_to", "spent"} <= set(dir(clock))


def _frames_runs(src_frames):
    """Run lengths of a DMA batch whose destination frames are consecutive."""
    step = np.diff(src_frames) == 1
    starts = np.flatnonzero(np.concatenate(([True], ~step)))
    return np.diff(np.concatenate((starts, [src_frames.size])))


@pytest.mark.parametrize("layout", ["scattered", "contiguous"])
def test_calibration_on_demand_touch_of_1gib(layout):
    """A kernel touching each 4 KiB page of 1 GiB of CPU-resident memory: 5.7 GB/s on the H100.

    Faults come in address order, 256 to a batch: batch 2k is the first half of block k, batch
    2k+1 its second half.  Blocks do not share prefetch state, so all first-half batches are
    decided in one vectorised call and all second-half batches in another: the same decisions as
    1024 calls in batch order.  Each batch is priced on its own.
    """
    clock = EmulatedClock()
    m = clock.model
    blocks = VaBlocks(ngpus=1)
    pf = DensityPrefetcher()
    npages = GiB // 4096
    rng = np.random.default_rng(0)
    cpu_frames = (rng.permutation(npages) if layout == "scattered" else np.arange(npages)).reshape(512, 512)
    rows = blocks.rows_of_blocks(np.arange(512))
    blocks.make_resident(rows, np.ones((512, 512), bool), 0)           # first touched by the CPU
    clock.advance(m.launch_ns(), "launch")
    frames = rows[:, None] * 512 + np.arange(512)
    migrated = np.zeros(2, np.int64)
    for half in (0, 1):
        faulted = np.zeros((512, 512), bool)
        faulted[:, half * 256:(half + 1) * 256] = True
        ctx = PrefetchContext(rows, faulted, GPU, resident=blocks.resident_on(GPU, rows))
        move = faulted | pf.prefetch(ctx)
        blocks.make_resident(rows, move, GPU, frames=frames)
        migrated[half] = move.sum()
        for r in range(512):                                          # one fault batch per block half
            clock.advance(m.fault_batch_ns(), "fault_batch")
            clock.advance(m.block_service_ns(), "block_service")
            clock.advance(m.dma_ns("h2d", _frames_runs(cpu_frames[r][move[r]])), "copy_h2d")
            clock.advance(m.replay_ns(), "replay")
    # the density prefetcher brings nothing on this pattern (50% is not above 51%)
    assert migrated.tolist() == [npages // 2, npages // 2] and blocks.resident_on(GPU, rows).all()
    gbps = GiB / clock.now_ns
    assert gbps == pytest.approx(5.7, rel=0.2)
    if layout == "scattered":
        assert gbps == pytest.approx(5.7, rel=1e-3)          # the derivation's own case


@pytest.mark.parametrize("layout", ["scattered", "contiguous"])
def test_calibration_prefetch_of_1gib(layout):
    """cudaMemPrefetchAsync of 1 GiB of CPU-resident memory: 46.2 GB/s on the H100."""
    clock = EmulatedClock()
    m = clock.model
    blocks = VaBlocks(ngpus=1)
    npages = GiB // 4096
    rows = blocks.rows_of_blocks(np.arange(512))
    blocks.make_resident(rows, np.ones((512, 512), bool), 0)
    frames = rows[:, None] * 512 + np.arange(512)
    change = blocks.make_resident(rows, np.ones((512, 512), bool), GPU, frames=frames)
    assert int(change.copied.sum()) == npages
    src = np.random.default_rng(1).permutation(npages) if layout == "scattered" else np.arange(npages)
    clock.advance(m.block_service_ns(rows.size), "block_service")
    clock.advance(m.dma_ns("h2d", _frames_runs(src)), "copy_h2d")
    gbps = GiB / clock.now_ns
    assert gbps == pytest.approx(46.2, rel=0.2)
    if layout == "scattered":
        assert gbps == pytest.approx(46.2, rel=1e-3)
