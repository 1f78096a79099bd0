"""rss counters (MM_ANONPAGES / MM_FILEPAGES / MM_SHMEMPAGES), memory cgroups and the OOM killer."""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu import MADV_DONTNEED, MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SHANON = MAP_SHARED | MAP_ANONYMOUS


def touch(proc, addr, npages, byte=1):
    proc.write(addr, np.full(npages * P, byte, np.uint8))


# ---------------------------------------------------------------------------------------------
# rss
# ---------------------------------------------------------------------------------------------

def test_rss_starts_empty(mm_system):
    p = mm_system.spawn()
    assert p.rss == {"anon": 0, "file": 0, "shmem": 0}
    p.mmap(100 * P, RW, ANON)
    assert p.rss == {"anon": 0, "file": 0, "shmem": 0}, "mmap alone faults nothing in"


def test_rss_anon_shmem_file(mm_system, mm_file):
    p = mm_system.spawn()
    a = p.mmap(8 * P, RW, ANON)
    touch(p, a, 5)
    s = p.mmap(4 * P, RW, SHANON)
    touch(p, s, 3)
    fd = mm_file(b"z" * (6 * P))
    f = p.mmap(6 * P, PROT_READ, MAP_SHARED, fd=fd)
    p.read(f, 2 * P)
    assert p.rss == {"anon": 5, "file": 2, "shmem": 3}
    p.munmap(a, 2 * P)
    p.madvise(a + 2 * P, P, MADV_DONTNEED)
    p.munmap(f, 6 * P)
    assert p.rss == {"anon": 2, "file": 0, "shmem": 3}


def test_rss_after_fork_and_cow(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    touch(p, a, 4)
    c = p.fork()
    # Linux copies the PTEs of anon VMAs at fork and counts them in the child
    assert c.rss["anon"] == 4 and p.rss["anon"] == 4
    c.write(a, b"x")
    assert c.rss["anon"] == 4 and p.rss["anon"] == 4
    c.munmap(a, 4 * P)
    assert c.rss["anon"] == 0 and p.rss["anon"] == 4


def test_rss_zero_page_and_mremap(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.read(a, 4 * P)
    assert p.rss["anon"] == 0
    touch(p, a, 2)
    assert p.rss["anon"] == 2
    n = p.mremap(a, 4 * P, 8 * P, hmmgpu.MREMAP_MAYMOVE)
    assert p.rss["anon"] == 2, "moving pages keeps them counted once"
    p.munmap(n, 8 * P)
    assert p.rss["anon"] == 0


# ---------------------------------------------------------------------------------------------
# memory cgroups
# ---------------------------------------------------------------------------------------------

def test_memcg_charge_and_uncharge(mm_system):
    cg = mm_system.memcg("charge", 1 << 20)
    assert cg.limit == 1 << 20 and cg.usage == 0
    p = mm_system.spawn(memcg=cg)
    a = p.mmap(16 * P, RW, ANON)
    assert cg.usage == 0
    p.read(a, 16 * P)
    assert cg.usage == 0, "the zero page is charged to nobody"
    touch(p, a, 10)
    assert cg.usage == 10 * P
    c = p.fork()
    assert cg.usage == 10 * P, "fork shares pages, charges nothing"
    c.write(a, b"x")
    assert cg.usage == 11 * P, "the child's COW copy is charged to its group"
    p.munmap(a, 16 * P)
    assert cg.usage == 10 * P
    c.exit()
    assert cg.usage == 0


def test_memcg_groups_are_separate(mm_system):
    g1 = mm_system.memcg("g1", 1 << 20)
    g2 = mm_system.memcg("g2", 1 << 20)
    p = mm_system.spawn(memcg=g1)
    q = mm_system.spawn(memcg=g2)
    r = mm_system.spawn()
    touch(p, p.mmap(3 * P, RW, ANON), 3)
    touch(q, q.mmap(5 * P, RW, ANON), 5)
    touch(r, r.mmap(7 * P, RW, ANON), 7)
    assert (g1.usage, g2.usage) == (3 * P, 5 * P)


def test_memcg_charges_shmem_and_page_cache(mm_system, mm_file):
    cg = mm_system.memcg("cache", 1 << 20)
    p = mm_system.spawn(memcg=cg)
    s = p.mmap(2 * P, RW, SHANON)
    touch(p, s, 2)
    fd = mm_file(b"q" * (3 * P))
    f = p.mmap(3 * P, PROT_READ, MAP_SHARED, fd=fd)
    p.read(f, 3 * P)
    assert cg.usage == 5 * P


def test_memcg_oom_kills_largest_in_group(mm_system, mmh):
    cg = mm_system.memcg("small", 32 * P)
    big = mm_system.spawn(memcg=cg)
    small = mm_system.spawn(memcg=cg)
    outsider = mm_system.spawn()
    ob = outsider.mmap(64 * P, RW, ANON)
    touch(outsider, ob, 64, 9)                 # bigger than anyone in the group: not a candidate
    b = big.mmap(20 * P, RW, ANON)
    touch(big, b, 20)
    s = small.mmap(12 * P, RW, ANON)
    touch(small, s, 10, 5)
    assert cg.usage == 30 * P
    free_before = mmh.nr_free(mm_system)
    touch(small, s + 10 * P, 2, 6)             # 32 pages: exactly at the limit is fine
    assert big.alive and cg.usage == 32 * P
    s2 = small.mmap(4 * P, RW, ANON)
    touch(small, s2, 4, 7)                     # over the limit: the group's largest rss dies
    assert not big.alive
    assert small.alive and outsider.alive
    assert np.all(small.read(s, 10 * P) == 5) and np.all(small.read(s2, 4 * P) == 7)
    assert np.all(outsider.read(ob, 64 * P) == 9)
    assert cg.usage == 16 * P
    assert mmh.nr_free(mm_system) == free_before - 2 - 4 + 20
    with pytest.raises(hmmgpu.ProcessKilled) as ei:
        big.read(b, 1)
    assert ei.value.errno == errno.ESRCH
    for call in (lambda: big.write(b, b"x"), lambda: big.mmap(P, RW, ANON), lambda: big.fork(),
                 lambda: big.munmap(b, P)):
        with pytest.raises(hmmgpu.ProcessKilled):
            call()


def test_memcg_oom_kills_the_faulting_process_when_it_is_largest(mm_system, mmh):
    free0 = mmh.nr_free(mm_system)
    cg = mm_system.memcg("self", 16 * P)
    p = mm_system.spawn(memcg=cg)
    q = mm_system.spawn(memcg=cg)
    touch(q, q.mmap(4 * P, RW, ANON), 4)
    a = p.mmap(32 * P, RW, ANON)
    with pytest.raises(hmmgpu.ProcessKilled) as ei:
        touch(p, a, 32)
    assert ei.value.errno == errno.ESRCH
    assert not p.alive and q.alive
    assert cg.usage == 4 * P
    q.exit()
    assert cg.usage == 0
    assert mmh.nr_free(mm_system) == free0


def test_memcg_unlimited(mm_system):
    cg = mm_system.memcg("nolimit", None)
    p = mm_system.spawn(memcg=cg)
    touch(p, p.mmap(64 * P, RW, ANON), 64)
    assert p.alive and cg.usage == 64 * P


# ---------------------------------------------------------------------------------------------
# system OOM
# ---------------------------------------------------------------------------------------------

def test_system_oom_kills_largest_rss(mm_system_factory, mmh):
    system = mm_system_factory(ram_bytes=512 * P)
    n = mmh.nr_free(system)
    big, mid, new = system.spawn(), system.spawn(), system.spawn()
    b = big.mmap((n // 2) * P, RW, ANON)
    touch(big, b, n // 2, 1)
    m = mid.mmap((n // 4) * P, RW, ANON)
    touch(mid, m, n // 4, 2)
    left = mmh.nr_free(system)
    assert left == n - n // 2 - n // 4
    x = new.mmap((left + 10) * P, RW, ANON)
    touch(new, x, left + 10, 3)              # runs out: the largest rss (big) is killed
    assert not big.alive
    assert mid.alive and new.alive
    assert np.all(new.read(x, (left + 10) * P) == 3)
    assert np.all(mid.read(m, (n // 4) * P) == 2)
    assert mmh.nr_free(system) == n - n // 4 - (left + 10)


def test_system_oom_drops_clean_page_cache_before_killing(mm_system_factory, mm_file, mmh):
    system = mm_system_factory(ram_bytes=256 * P)
    n = mmh.nr_free(system)
    fd = mm_file(b"c" * (n // 2 * P))
    reader = system.spawn()
    f = reader.mmap(n // 2 * P, PROT_READ, MAP_SHARED, fd=fd)
    reader.read(f, n // 2 * P)
    reader.munmap(f, n // 2 * P)               # clean, unmapped page cache: reclaimable
    p = system.spawn()
    a = p.mmap((n - 8) * P, RW, ANON)
    touch(p, a, n - 8)
    assert p.alive and reader.alive, "reclaimable page cache must be reclaimed before any OOM kill"


def test_oom_kill_runs_teardown(mm_system_factory, mm_file, mmh):
    # a killed process's dirty shared file pages are written back like at exit
    system = mm_system_factory(ram_bytes=256 * P)
    n = mmh.nr_free(system)
    fd = mm_file(b"\0" * P)
    victim = system.spawn()
    f = victim.mmap(P, RW, MAP_SHARED, fd=fd)
    victim.write(f, b"victim")
    v = victim.mmap((n // 2) * P, RW, ANON)
    touch(victim, v, n // 2)
    other = system.spawn()
    o = other.mmap(n * P, RW, ANON)
    touch(other, o, n // 2 - 10)
    touch(other, o + (n // 2 - 10) * P, 20)
    assert not victim.alive and other.alive
    system.writeback()
    assert mm_file.contents(fd)[:6] == b"victim"
