"""Every system call checks its arguments before it changes anything (issue 10, defects 3 and 6).

Arguments are what the C ABI would carry: integers that fit in 64 bits, negatives wrapped to
their unsigned value.  A rejected call raises OSError with the kernel's errno and leaves the
address space exactly as it was: same VMAs, same data.
"""
import errno
import math

import numpy as np
import pytest

import hmmgpu
from hmmgpu import (MAP_ANONYMOUS, MAP_FIXED, MAP_POPULATE, MAP_PRIVATE, MAP_SHARED, MREMAP_DONTUNMAP,
                    MREMAP_FIXED, MREMAP_MAYMOVE, PAGE_SIZE, PROT_READ, PROT_WRITE)
from hmmgpu.constants import TASK_SIZE

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
OTHER = 0x30000000              # an unrelated mapping that no rejected call may touch


def layout(proc):
    return [(v.start, v.end, v.vm_flags) for v in proc.mm.vmas]


@pytest.fixture
def world(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, np.arange(4 * P, dtype=np.uint32).view(np.uint8)[:4 * P])
    o = p.mmap(2 * P, RW, ANON | MAP_FIXED, addr=OTHER)
    p.write(o, b"unrelated mapping".ljust(2 * P, b"."))
    return p, a


def unchanged(p, a, before):
    assert layout(p) == before
    assert (p.read(a, 4 * P) == np.arange(4 * P, dtype=np.uint32).view(np.uint8)[:4 * P]).all()
    assert bytes(p.read(OTHER, 17)) == b"unrelated mapping"


def rejected(err, fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}, got {ei.value!r}"
    return ei.value


def test_mremap_to_an_impossible_size_unmaps_nothing(world):
    """Defect 3: the destination was unmapped before the size was found impossible."""
    p, a = world
    before = layout(p)
    for size in (1 << 64, 1 << 63, TASK_SIZE + P, -P):
        rejected(errno.EINVAL, p.mremap, a, P, size, MREMAP_MAYMOVE | MREMAP_FIXED, OTHER)
        unchanged(p, a, before)


def test_mremap_with_a_negative_old_size_is_refused(world):
    """Defect 3: -P was taken as a size and pfn 1 mapped five times with mapcount 1."""
    p, a = world
    before = layout(p)
    # the kernel sees old_len = 2**64 - 4096: longer than the VMA, so EFAULT
    rejected(errno.EFAULT, p.mremap, a, -P, 6 * P, MREMAP_MAYMOVE)
    unchanged(p, a, before)
    p.munmap(a, 4 * P)


@pytest.mark.parametrize("new_addr", [-(1 << 64), 1 << 50, -P, TASK_SIZE, OTHER + 1])
def test_mremap_new_address_outside_user_space(world, new_addr):
    p, a = world
    before = layout(p)
    rejected(errno.EINVAL, p.mremap, a, P, P, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr)
    unchanged(p, a, before)


def test_arguments_that_are_not_integers(world):
    """Defect 6: floats, None and strings reached NumPy and came out as OverflowError/TypeError."""
    p, a = world
    before = layout(p)
    for bad in (math.inf, float("nan"), 4096.0, None, "4096", [4096], 1 << 64, -(1 << 63) - 1):
        rejected(errno.EINVAL, p.munmap, bad, P)
        rejected(errno.EINVAL, p.munmap, a, bad)
        rejected(errno.EINVAL, p.mprotect, a, P, bad)
        rejected(errno.EINVAL, p.madvise, a, bad, hmmgpu.MADV_DONTNEED)
        rejected(errno.EINVAL, p.mmap, bad, RW, ANON)
        rejected(errno.EINVAL, p.mremap, a, P, bad, MREMAP_MAYMOVE)
        rejected(errno.EINVAL, p.msync, a, P, bad)
        rejected(errno.EINVAL, p.read, a, bad)
        rejected(errno.EINVAL, p.pin_user_pages, a, bad)
    for bad in (None, 3.5, object(), np.array([object()])):
        rejected(errno.EINVAL, p.write, a, bad)
    unchanged(p, a, before)


def test_negative_and_huge_addresses(world):
    p, a = world
    before = layout(p)
    assert isinstance(rejected(errno.EFAULT, p.read, -4096, 1), hmmgpu.SegmentationFault)
    rejected(errno.EFAULT, p.write, (1 << 64) - 1, b"x")
    rejected(errno.EINVAL, p.munmap, -P, P)
    rejected(errno.EINVAL, p.munmap, a, -P)
    rejected(errno.ENOMEM, p.mprotect, a, -P, PROT_READ)
    rejected(errno.EINVAL, p.madvise, a, -1, hmmgpu.MADV_DONTNEED)
    rejected(errno.ENOMEM, p.msync, a, -1)
    rejected(errno.ENOMEM, p.mmap, -1, RW, ANON)
    rejected(errno.ENOMEM, p.mmap, P, RW, ANON | MAP_FIXED, None, 0, -P)
    rejected(errno.EFAULT, p.pin_user_pages, a, -1)
    unchanged(p, a, before)


def test_sizes_are_checked_against_the_machine_before_allocating(world):
    """A mapping's page table, or a load's copy, larger than RAM could hold is ENOMEM at once
    (defect 6: such calls tried to allocate the whole range and died with MemoryError)."""
    p, a = world
    before = layout(p)
    ram_pages = p.system.phys.nr_ram
    rejected(errno.ENOMEM, p.mmap, 1 << 46, RW, ANON)
    rejected(errno.ENOMEM, p.mmap, ram_pages * 512 * P, 0, ANON)
    rejected(errno.ENOMEM, p.mremap, a, 4 * P, 1 << 46, MREMAP_MAYMOVE)
    big = p.mmap(ram_pages * 2 * P, PROT_READ, ANON)            # a big read-only view is fine
    rejected(errno.ENOMEM, p.read, big, ram_pages * 2 * P)       # but not a copy of all of it
    p.munmap(big, ram_pages * 2 * P)
    unchanged(p, a, before)


def test_map_populate_ignores_fault_errors(mm_system, mm_file):
    """Defect 6: __mm_populate(ignore_errors) -- a mapping past the end of its file stands."""
    p = mm_system.spawn()
    fd = mm_file(b"x" * P)
    a = p.mmap(3 * P, PROT_READ, MAP_SHARED | MAP_POPULATE, fd)
    assert bytes(p.read(a, 1)) == b"x"
    with pytest.raises(hmmgpu.BusError):
        p.read(a + P, 1)
    p.munmap(a, 3 * P)


def test_shared_anonymous_mapping_ignores_the_offset(mm_system):
    """Defect 6: the offset made the first store SIGBUS ("page 1 is past the end of shmem")."""
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED | MAP_ANONYMOUS, None, 16 * P)
    p.write(a, b"\x07" * (2 * P))
    c = p.fork()
    assert (c.read(a, 2 * P) == 7).all()
    c.exit()


def test_dontunmap_checks_the_new_address(world):
    p, a = world
    before = layout(p)
    rejected(errno.EINVAL, p.mremap, a, P, P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, 1 << 50)
    rejected(errno.EINVAL, p.mremap, a, P, P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, a + 1)
    unchanged(p, a, before)
