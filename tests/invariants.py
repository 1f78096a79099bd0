"""One checker of what the emulated kernel must keep true, for every test that drives it.

``check_system(system, ...)`` looks at the whole machine -- every live process's VMAs and PTEs,
struct page, the page caches, the memory cgroups, the frame allocator, each dmirror device's
frames and each open mirror's device page table -- and raises AssertionError naming the first
thing that disagrees.  The state machines (test_mm_stateful.py, test_hmm_stateful.py), the fuzz
suite and the stress suite all call it, each adding only the checks of its own model.

What it checks (``quiescent``: no call is in flight, so no migration entry, page lock, held
mmap_lock or running invalidation may remain):

* layout: VMAs sorted, disjoint, page aligned, one PTE per page, found by find_vma;
* PTEs: every entry present or of a known swap type, its pfn in a frame that exists and of the
  right kind (device-private entries on device-private pages, present ones never on them), the
  zero page never writable, a writable private entry on an anonymous page mapped once;
* struct page: mapcount = the entries that map the page (present, device-private, exclusive),
  pincount >= 0 (= the given pins when they are given), and
  refcount = mapcount + 1 if in a page cache + pincount + the driver's own references
  (dmirror bounce buffers), for RAM and device pages alike; a page cache maps each index once;
* rss: each process's anon / file / shmem counters = its mapped pages by kind;
* memcg: each group's usage = the live pages charged to it; free frames are uncharged;
* free frames: the allocator's count = RAM minus the pages in use, no free frame referenced;
* device frames: each dmirror device's allocated count = its pages in use, its free list free;
* mirrors: each open dmirror's device page table maps only what the CPU maps (same pfn,
  writable only where the CPU entry is), and nothing below TASK_SIZE outside a VMA.
"""
import numpy as np
import pytest

from hmmgpu.constants import HPAGE_PMD_NR, PAGE_SHIFT, TASK_SIZE
from hmmgpu.mm import pgtable as pt
from hmmgpu.mm.physmem import PG_ANON, PG_HUGETLB, PG_LOCKED, PG_SWAPBACKED

U = np.uint64


def errno_of(fn, *a):
    """The errno of the OSError that ``fn(*a)`` must raise."""
    with pytest.raises(OSError) as ei:
        fn(*a)
    return ei.value.errno


def _zero_pages(phys, n):
    """A mask over the pfn space of the zero pages (the zero page and the huge zero folio),
    which read faults map without a reference or a mapcount."""
    pfns = np.arange(n, dtype=np.int64)
    return phys.zero_mask(pfns) if hasattr(phys, "zero_mask") else pfns == phys.zero_pfn


def live_processes(system):
    return [p for p in list(system.processes) if p.alive]


def check_system(system, pins=None, devices=(), quiescent=True):
    """Raise AssertionError at the first broken invariant (see the module docstring)."""
    phys = system.phys
    pg = phys.pages
    n = pg.n
    procs = live_processes(system)
    maps = np.zeros(n, np.int64)
    for proc in procs:
        _check_layout(proc)
        maps += _check_ptes(system, proc, quiescent)
    cached = np.zeros(n, np.int64)
    for cache in list(system.caches.values()):
        pf = np.asarray(cache.pfn_of)
        idx = np.nonzero(pf >= 0)[0]
        assert (pg.mapping[pf[idx]] == cache.id).all(), f"{cache!r}: a cached page names another mapping"
        assert (pg.index[pf[idx]] == idx).all(), f"{cache!r}: a cached page has the wrong index"
        np.add.at(cached, pf[idx], 1)
    assert cached.max(initial=0) <= 1, "a frame is in two page caches"
    driver = np.zeros(n, np.int64)
    for d in devices:
        for m in list(d.mirrors):
            np.add.at(driver, np.asarray(getattr(m, "bounce", ()), np.int64), 1)
    zero = _zero_pages(phys, n)
    mc = pg.mapcount.astype(np.int64)
    bad = np.nonzero((mc != maps) & ~zero)[0]
    assert bad.size == 0, (f"mapcount of pfn {bad[:4].tolist()} is {mc[bad[:4]].tolist()}, "
                           f"but {maps[bad[:4]].tolist()} entries map them")
    pc = pg.pincount.astype(np.int64)
    assert (pc >= 0).all(), f"negative pincount on pfn {np.nonzero(pc < 0)[0][:4].tolist()}"
    if pins is not None:
        want = np.zeros(n, np.int64)
        for pin in pins:
            if pin.active:
                np.add.at(want, np.asarray(pin.pfns, np.int64), 1)
        bad = np.nonzero(pc != want)[0]
        assert bad.size == 0, (f"pincount of pfn {bad[:4].tolist()} is {pc[bad[:4]].tolist()}, "
                               f"pins {want[bad[:4]].tolist()}")
    rc = pg.refcount.astype(np.int64)
    expect = maps + cached + pc + driver
    expect[zero] = rc[zero]
    bad = np.nonzero(rc != expect)[0]
    assert bad.size == 0, (
        f"refcount of pfn {bad[:4].tolist()} is {rc[bad[:4]].tolist()}, expected {expect[bad[:4]].tolist()} "
        f"(mapped {maps[bad[:4]].tolist()}, cached {cached[bad[:4]].tolist()}, pinned {pc[bad[:4]].tolist()}, "
        f"driver {driver[bad[:4]].tolist()})")
    _check_memcgs(system)
    _check_allocator(system)
    if quiescent:
        locked = np.nonzero((pg.flags & PG_LOCKED) != 0)[0]
        assert locked.size == 0, f"pfn {locked[:4].tolist()} left PG_locked"
        for proc in procs:
            _check_idle(proc.mm)
    for d in devices:
        _check_device(system, d)
        for m in list(d.mirrors):
            if not m.closed:
                check_mirror(m)


def _check_layout(proc):
    mm = proc.mm
    prev_end = 0
    for v in mm.vmas:
        assert v.start % 4096 == 0 and v.end % 4096 == 0 and v.start < v.end, f"pid {proc.pid}: {v!r}"
        assert v.start >= prev_end, f"pid {proc.pid}: {v!r} overlaps the VMA before it"
        assert v.end <= TASK_SIZE, f"pid {proc.pid}: {v!r} beyond TASK_SIZE"
        assert len(v.pte) == v.npages, f"pid {proc.pid}: {v!r} has {len(v.pte)} PTEs"
        assert mm.find_vma(v.start) is v and mm.find_vma(v.end - 1) is v, f"pid {proc.pid}: find_vma misses {v!r}"
        prev_end = v.end


def _check_ptes(system, proc, quiescent):
    """Check ``proc``'s entries; return how many entries map each pfn (and check its rss).
    One vectorised pass over all its VMAs' entries; a failure names the VMA."""
    phys = system.phys
    pg = phys.pages
    n = pg.n
    vmas = list(proc.mm.vmas)
    rss = {"anon": 0, "file": 0, "shmem": 0}
    if not vmas:
        assert proc.rss == rss, f"pid {proc.pid}: rss {proc.rss} with nothing mapped"
        return np.zeros(n, np.int64)
    sizes = [v.npages for v in vmas]
    ptes = np.concatenate([np.asarray(v.pte, U) for v in vmas])
    owner = np.repeat(np.arange(len(vmas)), sizes)
    cow = np.array([v.cow for v in vmas])[owner]
    live = np.nonzero(ptes != 0)[0]
    e, cow, owner = ptes[live], cow[live], owner[live]

    def where(bad):
        k = int(np.nonzero(bad)[0][0])
        v = vmas[int(owner[k])]
        return f"pid {proc.pid} {v!r} at 0x{v.start + ((int(live[k]) - sum(sizes[:int(owner[k])])) << 12):x}"

    pfn = pt.pte_pfn(e)
    present = pt.pte_present(e)
    t = pt.swp_type(e)
    bad = ~present & ((t < pt.SWP_DEVICE_PRIVATE_READ) | (t > pt.SWP_MIGRATION_WRITE))
    assert not bad.any(), f"{where(bad)}: a non-present entry of no known type"
    assert not (pfn >= n).any(), f"{where(pfn >= n)}: an entry points past the last pfn"
    mig = ~present & ((t == pt.SWP_MIGRATION_READ) | (t == pt.SWP_MIGRATION_WRITE))
    if quiescent:
        assert not mig.any(), f"{where(mig)}: a migration entry outlived its migration"
    devp = ~present & ((t == pt.SWP_DEVICE_PRIVATE_READ) | (t == pt.SWP_DEVICE_PRIVATE_WRITE))
    priv = np.zeros(pfn.size, bool)
    dev = pfn >= phys.nr_ram
    if dev.any():
        private_type = np.array([getattr(p, "type", 0) == 1 if p is not None else False
                                 for p in phys.pgmaps] + [False])
        priv[dev] = private_type[pg.pgmap[pfn[dev]]]
    assert not (devp & ~priv).any(), f"{where(devp & ~priv)}: a device-private entry on a page that is not"
    bad = priv & ~devp & ~mig
    assert not bad.any(), f"{where(bad)}: a device-private page mapped by another entry"
    w = present & ((e & pt.PTE_WRITE) != 0)
    z = _zero_pages(phys, n)[pfn]
    bad = w & z
    assert not bad.any(), f"{where(bad)}: the zero page mapped writable"
    counted = ~(present & ((e & pt.PTE_SPECIAL) != 0)) & ~z
    wc = w & cow & counted
    bad = wc & ((pg.flags[pfn] & PG_ANON) == 0)
    assert not bad.any(), f"{where(bad)}: a writable private entry on a non-anon page"
    bad = wc & (pg.mapcount[pfn] != 1)
    assert not bad.any(), f"{where(bad)}: a writable private entry on a shared page"
    fl = pg.flags[pfn[counted]]
    fl = fl[(fl & PG_HUGETLB) == 0]           # hugetlb pages are HugetlbPages, not rss
    anon = (fl & PG_ANON) != 0
    shmem = ~anon & ((fl & PG_SWAPBACKED) != 0)
    rss = {"anon": int(anon.sum()), "file": int((~anon & ~shmem).sum()), "shmem": int(shmem.sum())}
    assert proc.rss == rss, f"pid {proc.pid}: rss {proc.rss}, but its entries say {rss}"
    return np.bincount(pfn[counted & ~mig], minlength=n)


def _check_memcgs(system):
    pg = system.phys.pages
    live = pg.refcount > 0
    for cg in list(system.memcgs):
        charged = int((live & (pg.memcg == cg.id)).sum())
        assert cg.pages == charged, f"{cg!r}: {cg.pages} pages charged, {charged} live pages say so"
    n = system.phys.nr_ram
    free = np.nonzero(~live[:n] & (pg.memcg[:n] >= 0) & ~_zero_pages(system.phys, n)[:n])[0]
    assert free.size == 0, f"free frame(s) {free[:4].tolist()} still charged to a memcg"


def _check_allocator(system):
    phys = system.phys
    n = phys.nr_ram
    rc = phys.pages.refcount[:n]
    in_use = int((rc[1:] > 0).sum())
    # the hugetlbfs pool holds its free huge pages (refcount 0) outside the allocator
    pool = phys.hugetlb.nr_free() * HPAGE_PMD_NR if phys.hugetlb is not None else 0
    assert phys.nr_free() + pool == n - 1 - in_use, (
        f"the allocator has {phys.nr_free()} free frames and the hugetlbfs pool {pool}, "
        f"the refcounts say {n - 1 - in_use}")
    stack = phys._free[:phys._nfree]
    if getattr(phys, "_nblocks", 0):                  # whole 2 MiB blocks kept aside
        stack = np.concatenate((stack, phys.folio_pages(phys._blocks[:phys._nblocks])))
    assert np.bincount(stack, minlength=n).max(initial=0) <= 1, "a frame is on the free list twice"
    assert (rc[stack] == 0).all(), "a frame on the free list is referenced"


def _check_idle(mm):
    lock = mm.mmap_lock
    assert lock._writer is None and not lock._readers, f"{mm!r}: mmap_lock still held"
    subs = mm.notifiers
    assert subs.active_invalidate_ranges == 0 and subs.invalidate_seq % 2 == 0, (
        f"{mm!r}: an invalidation never ended")


def _check_device(system, d):
    """A dmirror device: calloc - cfree = its pages in use, its free list free and disjoint."""
    pg = system.phys.pages
    used = 0
    for c in d.chunks:
        rc = pg.refcount[c.pgmap.pfn_first:c.pgmap.pfn_last]
        used += int((rc > 0).sum())
    assert d.nr_allocated() == used, f"{d!r}: {d.nr_allocated()} pages allocated, {used} in use"
    free = d._free.pages() if hasattr(d._free, "pages") else np.asarray(d._free, np.int64)
    folios = getattr(d, "_free_folios", None)
    if folios is not None and folios.n:                 # free 2 MiB device folios, by head
        free = np.concatenate((free, system.phys.folio_pages(folios.pages())))
    assert np.bincount(free).max(initial=0) <= 1, f"{d!r}: a page on the free list twice"
    assert (pg.refcount[free] == 0).all(), f"{d!r}: a page on the free list is referenced"
    assert free.size + used == len(d.chunks) * d.chunk_pages, (
        f"{d!r}: {free.size} free + {used} used pages in {len(d.chunks)} chunks of {d.chunk_pages}")


def check_mirror(m):
    """An open dmirror's device page table maps nothing the CPU page table does not."""
    from hmmgpu.drivers.dmirror import DPT_VALID, DPT_WRITE
    mm = m.mm
    vpt = m.pt
    starts, lengths = vpt._range_runs(0, TASK_SIZE >> PAGE_SHIFT)
    covered = 0
    for s, k in zip(starts.tolist(), lengths.tolist()):
        ent = vpt.lookup(np.arange(s, s + k, dtype=np.int64))
        live = np.nonzero((ent & U(DPT_VALID)) != 0)[0]
        if live.size == 0:
            continue
        vpns = s + live
        cpu = np.zeros(live.size, U)
        inside = np.zeros(live.size, bool)
        addrs = vpns << PAGE_SHIFT
        for v in mm.vmas_in(int(addrs[0]), int(addrs[-1]) + 4096):
            sel = (addrs >= v.start) & (addrs < v.end)
            cpu[sel] = np.asarray(v.pte, U)[(addrs[sel] - v.start) >> PAGE_SHIFT]
            inside |= sel
        where = f"{m!r}"
        assert m.proc.alive, f"{where}: the device still maps 0x{int(addrs[0]):x} of an exited process"
        assert inside.all(), f"{where}: the device maps 0x{int(addrs[~inside][0]):x}, where the CPU maps nothing"
        e = ent[live]
        assert (cpu != 0).all(), (f"{where}: the device maps 0x{int(addrs[cpu == 0][0]):x}, "
                                  "where the CPU PTE is empty")
        same = pt.pte_pfn(cpu) == (e >> U(12)).astype(np.int64)
        assert same.all(), f"{where}: the device maps another page at 0x{int(addrs[~same][0]):x}"
        w = (e & U(DPT_WRITE)) != 0
        cw = pt.pte_write(cpu) | pt.is_writable_swp(cpu)
        assert cw[w].all(), f"{where}: the device may write 0x{int(addrs[w & ~cw][0]):x}, the CPU may not"
        covered += live.size
    return covered
