"""Device large folios in the HMM core (the 2025 device-THP series of mm/migrate_device.c).

A toy driver built straight on DevPagemap / MigrateVma, with 2 MiB device folios: the src/dst
layout of MIGRATE_VMA_SELECT_COMPOUND, device-private PMD entries and their order in
hmm_range_fault, the splits (at collection, and when the destination takes small pages,
announced through ops.folio_split), folio_free(heads, order) and the older page_free,
migrate_device_range / migrate_device_pfns over device folios.
"""
import numpy as np
import pytest

import hmmgpu
from hmmgpu import MADV_HUGEPAGE, MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PMD_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.hmm import (HMM_PFN_REQ_FAULT, HMM_PFN_VALID, HMM_PFN_WRITE, MEMORY_DEVICE_PRIVATE,
                        MIGRATE_PFN_COMPOUND, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE,
                        MIGRATE_VMA_SELECT_COMPOUND, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                        MIGRATE_VMA_SELECT_SYSTEM, DevPagemap, HmmRange, MigrateVma, MmuIntervalNotifier,
                        hmm_pfn_to_map_order, hmm_range_fault, memremap_pages,
                        migrate_device_finalize, migrate_device_pages, migrate_device_pfns,
                        migrate_device_range, migrate_pfn, migrate_pfn_to_pfn, migrate_vma_finalize,
                        migrate_vma_pages, migrate_vma_setup, mmu_interval_notifier_insert,
                        mmu_interval_read_begin, mmu_interval_set_seq, zone_device_folio_init,
                        zone_device_page_init)
from hmmgpu.mm import pgtable as pt

RW = PROT_READ | PROT_WRITE
NR = PMD_SIZE // PAGE_SIZE
U = np.uint64
HUGE = np.uint64(1 << 5)
COMPOUND = U(MIGRATE_PFN_COMPOUND)
MIGRATE = U(MIGRATE_PFN_MIGRATE)
SELECT_SYS = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND
SELECT_DEV = MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_COMPOUND


class FolioDev:
    """A driver with 4 device folios' worth of memory: ops folio_free and folio_split."""

    def __init__(self, system, nfolios=4, split_op=True):
        self.system = system
        self.pgmap = DevPagemap(MEMORY_DEVICE_PRIVATE, self, self, nfolios * NR)
        self.first = memremap_pages(self.pgmap, system)
        assert self.first % NR == 0
        self.free_folios = [self.first + k * NR for k in range(nfolios)]
        self.free_pages = []
        self.freed = []          # (heads, order) per folio_free call
        self.splits = []
        if split_op:
            self.folio_split = self._folio_split

    def folio_free(self, heads, order):
        self.freed.append((np.array(heads), order))
        if order:
            self.free_folios.extend(int(h) for h in heads)
        else:
            self.free_pages.extend(int(h) for h in heads)

    def _folio_split(self, heads, order):
        self.splits.append((np.array(heads), order))

    def migrate_to_ram(self, vmf):
        start = vmf.address & ~(PMD_SIZE - 1)
        args = MigrateVma(vmf.vma, start, start + PMD_SIZE, pgmap_owner=self, flags=SELECT_DEV,
                          fault_page=vmf.page)
        assert migrate_vma_setup(args) == 0
        to_ram(self.system, args)
        migrate_vma_pages(args)
        migrate_vma_finalize(args)
        return 0

    def alloc_folio(self):
        h = self.free_folios.pop()
        zone_device_folio_init(self.system, np.array([h]))
        return h

    def alloc_pages(self, n):
        while len(self.free_pages) < n:
            h = self.free_folios.pop()
            self.free_pages.extend(range(h, h + NR))
        got = np.array([self.free_pages.pop() for _ in range(n)], dtype=np.int64)
        zone_device_page_init(self.system, got)
        return got


def to_ram(system, args, small=False):
    """The driver's copy back: a THP for each 2 MiB entry (512 small pages with ``small``)."""
    phys = system.phys
    src = args.src[:args.npages]
    spfn = migrate_pfn_to_pfn(src)
    for i in np.nonzero((spfn >= 0) & ((src & MIGRATE) != 0))[0].tolist():
        w = src[i] & U(MIGRATE_PFN_WRITE)
        if src[i] & COMPOUND and not small:
            h = phys.alloc_folios(1, zero=False)
            pages = phys.folio_pages(h)
            phys.trylock(pages)
            phys.copy(pages, spfn[i] + np.arange(NR))
            args.dst[i] = migrate_pfn(h)[0] | COMPOUND | w
        elif src[i] & COMPOUND:
            new = phys.alloc(NR, None, zero=False)
            phys.trylock(new)
            phys.copy(new, spfn[i] + np.arange(NR))
            args.dst[i:i + NR] = migrate_pfn(new) | w
        else:
            new = phys.alloc(1, None, zero=False)
            phys.trylock(new)
            phys.copy(new, spfn[i:i + 1])
            args.dst[i] = migrate_pfn(new)[0] | w


@pytest.fixture
def world():
    s = hmmgpu.System(backend="numpy", ram_bytes=64 << 20)
    p = s.spawn()
    base = p.mmap(2 * PMD_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    ptr = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(ptr, PMD_SIZE, MADV_HUGEPAGE)
    data = np.random.default_rng(0).integers(0, 256, PMD_SIZE, dtype=np.uint8)
    p.write(ptr, data)
    assert (p.pages(ptr, NR) & HUGE).all()
    return s, p, ptr, data


def to_device(system, dev, vma, ptr, flags=SELECT_SYS, small=False):
    args = MigrateVma(vma, ptr, ptr + PMD_SIZE, pgmap_owner=dev, flags=flags)
    assert migrate_vma_setup(args) == 0
    phys = system.phys
    src = args.src
    sel = np.nonzero((src & MIGRATE) != 0)[0]
    spfn = migrate_pfn_to_pfn(src)
    for i in sel.tolist():
        if src[i] & COMPOUND and not small:
            h = dev.alloc_folio()
            phys.copy(phys.folio_pages([h]), spfn[i] + np.arange(NR))
            args.dst[i] = migrate_pfn([h])[0] | COMPOUND | (src[i] & U(MIGRATE_PFN_WRITE))
        else:
            k = NR if src[i] & COMPOUND else 1
            d = dev.alloc_pages(k)
            phys.copy(d, spfn[i] + np.arange(k))
            args.dst[i:i + k] = migrate_pfn(d) | (src[i] & U(MIGRATE_PFN_WRITE))
    migrate_vma_pages(args)
    migrate_vma_finalize(args)
    return args


def test_a_thp_moves_whole_to_a_device_folio_and_back(world):
    s, p, ptr, data = world
    dev = FolioDev(s)
    vma = p.mm.find_vma(ptr)
    thp = int(pt.pte_pfn(p.pages(ptr, 1))[0])
    args = to_device(s, dev, vma, ptr)
    # one src entry for the folio, at its head; the other 511 are 0
    assert args.src[0] == migrate_pfn([thp])[0] | MIGRATE | COMPOUND | U(MIGRATE_PFN_WRITE)
    assert not args.src[1:].any() and args.cpages == 1
    e = p.pages(ptr, NR)
    assert (e & HUGE).all() and pt.is_device_private(e).all()
    dpfn = pt.pte_pfn(e)
    assert (dpfn == dpfn[0] + np.arange(NR)).all() and (s.phys.pages.order[dpfn] == 9).all()
    # the old THP went back whole
    assert s.phys.pages.refcount[thp:thp + NR].max() == 0
    # the owner sees a device-private PMD: VALID | WRITE at order 9

    class Ops:
        def invalidate(self, mni, rng, seq):
            mmu_interval_set_seq(mni, seq)
            return True
    mni = MmuIntervalNotifier()
    mmu_interval_notifier_insert(mni, p.mm, ptr, PMD_SIZE, Ops())
    r = HmmRange(notifier=mni, start=ptr, end=ptr + PMD_SIZE, default_flags=HMM_PFN_REQ_FAULT,
                 dev_private_owner=dev)
    r.notifier_seq = mmu_interval_read_begin(mni)
    with p.mm.mmap_lock.read():
        assert hmm_range_fault(r) == 0
    assert ((r.hmm_pfns & U(HMM_PFN_VALID | HMM_PFN_WRITE)) == U(HMM_PFN_VALID | HMM_PFN_WRITE)).all()
    assert (hmm_pfn_to_map_order(r.hmm_pfns) == 9).all()
    # a CPU touch brings the folio back at its order
    assert np.array_equal(p.read(ptr, PMD_SIZE), data)
    e = p.pages(ptr, NR)
    assert (e & HUGE).all() and pt.pte_present(e).all()
    assert dev.freed and dev.freed[-1][1] == 9 and dev.freed[-1][0].tolist() == [dpfn[0]]
    assert not dev.splits and p.rss["anon"] == NR


def test_without_the_compound_flag_the_folio_is_split_first(world):
    s, p, ptr, data = world
    dev = FolioDev(s)
    vma = p.mm.find_vma(ptr)
    thp = int(pt.pte_pfn(p.pages(ptr, 1))[0])
    args = to_device(s, dev, vma, ptr, flags=MIGRATE_VMA_SELECT_SYSTEM)
    assert ((args.src & MIGRATE) != 0).all() and not (args.src & COMPOUND).any()
    assert (migrate_pfn_to_pfn(args.src) == thp + np.arange(NR)).all()
    e = p.pages(ptr, NR)
    assert not (e & HUGE).any() and pt.is_device_private(e).all()
    assert np.array_equal(p.read(ptr, PMD_SIZE), data)


def test_small_destination_pages_split_the_source_folio(world):
    s, p, ptr, data = world
    dev = FolioDev(s)
    vma = p.mm.find_vma(ptr)
    to_device(s, dev, vma, ptr)
    dhead = int(pt.pte_pfn(p.pages(ptr, 1))[0])
    # the way back takes small pages: the device folio is split, its driver told so
    args = MigrateVma(vma, ptr, ptr + PMD_SIZE, pgmap_owner=dev, flags=SELECT_DEV)
    assert migrate_vma_setup(args) == 0
    to_ram(s, args, small=True)
    migrate_vma_pages(args)
    assert (migrate_pfn_to_pfn(args.src) == dhead + np.arange(NR)).all()      # one entry per page now
    migrate_vma_finalize(args)
    assert [(h.tolist(), o) for h, o in dev.splits] == [([dhead], 9)]
    e = p.pages(ptr, NR)
    assert not (e & HUGE).any() and pt.pte_present(e).all()
    assert np.array_equal(p.read(ptr, PMD_SIZE), data)
    # freed as 512 small pages
    assert dev.freed[-1][1] == 0 and sorted(dev.freed[-1][0].tolist()) == list(range(dhead, dhead + NR))


def test_page_free_drivers_get_every_page(world):
    s, p, ptr, data = world

    class OldDev(FolioDev):
        folio_free = None

        def page_free(self, pfns):
            self.freed.append((np.array(pfns), 0))
    dev = OldDev(s, split_op=False)
    vma = p.mm.find_vma(ptr)
    to_device(s, dev, vma, ptr)
    dhead = int(pt.pte_pfn(p.pages(ptr, 1))[0])
    p.munmap(ptr, PMD_SIZE)
    assert len(dev.freed) == 1 and sorted(dev.freed[0][0].tolist()) == list(range(dhead, dhead + NR))


def test_a_small_source_does_not_move_to_a_folio(world):
    s, p, ptr, data = world
    dev = FolioDev(s)
    small = p.mmap(PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(small, b"s")
    vma = p.mm.find_vma(small)
    args = MigrateVma(vma, small, small + PAGE_SIZE, pgmap_owner=dev, flags=SELECT_SYS)
    assert migrate_vma_setup(args) == 0
    h = dev.alloc_folio()
    args.dst[0] = migrate_pfn([h])[0] | COMPOUND
    migrate_vma_pages(args)
    assert not args.src[0] & MIGRATE
    migrate_vma_finalize(args)
    assert pt.pte_present(p.pages(small, 1)).all() and p.read(small, 1)[0] == ord("s")
    assert dev.freed[-1][1] == 9                                   # the unused folio went back


@pytest.mark.parametrize("by", ["range", "pfns"])
def test_eviction_by_pfn_takes_device_folios_whole(world, by):
    s, p, ptr, data = world
    dev = FolioDev(s)
    vma = p.mm.find_vma(ptr)
    to_device(s, dev, vma, ptr)
    dhead = int(pt.pte_pfn(p.pages(ptr, 1))[0])
    n = dev.pgmap.nr_pages
    src = np.zeros(n, U)
    if by == "range":
        migrate_device_range(s, src, dev.first, n)
        at = dhead - dev.first
    else:
        src[:NR] = dhead + np.arange(NR)          # mainline form: raw pfns, then npages
        migrate_device_pfns(s, src, NR)
        at = 0
    assert src[at] == migrate_pfn([dhead])[0] | MIGRATE | COMPOUND
    assert np.count_nonzero(src) == 1
    dst = np.zeros(n, U)
    h = s.phys.alloc_folios(1, zero=False)
    s.phys.trylock(s.phys.folio_pages(h))
    s.phys.copy(s.phys.folio_pages(h), dhead + np.arange(NR))
    dst[at] = migrate_pfn(h)[0] | COMPOUND
    migrate_device_pages(s, src, dst, n)
    migrate_device_finalize(s, src, dst, n)
    e = p.pages(ptr, NR)
    assert (e & HUGE).all() and pt.pte_present(e).all() and pt.pte_pfn(e)[0] == h[0]
    assert np.array_equal(p.read(ptr, PMD_SIZE), data)
    assert dev.freed[-1][1] == 9


def test_a_longterm_pin_moves_one_page_of_a_coherent_device_thp(world):
    """FOLL_LONGTERM on a page of a 2 MiB coherent device folio: the PMD and the folio split and
    that page moves to system memory; the rest stays on the device as small pages."""
    from hmmgpu.drivers import dmirror
    s, p, ptr, data = world
    dev = dmirror.DMirrorDevice(s, memory="coherent")
    m = dev.open(p)
    m.migrate_to_dev(ptr, NR)
    e = p.pages(ptr, NR)
    assert (e & HUGE).all() and (pt.pte_pfn(e) >= s.phys.nr_ram).all()
    pin = p.pin_user_pages(ptr + 5 * PAGE_SIZE, 1, write=True, longterm=True)
    e = p.pages(ptr, NR)
    assert not (e & HUGE).any()
    assert pin.pfns[0] < s.phys.nr_ram and pt.pte_pfn(e)[5] == pin.pfns[0]
    assert (pt.pte_pfn(np.delete(e, 5)) >= s.phys.nr_ram).all()
    assert (s.phys.pages.order[pt.pte_pfn(e)] == 0).all()
    assert np.array_equal(p.read(ptr, PMD_SIZE), data)
    pin.unpin()
    assert dev.nr_allocated() == NR - 1
    m.close()
    p.exit()
    assert dev.nr_allocated() == 0
