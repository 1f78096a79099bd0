"""mmu notifiers (mm/mmu_notifier.c): which event every page-table change fires, over which range,
and the interval notifier sequence protocol (read_begin / read_retry / set_seq)."""
import threading

import numpy as np
import pytest

from hmmgpu import (
    MADV_DONTNEED,
    MADV_FREE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_MAYMOVE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from hmmgpu.mm import notifier as N
from hmmgpu.mm.notifier import (
    MMU_NOTIFY_CLEAR,
    MMU_NOTIFY_EXCLUSIVE,
    MMU_NOTIFY_MIGRATE,
    MMU_NOTIFY_PROTECTION_PAGE,
    MMU_NOTIFY_PROTECTION_VMA,
    MMU_NOTIFY_RELEASE,
    MMU_NOTIFY_SOFT_DIRTY,
    MMU_NOTIFY_UNMAP,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
)

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def new_mni():
    cls = getattr(N, "MmuIntervalNotifier", None)
    return cls() if cls is not None else type("Mni", (), {})()


class Recorder:
    """A driver-like interval subscriber: records every invalidation and follows the protocol
    (set_seq under the driver lock)."""

    def __init__(self, proc, start, length):
        self.lock = threading.Lock()
        self.events = []
        self.mni = new_mni()
        assert mmu_interval_notifier_insert(self.mni, proc.mm, start, length, self) in (0, None)

    def invalidate(self, mni, range, cur_seq):
        assert mni is self.mni
        with self.lock:
            mmu_interval_set_seq(mni, cur_seq)
            self.events.append((range.event, range.start, range.end))
        return True

    def take(self):
        ev, self.events = self.events, []
        return ev

    def remove(self):
        mmu_interval_notifier_remove(self.mni)


def everything(proc):
    """A subscriber over the whole user address space."""
    return Recorder(proc, 0x10000, (1 << 47) - 0x10000)


def covers(events, event, start, end):
    """The union of ``event`` ranges covers [start, end)."""
    need = np.zeros((end - start) // P, bool)
    for e, s, t in events:
        if e != event:
            continue
        lo, hi = max(s, start), min(t, end)
        if lo < hi:
            need[(lo - start) // P:(hi - start + P - 1) // P] = True
    return bool(need.all())


def test_event_values_are_the_kernels():
    assert (MMU_NOTIFY_UNMAP, MMU_NOTIFY_CLEAR, MMU_NOTIFY_PROTECTION_VMA, MMU_NOTIFY_PROTECTION_PAGE,
            MMU_NOTIFY_SOFT_DIRTY, MMU_NOTIFY_RELEASE, MMU_NOTIFY_MIGRATE, MMU_NOTIFY_EXCLUSIVE) == tuple(range(8))


def test_mmap_and_faults_on_fresh_memory_fire_nothing(mm_system):
    p = mm_system.spawn()
    r = everything(p)
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"x" * (2 * P))       # pte_none -> present: no invalidation needed
    assert r.take() == []


def test_munmap_fires_unmap_over_exact_range(mm_system):
    p = mm_system.spawn()
    a = p.mmap(8 * P, RW, ANON)
    p.write(a, b"x" * (8 * P))
    r = everything(p)
    p.munmap(a + 2 * P, 3 * P)
    ev = r.take()
    assert ev, "munmap fired no invalidation"
    assert all(e == MMU_NOTIFY_UNMAP for e, _, _ in ev), ev
    assert covers(ev, MMU_NOTIFY_UNMAP, a + 2 * P, a + 5 * P)
    assert all(s >= a + 2 * P and t <= a + 5 * P for _, s, t in ev), f"range too wide: {ev}"


def test_interval_outside_the_change_hears_nothing(mm_system):
    p = mm_system.spawn()
    a = p.mmap(8 * P, RW, ANON)
    p.write(a, b"x" * (8 * P))
    left = Recorder(p, a, 2 * P)
    right = Recorder(p, a + 6 * P, 2 * P)
    edge = Recorder(p, a + P, 2 * P)          # overlaps the change by one page
    p.munmap(a + 2 * P, 4 * P)
    assert left.take() == []
    assert right.take() == []
    assert [e for e, _, _ in edge.take()] == [MMU_NOTIFY_UNMAP]


def test_mprotect_fires_protection_vma(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"x" * (4 * P))
    r = everything(p)
    p.mprotect(a + P, 2 * P, PROT_READ)
    ev = r.take()
    assert ev and all(e == MMU_NOTIFY_PROTECTION_VMA for e, _, _ in ev), ev
    assert covers(ev, MMU_NOTIFY_PROTECTION_VMA, a + P, a + 3 * P)
    assert all(s >= a + P and t <= a + 3 * P for _, s, t in ev), ev


@pytest.mark.parametrize("advice", [MADV_DONTNEED, MADV_FREE])
def test_madvise_fires_clear(mm_system, advice):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"x" * (4 * P))
    r = everything(p)
    p.madvise(a + P, 2 * P, advice)
    ev = r.take()
    assert ev and all(e == MMU_NOTIFY_CLEAR for e, _, _ in ev), ev
    assert covers(ev, MMU_NOTIFY_CLEAR, a + P, a + 3 * P)
    assert all(s >= a + P and t <= a + 3 * P for _, s, t in ev), ev


def test_exit_fires_release_first(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"x" * (4 * P))
    r = Recorder(p, a, 4 * P)
    p.exit()
    ev = r.take()
    assert ev and ev[0][0] == MMU_NOTIFY_RELEASE, ev
    assert ev[0][1] <= a and ev[0][2] >= a + 4 * P
    assert set(e for e, _, _ in ev) <= {MMU_NOTIFY_RELEASE, MMU_NOTIFY_UNMAP}


def test_fork_write_protects_parent_with_protection_page(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"x" * (4 * P))
    r = everything(p)
    c = p.fork()
    ev = r.take()
    assert ev and all(e == MMU_NOTIFY_PROTECTION_PAGE for e, _, _ in ev), ev
    assert covers(ev, MMU_NOTIFY_PROTECTION_PAGE, a, a + 4 * P)
    assert c.alive


def test_fork_of_shared_mapping_does_not_invalidate_parent(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(a, b"x" * (4 * P))
    r = everything(p)
    p.fork()
    assert r.take() == [], "a shared mapping keeps its PTEs writable across fork"


def test_cow_fault_invalidates_the_old_pte(mm_system):
    # wp_page_copy(): the PTE changes pfn, so mirrors of the old page must hear CLEAR
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"x" * (4 * P))
    c = p.fork()
    r = everything(p)
    p.write(a + 2 * P + 5, b"y")
    ev = r.take()
    assert ev and all(e == MMU_NOTIFY_CLEAR for e, _, _ in ev), ev
    assert covers(ev, MMU_NOTIFY_CLEAR, a + 2 * P, a + 3 * P)
    assert all(s >= a + 2 * P and t <= a + 3 * P for _, s, t in ev), ev
    assert c.alive


def test_write_over_zero_page_invalidates(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.read(a, 2 * P)
    r = everything(p)
    p.write(a + P, b"z")
    ev = r.take()
    assert covers(ev, MMU_NOTIFY_CLEAR, a + P, a + 2 * P), ev
    assert all(s >= a + P and t <= a + 2 * P for _, s, t in ev), ev


def test_mremap_move_fires_unmap_on_old_range(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"x" * (2 * P))
    p.mmap(P, RW, ANON | 0x10, addr=a + 2 * P)     # MAP_FIXED blocker: forces a move
    r = Recorder(p, a, 2 * P)
    n = p.mremap(a, 2 * P, 4 * P, MREMAP_MAYMOVE)
    assert n != a
    ev = r.take()
    assert ev and all(e == MMU_NOTIFY_UNMAP for e, _, _ in ev), ev
    assert covers(ev, MMU_NOTIFY_UNMAP, a, a + 2 * P)


def test_file_dontneed_and_munmap_events_for_file_mappings(mm_system, mm_file):
    fd = mm_file(b"f" * (4 * P))
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, MAP_SHARED, fd=fd)
    p.read(a, 4 * P)
    r = everything(p)
    p.madvise(a, P, MADV_DONTNEED)
    p.munmap(a + 2 * P, 2 * P)
    ev = r.take()
    assert covers(ev, MMU_NOTIFY_CLEAR, a, a + P)
    assert covers(ev, MMU_NOTIFY_UNMAP, a + 2 * P, a + 4 * P)


def test_every_process_hears_only_its_own_mm(mm_system):
    p = mm_system.spawn()
    q = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    b = q.mmap(2 * P, RW, ANON, addr=a)
    assert b == a
    p.write(a, b"x" * (2 * P))
    q.write(b, b"y" * (2 * P))
    rp, rq = everything(p), everything(q)
    p.munmap(a, 2 * P)
    assert rp.take() and rq.take() == []


def test_removed_notifier_hears_nothing(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"x" * (2 * P))
    r = everything(p)
    r.remove()
    p.munmap(a, 2 * P)
    assert r.take() == []


# ---------------------------------------------------------------------------------------------
# the sequence protocol
# ---------------------------------------------------------------------------------------------

def test_read_retry_after_invalidation(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"x" * (4 * P))
    r = Recorder(p, a, 4 * P)
    seq = mmu_interval_read_begin(r.mni)
    with r.lock:
        assert not mmu_interval_read_retry(r.mni, seq), "nothing happened: no retry"
    p.madvise(a, P, MADV_DONTNEED)
    with r.lock:
        assert mmu_interval_read_retry(r.mni, seq), "an invalidation in between must force a retry"
    seq2 = mmu_interval_read_begin(r.mni)
    assert seq2 != seq
    with r.lock:
        assert not mmu_interval_read_retry(r.mni, seq2)


def test_unrelated_invalidation_does_not_force_retry(mm_system):
    p = mm_system.spawn()
    a = p.mmap(8 * P, RW, ANON)
    p.write(a, b"x" * (8 * P))
    r = Recorder(p, a, 2 * P)
    seq = mmu_interval_read_begin(r.mni)
    p.munmap(a + 4 * P, 4 * P)
    with r.lock:
        assert not mmu_interval_read_retry(r.mni, seq)


def test_read_begin_waits_for_running_invalidation(mm_system):
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"x" * (4 * P))
    entered, release = threading.Event(), threading.Event()

    class Blocking(Recorder):
        def invalidate(self, mni, range, cur_seq):
            ok = super().invalidate(mni, range, cur_seq)
            entered.set()
            release.wait(30)
            return ok

    r = Blocking(p, a, 4 * P)
    t = threading.Thread(target=p.madvise, args=(a, P, MADV_DONTNEED))
    t.start()
    assert entered.wait(30)
    got = []
    reader = threading.Thread(target=lambda: got.append(mmu_interval_read_begin(r.mni)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive(), "read_begin returned while the invalidation was still running"
    release.set()
    t.join(30)
    reader.join(30)
    assert not reader.is_alive() and len(got) == 1
    with r.lock:
        assert not mmu_interval_read_retry(r.mni, got[0]), "the seq after the invalidation is valid"


def test_stale_seq_protocol_simulated_driver(mm_system):
    """A driver loop: begin, snapshot the CPU page, invalidation races in, retry sees it."""
    p = mm_system.spawn()
    a = p.mmap(P, RW, ANON)
    p.write(a, b"v1")
    r = Recorder(p, a, P)
    installs = []
    for attempt in range(3):
        seq = mmu_interval_read_begin(r.mni)
        snap = bytes(p.read(a, 2))
        if attempt == 0:
            p.madvise(a, P, MADV_DONTNEED)   # races in before the driver takes its lock
        with r.lock:
            if mmu_interval_read_retry(r.mni, seq):
                continue
            installs.append(snap)
            break
    assert installs == [b"\0\0"], "the driver must install the post-invalidation view only"


def test_insert_returns_zero_and_remove(mm_system):
    p = mm_system.spawn()
    mni = new_mni()

    class Ops:
        def invalidate(self, mni, range, cur_seq):
            mmu_interval_set_seq(mni, cur_seq)
            return True

    assert mmu_interval_notifier_insert(mni, p.mm, 0x10000, P, Ops()) in (0, None)
    mmu_interval_notifier_remove(mni)


def test_insert_during_an_invalidation_makes_read_begin_wait(mm_system):
    # mmu_interval_notifier_insert() while an invalidation runs: the new subscription may have
    # missed its start, so its first read_begin must wait for it to end (mm/mmu_notifier.c:
    # __mmu_interval_notifier_insert sets invalidate_seq to the odd in-flight sequence)
    p = mm_system.spawn()
    a = p.mmap(4 * P, RW, ANON)
    p.write(a, b"x" * (4 * P))
    entered, release = threading.Event(), threading.Event()

    class Parked(Recorder):
        def invalidate(self, mni, range, cur_seq):
            ok = super().invalidate(mni, range, cur_seq)
            entered.set()
            release.wait(30)
            return ok

    Parked(p, a, 4 * P)
    t = threading.Thread(target=p.madvise, args=(a, P, MADV_DONTNEED), daemon=True)
    t.start()
    assert entered.wait(30)
    late = Recorder(p, a, 4 * P)
    got = []
    reader = threading.Thread(target=lambda: got.append(mmu_interval_read_begin(late.mni)), daemon=True)
    reader.start()
    reader.join(0.3)
    assert reader.is_alive(), "read_begin of a notifier inserted mid-invalidation did not wait for it"
    release.set()
    t.join(30)
    reader.join(30)
    assert got and not t.is_alive()
    with late.lock:
        assert not mmu_interval_read_retry(late.mni, got[0])
    # and from now on it hears invalidations like any other subscriber
    p.munmap(a, P)
    assert [e for e, _, _ in late.take()] == [MMU_NOTIFY_UNMAP]


def test_remove_waits_for_a_running_invalidation(mm_system):
    # mmu_interval_notifier_remove(): once it returns, the callback is not running and will
    # not be called again
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"x" * (2 * P))
    entered, release = threading.Event(), threading.Event()
    calls = []

    class Parked(Recorder):
        def invalidate(self, mni, range, cur_seq):
            calls.append("in")
            entered.set()
            release.wait(30)
            ok = super().invalidate(mni, range, cur_seq)
            calls.append("out")
            return ok

    r = Parked(p, a, 2 * P)
    t = threading.Thread(target=p.madvise, args=(a, P, MADV_DONTNEED), daemon=True)
    t.start()
    assert entered.wait(30)
    remover = threading.Thread(target=r.remove, daemon=True)
    remover.start()
    remover.join(0.3)
    assert remover.is_alive(), "remove returned while its callback was still running"
    release.set()
    remover.join(30)
    t.join(30)
    assert calls == ["in", "out"]
    p.munmap(a, 2 * P)
    assert calls == ["in", "out"], "a removed notifier was called again"


def test_child_does_not_inherit_the_parents_subscriptions(mm_system):
    p = mm_system.spawn()
    a = p.mmap(2 * P, RW, ANON)
    p.write(a, b"x" * (2 * P))
    c = p.fork()
    r = everything(p)
    c.write(a, b"child")          # COW in the child: its own page table changes
    c.munmap(a, 2 * P)
    c.exit()
    assert r.take() == [], "the parent's notifier heard its child's address space"
