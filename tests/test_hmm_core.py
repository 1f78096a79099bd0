"""The kernel-level HMM API against the rules of mm/hmm.c, mm/memremap.c and mm/migrate_device.c.

A tiny driver (``ToyDev``) built straight on DevPagemap/MigrateVma exercises the
API the way a kernel driver would, so these tests do not depend on dmirror.
"""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE
from hmmgpu.hmm import (HMM_PFN_DMA_MAPPED, HMM_PFN_ERROR, HMM_PFN_FLAGS, HMM_PFN_ORDER_SHIFT,
                        HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID, HMM_PFN_WRITE,
                        MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PRIVATE, MIGRATE_PFN_MIGRATE,
                        MIGRATE_PFN_SHIFT, MIGRATE_PFN_VALID, MIGRATE_PFN_WRITE,
                        MIGRATE_VMA_SELECT_DEVICE_COHERENT, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                        MIGRATE_VMA_SELECT_SYSTEM, MMU_NOTIFY_EXCLUSIVE, MMU_NOTIFY_MIGRATE,
                        NODE_ALLOW_KSM, NODE_ALLOW_LONGTERM_PIN, DevPagemap, HmmRange, MigrateVma,
                        MmuIntervalNotifier, hmm_pfn_to_map_order, hmm_pfn_to_pfn, hmm_range_fault,
                        make_device_exclusive_range, memremap_pages, memunmap_pages,
                        migrate_device_finalize, migrate_device_pages, migrate_device_range,
                        migrate_pfn, migrate_pfn_to_pfn, migrate_vma_finalize, migrate_vma_pages,
                        migrate_vma_setup, mmu_interval_notifier_insert,
                        mmu_interval_read_begin, mmu_interval_set_seq, page_node_allow,
                        zone_device_page_init)
from hmmgpu.mm import pgtable as pt

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
U = np.uint64


class ToyDev:
    """A minimal HMM driver: one pgmap, a free list, migrate_to_ram through migrate_vma."""

    def __init__(self, system, npages=256, kind=MEMORY_DEVICE_PRIVATE, caps=0):
        self.system = system
        self.freed = []
        self.faults = 0
        self.pgmap = DevPagemap(kind, self, self, npages, caps=caps)
        self.first = memremap_pages(self.pgmap, system)
        self.free = list(range(self.first + npages - 1, self.first - 1, -1))

    def page_free(self, pfns):
        self.freed.append(np.array(pfns))
        self.free.extend(int(p) for p in pfns)

    def alloc(self, n):
        got = np.array([self.free.pop() for _ in range(n)], dtype=np.int64)
        zone_device_page_init(self.system, got)
        return got

    def migrate_to_ram(self, vmf):
        self.faults += 1
        a = np.asarray(vmf.addresses)
        args = MigrateVma(vmf.vma, int(a.min()), int(a.max()) + PAGE_SIZE, pgmap_owner=self,
                          flags=MIGRATE_VMA_SELECT_DEVICE_PRIVATE, fault_page=vmf.page)
        assert migrate_vma_setup(args) == 0
        self.copy_back(args)
        migrate_vma_pages(args)
        migrate_vma_finalize(args)
        return 0

    def copy_back(self, args):
        phys = self.system.phys
        s = migrate_pfn_to_pfn(args.src)
        sel = np.nonzero((s >= 0) & ((args.src & U(MIGRATE_PFN_MIGRATE)) != 0))[0]
        new = phys.alloc(sel.size, None, zero=False)
        phys.trylock(new)
        phys.copy(new, s[sel])
        args.dst[sel] = migrate_pfn(new) | (args.src[sel] & U(MIGRATE_PFN_WRITE))

    def to_device(self, vma, start, end, flags=MIGRATE_VMA_SELECT_SYSTEM):
        args = MigrateVma(vma, start, end, pgmap_owner=self, flags=flags)
        ret = migrate_vma_setup(args)
        if ret:
            return ret, args
        sel = np.nonzero((args.src & U(MIGRATE_PFN_MIGRATE)) != 0)[0]
        s = migrate_pfn_to_pfn(args.src[sel])
        d = self.alloc(sel.size)
        phys = self.system.phys
        if (s >= 0).any():
            phys.copy(d[s >= 0], s[s >= 0])
        if (s < 0).any():
            phys.fill(d[s < 0], 0)
        args.dst[sel] = migrate_pfn(d) | (args.src[sel] & U(MIGRATE_PFN_WRITE))
        migrate_vma_pages(args)
        migrate_vma_finalize(args)
        return 0, args

    def in_use(self):
        pg = self.system.phys.pages
        return int((pg.refcount[self.pgmap.pfn_first:self.pgmap.pfn_last] > 0).sum())


class Recorder:
    def __init__(self):
        self.events = []

    def invalidate(self, mni, range, cur_seq):
        self.events.append((range.event, range.start, range.end, range.owner))
        mmu_interval_set_seq(mni, cur_seq)
        return True


@pytest.fixture
def system():
    s = hmmgpu.System(backend="numpy", ram_bytes=32 << 20)
    yield s


def notifier(proc, start=0, length=(1 << 47)):
    mni = MmuIntervalNotifier()
    rec = Recorder()
    mmu_interval_notifier_insert(mni, proc.mm, start, length, rec)
    return mni, rec


def rf(proc, mni, start, npages, default=0, mask=0, pfns=None, owner=None):
    r = HmmRange(notifier=mni, start=start, end=start + npages * PAGE_SIZE, default_flags=default,
                 pfn_flags_mask=mask, dev_private_owner=owner,
                 hmm_pfns=np.zeros(npages, U) if pfns is None else pfns)
    for _ in range(16):            # the driver's retry loop: a fault may invalidate the range
        r.notifier_seq = mmu_interval_read_begin(mni)
        with proc.mm.mmap_lock.read():
            ret = hmm_range_fault(r)
        if ret != -errno.EBUSY:
            break
    return ret, r.hmm_pfns


def vma_of(proc, addr):
    return proc.mm.find_vma(addr)


# -- bit layout -----------------------------------------------------------------------------------

def test_hmm_pfn_bit_layout():
    assert HMM_PFN_VALID == 1 << 63 and HMM_PFN_WRITE == 1 << 62 and HMM_PFN_ERROR == 1 << 61
    assert HMM_PFN_REQ_FAULT == HMM_PFN_VALID and HMM_PFN_REQ_WRITE == HMM_PFN_WRITE
    assert HMM_PFN_ORDER_SHIFT == 53
    assert HMM_PFN_FLAGS == ((1 << 64) - 1) & ~((1 << 53) - 1)
    e = np.array([HMM_PFN_VALID | (9 << HMM_PFN_ORDER_SHIFT) | 1234], U)
    assert hmm_pfn_to_map_order(e)[0] == 9 and hmm_pfn_to_pfn(e)[0] == 1234
    assert MIGRATE_PFN_VALID == 1 and MIGRATE_PFN_MIGRATE == 2 and MIGRATE_PFN_WRITE == 8
    assert MIGRATE_PFN_SHIFT == 6 and int(migrate_pfn([5])[0]) == (5 << 6) | 1


# -- hmm_range_fault --------------------------------------------------------------------------------

def test_snapshot_without_faults(system):
    p = system.spawn()
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a + 2 * PAGE_SIZE, b"x")              # page 2: a private page
    p.read(a + PAGE_SIZE, 1)                      # page 1: the zero page
    p.mprotect(a + 3 * PAGE_SIZE, PAGE_SIZE, PROT_NONE)
    mni, _ = notifier(p)
    ret, e = rf(p, mni, a, 4)
    assert ret == 0
    assert e[0] == 0                                          # pte_none, nothing asked
    assert e[1] == HMM_PFN_VALID | system.phys.zero_pfn       # zero page, read-only
    pfn2 = int(p.mm.find_vma(a).pte[2]) >> 12
    assert e[2] == HMM_PFN_VALID | HMM_PFN_WRITE | pfn2
    assert e[3] == HMM_PFN_ERROR                              # PROT_NONE
    assert p.mm.find_vma(a).pte[0] == 0                       # nothing was faulted


def test_read_fault_gives_zero_page_write_fault_cows(system):
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, RW, ANON)
    mni, _ = notifier(p)
    ret, e = rf(p, mni, a, 2, default=HMM_PFN_REQ_FAULT)
    assert ret == 0 and (hmm_pfn_to_pfn(e) == system.phys.zero_pfn).all()
    assert not (e & U(HMM_PFN_WRITE)).any()
    ret, e = rf(p, mni, a, 2, default=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert ret == 0 and (e & U(HMM_PFN_WRITE)).all()
    assert (hmm_pfn_to_pfn(e) != system.phys.zero_pfn).all()


def test_write_fault_on_readonly_vma_is_eperm(system):
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, PROT_READ, ANON)
    mni, _ = notifier(p)
    ret, _ = rf(p, mni, a, 2, default=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert ret == -errno.EPERM


def test_prot_none_and_holes(system):
    p = system.spawn()
    a = p.mmap(3 * PAGE_SIZE, RW, ANON)
    p.munmap(a + PAGE_SIZE, PAGE_SIZE)
    p.mprotect(a + 2 * PAGE_SIZE, PAGE_SIZE, PROT_NONE)
    mni, _ = notifier(p)
    ret, e = rf(p, mni, a, 3)
    assert ret == 0 and e[1] == HMM_PFN_ERROR and e[2] == HMM_PFN_ERROR
    # asking for a fault on a hole or a PROT_NONE page is a hard failure
    assert rf(p, mni, a + PAGE_SIZE, 1, default=HMM_PFN_REQ_FAULT)[0] == -errno.EFAULT
    assert rf(p, mni, a + 2 * PAGE_SIZE, 1, default=HMM_PFN_REQ_FAULT)[0] == -errno.EFAULT


def test_per_page_requests_and_sticky_flags(system):
    p = system.spawn()
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    mni, _ = notifier(p)
    req = np.array([0, HMM_PFN_REQ_FAULT, 0, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_DMA_MAPPED], U)
    ret, e = rf(p, mni, a, 4, mask=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns=req)
    assert ret == 0
    ptes = p.mm.find_vma(a).pte
    assert ptes[0] == 0 and ptes[2] == 0              # not requested: not faulted
    assert pt.pte_present(ptes[1:2])[0] and pt.pte_write(ptes[3:4])[0]
    assert e[0] == 0 and e[2] == 0
    assert e[3] & U(HMM_PFN_DMA_MAPPED)               # sticky input flag survives


def test_ebusy_when_sequence_moved(system):
    p = system.spawn()
    a = p.mmap(PAGE_SIZE, RW, ANON)
    mni, _ = notifier(p)
    r = HmmRange(notifier=mni, start=a, end=a + PAGE_SIZE)
    r.notifier_seq = mmu_interval_read_begin(mni)
    p.munmap(a, PAGE_SIZE)           # an invalidation: the recorder moves the sequence
    with p.mm.mmap_lock.read():
        assert hmm_range_fault(r) == -errno.EBUSY


def test_device_private_own_reported_foreign_faulted(system):
    p = system.spawn()
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a, np.arange(4 * PAGE_SIZE // 4, dtype=np.int32))
    d0, d1 = ToyDev(system), ToyDev(system)
    ret, args = d0.to_device(vma_of(p, a), a, a + 4 * PAGE_SIZE)
    assert ret == 0 and args.cpages == 4
    mni, _ = notifier(p)
    # the owner sees its pages, even when asking for a write fault: never faulted
    ret, e = rf(p, mni, a, 4, default=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, owner=d0)
    assert ret == 0 and d0.faults == 0
    assert (e & U(HMM_PFN_VALID | HMM_PFN_WRITE)).all()
    assert ((hmm_pfn_to_pfn(e) >= d0.pgmap.pfn_first) & (hmm_pfn_to_pfn(e) < d0.pgmap.pfn_last)).all()
    # another driver without a fault request: 0, nothing moves
    ret, e = rf(p, mni, a, 4, owner=d1)
    assert ret == 0 and (e == 0).all() and d0.faults == 0
    # with a fault request: migrate_to_ram of the owner, in one batch
    ret, e = rf(p, mni, a, 4, default=HMM_PFN_REQ_FAULT, owner=d1)
    assert ret == 0 and d0.faults == 1
    assert (hmm_pfn_to_pfn(e) < system.phys.nr_ram).all()
    assert d0.in_use() == 0 and sum(f.size for f in d0.freed) == 4
    assert (p.read(a, 4 * PAGE_SIZE).view(np.int32) == np.arange(4096)).all()


# -- memremap -----------------------------------------------------------------------------------------

def test_memremap_checks_and_lifecycle(system):
    class NoFault:
        def page_free(self, pfns):
            pass
    with pytest.raises(OSError) as ei:
        memremap_pages(DevPagemap(MEMORY_DEVICE_PRIVATE, NoFault(), "x", 16), system)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        memremap_pages(DevPagemap(MEMORY_DEVICE_PRIVATE, ToyDev.__new__(ToyDev), None, 16), system)
    assert ei.value.errno == errno.EINVAL
    d = ToyDev(system, npages=16)
    pg = system.phys.pages
    assert (pg.refcount[d.pgmap.pfn_first:d.pgmap.pfn_last] == 0).all()   # free at 0
    got = d.alloc(3)
    assert (pg.refcount[got] == 1).all()
    system.phys.unlock(got)
    with pytest.raises(OSError) as ei:
        memunmap_pages(d.pgmap)
    assert ei.value.errno == errno.EBUSY
    system.phys.put(got)
    assert len(d.freed) == 1 and sorted(d.freed[0].tolist()) == sorted(got.tolist())   # one batched call
    memunmap_pages(d.pgmap)


def test_coherent_node_capabilities(system):
    d = ToyDev(system, npages=8, kind=MEMORY_DEVICE_COHERENT, caps=NODE_ALLOW_KSM)
    pfns = np.array([1, d.first, d.first + 1])
    assert page_node_allow(system, pfns, NODE_ALLOW_KSM).tolist() == [True, True, True]
    assert page_node_allow(system, pfns, NODE_ALLOW_LONGTERM_PIN).tolist() == [True, False, False]


@pytest.mark.parametrize("caps", [0, NODE_ALLOW_LONGTERM_PIN])
def test_longterm_pin_honours_the_coherent_node_mask(system, caps):
    """Issue 10, defect 9: FOLL_LONGTERM moved every coherent page off its node, whatever the
    node allowed.  folio_is_longterm_pinnable() is the node's NODE_ALLOW_LONGTERM_PIN bit:
    without it the page moves to system RAM first (today's kernel), with it the pin stays put."""
    d = ToyDev(system, npages=8, kind=MEMORY_DEVICE_COHERENT, caps=caps)
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x09" * (2 * PAGE_SIZE))
    assert d.to_device(vma_of(p, a), a, a + 2 * PAGE_SIZE)[0] == 0
    on_node = pt.pte_pfn(vma_of(p, a).pte)
    assert (on_node >= d.first).all()
    pin = p.pin_user_pages(a, 2, write=True, longterm=True)
    stays = bool(caps & NODE_ALLOW_LONGTERM_PIN)
    assert (pin.pfns == on_node).all() == stays
    assert ((pin.pfns >= d.first).all() if stays else (pin.pfns < system.phys.nr_ram).all())
    assert (pt.pte_pfn(vma_of(p, a).pte) == pin.pfns).all()
    assert (p.read(a, 2 * PAGE_SIZE) == 9).all()
    pin.unpin()
    p.exit()
    assert d.in_use() == 0


# -- migrate_vma ----------------------------------------------------------------------------------------

def test_migrate_holes_zero_page_and_accounting(system):
    cg = system.memcg("g")
    p = system.spawn(memcg=cg)
    n = 8
    a = p.mmap(n * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x01" * (4 * PAGE_SIZE))          # 4 pages of data
    p.read(a + 4 * PAGE_SIZE, 1)                   # page 4: zero page; 5..7 pte_none
    usage, rss = cg.usage, p.rss["anon"]
    d = ToyDev(system)
    mni, rec = notifier(p)
    ret, args = d.to_device(vma_of(p, a), a, a + n * PAGE_SIZE)
    assert ret == 0 and args.cpages == n
    assert (migrate_pfn_to_pfn(args.src[4:]) == -1).all()      # holes carry no page
    assert (MMU_NOTIFY_MIGRATE, a, a + n * PAGE_SIZE, d) in rec.events
    ptes = vma_of(p, a).pte
    assert pt.is_device_private(ptes).all()
    assert (pt.swp_type(ptes) == pt.SWP_DEVICE_PRIVATE_WRITE).all()
    assert p.rss["anon"] == rss + 4                 # the 4 holes became anon pages
    assert cg.usage == usage + 4 * PAGE_SIZE        # charged to the mm's cgroup; data pages' charge moved
    assert d.in_use() == n
    # back by CPU access
    assert (p.read(a, 4 * PAGE_SIZE) == 1).all() and not p.read(a + 4 * PAGE_SIZE, 4 * PAGE_SIZE).any()
    assert d.in_use() == 0 and cg.usage == usage + 4 * PAGE_SIZE and p.rss["anon"] == rss + 4
    p.exit()
    assert cg.usage == 0


def test_shared_and_file_memory_do_not_go_to_device(system, tmp_path):
    import os
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(a, b"s")
    d = ToyDev(system)
    ret, args = d.to_device(vma_of(p, a), a, a + 2 * PAGE_SIZE)
    assert ret == 0
    assert not ((args.src & U(MIGRATE_PFN_MIGRATE)) != 0).any()     # page 0 refused, page 1 no hole fill
    assert not pt.is_device_private(vma_of(p, a).pte).any()
    assert p.read(a, 1)[0] == ord("s") and d.in_use() == 0
    path = tmp_path / "f"
    path.write_bytes(b"f" * 2 * PAGE_SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        b = p.mmap(2 * PAGE_SIZE, RW, MAP_PRIVATE, fd=fd)
        p.read(b, 1)                                   # page-cache page, mapped read-only
        ret, args = d.to_device(vma_of(p, b), b, b + 2 * PAGE_SIZE)
        assert ret == 0 and d.in_use() == 0
        assert pt.pte_present(vma_of(p, b).pte[:1])[0] and p.read(b, 1)[0] == ord("f")
        p.munmap(b, 2 * PAGE_SIZE)
    finally:
        os.close(fd)


def test_pinned_and_locked_pages_are_skipped(system):
    p = system.spawn()
    a = p.mmap(3 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x07" * (3 * PAGE_SIZE))
    pin = p.pin_user_pages(a, 1, write=True)
    locked = int(vma_of(p, a).pte[1]) >> 12
    assert system.phys.trylock([locked])[0]
    d = ToyDev(system)
    ret, args = d.to_device(vma_of(p, a), a, a + 3 * PAGE_SIZE)
    assert ret == 0 and args.cpages == 1
    ptes = vma_of(p, a).pte
    assert pt.pte_present(ptes[:2]).all() and pt.is_device_private(ptes[2:]).all()
    system.phys.unlock([locked])
    pin.unpin()
    assert (p.read(a, 3 * PAGE_SIZE) == 7).all()


def test_setup_rejects_bad_ranges(system):
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, RW, ANON)
    v = vma_of(p, a)
    assert migrate_vma_setup(MigrateVma(v, a, a)) == -errno.EINVAL
    assert migrate_vma_setup(MigrateVma(v, a, a + 3 * PAGE_SIZE)) == -errno.EINVAL
    assert migrate_vma_setup(MigrateVma(None, a, a + PAGE_SIZE)) == -errno.EINVAL


def test_shared_after_fork_migrates_both_mappings(system):
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x05" * (2 * PAGE_SIZE))
    c = p.fork()
    d = ToyDev(system)
    # the page is mapped by parent and child: try_to_migrate walks the rmap
    ret, args = d.to_device(vma_of(p, a), a, a + 2 * PAGE_SIZE)
    assert ret == 0 and args.cpages == 2
    for proc in (p, c):
        ptes = vma_of(proc, a).pte
        assert pt.is_device_private(ptes).all()
        assert (pt.swp_type(ptes) == pt.SWP_DEVICE_PRIVATE_READ).all()    # still COW
    dp = pt.pte_pfn(vma_of(p, a).pte)
    assert (system.phys.pages.mapcount[dp] == 2).all() and (system.phys.pages.refcount[dp] == 2).all()
    c.write(a, b"\x09")
    assert p.read(a, 1)[0] == 5 and c.read(a, 1)[0] == 9
    c.exit()
    p.exit()
    assert d.in_use() == 0


def test_migrate_device_range_evicts(system):
    p = system.spawn()
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a, np.arange(4 * PAGE_SIZE // 4, dtype=np.int32))
    c = p.fork()
    d = ToyDev(system, npages=16)
    d.to_device(vma_of(p, a), a, a + 4 * PAGE_SIZE)
    n = d.pgmap.nr_pages
    src, dst = np.zeros(n, U), np.zeros(n, U)
    assert migrate_device_range(system, src, d.pgmap.pfn_first, n) == 0
    sel = np.nonzero((src & U(MIGRATE_PFN_MIGRATE)) != 0)[0]
    assert sel.size == 4
    new = system.phys.alloc(sel.size, None, zero=False)
    system.phys.trylock(new)
    system.phys.copy(new, migrate_pfn_to_pfn(src[sel]))
    dst[sel] = migrate_pfn(new)
    migrate_device_pages(system, src, dst, n)
    migrate_device_finalize(system, src, dst, n)
    assert d.in_use() == 0
    for proc in (p, c):
        assert pt.pte_present(vma_of(proc, a).pte).all()
        assert (proc.read(a, 4 * PAGE_SIZE).view(np.int32) == np.arange(4096)).all()
    memunmap_pages(d.pgmap)


def test_coherent_selection_needs_owner_and_flag(system):
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x03" * (2 * PAGE_SIZE))
    d = ToyDev(system, kind=MEMORY_DEVICE_COHERENT)
    d.to_device(vma_of(p, a), a, a + 2 * PAGE_SIZE)
    assert (pt.pte_pfn(vma_of(p, a).pte) >= d.first).all() and pt.pte_present(vma_of(p, a).pte).all()
    assert (p.read(a, 2 * PAGE_SIZE) == 3).all()          # the CPU reads coherent memory in place
    other = ToyDev(system, kind=MEMORY_DEVICE_COHERENT)
    args = MigrateVma(vma_of(p, a), a, a + 2 * PAGE_SIZE, pgmap_owner=other,
                      flags=MIGRATE_VMA_SELECT_DEVICE_COHERENT)
    assert migrate_vma_setup(args) == 0 and args.cpages == 0
    migrate_vma_finalize(args)
    args = MigrateVma(vma_of(p, a), a, a + 2 * PAGE_SIZE, pgmap_owner=d,
                      flags=MIGRATE_VMA_SELECT_DEVICE_COHERENT)
    assert migrate_vma_setup(args) == 0 and args.cpages == 2
    d.copy_back(args)
    migrate_vma_pages(args)
    migrate_vma_finalize(args)
    assert (pt.pte_pfn(vma_of(p, a).pte) < system.phys.nr_ram).all() and d.in_use() == 0
    assert (p.read(a, 2 * PAGE_SIZE) == 3).all()


# -- make_device_exclusive --------------------------------------------------------------------------------

def test_device_exclusive_and_cpu_restore(system):
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x02" * (2 * PAGE_SIZE))
    mni, rec = notifier(p)
    with p.mm.mmap_lock.read():
        pfns = make_device_exclusive_range(p.mm, a, a + 2 * PAGE_SIZE, owner="me")
    assert (pfns >= 0).all()
    system.phys.unlock(pfns)
    system.phys.put(pfns)
    assert (MMU_NOTIFY_EXCLUSIVE, a, a + 2 * PAGE_SIZE, "me") in rec.events
    assert pt.is_device_exclusive(vma_of(p, a).pte).all()
    rec.events.clear()
    assert p.read(a, 1)[0] == 2
    assert any(e[0] == MMU_NOTIFY_EXCLUSIVE and e[3] is None for e in rec.events)
    assert pt.pte_present(vma_of(p, a).pte[:1])[0]
    b = p.mmap(PAGE_SIZE, PROT_READ, ANON)
    with p.mm.mmap_lock.read():
        assert make_device_exclusive_range(p.mm, b, b + PAGE_SIZE) == -errno.EFAULT


# -- the 2017 API ----------------------------------------------------------------------------------------

def test_legacy_mirror_and_range_done(system):
    from hmmgpu.hmm import legacy
    p = system.spawn()
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x01")

    class Ops:
        def __init__(self):
            self.updates = []

        def sync_cpu_device_pagetables(self, mirror, update):
            self.updates.append((update.start, update.end))

    ops = Ops()
    mirror = legacy.HmmMirror(ops)
    v = vma_of(p, a)
    pfns = np.zeros(4, U)
    assert legacy.hmm_vma_get_pfns(v, legacy.LegacyRange(), a, a + 4 * PAGE_SIZE, pfns) == -errno.EINVAL
    assert legacy.hmm_mirror_register(mirror, p.mm) == 0
    rng = legacy.LegacyRange()
    assert legacy.hmm_vma_get_pfns(v, rng, a, a + 4 * PAGE_SIZE, pfns) == 0
    assert pfns[0] & U(legacy.HMM_PFN_VALID | legacy.HMM_PFN_READ | legacy.HMM_PFN_WRITE)
    assert pfns[1] == legacy.HMM_PFN_EMPTY
    assert legacy.hmm_vma_range_done(v, rng)
    rng = legacy.LegacyRange()
    assert legacy.hmm_vma_fault(v, rng, a, a + 4 * PAGE_SIZE, pfns, write=True) == 0
    assert (pfns & U(legacy.HMM_PFN_WRITE)).all()
    p.madvise(a, PAGE_SIZE, hmmgpu.MADV_DONTNEED)
    assert not legacy.hmm_vma_range_done(v, rng)
    assert (a, a + PAGE_SIZE) in ops.updates
    legacy.hmm_mirror_unregister(mirror)


def test_legacy_devmem_and_migrate_vma(system):
    from hmmgpu.hmm import legacy

    class Device:
        pass

    dev = Device()
    dev.system = system

    class DevmemOps:
        def __init__(self):
            self.freed = 0

        def free(self, devmem, pfns):
            self.freed += len(pfns)
            pool.extend(int(x) for x in pfns)

        def fault(self, devmem, vma, addr, page, flags, pmdp):
            src, dst = np.zeros(1, U), np.zeros(1, U)
            legacy.migrate_vma(BackOps(), vma, addr, addr + PAGE_SIZE, src, dst)
            return 0

    class ToDev:
        def alloc_and_copy(self, vma, src, dst, start, end, private):
            sel = np.nonzero((src & U(MIGRATE_PFN_MIGRATE)) != 0)[0]
            got = np.array([pool.pop() for _ in sel], dtype=np.int64)
            zone_device_page_init(system, got)
            s = migrate_pfn_to_pfn(src[sel])
            system.phys.copy(got, s)
            dst[sel] = migrate_pfn(got) | U(legacy.MIGRATE_PFN_LOCKED)

        def finalize_and_map(self, vma, src, dst, start, end, private):
            private.append(int(((src & U(MIGRATE_PFN_MIGRATE)) != 0).sum()))

    class BackOps:
        def alloc_and_copy(self, vma, src, dst, start, end, private):
            sel = np.nonzero((src & U(MIGRATE_PFN_MIGRATE)) != 0)[0]
            assert (src[sel] & U(legacy.MIGRATE_PFN_DEVICE)).all()
            new = system.phys.alloc(sel.size, None, zero=False)
            system.phys.trylock(new)
            system.phys.copy(new, migrate_pfn_to_pfn(src[sel]))
            dst[sel] = migrate_pfn(new)

        def finalize_and_map(self, vma, src, dst, start, end, private):
            pass

    ops = DevmemOps()
    devmem = legacy.hmm_devmem_add(ops, dev, 16 * PAGE_SIZE)
    pool = list(range(devmem.pfn_last - 1, devmem.pfn_first - 1, -1))
    p = system.spawn()
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x04" * (4 * PAGE_SIZE))
    done = []
    src, dst = np.zeros(4, U), np.zeros(4, U)
    assert legacy.migrate_vma(ToDev(), vma_of(p, a), a, a + 4 * PAGE_SIZE, src, dst, done) == 0
    assert done == [4] and pt.is_device_private(vma_of(p, a).pte).all()
    assert (p.read(a, 4 * PAGE_SIZE) == 4).all()             # four faults, one page each
    assert ops.freed == 4
    legacy.hmm_devmem_remove(devmem)


# -- everything comes back -----------------------------------------------------------------------------

def test_device_pages_freed_at_exit(system):
    p = system.spawn()
    a = p.mmap(16 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x01" * (8 * PAGE_SIZE))
    d = ToyDev(system)
    free_before = system.phys.nr_free()
    d.to_device(vma_of(p, a), a, a + 16 * PAGE_SIZE)
    assert d.in_use() == 16
    p.exit()
    assert d.in_use() == 0
    assert system.phys.nr_free() >= free_before


def test_range_fault_waits_for_a_migration_in_flight(system):
    """A fault request on a migration entry waits for the page unlock (migration_entry_wait)."""
    import threading
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x06" * (2 * PAGE_SIZE))
    d = ToyDev(system)
    args = MigrateVma(vma_of(p, a), a, a + 2 * PAGE_SIZE, pgmap_owner=d, flags=MIGRATE_VMA_SELECT_SYSTEM)
    with p.mm.mmap_lock.read():
        assert migrate_vma_setup(args) == 0 and args.cpages == 2
    assert pt.is_migration(vma_of(p, a).pte).all()
    mni, _ = notifier(p)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", rf(p, mni, a, 2, default=HMM_PFN_REQ_FAULT)))
    t.start()
    t.join(0.2)
    assert t.is_alive()                       # blocked on the locked pages
    migrate_vma_finalize(args)                # nothing to copy: the migration is abandoned
    t.join(10)
    ret, e = out["r"]
    assert ret == 0 and (e & U(HMM_PFN_VALID)).all()
    assert (hmm_pfn_to_pfn(e) < system.phys.nr_ram).all() and d.in_use() == 0
    assert (p.read(a, 2 * PAGE_SIZE) == 6).all()


def test_migrating_back_ignores_the_memcg_limit(system):
    """Device memory is charged like RAM, so coming back can never fail on the limit."""
    cg = system.memcg("tight", limit_bytes=8 * PAGE_SIZE)
    p = system.spawn(memcg=cg)
    a = p.mmap(8 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x08" * (8 * PAGE_SIZE))
    assert cg.usage == 8 * PAGE_SIZE
    d = ToyDev(system)
    d.to_device(vma_of(p, a), a, a + 8 * PAGE_SIZE)
    assert cg.usage == 8 * PAGE_SIZE          # the charge moved to the device pages
    assert (p.read(a, 8 * PAGE_SIZE) == 8).all()
    assert cg.usage == 8 * PAGE_SIZE and d.in_use() == 0 and not system.oom_kills


def test_legacy_update_callback_form(system):
    from hmmgpu.hmm import legacy
    p = system.spawn()
    a = p.mmap(2 * PAGE_SIZE, RW, ANON)
    seen = []

    class Ops:                     # the v25 document's form: update(mirror, action, start, end)
        def update(self, mirror, action, start, end):
            seen.append((action, start, end))

        def release(self, mirror):
            seen.append("release")

    assert legacy.hmm_mirror_register(legacy.HmmMirror(Ops()), p.mm) == 0
    p.munmap(a, PAGE_SIZE)
    assert (legacy.HMM_UPDATE_INVALIDATE, a, a + PAGE_SIZE) in seen
    p.exit()
    assert "release" in seen


def test_memremap_with_an_emulated_device_arena(system):
    """A pgmap backed by an EmulatedDevice's own frames: the device MMU and struct pages agree."""
    from hmmgpu.device.device import EmulatedDevice
    phys = system.phys
    n = 32
    base = phys.request_free_mem_region(n)
    dev = EmulatedDevice(system.backend, n, base, phys.ram)
    toy = ToyDev.__new__(ToyDev)
    toy.system, toy.freed, toy.faults = system, [], 0
    toy.pgmap = DevPagemap(MEMORY_DEVICE_PRIVATE, toy, toy, n, arena=dev.arena, pfn_first=base)
    toy.first = memremap_pages(toy.pgmap, system)
    toy.free = list(range(base + n - 1, base - 1, -1))
    assert toy.first == base
    p = system.spawn()
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a, np.arange(4 * PAGE_SIZE, dtype=np.uint8) % 251)
    ret, args = toy.to_device(vma_of(p, a), a, a + 4 * PAGE_SIZE)
    dp = migrate_pfn_to_pfn(args.dst)
    assert ret == 0 and dev.owns(dp).all()
    assert (dev.read_pages(dp).reshape(-1) == np.arange(4 * PAGE_SIZE, dtype=np.uint8) % 251).all()
    assert (p.read(a, 4 * PAGE_SIZE) == np.arange(4 * PAGE_SIZE, dtype=np.uint8) % 251).all()
    assert toy.in_use() == 0
