"""dmirror under hostile arguments, races and failures (issue 10): each test here failed before
the fix it names.  Isolation between processes and opens, acknowledged writes that must not be
lost, pages that must never stay locked, and the exact counters and protections of
lib/test_hmm.c / mm/migrate_device.c."""
import errno
import threading

import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.constants import TASK_SIZE
from hmmgpu.drivers import dmirror

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
U = np.uint64


@pytest.fixture(params=["private", "coherent"])
def kind(request):
    return request.param


@pytest.fixture
def system():
    return hmmgpu.System(backend="numpy", ram_bytes=16 << 20)


def errno_of(fn, *a):
    with pytest.raises(OSError) as ei:
        fn(*a)
    return ei.value.errno


def no_locked_pages(system):
    return not (system.phys.pages.flags[1:] & 1).any()


# -- defect 1: isolation --------------------------------------------------------------------------

def test_another_process_cannot_read_what_a_device_read_left_behind(system, kind):
    """B's read of an address above TASK_SIZE returned cpages=1 and A's bytes: every open mapped
    one device-wide bounce buffer there.  The kernel answers EFAULT and copies nothing."""
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    A, B = system.spawn(), system.spawn()
    mA, mB = d.open(A), d.open(B)
    a = A.mmap(P, RW, ANON)
    secret = b"secret of process A".ljust(P, b"\0")
    A.write(a, secret)
    free0 = system.phys.nr_free()
    assert bytes(mA.read(a, 1).data) == secret
    for addr in (1 << 47, TASK_SIZE, TASK_SIZE - P, (1 << 64) - 2 * P):
        assert errno_of(mB.read, addr, 1) in (errno.EFAULT, errno.EINVAL)
        assert errno_of(mB.write, addr, secret) in (errno.EFAULT, errno.EINVAL)
    b = B.mmap(P, RW, ANON)
    assert not mB.read(b, 1).data.any()
    # each open has a bounce buffer of its own, mapped in its own device page table only
    assert mA.bounce.size and mB.bounce.size and not np.intersect1d(mA.bounce, mB.bounce).size
    top = np.arange(dmirror.BOUNCE_VA >> 12, (dmirror.BOUNCE_VA >> 12) + 1)
    assert (mA.pt.lookup(top) >> U(12)).astype(np.int64)[0] == mA.bounce[0]
    assert (mB.pt.lookup(top) >> U(12)).astype(np.int64)[0] == mB.bounce[0]
    mA.close()
    mB.close()
    B.munmap(b, P)
    assert system.phys.nr_free() == free0              # the buffers went back at close


def test_concurrent_reads_of_two_processes_get_their_own_bytes(system):
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    procs = [system.spawn() for _ in range(2)]
    mirrors = [d.open(p) for p in procs]
    addrs = []
    for i, p in enumerate(procs):
        a = p.mmap(8 * P, RW, ANON)
        p.write(a, np.full(8 * P, i + 1, np.uint8))
        addrs.append(a)
    bad = []

    def reader(i):
        for _ in range(3):
            for n in range(1, 9):
                r = mirrors[i].read(addrs[i], n)
                if not (r.data == i + 1).all():
                    bad.append((i, n))

    ts = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts) and not bad


# -- ioctl argument checks ------------------------------------------------------------------------

def test_ioctl_arguments_are_checked_before_anything_happens(system, kind):
    """Defect 6: negative addresses, floats and huge page counts reached NumPy (OverflowError,
    MemoryError); the C driver checks its __u64 fields and sizes its bounce buffer first."""
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"\x05" * (4 * P))
    free0 = system.phys.nr_free()
    for ioctl in (m.read, m.migrate_to_dev, m.migrate_to_sys, m.snapshot, m.exclusive, m.check_exclusive):
        assert errno_of(ioctl, -4096, 1) == errno.EINVAL               # addr + size wraps
        assert errno_of(ioctl, a, 0) == errno.EINVAL
        assert errno_of(ioctl, a, -1) == errno.EINVAL
        assert errno_of(ioctl, a + 1, 1) == errno.EINVAL
        for bad in (None, 1.5, float("inf"), "1", 1 << 64):
            assert errno_of(ioctl, a, bad) == errno.EINVAL
            assert errno_of(ioctl, bad, 1) == errno.EINVAL
    for n in (1 << 24, 1 << 30, 1 << 40):
        # buffers larger than the machine's RAM: ENOMEM before anything is allocated
        assert errno_of(m.read, a, n) == errno.ENOMEM
        assert errno_of(m.snapshot, a, n << 1) == errno.ENOMEM
        assert errno_of(m.exclusive, a, n) == errno.ENOMEM
        assert errno_of(m.migrate_to_dev, a, n) == errno.ENOMEM
    m.check_exclusive(a, 1 << 40)                    # looks where VMAs are only: nothing atomic
    assert errno_of(m.write, a, [1, 2, 3]) == errno.EINVAL
    assert errno_of(m.set_flags, None) == errno.EINVAL
    assert system.phys.nr_free() == free0 and no_locked_pages(system)
    assert (p.read(a, 4 * P) == 5).all()


def test_open_needs_a_live_process(system):
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    for bad in (None, 3, "proc", system):
        assert errno_of(d.open, bad) == errno.EINVAL
    p = system.spawn()
    p.exit()
    assert errno_of(d.open, p) == errno.ESRCH
    assert errno_of(dmirror.DMirrorDevice, system, "gpu") == errno.EINVAL
    assert errno_of(lambda: dmirror.DMirrorDevice(system, chunk_pages=-1)) == errno.EINVAL
