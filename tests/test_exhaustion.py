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
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.drivers import dmirror

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


def errno_of(fn, *a):
    with pytest.raises(OSError) as ei:
        fn(*a)
    return ei.value.errno
