"""A port of the kernel's HMM selftests (tools/testing/selftests/mm/hmm-tests.c).

Every case that does not need THP or hugetlbfs, written against the public
contract only (docs: /work/shared/CONTRACT.md): a ``System``, processes, and the
dmirror driver of ``hmmgpu.drivers.dmirror`` with the semantics of
lib/test_hmm.c.  Each case runs for device-private and device-coherent memory,
like the C fixture variants ``hmm_device_private`` / ``hmm_device_coherent``.

Differences from the C harness, all mechanical:

* a forked child is an emulated process, not an OS process: the child's part of
  a test runs inline and ends with ``child.exit(0)``;
* ``pread`` on a shared file mapping sees the page cache in Linux; here the page
  cache is written back on ``msync``, so ``file_write`` calls it first;
* gup_test's ioctls become ``proc.pin_user_pages`` + ``unpin``.

Sizes are the C ones (HMM_BUFFER_SIZE is 1024 pages) except NTIMES loops,
which keep the C count.
"""
import errno
import os
import threading

import numpy as np
import pytest

import hmmgpu
from hmmgpu import (MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, MREMAP_DONTUNMAP, MREMAP_FIXED,
                    MREMAP_MAYMOVE, PAGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE)
from hmmgpu.drivers import dmirror

NPAGES = 1024                  # HMM_BUFFER_SIZE >> PAGE_SHIFT
SIZE = NPAGES * PAGE_SIZE
NTIMES = 10
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
KINDS = ["private", "coherent"]


def ints(n, start=0, sign=1):
    """The C tests' ``ptr[i] = i`` pattern as bytes (int32, i from ``start``)."""
    return (sign * np.arange(start, start + n, dtype=np.int64)).astype(np.int32).view(np.uint8)


def as_ints(data):
    return np.asarray(data, dtype=np.uint8).view(np.int32)


def check_ints(data, start=0, sign=1):
    got = as_ints(data)
    want = (sign * np.arange(start, start + got.size, dtype=np.int64)).astype(np.int32)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, f"int {bad[0]}: got {got[bad[0]]}, want {want[bad[0]]} ({bad.size} wrong)"


def raises_errno(err, fn, *a, **kw):
    with pytest.raises(OSError) as ei:
        fn(*a, **kw)
    assert ei.value.errno == err, f"expected errno {errno.errorcode[err]}, got {ei.value!r}"
    return ei.value


class Machine:
    """What the C fixtures open: /dev/hmm_dmirror0..3 on one machine."""

    def __init__(self, kind):
        self.system = hmmgpu.System(backend=os.environ.get("HMMGPU_BACKEND", "numpy"), ram_bytes=128 << 20)
        self.kind = kind
        # hmm_dmirror0/1 are private; 2/3 coherent (present only with SPM configured).
        self.private = [dmirror.DMirrorDevice(self.system, memory="private") for _ in range(2)]
        self.coherent = [dmirror.DMirrorDevice(self.system, memory="coherent") for _ in range(2)]
        self.devs = self.private if kind == "private" else self.coherent
        self.proc = self.system.spawn()
        self.mirrors = []

    def open(self, unit=0, proc=None, devs=None):
        m = (devs or self.devs)[unit].open(proc or self.proc)
        self.mirrors.append(m)
        return m

    def close(self):
        for m in self.mirrors:
            try:
                m.close()
            except Exception:
                pass
        close = getattr(self.system, "close", None)
        if close:
            close()


@pytest.fixture(params=KINDS)
def hmm(request):
    """FIXTURE(hmm): one open device of the variant's kind."""
    mach = Machine(request.param)
    mach.fd = mach.open(0)
    yield mach
    mach.close()


@pytest.fixture(params=KINDS)
def hmm2(request):
    """FIXTURE(hmm2): two open devices of the variant's kind."""
    mach = Machine(request.param)
    mach.fd0 = mach.open(0)
    mach.fd1 = mach.open(1)
    yield mach
    mach.close()


def anon(proc, size=SIZE, prot=RW, flags=ANON):
    return proc.mmap(size, prot, flags)


def test_open_close(hmm):
    pass


def test_anon_read(hmm):
    p = hmm.proc
    ptr = anon(p)
    # Initialise all but the first two pages (pte_none and the zero page).
    first = 2 * PAGE_SIZE // 4
    p.write(ptr + 2 * PAGE_SIZE, ints(SIZE // 4 - first, start=first))
    p.mprotect(ptr, SIZE, PROT_READ)
    # Populate the CPU page table with the zero page.
    assert as_ints(p.read(ptr + PAGE_SIZE, 4))[0] == 0

    r = hmm.fd.read(ptr, NPAGES)
    assert r.cpages == NPAGES
    assert r.faults == 1
    got = as_ints(r.data)
    assert not got[:first].any()
    check_ints(r.data[2 * PAGE_SIZE:], start=first)


def test_anon_read_prot(hmm):
    p = hmm.proc
    ptr = anon(p)
    p.write(ptr, ints(SIZE // 4))
    p.mprotect(ptr, SIZE, PROT_NONE)
    raises_errno(errno.EFAULT, hmm.fd.read, ptr, NPAGES)
    p.mprotect(ptr, SIZE, PROT_READ)
    check_ints(p.read(ptr, SIZE))


def test_anon_write(hmm):
    p = hmm.proc
    ptr = anon(p)
    r = hmm.fd.write(ptr, ints(SIZE // 4))
    assert r.cpages == NPAGES
    assert r.faults == 1
    check_ints(p.read(ptr, SIZE))


def test_anon_write_prot(hmm):
    p = hmm.proc
    ptr = anon(p, prot=PROT_READ)
    # A device reading a zero page.
    r = hmm.fd.read(ptr, 1)
    assert (r.cpages, r.faults) == (1, 1)

    raises_errno(errno.EPERM, hmm.fd.write, ptr, ints(SIZE // 4))
    assert not p.read(ptr, SIZE).any()

    # Now allow writing and see that the zero page is replaced.
    p.mprotect(ptr, SIZE, RW)
    r = hmm.fd.write(ptr, ints(SIZE // 4))
    assert (r.cpages, r.faults) == (NPAGES, 1)
    check_ints(p.read(ptr, SIZE))


@pytest.mark.parametrize("migrate", [False, True])
def test_anon_write_child(hmm, migrate):
    p = hmm.proc
    ptr = anon(p, size=2 * SIZE)
    p.write(ptr, ints(SIZE // 4))
    mirror = ints(SIZE // 4, sign=-1)
    if migrate:
        r = hmm.fd.migrate_to_dev(ptr, NPAGES)
        assert r.cpages == NPAGES

    child = p.fork()
    # Child: sees the parent's values...
    check_ints(child.read(ptr, SIZE))
    # ...and needs its own mirror of its own mm (hmm_open(0): the first private device).
    cm = hmm.open(0, proc=child, devs=hmm.private)
    r = cm.write(ptr, mirror)
    assert (r.cpages, r.faults) == (NPAGES, 1)
    if not migrate:
        check_ints(child.read(ptr, SIZE), sign=-1)
    cm.close()
    child.exit(0)

    # Parent: its buffer did not change.
    check_ints(p.read(ptr, SIZE))
    p.munmap(ptr, 2 * SIZE)


def test_anon_write_child_shared(hmm):
    p = hmm.proc
    ptr = anon(p, flags=MAP_SHARED | MAP_ANONYMOUS)
    p.write(ptr, ints(SIZE // 4))
    child = p.fork()
    check_ints(child.read(ptr, SIZE))
    cm = hmm.open(0, proc=child, devs=hmm.private)
    r = cm.write(ptr, ints(SIZE // 4, sign=-1))
    assert (r.cpages, r.faults) == (NPAGES, 1)
    check_ints(child.read(ptr, SIZE), sign=-1)
    cm.close()
    child.exit(0)
    # The parent's buffer did change: the mapping is shared.
    check_ints(p.read(ptr, SIZE), sign=-1)


def _tmpfile(tmp_path, size, data=None):
    path = tmp_path / "hmm_file"
    with open(path, "wb") as f:
        f.write(bytes(data) if data is not None else bytes(size))
    return os.open(path, os.O_RDWR)


def test_file_read(hmm, tmp_path):
    fd = _tmpfile(tmp_path, SIZE, ints(SIZE // 4).tobytes())
    try:
        p = hmm.proc
        ptr = p.mmap(SIZE, PROT_READ, MAP_SHARED, fd=fd)
        r = hmm.fd.read(ptr, NPAGES)
        assert (r.cpages, r.faults) == (NPAGES, 1)
        check_ints(r.data)
        p.munmap(ptr, SIZE)
    finally:
        os.close(fd)


def test_file_write(hmm, tmp_path):
    fd = _tmpfile(tmp_path, SIZE)
    try:
        p = hmm.proc
        ptr = p.mmap(SIZE, RW, MAP_SHARED, fd=fd)
        r = hmm.fd.write(ptr, ints(SIZE // 4))
        assert (r.cpages, r.faults) == (NPAGES, 1)
        check_ints(p.read(ptr, SIZE))
        # The device also wrote the file (after writeback: see the module docstring).
        p.msync(ptr, SIZE)
        check_ints(np.frombuffer(os.pread(fd, SIZE, 0), dtype=np.uint8))
        p.munmap(ptr, SIZE)
    finally:
        os.close(fd)


def test_migrate(hmm):
    p = hmm.proc
    ptr = anon(p)
    p.write(ptr, ints(SIZE // 4))
    r = hmm.fd.migrate_to_dev(ptr, NPAGES)
    assert r.cpages == NPAGES
    check_ints(r.data)


def test_migrate_file_private(hmm, tmp_path):
    fd = _tmpfile(tmp_path, SIZE)
    try:
        p = hmm.proc
        ptr = p.mmap(SIZE, RW, MAP_PRIVATE, fd=fd)
        p.write(ptr, ints(SIZE // 4))
        r = hmm.fd.migrate_to_dev(ptr, NPAGES)
        assert r.cpages == NPAGES
        check_ints(r.data)
        p.munmap(ptr, SIZE)
    finally:
        os.close(fd)


def test_migrate_fault(hmm):
    p = hmm.proc
    ptr = anon(p)
    p.write(ptr, ints(SIZE // 4))
    r = hmm.fd.migrate_to_dev(ptr, NPAGES)
    assert r.cpages == NPAGES
    check_ints(r.data)
    # Fault half the pages back to system memory and check them.
    check_ints(p.read(ptr, SIZE // 2))
    # Migrate the mix of system and device memory to the device again.
    r = hmm.fd.migrate_to_dev(ptr, NPAGES)
    assert r.cpages == NPAGES
    check_ints(r.data)


def test_migrate_release(hmm):
    p = hmm.proc
    ptr = anon(p)
    p.write(ptr, ints(SIZE // 4))
    r = hmm.fd.migrate_to_dev(ptr, NPAGES)
    assert r.cpages == NPAGES
    check_ints(r.data)
    hmm.fd.release()
    check_ints(p.read(ptr, SIZE // 2))


def test_migrate_shared(hmm):
    p = hmm.proc
    ptr = anon(p, flags=MAP_SHARED | MAP_ANONYMOUS)
    raises_errno(errno.ENOENT, hmm.fd.migrate_to_dev, ptr, NPAGES)


def test_migrate_mixed(hmm2):
    p = hmm2.proc
    npages = 6
    ptr = anon(p, size=npages * PAGE_SIZE, prot=PROT_NONE)
    # Migrating a protected area is an error.
    raises_errno(errno.EINVAL, hmm2.fd1.migrate_to_dev, ptr, npages)
    # Punch a hole after the first page: the vma does not cover the range.
    p.munmap(ptr + PAGE_SIZE, PAGE_SIZE)
    raises_errno(errno.EINVAL, hmm2.fd1.migrate_to_dev, ptr, 3)
    # Page 2: a read-only zero page.
    p.mprotect(ptr + 2 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    val = int(as_ints(p.read(ptr + 2 * PAGE_SIZE, 4))[0]) + 3
    assert val == 3
    # Page 3: read-only with data.
    p.mprotect(ptr + 3 * PAGE_SIZE, PAGE_SIZE, RW)
    p.write(ptr + 3 * PAGE_SIZE, np.int32(val).tobytes())
    p.mprotect(ptr + 3 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    # Pages 4-5: read-write.
    p.mprotect(ptr + 4 * PAGE_SIZE, 2 * PAGE_SIZE, RW)
    p.write(ptr + 4 * PAGE_SIZE, np.int32(val).tobytes())
    p.write(ptr + 5 * PAGE_SIZE, np.int32(val).tobytes())

    r = hmm2.fd1.migrate_to_dev(ptr + 2 * PAGE_SIZE, 4)
    assert r.cpages == 4
    # Page 5 is not migrated to device 0 because it is on device 1.
    raises_errno(errno.ENOENT, hmm2.fd0.migrate_to_dev, ptr + 5 * PAGE_SIZE, 1)


def test_migrate_multiple(hmm):
    p = hmm.proc
    for _ in range(NTIMES):
        ptr = anon(p)
        p.write(ptr, ints(SIZE // 4))
        r = hmm.fd.migrate_to_dev(ptr, NPAGES)
        assert r.cpages == NPAGES
        check_ints(r.data)
        # Coherent memory is CPU-accessible and never faults: migrate it back explicitly.
        if hmm.kind == "coherent":
            r = hmm.fd.migrate_to_sys(ptr, NPAGES)
            assert r.cpages == NPAGES
        check_ints(p.read(ptr, SIZE))
        p.munmap(ptr, SIZE)


def test_anon_read_multiple(hmm):
    p = hmm.proc
    for c in range(NTIMES):
        ptr = anon(p)
        p.write(ptr, ints(SIZE // 4, start=c))
        r = hmm.fd.read(ptr, NPAGES)
        assert (r.cpages, r.faults) == (NPAGES, 1)
        check_ints(r.data, start=c)
        p.munmap(ptr, SIZE)


def test_anon_teardown(hmm):
    """Read anonymous memory while another thread unmaps half of it."""
    p = hmm.proc
    for c in range(NTIMES):
        ptr = anon(p)
        p.write(ptr, ints(SIZE // 4, start=c))
        t = threading.Thread(target=p.munmap, args=(ptr + SIZE // 2, SIZE // 2))
        t.start()
        try:
            r = hmm.fd.read(ptr, NPAGES)
        except OSError as e:
            # The unmap won the race: the device hit the hole.
            assert e.errno in (errno.EFAULT, errno.EBUSY), e
        else:
            assert (r.cpages, r.faults) == (NPAGES, 1)
            check_ints(r.data, start=c)
        t.join()
        p.munmap(ptr, SIZE // 2)


def test_mixedmap(hmm):
    p = hmm.proc
    ptr = p.mmap(PAGE_SIZE, RW, MAP_PRIVATE, fd=hmm.fd)
    r = hmm.fd.snapshot(ptr, 1)
    assert r.cpages == 1
    assert r.data[0] == dmirror.PROT_READ


def test_snapshot(hmm2):
    p = hmm2.proc
    npages = 7
    ptr = anon(p, size=npages * PAGE_SIZE, prot=PROT_NONE)
    p.munmap(ptr + PAGE_SIZE, PAGE_SIZE)
    # Page 2: read-only zero page.
    p.mprotect(ptr + 2 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    val = int(as_ints(p.read(ptr + 2 * PAGE_SIZE, 4))[0]) + 3
    assert val == 3
    # Page 3: read-only.
    p.mprotect(ptr + 3 * PAGE_SIZE, PAGE_SIZE, RW)
    p.write(ptr + 3 * PAGE_SIZE, np.int32(val).tobytes())
    p.mprotect(ptr + 3 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    # Pages 4-6: read-write.
    p.mprotect(ptr + 4 * PAGE_SIZE, 3 * PAGE_SIZE, RW)
    p.write(ptr + 4 * PAGE_SIZE, np.int32(val).tobytes())
    # Page 5 on device 0, page 6 on device 1.
    assert hmm2.fd0.migrate_to_dev(ptr + 5 * PAGE_SIZE, 1).cpages == 1
    assert hmm2.fd1.migrate_to_dev(ptr + 6 * PAGE_SIZE, 1).cpages == 1

    r = hmm2.fd0.snapshot(ptr, npages)
    assert r.cpages == npages
    m = r.data
    assert m[0] == dmirror.PROT_ERROR
    assert m[1] == dmirror.PROT_ERROR
    assert m[2] == dmirror.PROT_ZERO | dmirror.PROT_READ
    assert m[3] == dmirror.PROT_READ
    assert m[4] == dmirror.PROT_WRITE
    if hmm2.kind == "private":
        assert m[5] == dmirror.PROT_DEV_PRIVATE_LOCAL | dmirror.PROT_WRITE
        assert m[6] == dmirror.PROT_NONE
    else:
        assert m[5] == dmirror.PROT_DEV_COHERENT_LOCAL | dmirror.PROT_WRITE
        assert m[6] == dmirror.PROT_DEV_COHERENT_REMOTE | dmirror.PROT_WRITE


def test_double_map(hmm2):
    p = hmm2.proc
    npages = 6
    size = npages * PAGE_SIZE
    ptr = anon(p, size=size)
    p.write(ptr, ints(size // 4))
    p.mprotect(ptr, size, PROT_READ)
    for fd in (hmm2.fd0, hmm2.fd1):
        r = fd.read(ptr, npages)
        assert (r.cpages, r.faults) == (npages, 1)
        check_ints(r.data)
    # Migrate the pages to device 1 and read them from device 0.
    assert hmm2.fd1.migrate_to_dev(ptr, npages).cpages == npages
    r = hmm2.fd0.read(ptr, npages)
    assert (r.cpages, r.faults) == (npages, 1)
    check_ints(r.data)


def test_exclusive(hmm):
    p = hmm.proc
    ptr = anon(p)
    p.write(ptr, ints(SIZE // 4))
    r = hmm.fd.exclusive(ptr, NPAGES)
    assert r.cpages == NPAGES
    check_ints(r.data)
    # Fault the pages back to the CPU: read and increment every int.
    vals = as_ints(p.read(ptr, SIZE)).copy()
    check_ints(vals.view(np.uint8))
    p.write(ptr, (vals + 1).view(np.uint8))
    check_ints(p.read(ptr, SIZE), start=1)
    # Atomic access was revoked.
    hmm.fd.check_exclusive(ptr, NPAGES)


def test_exclusive_mprotect(hmm):
    p = hmm.proc
    ptr = anon(p)
    p.write(ptr, ints(SIZE // 4))
    r = hmm.fd.exclusive(ptr, NPAGES)
    assert r.cpages == NPAGES
    check_ints(r.data)
    p.mprotect(ptr, SIZE, PROT_READ)
    raises_errno(errno.EPERM, hmm.fd.write, ptr, ints(SIZE // 4))


def test_exclusive_cow(hmm):
    p = hmm.proc
    ptr = anon(p)
    p.write(ptr, ints(SIZE // 4))
    r = hmm.fd.exclusive(ptr, NPAGES)
    assert r.cpages == NPAGES
    child = p.fork()
    # Child verifies COW independently.
    vals = as_ints(child.read(ptr, SIZE)).copy()
    check_ints(vals.view(np.uint8))
    child.write(ptr, (vals + 1).view(np.uint8))
    check_ints(child.read(ptr, SIZE), start=1)
    child.exit(0)
    # Parent increments too.
    vals = as_ints(p.read(ptr, SIZE)).copy()
    check_ints(vals.view(np.uint8))
    p.write(ptr, (vals + 1).view(np.uint8))
    check_ints(p.read(ptr, SIZE), start=1)


def test_hmm_gup_test(hmm):
    """get_user_pages on device pages: private ones always come back to system memory,
    coherent ones only for a longterm pin (FOLL_LONGTERM)."""
    p = hmm.proc
    npages = 4
    size = npages * PAGE_SIZE
    ptr = anon(p, size=size)
    p.write(ptr, ints(size // 4))
    assert hmm.fd.migrate_to_dev(ptr, npages).cpages == npages
    # GUP_BASIC_TEST, GUP_FAST_BENCHMARK, PIN_FAST_BENCHMARK(FOLL_LONGTERM),
    # PIN_LONGTERM_BENCHMARK: all with FOLL_WRITE, one page each.
    for i, longterm in enumerate((False, False, True, True)):
        pin = p.pin_user_pages(ptr + i * PAGE_SIZE, 1, write=True, longterm=longterm)
        pin.unpin()

    r = hmm.fd.snapshot(ptr, npages)
    assert r.cpages == npages
    m = r.data
    if hmm.kind == "coherent":
        assert m[0] == dmirror.PROT_DEV_COHERENT_LOCAL | dmirror.PROT_WRITE
        assert m[1] == dmirror.PROT_DEV_COHERENT_LOCAL | dmirror.PROT_WRITE
    else:
        assert m[0] == dmirror.PROT_WRITE
        assert m[1] == dmirror.PROT_WRITE
    assert m[2] == dmirror.PROT_WRITE
    assert m[3] == dmirror.PROT_WRITE
    check_ints(p.read(ptr, size))


def test_hmm_cow_in_device(hmm):
    """Writing COW device pages: private ones migrate to system memory first, then COW;
    coherent ones are copied straight from device memory."""
    p = hmm.proc
    npages = 4
    size = npages * PAGE_SIZE
    ptr = anon(p, size=size)
    p.write(ptr, ints(size // 4))
    assert hmm.fd.migrate_to_dev(ptr, npages).cpages == npages
    child = p.fork()                      # the child just waits to be killed
    p.write(ptr, ints(size // 4))
    child.exit(9)
    r = hmm.fd.snapshot(ptr, npages)
    assert r.cpages == npages
    assert list(r.data) == [dmirror.PROT_WRITE] * npages


# -- the non-THP halves of the newer cases ------------------------------------------------

PMD_PAGES = 512
PMD = PMD_PAGES * PAGE_SIZE


def _pmd_aligned(proc, size):
    """mmap ``size`` and return (mapping, PMD-aligned address inside it)."""
    base = anon(proc, size=size)
    return base, (base + PMD - 1) & ~(PMD - 1)


@pytest.mark.parametrize("offset", [0, PMD // 4, PMD // 2])
def test_migrate_partial_unmap_fault(hmm, offset):
    p = hmm.proc
    base, ptr = _pmd_aligned(p, 2 * PMD)
    p.madvise(ptr, PMD, hmmgpu.MADV_NOHUGEPAGE)
    p.write(ptr, ints(PMD // 4))
    r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    check_ints(r.data)
    p.munmap(ptr + offset, PMD // 2)
    # Fault the rest back and check it.
    if offset:
        check_ints(p.read(ptr, offset))
    tail = offset + PMD // 2
    if tail < PMD:
        check_ints(p.read(ptr + tail, PMD - tail), start=tail // 4)


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("dont_unmap", [False, True])
@pytest.mark.parametrize("offset", [0, PMD // 4])
def test_migrate_remap_fault(hmm, before, dont_unmap, offset):
    p = hmm.proc
    base, ptr = _pmd_aligned(p, 8 * PMD)
    p.madvise(ptr, PMD, hmmgpu.MADV_NOHUGEPAGE)
    p.munmap(ptr + PMD, 2 * PMD)
    flags = MREMAP_MAYMOVE | MREMAP_FIXED | (MREMAP_DONTUNMAP if dont_unmap else 0)
    p.write(ptr, ints(PMD // 4))
    cur = ptr
    if before:
        cur = p.mremap(ptr, PMD, PMD, flags, new_addr=ptr + PMD + offset)
    r = hmm.fd.migrate_to_dev(cur, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    check_ints(r.data)
    if not before:
        cur = p.mremap(ptr, PMD, PMD, flags, new_addr=ptr + PMD + offset)
    check_ints(p.read(cur, PMD))
    p.munmap(cur, PMD)
