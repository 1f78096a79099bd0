"""The emulated host kernel: mmap placement, munmap, mprotect, mremap, madvise, CPU faults.

Every expectation is the behaviour of Linux x86-64 (mm/mmap.c, mm/mprotect.c, mm/mremap.c,
mm/madvise.c, mm/memory.c).  Bad-input tests check the errno *and* that the address space
did not change.
"""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu import (
    MADV_DONTNEED,
    MADV_FREE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from invariants import check_system

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
MAP_FIXED_NOREPLACE = 0x100000


def layout(proc):
    """The address space as a comparable tuple: VMA bounds."""
    return tuple((v.start, v.end) for v in proc.mm.vmas)


def snapshot(proc):
    """Bounds, flags and PTEs of every VMA: a failed call must leave all of it unchanged."""
    out = []
    for v in proc.mm.vmas:
        out.append((v.start, v.end, getattr(v, "vm_flags", None), np.array(v.pte, copy=True).tobytes()))
    return out


def fill(proc, addr, npages, seed):
    data = np.random.default_rng(seed).integers(1, 256, size=npages * P, dtype=np.uint8)
    proc.write(addr, data)
    return data


# ---------------------------------------------------------------------------------------------
# constants and errors of the public contract
# ---------------------------------------------------------------------------------------------

def test_constants_are_linux_x86_64():
    assert (hmmgpu.PAGE_SIZE, hmmgpu.PMD_SIZE) == (4096, 2 << 20)
    assert (hmmgpu.PROT_NONE, hmmgpu.PROT_READ, hmmgpu.PROT_WRITE) == (0, 1, 2)
    assert (hmmgpu.MAP_SHARED, hmmgpu.MAP_PRIVATE, hmmgpu.MAP_FIXED, hmmgpu.MAP_ANONYMOUS) == (1, 2, 0x10, 0x20)
    assert hmmgpu.MAP_HUGETLB == 0x40000
    assert (hmmgpu.MADV_DONTNEED, hmmgpu.MADV_FREE, hmmgpu.MADV_HUGEPAGE, hmmgpu.MADV_NOHUGEPAGE,
            hmmgpu.MADV_COLLAPSE) == (4, 8, 14, 15, 25)
    assert (hmmgpu.MREMAP_MAYMOVE, hmmgpu.MREMAP_FIXED, hmmgpu.MREMAP_DONTUNMAP) == (1, 2, 4)
    assert hmmgpu.MS_SYNC == 4


def test_error_classes():
    assert issubclass(hmmgpu.SegmentationFault, OSError)
    assert issubclass(hmmgpu.ProcessKilled, OSError)
    assert hmmgpu.SegmentationFault(0x1000, "x").errno == errno.EFAULT
    assert hmmgpu.ProcessKilled(1, "x").errno == errno.ESRCH


def test_system_backend_name(mm_system):
    import os
    want = os.environ.get("HMMGPU_BACKEND", "numpy")
    assert mm_system.backend_name in (("numpy", "cupy") if want == "auto" else (want,))


# ---------------------------------------------------------------------------------------------
# mmap
# ---------------------------------------------------------------------------------------------

def test_mmap_returns_aligned_disjoint_ranges(mm_system):
    p = mm_system.spawn()
    addrs = [p.mmap(n * P, RW, ANON) for n in (1, 3, 2, 7)]
    for a in addrs:
        assert a % P == 0 and a > 0
    spans = sorted((a, a + n * P) for a, n in zip(addrs, (1, 3, 2, 7)))
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 <= s1, f"mmap handed out overlapping ranges {spans}"
    # every byte of every mapping is readable zero memory
    for a, n in zip(addrs, (1, 3, 2, 7)):
        assert not p.read(a, n * P).any()


def test_mmap_rounds_length_up_to_page(mm_system):
    p = mm_system.spawn()
    a = p.mmap(100, RW, ANON)
    p.write(a + P - 1, b"\x07")          # the last byte of the rounded-up page is mapped
    assert p.read(a + P - 1, 1)[0] == 7
    (v,) = [v for v in p.mm.vmas if v.start == a]
    assert v.end - v.start == P


def test_mmap_uses_free_hint_address(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.munmap(a, 4 * P)
    b = p.mmap(2 * P, RW, ANON, addr=a + P)   # hint, no MAP_FIXED: Linux takes it when free
    assert b == a + P


def test_mmap_hint_on_used_range_goes_elsewhere(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    data = fill(p, a, 4, 1)
    b = p.mmap(2 * P, RW, ANON, addr=a + P)    # occupied: the hint is only a hint
    assert b % P == 0 and (b + 2 * P <= a or b >= a + 4 * P)
    assert np.array_equal(p.read(a, 4 * P), data)


def test_map_fixed_replaces_existing_mapping(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    data = fill(p, a, 4, 2)
    free0 = mmh.nr_free(mm_system)
    b = p.mmap(2 * P, PROT_READ, ANON | MAP_FIXED, addr=a + P)
    assert b == a + P
    got = p.read(a, 4 * P)
    assert np.array_equal(got[:P], data[:P])
    assert not got[P:3 * P].any(), "MAP_FIXED must discard the old pages"
    assert np.array_equal(got[3 * P:], data[3 * P:])
    # the replaced pages went back to the allocator
    assert mmh.nr_free(mm_system) == free0 + 2
    # and the new piece has the new protection
    with pytest.raises(hmmgpu.SegmentationFault):
        p.write(a + P, b"x")
    assert layout(p) == ((a, a + P), (a + P, a + 3 * P), (a + 3 * P, a + 4 * P))


def test_map_fixed_noreplace_refuses_overlap(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    data = fill(p, a, 4, 3)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.mmap(P, RW, ANON | MAP_FIXED_NOREPLACE, addr=a + P)
    assert ei.value.errno == errno.EEXIST
    assert snapshot(p) == before
    assert np.array_equal(p.read(a, 4 * P), data)


@pytest.mark.parametrize("kwargs, err", [
    (dict(length=0, prot=RW, flags=ANON), errno.EINVAL),
    (dict(length=P, prot=RW, flags=MAP_ANONYMOUS), errno.EINVAL),                 # neither private nor shared
    (dict(length=P, prot=RW, flags=ANON | MAP_FIXED, addr=0x7000_0000_0123), errno.EINVAL),  # unaligned fixed
    (dict(length=1 << 48, prot=RW, flags=ANON), errno.ENOMEM),                     # larger than TASK_SIZE
])
def test_mmap_bad_arguments(mm_system, kwargs, err):
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    before = snapshot(p)
    length = kwargs.pop("length")
    prot = kwargs.pop("prot")
    flags = kwargs.pop("flags")
    with pytest.raises(OSError) as ei:
        p.mmap(length, prot, flags, **kwargs)
    assert ei.value.errno == err
    assert snapshot(p) == before
    assert a in [v.start for v in p.mm.vmas]


def test_error_message_names_the_range(mm_system):
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    with pytest.raises(OSError) as ei:
        p.mprotect(a + 5 * P, P, PROT_READ)
    assert ei.value.errno == errno.ENOMEM
    assert f"{a + 5 * P:x}" in str(ei.value).lower(), str(ei.value)


# ---------------------------------------------------------------------------------------------
# munmap
# ---------------------------------------------------------------------------------------------

def test_munmap_middle_splits_vma(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(5 * P, RW, ANON)
    data = fill(p, a, 5, 4)
    free0 = mmh.nr_free(mm_system)
    p.munmap(a + P, 2 * P)
    assert layout(p) == ((a, a + P), (a + 3 * P, a + 5 * P))
    assert np.array_equal(p.read(a, P), data[:P])
    assert np.array_equal(p.read(a + 3 * P, 2 * P), data[3 * P:])
    for hole in (a + P, a + 2 * P, a + 3 * P - 1):
        with pytest.raises(hmmgpu.SegmentationFault) as ei:
            p.read(hole, 1)
        assert ei.value.errno == errno.EFAULT
        assert ei.value.address == hole
    assert mmh.nr_free(mm_system) == free0 + 2
    # the split pieces keep their page tables consistent with their size
    for v in p.mm.vmas:
        assert len(v.pte) == (v.end - v.start) // P


def test_munmap_across_several_vmas_and_holes(mm_system):
    p = mm_system.spawn()
    a = p.mmap(8 * P, RW, ANON)
    fill(p, a, 8, 5)
    p.mprotect(a + 2 * P, 2 * P, PROT_READ)       # three VMAs
    p.munmap(a + 5 * P, P)                        # and a hole
    p.munmap(a + P, 6 * P)                        # covering parts of all of them and the hole
    assert layout(p) == ((a, a + P), (a + 7 * P, a + 8 * P))


def test_munmap_unmapped_range_is_not_an_error(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.munmap(a, 2 * P)
    p.munmap(a, 2 * P)         # Linux: munmap of nothing succeeds
    assert layout(p) == ()


@pytest.mark.parametrize("off, length", [(1, P), (0, 0), (P // 2, P)])
def test_munmap_bad_arguments(mm_system, off, length):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    data = fill(p, a, 2, 6)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.munmap(a + off, length)
    assert ei.value.errno == errno.EINVAL
    assert snapshot(p) == before
    assert np.array_equal(p.read(a, 2 * P), data)


def test_munmap_returns_frames(mm_system, mmh):
    p = mm_system.spawn()
    free0 = mmh.nr_free(mm_system)
    a = p.mmap(16 * P, RW, ANON)
    fill(p, a, 16, 7)
    assert mmh.nr_free(mm_system) == free0 - 16
    p.munmap(a, 16 * P)
    assert mmh.nr_free(mm_system) == free0


# ---------------------------------------------------------------------------------------------
# mprotect and access faults
# ---------------------------------------------------------------------------------------------

def test_mprotect_readonly_then_write_segfaults_and_data_unchanged(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(3 * P, RW, ANON)
    data = fill(p, a, 3, 8)
    p.mprotect(a + P, P, PROT_READ)
    assert layout(p) == ((a, a + P), (a + P, a + 2 * P), (a + 2 * P, a + 3 * P))
    assert not mmh.writable(p, a + P), "mprotect(PROT_READ) must clear the PTE write bit"
    with pytest.raises(hmmgpu.SegmentationFault) as ei:
        p.write(a + P + 10, b"zz")
    assert ei.value.errno == errno.EFAULT
    assert np.array_equal(p.read(a, 3 * P), data)
    # the neighbours stay writable
    p.write(a, b"ok")
    p.write(a + 2 * P, b"ok")
    # and write permission comes back
    p.mprotect(a + P, P, RW)
    p.write(a + P, b"back")
    assert bytes(p.read(a + P, 4)) == b"back"


def test_mprotect_none_blocks_reads(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    data = fill(p, a, 2, 9)
    p.mprotect(a, P, PROT_NONE)
    with pytest.raises(hmmgpu.SegmentationFault):
        p.read(a, 1)
    with pytest.raises(hmmgpu.SegmentationFault):
        p.read(a + P - 1, 2)        # straddles into the readable page: still faults
    assert np.array_equal(p.read(a + P, P), data[P:])
    p.mprotect(a, P, PROT_READ)
    assert np.array_equal(p.read(a, P), data[:P]), "PROT_NONE must not lose the data"


def test_mprotect_merges_back_adjacent_vmas(mm_system):
    p = mm_system.spawn()
    a = p.mmap(3 * P, RW, ANON)
    p.mprotect(a + P, P, PROT_READ)
    assert len(layout(p)) == 3
    p.mprotect(a + P, P, RW)
    assert layout(p) == ((a, a + 3 * P),), "Linux merges VMAs with equal flags (vma_merge)"


def test_mprotect_unmapped_is_enomem_and_changes_nothing(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    fill(p, a, 2, 10)
    p.munmap(a + P, P)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.mprotect(a + P, P, PROT_READ)
    assert ei.value.errno == errno.ENOMEM
    assert snapshot(p) == before


def test_mprotect_unaligned_is_einval(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.mprotect(a + 1, P, PROT_READ)
    assert ei.value.errno == errno.EINVAL
    assert snapshot(p) == before


def test_mprotect_zero_length_is_a_noop(mm_system):
    # mm/mprotect.c: "if (!len) return 0;"
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    before = snapshot(p)
    p.mprotect(a, 0, PROT_NONE)
    assert snapshot(p) == before


def test_access_outside_any_mapping_segfaults(mm_system):
    p = mm_system.spawn()
    with pytest.raises(hmmgpu.SegmentationFault):
        p.read(0x1000_0000, 8)
    with pytest.raises(hmmgpu.SegmentationFault):
        p.write(0x1000_0000, b"x")


def test_write_straddling_into_unmapped_page_segfaults_at_that_page(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.munmap(a + P, P)
    with pytest.raises(hmmgpu.SegmentationFault) as ei:
        p.write(a + P - 4, b"12345678")
    assert ei.value.address == a + P


# ---------------------------------------------------------------------------------------------
# demand paging and the zero page
# ---------------------------------------------------------------------------------------------

def test_read_of_untouched_anon_maps_shared_zero_page(mm_system, mmh):
    p = mm_system.spawn()
    free0 = mmh.nr_free(mm_system)
    a = p.mmap(64 * P, RW, ANON)
    assert not p.read(a, 64 * P).any()
    assert mmh.nr_free(mm_system) == free0, "reading untouched anon memory must not allocate"
    pfns = {mmh.pfn(p, a + i * P) for i in range(64)}
    assert len(pfns) == 1, f"all read-faulted pages must map the one zero page, got {pfns}"
    zpfn = pfns.pop()
    assert zpfn is not None
    for i in range(64):
        assert not mmh.writable(p, a + i * P), "the zero page must be mapped read-only"
    assert p.rss["anon"] == 0, "the zero page is not counted in rss"
    # a write replaces just that page's zero-page mapping
    p.write(a + 5 * P + 3, b"\x01")
    assert mmh.pfn(p, a + 5 * P) != zpfn
    assert mmh.writable(p, a + 5 * P)
    assert mmh.pfn(p, a + 6 * P) == zpfn
    assert mmh.nr_free(mm_system) == free0 - 1
    assert p.rss["anon"] == 1
    # nobody else sees the write through the zero page
    q = mm_system.spawn()
    b = q.mmap(P, RW, ANON)
    assert not q.read(b, P).any()
    assert not p.read(a + 6 * P, P).any()


def test_write_fault_allocates_zeroed_page(mm_system, mmh):
    # pages come back from munmap dirty; a new anon page must never leak old contents
    p = mm_system.spawn()
    a = p.mmap(32 * P, RW, ANON)
    p.write(a, np.full(32 * P, 0xAB, np.uint8))
    p.munmap(a, 32 * P)
    b = p.mmap(32 * P, RW, ANON)
    for i in range(32):
        p.write(b + i * P, b"\x01")     # one byte per page: the rest must be zero
    got = p.read(b, 32 * P).reshape(32, P)
    assert np.all(got[:, 0] == 1) and not got[:, 1:].any()
    q = mm_system.spawn()
    c = q.mmap(32 * P, RW, ANON)
    q.write(c, b"\x00" * (32 * P))
    assert not q.read(c, 32 * P).any()


def test_read_write_roundtrip_unaligned_spans(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    blob = np.arange(2 * P + 100, dtype=np.int64).astype(np.uint8)
    p.write(a + P - 50, blob)
    assert np.array_equal(p.read(a + P - 50, len(blob)), blob)
    full = p.read(a, 4 * P)
    assert not full[:P - 50].any()
    assert not full[P - 50 + len(blob):].any()
    r = p.read(a, 10)
    assert isinstance(r, np.ndarray) and r.dtype == np.uint8 and r.shape == (10,)
    # accepts bytes, bytearray, memoryview, ndarray of other dtypes (raw bytes)
    p.write(a, bytearray(b"ab"))
    p.write(a + 2, memoryview(b"cd"))
    p.write(a + 4, np.array([0x64636261], dtype="<u4"))
    assert bytes(p.read(a, 8)) == b"abcdabcd"


def test_read_returns_a_copy(mm_system):
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"hello")
    r = p.read(a, 5)
    r[:] = 0
    assert bytes(p.read(a, 5)) == b"hello"
    whole = p.read(a, P)                   # the page-aligned fast path too
    whole[:] = 0
    assert bytes(p.read(a, 5)) == b"hello"
    src = np.full(P, 9, np.uint8)
    p.write(a, src)                        # and a store does not keep the caller's buffer
    src[:] = 1
    assert np.all(p.read(a, P) == 9)


# ---------------------------------------------------------------------------------------------
# mremap
# ---------------------------------------------------------------------------------------------

def test_mremap_grow_in_place(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    data = fill(p, a, 2, 11)
    p.munmap(a + 2 * P, 2 * P)
    n = p.mremap(a, 2 * P, 4 * P, 0)
    assert n == a
    assert layout(p) == ((a, a + 4 * P),)
    got = p.read(a, 4 * P)
    assert np.array_equal(got[:2 * P], data) and not got[2 * P:].any()


def test_mremap_grow_blocked_without_maymove_is_enomem(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    b = p.mmap(P, RW, ANON | MAP_FIXED, addr=a + 2 * P)
    data = fill(p, a, 2, 12)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.mremap(a, 2 * P, 4 * P, 0)
    assert ei.value.errno == errno.ENOMEM
    assert snapshot(p) == before
    assert np.array_equal(p.read(a, 2 * P), data)
    assert b == a + 2 * P


def test_mremap_grow_moves_with_maymove(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.mmap(P, RW, ANON | MAP_FIXED, addr=a + 2 * P)
    data = fill(p, a, 2, 13)
    pfns = [mmh.pfn(p, a), mmh.pfn(p, a + P)]
    free0 = mmh.nr_free(mm_system)
    n = p.mremap(a, 2 * P, 5 * P, MREMAP_MAYMOVE)
    assert n != a
    got = p.read(n, 5 * P)
    assert np.array_equal(got[:2 * P], data) and not got[2 * P:].any()
    with pytest.raises(hmmgpu.SegmentationFault):
        p.read(a, 1)
    # the pages moved, they were not copied
    assert [mmh.pfn(p, n), mmh.pfn(p, n + P)] == pfns
    assert mmh.nr_free(mm_system) == free0


def test_mremap_shrink_unmaps_tail(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    data = fill(p, a, 4, 14)
    free0 = mmh.nr_free(mm_system)
    assert p.mremap(a, 4 * P, P, 0) == a
    assert layout(p) == ((a, a + P),)
    assert np.array_equal(p.read(a, P), data[:P])
    with pytest.raises(hmmgpu.SegmentationFault):
        p.read(a + P, 1)
    assert mmh.nr_free(mm_system) == free0 + 3


def test_mremap_fixed_moves_over_existing(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    b = p.mmap(4 * P, RW, ANON)
    da = fill(p, a, 2, 15)
    db = fill(p, b, 4, 16)
    n = p.mremap(a, 2 * P, 2 * P, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=b + P)
    assert n == b + P
    assert np.array_equal(p.read(b, P), db[:P])
    assert np.array_equal(p.read(b + P, 2 * P), da)
    assert np.array_equal(p.read(b + 3 * P, P), db[3 * P:])
    with pytest.raises(hmmgpu.SegmentationFault):
        p.read(a, 1)


def test_mremap_fixed_without_maymove_is_einval(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    b = p.mmap(2 * P, RW, ANON)
    fill(p, a, 2, 17)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.mremap(a, 2 * P, 2 * P, MREMAP_FIXED, new_addr=b)
    assert ei.value.errno == errno.EINVAL
    assert snapshot(p) == before


def test_mremap_dontunmap_leaves_empty_source(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(3 * P, RW, ANON)
    data = fill(p, a, 3, 18)
    free0 = mmh.nr_free(mm_system)
    n = p.mremap(a, 3 * P, 3 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert n != a
    assert np.array_equal(p.read(n, 3 * P), data)
    # the old range stays mapped but its page tables moved: private anon reads zero
    assert any(v.start <= a < v.end for v in p.mm.vmas)
    assert not p.read(a, 3 * P).any()
    assert mmh.nr_free(mm_system) == free0
    p.write(a, b"new")
    assert bytes(p.read(n, 3)) == bytes(data[:3])


def test_mremap_dontunmap_on_shared_anon(mm_system):
    # Linux >= 5.13 ("mm: extend MREMAP_DONTUNMAP to non-anonymous mappings"): only VM_DONTEXPAND /
    # VM_PFNMAP mappings refuse it.  The old range stays mapped and refaults the same shmem pages.
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    data = fill(p, a, 2, 31)
    n = p.mremap(a, 2 * P, 2 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert n != a
    assert np.array_equal(p.read(n, 2 * P), data)
    assert np.array_equal(p.read(a, 2 * P), data)
    p.write(a, b"both")
    assert bytes(p.read(n, 4)) == b"both"


@pytest.mark.parametrize("case", ["dontunmap_resize", "dontunmap_no_maymove"])
def test_mremap_dontunmap_bad_arguments(mm_system, case):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    fill(p, a, 2, 19)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        if case == "dontunmap_resize":
            p.mremap(a, 2 * P, 3 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
        else:
            p.mremap(a, 2 * P, 2 * P, MREMAP_DONTUNMAP)
    assert ei.value.errno == errno.EINVAL
    assert snapshot(p) == before


def test_mremap_unmapped_source_is_efault(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.munmap(a, 2 * P)
    with pytest.raises(OSError) as ei:
        p.mremap(a, P, 2 * P, MREMAP_MAYMOVE)
    assert ei.value.errno == errno.EFAULT
    assert layout(p) == ()


def test_mremap_source_spanning_two_vmas_is_efault(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.mprotect(a + P, P, PROT_READ)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.mremap(a, 2 * P, 4 * P, MREMAP_MAYMOVE)
    assert ei.value.errno == errno.EFAULT
    assert snapshot(p) == before


@pytest.mark.parametrize("old_off, new_size", [(1, 2 * P), (0, 0)])
def test_mremap_einval(mm_system, old_off, new_size):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.mremap(a + old_off, P, new_size, MREMAP_MAYMOVE)
    assert ei.value.errno == errno.EINVAL
    assert snapshot(p) == before


# ---------------------------------------------------------------------------------------------
# madvise
# ---------------------------------------------------------------------------------------------

def test_madv_dontneed_zeroes_private_anon_and_frees(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    data = fill(p, a, 4, 20)
    free0 = mmh.nr_free(mm_system)
    p.madvise(a + P, 2 * P, MADV_DONTNEED)
    got = p.read(a, 4 * P)
    assert np.array_equal(got[:P], data[:P])
    assert not got[P:3 * P].any()
    assert np.array_equal(got[3 * P:], data[3 * P:])
    assert mmh.nr_free(mm_system) == free0 + 2
    assert p.rss["anon"] == 2
    assert layout(p) == ((a, a + 4 * P),), "MADV_DONTNEED keeps the mapping"


def test_madv_dontneed_on_shared_anon_keeps_data(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    data = fill(p, a, 2, 21)
    p.madvise(a, 2 * P, MADV_DONTNEED)
    assert np.array_equal(p.read(a, 2 * P), data), "shmem pages live in the page cache"


def test_madv_free_on_file_mapping_is_einval(mm_system, mm_file):
    fd = mm_file(b"x" * P)
    p = mm_system.spawn()
    a = p.mmap(P, RW, MAP_SHARED, fd=fd)
    with pytest.raises(OSError) as ei:
        p.madvise(a, P, MADV_FREE)
    assert ei.value.errno == errno.EINVAL


def test_madv_free_private_anon_then_write_keeps_new_data(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    fill(p, a, 2, 22)
    p.madvise(a, 2 * P, MADV_FREE)
    got = p.read(a, 2 * P)       # either the old data or zeros: both are Linux
    p.write(a, b"after")
    assert bytes(p.read(a, 5)) == b"after"
    del got


@pytest.mark.parametrize("off, length, advice, err", [
    (1, P, MADV_DONTNEED, errno.EINVAL),
    (0, P, 12345, errno.EINVAL),
    (8 * P, P, MADV_DONTNEED, errno.ENOMEM),
])
def test_madvise_bad_arguments(mm_system, off, length, advice, err):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    data = fill(p, a, 2, 23)
    p.munmap(a + 2 * P, 8 * P)   # make sure nothing is mapped after it
    before = snapshot(p)
    with pytest.raises(OSError) as ei:
        p.madvise(a + off, length, advice)
    assert ei.value.errno == err
    assert snapshot(p) == before
    assert np.array_equal(p.read(a, 2 * P), data)


# ---------------------------------------------------------------------------------------------
# process lifetime
# ---------------------------------------------------------------------------------------------

def test_exit_frees_everything_and_process_is_gone(mm_system, mmh):
    free0 = mmh.nr_free(mm_system)
    p = mm_system.spawn()
    a = p.mmap(8 * P, RW, ANON)
    fill(p, a, 8, 24)
    b = p.mmap(3 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    fill(p, b, 3, 25)
    assert p.alive
    p.exit(0)
    assert not p.alive
    # anonymous shmem dies with its last mapping: no cache drop needed
    assert mmh.nr_free(mm_system) == free0
    for call in (lambda: p.read(a, 1), lambda: p.write(a, b"x"), lambda: p.mmap(P, RW, ANON),
                 lambda: p.munmap(a, P), lambda: p.fork(), lambda: p.mprotect(a, P, PROT_READ)):
        with pytest.raises(hmmgpu.ProcessKilled) as ei:
            call()
        assert ei.value.errno == errno.ESRCH


def test_processes_have_separate_address_spaces(mm_system):
    p = mm_system.spawn()
    q = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"mine")
    b = q.mmap(P, RW, ANON, addr=a)
    assert b == a            # same virtual address, different mm
    assert not q.read(b, P).any()
    q.write(b, b"your")
    assert bytes(p.read(a, 4)) == b"mine"
    with pytest.raises(hmmgpu.SegmentationFault):
        mm_system.spawn().read(a, 1)


def test_map_populate_faults_writable_private_memory_for_write(mm_system, mmh):
    # populate_vma_page_range(): writable private mappings are touched with a write fault
    # (breaking COW up front), so no page is left on the zero page
    p = mm_system.spawn()
    a = p.mmap(8 * P, RW, ANON | hmmgpu.MAP_POPULATE)
    assert p.rss["anon"] == 8
    assert all(mmh.writable(p, a + i * P) for i in range(8))
    b = p.mmap(4 * P, PROT_READ, ANON | hmmgpu.MAP_POPULATE)
    assert all(mmh.pfn(p, b + i * P) is not None for i in range(4))
    assert p.rss["anon"] == 8


def test_shared_anon_grown_by_mremap_is_sigbus_past_the_object(mm_system):
    # shmem_fault(): the shmem object of a MAP_SHARED|MAP_ANONYMOUS mapping has the size given to
    # mmap; growing the mapping does not grow the object, so the new part raises SIGBUS
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(a, b"shm")
    n = p.mremap(a, 2 * P, 4 * P, MREMAP_MAYMOVE)
    assert bytes(p.read(n, 3)) == b"shm"
    p.read(n + P, 1)
    with pytest.raises(OSError) as ei:
        p.read(n + 2 * P, 1)
    assert ei.value.errno == errno.EFAULT
    assert not isinstance(ei.value, hmmgpu.SegmentationFault)


def test_freed_frames_come_back_as_ascending_runs(mm_system, mmh):
    """A range freed and faulted in again gets consecutive ascending frames, so demand-zero
    fills and device mappings of a fresh range are one run each, not one piece per page."""
    p = mm_system.spawn()
    n = 256
    for _ in range(3):
        a = p.mmap(n * PAGE_SIZE, RW, ANON)
        p.write(a, np.full(n * PAGE_SIZE, 1, np.uint8))
        pfns = np.array([mmh.pfn(p, a + i * PAGE_SIZE) for i in range(n)])
        assert (np.diff(pfns) == 1).all(), pfns[:8]
        p.munmap(a, n * PAGE_SIZE)


@pytest.mark.parametrize("mib", [48, 64, 96])
def test_the_machine_checker_holds_on_a_fresh_machine_with_a_hugetlb_pool(mib):
    """From 64 MiB up a System reserves a small hugetlbfs pool, whose free huge pages are held
    outside the page allocator; the checker counted them as lost frames."""
    system = hmmgpu.System(backend="numpy", ram_bytes=mib << 20)
    system.spawn()
    check_system(system)
