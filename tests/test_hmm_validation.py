"""The kernel-level API checks its caller's arguments (issue 10, defect 6).

Kernel-level functions answer as in C: 0 or a negative errno (memremap_pages raises, as its
ERR_PTR would).  A bad argument -- a list where a uint64 array belongs, a pfn that does not
exist, a field that is not an integer -- is -EINVAL before anything changes: no page is left
locked, no reference taken, no PTE touched.
"""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.drivers import dmirror
from hmmgpu.hmm import (HMM_PFN_REQ_FAULT, MEMORY_DEVICE_PRIVATE, DevPagemap, HmmRange, MigrateVma,
                        hmm_range_fault, make_device_exclusive, make_device_exclusive_range,
                        memremap_pages, migrate_device_finalize, migrate_device_pages,
                        migrate_device_pfns, migrate_device_range, migrate_vma_setup,
                        mmu_interval_notifier_insert)
from hmmgpu.mm.notifier import MmuIntervalNotifier, mmu_interval_read_begin, mmu_interval_set_seq

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
U = np.uint64


class Seq:
    def invalidate(self, mni, rng, cur_seq):
        mmu_interval_set_seq(mni, cur_seq)
        return True


@pytest.fixture
def world():
    system = hmmgpu.System(backend="numpy", ram_bytes=16 << 20)
    dev = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p = system.spawn()
    a = p.mmap(4 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"\x03" * (4 * P))
    mni = MmuIntervalNotifier()
    assert mmu_interval_notifier_insert(mni, p.mm, 0, 1 << 47, Seq()) == 0
    return system, dev, p, a, mni


def state(system, p):
    pg = system.phys.pages
    return (pg.refcount.copy(), pg.mapcount.copy(), pg.flags.copy(),
            [(v.start, v.end, v.pte.copy()) for v in p.mm.vmas])


def same(s0, s1):
    for x, y in zip(s0[:3], s1[:3]):
        assert np.array_equal(x, y)
    assert len(s0[3]) == len(s1[3])
    for (a0, b0, t0), (a1, b1, t1) in zip(s0[3], s1[3]):
        assert (a0, b0) == (a1, b1) and np.array_equal(t0, t1)


def test_hmm_range_fault_rejects_bad_fields(world):
    system, dev, p, a, mni = world
    before = state(system, p)

    def hrf(**kw):
        fields = dict(notifier=mni, start=a, end=a + 4 * P, default_flags=HMM_PFN_REQ_FAULT)
        fields.update(kw)
        r = HmmRange(**fields)
        r.notifier_seq = mmu_interval_read_begin(mni)
        with p.mm.mmap_lock.read():
            return hmm_range_fault(r)

    for kw in (dict(hmm_pfns=[0] * 4), dict(hmm_pfns=np.zeros(4, np.int64)), dict(hmm_pfns=np.zeros(3, U)),
               dict(hmm_pfns=np.zeros((2, 2), U)), dict(start=None), dict(end=1.5), dict(start=a + 1),
               dict(end=a - P), dict(notifier=None), dict(default_flags="x"), dict(pfn_flags_mask=1 << 64)):
        assert hrf(**kw) == -errno.EINVAL, kw
    assert hmm_range_fault(None) == -errno.EINVAL
    # a flag word is an unsigned long: -1 is all ones, as a C caller's would be
    ro = np.zeros(4, U)
    assert hrf(pfn_flags_mask=-1, default_flags=0, hmm_pfns=ro) == 0
    same(before, state(system, p))


def test_migrate_vma_setup_rejects_bad_fields(world):
    system, dev, p, a, mni = world
    before = state(system, p)
    vma = p.mm.find_vma(a)
    for kw in (dict(src=[0]), dict(dst=np.zeros(1, np.int32)), dict(fault_page=1 << 40), dict(fault_page=-1),
               dict(start=None), dict(end="x"), dict(flags=1.0)):
        fields = dict(vma=vma, start=a, end=a + P)
        fields.update(kw)
        assert migrate_vma_setup(MigrateVma(**fields)) == -errno.EINVAL, kw
    for bad_vma in (None, "vma", p.mm):
        assert migrate_vma_setup(MigrateVma(bad_vma, a, a + P)) == -errno.EINVAL
    p2 = system.spawn()
    b = p2.mmap(P, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    stale = p2.mm.find_vma(b)
    p2.munmap(b, P)
    assert migrate_vma_setup(MigrateVma(stale, b, b + P)) == -errno.EINVAL   # not mapped any more
    same(before, state(system, p))


def test_migrate_device_range_rejects_pfns_that_do_not_exist(world):
    """migrate_device_range with pfn 2**40 raised IndexError; -1 wrapped to the last pfn."""
    system, dev, p, a, mni = world
    before = state(system, p)
    n = system.phys.pages.n
    src = np.zeros(4, U)
    for start, npages in ((1 << 40, 4), (-1, 4), (n - 2, 4), (0, -1), (None, 4), (0, 2.0)):
        assert migrate_device_range(system, src, start, npages) == -errno.EINVAL
    assert migrate_device_range(system, [0] * 4, 0, 4) == -errno.EINVAL
    assert migrate_device_range(system, np.zeros(2, U), 0, 4) == -errno.EINVAL
    for pfns in ([n], [-1], "x", [[1]], [1.5]):
        assert migrate_device_pfns(system, src, pfns) == -errno.EINVAL
    assert migrate_device_pages(system, [0], np.zeros(1, U), 1) == -errno.EINVAL
    assert migrate_device_finalize(system, np.zeros(1, U), np.zeros(1, U), 2) == -errno.EINVAL
    same(before, state(system, p))


def test_make_device_exclusive_checks_the_range_before_allocating(world):
    system, dev, p, a, mni = world
    before = state(system, p)
    assert make_device_exclusive_range(p.mm, a, a + (1 << 40)) == -errno.EFAULT
    assert make_device_exclusive_range(p.mm, a, (1 << 64) + a) == -errno.EINVAL
    assert make_device_exclusive_range(p.mm, None, a) == -errno.EINVAL
    assert make_device_exclusive_range(None, a, a + P) == -errno.EINVAL
    assert make_device_exclusive(p.mm, "a") == -errno.EINVAL
    same(before, state(system, p))


def test_notifier_insert_and_memremap_arguments(world):
    system, dev, p, a, mni = world
    assert mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, 0, 0, Seq()) == -errno.EOVERFLOW
    past = mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, (1 << 63) + P, 1 << 63, Seq())
    assert past == -errno.EOVERFLOW
    assert mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, None, P, Seq()) == -errno.EINVAL
    assert mmu_interval_notifier_insert(MmuIntervalNotifier(), None, 0, P, Seq()) == -errno.EINVAL
    assert mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, 0, P, object()) == -errno.EINVAL
    for n in (1 << 40, 0, -3, 2.5):
        with pytest.raises(OSError) as ei:
            memremap_pages(DevPagemap(MEMORY_DEVICE_PRIVATE, dev.ops, dev, n), system)
        assert ei.value.errno in (errno.ERANGE, errno.EINVAL)


def test_the_2017_api_checks_its_arguments(world):
    """hmm_vma_get_pfns / hmm_vma_fault / migrate_vma / hmm_mirror_register / hmm_devmem_add
    with a list where an array belongs, a stale VMA, a float size: -EINVAL (or OSError from
    hmm_devmem_add, as its ERR_PTR), never an AttributeError from inside."""
    from hmmgpu.hmm import legacy

    system, dev, p, a, mni = world
    before = state(system, p)

    class Ops:
        def sync_cpu_device_pagetables(self, mirror, update):
            pass

    mirror = legacy.HmmMirror(Ops())
    assert legacy.hmm_mirror_register(mirror, None) == -errno.EINVAL
    assert legacy.hmm_mirror_register("mirror", p.mm) == -errno.EINVAL
    assert legacy.hmm_mirror_register(mirror, p.mm) == 0
    vma = p.mm.find_vma(a)
    r = legacy.LegacyRange()
    for args in ((vma, a, a + P, [0]), (vma, a, a + P, np.zeros(1, np.int64)), (None, a, a + P, np.zeros(1, U)),
                 (vma, None, a + P, np.zeros(1, U)), (vma, a, a + 2.0 * P, np.zeros(2, U)),
                 (vma, a, a + 2 * P, np.zeros(1, U))):
        assert legacy.hmm_vma_get_pfns(args[0], r, *args[1:]) == -errno.EINVAL, args
        assert legacy.hmm_vma_fault(args[0], r, *args[1:], True) == -errno.EINVAL, args
    assert legacy.migrate_vma(None, vma, a, a + P, [0], np.zeros(1, U)) == -errno.EINVAL
    assert legacy.migrate_vma(None, vma, a, None, np.zeros(1, U), np.zeros(1, U)) == -errno.EINVAL
    for size in (None, -P, 1.5):
        with pytest.raises(OSError):
            legacy.hmm_devmem_add(Ops(), dev, size, system)
    legacy.hmm_mirror_unregister(mirror)
    same(before, state(system, p))
