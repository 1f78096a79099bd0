"""A port of the kernel's HMM selftests (tools/testing/selftests/mm/hmm-tests.c).

Every case, the THP and hugetlbfs ones included (anon_write_huge,
anon_write_hugetlbfs, compound, anon_write_child over migrate x use_thp,
migrate_anon_huge_{empty,zero,free,fault,err,zero_err},
migrate_partial_unmap_fault, migrate_remap_fault, benchmark_thp_migration's
migrations), written against the public contract only (docs:
/work/shared/CONTRACT.md): a ``System``, processes, and the dmirror driver of
``hmmgpu.drivers.dmirror`` with the semantics of lib/test_hmm.c.  Each case runs
for device-private and device-coherent memory, like the C fixture variants
``hmm_device_private`` / ``hmm_device_coherent``.  The machine's default
hugetlbfs pool stands for the runner's HUGETLB_SETUP_DEFAULT_PAGES.

Differences from the C harness, all mechanical:

* a forked child is an emulated process, not an OS process: the child's part of
  a test runs inline and ends with ``child.exit(0)``;
* ``pread`` on a shared file mapping sees the page cache in Linux; here the page
  cache is written back on ``msync``, so ``file_write`` calls it first;
* gup_test's ioctls become ``proc.pin_user_pages`` + ``unpin``;
* /proc/self/pagemap becomes ``proc.pages`` (the raw PTEs);
* the C loops over variants inside one TEST_F (use_thp, offsets, ...) stay loops where they
  only share a buffer layout, and become parameters where they are separate cases;
* the THP cases also check, through dmirror's snapshot, that the memory really was mapped by
  a PMD where the kernel maps it by one (the C cases only check the data).

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
from hmmgpu.device.pagetable import PTE_HUGE
from hmmgpu.drivers import dmirror

NPAGES = 1024                  # HMM_BUFFER_SIZE >> PAGE_SHIFT
SIZE = NPAGES * PAGE_SIZE
PMD_PAGES = 512                # read_pmd_pagesize() >> PAGE_SHIFT
PMD = PMD_PAGES * PAGE_SIZE
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


@pytest.mark.parametrize("use_thp", [False, True])
@pytest.mark.parametrize("migrate", [False, True])
def test_anon_write_child(hmm, migrate, use_thp):
    p = hmm.proc
    size = PMD if use_thp else SIZE
    npages = size // PAGE_SIZE
    base = anon(p, size=2 * size)
    ptr = base
    if use_thp:
        ptr = (base + PMD - 1) & ~(PMD - 1)
        p.madvise(ptr, size, hmmgpu.MADV_HUGEPAGE)
    p.write(ptr, ints(size // 4))
    if use_thp:
        assert (hmm.fd.snapshot(ptr, npages).data & dmirror.PROT_PMD).all()
    mirror = ints(size // 4, sign=-1)
    if migrate:
        r = hmm.fd.migrate_to_dev(ptr, npages)
        assert r.cpages == npages

    child = p.fork()
    # Child: sees the parent's values...
    check_ints(child.read(ptr, size))
    # ...and needs its own mirror of its own mm (hmm_open(0): the first private device).
    cm = hmm.open(0, proc=child, devs=hmm.private)
    r = cm.write(ptr, mirror)
    assert (r.cpages, r.faults) == (npages, 1)
    if not migrate:
        check_ints(child.read(ptr, size), sign=-1)
    cm.close()
    child.exit(0)

    # Parent: its buffer did not change.
    check_ints(p.read(ptr, size))
    p.munmap(base, 2 * size)


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


# -- huge pages ------------------------------------------------------------------------------

def _pmd_aligned(proc, size, advice=None):
    """mmap ``size`` and return (mapping, PMD-aligned address inside it), the 2 MiB there
    madvise()d with ``advice``."""
    base = anon(proc, size=size)
    ptr = (base + PMD - 1) & ~(PMD - 1)
    if advice is not None:
        proc.madvise(ptr, PMD, advice)
    return base, ptr


def _thp(use_thp):
    return hmmgpu.MADV_HUGEPAGE if use_thp else hmmgpu.MADV_NOHUGEPAGE


def _device_leaves(fd, ptr):
    """Is the 2 MiB at ``ptr`` mapped by one 2 MiB leaf of the open's device page table?"""
    ent = fd.pt.lookup(np.arange(ptr // PAGE_SIZE, ptr // PAGE_SIZE + PMD_PAGES))
    return bool((ent & np.uint64(PTE_HUGE)).all())


def test_anon_write_huge(hmm):
    p = hmm.proc
    base, ptr = _pmd_aligned(p, 2 * PMD, hmmgpu.MADV_HUGEPAGE)
    r = hmm.fd.write(ptr, ints(PMD // 4))
    assert (r.cpages, r.faults) == (PMD_PAGES, 1)
    check_ints(p.read(ptr, PMD))
    # The device's write fault brought in one THP, mapped by a PMD.
    m = hmm.fd.snapshot(ptr, PMD_PAGES).data
    assert (m == dmirror.PROT_WRITE | dmirror.PROT_PMD).all()
    assert p.rss["anon"] == PMD_PAGES
    # ...which the device maps by one 2 MiB leaf
    assert _device_leaves(hmm.fd, ptr)
    p.munmap(base, 2 * PMD)


def test_anon_write_hugetlbfs(hmm):
    p = hmm.proc
    ptr = p.mmap(PMD, RW, ANON | hmmgpu.MAP_HUGETLB)
    r = hmm.fd.write(ptr, ints(PMD // 4))
    assert (r.cpages, r.faults) == (PMD_PAGES, 1)
    check_ints(p.read(ptr, PMD))
    p.munmap(ptr, PMD)


def test_compound(hmm):
    """hmm_range_fault() reports a hugetlb page at PMD level, writable, then read-only."""
    p = hmm.proc
    ptr = p.mmap(PMD, RW, ANON | hmmgpu.MAP_HUGETLB)
    p.write(ptr, ints(PMD // 4))
    r = hmm.fd.snapshot(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    assert (r.data == dmirror.PROT_WRITE | dmirror.PROT_PMD).all()
    p.mprotect(ptr, PMD, PROT_READ)
    r = hmm.fd.snapshot(ptr, PMD_PAGES)
    assert (r.data == dmirror.PROT_READ | dmirror.PROT_PMD).all()
    p.munmap(ptr, PMD)


def test_migrate_anon_huge_empty(hmm):
    p = hmm.proc
    base = anon(p, size=2 * PMD, prot=PROT_READ)
    ptr = (base + PMD - 1) & ~(PMD - 1)
    p.madvise(ptr, PMD, hmmgpu.MADV_HUGEPAGE)
    r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    assert not as_ints(r.data).any()
    if hmm.kind == "private":
        # the empty PMD was filled with one 2 MiB device folio
        m = hmm.fd.snapshot(ptr, PMD_PAGES).data
        assert (m == dmirror.PROT_DEV_PRIVATE_LOCAL | dmirror.PROT_READ | dmirror.PROT_PMD).all()
    p.munmap(base, 2 * PMD)


def test_migrate_anon_huge_zero(hmm):
    p = hmm.proc
    base = anon(p, size=2 * PMD, prot=PROT_READ)
    ptr = (base + PMD - 1) & ~(PMD - 1)
    p.madvise(ptr, PMD, hmmgpu.MADV_HUGEPAGE)
    # A read maps the huge zero page (by a PMD, and not the 4 KiB zero page).
    assert as_ints(p.read(ptr, 4))[0] == 0
    assert (hmm.fd.snapshot(ptr, PMD_PAGES).data == dmirror.PROT_READ | dmirror.PROT_PMD).all()
    r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    assert not as_ints(r.data).any()
    # Fault the pages back to system memory and check them.
    assert not as_ints(p.read(ptr, PMD)).any()
    p.munmap(base, 2 * PMD)


def test_migrate_anon_huge_free(hmm):
    p = hmm.proc
    base, ptr = _pmd_aligned(p, 2 * PMD, hmmgpu.MADV_HUGEPAGE)
    p.write(ptr, ints(PMD // 4))
    r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    check_ints(r.data)
    used = hmm.devs[0].nr_allocated()
    assert used >= PMD_PAGES
    p.madvise(ptr, PMD, hmmgpu.MADV_FREE)
    # the device folio went back to its driver with the mapping
    assert hmm.devs[0].nr_allocated() == used - PMD_PAGES
    p.munmap(base, 2 * PMD)


def test_migrate_anon_huge_fault(hmm):
    p = hmm.proc
    base, ptr = _pmd_aligned(p, 2 * PMD)
    p.write(ptr, ints(PMD // 4))
    # The 4 KiB pages written above become one THP.
    p.madvise(ptr, PMD, hmmgpu.MADV_COLLAPSE)
    assert (hmm.fd.snapshot(ptr, PMD_PAGES).data == dmirror.PROT_WRITE | dmirror.PROT_PMD).all()
    r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    check_ints(r.data)
    assert _device_leaves(hmm.fd, ptr)            # one 2 MiB device folio, one 2 MiB leaf
    if hmm.kind == "private":
        r = hmm.fd.snapshot(ptr, PMD_PAGES)
        assert r.cpages == PMD_PAGES
        assert (r.data == dmirror.PROT_DEV_PRIVATE_LOCAL | dmirror.PROT_WRITE | dmirror.PROT_PMD).all()
        # pagemap: every page is a swap-like entry now, none is present
        e = p.pages(ptr, PMD_PAGES)
        assert (e != 0).all() and not (e & np.uint64(1)).any()
    # Fault the pages back to system memory and check them.
    check_ints(p.read(ptr, PMD))
    p.munmap(base, 2 * PMD)


@pytest.mark.parametrize("use_thp", [False, True])
def test_migrate_partial_unmap_fault(hmm, use_thp):
    p = hmm.proc
    for offset in (0, PMD // 4, PMD // 2):
        base, ptr = _pmd_aligned(p, 2 * PMD, _thp(use_thp))
        p.write(ptr, ints(PMD // 4))
        r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
        assert r.cpages == PMD_PAGES
        check_ints(r.data)
        if use_thp and hmm.kind == "private":
            assert (hmm.fd.snapshot(ptr, PMD_PAGES).data & dmirror.PROT_PMD).all()
        p.munmap(ptr + offset, PMD // 2)
        # Fault the rest back to system memory and check it.
        if offset:
            check_ints(p.read(ptr, offset))
        tail = offset + PMD // 2
        if tail < PMD:
            check_ints(p.read(ptr + tail, PMD - tail), start=tail // 4)
        p.munmap(base, 2 * PMD)


@pytest.mark.parametrize("use_thp", [False, True])
@pytest.mark.parametrize("before", [False, True])
def test_migrate_remap_fault(hmm, before, use_thp):
    p = hmm.proc
    for dont_unmap in (False, True):
        for offset in (0, PMD // 4, PMD // 2):
            base, ptr = _pmd_aligned(p, 8 * PMD, _thp(use_thp))
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
            if use_thp and hmm.kind == "private":
                # a PMD moved by a 2 MiB multiple stays one; anywhere else it split
                pmd = (hmm.fd.snapshot(cur, PMD_PAGES).data & dmirror.PROT_PMD) != 0
                assert pmd.all() if offset == 0 else not pmd.any()
            check_ints(p.read(cur, PMD))
            p.munmap(cur, PMD)
            p.munmap(base, 8 * PMD)


def test_migrate_anon_huge_err(hmm):
    p = hmm.proc
    base, ptr = _pmd_aligned(p, 2 * PMD, hmmgpu.MADV_HUGEPAGE)
    p.write(ptr, ints(PMD // 4))
    # Migrate to the device with the 2 MiB allocation failing: 512 small pages instead.
    hmm.fd.set_flags(dmirror.FLAG_FAIL_ALLOC)
    r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    check_ints(r.data)
    assert not _device_leaves(hmm.fd, ptr)        # 512 small device pages
    if hmm.kind == "private":
        m = hmm.fd.snapshot(ptr, PMD_PAGES).data
        assert (m == dmirror.PROT_DEV_PRIVATE_LOCAL | dmirror.PROT_WRITE).all()
    # Fault back a single 4 KiB page.
    assert as_ints(p.read(ptr + 2048 * 4, 4))[0] == 2048
    p.munmap(base, 2 * PMD)

    # A THP on the device, and the 2 MiB allocation on the way back fails.
    base, ptr = _pmd_aligned(p, 2 * PMD, hmmgpu.MADV_HUGEPAGE)
    p.write(ptr, ints(PMD // 4))
    r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    if hmm.kind == "private":
        assert (hmm.fd.snapshot(ptr, PMD_PAGES).data & dmirror.PROT_PMD).all()
    hmm.fd.set_flags(dmirror.FLAG_FAIL_ALLOC)
    hmm.fd.migrate_to_sys(ptr, PMD_PAGES)
    assert as_ints(p.read(ptr + 2048 * 4, 4))[0] == 2048
    # system memory now: the device folio was split into 4 KiB pages on the way
    assert (hmm.fd.snapshot(ptr, PMD_PAGES).data == dmirror.PROT_WRITE).all()
    check_ints(p.read(ptr, PMD))
    p.munmap(base, 2 * PMD)


def test_migrate_anon_huge_zero_err(hmm):
    p = hmm.proc
    base = anon(p, size=2 * PMD, prot=PROT_READ)
    ptr = (base + PMD - 1) & ~(PMD - 1)
    p.madvise(ptr, PMD, hmmgpu.MADV_HUGEPAGE)
    hmm.fd.set_flags(dmirror.FLAG_FAIL_ALLOC)
    r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    assert not as_ints(r.data).any()
    assert as_ints(p.read(ptr + 2048 * 4, 4))[0] == 0
    p.munmap(base, 2 * PMD)

    base = anon(p, size=2 * PMD, prot=PROT_READ)
    ptr = (base + PMD - 1) & ~(PMD - 1)
    p.madvise(ptr, PMD, hmmgpu.MADV_HUGEPAGE)
    assert as_ints(p.read(ptr, 4))[0] == 0          # the huge zero page
    hmm.fd.set_flags(dmirror.FLAG_FAIL_ALLOC)
    r = hmm.fd.migrate_to_dev(ptr, PMD_PAGES)
    assert r.cpages == PMD_PAGES
    assert not as_ints(p.read(ptr, PMD)).any()
    p.munmap(base, 2 * PMD)


def test_benchmark_thp_migration(hmm):
    """benchmark_thp_migration's migrations (up to 8 THPs; the timed sweep is the ``thp``
    suite of ``hmmgpu bench``): both ways, with and without THP, the data intact, and the
    THP runs on 2 MiB device folios."""
    p = hmm.proc
    for size in (PMD // 4, PMD // 2, PMD, 2 * PMD, 4 * PMD, 8 * PMD):
        npages = size // PAGE_SIZE
        for use_thp in (True, False):
            ptr = anon(p, size=size)
            p.madvise(ptr, size, _thp(use_thp))
            data = (np.arange(size // 4, dtype=np.int64) & 0xFF).astype(np.int32).view(np.uint8)
            p.write(ptr, data)
            for _ in range(2):                       # the warm-up, then one timed iteration
                r = hmm.fd.migrate_to_dev(ptr, npages)
                assert np.array_equal(r.data, data)
                if hmm.kind == "private":
                    pmd = (hmm.fd.snapshot(ptr, npages).data & dmirror.PROT_PMD) != 0
                    whole = use_thp and size >= PMD and ptr % PMD == 0
                    assert pmd.all() if whole else not pmd.any()
                hmm.fd.migrate_to_sys(ptr, npages)
            assert np.array_equal(p.read(ptr, size), data)
            p.munmap(ptr, size)
