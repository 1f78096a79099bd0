"""The prefetchers (drivers/uvm/perf_prefetch.py): UVM's density tree and the alternatives."""
import numpy as np
import pytest

from hmmgpu.drivers.uvm import perf_prefetch as pp
from hmmgpu.drivers.uvm.perf_prefetch import (DensityPrefetcher, NoPrefetch, PrefetchContext, SequentialPrefetch,
                                              WholeBlockPrefetch)
from hmmgpu.drivers.uvm.va_block import UVM_ID_CPU, uvm_gpu_id

GPU = uvm_gpu_id(0)


def mask(*ranges, n=1):
    m = np.zeros((n, 512), bool)
    for r in ranges:
        m[0, r] = True
    return m


def test_defaults_are_nvidia_uvms():
    assert (pp.uvm_perf_prefetch_enable, pp.uvm_perf_prefetch_threshold, pp.uvm_perf_prefetch_min_faults) == (1, 51, 1)
    assert DensityPrefetcher().knobs() == {"uvm_perf_prefetch_enable": 1, "uvm_perf_prefetch_min_faults": 1,
                                           "uvm_perf_prefetch_threshold": 51}
    with pytest.raises(ValueError, match=r"uvm_perf_prefetch_threshold=101 is outside its valid range \[0, 100\]"):
        DensityPrefetcher(uvm_perf_prefetch_threshold=101)
    with pytest.raises(TypeError, match="no knob uvm_perf_prefetch_treshold"):
        DensityPrefetcher(uvm_perf_prefetch_treshold=50)


def test_threshold_51_brings_the_rest_of_the_block_after_51_percent():
    pf = DensityPrefetcher()
    # half of the block faulted: 50% is not above 51%, only the faulted half moves
    half = mask(slice(0, 256))
    assert not pf.prefetch(PrefetchContext([0], half, GPU)).any()
    # then 16 more pages (one big page): 272 of 512 = 53% > 51%, the rest of the block follows
    more = mask(slice(256, 272))
    got = pf.prefetch(PrefetchContext([0], more, GPU, resident=half))
    assert np.flatnonzero(got[0]).tolist() == list(range(272, 512))
    # page by page (a thrashing page 271 keeps the faulted big page from growing): at 261 pages
    # (50.98%) nothing more comes, at 262 (51.17%) the whole block does
    for n, expect in ((261, False), (262, True)):
        res = mask(slice(0, n - 1))
        got = DensityPrefetcher().prefetch(PrefetchContext([0], mask(n - 1), GPU, resident=res, thrashing=mask(271)))
        assert got[0, 300:].all() == expect and got[0, 300:].any() == expect
    # with threshold 75 the same 53% is not enough
    got = DensityPrefetcher(uvm_perf_prefetch_threshold=75).prefetch(PrefetchContext([0], more, GPU, resident=half))
    assert not got[0, 272:].any()


def test_a_fault_brings_its_64k_big_page():
    got = DensityPrefetcher().prefetch(PrefetchContext([0], mask(37), GPU))
    assert np.flatnonzero(got[0]).tolist() == [p for p in range(32, 48) if p != 37]


def test_the_tree_grows_over_neighbouring_subtrees():
    # 3 of the 4 big pages of a 256 KiB subtree resident: a fault in the 4th completes the subtree,
    # and 4 of 8 big pages in the 512 KiB subtree is not above 51%
    res = mask(slice(0, 48))
    got = DensityPrefetcher().prefetch(PrefetchContext([0], mask(50), GPU, resident=res))
    assert np.flatnonzero(got[0]).tolist() == [p for p in range(48, 64) if p != 50]
    res = mask(slice(0, 64), slice(64, 96))                  # 6 of 8 big pages: 75% of 512 KiB
    got = DensityPrefetcher().prefetch(PrefetchContext([0], mask(100), GPU, resident=res))
    assert np.flatnonzero(got[0]).tolist() == [p for p in range(96, 128) if p != 100]


def test_a_region_starting_inside_a_big_page_keeps_big_page_alignment():
    # the VMA covers pages [5, 40) of the block: the tree starts at page 0 (offset 5), so the
    # prefix [5, 16) is one unit and the prefetch stays inside the region
    ctx = PrefetchContext([0], mask(7), GPU, first=[5], outer=[40])
    got = DensityPrefetcher().prefetch(ctx)
    assert np.flatnonzero(got[0]).tolist() == [p for p in range(5, 16) if p != 7]
    # a region without a whole big page is one unit: a fault fills all of it
    ctx = PrefetchContext([0], mask(3), GPU, first=[1], outer=[9])
    assert np.flatnonzero(DensityPrefetcher().prefetch(ctx)[0]).tolist() == [1, 2, 4, 5, 6, 7, 8]


def test_thrashing_pages_neither_seed_nor_get_prefetched():
    thr = mask(slice(40, 48))
    got = DensityPrefetcher().prefetch(PrefetchContext([0], mask(37), GPU, thrashing=thr))
    # the big page holding a thrashing page does not grow, and thrashing pages are never brought
    assert not got.any()
    got = DensityPrefetcher().prefetch(PrefetchContext([0], mask(40), GPU, thrashing=thr))
    assert not got.any()
    res = mask(slice(0, 300))
    got = DensityPrefetcher().prefetch(PrefetchContext([0], mask(300), GPU, resident=res, thrashing=mask(500)))
    assert got[0, 301:500].all() and not got[0, 500]


def test_preferred_location_rules():
    # first touch by the preferred location: the whole region is populated
    got = DensityPrefetcher().prefetch(PrefetchContext([0], mask(3), GPU, preferred_location=[GPU],
                                                       first_touch=[True], first=[0], outer=[100]))
    assert np.flatnonzero(got[0]).tolist() == [p for p in range(100) if p != 3]
    # never prefetch out of a preferred location
    res = mask(slice(0, 300))
    got = DensityPrefetcher().prefetch(PrefetchContext([0], mask(300), GPU, resident=res,
                                                       preferred_location=[UVM_ID_CPU]))
    assert not got.any()


def test_min_faults_counts_faults_migrated_to_the_same_processor():
    pf = DensityPrefetcher(uvm_perf_prefetch_min_faults=3)
    assert not pf.prefetch(PrefetchContext([4], mask(0, 1), GPU)).any()      # 2 faults so far
    assert pf.prefetch(PrefetchContext([4], mask(100), GPU)).any()           # 3
    assert not pf.prefetch(PrefetchContext([4], mask(200), UVM_ID_CPU)).any()   # another processor: restart


def test_many_blocks_in_one_call():
    n = 64
    faulted = np.zeros((n, 512), bool)
    faulted[np.arange(n), np.arange(n) * 7 % 512] = True
    resident = np.zeros((n, 512), bool)
    resident[::2, :300] = True
    got = DensityPrefetcher().prefetch(PrefetchContext(np.arange(n), faulted, GPU, resident=resident))
    for i in range(n):
        one = DensityPrefetcher().prefetch(PrefetchContext([0], faulted[i:i + 1], GPU, resident=resident[i:i + 1]))
        assert (got[i] == one[0]).all()
    assert got[::2].sum(axis=1).min() > 150 and got[1::2].sum(axis=1).max() == 15


def test_alternatives():
    f = mask(10, 500)
    assert not NoPrefetch().prefetch(PrefetchContext([0], f, GPU)).any()
    seq = SequentialPrefetch().prefetch(PrefetchContext([0], f, GPU))
    assert np.flatnonzero(seq[0]).tolist() == list(range(11, 27)) + list(range(501, 512))
    whole = WholeBlockPrefetch().prefetch(PrefetchContext([0], f, GPU, first=[0], outer=[505]))
    assert np.flatnonzero(whole[0]).tolist() == [p for p in range(505) if p not in (10, 500)]
    assert not WholeBlockPrefetch().prefetch(PrefetchContext([0], f, GPU, thrashing=f)).any()
    assert set(pp.POLICIES) == {"density", "none", "sequential", "block"}


def test_disabled():
    assert not DensityPrefetcher(uvm_perf_prefetch_enable=0).prefetch(PrefetchContext([0], mask(1), GPU)).any()
