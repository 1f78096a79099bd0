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
