"""fork(): copy-on-write for private mappings, sharing for shared ones (mm/memory.c copy_page_range,
do_wp_page; shared anonymous memory is shmem)."""
import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SHANON = MAP_SHARED | MAP_ANONYMOUS


def fill(proc, addr, npages, seed):
    data = np.random.default_rng(seed).integers(1, 256, size=npages * P, dtype=np.uint8)
    proc.write(addr, data)
    return data


def test_fork_copies_address_space_layout(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    b = p.mmap(2 * P, PROT_READ, ANON)
    p.mprotect(a + P, P, PROT_READ)
    c = p.fork()
    assert [(v.start, v.end) for v in c.mm.vmas] == [(v.start, v.end) for v in p.mm.vmas]
    assert c.mm is not p.mm
    with pytest.raises(hmmgpu.SegmentationFault):
        c.write(a + P, b"x")          # protections are inherited
    with pytest.raises(hmmgpu.SegmentationFault):
        c.write(b, b"x")


def test_fork_write_protects_and_shares_pages(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    fill(p, a, 4, 1)
    free0 = mmh.nr_free(mm_system)
    c = p.fork()
    assert mmh.nr_free(mm_system) == free0, "fork must not copy anon pages eagerly"
    for i in range(4):
        pf, cf = mmh.pfn(p, a + i * P), mmh.pfn(c, a + i * P)
        assert pf == cf
        assert not mmh.writable(p, a + i * P) and not mmh.writable(c, a + i * P)
        assert mmh.mapcount(mm_system, pf) == 2
        assert mmh.refcount(mm_system, pf) == 2


def test_cow_parent_writes_child_keeps_old(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(3 * P, RW, ANON)
    data = fill(p, a, 3, 2)
    c = p.fork()
    old = mmh.pfn(p, a + P)
    p.write(a + P + 7, b"parent")
    assert bytes(p.read(a + P + 7, 6)) == b"parent"
    assert np.array_equal(c.read(a, 3 * P), data)
    # only the written page was copied
    assert mmh.pfn(p, a + P) != old and mmh.pfn(c, a + P) == old
    assert mmh.pfn(p, a) == mmh.pfn(c, a)
    assert mmh.mapcount(mm_system, old) == 1 and mmh.refcount(mm_system, old) == 1
    # rest of the copied page is the old content
    got = p.read(a + P, P)
    exp = data[P:2 * P].copy()
    exp[7:13] = np.frombuffer(b"parent", np.uint8)
    assert np.array_equal(got, exp)


def test_cow_child_writes_parent_keeps_old(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    data = fill(p, a, 2, 3)
    c = p.fork()
    c.write(a, b"child")
    assert np.array_equal(p.read(a, 2 * P), data)
    assert bytes(c.read(a, 5)) == b"child"
    assert np.array_equal(c.read(a + 5, 2 * P - 5), data[5:])


def test_cow_last_user_reuses_page(mm_system, mmh):
    # do_wp_page(): an anonymous page nobody else references is reused, not copied
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    fill(p, a, 1, 4)
    c = p.fork()
    c.write(a, b"c")               # child copies, parent is now the only user of the old page
    pf = mmh.pfn(p, a)
    free0 = mmh.nr_free(mm_system)
    p.write(a, b"p")
    assert mmh.pfn(p, a) == pf, "write fault on an exclusive anon page must reuse it"
    assert mmh.nr_free(mm_system) == free0
    assert mmh.writable(p, a)


def test_cow_after_child_exit_reuses_page(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    fill(p, a, 2, 5)
    c = p.fork()
    pf = mmh.pfn(p, a)
    c.exit()
    assert mmh.refcount(mm_system, pf) == 1 and mmh.mapcount(mm_system, pf) == 1
    free0 = mmh.nr_free(mm_system)
    p.write(a, b"x")
    assert mmh.pfn(p, a) == pf
    assert mmh.nr_free(mm_system) == free0


def test_cow_three_generations(mm_system):
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"gen0")
    c = p.fork()
    c.write(a, b"gen1")
    g = c.fork()
    g.write(a, b"gen2")
    c2 = p.fork()
    assert bytes(p.read(a, 4)) == b"gen0"
    assert bytes(c.read(a, 4)) == b"gen1"
    assert bytes(g.read(a, 4)) == b"gen2"
    assert bytes(c2.read(a, 4)) == b"gen0"
    p.write(a, b"PPPP")
    assert bytes(c2.read(a, 4)) == b"gen0"
    for q in (c, g, c2):
        q.exit()
    assert bytes(p.read(a, 4)) == b"PPPP"


def test_fork_of_zero_page_and_untouched_memory(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.read(a, 2 * P)                  # zero page mapped in the first two
    c = p.fork()
    free0 = mmh.nr_free(mm_system)
    assert not c.read(a, 4 * P).any()
    assert mmh.nr_free(mm_system) == free0
    c.write(a, b"c")
    assert not p.read(a, 4 * P).any(), "a child's write must never reach the zero page"
    p.write(a + 3 * P, b"p")
    assert not c.read(a + 3 * P, 1).any()


def test_shared_anon_is_shared_across_fork(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(3 * P, RW, SHANON)
    p.write(a, b"before fork")
    c = p.fork()
    assert bytes(c.read(a, 11)) == b"before fork"
    c.write(a + P, b"from child")
    assert bytes(p.read(a + P, 10)) == b"from child"
    p.write(a + 2 * P, b"from parent")          # a page neither had touched at fork time
    assert bytes(c.read(a + 2 * P, 11)) == b"from parent"
    for i in range(3):
        assert mmh.pfn(p, a + i * P) == mmh.pfn(c, a + i * P)
    assert p.rss["shmem"] == 3 and p.rss["anon"] == 0
    assert c.rss["shmem"] <= 3


def test_shared_anon_reads_are_not_zero_page(mm_system, mmh):
    # shmem read faults allocate a real page cache page: a later write by another sharer must be
    # visible to a reader that faulted first
    p = mm_system.spawn()
    a = p.mmap(P, RW, SHANON)
    c = p.fork()
    assert not c.read(a, P).any()
    p.write(a, b"late")
    assert bytes(c.read(a, 4)) == b"late"


def test_shared_anon_survives_parent_exit(mm_system, mmh):
    free0 = mmh.nr_free(mm_system)
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, SHANON)
    c = p.fork()
    p.write(a, b"keep")
    p.exit()
    assert bytes(c.read(a, 4)) == b"keep"
    c.exit()
    assert mmh.nr_free(mm_system) == free0


def test_private_and_shared_mixed_in_one_fork(mm_system):
    p = mm_system.spawn()
    priv = p.mmap(P, RW, ANON)
    shr = p.mmap(P, RW, SHANON)
    p.write(priv, b"priv")
    p.write(shr, b"shr0")
    c = p.fork()
    c.write(priv, b"PRIV")
    c.write(shr, b"SHR1")
    assert bytes(p.read(priv, 4)) == b"priv"
    assert bytes(p.read(shr, 4)) == b"SHR1"


def test_fork_then_exit_all_frees_all(mm_system, mmh):
    free0 = mmh.nr_free(mm_system)
    p = mm_system.spawn()
    a = p.mmap(8 * P, RW, ANON)
    fill(p, a, 8, 6)
    kids = [p.fork() for _ in range(3)]
    kids[0].write(a, b"k0")
    kids[1].write(a + 4 * P, b"k1")
    p.write(a + 7 * P, b"pp")
    for k in kids:
        k.exit()
    p.exit()
    assert mmh.nr_free(mm_system) == free0


def test_child_pid_distinct_and_alive(mm_system):
    p = mm_system.spawn()
    c = p.fork()
    assert c.alive and p.alive
    assert getattr(c, "pid", 1) != getattr(p, "pid", 2)
    c.exit()
    assert not c.alive and p.alive
    with pytest.raises(hmmgpu.ProcessKilled):
        c.fork()
