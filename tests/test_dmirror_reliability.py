"""dmirror under hostile arguments, races and failures (issue 10): each test here failed before
the fix it names.  Isolation between processes and opens, acknowledged writes that must not be
lost, pages that must never stay locked, and the exact counters and protections of
lib/test_hmm.c / mm/migrate_device.c."""
import errno
import threading

import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.constants import TASK_SIZE
from hmmgpu.drivers import dmirror
from invariants import errno_of

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
U = np.uint64


@pytest.fixture(params=["private", "coherent"])
def kind(request):
    return request.param


@pytest.fixture
def system():
    return hmmgpu.System(backend="numpy", ram_bytes=16 << 20)


def no_locked_pages(system):
    return not (system.phys.pages.flags[1:] & 1).any()


# -- defect 1: isolation --------------------------------------------------------------------------

def test_another_process_cannot_read_what_a_device_read_left_behind(system, kind):
    """B's read of an address above TASK_SIZE returned cpages=1 and A's bytes: every open mapped
    one device-wide bounce buffer there.  The kernel answers EFAULT and copies nothing."""
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    A, B = system.spawn(), system.spawn()
    mA, mB = d.open(A), d.open(B)
    a = A.mmap(P, RW, ANON)
    secret = b"secret of process A".ljust(P, b"\0")
    A.write(a, secret)
    free0 = system.phys.nr_free()
    assert bytes(mA.read(a, 1).data) == secret
    for addr in (1 << 47, TASK_SIZE, TASK_SIZE - P, (1 << 64) - 2 * P):
        assert errno_of(mB.read, addr, 1) in (errno.EFAULT, errno.EINVAL)
        assert errno_of(mB.write, addr, secret) in (errno.EFAULT, errno.EINVAL)
    b = B.mmap(P, RW, ANON)
    assert not mB.read(b, 1).data.any()
    # each open has a bounce buffer of its own, mapped in its own device page table only
    assert mA.bounce.size and mB.bounce.size and not np.intersect1d(mA.bounce, mB.bounce).size
    top = np.arange(dmirror.BOUNCE_VA >> 12, (dmirror.BOUNCE_VA >> 12) + 1)
    assert (mA.pt.lookup(top) >> U(12)).astype(np.int64)[0] == mA.bounce[0]
    assert (mB.pt.lookup(top) >> U(12)).astype(np.int64)[0] == mB.bounce[0]
    mA.close()
    mB.close()
    B.munmap(b, P)
    assert system.phys.nr_free() == free0              # the buffers went back at close


def test_concurrent_reads_of_two_processes_get_their_own_bytes(system):
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    procs = [system.spawn() for _ in range(2)]
    mirrors = [d.open(p) for p in procs]
    addrs = []
    for i, p in enumerate(procs):
        a = p.mmap(8 * P, RW, ANON)
        p.write(a, np.full(8 * P, i + 1, np.uint8))
        addrs.append(a)
    bad = []

    def reader(i):
        for _ in range(3):
            for n in range(1, 9):
                r = mirrors[i].read(addrs[i], n)
                if not (r.data == i + 1).all():
                    bad.append((i, n))

    ts = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts) and not bad


# -- ioctl argument checks ------------------------------------------------------------------------

def test_ioctl_arguments_are_checked_before_anything_happens(system, kind):
    """Defect 6: negative addresses, floats and huge page counts reached NumPy (OverflowError,
    MemoryError); the C driver checks its __u64 fields and sizes its bounce buffer first."""
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"\x05" * (4 * P))
    free0 = system.phys.nr_free()
    for ioctl in (m.read, m.migrate_to_dev, m.migrate_to_sys, m.snapshot, m.exclusive, m.check_exclusive):
        assert errno_of(ioctl, -4096, 1) == errno.EINVAL               # addr + size wraps
        assert errno_of(ioctl, a, 0) == errno.EINVAL
        assert errno_of(ioctl, a, -1) == errno.EINVAL
        assert errno_of(ioctl, a + 1, 1) == errno.EINVAL
        for bad in (None, 1.5, float("inf"), "1", 1 << 64):
            assert errno_of(ioctl, a, bad) == errno.EINVAL
            assert errno_of(ioctl, bad, 1) == errno.EINVAL
    for n in (1 << 24, 1 << 30, 1 << 40):
        # buffers larger than the machine's RAM: ENOMEM before anything is allocated
        assert errno_of(m.read, a, n) == errno.ENOMEM
        assert errno_of(m.snapshot, a, n << 1) == errno.ENOMEM
        assert errno_of(m.exclusive, a, n) == errno.ENOMEM
        assert errno_of(m.migrate_to_dev, a, n) == errno.ENOMEM
    m.check_exclusive(a, 1 << 40)                    # looks where VMAs are only: nothing atomic
    assert errno_of(m.write, a, [1, 2, 3]) == errno.EINVAL
    assert errno_of(m.set_flags, None) == errno.EINVAL
    assert system.phys.nr_free() == free0 and no_locked_pages(system)
    assert (p.read(a, 4 * P) == 5).all()


def test_open_needs_a_live_process(system):
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    for bad in (None, 3, "proc", system):
        assert errno_of(d.open, bad) == errno.EINVAL
    p = system.spawn()
    p.exit()
    assert errno_of(d.open, p) == errno.ESRCH
    assert errno_of(dmirror.DMirrorDevice, system, "gpu") == errno.EINVAL
    assert errno_of(lambda: dmirror.DMirrorDevice(system, chunk_pages=-1)) == errno.EINVAL


# -- defect 4: nothing left locked ----------------------------------------------------------------

def test_exclusive_over_another_devices_coherent_page(system):
    """A private device asking for atomics on pages that live in another device's coherent
    memory raised ValueError from its page table and left both pages PG_locked with an extra
    reference.  The device cannot address that memory: the pages come to system RAM first
    (as for a read), then become exclusive; nothing stays locked, every frame comes back."""
    coh = dmirror.DMirrorDevice(system, memory="coherent", chunk_pages=16)
    prv = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p = system.spawn()
    free0 = system.phys.nr_free()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"\x05" * (2 * P))
    mc, mp = coh.open(p), prv.open(p)
    mc.migrate_to_dev(a, 2)
    r = mp.exclusive(a, 2)
    assert r.cpages == 2 and (r.data == 5).all()
    assert no_locked_pages(system)
    assert (p.pages(a, 2) >> U(12) < U(system.phys.nr_ram)).all()   # in system RAM now
    with pytest.raises(OSError) as ei:
        mp.check_exclusive(a, 2)
    assert ei.value.errno == errno.EPERM
    assert (p.read(a, 2 * P) == 5).all()
    mp.check_exclusive(a, 2)
    assert (mp.snapshot(a, 2).data == dmirror.PROT_WRITE).all()     # RAM, writable again
    mc.close()
    mp.close()
    p.exit()
    assert system.phys.nr_free() == free0 and coh.nr_allocated() == 0 and no_locked_pages(system)


def _rmap_lock_observed(system, blocked):
    """Report (``blocked``) when another thread waits for the rmap lock, if there is one."""
    phys = system.phys
    inner = getattr(phys, "rmap_lock", None)
    if inner is None:
        return

    class Observed:
        def __enter__(self):
            if not inner.acquire(blocking=False):
                blocked.set()
                inner.acquire()
            return self

        def __exit__(self, *exc):
            inner.release()
            return False

        def acquire(self, blocking=True, timeout=-1):
            return inner.acquire(blocking, timeout)

        def release(self):
            inner.release()

    phys.rmap_lock = Observed()


def test_release_racing_an_mprotect_that_splits_the_vma(system, kind, monkeypatch):
    """dmirror release() evicts device pages through the reverse map, holding no mmap_lock;
    an mprotect splitting the VMA between the rmap walk's look at the PTEs and its update left
    pages locked behind migration entries (IndexError mid-walk): memory the CPU could no longer
    read.  The split now waits for the walk (the rmap lock: anon_vma / i_mmap locks in Linux)."""
    from hmmgpu.mm import rmap

    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    a = p.mmap(8 * P, RW, ANON)
    p.write(a, np.arange(8 * P, dtype=np.uint32).view(np.uint8)[:8 * P])
    c = p.fork()                                  # the pages are mapped by two processes
    m = d.open(p)
    m.migrate_to_dev(a, 8)
    real = rmap.invalidation
    done, blocked = threading.Event(), threading.Event()
    _rmap_lock_observed(system, blocked)
    started = []

    def split_now(mm, lo, hi, event, owner=None):
        if not started and mm is p.mm:
            started.append(True)

            def split():
                p.mprotect(a + 4 * P, P, PROT_READ)
                done.set()

            threading.Thread(target=split, daemon=True).start()
            while not (done.is_set() or blocked.is_set()):
                done.wait(0.01)
        return real(mm, lo, hi, event, owner)

    monkeypatch.setattr(rmap, "invalidation", split_now)
    m.release()
    assert started and done.wait(30)
    assert no_locked_pages(system)
    want = np.arange(8 * P, dtype=np.uint32).view(np.uint8)[:8 * P]
    assert (p.read(a, 8 * P) == want).all() and (c.read(a, 8 * P) == want).all()
    assert d.nr_allocated() == 0
    m.close()
    c.exit()
    p.exit()


# -- defect 2: no acknowledged write is lost --------------------------------------------------------

def test_device_write_during_its_own_devices_migration_is_not_lost(system, kind, monkeypatch):
    """A device write acknowledged (cpages=1) between migrate_to_dev's copy and its finalize
    went to the old system page through the still-valid device mapping and was lost.  The
    migration now drops every mapping of the pages it moves before copying them, so the writer
    faults, waits for the migration entry to go, and writes the page where it now lives."""
    from hmmgpu.mm.physmem import PhysicalMemory

    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"\x01" * P)
    m = d.open(p)
    assert (m.read(a, 1).data == 1).all()               # the device maps the page, writable
    acked, waiting = threading.Event(), threading.Event()
    real_wait = PhysicalMemory.wait_unlocked

    def wait_unlocked(self, pfn, timeout=10.0):
        waiting.set()
        return real_wait(self, pfn, timeout)

    monkeypatch.setattr(PhysicalMemory, "wait_unlocked", wait_unlocked)
    real_map = dmirror.DMirror._migrate_finalize_and_map
    writer = []

    def write_meanwhile(self, args):
        if not writer:
            def write():
                assert m.write(a, b"\x02" * P).cpages == 1
                acked.set()

            writer.append(threading.Thread(target=write, daemon=True))
            writer[0].start()
            while not (acked.is_set() or waiting.is_set()):
                acked.wait(0.01)
        return real_map(self, args)

    monkeypatch.setattr(dmirror.DMirror, "_migrate_finalize_and_map", write_meanwhile)
    m.migrate_to_dev(a, 1)
    writer[0].join(30)
    assert acked.is_set()
    assert (p.read(a, P) == 2).all(), "an acknowledged device write was lost"
    assert no_locked_pages(system)
    m.close()
    p.exit()


# -- gaps the mutation campaign found -------------------------------------------------------------

def test_exclusive_entries_restore_writable(system, kind):
    """remove_device_exclusive_entry() (mm/memory.c) restores a writable entry as writable
    (maybe_mkwrite of a writable device-exclusive entry).  A make_device_exclusive that made
    every entry read-only survived the whole suite: the CPU PTE came back read-only and the
    next store took a needless fault."""
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"\x07" * (4 * P))
    m = d.open(p)
    assert m.exclusive(a, 4).cpages == 4
    ptes = p.pages(a, 4)
    assert not (ptes & U(1)).any()                          # device-exclusive entries, not present
    assert (p.read(a, 4 * P) == 7).all()                    # the CPU takes the pages back
    ptes = p.pages(a, 4)
    assert ((ptes & U(3)) == U(3)).all(), [hex(int(e)) for e in ptes]   # present AND writable
    assert (m.snapshot(a, 4).data == dmirror.PROT_WRITE).all()
    m.close()
    p.exit()


def test_migrate_to_sys_counts_only_pages_that_moved(system, kind):
    """cpages of HMM_DMIRROR_MIGRATE_TO_SYS is dmirror_successful_migrated_pages(): entries
    with MIGRATE_PFN_VALID and MIGRATE_PFN_MIGRATE after migrate_vma_pages.  Holes (pte_none),
    the zero page and pages already in system RAM are not counted; every earlier test migrated
    whole device ranges back, so a count that included holes went unnoticed."""
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    a = p.mmap(12 * P, RW, ANON)
    m = d.open(p)
    p.write(a, b"\x01" * (6 * P))                            # pages 0-5: data
    m.migrate_to_dev(a + 2 * P, 3)                          # pages 2-4 on the device
    p.read(a + 6 * P, 1)                                    # page 6: the zero page; 7-11: pte_none
    r = m.migrate_to_sys(a, 12)
    assert r.cpages == 3
    assert (p.read(a, 6 * P) == 1).all() and not p.read(a + 6 * P, 6 * P).any()
    assert m.migrate_to_sys(a, 12).cpages == 0               # nothing left on the device
    m.close()
    p.exit()


def test_read_only_pages_migrate_read_only(system, kind):
    """MIGRATE_PFN_WRITE comes from the PTE (migrate_vma_collect_pmd: pte_write), so a
    read-only page stays read-only on the device and back; only the slow hypothesis machine
    caught a collect step that marked every page writable."""
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"\x03" * (2 * P))
    p.mprotect(a, 2 * P, PROT_READ)
    m = d.open(p)
    m.migrate_to_dev(a, 2)
    local = dmirror.PROT_DEV_PRIVATE_LOCAL if kind == "private" else dmirror.PROT_DEV_COHERENT_LOCAL
    assert (m.snapshot(a, 2).data == local | dmirror.PROT_READ).all()
    # device-private: the device's own read-only entry is reported, not faulted (mm/hmm.c), and
    # dmirror_do_fault refuses the write (EFAULT); coherent: a write fault in a read-only VMA
    assert errno_of(m.write, a, b"\x04" * P) == (errno.EFAULT if kind == "private" else errno.EPERM)
    m.migrate_to_sys(a, 2)
    assert not (p.pages(a, 2) & U(2)).any()                 # back in RAM, still read-only
    assert (p.read(a, 2 * P) == 3).all()
    m.close()
    p.exit()


def test_a_cow_shared_page_stays_shared_read_only_through_migration(system, kind):
    """After fork a private page is shared read-only by parent and child.  Migrated to the
    device by the parent (both mappings follow it), a write must copy it first (COW): a
    migration that made the entry writable let the parent's device write land in the child's
    memory.  Device-private: hmm_range_fault reports the device's own read-only entry without
    faulting (mm/hmm.c) and dmirror_do_fault refuses the write with EFAULT; the CPU's write
    brings the page back and copies it.  Coherent: the write fault copies it, as for RAM."""
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"\x05" * (2 * P))
    c = p.fork()
    m = d.open(p)
    m.migrate_to_dev(a, 2)
    if kind == "private":
        assert errno_of(m.write, a, b"\x06" * (2 * P)) == errno.EFAULT
        p.write(a, b"\x06" * (2 * P))
    else:
        assert m.write(a, b"\x06" * (2 * P)).cpages == 2
    assert (p.read(a, 2 * P) == 6).all()
    assert (c.read(a, 2 * P) == 5).all(), "the parent's device write reached the child"
    m.close()
    c.exit()
    p.exit()
    assert d.nr_allocated() == 0


def test_rmap_walk_skips_a_mapping_zapped_under_it(system, kind, monkeypatch):
    """try_to_migrate() looked for the pages in each VMA, then (after starting the invalidation)
    converted what it found -- re-checking the entries against the live array itself, so the
    check was vacuous.  A child's mapping zapped in between (its exit, MADV_DONTNEED) became a
    migration entry of pfn 0: the zero page was put, freed and handed out again (every zero-page
    mapping then showed someone's data), and hmm_range_fault spun on the stray entry forever."""
    from hmmgpu import MADV_DONTNEED
    from hmmgpu.mm import rmap

    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"\x0b" * (2 * P))
    c = p.fork()
    c.read(a + P, 1)
    m = d.open(p)
    real = rmap.invalidation
    zapped = []

    def zap_first(mm, lo, hi, event, owner=None):
        if mm is c.mm and not zapped:
            zapped.append(True)
            c.madvise(a, 2 * P, MADV_DONTNEED)        # the child's mappings go meanwhile
        return real(mm, lo, hi, event, owner)

    monkeypatch.setattr(rmap, "invalidation", zap_first)
    m.migrate_to_dev(a, 2)
    assert zapped
    pg = system.phys.pages
    assert pg.refcount[0] == 1 and pg.flags[0] == 0x50, "the zero page was put"
    assert not c.pages(a, 2).any(), "the zapped entries came back as migration entries"
    assert not c.read(a, 2 * P).any() and (p.read(a, 2 * P) == 0x0B).all()
    m.close()
    c.exit()
    p.exit()


# -- races the stress test found (CI, 2026-12-02) -------------------------------------------------

def test_release_while_migrate_to_dev_takes_its_pages(system, kind, monkeypatch):
    """HMM_DMIRROR_RELEASE between alloc_pages taking free device pages off the list and
    zone_device_page_init giving them a reference saw them free, unplugged their chunk, and the
    migration died with DriverBug ("pfn ... is not device memory").  The pages now get their
    reference before the chunk lock is let go, so the release waits and then evicts them."""
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16, max_chunks=1)
    p = system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, np.repeat(np.arange(1, 5, dtype=np.uint8), P))
    m = d.open(p)
    real_init = dmirror.zone_device_page_init
    releases, failed = [], []

    def init_with_a_release_meanwhile(system_, pfns, *args):
        if not releases:
            def release():
                try:
                    m.release()
                except OSError as ex:      # EBUSY: a page still locked by the migration
                    if ex.errno != errno.EBUSY:
                        failed.append(ex)

            t = threading.Thread(target=release, daemon=True)
            t.start()
            t.join(1.0)       # fixed: blocked behind the chunk lock; before: done, chunk gone
            releases.append(t)
        return real_init(system_, pfns, *args)

    monkeypatch.setattr(dmirror, "zone_device_page_init", init_with_a_release_meanwhile)
    m.migrate_to_dev(a, 4)
    releases[0].join(30)
    assert not failed
    assert (p.read(a, 4 * P).reshape(4, P) == np.arange(1, 5, dtype=np.uint8)[:, None]).all()
    assert no_locked_pages(system)
    m.close()
    p.exit()


def test_device_segments_hotplugged_during_a_copy_are_looked_up_consistently(system):
    """A page copy groups its pfns by segment and then looks each group's segment up again;
    a chunk hotplugged in between (append, then sort) shifted the list, and the second lookup
    took the new chunk for another one: IndexError, or the wrong device frames.  Readers now
    keep the one snapshot of the segment list they searched."""
    d1 = dmirror.DMirrorDevice(system, memory="coherent", chunk_pages=16, max_chunks=2)
    d2 = dmirror.DMirrorDevice(system, memory="coherent", chunk_pages=16, max_chunks=1)
    phys = system.phys
    a = d1.chunks[0].pgmap.pfn_first
    b = d2.chunks[0].pgmap.pfn_first
    pfns = np.array([a + 3, b + 5], dtype=np.int64)
    phys.write(pfns, np.repeat(np.array([7, 9], dtype=np.uint8), P))
    groups = phys._split(pfns)
    first = next(groups)
    assert d1._allocate_chunk()          # d1's second chunk sorts between the two
    second = next(groups)
    got = [(s.base, idx.tolist()) for s, _pos, idx in (first, second)]
    assert got == [(a, [3]), (b, [5])]
    assert (phys.read(pfns)[:, 0] == [7, 9]).all()
