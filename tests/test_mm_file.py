"""File mappings and the page cache on real file descriptors (mm/filemap.c, mm/msync.c,
mm/page-writeback.c).  Files are real temp files; what reaches the disk is read back with
plain Python I/O, never through hmmgpu."""
import errno
import os

import numpy as np
import pytest

import hmmgpu
from hmmgpu import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    MS_SYNC,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
MS_ASYNC = 1


def content(npages, seed=0, extra=0):
    return np.random.default_rng(seed).integers(1, 256, size=npages * P + extra, dtype=np.uint8).tobytes()


def snapshot(proc):
    return [(v.start, v.end, getattr(v, "vm_flags", None), np.array(v.pte, copy=True).tobytes())
            for v in proc.mm.vmas]


# ---------------------------------------------------------------------------------------------
# reading and writing through shared mappings
# ---------------------------------------------------------------------------------------------

def test_shared_mapping_reads_file(mm_system, mm_file):
    data = content(4, 1)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(4 * P, PROT_READ, MAP_SHARED, fd=fd)
    assert bytes(p.read(a, 4 * P)) == data
    assert p.rss["file"] == 4 and p.rss["anon"] == 0


def test_mapping_with_offset(mm_system, mm_file):
    data = content(4, 2)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(2 * P, PROT_READ, MAP_SHARED, fd=fd, offset=2 * P)
    assert bytes(p.read(a, 2 * P)) == data[2 * P:]
    b = p.mmap(P, PROT_READ, MAP_PRIVATE, fd=fd, offset=P)
    assert bytes(p.read(b, P)) == data[P:2 * P]


def test_unaligned_offset_is_einval(mm_system, mm_file):
    fd = mm_file(content(2))
    p = mm_system.spawn()
    with pytest.raises(OSError) as ei:
        p.mmap(P, PROT_READ, MAP_SHARED, fd=fd, offset=100)
    assert ei.value.errno == errno.EINVAL
    assert list(p.mm.vmas) == []


def test_shared_write_msync_reaches_file(mm_system, mm_file):
    data = content(3, 3)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(3 * P, RW, MAP_SHARED, fd=fd)
    p.write(a + P + 10, b"HELLO")
    p.msync(a, 3 * P, MS_SYNC)
    exp = bytearray(data)
    exp[P + 10:P + 15] = b"HELLO"
    assert mm_file.contents(fd) == bytes(exp)
    # the mapping still works and a second msync with nothing dirty changes nothing
    p.msync(a, 3 * P)
    assert mm_file.contents(fd) == bytes(exp)
    p.write(a, b"again")
    p.msync(a, P)
    exp[0:5] = b"again"
    assert mm_file.contents(fd) == bytes(exp)


def test_msync_of_part_writes_at_least_that_part(mm_system, mm_file):
    data = content(4, 4)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, MAP_SHARED, fd=fd)
    p.write(a + 3 * P, b"tail")
    p.msync(a + 3 * P, P)
    assert mm_file.contents(fd)[3 * P:3 * P + 4] == b"tail"


def test_munmap_of_last_mapping_writes_back(mm_system, mm_file):
    data = content(2, 5)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    p.write(a + P, b"unmap")
    p.munmap(a, 2 * P)
    assert mm_file.contents(fd)[P:P + 5] == b"unmap"


def test_exit_writes_back(mm_system, mm_file):
    fd = mm_file(content(2, 6))
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    p.write(a, b"exit!")
    p.exit()
    assert mm_file.contents(fd)[:5] == b"exit!"


def test_system_writeback(mm_system, mm_file):
    fd = mm_file(content(2, 7))
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    p.write(a + P, b"flush")
    mm_system.writeback()
    assert mm_file.contents(fd)[P:P + 5] == b"flush"
    assert p.alive
    # still mapped and coherent afterwards; a later write is written by the next writeback
    p.write(a + P, b"FLUSH")
    mm_system.writeback()
    assert mm_file.contents(fd)[P:P + 5] == b"FLUSH"


def test_mapping_survives_closing_the_fd(mm_system, mm_file):
    # the VMA holds its own reference to the file (get_file in mmap_region)
    data = content(2, 8)
    fd = mm_file(data)
    path = mm_file.path(fd)
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    os.close(fd)
    # take the same fd number for an unrelated file: writeback must not go there
    other = os.open(path.parent / "decoy", os.O_RDWR | os.O_CREAT)
    try:
        assert bytes(p.read(a, 2 * P)) == data
        p.write(a, b"closed")
        p.munmap(a, 2 * P)
        with open(path, "rb") as f:
            assert f.read(6) == b"closed"
        assert os.fstat(other).st_size == 0
    finally:
        os.close(other)


def test_msync_does_not_extend_file_and_writes_only_within_eof(mm_system, mm_file):
    data = content(1, 9, extra=P // 2)            # 1.5 pages
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    got = p.read(a, 2 * P)
    assert bytes(got[:len(data)]) == data
    assert not got[len(data):].any(), "the part of the last page past EOF reads as zero"
    p.write(a + P + 100, b"in")
    p.write(a + P + P // 2 + 100, b"past eof")     # same page, beyond EOF: allowed, never written
    p.msync(a, 2 * P)
    on_disk = mm_file.contents(fd)
    assert len(on_disk) == len(data)
    assert on_disk[P + 100:P + 102] == b"in"


def test_sigbus_past_end_of_file(mm_system, mm_file):
    data = content(1, 10, extra=10)              # the file ends inside page 1
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, MAP_SHARED, fd=fd)
    p.read(a + P, P)                            # page 1 is partly inside the file: fine
    for off in (2 * P, 3 * P + 5):
        with pytest.raises(OSError) as ei:
            p.read(a + off, 1)
        assert ei.value.errno == errno.EFAULT
        assert not isinstance(ei.value, hmmgpu.ProcessKilled)
        with pytest.raises(OSError) as ei:
            p.write(a + off, b"x")
        assert ei.value.errno == errno.EFAULT
    bus = getattr(hmmgpu, "BusError", None)
    if bus is not None:
        with pytest.raises(bus):
            p.read(a + 2 * P, 1)
    assert p.alive
    assert len(mm_file.contents(fd)) == len(data)


def test_sigbus_private_mapping_past_eof(mm_system, mm_file):
    fd = mm_file(content(1, 11))
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_PRIVATE, fd=fd)
    with pytest.raises(OSError) as ei:
        p.write(a + P, b"x")                  # no COW of a page that does not exist
    assert ei.value.errno == errno.EFAULT


def test_empty_file_can_be_mapped_but_not_touched(mm_system, mm_file):
    fd = mm_file(b"")
    p = mm_system.spawn()
    a = p.mmap(P, PROT_READ, MAP_SHARED, fd=fd)
    with pytest.raises(OSError) as ei:
        p.read(a, 1)
    assert ei.value.errno == errno.EFAULT


# ---------------------------------------------------------------------------------------------
# private file mappings
# ---------------------------------------------------------------------------------------------

def test_private_mapping_never_writes_the_file(mm_system, mm_file):
    data = content(3, 12)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(3 * P, RW, MAP_PRIVATE, fd=fd)
    p.write(a + P, b"private")
    assert bytes(p.read(a + P, 7)) == b"private"
    p.msync(a, 3 * P)
    mm_system.writeback()
    assert mm_file.contents(fd) == data
    c = p.fork()
    c.write(a, b"child")
    p.munmap(a, 3 * P)
    c.exit()
    p.exit()
    mm_system.writeback()
    assert mm_file.contents(fd) == data


def test_private_write_moves_page_from_file_to_anon_rss(mm_system, mm_file):
    fd = mm_file(content(3, 13))
    p = mm_system.spawn()
    a = p.mmap(3 * P, RW, MAP_PRIVATE, fd=fd)
    p.read(a, 3 * P)
    assert p.rss == {"anon": 0, "file": 3, "shmem": 0}
    p.write(a + 2 * P, b"cow")
    assert p.rss == {"anon": 1, "file": 2, "shmem": 0}


def test_private_mapping_sees_shared_writes_until_it_copies(mm_system, mm_file, mmh):
    data = content(2, 14)
    fd = mm_file(data)
    w = mm_system.spawn()
    r = mm_system.spawn()
    a = w.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    b = r.mmap(2 * P, RW, MAP_PRIVATE, fd=fd)
    assert bytes(r.read(b, 2 * P)) == data
    assert bytes(w.read(a, 2 * P)) == data
    assert mmh.pfn(r, b) == mmh.pfn(w, a), "an uncopied private page is the page-cache page"
    assert not mmh.writable(r, b)
    w.write(a, b"shared-1")
    assert bytes(r.read(b, 8)) == b"shared-1"
    r.write(b + P, b"mine")                 # page 1 of r is now an anon copy
    w.write(a + P, b"shared-2")
    assert bytes(r.read(b + P, 8)) == b"mine" + data[P + 4:P + 8]
    assert bytes(w.read(a + P, 8)) == b"shared-2"


def test_private_file_dontneed_refetches_from_file(mm_system, mm_file, mmh):
    data = content(2, 15)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_PRIVATE, fd=fd)
    p.write(a, b"scribble")
    p.madvise(a, 2 * P, MADV_DONTNEED)
    assert bytes(p.read(a, 2 * P)) == data, "MADV_DONTNEED drops the private copy"
    assert p.rss["anon"] == 0


def test_private_readonly_fd_can_be_written(mm_system, mm_file):
    data = content(1, 16)
    fd = mm_file(data, flags=os.O_RDONLY)
    p = mm_system.spawn()
    a = p.mmap(P, RW, MAP_PRIVATE, fd=fd)
    p.write(a, b"ok")
    assert bytes(p.read(a, 2)) == b"ok"
    p.exit()
    assert mm_file.contents(fd) == data


def test_private_file_fork_is_cow(mm_system, mm_file):
    data = content(1, 17)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(P, RW, MAP_PRIVATE, fd=fd)
    p.write(a, b"parent")
    c = p.fork()
    c.write(a, b"CHILD!")
    assert bytes(p.read(a, 6)) == b"parent"
    assert bytes(c.read(a, 6)) == b"CHILD!"
    assert bytes(c.read(a + 6, P - 6)) == data[6:]


# ---------------------------------------------------------------------------------------------
# sharing the page cache
# ---------------------------------------------------------------------------------------------

def test_two_processes_share_page_cache_pages(mm_system, mm_file, mmh):
    data = content(3, 18)
    fd = mm_file(data)
    p = mm_system.spawn()
    q = mm_system.spawn()
    a = p.mmap(3 * P, RW, MAP_SHARED, fd=fd)
    b = q.mmap(3 * P, RW, MAP_SHARED, fd=fd)
    free0 = mmh.nr_free(mm_system)
    p.write(a + P, b"from p")
    assert bytes(q.read(b + P, 6)) == b"from p"
    q.write(b + 2 * P, b"from q")
    assert bytes(p.read(a + 2 * P, 6)) == b"from q"
    q.read(b, P)
    p.read(a, P)
    for i in range(3):
        assert mmh.pfn(p, a + i * P) == mmh.pfn(q, b + i * P)
        assert mmh.mapcount(mm_system, mmh.pfn(p, a + i * P)) == 2
    assert mmh.nr_free(mm_system) == free0 - 3


def test_page_cache_is_per_file_not_per_fd(mm_system, mm_file, mmh):
    fd1 = mm_file(content(2, 19))
    fd2 = mm_file.open(mm_file.path(fd1))
    p = mm_system.spawn()
    q = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd1)
    b = q.mmap(P, RW, MAP_SHARED, fd=fd2, offset=P)
    p.write(a + P, b"same inode")
    assert bytes(q.read(b, 10)) == b"same inode"
    assert mmh.pfn(p, a + P) == mmh.pfn(q, b)


def test_shared_file_mapping_across_fork(mm_system, mm_file):
    fd = mm_file(content(2, 20))
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    c = p.fork()
    c.write(a, b"kid")
    assert bytes(p.read(a, 3)) == b"kid"
    c.exit()
    p.msync(a, 2 * P)
    assert mm_file.contents(fd)[:3] == b"kid"


def test_writeback_after_one_of_two_mappings_goes(mm_system, mm_file):
    fd = mm_file(content(1, 21))
    p = mm_system.spawn()
    q = mm_system.spawn()
    a = p.mmap(P, RW, MAP_SHARED, fd=fd)
    b = q.mmap(P, RW, MAP_SHARED, fd=fd)
    p.write(a, b"p-data")
    p.munmap(a, P)
    assert bytes(q.read(b, 6)) == b"p-data", "the dirty page stays in the page cache"
    q.munmap(b, P)
    assert mm_file.contents(fd)[:6] == b"p-data"


def test_page_cache_reused_while_mapped_and_released_after_last_unmap(mm_system, mm_file, mmh):
    # hmmgpu's documented rule (hmmgpu/mm/filemap.py): once nothing maps the file the cache is
    # written back and freed, so a later mmap sees what write(2) put in the file meanwhile.
    data = content(4, 22)
    fd = mm_file(data)
    free0 = mmh.nr_free(mm_system)
    p = mm_system.spawn()
    q = mm_system.spawn()
    a = p.mmap(4 * P, RW, MAP_SHARED, fd=fd)
    p.read(a, 4 * P)
    pf = mmh.pfn(p, a)
    assert mmh.refcount(mm_system, pf) == 2 and mmh.mapcount(mm_system, pf) == 1
    b = q.mmap(4 * P, PROT_READ, MAP_SHARED, fd=fd)
    q.read(b, P)
    assert mmh.pfn(q, b) == pf, "a cached page is found again, not read into a new frame"
    assert mmh.nr_free(mm_system) == free0 - 4
    p.write(a + 3 * P, b"dirty")
    p.munmap(a, 4 * P)
    q.munmap(b, 4 * P)
    assert mmh.nr_free(mm_system) == free0
    assert mm_file.contents(fd)[3 * P:3 * P + 5] == b"dirty"
    os.pwrite(fd, b"behind", 2 * P)
    c = p.mmap(4 * P, PROT_READ, MAP_SHARED, fd=fd)
    assert bytes(p.read(c + 2 * P, 6)) == b"behind"


def test_shared_dontneed_keeps_dirty_data(mm_system, mm_file):
    fd = mm_file(content(1, 23))
    p = mm_system.spawn()
    a = p.mmap(P, RW, MAP_SHARED, fd=fd)
    p.write(a, b"dirty")
    p.madvise(a, P, MADV_DONTNEED)
    assert bytes(p.read(a, 5)) == b"dirty"
    p.msync(a, P)
    assert mm_file.contents(fd)[:5] == b"dirty"


def test_mremap_file_mapping_keeps_file_offset(mm_system, mm_file):
    data = content(4, 24)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd, offset=2 * P)
    other = p.mmap(8 * P, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)
    n = p.mremap(a, 2 * P, 2 * P, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=other + 4 * P)
    assert bytes(p.read(n, 2 * P)) == data[2 * P:]
    p.write(n + P, b"moved")
    p.msync(n, 2 * P)
    assert mm_file.contents(fd)[3 * P:3 * P + 5] == b"moved"


def test_split_file_mapping_keeps_offsets(mm_system, mm_file):
    data = content(4, 25)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, MAP_SHARED, fd=fd)
    p.munmap(a + P, P)
    p.mprotect(a + 3 * P, P, PROT_READ)
    assert bytes(p.read(a + 2 * P, 2 * P)) == data[2 * P:]
    p.write(a + 2 * P, b"split")
    p.msync(a + 2 * P, P)
    assert mm_file.contents(fd)[2 * P:2 * P + 5] == b"split"


def test_grow_file_mapping_in_place(mm_system, mm_file):
    data = content(3, 26)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(4 * P, PROT_READ, MAP_SHARED, fd=fd)
    p.munmap(a + P, 3 * P)
    assert p.mremap(a, P, 3 * P, 0) == a
    assert bytes(p.read(a, 3 * P)) == data


# ---------------------------------------------------------------------------------------------
# permissions and bad descriptors
# ---------------------------------------------------------------------------------------------

def test_closed_fd_is_ebadf(mm_system, mm_file):
    fd = mm_file(content(1))
    os.close(fd)
    p = mm_system.spawn()
    with pytest.raises(OSError) as ei:
        p.mmap(P, PROT_READ, MAP_SHARED, fd=fd)
    assert ei.value.errno == errno.EBADF
    assert list(p.mm.vmas) == []


def test_shared_writable_mapping_of_readonly_fd_is_eacces(mm_system, mm_file):
    fd = mm_file(content(1), flags=os.O_RDONLY)
    p = mm_system.spawn()
    keep = p.mmap(P, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.mmap(P, RW, MAP_SHARED, fd=fd)
    assert ei.value.errno == errno.EACCES
    assert snapshot(p) == before
    assert keep


def test_mprotect_write_on_shared_readonly_fd_is_eacces(mm_system, mm_file):
    data = content(1, 27)
    fd = mm_file(data, flags=os.O_RDONLY)
    p = mm_system.spawn()
    a = p.mmap(P, PROT_READ, MAP_SHARED, fd=fd)
    p.read(a, P)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.mprotect(a, P, RW)
    assert ei.value.errno == errno.EACCES
    assert snapshot(p) == before
    with pytest.raises(hmmgpu.SegmentationFault):
        p.write(a, b"x")
    assert mm_file.contents(fd) == data


def test_write_only_fd_is_eacces(mm_system, mm_file):
    fd = mm_file(content(1), flags=os.O_WRONLY)
    p = mm_system.spawn()
    with pytest.raises(OSError) as ei:
        p.mmap(P, PROT_READ, MAP_SHARED, fd=fd)
    assert ei.value.errno == errno.EACCES


@pytest.mark.parametrize("off, length, flags, err", [
    (1, P, MS_SYNC, errno.EINVAL),
    (0, P, MS_SYNC | MS_ASYNC, errno.EINVAL),
    (4 * P, P, MS_SYNC, errno.ENOMEM),
])
def test_msync_bad_arguments(mm_system, mm_file, off, length, flags, err):
    data = content(2, 28)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    p.write(a, b"pending")
    with pytest.raises(OSError) as ei:
        p.msync(a + off, length, flags)
    assert ei.value.errno == err


def test_msync_on_anonymous_memory_is_fine(mm_system):
    p = mm_system.spawn()
    a = p.mmap(P, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"x")
    p.msync(a, P)
    assert bytes(p.read(a, 1)) == b"x"


@pytest.mark.parametrize("flags", [MAP_SHARED, MAP_PRIVATE])
def test_map_fixed_over_the_last_mapping_of_the_same_file(mm_system, mm_file, flags):
    # the old mapping is the file's last one; replacing it must not tear down the page cache the
    # new mapping is about to use
    data = content(2, 29)
    fd = mm_file(data)
    p = mm_system.spawn()
    a = p.mmap(2 * P, PROT_READ, flags, fd=fd)
    p.read(a, 2 * P)
    b = p.mmap(2 * P, RW, flags | 0x10, fd=fd, addr=a)        # MAP_FIXED
    assert b == a
    assert bytes(p.read(a, 2 * P)) == data
    p.write(a, b"again")
    p.munmap(a, 2 * P)
    expect = b"again" + data[5:] if flags == MAP_SHARED else data
    assert mm_file.contents(fd) == expect


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_file_descriptor_leaks(mm_system, mm_file):
    fd = mm_file(content(2, 30))
    n0 = _open_fds()
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    p.write(a, b"x")
    # a failed mmap of the same file (MAP_FIXED_NOREPLACE over a mapping) takes no reference
    with pytest.raises(OSError):
        p.mmap(P, PROT_READ, MAP_SHARED | 0x100000, fd=fd, addr=a)
    p.munmap(a, 2 * P)
    assert _open_fds() == n0, "the kernel kept a file open after its last mapping went"
    # the same when the file is not mapped anywhere yet
    anon = p.mmap(P, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    with pytest.raises(OSError):
        p.mmap(P, PROT_READ, MAP_SHARED | 0x100000, fd=fd, addr=anon)
    mm_system.drop_caches()
    assert _open_fds() == n0, "a failed mmap left the file open"
    q = mm_system.spawn()
    b = q.mmap(P, PROT_READ, MAP_SHARED, fd=fd)
    q.mmap(P, PROT_READ, MAP_SHARED | 0x100000, fd=fd, addr=b + 4 * P)
    q.exit()
    mm_system.drop_caches()
    assert _open_fds() == n0, "exit left the file open"


# ---------------------------------------------------------------------------------------------
# writeback write-protects (folio_mkclean), so writes after it dirty the page again
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["msync", "writeback"])
def test_writeback_write_protects_and_notifies(mm_system, mm_file, mmh, how):
    # folio_mkclean() -> page_vma_mkclean_one(): after writeback the shared PTE is clean and
    # read-only, under an MMU_NOTIFY_PROTECTION_PAGE invalidation, so any later store (CPU or a
    # device through hmm_range_fault) takes a write fault that dirties the page again.
    from hmmgpu.mm.notifier import (MMU_NOTIFY_PROTECTION_PAGE, MmuIntervalNotifier,
                                    mmu_interval_notifier_insert, mmu_interval_set_seq)
    fd = mm_file(content(2, 31))
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    p.write(a, b"first")
    assert mmh.writable(p, a)
    events = []

    class Ops:
        def invalidate(self, mni, rng, cur_seq):
            mmu_interval_set_seq(mni, cur_seq)
            events.append((rng.event, rng.start, rng.end))
            return True

    mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, a, 2 * P, Ops())
    if how == "msync":
        p.msync(a, 2 * P)
    else:
        mm_system.writeback()
    assert mm_file.contents(fd)[:5] == b"first"
    assert not mmh.writable(p, a), "writeback left the shared PTE writable (no folio_mkclean)"
    assert any(e == MMU_NOTIFY_PROTECTION_PAGE and s <= a and t >= a + P for e, s, t in events), events
    p.write(a, b"again")
    assert mmh.writable(p, a)
    p.msync(a, 2 * P)
    assert mm_file.contents(fd)[:5] == b"again"


def test_device_write_after_msync_reaches_the_file(mm_system, mm_file):
    # the consequence through the reference driver: a dmirror write after an msync must be
    # written back by the next msync (and by munmap), not silently lost
    dmirror = pytest.importorskip("hmmgpu.drivers.dmirror")
    fd = mm_file(b"\0" * (2 * P))
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    p.write(a, b"cpu")
    p.msync(a, 2 * P)
    dev = dmirror.DMirrorDevice(mm_system, memory="private")
    m = dev.open(p)
    buf = np.zeros(2 * P, np.uint8)
    buf[:6] = np.frombuffer(b"device", np.uint8)
    m.write(a, buf)
    assert bytes(p.read(a, 6)) == b"device"
    p.msync(a, 2 * P)
    assert mm_file.contents(fd)[:6] == b"device", "the device's store was never written back"
    m.close()


def test_writeback_cleans_every_mapping_of_the_page(mm_system, mm_file, mmh):
    # folio_mkclean() walks the rmap: another process's writable PTE on the same cached page is
    # write-protected too, and its next store dirties the page again
    fd = mm_file(content(1, 32))
    p = mm_system.spawn()
    q = mm_system.spawn()
    a = p.mmap(P, RW, MAP_SHARED, fd=fd)
    b = q.mmap(P, RW, MAP_SHARED, fd=fd)
    p.write(a, b"p-was-here")
    q.write(b + 100, b"q-was-here")
    p.msync(a, P)
    assert not mmh.writable(p, a) and not mmh.writable(q, b)
    on_disk = mm_file.contents(fd)
    assert on_disk[:10] == b"p-was-here" and on_disk[100:110] == b"q-was-here"
    q.write(b + 200, b"after")
    q.munmap(b, P)
    p.munmap(a, P)
    assert mm_file.contents(fd)[200:205] == b"after"


def test_concurrent_stores_and_writeback_lose_nothing(mm_system, mm_file):
    import threading
    fd = mm_file(b"\0" * (8 * P))
    p = mm_system.spawn()
    a = p.mmap(8 * P, RW, MAP_SHARED, fd=fd)
    stop = threading.Event()
    errors = []

    def flusher():
        try:
            while not stop.is_set():
                mm_system.writeback()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    t = threading.Thread(target=flusher, daemon=True)
    t.start()
    try:
        for it in range(1, 120):
            pg = it % 8
            p.write(a + pg * P, np.full(P, it & 0xFF, np.uint8))
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive() and not errors, errors
    final = bytes(p.read(a, 8 * P))
    p.msync(a, 8 * P)
    assert mm_file.contents(fd) == final
    expect = bytearray(8 * P)
    for it in range(1, 120):
        pg = it % 8
        expect[pg * P:(pg + 1) * P] = bytes([it & 0xFF]) * P
    assert final == bytes(expect)


def test_one_store_over_shared_and_private_views_of_a_file_page_is_sequential(mm_system, mm_file):
    # A CPU store is a sequence of byte stores in address order, each faulting when it gets
    # there: when one write() first lands in a MAP_SHARED view of a file page and then in a
    # MAP_PRIVATE view of the same page, the private copy is taken after the earlier bytes
    # reached the page cache, so it contains them.
    data = content(1, 33)
    fd = mm_file(data)
    p = mm_system.spawn()
    shared = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    p.munmap(shared + P, P)
    priv = p.mmap(P, RW, MAP_PRIVATE | 0x10, fd=fd, addr=shared + P)     # MAP_FIXED right after it
    p.write(shared + P - 1, b"AB")             # 'A' into the shared view, 'B' into the private one
    got = p.read(priv, P)
    assert got[0] == ord("B")
    assert got[P - 1] == ord("A"), "the private copy was taken before the same store's earlier byte"
    assert bytes(p.read(shared + P - 1, 1)) == b"A"


def test_one_store_through_two_views_of_the_same_page_keeps_every_byte(mm_system, mm_file):
    # two adjacent MAP_SHARED views of the same file page: one store "AB" across them puts 'A'
    # at the end and 'B' at the start of the same physical page; both must be there
    fd = mm_file(content(1, 34))
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    p.munmap(a + P, P)
    b = p.mmap(P, RW, MAP_SHARED | 0x10, fd=fd, addr=a + P)          # MAP_FIXED: same page again
    p.write(b - 1, b"AB")
    page = bytes(p.read(a, P))
    assert page[0:1] == b"B" and page[P - 1:] == b"A", (page[:1], page[-1:])
    p.msync(a, P)
    assert mm_file.contents(fd)[0:1] == b"B" and mm_file.contents(fd)[P - 1:P] == b"A"
