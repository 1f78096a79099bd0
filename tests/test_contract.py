"""The public contract (/work/shared/CONTRACT.md), checked as an outside test would check it.

Every test uses only the names that page gives, imported where the page says, called with the
argument names and defaults written there: one small test per promise, in the page's order
(constants, errors, the machine and its processes, file mappings, dmirror, the kernel-level
API, huge pages).  The UVM-class driver has its own tests (tests/test_uvm_*.py).  Where the
page is silent the expected behaviour is Linux's (x86-64, 6.x).
"""
import errno
import inspect
import json
import mmap as pymmap
import os

import numpy as np
import pytest

import hmmgpu
from hmmgpu import (MADV_COLLAPSE, MADV_DONTNEED, MADV_FREE, MADV_HUGEPAGE, MADV_NOHUGEPAGE,
                    MAP_ANONYMOUS, MAP_FIXED, MAP_HUGETLB, MAP_PRIVATE, MAP_SHARED,
                    MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE, MS_SYNC, PAGE_SIZE, PMD_SIZE,
                    PROT_NONE, PROT_READ, PROT_WRITE)
from hmmgpu.drivers import dmirror

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


@pytest.fixture
def system():
    # what a user writes; HMMGPU_BACKEND (numpy in CI) picks the backend
    return hmmgpu.System(backend="auto")


@pytest.fixture
def proc(system):
    return system.spawn()


@pytest.fixture
def dev(system):
    return dmirror.DMirrorDevice(system, memory="private")


@pytest.fixture(params=["private", "coherent"])
def memory(request):
    return request.param


@pytest.fixture
def mirror(system, proc, memory):
    m = dmirror.DMirrorDevice(system, memory=memory).open(proc)
    yield m
    m.close()


def raises(err, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises an OSError carrying ``err``; returns it."""
    with pytest.raises(OSError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == err, f"want {errno.errorcode[err]}, got {ei.value!r}"
    return ei.value


def pattern(npages, seed=0):
    return np.random.default_rng(seed).integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8)


@pytest.fixture
def datafile(tmp_path):
    """A real file of 4 pages of known bytes, open O_RDWR; yields (fd, path, bytes)."""
    path = tmp_path / "data.bin"
    data = pattern(4, seed=7)
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDWR)
    yield fd, path, data
    os.close(fd)


# -- Constants (importable from hmmgpu), Linux x86-64 values -------------------------------------

LINUX_X86_64 = {
    "PAGE_SIZE": 4096, "PMD_SIZE": 2 << 20, "PROT_NONE": 0x0, "PROT_READ": 0x1, "PROT_WRITE": 0x2,
    "MAP_SHARED": 0x01, "MAP_PRIVATE": 0x02, "MAP_FIXED": 0x10, "MAP_ANONYMOUS": 0x20,
    "MAP_HUGETLB": 0x40000, "MADV_DONTNEED": 4, "MADV_FREE": 8, "MADV_HUGEPAGE": 14,
    "MADV_NOHUGEPAGE": 15, "MADV_COLLAPSE": 25, "MREMAP_MAYMOVE": 1, "MREMAP_FIXED": 2,
    "MREMAP_DONTUNMAP": 4, "MS_SYNC": 4,
}


@pytest.mark.parametrize("name", sorted(LINUX_X86_64))
def test_constant_has_the_linux_x86_64_value(name):
    value = getattr(hmmgpu, name)
    assert isinstance(value, int) and value == LINUX_X86_64[name]
    # and the host's own mmap module agrees where it knows the name (a Linux host)
    host = getattr(pymmap, name, None)
    if host is not None and os.uname().sysname == "Linux" and os.uname().machine == "x86_64":
        assert value == host


# -- Errors ----------------------------------------------------------------------------------------

def test_segmentation_fault_is_an_oserror_with_efault():
    assert issubclass(hmmgpu.SegmentationFault, OSError)


def test_a_cpu_load_of_unmapped_memory_is_a_segmentation_fault_naming_the_address(proc):
    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    proc.munmap(addr, PAGE_SIZE)
    with pytest.raises(hmmgpu.SegmentationFault) as ei:
        proc.read(addr, 8)
    assert ei.value.errno == errno.EFAULT
    assert f"{addr:x}" in str(ei.value)


def test_a_cpu_store_to_read_only_memory_faults_and_changes_nothing(proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x11" * (2 * PAGE_SIZE))
    proc.mprotect(addr + PAGE_SIZE, PAGE_SIZE, PROT_READ)
    with pytest.raises(hmmgpu.SegmentationFault) as ei:
        proc.write(addr, b"\x22" * (2 * PAGE_SIZE))       # first page writable, second not
    assert ei.value.errno == errno.EFAULT
    assert (proc.read(addr, 2 * PAGE_SIZE) == 0x11).all()


def test_an_errno_failure_is_an_oserror_naming_the_range_and_the_reason(proc):
    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    e = raises(errno.EINVAL, proc.munmap, addr + 1, PAGE_SIZE)
    assert f"{addr + 1:x}" in str(e)
    assert "align" in str(e)
    e = raises(errno.ENOMEM, proc.mprotect, addr + PAGE_SIZE, PAGE_SIZE, PROT_READ)
    assert f"{addr + PAGE_SIZE:x}" in str(e) and "mapped" in str(e)


def test_a_failed_operation_leaves_the_address_space_as_it_was(proc):
    addr = proc.mmap(3 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x5a" * (3 * PAGE_SIZE))
    proc.munmap(addr + 2 * PAGE_SIZE, PAGE_SIZE)
    # mremap of a range that is not one mapping fails before it changes anything
    raises(errno.EFAULT, proc.mremap, addr, 3 * PAGE_SIZE, 4 * PAGE_SIZE, MREMAP_MAYMOVE)
    assert (proc.read(addr, 2 * PAGE_SIZE) == 0x5a).all()
    with pytest.raises(hmmgpu.SegmentationFault):
        proc.read(addr + 2 * PAGE_SIZE, 1)


# -- The machine and its processes ---------------------------------------------------------------

def test_system_backend_names(monkeypatch):
    assert hmmgpu.System(backend="numpy").backend_name == "numpy"
    monkeypatch.setenv("HMMGPU_BACKEND", "numpy")
    assert hmmgpu.System(backend="auto").backend_name == "numpy"
    assert hmmgpu.System().backend_name in ("cupy", "numpy")


SIGNATURES = {
    "mmap": "(length, prot, flags, fd=None, offset=0, addr=0)",
    "munmap": "(addr, length)",
    "mprotect": "(addr, length, prot)",
    "madvise": "(addr, length, advice)",
    "mremap": "(old_addr, old_size, new_size, flags, new_addr=0)",
    "read": "(addr, nbytes)",
    "write": "(addr, data)",
    "msync": f"(addr, length, flags={MS_SYNC})",
    "fork": "()",
    "exit": "(status=0)",
    "pin_user_pages": "(addr, npages, write=False, longterm=False)",
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_process_call_has_the_argument_names_and_defaults_of_the_page(proc, name):
    assert str(inspect.signature(getattr(proc, name))) == SIGNATURES[name]


def test_system_takes_backend_thp_and_hugetlb_pages_by_keyword():
    params = inspect.signature(hmmgpu.System).parameters
    assert params["backend"].default == "auto"
    assert params["thp"].default == "madvise"
    s = hmmgpu.System(backend="numpy", thp="never", hugetlb_pages=0)
    assert s.backend_name == "numpy"


def test_spawn_gives_an_empty_address_space(system):
    p = system.spawn()
    assert p.rss == {"anon": 0, "file": 0, "shmem": 0}
    with pytest.raises(hmmgpu.SegmentationFault):
        p.read(0x7F0000000000 - PAGE_SIZE, 1)


def test_mmap_returns_an_int_address_and_takes_its_arguments_by_keyword(proc):
    addr = proc.mmap(length=PAGE_SIZE, prot=RW, flags=ANON, fd=None, offset=0, addr=0)
    assert type(addr) is int and addr % PAGE_SIZE == 0
    fixed = addr - 16 * PAGE_SIZE
    got = proc.mmap(PAGE_SIZE, RW, ANON | MAP_FIXED, addr=fixed)
    assert got == fixed
    proc.write(fixed, b"x")


def test_an_mmap_hint_is_used_like_linuxs(proc):
    free = proc.mmap(4 * PAGE_SIZE, RW, ANON)
    proc.munmap(free, 4 * PAGE_SIZE)
    assert proc.mmap(PAGE_SIZE, RW, ANON, addr=free) == free                 # free: taken
    assert proc.mmap(PAGE_SIZE, RW, ANON, addr=free + PAGE_SIZE + 123) == free + PAGE_SIZE  # rounded down
    other = proc.mmap(PAGE_SIZE, RW, ANON, addr=free)                         # taken: elsewhere
    assert other not in (free, free + PAGE_SIZE)
    low = proc.mmap(PAGE_SIZE, RW, ANON, addr=PAGE_SIZE)                     # below mmap_min_addr
    assert low >= 0x10000


def test_read_returns_a_uint8_copy_and_write_takes_bytes_like_or_ndarray(proc):
    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    proc.write(addr, b"ab")
    proc.write(addr + 2, bytearray(b"cd"))
    proc.write(addr + 4, memoryview(b"ef"))
    proc.write(addr + 8, np.array([0x01020304], dtype=np.int32))    # its raw bytes
    got = proc.read(addr, 12)
    assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.shape == (12,)
    assert got.tobytes() == b"abcdef\0\0" + np.int32(0x01020304).tobytes()
    got[:] = 0                                   # a copy: memory is unchanged
    assert proc.read(addr, 2).tobytes() == b"ab"


def test_a_read_crosses_page_and_vma_boundaries(proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.mprotect(addr + PAGE_SIZE, PAGE_SIZE, PROT_READ)       # two VMAs now
    assert proc.read(addr + PAGE_SIZE - 3, 6).tobytes() == bytes(6)


def test_munmap(proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.munmap(addr, PAGE_SIZE)
    with pytest.raises(hmmgpu.SegmentationFault):
        proc.read(addr, 1)
    proc.write(addr + PAGE_SIZE, b"still here")
    proc.munmap(addr, 2 * PAGE_SIZE)             # unmapping a hole too is fine (Linux)
    raises(errno.EINVAL, proc.munmap, addr, 0)


def test_mprotect(proc):
    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    proc.write(addr, b"1")
    proc.mprotect(addr, PAGE_SIZE, PROT_NONE)
    with pytest.raises(hmmgpu.SegmentationFault):
        proc.read(addr, 1)
    proc.mprotect(addr, PAGE_SIZE, PROT_READ)
    assert proc.read(addr, 1).tobytes() == b"1"
    raises(errno.EINVAL, proc.mprotect, addr + 1, PAGE_SIZE, RW)


def test_madvise_dontneed_drops_private_anonymous_pages(proc):
    addr = proc.mmap(4 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\xff" * (4 * PAGE_SIZE))
    assert proc.rss["anon"] == 4
    proc.madvise(addr, 2 * PAGE_SIZE, MADV_DONTNEED)
    assert proc.rss["anon"] == 2
    assert (proc.read(addr, 2 * PAGE_SIZE) == 0).all()
    assert (proc.read(addr + 2 * PAGE_SIZE, 2 * PAGE_SIZE) == 0xff).all()


def test_madvise_free_and_its_errors(proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x01" * PAGE_SIZE)
    proc.madvise(addr, 2 * PAGE_SIZE, MADV_FREE)       # may discard: reads are old or zero
    assert set(proc.read(addr, PAGE_SIZE).tolist()) <= {0, 1}
    shared = proc.mmap(PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    raises(errno.EINVAL, proc.madvise, shared, PAGE_SIZE, MADV_FREE)
    proc.munmap(addr + PAGE_SIZE, PAGE_SIZE)
    raises(errno.ENOMEM, proc.madvise, addr, 2 * PAGE_SIZE, MADV_DONTNEED)
    raises(errno.EINVAL, proc.madvise, addr, PAGE_SIZE, 12345)


def test_mremap_grows_moves_and_keeps_the_data(proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.mmap(PAGE_SIZE, RW, ANON | MAP_FIXED, addr=addr + 2 * PAGE_SIZE)   # no room to grow
    data = pattern(2)
    proc.write(addr, data)
    raises(errno.ENOMEM, proc.mremap, addr, 2 * PAGE_SIZE, 4 * PAGE_SIZE, 0)
    new = proc.mremap(old_addr=addr, old_size=2 * PAGE_SIZE, new_size=4 * PAGE_SIZE,
                      flags=MREMAP_MAYMOVE)
    assert new != addr
    assert np.array_equal(proc.read(new, 2 * PAGE_SIZE), data)
    assert (proc.read(new + 2 * PAGE_SIZE, 2 * PAGE_SIZE) == 0).all()
    with pytest.raises(hmmgpu.SegmentationFault):
        proc.read(addr, 1)


def test_mremap_fixed_and_dontunmap(proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    data = pattern(2, seed=1)
    proc.write(addr, data)
    target = proc.mmap(2 * PAGE_SIZE, PROT_NONE, ANON)
    got = proc.mremap(addr, 2 * PAGE_SIZE, 2 * PAGE_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=target)
    assert got == target and np.array_equal(proc.read(target, 2 * PAGE_SIZE), data)
    raises(errno.EINVAL, proc.mremap, target, PAGE_SIZE, PAGE_SIZE, MREMAP_FIXED, new_addr=addr)
    # MREMAP_DONTUNMAP: the pages move, the old range stays mapped and refaults empty
    moved = proc.mremap(target, 2 * PAGE_SIZE, 2 * PAGE_SIZE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert np.array_equal(proc.read(moved, 2 * PAGE_SIZE), data)
    assert (proc.read(target, 2 * PAGE_SIZE) == 0).all()


def test_fork_is_copy_on_write(proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"parent")
    child = proc.fork()
    assert child.read(addr, 6).tobytes() == b"parent"
    child.write(addr, b"child!")
    assert proc.read(addr, 6).tobytes() == b"parent"
    proc.write(addr + PAGE_SIZE, b"later")
    assert child.read(addr + PAGE_SIZE, 5).tobytes() == bytes(5)
    child.exit()


def test_fork_shares_a_shared_mapping(proc):
    addr = proc.mmap(PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    child = proc.fork()
    child.write(addr, b"seen by both")
    assert proc.read(addr, 12).tobytes() == b"seen by both"
    child.exit(status=0)


def test_exit_tears_the_address_space_down_and_later_calls_fail(system, proc):
    addr = proc.mmap(4 * PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    child = proc.fork()
    proc.write(addr, b"\x01" * (4 * PAGE_SIZE))
    proc.exit(status=3)
    assert (child.read(addr, 4 * PAGE_SIZE) == 1).all()       # what others share stays
    for call, args in ((proc.read, (addr, 1)), (proc.mmap, (PAGE_SIZE, RW, ANON)), (proc.fork, ())):
        with pytest.raises(OSError):
            call(*args)
    child.exit()


def test_exit_sends_mmu_notify_release(proc):
    from hmmgpu.hmm import (MMU_NOTIFY_RELEASE, mmu_interval_notifier_insert,
                            mmu_interval_notifier_remove, mmu_interval_set_seq)
    from hmmgpu.hmm import MmuIntervalNotifier
    events = []

    class Ops:
        def invalidate(self, mni, range, cur_seq):
            events.append(range.event)
            mmu_interval_set_seq(mni, cur_seq)
            return True

    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    mni = MmuIntervalNotifier()
    assert mmu_interval_notifier_insert(mni, proc.mm, addr, PAGE_SIZE, Ops()) == 0
    proc.exit()
    assert MMU_NOTIFY_RELEASE in events
    mmu_interval_notifier_remove(mni)


def test_pin_user_pages_holds_the_pages_until_unpin(proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"pinned")
    pin = proc.pin_user_pages(addr, 2, write=False, longterm=False)
    # a pinned anonymous page is not shared copy-on-write with a child (Linux 5.8+): the parent
    # keeps its page, the child gets a copy
    child = proc.fork()
    child.write(addr, b"CHILD!")
    assert proc.read(addr, 6).tobytes() == b"pinned"
    pin.unpin()
    raises(errno.EFAULT, proc.pin_user_pages, addr + 4 * PAGE_SIZE, 1)
    proc.mprotect(addr, 2 * PAGE_SIZE, PROT_READ)
    raises(errno.EFAULT, proc.pin_user_pages, addr, 1, write=True)
    proc.pin_user_pages(addr, 1, longterm=True).unpin()
    child.exit()


def test_rss_counts_anon_file_and_shmem_pages(proc, datafile):
    fd, _, _ = datafile
    a = proc.mmap(3 * PAGE_SIZE, RW, ANON)
    f = proc.mmap(2 * PAGE_SIZE, PROT_READ, MAP_PRIVATE, fd=fd)
    s = proc.mmap(PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    assert proc.rss == {"anon": 0, "file": 0, "shmem": 0}
    proc.read(a, 3 * PAGE_SIZE)                  # the zero page counts nowhere
    assert proc.rss["anon"] == 0
    proc.write(a, b"\x01" * (3 * PAGE_SIZE))
    proc.read(f, 2 * PAGE_SIZE)
    proc.write(s, b"s")
    assert proc.rss == {"anon": 3, "file": 2, "shmem": 1}
    proc.munmap(f, 2 * PAGE_SIZE)
    assert proc.rss == {"anon": 3, "file": 0, "shmem": 1}
    # plain numbers: a harness may print or serialise them
    assert all(type(n) is int for n in proc.rss.values())
    assert json.loads(json.dumps(proc.rss)) == proc.rss
    child = proc.fork()                          # the child's entries count in its own rss
    assert child.rss == {"anon": 3, "file": 0, "shmem": 1}
    assert all(type(n) is int for n in child.rss.values())


# -- File mappings: a real OS file descriptor --------------------------------------------------

def test_a_file_mapping_reads_the_file(proc, datafile):
    fd, _, data = datafile
    addr = proc.mmap(2 * PAGE_SIZE, PROT_READ, MAP_PRIVATE, fd=fd, offset=PAGE_SIZE)
    assert np.array_equal(proc.read(addr, 2 * PAGE_SIZE), data[PAGE_SIZE:3 * PAGE_SIZE])


def test_msync_writes_a_shared_mapping_back_to_the_file(proc, datafile):
    fd, path, data = datafile
    addr = proc.mmap(4 * PAGE_SIZE, RW, MAP_SHARED, fd=fd)
    proc.write(addr + PAGE_SIZE, b"written through")
    proc.msync(addr, 4 * PAGE_SIZE)                      # flags=MS_SYNC
    assert os.pread(fd, 15, PAGE_SIZE) == b"written through"
    want = data.copy()
    want[PAGE_SIZE:PAGE_SIZE + 15] = np.frombuffer(b"written through", np.uint8)
    assert path.read_bytes() == want.tobytes()


def test_munmap_of_the_last_mapping_writes_back(proc, datafile):
    fd, _, _ = datafile
    a = proc.mmap(PAGE_SIZE, RW, MAP_SHARED, fd=fd)
    b = proc.mmap(PAGE_SIZE, RW, MAP_SHARED, fd=fd)
    proc.write(a, b"first")
    proc.munmap(a, PAGE_SIZE)
    proc.munmap(b, PAGE_SIZE)
    assert os.pread(fd, 5, 0) == b"first"


def test_exit_writes_back(proc, datafile):
    fd, _, _ = datafile
    addr = proc.mmap(PAGE_SIZE, RW, MAP_SHARED, fd=fd)
    proc.write(addr, b"at exit")
    proc.exit()
    assert os.pread(fd, 7, 0) == b"at exit"


def test_exit_writes_back_while_another_process_maps_the_file(proc, datafile):
    fd, _, _ = datafile
    addr = proc.mmap(PAGE_SIZE, RW, MAP_SHARED, fd=fd)
    child = proc.fork()
    child.write(addr, b"child's")
    child.exit()
    assert os.pread(fd, 7, 0) == b"child's"
    assert proc.read(addr, 7).tobytes() == b"child's"


def test_writeback_writes_dirty_pages_while_mapped(system, proc, datafile):
    fd, _, _ = datafile
    addr = proc.mmap(PAGE_SIZE, RW, MAP_SHARED, fd=fd)
    proc.write(addr, b"flushed")
    system.writeback()
    assert os.pread(fd, 7, 0) == b"flushed"
    proc.write(addr, b"again")                  # written after the writeback: not lost
    proc.msync(addr, PAGE_SIZE, flags=MS_SYNC)
    assert os.pread(fd, 7, 0) == b"agained"


def test_writeback_reaches_the_file_whichever_descriptor_mapped_it_first(proc, datafile):
    fd, path, _ = datafile
    ro = os.open(path, os.O_RDONLY)
    proc.read(proc.mmap(PAGE_SIZE, PROT_READ, MAP_PRIVATE, fd=ro), 1)    # the file's first mapping
    addr = proc.mmap(PAGE_SIZE, RW, MAP_SHARED, fd=fd)
    os.close(ro)
    proc.write(addr, b"through the inode")
    proc.msync(addr, PAGE_SIZE)
    assert os.pread(fd, 17, 0) == b"through the inode"


def test_a_file_mapping_outlives_its_descriptor(proc, tmp_path):
    path = tmp_path / "closed.bin"
    path.write_bytes(bytes(PAGE_SIZE))
    fd = os.open(path, os.O_RDWR)
    addr = proc.mmap(PAGE_SIZE, RW, MAP_SHARED, fd=fd)
    os.close(fd)
    proc.write(addr, b"after close")
    proc.munmap(addr, PAGE_SIZE)
    assert path.read_bytes()[:11] == b"after close"


def test_msync_over_a_hole_syncs_what_is_mapped_and_says_enomem(proc, datafile):
    fd, _, _ = datafile
    addr = proc.mmap(3 * PAGE_SIZE, RW, MAP_SHARED, fd=fd)
    proc.munmap(addr, PAGE_SIZE)                          # a hole first, then two mapped pages
    proc.write(addr + 2 * PAGE_SIZE, b"past the hole")
    raises(errno.ENOMEM, proc.msync, addr, 3 * PAGE_SIZE)
    assert os.pread(fd, 13, 2 * PAGE_SIZE) == b"past the hole"


def test_a_private_file_mapping_never_writes_the_file(proc, datafile):
    fd, path, data = datafile
    addr = proc.mmap(PAGE_SIZE, RW, MAP_PRIVATE, fd=fd)
    proc.write(addr, b"private")
    proc.msync(addr, PAGE_SIZE)
    proc.munmap(addr, PAGE_SIZE)
    assert path.read_bytes() == data.tobytes()


def test_file_mapping_errors(proc, tmp_path, datafile):
    fd, path, _ = datafile
    raises(errno.EBADF, proc.mmap, PAGE_SIZE, PROT_READ, MAP_SHARED)          # no fd
    ro = os.open(path, os.O_RDONLY)
    try:
        raises(errno.EACCES, proc.mmap, PAGE_SIZE, RW, MAP_SHARED, fd=ro)
        addr = proc.mmap(PAGE_SIZE, PROT_READ, MAP_SHARED, fd=ro)
        raises(errno.EACCES, proc.mprotect, addr, PAGE_SIZE, RW)
    finally:
        os.close(ro)
    raises(errno.EINVAL, proc.mmap, PAGE_SIZE, PROT_READ, MAP_SHARED, fd=fd, offset=1)


# -- dmirror ------------------------------------------------------------------------------------

def test_snapshot_flag_values():
    assert (dmirror.PROT_ERROR, dmirror.PROT_NONE, dmirror.PROT_READ, dmirror.PROT_WRITE,
            dmirror.PROT_PMD, dmirror.PROT_PUD, dmirror.PROT_ZERO, dmirror.PROT_DEV_PRIVATE_LOCAL,
            dmirror.PROT_DEV_PRIVATE_REMOTE, dmirror.PROT_DEV_COHERENT_LOCAL,
            dmirror.PROT_DEV_COHERENT_REMOTE) == (0xFF, 0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20,
                                                  0x30, 0x40, 0x50)


def test_device_memory_kinds(system):
    for memory in ("private", "coherent"):
        dmirror.DMirrorDevice(system, memory=memory).open(system.spawn()).close()
    raises(errno.EINVAL, dmirror.DMirrorDevice, system, memory="shared")


def test_device_read(mirror, proc):
    addr = proc.mmap(4 * PAGE_SIZE, RW, ANON)
    data = pattern(4)
    proc.write(addr, data)
    r = mirror.read(addr, 4)
    assert isinstance(r.data, np.ndarray) and r.data.dtype == np.uint8
    assert r.data.size == 4 * PAGE_SIZE and np.array_equal(r.data, data)
    assert (r.cpages, r.faults) == (4, 1)


def test_device_write(mirror, proc):
    addr = proc.mmap(4 * PAGE_SIZE, RW, ANON)
    data = pattern(3, seed=2)
    r = mirror.write(addr, data)
    assert (r.cpages, r.faults) == (3, 1)
    assert np.array_equal(proc.read(addr, 3 * PAGE_SIZE), data)


def test_migrate_to_dev_and_back(mirror, proc, memory):
    addr = proc.mmap(4 * PAGE_SIZE, RW, ANON)
    data = pattern(4, seed=3)
    proc.write(addr, data)
    r = mirror.migrate_to_dev(addr, 4)
    assert r.cpages == 4 and np.array_equal(r.data, data)
    local = dmirror.PROT_DEV_PRIVATE_LOCAL if memory == "private" else dmirror.PROT_DEV_COHERENT_LOCAL
    assert (mirror.snapshot(addr, 4).data == local | dmirror.PROT_WRITE).all()
    assert mirror.migrate_to_sys(addr, 4).cpages == 4
    assert (mirror.snapshot(addr, 4).data == dmirror.PROT_WRITE).all()
    assert np.array_equal(proc.read(addr, 4 * PAGE_SIZE), data)


def test_a_cpu_access_brings_device_private_pages_back(system, proc, dev):
    m = dev.open(proc)
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x42" * (2 * PAGE_SIZE))
    assert m.migrate_to_dev(addr, 2).cpages == 2
    assert (proc.read(addr, 2 * PAGE_SIZE) == 0x42).all()
    assert (m.snapshot(addr, 2).data == dmirror.PROT_WRITE).all()


def test_snapshot_reports_each_kind_of_page(mirror, proc):
    addr = proc.mmap(5 * PAGE_SIZE, RW, ANON)
    proc.munmap(addr + PAGE_SIZE, PAGE_SIZE)                 # 1: unmapped
    proc.mprotect(addr + 2 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    proc.read(addr + 2 * PAGE_SIZE, 1)                       # 2: the zero page, read-only
    proc.write(addr + 3 * PAGE_SIZE, b"w")                   # 3: written
    proc.mprotect(addr + 4 * PAGE_SIZE, PAGE_SIZE, PROT_NONE)  # 4: PROT_NONE
    r = mirror.snapshot(addr, 5)
    assert r.cpages == 5 and r.data.dtype == np.uint8
    assert r.data.tolist() == [dmirror.PROT_NONE, dmirror.PROT_ERROR,
                               dmirror.PROT_ZERO | dmirror.PROT_READ, dmirror.PROT_WRITE,
                               dmirror.PROT_ERROR]


def test_snapshot_of_another_devices_page(system, proc):
    a = dmirror.DMirrorDevice(system, memory="private").open(proc)
    b = dmirror.DMirrorDevice(system, memory="private").open(proc)
    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    proc.write(addr, b"x")
    assert a.migrate_to_dev(addr, 1).cpages == 1
    assert b.snapshot(addr, 1).data[0] == dmirror.PROT_NONE       # not its own: no access
    proc.read(addr, 1)                                             # back to system memory
    ca = dmirror.DMirrorDevice(system, memory="coherent").open(proc)
    cb = dmirror.DMirrorDevice(system, memory="coherent").open(proc)
    assert ca.migrate_to_dev(addr, 1).cpages == 1
    assert cb.snapshot(addr, 1).data[0] == dmirror.PROT_DEV_COHERENT_REMOTE | dmirror.PROT_WRITE
    assert a.snapshot(addr, 1).data[0] == dmirror.PROT_DEV_COHERENT_REMOTE | dmirror.PROT_WRITE


def test_exclusive_and_check_exclusive(mirror, proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    data = pattern(2, seed=4)
    proc.write(addr, data)
    r = mirror.exclusive(addr, 2)
    assert r.cpages == 2 and np.array_equal(r.data, data)
    raises(errno.EPERM, mirror.check_exclusive, addr, 2)
    proc.write(addr, b"cpu")                     # the CPU takes the page back
    raises(errno.EPERM, mirror.check_exclusive, addr, 2)   # the other page is still atomic
    proc.write(addr + PAGE_SIZE, b"cpu")
    mirror.check_exclusive(addr, 2)


def test_release_evicts_every_device_page(system, proc, dev):
    m = dev.open(proc)
    other = system.spawn()
    m2 = dev.open(other)
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    addr2 = other.mmap(PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x07" * (2 * PAGE_SIZE))
    other.write(addr2, b"\x08" * PAGE_SIZE)
    assert m.migrate_to_dev(addr, 2).cpages == 2
    assert m2.migrate_to_dev(addr2, 1).cpages == 1
    m.release()
    assert (m.snapshot(addr, 2).data == dmirror.PROT_WRITE).all()
    assert m2.snapshot(addr2, 1).data[0] == dmirror.PROT_WRITE
    assert (proc.read(addr, 2 * PAGE_SIZE) == 7).all() and (other.read(addr2, PAGE_SIZE) == 8).all()


def test_fail_alloc_fails_the_next_device_allocation_once(proc, dev):
    # lib/test_hmm.c: the first page's allocation fails; a small page has no fallback and stays
    # in system memory, so the readback finds it missing
    m = dev.open(proc)
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x09" * (2 * PAGE_SIZE))
    m.set_flags(dmirror.FLAG_FAIL_ALLOC)
    raises(errno.ENOENT, m.migrate_to_dev, addr, 2)
    assert m.snapshot(addr, 2).data.tolist() == [dmirror.PROT_WRITE,
                                                 dmirror.PROT_DEV_PRIVATE_LOCAL | dmirror.PROT_WRITE]
    assert m.migrate_to_dev(addr, 2).cpages == 2            # spent
    assert (proc.read(addr, 2 * PAGE_SIZE) == 9).all()


def test_fail_alloc_fails_the_next_system_allocation_once(proc, dev):
    m = dev.open(proc)
    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x09" * PAGE_SIZE)
    assert m.migrate_to_dev(addr, 1).cpages == 1
    m.set_flags(dmirror.FLAG_FAIL_ALLOC)
    assert m.migrate_to_sys(addr, 1).cpages == 0     # the one allocation fails: the page stays
    assert m.snapshot(addr, 1).data[0] == dmirror.PROT_DEV_PRIVATE_LOCAL | dmirror.PROT_WRITE
    assert m.migrate_to_sys(addr, 1).cpages == 1     # the flag was used up
    assert (proc.read(addr, PAGE_SIZE) == 9).all()


def test_fail_alloc_is_spent_by_a_cpu_fault_on_the_opens_page(proc, dev):
    m = dev.open(proc)
    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x0a" * PAGE_SIZE)
    assert m.migrate_to_dev(addr, 1).cpages == 1
    m.set_flags(dmirror.FLAG_FAIL_ALLOC)
    assert (proc.read(addr, PAGE_SIZE) == 10).all()    # VM_FAULT_OOM, the fault again: home
    assert m.migrate_to_dev(addr, 1).cpages == 1      # the flag went with the fault


def test_fail_alloc_on_a_thp_falls_back_to_small_pages():
    system = hmmgpu.System(backend="auto", thp="always")
    proc = system.spawn()
    m = dmirror.DMirrorDevice(system, memory="private").open(proc)
    addr = _aligned_2m(proc)
    data = pattern(PMD_SIZE // PAGE_SIZE, seed=5)
    proc.write(addr, data)
    m.set_flags(dmirror.FLAG_FAIL_ALLOC)
    r = m.migrate_to_dev(addr, PMD_SIZE // PAGE_SIZE)
    assert r.cpages == PMD_SIZE // PAGE_SIZE and np.array_equal(r.data, data)
    assert (m.snapshot(addr, PMD_SIZE // PAGE_SIZE).data
            == dmirror.PROT_DEV_PRIVATE_LOCAL | dmirror.PROT_WRITE).all()      # no PROT_PMD


def test_device_errors(mirror, proc):
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    for call in (mirror.read, mirror.migrate_to_dev, mirror.migrate_to_sys, mirror.snapshot,
                 mirror.exclusive):
        raises(errno.EINVAL, call, addr + 1, 1)          # unaligned
        raises(errno.EINVAL, call, addr, 0)              # zero pages
    raises(errno.EINVAL, mirror.write, addr, b"")
    proc.mprotect(addr, PAGE_SIZE, PROT_NONE)
    raises(errno.EFAULT, mirror.read, addr, 1)
    proc.mprotect(addr, PAGE_SIZE, PROT_READ)
    raises(errno.EPERM, mirror.write, addr, bytes(PAGE_SIZE))
    shared = proc.mmap(PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    raises(errno.ENOENT, mirror.migrate_to_dev, shared, 1)


def test_a_device_mmap_is_a_mixed_map_of_driver_pages(proc, dev):
    m = dev.open(proc)
    addr = proc.mmap(PAGE_SIZE, RW, MAP_PRIVATE, fd=m)
    assert m.snapshot(addr, 1).data[0] == dmirror.PROT_READ
    assert (proc.read(addr, PAGE_SIZE) == 0).all()


def test_after_exit_the_open_answers_einval(proc, dev):
    m = dev.open(proc)
    addr = proc.mmap(2 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x01" * (2 * PAGE_SIZE))
    assert m.migrate_to_dev(addr, 2).cpages == 2
    proc.exit()                                  # MMU_NOTIFY_RELEASE: the mirror lets go too
    for call in (m.read, m.snapshot, m.migrate_to_dev, m.migrate_to_sys, m.exclusive):
        raises(errno.EINVAL, call, addr, 1)      # mmget_not_zero() fails
    m.close()


def test_a_closed_open_is_a_closed_descriptor(proc, dev):
    m = dev.open(proc)
    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    m.close()
    m.close()                                    # closing twice is harmless
    for call in (m.read, m.migrate_to_dev, m.migrate_to_sys, m.snapshot, m.exclusive,
                 m.check_exclusive):
        raises(errno.EBADF, call, addr, 1)
    raises(errno.EBADF, m.write, addr, bytes(PAGE_SIZE))
    raises(errno.EBADF, m.release)
    raises(errno.EBADF, m.set_flags, dmirror.FLAG_FAIL_ALLOC)
    raises(errno.EBADF, proc.mmap, PAGE_SIZE, RW, MAP_SHARED, fd=m)


def test_the_open_is_bound_to_its_process(system, dev):
    a, b = system.spawn(), system.spawn()
    ma = dev.open(a)
    addr = b.mmap(PAGE_SIZE, RW, ANON)
    b.write(addr, b"b's page")
    assert ma.snapshot(addr, 1).data[0] == dmirror.PROT_ERROR        # not mapped in a
    raises(errno.EFAULT, ma.read, addr, 1)
    ma.close()


# -- The kernel-level API ------------------------------------------------------------------------

MODERN = ["mmu_interval_notifier_insert", "mmu_interval_notifier_remove", "mmu_interval_read_begin",
          "mmu_interval_read_retry", "mmu_interval_set_seq", "MMU_NOTIFY_UNMAP", "MMU_NOTIFY_CLEAR",
          "MMU_NOTIFY_PROTECTION_VMA", "MMU_NOTIFY_PROTECTION_PAGE", "MMU_NOTIFY_SOFT_DIRTY",
          "MMU_NOTIFY_RELEASE", "MMU_NOTIFY_MIGRATE", "MMU_NOTIFY_EXCLUSIVE",
          "HmmRange", "hmm_range_fault", "HMM_PFN_VALID", "HMM_PFN_WRITE", "HMM_PFN_ERROR",
          "HMM_PFN_REQ_FAULT", "HMM_PFN_REQ_WRITE", "hmm_pfn_to_map_order",
          "DevPagemap", "MEMORY_DEVICE_PRIVATE", "MEMORY_DEVICE_COHERENT", "memremap_pages",
          "memunmap_pages", "MigrateVma", "migrate_vma_setup", "migrate_vma_pages",
          "migrate_vma_finalize", "migrate_device_range", "MIGRATE_VMA_SELECT_SYSTEM",
          "MIGRATE_VMA_SELECT_DEVICE_PRIVATE", "MIGRATE_VMA_SELECT_DEVICE_COHERENT",
          "MIGRATE_PFN_VALID", "MIGRATE_PFN_MIGRATE", "MIGRATE_PFN_WRITE", "make_device_exclusive"]

LEGACY = ["hmm_mirror_register", "hmm_vma_get_pfns", "hmm_vma_fault", "hmm_vma_range_done",
          "hmm_devmem_add", "migrate_vma"]


@pytest.mark.parametrize("name", MODERN)
def test_modern_kernel_api_name_is_importable(name):
    from hmmgpu import hmm
    assert hasattr(hmm, name)


def test_modern_flag_values_are_linuxs():
    from hmmgpu import hmm
    assert (hmm.HMM_PFN_VALID, hmm.HMM_PFN_WRITE, hmm.HMM_PFN_ERROR) == (1 << 63, 1 << 62, 1 << 61)
    assert hmm.HMM_PFN_REQ_FAULT == hmm.HMM_PFN_VALID and hmm.HMM_PFN_REQ_WRITE == hmm.HMM_PFN_WRITE
    assert (hmm.MMU_NOTIFY_UNMAP, hmm.MMU_NOTIFY_CLEAR, hmm.MMU_NOTIFY_PROTECTION_VMA,
            hmm.MMU_NOTIFY_PROTECTION_PAGE, hmm.MMU_NOTIFY_SOFT_DIRTY, hmm.MMU_NOTIFY_RELEASE,
            hmm.MMU_NOTIFY_MIGRATE, hmm.MMU_NOTIFY_EXCLUSIVE) == tuple(range(8))
    assert (hmm.MIGRATE_PFN_VALID, hmm.MIGRATE_PFN_MIGRATE, hmm.MIGRATE_PFN_WRITE) == (1, 2, 8)
    assert (hmm.MIGRATE_VMA_SELECT_SYSTEM, hmm.MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
            hmm.MIGRATE_VMA_SELECT_DEVICE_COHERENT) == (1, 2, 4)
    assert hmm.MEMORY_DEVICE_PRIVATE != hmm.MEMORY_DEVICE_COHERENT


def test_dev_pagemap_ops_are_page_free_and_migrate_to_ram():
    from hmmgpu import hmm
    ops = hmm.DevPagemapOps
    assert callable(ops.page_free) and callable(ops.migrate_to_ram)


@pytest.mark.parametrize("name", LEGACY)
def test_2017_api_name_is_importable(name):
    from hmmgpu import hmm
    assert callable(getattr(hmm, name))


def _fault_in(proc, addr, npages, flags):
    from hmmgpu import hmm

    class Ops:
        def invalidate(self, mni, range, cur_seq):
            hmm.mmu_interval_set_seq(mni, cur_seq)
            return True

    mni = hmm.MmuIntervalNotifier()
    assert hmm.mmu_interval_notifier_insert(mni, proc.mm, addr, npages * PAGE_SIZE, Ops()) == 0
    rng = hmm.HmmRange(notifier=mni, start=addr, end=addr + npages * PAGE_SIZE,
                       hmm_pfns=np.zeros(npages, np.uint64), default_flags=flags)
    try:
        for _ in range(hmm.HMM_RANGE_DEFAULT_TIMEOUT):      # the driver's retry loop, bounded
            rng.notifier_seq = hmm.mmu_interval_read_begin(mni)
            with proc.mm.mmap_lock.read():
                ret = hmm.hmm_range_fault(rng)
            if ret == -errno.EBUSY or (ret == 0 and hmm.mmu_interval_read_retry(mni, rng.notifier_seq)):
                continue
            return ret, rng.hmm_pfns
        raise AssertionError("hmm_range_fault kept answering -EBUSY")
    finally:
        hmm.mmu_interval_notifier_remove(mni)


def test_hmm_range_fault_fills_a_uint64_numpy_array(proc):
    from hmmgpu import hmm
    addr = proc.mmap(4 * PAGE_SIZE, RW, ANON)
    proc.mprotect(addr + 3 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    ret, pfns = _fault_in(proc, addr, 3, hmm.HMM_PFN_REQ_FAULT | hmm.HMM_PFN_REQ_WRITE)
    assert ret == 0
    assert isinstance(pfns, np.ndarray) and pfns.dtype == np.uint64
    assert ((pfns & np.uint64(hmm.HMM_PFN_VALID | hmm.HMM_PFN_WRITE))
            == np.uint64(hmm.HMM_PFN_VALID | hmm.HMM_PFN_WRITE)).all()
    assert (hmm.hmm_pfn_to_map_order(pfns) == 0).all()
    # the kernel's return conventions: a negative errno
    assert _fault_in(proc, addr + 3 * PAGE_SIZE, 1, hmm.HMM_PFN_REQ_FAULT | hmm.HMM_PFN_REQ_WRITE)[0] == -errno.EPERM
    proc.munmap(addr, PAGE_SIZE)
    assert _fault_in(proc, addr, 1, hmm.HMM_PFN_REQ_FAULT)[0] == -errno.EFAULT


def test_pfn_arrays_must_be_uint64_numpy_arrays(proc):
    from hmmgpu import hmm
    addr = proc.mmap(PAGE_SIZE, RW, ANON)
    mni = hmm.MmuIntervalNotifier()

    class Ops:
        def invalidate(self, mni, range, cur_seq):
            hmm.mmu_interval_set_seq(mni, cur_seq)
            return True

    hmm.mmu_interval_notifier_insert(mni, proc.mm, addr, PAGE_SIZE, Ops())
    rng = hmm.HmmRange(notifier=mni, start=addr, end=addr + PAGE_SIZE, hmm_pfns=[0],
                       default_flags=hmm.HMM_PFN_REQ_FAULT)
    rng.notifier_seq = hmm.mmu_interval_read_begin(mni)
    assert hmm.hmm_range_fault(rng) == -errno.EINVAL
    hmm.mmu_interval_notifier_remove(mni)


def test_memremap_pages_takes_a_pgmap_with_page_free_and_migrate_to_ram(system):
    from hmmgpu import hmm
    freed = []

    class Ops:
        def page_free(self, pfns):
            freed.append(pfns)

        def migrate_to_ram(self, vmf):
            return 0

    owner = object()
    pgmap = hmm.DevPagemap(hmm.MEMORY_DEVICE_PRIVATE, Ops(), owner, 16)
    first = hmm.memremap_pages(pgmap, system)
    assert isinstance(first, int)
    hmm.memunmap_pages(pgmap)

    class NoFault:
        def page_free(self, pfns):
            pass

    raises(errno.EINVAL, hmm.memremap_pages, hmm.DevPagemap(hmm.MEMORY_DEVICE_PRIVATE, NoFault(), owner, 16),
           system)
    coherent = hmm.DevPagemap(hmm.MEMORY_DEVICE_COHERENT, NoFault(), owner, 16)
    hmm.memremap_pages(coherent, system)          # coherent memory needs no migrate_to_ram
    hmm.memunmap_pages(coherent)


def test_migrate_vma_setup_collects_into_uint64_arrays(proc):
    from hmmgpu import hmm
    addr = proc.mmap(4 * PAGE_SIZE, RW, ANON)
    proc.write(addr, b"\x03" * (2 * PAGE_SIZE))             # two pages, two holes
    with proc.mm.mmap_lock.read():
        args = hmm.MigrateVma(proc.mm.find_vma(addr), addr, addr + 4 * PAGE_SIZE, pgmap_owner=object(),
                              flags=hmm.MIGRATE_VMA_SELECT_SYSTEM)
        assert hmm.migrate_vma_setup(args) == 0
        for a in (args.src, args.dst):
            assert isinstance(a, np.ndarray) and a.dtype == np.uint64
        assert (args.cpages, args.npages) == (4, 4)
        assert ((args.src & np.uint64(hmm.MIGRATE_PFN_MIGRATE)) != 0).all()
        valid = (args.src & np.uint64(hmm.MIGRATE_PFN_VALID)) != 0
        assert valid.tolist() == [True, True, False, False]
        hmm.migrate_vma_pages(args)                           # no destinations: nothing moves
        hmm.migrate_vma_finalize(args)
    assert (proc.read(addr, 2 * PAGE_SIZE) == 3).all()
    assert (proc.read(addr + 2 * PAGE_SIZE, 2 * PAGE_SIZE) == 0).all()


# -- Huge pages ------------------------------------------------------------------------------------

def _aligned_2m(proc):
    base = proc.mmap(2 * PMD_SIZE, RW, ANON)
    start = -(-base // PMD_SIZE) * PMD_SIZE
    return start


@pytest.mark.parametrize("thp,advise,pmd", [("madvise", True, True), ("madvise", False, False),
                                            ("always", False, True), ("never", True, False)])
def test_thp_modes(thp, advise, pmd):
    system = hmmgpu.System(backend="auto", thp=thp)
    proc = system.spawn()
    m = dmirror.DMirrorDevice(system, memory="private").open(proc)
    addr = _aligned_2m(proc)
    if advise:
        proc.madvise(addr, PMD_SIZE, MADV_HUGEPAGE)
    proc.write(addr, b"\x01" * PAGE_SIZE)                  # one fault
    flags = m.snapshot(addr, PMD_SIZE // PAGE_SIZE).data
    want = dmirror.PROT_PMD | dmirror.PROT_WRITE if pmd else dmirror.PROT_WRITE
    assert flags[0] == want
    assert proc.rss["anon"] == (PMD_SIZE // PAGE_SIZE if pmd else 1)
    if pmd:
        assert (flags == want).all()


def test_a_private_anonymous_mapping_of_whole_2mib_units_is_2mib_aligned():
    # Linux 6.7+ (thp_get_unmapped_area): so mmap + MADV_HUGEPAGE gives THPs with no alignment
    # done by hand
    system = hmmgpu.System(backend="auto", thp="madvise")
    proc = system.spawn()
    m = dmirror.DMirrorDevice(system, memory="private").open(proc)
    proc.mmap(PAGE_SIZE, RW, ANON)                 # something unaligned before it
    addr = proc.mmap(PMD_SIZE, RW, ANON)
    assert addr % PMD_SIZE == 0
    proc.madvise(addr, PMD_SIZE, MADV_HUGEPAGE)
    proc.write(addr, b"\x01")
    assert m.snapshot(addr, 1).data[0] == dmirror.PROT_PMD | dmirror.PROT_WRITE
    moved = proc.mremap(addr, PMD_SIZE, 2 * PMD_SIZE, MREMAP_MAYMOVE)
    assert moved % PMD_SIZE == 0
    assert m.snapshot(moved, 1).data[0] == dmirror.PROT_PMD | dmirror.PROT_WRITE    # moved whole


def test_madv_nohugepage_and_collapse():
    system = hmmgpu.System(backend="auto", thp="always")
    proc = system.spawn()
    m = dmirror.DMirrorDevice(system, memory="private").open(proc)
    addr = _aligned_2m(proc)
    proc.madvise(addr, PMD_SIZE, MADV_NOHUGEPAGE)
    proc.write(addr, b"\x01" * PMD_SIZE)
    assert m.snapshot(addr, 1).data[0] == dmirror.PROT_WRITE
    proc.madvise(addr, PMD_SIZE, MADV_HUGEPAGE)
    proc.madvise(addr, PMD_SIZE, MADV_COLLAPSE)
    assert m.snapshot(addr, 1).data[0] == dmirror.PROT_PMD | dmirror.PROT_WRITE
    assert (proc.read(addr, PMD_SIZE) == 1).all()


def test_map_hugetlb_takes_pages_from_the_pool():
    system = hmmgpu.System(backend="auto", hugetlb_pages=2)
    proc = system.spawn()
    m = dmirror.DMirrorDevice(system, memory="private").open(proc)
    addr = proc.mmap(2 * PMD_SIZE, RW, ANON | MAP_HUGETLB)
    assert addr % PMD_SIZE == 0
    proc.write(addr, b"huge")
    assert m.snapshot(addr, 1).data[0] == dmirror.PROT_PMD | dmirror.PROT_WRITE
    raises(errno.ENOMEM, proc.mmap, PMD_SIZE, RW, ANON | MAP_HUGETLB)     # the pool is empty
    proc.munmap(addr, 2 * PMD_SIZE)
    proc.munmap(proc.mmap(PMD_SIZE, RW, ANON | MAP_HUGETLB), PMD_SIZE)   # back in the pool


def test_mremap_of_a_hugetlb_mapping_moves_and_shrinks_but_does_not_grow():
    system = hmmgpu.System(backend="auto", hugetlb_pages=3)
    proc = system.spawn()
    m = dmirror.DMirrorDevice(system, memory="private").open(proc)
    addr = proc.mmap(2 * PMD_SIZE, RW, ANON | MAP_HUGETLB)
    data = pattern(2 * PMD_SIZE // PAGE_SIZE, seed=6)
    proc.write(addr, data)
    raises(errno.EINVAL, proc.mremap, addr, 2 * PMD_SIZE, 3 * PMD_SIZE, MREMAP_MAYMOVE)
    target = _aligned_2m(proc)
    raises(errno.EINVAL, proc.mremap, addr, 2 * PMD_SIZE, 2 * PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED,
           new_addr=target + PAGE_SIZE)
    target = proc.mremap(addr, 2 * PMD_SIZE, 2 * PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=target)
    assert np.array_equal(proc.read(target, 2 * PMD_SIZE), data)
    assert m.snapshot(target, 1).data[0] == dmirror.PROT_PMD | dmirror.PROT_WRITE
    assert proc.mremap(target, 2 * PMD_SIZE, PMD_SIZE, 0) == target          # shrink: one back
    assert np.array_equal(proc.read(target, PMD_SIZE), data[:PMD_SIZE])
    proc.mmap(2 * PMD_SIZE, RW, ANON | MAP_HUGETLB)                           # the pool has two again


def test_a_shared_hugetlb_mapping_is_shared_with_a_child_and_survives_dontneed():
    system = hmmgpu.System(backend="auto", hugetlb_pages=1)
    proc = system.spawn()
    m = dmirror.DMirrorDevice(system, memory="private").open(proc)
    addr = proc.mmap(PMD_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB)
    proc.write(addr, b"parent")
    assert m.snapshot(addr, 1).data[0] == dmirror.PROT_PMD | dmirror.PROT_WRITE
    child = proc.fork()
    child.write(addr + 6, b" and child")          # no copy: the pool is empty and it works
    assert proc.read(addr, 16).tobytes() == b"parent and child"
    proc.madvise(addr, PMD_SIZE, MADV_DONTNEED)    # unmaps; the object keeps the page
    assert proc.read(addr, 6).tobytes() == b"parent"
    assert proc.rss == {"anon": 0, "file": 0, "shmem": 0}      # HugetlbPages, not rss
    raises(errno.ENOMEM, proc.mmap, PMD_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB)
    proc.munmap(addr, PMD_SIZE)
    child.exit()                                   # the last mapping: the page goes back
    proc.munmap(proc.mmap(PMD_SIZE, RW, ANON | MAP_HUGETLB), PMD_SIZE)


def test_an_empty_hugetlb_pool_is_enomem():
    proc = hmmgpu.System(backend="auto", hugetlb_pages=0).spawn()
    raises(errno.ENOMEM, proc.mmap, PMD_SIZE, RW, ANON | MAP_HUGETLB)


def test_the_default_system_reserves_a_small_hugetlb_pool():
    proc = hmmgpu.System(backend="auto").spawn()
    addr = proc.mmap(PMD_SIZE, RW, ANON | MAP_HUGETLB)
    proc.write(addr, b"ok")


# -- The README's set-up -------------------------------------------------------------------------

def test_the_console_script_and_the_test_extra_are_declared():
    import tomllib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["hmmgpu"] == "hmmgpu.cli:main"
    assert any(d.startswith("pytest") for d in project["optional-dependencies"]["test"])
