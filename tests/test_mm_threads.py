"""Thread-safety smoke tests: several threads doing mmap / write / read / munmap / fork at once.

Every check is deterministic (each thread owns its own data); only the interleaving varies.
"""
import sys
import threading
import time
import traceback

import numpy as np

from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def run_threads(n, fn, timeout=60):
    errors = []
    barrier = threading.Barrier(n)

    def body(i):
        try:
            barrier.wait(30)
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    # daemon threads and one overall deadline: a deadlock fails the test instead of hanging the run
    ts = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + timeout
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t for t in ts if t.is_alive()]
    if hung:
        frames = sys._current_frames()
        where = "".join("".join(traceback.format_stack(frames[t.ident])[-4:]) for t in hung if t.ident in frames)
        raise AssertionError(f"{len(hung)} of {n} threads still running after {timeout} s (deadlock?):\n{where}")
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

    def still_valid(mirrored, now):
        # a PTE may gain write permission without an invalidation (a write fault reusing the
        # page); it may not lose it, change pfn or go away without one
        if now is None or now >> 12 != mirrored >> 12:
            return False
        return not (mirrored & 2) or bool(now & 2)

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
                    if not still_valid(e, snap.get(a)):
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
        stale.extend((hex(a), hex(e), now.get(a)) for a, e in mirror.items() if not still_valid(e, now.get(a)))
    assert not stale, f"{len(stale)} stale mirrored PTEs (addr, mirrored, now), e.g. {stale[:3]}"
    seq = mmu_interval_read_begin(mni)
    with lock:
        assert not mmu_interval_read_retry(mni, seq)
    assert installs[0] > 0


def test_oom_kill_of_a_process_busy_in_another_thread(mm_system_factory, mmh):
    """The OOM killer picks a victim that is in the middle of a system call on another thread.

    Deterministic schedule: B's thread is inside madvise(MADV_DONTNEED) (holding B's mmap_lock
    for reading), parked in an mmu-notifier callback (callbacks may sleep).  A's thread then
    runs the machine out of memory; B has the largest rss and is chosen.  Once the killer is
    waiting for B, B's callback returns and B's madvise goes on to zap its page tables.
    Linux never makes the allocating task wait for the victim's mmap_lock while it holds
    allocator locks (the victim dies by itself; the OOM reaper only trylocks), so both threads
    must finish: A's store succeeds, B ends up dead, and no frame is lost.
    """
    import hmmgpu
    from hmmgpu import MADV_DONTNEED
    from hmmgpu.mm.notifier import MmuIntervalNotifier, mmu_interval_notifier_insert, mmu_interval_set_seq

    system = mm_system_factory(ram_bytes=256 * P)
    free0 = mmh.nr_free(system)
    a_proc, b_proc = system.spawn(), system.spawn()
    b = b_proc.mmap(150 * P, RW, ANON)
    b_proc.write(b, np.full(150 * P, 2, np.uint8))
    entered, release = threading.Event(), threading.Event()

    class Parked:
        def invalidate(self, mni, rng, cur_seq):
            mmu_interval_set_seq(mni, cur_seq)
            if not entered.is_set():
                entered.set()
                release.wait(60)
            return True

    mmu_interval_notifier_insert(MmuIntervalNotifier(), b_proc.mm, b, P, Parked())
    a = a_proc.mmap(120 * P, RW, ANON)
    result = {}

    def b_thread():
        try:
            b_proc.madvise(b, P, MADV_DONTNEED)
            result["b"] = "returned"
        except hmmgpu.ProcessKilled:
            result["b"] = "killed"

    def a_thread():
        a_proc.write(a, np.full(120 * P, 1, np.uint8))
        result["a"] = "stored"

    tb = threading.Thread(target=b_thread, daemon=True)
    tb.start()
    assert entered.wait(30)
    ta = threading.Thread(target=a_thread, daemon=True)
    ta.start()
    # let the killer reach B (waiting for B's mmap_lock, or done without it); then unpark B
    lock = b_proc.mm.mmap_lock
    for _ in range(300):
        if not ta.is_alive() or getattr(lock, "_waiting_writers", 1):
            break
        ta.join(0.01)
    release.set()
    ta.join(15)
    tb.join(15)
    assert not ta.is_alive() and not tb.is_alive(), (
        "deadlock: the OOM killer waits for the victim's mmap_lock while holding the allocator's "
        "lock, and the victim waits for that lock to finish its madvise")
    assert result.get("a") == "stored"
    assert not b_proc.alive and a_proc.alive
    assert np.all(a_proc.read(a, 120 * P) == 1)
    a_proc.exit()
    assert mmh.nr_free(system) == free0


def test_store_racing_a_zap_leaves_no_garbage_entry(mm_system, monkeypatch):
    """The cause of a rare IndexError in the mirror test above, replayed deterministically.

    A store to present, writable pages only marks them dirty; MADV_DONTNEED (which holds
    mmap_lock for reading too) may zap those pages between the fault's look at the PTEs and
    that marking.  Marking must then leave the zapped entries empty: OR-ing DIRTY|YOUNG into a
    cleared PTE made a non-present entry of no known type, which the retried fault took for a
    device-private entry of a pgmap that does not exist.
    """
    from hmmgpu import MADV_DONTNEED
    from hmmgpu.mm.mm import MM

    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, np.full(2 * P, 1, np.uint8))
    mark = MM._mark_dirty
    raced = []

    def zap_first(self, vma, i0, i1):
        if not raced:
            raced.append(True)
            p.madvise(a, 2 * P, MADV_DONTNEED)      # the other thread's zap lands here
        return mark(self, vma, i0, i1)

    monkeypatch.setattr(MM, "_mark_dirty", zap_first)
    p.write(a, np.full(2 * P, 9, np.uint8))
    assert raced
    assert [int(e) & 0xFFF for e in p.pages(a, 2)] == [0xF, 0xF]   # present, write, dirty, young
    assert (p.read(a, 2 * P) == 9).all()
