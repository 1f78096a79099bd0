"""Transparent huge pages and hugetlbfs in the emulated host kernel (mm/huge_memory.c, mm/hugetlb.c).

What a PMD mapping looks like from outside and inside: the THP modes, the huge zero page,
rss and memcg in pages, the PMD splits of partial munmap / mprotect / mremap / MADV_DONTNEED,
COW after fork, MADV_COLLAPSE, the hugetlbfs pool, and hmm_range_fault's map order.
"""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu import (MADV_COLLAPSE, MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MAP_ANONYMOUS,
                    MAP_FIXED, MAP_HUGETLB, MAP_PRIVATE, MAP_SHARED, MREMAP_FIXED, MREMAP_MAYMOVE,
                    PAGE_SIZE, PMD_SIZE, PROT_READ, PROT_WRITE)
from hmmgpu.hmm import (HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HmmRange, MmuIntervalNotifier,
                        hmm_pfn_to_map_order, hmm_pfn_to_pfn, hmm_range_fault,
                        mmu_interval_notifier_insert, mmu_interval_read_begin, mmu_interval_set_seq)
from hmmgpu.mm import pgtable as pt
from hmmgpu.mm.physmem import PG_HEAD
from invariants import check_system

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
NR = PMD_SIZE // PAGE_SIZE
HUGE = np.uint64(1 << 5)


def system(thp="madvise", hugetlb_pages=None, ram=64 << 20):
    return hmmgpu.System(backend="numpy", ram_bytes=ram, thp=thp, hugetlb_pages=hugetlb_pages)


def thp_region(p, advice=MADV_HUGEPAGE, n=1):
    """n aligned 2 MiB inside a mapping one 2 MiB larger; returns (base, aligned address)."""
    base = p.mmap((n + 1) * PMD_SIZE, RW, ANON)
    ptr = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    if advice is not None:
        p.madvise(ptr, n * PMD_SIZE, advice)
    return base, ptr


def pattern(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def ptes(p, addr, n=NR):
    return p.pages(addr, n)


def huge(e):
    return (e & HUGE) != 0


def test_modes_decide_who_gets_a_thp():
    with pytest.raises(OSError) as ei:
        system(thp="sometimes")
    assert ei.value.errno == errno.EINVAL
    for mode, advice, want in (("never", MADV_HUGEPAGE, False), ("madvise", None, False),
                               ("madvise", MADV_HUGEPAGE, True), ("always", None, True),
                               ("always", MADV_NOHUGEPAGE, False)):
        s = system(thp=mode)
        p = s.spawn()
        _, ptr = thp_region(p, advice)
        p.write(ptr, b"x")
        e = ptes(p, ptr)
        assert huge(e).all() == want and huge(e).any() == want, (mode, advice)
        # a THP faults in whole; a small page alone
        assert p.rss["anon"] == (NR if want else 1)


def test_write_fault_maps_one_folio_and_accounts_it():
    s = system()
    cg = s.memcg("thp")
    p = s.spawn(memcg=cg)
    free0 = s.phys.nr_free()
    _, ptr = thp_region(p)
    data = pattern(PMD_SIZE)
    p.write(ptr, data)
    e = ptes(p, ptr)
    pfn = pt.pte_pfn(e)
    assert huge(e).all() and pt.pte_write(e).all()
    assert pfn[0] % NR == 0 and (np.diff(pfn) == 1).all()
    pg = s.phys.pages
    assert (pg.order[pfn] == 9).all() and pg.flags[pfn[0]] & PG_HEAD and not (pg.flags[pfn[1:]] & PG_HEAD).any()
    assert (pg.refcount[pfn] == 1).all() and (pg.mapcount[pfn] == 1).all()
    assert p.rss == {"anon": NR, "file": 0, "shmem": 0}
    assert cg.usage == PMD_SIZE and free0 - s.phys.nr_free() == NR
    assert np.array_equal(p.read(ptr, PMD_SIZE), data)
    p.exit()
    assert cg.usage == 0 and s.phys.nr_free() == free0


def test_read_maps_the_huge_zero_page_and_a_write_replaces_it():
    s = system()
    p = s.spawn()
    _, ptr = thp_region(p)
    assert not p.read(ptr, PMD_SIZE).any()
    e = ptes(p, ptr)
    hz = s.phys.huge_zero_pfn
    assert hz > 0 and huge(e).all() and (pt.pte_pfn(e) == hz + np.arange(NR)).all()
    assert not pt.pte_write(e).any()
    assert p.rss["anon"] == 0 and (s.phys.pages.mapcount[hz:hz + NR] == 0).all()
    p.write(ptr + 5 * PAGE_SIZE, b"y")
    e = ptes(p, ptr)
    assert huge(e).all() and pt.pte_write(e).all() and pt.pte_pfn(e)[0] != hz
    assert p.rss["anon"] == NR
    got = p.read(ptr, PMD_SIZE)
    assert got[5 * PAGE_SIZE] == ord("y") and np.count_nonzero(got) == 1


def test_thp_falls_back_to_small_pages_over_the_memcg_limit():
    s = system()
    cg = s.memcg("small", limit_bytes=PMD_SIZE - PAGE_SIZE)
    p = s.spawn(memcg=cg)
    _, ptr = thp_region(p)
    p.write(ptr, b"z" * 100)
    assert not huge(ptes(p, ptr)).any() and p.rss["anon"] == 1
    assert not s.oom_kills and cg.usage == PAGE_SIZE


@pytest.mark.parametrize("how", ["munmap", "dontneed"])
def test_partial_unmap_splits_the_pmd_and_frees_what_went(how):
    s = system()
    cg = s.memcg("g")
    p = s.spawn(memcg=cg)
    free0 = s.phys.nr_free()
    _, ptr = thp_region(p)
    data = pattern(PMD_SIZE, 1)
    p.write(ptr, data)
    lo, hi = ptr + PMD_SIZE // 4, ptr + 3 * PMD_SIZE // 4
    if how == "munmap":
        p.munmap(lo, hi - lo)
    else:
        p.madvise(lo, hi - lo, MADV_DONTNEED)
    e = np.concatenate((ptes(p, ptr, NR // 4), ptes(p, hi, NR // 4)))
    assert not huge(e).any() and pt.pte_present(e).all()
    # the folio was split at once (deferred split), its unmapped quarter-halves freed
    assert (s.phys.pages.order[pt.pte_pfn(e)] == 0).all()
    assert p.rss["anon"] == NR // 2 and cg.usage == PMD_SIZE // 2
    assert free0 - s.phys.nr_free() == NR // 2
    assert np.array_equal(p.read(ptr, PMD_SIZE // 4), data[:PMD_SIZE // 4])
    assert np.array_equal(p.read(hi, PMD_SIZE // 4), data[3 * PMD_SIZE // 4:])
    if how == "dontneed":
        assert not p.read(lo, hi - lo).any()


def test_whole_pmd_dontneed_frees_the_folio_as_one():
    s = system()
    p = s.spawn()
    free0 = s.phys.nr_free()
    _, ptr = thp_region(p)
    p.write(ptr, pattern(PMD_SIZE))
    folios = s.phys.nr_folios
    p.madvise(ptr, PMD_SIZE, MADV_DONTNEED)
    assert s.phys.nr_folios == folios - 1 and s.phys.nr_free() == free0
    # the 2 MiB block is whole again: the next fault gets a THP from it
    p.write(ptr, b"a")
    assert huge(ptes(p, ptr)).all()


def test_mprotect_keeps_a_whole_pmd_and_splits_a_straddled_one():
    s = system()
    p = s.spawn()
    _, ptr = thp_region(p)
    data = pattern(PMD_SIZE, 2)
    p.write(ptr, data)
    p.mprotect(ptr, PMD_SIZE, PROT_READ)
    e = ptes(p, ptr)
    assert huge(e).all() and not pt.pte_write(e).any()
    p.mprotect(ptr, PAGE_SIZE, RW)
    e = ptes(p, ptr)
    assert not huge(e).any()
    assert s.phys.pages.order[pt.pte_pfn(e)[0]] == 9      # the folio itself stays whole
    assert np.array_equal(p.read(ptr, PMD_SIZE), data)
    p.write(ptr, b"q")                                   # the one writable page: reused in place
    assert pt.pte_pfn(ptes(p, ptr, 1))[0] == pt.pte_pfn(e)[0]


def test_mremap_keeps_the_pmd_only_when_moved_by_a_2mib_multiple():
    s = system()
    p = s.spawn()
    _, ptr = thp_region(p)
    data = pattern(PMD_SIZE, 3)
    p.write(ptr, data)
    dst = p.mmap(8 * PMD_SIZE, RW, ANON)
    dst = (dst + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    a = p.mremap(ptr, PMD_SIZE, PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, dst)
    assert huge(ptes(p, a)).all() and np.array_equal(p.read(a, PMD_SIZE), data)
    b = p.mremap(a, PMD_SIZE, PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, dst + 3 * PMD_SIZE + PAGE_SIZE)
    assert not huge(ptes(p, b)).any() and np.array_equal(p.read(b, PMD_SIZE), data)


def test_fork_shares_the_pmd_and_a_write_copies_only_its_page():
    s = system()
    p = s.spawn()
    _, ptr = thp_region(p)
    data = pattern(PMD_SIZE, 4)
    p.write(ptr, data)
    c = p.fork()
    pe, ce = ptes(p, ptr), ptes(c, ptr)
    assert huge(pe).all() and huge(ce).all() and (pt.pte_pfn(pe) == pt.pte_pfn(ce)).all()
    assert not pt.pte_write(pe).any() and (s.phys.pages.mapcount[pt.pte_pfn(pe)] == 2).all()
    p.write(ptr + 7 * PAGE_SIZE, b"P")
    pe2 = ptes(p, ptr)
    assert not huge(pe2).any()
    moved = np.nonzero(pt.pte_pfn(pe2) != pt.pte_pfn(pe))[0]
    assert moved.tolist() == [7]                          # 4 KiB COW, not 2 MiB
    assert huge(ptes(c, ptr)).all()                       # the child's PMD stays
    assert p.rss["anon"] == NR and c.rss["anon"] == NR
    assert np.array_equal(c.read(ptr, PMD_SIZE), data)
    c.exit()
    # the parent's pages are its own again: a write reuses them
    p.write(ptr, b"Q")
    assert pt.pte_pfn(ptes(p, ptr, 1))[0] == pt.pte_pfn(pe)[0]
    want = data.copy()
    want[7 * PAGE_SIZE] = ord("P")
    want[0] = ord("Q")
    assert np.array_equal(p.read(ptr, PMD_SIZE), want)


def test_fork_copies_a_pinned_page_and_splits_its_pmd():
    s = system()
    p = s.spawn()
    _, ptr = thp_region(p)
    p.write(ptr, pattern(PMD_SIZE, 5))
    pin = p.pin_user_pages(ptr + 3 * PAGE_SIZE, 1, write=True)
    c = p.fork()
    assert not huge(ptes(p, ptr)).any()
    ce = ptes(c, ptr)
    assert pt.pte_pfn(ce)[3] != pin.pfns[0]               # the child got its own copy
    p.write(ptr + 3 * PAGE_SIZE, b"!")                   # no COW: the pin stays what p maps
    assert pt.pte_pfn(ptes(p, ptr + 3 * PAGE_SIZE, 1))[0] == pin.pfns[0]
    pin.unpin()
    c.exit()


def test_madv_collapse_builds_a_thp_from_small_pages():
    s = system(thp="never")                               # MADV_COLLAPSE ignores the mode
    p = s.spawn()
    _, ptr = thp_region(p, advice=None)
    data = pattern(PMD_SIZE, 6)
    data[:PAGE_SIZE] = 0
    p.write(ptr + PAGE_SIZE, data[PAGE_SIZE:PMD_SIZE // 2])
    p.read(ptr + PMD_SIZE // 2, 1)                        # a zero page
    p.write(ptr + PMD_SIZE // 2 + PAGE_SIZE, data[PMD_SIZE // 2 + PAGE_SIZE:])
    data[PMD_SIZE // 2:PMD_SIZE // 2 + PAGE_SIZE] = 0
    p.madvise(ptr, PMD_SIZE, MADV_COLLAPSE)
    e = ptes(p, ptr)
    assert huge(e).all() and pt.pte_write(e).all() and p.rss["anon"] == NR
    assert np.array_equal(p.read(ptr, PMD_SIZE), data)
    p.madvise(ptr, PMD_SIZE, MADV_COLLAPSE)               # already a PMD: nothing to do
    assert (pt.pte_pfn(ptes(p, ptr)) == pt.pte_pfn(e)).all()


def test_madv_collapse_errors():
    s = system()
    p = s.spawn()
    _, ptr = thp_region(p, advice=MADV_NOHUGEPAGE)
    with pytest.raises(OSError) as ei:
        p.madvise(ptr, PMD_SIZE, MADV_COLLAPSE)
    assert ei.value.errno == errno.EINVAL
    _, ptr = thp_region(p, advice=None)
    p.write(ptr, pattern(PMD_SIZE))
    pin = p.pin_user_pages(ptr, 1)
    with pytest.raises(OSError) as ei:
        p.madvise(ptr, PMD_SIZE, MADV_COLLAPSE)
    assert ei.value.errno == errno.EAGAIN and not huge(ptes(p, ptr)).any()
    pin.unpin()
    # no whole free 2 MiB block left: ENOMEM
    small = system(ram=4 << 20, hugetlb_pages=0)
    q = small.spawn()
    _, qp = thp_region(q, advice=None)
    q.write(qp, pattern(PMD_SIZE))
    with pytest.raises(OSError) as ei:
        q.madvise(qp, PMD_SIZE, MADV_COLLAPSE)
    assert ei.value.errno == errno.ENOMEM


def test_hmm_range_fault_reports_the_pmd_order():
    s = system()
    p = s.spawn()
    base, ptr = thp_region(p)
    small = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(ptr, b"x")
    p.write(small, b"y")

    class Ops:
        def invalidate(self, mni, rng, seq):
            mmu_interval_set_seq(mni, seq)
            return True
    mni = MmuIntervalNotifier()
    mmu_interval_notifier_insert(mni, p.mm, 0, 1 << 46, Ops())
    for addr, n, order in ((ptr, NR, 9), (small, 4, 0)):
        r = HmmRange(notifier=mni, start=addr, end=addr + n * PAGE_SIZE,
                     default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
        r.notifier_seq = mmu_interval_read_begin(mni)
        with p.mm.mmap_lock.read():
            assert hmm_range_fault(r) == 0
        assert (hmm_pfn_to_map_order(r.hmm_pfns) == order).all()
        assert (hmm_pfn_to_pfn(r.hmm_pfns) == pt.pte_pfn(ptes(p, addr, n))).all()
    # a read of an untouched THP range faults the huge zero page in, at order 9 too
    r = HmmRange(notifier=mni, start=ptr, end=ptr + PMD_SIZE,
                 default_flags=HMM_PFN_REQ_FAULT)
    p.madvise(ptr, PMD_SIZE, MADV_DONTNEED)
    r.notifier_seq = mmu_interval_read_begin(mni)
    with p.mm.mmap_lock.read():
        assert hmm_range_fault(r) == 0
    assert (hmm_pfn_to_map_order(r.hmm_pfns) == 9).all()
    assert hmm_pfn_to_pfn(r.hmm_pfns)[0] == s.phys.huge_zero_pfn


# -- hugetlbfs ------------------------------------------------------------------------------

def test_hugetlb_pool_serves_map_hugetlb_and_takes_pages_back():
    s = system(hugetlb_pages=3)
    pool = s.phys.hugetlb
    p = s.spawn()
    free0 = s.phys.nr_free()
    assert pool.nr_free() == 3
    a = p.mmap(PMD_SIZE + PAGE_SIZE, RW, ANON | MAP_HUGETLB)      # rounded up to 2 huge pages
    assert a % PMD_SIZE == 0 and pool.nr_free() == 1
    data = pattern(2 * PMD_SIZE, 7)
    p.write(a, data)
    e = ptes(p, a, 2 * NR)
    assert huge(e).all() and np.array_equal(p.read(a, 2 * PMD_SIZE), data)
    assert p.rss == {"anon": 0, "file": 0, "shmem": 0}             # HugetlbPages, not rss
    assert s.phys.nr_free() == free0                              # nothing from the allocator
    with pytest.raises(OSError) as ei:
        p.mmap(2 * PMD_SIZE, RW, ANON | MAP_HUGETLB)
    assert ei.value.errno == errno.ENOMEM and pool.nr_free() == 1
    for bad in ((a + PAGE_SIZE, PMD_SIZE), (a, PAGE_SIZE)):
        with pytest.raises(OSError) as ei:
            p.munmap(*bad)
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        p.mprotect(a, PAGE_SIZE, PROT_READ)
    assert ei.value.errno == errno.EINVAL
    p.munmap(a, PMD_SIZE)
    assert pool.nr_free() == 2
    p.madvise(a + PMD_SIZE, PMD_SIZE, MADV_DONTNEED)
    assert pool.nr_free() == 3
    assert not p.read(a + PMD_SIZE, 8).any() and pool.nr_free() == 2     # refaulted from the pool
    with pytest.raises(OSError) as ei:
        p.mmap(PMD_SIZE, RW, ANON | MAP_HUGETLB | MAP_FIXED, addr=a + PAGE_SIZE)
    assert ei.value.errno == errno.EINVAL


def test_hugetlb_mremap_and_shared_mappings_keep_every_count_right():
    """mremap of a private hugetlb mapping (moved, shrunk), a shared one across fork and
    MADV_DONTNEED: references, mapcounts, the object's pages and rss agree at every step, and
    the pool has every page back at the end."""
    s = hmmgpu.System(backend="numpy", ram_bytes=64 << 20, hugetlb_pages=4)
    p = s.spawn()
    a = p.mmap(2 * PMD_SIZE, RW, ANON | MAP_HUGETLB)
    p.write(a, b"x" * 100)
    b = p.mmap(4 * PMD_SIZE, RW, ANON)
    t = p.mremap(a, 2 * PMD_SIZE, 2 * PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, -(-b // PMD_SIZE) * PMD_SIZE)
    check_system(s)
    c = p.fork()
    c.write(t, b"y")
    p.mremap(t, 2 * PMD_SIZE, PMD_SIZE, 0)
    check_system(s)
    sh = p.mmap(PMD_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB)
    p.write(sh, b"z")
    c2 = p.fork()
    c2.write(sh, b"w")
    p.madvise(sh, PMD_SIZE, MADV_DONTNEED)
    check_system(s)
    assert p.read(sh, 1).tobytes() == b"w"
    check_system(s)
    for q in (c, c2, p):
        q.exit()
        check_system(s)
    assert s.phys.hugetlb.nr_free() == 4


def test_hugetlb_cow_copies_the_whole_page_from_the_pool():
    s = system(hugetlb_pages=2)
    pool = s.phys.hugetlb
    p = s.spawn()
    a = p.mmap(PMD_SIZE, RW, ANON | MAP_HUGETLB)
    data = pattern(PMD_SIZE, 8)
    p.write(a, data)
    c = p.fork()
    assert pool.nr_free() == 1
    c.write(a + 9, b"c")
    assert pool.nr_free() == 0 and huge(ptes(c, a)).all()
    assert np.array_equal(p.read(a, PMD_SIZE), data)
    want = data.copy()
    want[9] = ord("c")
    assert np.array_equal(c.read(a, PMD_SIZE), want)
    c.exit()
    assert pool.nr_free() == 1
    # the pool is empty when the next COW needs a page: SIGBUS
    c = p.fork()
    b = p.mmap(PMD_SIZE, RW, ANON | MAP_HUGETLB)
    assert pool.nr_free() == 0
    with pytest.raises(hmmgpu.BusError):
        c.write(a, b"x")
    c.exit()
    p.munmap(b, PMD_SIZE)
    p.exit()
    assert pool.nr_free() == 2


def test_default_pool_and_its_limits():
    assert system(ram=128 << 20).phys.hugetlb.nr_free() == 2
    assert system(ram=8 << 20).phys.hugetlb.nr_free() == 0
    with pytest.raises(OSError) as ei:
        system(ram=8 << 20, hugetlb_pages=4)
    assert ei.value.errno == errno.ENOMEM
    s = system(hugetlb_pages=0)
    with pytest.raises(OSError) as ei:
        s.spawn().mmap(PMD_SIZE, RW, ANON | MAP_HUGETLB)
    assert ei.value.errno == errno.ENOMEM


def test_splitting_one_folio_leaves_its_neighbours_pmd_mapped():
    from hmmgpu.mm.huge_memory import split_folio
    s = system()
    p = s.spawn()
    _, ptr = thp_region(p, n=3)
    p.write(ptr, pattern(3 * PMD_SIZE, 9))
    e = ptes(p, ptr, 3 * NR)
    assert huge(e).all()
    heads = pt.pte_pfn(e)[[0, 2 * NR]]
    split_folio(s, heads, list(p.mm.vmas))
    e = ptes(p, ptr, 3 * NR)
    assert not huge(e[:NR]).any() and huge(e[NR:2 * NR]).all() and not huge(e[2 * NR:]).any()
    assert (s.phys.pages.order[pt.pte_pfn(e[NR:2 * NR])] == 9).all()
    assert (s.phys.pages.order[pt.pte_pfn(e[:NR])] == 0).all()


def test_a_freed_thp_block_stays_whole_until_small_pages_need_it():
    s = system(ram=8 << 20, hugetlb_pages=0)
    p = s.spawn()
    base, ptr = thp_region(p)
    p.write(ptr, b"a")
    head = int(pt.pte_pfn(ptes(p, ptr, 1))[0])
    p.munmap(base, 2 * PMD_SIZE)
    free = s.phys.nr_free()
    small = p.mmap(16 * PAGE_SIZE, RW, ANON)
    p.write(small, pattern(16 * PAGE_SIZE))
    got = pt.pte_pfn(ptes(p, small, 16))
    assert not ((got >= head) & (got < head + NR)).any()        # the block was left whole
    base, ptr = thp_region(p)
    p.write(ptr, b"b")
    assert int(pt.pte_pfn(ptes(p, ptr, 1))[0]) == head          # and the next THP takes it
    p.munmap(base, 2 * PMD_SIZE)
    # small pages take the block when nothing else is left
    n = s.phys.nr_free()
    assert n == free - 16
    big = p.mmap(n * PAGE_SIZE, RW, ANON | hmmgpu.MAP_POPULATE)
    assert s.phys.nr_free() == 0 and p.rss["anon"] == 16 + n
    assert not p.read(big, n * PAGE_SIZE).any()
