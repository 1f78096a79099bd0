"""get_user_pages / pin_user_pages (mm/gup.c): faulting in, breaking COW, pins holding frames."""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def pin_pfns(pin):
    """The pfns a pin holds (attribute name per the implementation)."""
    for name in ("pfns", "pages"):
        v = getattr(pin, name, None)
        if v is not None:
            return [int(x) for x in np.asarray(v).ravel()]
    raise AssertionError(f"pin object {pin!r} exposes no pfns/pages")


def test_pin_faults_in_and_counts(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    pin = p.pin_user_pages(a, 4, write=True)
    pfns = pin_pfns(pin)
    assert len(pfns) == 4 and len(set(pfns)) == 4
    assert pfns == [mmh.pfn(p, a + i * P) for i in range(4)], "write pin must fault pages in"
    for f in pfns:
        assert mmh.pincount(mm_system, f) == 1
        assert f != 0, "a write pin must never hold the zero page"
        assert mmh.refcount(mm_system, f) >= 2     # the mapping's reference plus the pin's
    pin.unpin()
    for f in pfns:
        assert mmh.pincount(mm_system, f) == 0
        assert mmh.refcount(mm_system, f) == 1


def test_pin_holds_frames_after_munmap(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"pinned")
    p.write(a + P, b"page 1")
    free0 = mmh.nr_free(mm_system)
    pin = p.pin_user_pages(a, 2, write=True)
    pfns = pin_pfns(pin)
    p.munmap(a, 2 * P)
    assert mmh.nr_free(mm_system) == free0, "pinned pages must not be freed on munmap"
    assert bytes(mm_system.phys.read(np.array(pfns[:1]))[0][:6]) == b"pinned"
    pin.unpin()
    assert mmh.nr_free(mm_system) == free0 + 2


def test_pin_survives_exit_until_unpin(mm_system, mmh):
    free0 = mmh.nr_free(mm_system)
    p = mm_system.spawn()
    a = p.mmap(3 * P, RW, ANON)
    p.write(a, b"x" * (3 * P))
    pin = p.pin_user_pages(a, 3)
    p.exit()
    assert mmh.nr_free(mm_system) == free0 - 3
    pin.unpin()
    assert mmh.nr_free(mm_system) == free0


def test_write_pin_breaks_cow_in_parent(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"original")
    c = p.fork()
    shared = mmh.pfn(c, a)
    pin = p.pin_user_pages(a, 1, write=True)
    (pf,) = pin_pfns(pin)
    assert pf != shared, "a write pin on a COW-shared page must copy it first"
    assert mmh.pfn(p, a) == pf and mmh.writable(p, a)
    assert mmh.pfn(c, a) == shared
    # the pinned page is the parent's page: parent writes land in it, the child's do not
    p.write(a, b"PARENT")
    c.write(a, b"child!")
    assert bytes(mm_system.phys.read(np.array([pf]))[0][:8]) == b"PARENTal"
    assert bytes(c.read(a, 8)) == b"child!al"
    pin.unpin()


def test_readonly_pin_stays_coherent_with_later_parent_write(mm_system, mmh):
    # The R/O pin coherency rule of Linux 5.19+ (gup_must_unshare): a pin of an anonymous page
    # must stay the page the process sees, even after a later COW write fault in that process.
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"before")
    c = p.fork()
    pin = p.pin_user_pages(a, 1, write=False, longterm=True)
    (pf,) = pin_pfns(pin)
    c.write(a, b"child.")
    p.write(a, b"after!")
    assert mmh.pfn(p, a) == pf, "the pinned page and the parent's mapping diverged"
    assert bytes(mm_system.phys.read(np.array([pf]))[0][:6]) == b"after!"
    assert bytes(c.read(a, 6)) == b"child."
    pin.unpin()


def test_fork_with_pinned_page_copies_for_child(mm_system, mmh):
    # copy_present_page(): an anon page that may be pinned is copied at fork, so the parent
    # keeps writing the pinned page and the child sees the data as of fork
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"at-fork")
    pin = p.pin_user_pages(a, 1, write=True, longterm=True)
    (pf,) = pin_pfns(pin)
    c = p.fork()
    p.write(a, b"later!!")
    assert mmh.pfn(p, a) == pf
    assert bytes(c.read(a, 7)) == b"at-fork"
    assert bytes(mm_system.phys.read(np.array([pf]))[0][:7]) == b"later!!"
    pin.unpin()


def test_read_pin_of_file_page_is_page_cache_page(mm_system, mm_file, mmh):
    fd = mm_file(b"f" * P)
    p = mm_system.spawn()
    a = p.mmap(P, RW, MAP_SHARED, fd=fd)
    pin = p.pin_user_pages(a, 1)
    (pf,) = pin_pfns(pin)
    assert pf == mmh.pfn(p, a)
    assert mmh.pincount(mm_system, pf) == 1
    pin.unpin()
    assert mmh.pincount(mm_system, pf) == 0


def test_two_pins_count_twice(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"x")
    p1 = p.pin_user_pages(a, 1, write=True)
    p2 = p.pin_user_pages(a, 1, write=True)
    (f,) = pin_pfns(p1)
    assert pin_pfns(p2) == [f]
    assert mmh.pincount(mm_system, f) == 2
    p1.unpin()
    assert mmh.pincount(mm_system, f) == 1
    p2.unpin()
    assert mmh.pincount(mm_system, f) == 0 and mmh.refcount(mm_system, f) == 1


def test_pin_unmapped_is_efault_and_pins_nothing(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"x" * (2 * P))
    p.munmap(a + P, P)
    pf = mmh.pfn(p, a)
    with pytest.raises(OSError) as ei:
        p.pin_user_pages(a, 2, write=True)
    assert ei.value.errno == errno.EFAULT
    assert mmh.pincount(mm_system, pf) == 0, "a failed pin must not leave the first page pinned"
    assert mmh.refcount(mm_system, pf) == 1


def test_write_pin_of_readonly_mapping_is_efault(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(P, PROT_READ, ANON)
    with pytest.raises(OSError) as ei:
        p.pin_user_pages(a, 1, write=True)
    assert ei.value.errno == errno.EFAULT
    assert int(mm_system.phys.pages.pincount.sum()) == 0


def test_unaligned_pin_address(mm_system):
    # pin_user_pages() takes any address inside the first page (start is rounded down)
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"y" * (2 * P))
    pin = p.pin_user_pages(a + 100, 1, write=True)
    assert pin_pfns(pin) == [mm_system.phys.pages.pincount.nonzero()[0][0]]
    assert len(pin_pfns(pin)) == 1
    pin.unpin()
    assert p.pin_user_pages(a, 0).npages == 0          # zero pages: nothing pinned, no error


def test_pin_on_killed_process(mm_system):
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.exit()
    with pytest.raises(hmmgpu.ProcessKilled):
        p.pin_user_pages(a, 1)


def test_readonly_pins_after_child_cowed_away_stay_coherent(mm_system, mmh):
    # After fork the parent's page is no longer PageAnonExclusive; once the child copied it away the
    # parent is its only user again.  A R/O pin must then make it exclusive (do_wp_page with
    # FAULT_FLAG_UNSHARE reuses it and sets PageAnonExclusive), so neither a second pin nor a later
    # store may replace the pinned page in the parent's page table.
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"parent")
    c = p.fork()
    c.write(a, b"child!")                  # the child copies; the parent's page is its alone again
    first = p.pin_user_pages(a, 1, write=False)
    (pf,) = pin_pfns(first)
    assert pf == mmh.pfn(p, a)
    second = p.pin_user_pages(a, 1, write=False)
    assert pin_pfns(second) == [pf], "a second R/O pin replaced the page the first pin holds"
    assert mmh.pfn(p, a) == pf
    p.write(a, b"stored")
    assert mmh.pfn(p, a) == pf, "a store after a R/O pin copied the pinned page away"
    assert bytes(mm_system.phys.read(np.array([pf]))[0][:6]) == b"stored"
    first.unpin()
    second.unpin()


def test_readonly_pin_after_child_exit_then_store(mm_system, mmh):
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"x")
    p.fork().exit()
    pin = p.pin_user_pages(a, 1, write=False, longterm=True)
    (pf,) = pin_pfns(pin)
    p.write(a, b"y")
    assert mmh.pfn(p, a) == pf, "the pinned page and the parent's mapping diverged"
    pin.unpin()


@pytest.mark.parametrize("prot", [PROT_READ, 0])
def test_fork_copy_of_pinned_page_respects_vma_protection(mm_system, mmh, prot):
    # copy_present_page(): the child's copy is mapped with the VMA's protection (maybe_mkwrite),
    # never writable in a read-only or PROT_NONE mapping (hmm_range_fault would hand a device a
    # writable mapping of it)
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"pinned")
    pin = p.pin_user_pages(a, 1, write=True)
    p.mprotect(a, P, prot)
    c = p.fork()
    assert not mmh.writable(c, a), f"child PTE {mmh.pte(c, a):#x} is writable in a prot={prot} VMA"
    assert not mmh.writable(p, a)
    with pytest.raises(hmmgpu.SegmentationFault):
        c.write(a, b"x")
    pin.unpin()


def test_pinned_file_page_outliving_its_mapping_is_released(mm_system, mm_file, mmh):
    import os
    fd = mm_file(b"p" * (2 * P))
    fds0 = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    free0 = mmh.nr_free(mm_system)
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, MAP_SHARED, fd=fd)
    pin = p.pin_user_pages(a, 2, write=True)
    p.write(a, b"pinned+dirty")
    p.munmap(a, 2 * P)
    assert mmh.nr_free(mm_system) == free0 - 2          # the pin holds the cached pages
    pin.unpin()
    mm_system.drop_caches()
    assert mmh.nr_free(mm_system) == free0
    assert mm_file.contents(fd)[:12] == b"pinned+dirty"
    if fds0 is not None:
        assert len(os.listdir("/proc/self/fd")) == fds0, "the file stayed open after its cache was dropped"
