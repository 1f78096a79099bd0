"""The argument checks every entry point makes before it changes anything.

What the prologue of a Linux system call or ioctl does: take each argument as the unsigned
long the C ABI passes (SYSCALL_DEFINE), then offset_in_page(), PAGE_ALIGN() with its wrap to
0, the overflow and TASK_SIZE checks of access_ok() and mm/mmap.c, and the size checks that
come before an allocation (dmirror_bounce_init's vmalloc).  The process handle
(mm/process.py), the mm system calls (mm/mm.py), the dmirror ioctls and the kernel-level HMM
API all use these few functions, so each entry point states its checks in a line or two and
every rejection is an OSError with the kernel's errno and a message naming the range.

A Python argument stands for what the C argument would hold: an integer (``int`` or a NumPy
integer) that fits in 64 bits, a negative one wrapped to its unsigned value as a C caller's
cast would; anything else (a float, None, a string, a value past 2**64) is EINVAL, because no
register could carry it.
"""
import errno

import numpy as np

from ..constants import PAGE_MASK, PAGE_SIZE, TASK_SIZE
from ..errors import oserror

ULONG_MAX = (1 << 64) - 1
PTES_PER_PAGE = PAGE_SIZE // 8       # 8-byte page-table entries per page of RAM


def ulong(value, what, start=None):
    """``value`` as the unsigned long a C caller would pass (negatives wrapped), or EINVAL."""
    if not isinstance(value, (int, np.integer)):
        raise oserror(errno.EINVAL, f"{what} must be an integer, not {type(value).__name__} "
                      f"{_short(value)}", start)
    v = int(value)
    if not -(1 << 63) <= v <= ULONG_MAX:
        raise oserror(errno.EINVAL, f"{what} {v:#x} does not fit in 64 bits", start)
    return v & ULONG_MAX


def _short(value):
    s = repr(value)
    return s if len(s) <= 40 else s[:37] + "..."


def page_align(n):
    """PAGE_ALIGN() of an unsigned long: wraps to 0 past ULONG_MAX, as in C."""
    return (n + PAGE_SIZE - 1) & PAGE_MASK & ULONG_MAX


def offset_in_page(addr):
    return addr & (PAGE_SIZE - 1)


def check_aligned(addr, what, err=errno.EINVAL):
    if offset_in_page(addr):
        raise oserror(err, f"{what} 0x{addr:x} is not page aligned", addr)


def check_flags(flags, known, what, start=None, end=None):
    """Every bit of ``flags`` must be one of ``known``."""
    if flags & ~known:
        raise oserror(errno.EINVAL, f"unknown {what} bits 0x{flags & ~known:x}", start, end)


def check_user_range(start, length, what, err=errno.EINVAL):
    """[start, start + length) must lie below TASK_SIZE (no wrap past 2**64 either); returns end."""
    if length > TASK_SIZE or start > TASK_SIZE - length:
        raise oserror(err, f"{what}: range of {length:#x} bytes leaves the user address space "
                      f"(TASK_SIZE 0x{TASK_SIZE:x})", start, min(start + length, 1 << 64))
    return start + length


def check_no_wrap(start, length, what, err=errno.EINVAL):
    """start + length must not pass 2**64 (the kernel's ``end < start`` test); returns end."""
    end = start + length
    if end > ULONG_MAX + 1:
        raise oserror(err, f"{what}: range of {length:#x} bytes wraps past 2**64", start)
    return end


def check_buffer(nbytes, phys, what, start=None, end=None):
    """A buffer the kernel fills for the caller (a copy, a bounce buffer) must fit in the
    machine's RAM, as vmalloc() / the caller's own pages would have to: ENOMEM otherwise."""
    ram = phys.nr_ram * PAGE_SIZE
    if nbytes > ram:
        raise oserror(errno.ENOMEM, f"{what}: a buffer of {nbytes:#x} bytes is larger than the "
                      f"machine's RAM ({ram:#x} bytes)", start, end)


def check_map_budget(npages_after, phys, start, end):
    """The address space may not map more pages than RAM could hold page tables for.

    The emulator keeps a PTE per page of every mapping (8 bytes), where Linux allocates page
    tables as pages are touched; this bounds what an mmap or mremap may cost the host."""
    limit = phys.nr_ram * PTES_PER_PAGE
    if npages_after > limit:
        raise oserror(errno.ENOMEM, f"the address space would map {npages_after} pages, more than "
                      f"RAM can hold page tables for ({limit} pages)", start, end)


def pfn_array(a, npages, what, start=None, end=None):
    """A uint64 NumPy array of at least ``npages`` writable entries (the contract's pfn arrays)."""
    if not isinstance(a, np.ndarray) or a.dtype != np.uint64 or a.ndim != 1:
        kind = f"{a.dtype} array" if isinstance(a, np.ndarray) else type(a).__name__
        raise oserror(errno.EINVAL, f"{what} must be a 1-D uint64 NumPy array, not a {kind}", start, end)
    if a.size < npages:
        raise oserror(errno.EINVAL, f"{what} holds {a.size} entries, {npages} needed", start, end)
    if not a.flags.writeable:
        raise oserror(errno.EINVAL, f"{what} is read-only", start, end)
    return a


def raw_bytes(data, start=None):
    """The bytes a store writes: a bytes-like object, or a NumPy array of plain numbers (its raw
    bytes, C order), as one flat uint8 array; EINVAL for anything else."""
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise oserror(errno.EINVAL, f"an array of {data.dtype} holds no raw bytes to store", start)
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    except (TypeError, ValueError):
        raise oserror(errno.EINVAL, f"cannot store a {type(data).__name__}: it is not bytes-like",
                      start) from None
