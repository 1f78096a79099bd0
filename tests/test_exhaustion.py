"""Exhaustion: RAM and device memory filled (issue 10).

What must happen when memory runs out: a clean ENOMEM, or an OOM kill by rss that really tears
the victim down (no VMAs, rss 0, its frames free, its mirrors empty) so that the next allocation
succeeds without killing anybody else; survivors keep their data; and once every process has
exited and every file is closed, every frame of RAM and of every device is free again.
"""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.drivers import dmirror
from invariants import errno_of

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def fill(proc, npages, value, flags=ANON):
    a = proc.mmap(npages * P, RW, flags)
    proc.write(a, np.full(npages * P, value, np.uint8))
    return a


def torn_down(proc):
    return (not proc.alive and not proc.mm.vmas and proc.rss == {"anon": 0, "file": 0, "shmem": 0})


def all_free(system, free0, devices=()):
    pg = system.phys.pages
    return (system.phys.nr_free() == free0 and not pg.refcount[1:system.phys.nr_ram].any()
            and not (pg.flags[1:] & 1).any() and all(d.nr_allocated() == 0 for d in devices))


@pytest.mark.parametrize("kind", ["private", "coherent"])
def test_oom_kill_from_a_device_fault_tears_the_victim_down(kind):
    """Defect 5: the faulting process was marked and "killed" (ProcessKilled raised) but stayed
    alive with its rss; the next allocation then killed an innocent process."""
    system = hmmgpu.System(backend="numpy", ram_bytes=512 * P)
    free0 = system.phys.nr_free()
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    A, B = system.spawn(), system.spawn()
    b = fill(B, 60, 0xB)
    a = A.mmap(300 * P, RW, ANON)
    A.write(a, np.full(100 * P, 0xA, np.uint8))            # A: rss 100, the largest
    m = d.open(A)
    with pytest.raises(hmmgpu.ProcessKilled):
        m.write(a, np.full(300 * P, 1, np.uint8))           # needs more frames than are free
    assert torn_down(A), (A, A.mm.vmas[:2])
    assert [pid for pid, _ in system.oom_kills] == [A.pid]
    C = system.spawn()
    c = fill(C, 150, 0xC)                                   # fits now: nobody else is killed
    assert [pid for pid, _ in system.oom_kills] == [A.pid] and B.alive
    assert (B.read(b, 60 * P) == 0xB).all() and (C.read(c, 150 * P) == 0xC).all()
    assert errno_of(m.read, a, 1) == errno.EINVAL          # the mirror of a dead process
    m.close()
    B.exit()
    C.exit()
    assert all_free(system, free0, [d])


def test_oom_kill_by_rss_from_cpu_faults():
    """RAM runs out under CPU stores: the largest rss dies, completely; the survivors keep their
    data; the faulting store then completes; every frame comes back after the exits."""
    system = hmmgpu.System(backend="numpy", ram_bytes=256 * P)
    free0 = system.phys.nr_free()
    small, big, writer = system.spawn(), system.spawn(), system.spawn()
    s = fill(small, 20, 0x51)
    fill(big, 150, 0xB1)
    w = writer.mmap(100 * P, RW, ANON)
    writer.write(w, np.full(100 * P, 0x77, np.uint8))      # needs what big holds
    assert torn_down(big) and [pid for pid, _ in system.oom_kills] == [big.pid]
    assert (small.read(s, 20 * P) == 0x51).all() and (writer.read(w, 100 * P) == 0x77).all()
    small.exit()
    writer.exit()
    assert all_free(system, free0)


def test_oom_in_a_memcg_kills_only_inside_it():
    system = hmmgpu.System(backend="numpy", ram_bytes=1024 * P)
    free0 = system.phys.nr_free()
    cg = system.memcg("box", 64 * P)
    outside = system.spawn()
    o = fill(outside, 200, 0x0E)                          # the largest rss, but not in the box
    inside_big, inside = system.spawn(memcg=cg), system.spawn(memcg=cg)
    fill(inside_big, 40, 0x1B)
    a = inside.mmap(40 * P, RW, ANON)
    inside.write(a, np.full(40 * P, 0x1A, np.uint8))
    assert torn_down(inside_big) and outside.alive and inside.alive
    assert (outside.read(o, 200 * P) == 0x0E).all() and (inside.read(a, 40 * P) == 0x1A).all()
    assert cg.usage == 40 * P
    # a single allocation larger than the whole limit: nobody left to kill but the faulter
    with pytest.raises(hmmgpu.ProcessKilled):
        b = inside.mmap(80 * P, RW, ANON)
        inside.write(b, np.full(80 * P, 1, np.uint8))
    assert torn_down(inside) and cg.usage == 0
    outside.exit()
    assert all_free(system, free0)


def test_no_victim_left_is_a_clean_enomem():
    """With only the zero page to give, an allocation that nobody can free memory for is
    ENOMEM (or kills the faulting process itself), never a hang or a half-done state."""
    system = hmmgpu.System(backend="numpy", ram_bytes=64 * P)
    free0 = system.phys.nr_free()
    p = system.spawn()
    a = p.mmap(200 * P, RW, ANON)
    with pytest.raises(OSError) as ei:
        p.write(a, np.full(200 * P, 3, np.uint8))
    assert ei.value.errno in (errno.ENOMEM, errno.ESRCH)
    if p.alive:
        p.exit()
    assert torn_down(p) and all_free(system, free0)


@pytest.mark.parametrize("kind", ["private", "coherent"])
def test_device_memory_filled(kind):
    """More pages than the device holds: migrate_to_dev moves what fits and says the rest did
    not (ENOENT, as dmirror_migrate_to_device's readback); nothing is lost, and every device
    page comes back at the process's exit, the open still open."""
    system = hmmgpu.System(backend="numpy", ram_bytes=16 << 20)
    free0 = system.phys.nr_free()
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=32, max_chunks=2)   # 64 pages
    p = system.spawn()
    a = fill(p, 100, 0)
    data = np.random.default_rng(3).integers(0, 256, 100 * P, dtype=np.uint8)
    p.write(a, data)
    m = d.open(p)
    with pytest.raises(OSError) as ei:
        m.migrate_to_dev(a, 100)
    assert ei.value.errno == errno.ENOENT
    assert d.nr_allocated() == 64 and d.nr_free() == 0
    assert (m.read(a, 100).data == data).all()
    assert m.migrate_to_sys(a, 100).cpages == 64 and d.nr_allocated() == 0
    assert (p.read(a, 100 * P) == data).all()
    m.migrate_to_dev(a, 64)
    p.exit()                                              # the mirror is not closed
    assert d.nr_allocated() == 0 and all_free(system, free0, [d])
    m.close()


def test_device_pages_come_home_when_ram_is_full():
    """Device-private pages must come back to RAM on a CPU touch; with RAM full the OOM killer
    frees room from the largest process, and nothing is lost in the process that touched."""
    system = hmmgpu.System(backend="numpy", ram_bytes=256 * P)
    free0 = system.phys.nr_free()
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=64)
    p, hog = system.spawn(), system.spawn()
    a = fill(p, 32, 0x3C)
    m = d.open(p)
    m.migrate_to_dev(a, 32)
    fill(hog, system.phys.nr_free() - 4, 0x40)            # RAM is now (nearly) full
    assert (p.read(a, 32 * P) == 0x3C).all()              # back from the device: hog dies
    assert torn_down(hog)
    m.close()
    p.exit()
    assert all_free(system, free0, [d])


def test_address_space_larger_than_page_tables_fit_in_ram():
    system = hmmgpu.System(backend="numpy", ram_bytes=64 * P)
    p = system.spawn()
    budget = system.phys.nr_ram * 512
    a = p.mmap((budget - 16) * P, PROT_READ, ANON)        # fits
    with pytest.raises(OSError) as ei:
        p.mmap(32 * P, PROT_READ, ANON)                   # one page table too many
    assert ei.value.errno == errno.ENOMEM
    p.munmap(a, (budget - 16) * P)
    p.mmap(32 * P, PROT_READ, ANON)
    p.exit()


def test_device_write_with_ram_full_fails_cleanly_or_kills_by_rss():
    """A device write needs a bounce buffer and pages to write: with RAM full the OOM killer
    picks the largest rss (here not the writer), and the write completes."""
    system = hmmgpu.System(backend="numpy", ram_bytes=256 * P)
    free0 = system.phys.nr_free()
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p, hog = system.spawn(), system.spawn()
    a = p.mmap(16 * P, RW, ANON)
    m = d.open(p)
    fill(hog, system.phys.nr_free() - 2, 0x40)
    assert m.write(a, np.full(16 * P, 0x2D, np.uint8)).cpages == 16
    assert torn_down(hog) and (p.read(a, 16 * P) == 0x2D).all()
    m.close()
    p.exit()
    assert all_free(system, free0, [d])
