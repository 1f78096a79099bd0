"""Thread-safety smoke tests: several threads doing mmap / write / read / munmap / fork at once.

Every check is deterministic (each thread owns its own data); only the interleaving varies.
"""
import threading

import numpy as np

from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def run_threads(n, fn):
    errors = []
    barrier = threading.Barrier(n)

    def body(i):
        try:
            barrier.wait(30)
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "a thread hung (deadlock?)"
    assert not errors, errors


def test_threads_share_one_address_space(mm_system, mmh):
    p = mm_system.spawn()
    free0 = mmh.nr_free(mm_system)
    keep = {}

    def work(i):
        rng = np.random.default_rng(i)
        for it in range(25):
            n = int(rng.integers(1, 6))
            a = p.mmap(n * P, RW, ANON)
            data = rng.integers(0, 256, n * P, dtype=np.uint8)
            p.write(a, data)
            assert np.array_equal(p.read(a, n * P), data), (i, it)
            if it % 3 == 0:
                p.mprotect(a, P, PROT_READ)
                assert np.array_equal(p.read(a, P), data[:P])
            if it % 5 == 4:
                keep[(i, it)] = (a, data)          # left mapped, checked at the end
            else:
                p.munmap(a, n * P)

    run_threads(4, work)
    spans = sorted((v.start, v.end) for v in p.mm.vmas)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 <= s1
    for (a, data) in keep.values():
        assert np.array_equal(p.read(a, len(data)), data)
    npages = sum(len(d) // P for _, d in keep.values())
    assert mmh.nr_free(mm_system) == free0 - npages
    p.exit()
    assert mmh.nr_free(mm_system) == free0


def test_threads_on_separate_processes_with_fork(mm_system, mmh):
    free0 = mmh.nr_free(mm_system)

    def work(i):
        p = mm_system.spawn()
        a = p.mmap(8 * P, RW, ANON)
        p.write(a, np.full(8 * P, i + 1, np.uint8))
        for gen in range(5):
            c = p.fork()
            c.write(a + gen * P, np.full(P, 200 + gen, np.uint8))
            assert np.all(p.read(a, 8 * P) == i + 1)
            assert np.all(c.read(a + gen * P, P) == 200 + gen)
            c.exit()
        p.exit()

    run_threads(4, work)
    assert mmh.nr_free(mm_system) == free0


def test_threads_share_shmem_counter_pages(mm_system):
    # each thread writes its own page of one shared mapping from its own forked process
    parent = mm_system.spawn()
    a = parent.mmap(4 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    kids = [parent.fork() for _ in range(4)]

    def work(i):
        k = kids[i]
        for rep in range(20):
            k.write(a + i * P + rep, bytes([i + 1]))

    run_threads(4, work)
    got = parent.read(a, 4 * P).reshape(4, P)
    for i in range(4):
        assert np.all(got[i, :20] == i + 1) and not got[i, 20:].any()


def test_driver_mirror_stays_coherent_under_concurrent_changes(mm_system):
    """The interval-notifier protocol under real concurrency.

    A "driver" thread keeps mirroring the CPU page table of one process with
    read_begin / snapshot / (driver lock) read_retry / install, while other threads munmap,
    mmap, mprotect, madvise, fork and store (COW faults).  The invalidate callback drops mirrored
    entries under the driver lock.  When everything has stopped, every mirrored entry must
    still match the page table: a stale one means an invalidation was missed or the sequence
    protocol let a stale snapshot through.
    """
    from hmmgpu import MADV_DONTNEED, MAP_FIXED
    from hmmgpu.mm.notifier import (MmuIntervalNotifier, mmu_interval_notifier_insert,
                                    mmu_interval_read_begin, mmu_interval_read_retry,
                                    mmu_interval_set_seq)

    p = mm_system.spawn()
    base = p.mmap(64 * P, RW, ANON)
    p.write(base, np.full(64 * P, 7, np.uint8))
    lock = threading.Lock()
    mirror = {}
    stop = threading.Event()

    class Ops:
        def invalidate(self, mni, rng, cur_seq):
            with lock:
                mmu_interval_set_seq(mni, cur_seq)
                for v in [v for v in mirror if rng.start <= v < rng.end]:
                    del mirror[v]
            return True

    mni = MmuIntervalNotifier()
    mmu_interval_notifier_insert(mni, p.mm, base, 64 * P, Ops())

    def snapshot():
        snap = {}
        with p.mm.mmap_lock.read():
            for v in p.mm.vmas:
                if v.end <= base or v.start >= base + 64 * P:
                    continue
                pte = np.asarray(v.pte, np.uint64).copy()
                for i in np.nonzero(pte & np.uint64(1))[0].tolist():
                    snap[v.start + i * P] = int(pte[i]) & ~0xFFC   # pfn | write | present
        return snap

    installs = [0]
    stale = []

    def driver(_):
        while not stop.is_set():
            seq = mmu_interval_read_begin(mni)
            snap = snapshot()
            with lock:
                if mmu_interval_read_retry(mni, seq):
                    continue
                # Entries that survived every invalidation since they were installed must match
                # a snapshot the protocol just validated: a PTE changes only after its
                # invalidate callback ran, and that callback drops the entry under this lock.
                for a, e in mirror.items():
                    if snap.get(a) != e:
                        stale.append((hex(a), hex(e), snap.get(a) and hex(snap.get(a))))
                mirror.clear()
                mirror.update(snap)
                installs[0] += 1

    def mutator(i):
        rng = np.random.default_rng(100 + i)
        kids = []
        for it in range(60):
            pg = int(rng.integers(0, 60))
            a = base + pg * P
            op = int(rng.integers(0, 6))
            if op == 0:
                p.munmap(a, 2 * P)
                p.mmap(2 * P, RW, ANON | MAP_FIXED, addr=a)
            elif op == 1:
                p.mprotect(a, 2 * P, PROT_READ)
                p.mprotect(a, 2 * P, RW)
            elif op == 2:
                p.madvise(a, 2 * P, MADV_DONTNEED)
            elif op == 3:
                kids.append(p.fork())
            else:
                p.write(a, np.full(2 * P, it & 0xFF, np.uint8))
        for k in kids:
            k.exit()

    remaining = [2]
    mlock = threading.Lock()

    def body2(i):
        if i == 0:
            return driver(i)
        try:
            mutator(i)
        finally:
            with mlock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    stop.set()

    run_threads(3, body2)
    # quiescent now: a final install must succeed at once, and every entry must be current
    with lock:
        now = snapshot()
        stale.extend((hex(a), hex(e), now.get(a)) for a, e in mirror.items() if now.get(a) != e)
    assert not stale, f"{len(stale)} stale mirrored PTEs (addr, mirrored, now), e.g. {stale[:3]}"
    seq = mmu_interval_read_begin(mni)
    with lock:
        assert not mmu_interval_read_retry(mni, seq)
    assert installs[0] > 0
