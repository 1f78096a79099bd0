"""The VMA tree (hmmgpu/mm/vmatree.py) and page tables shared between split VMAs (vma.py).

The tree is checked against a plain sorted list under seeded random inserts, removals and end
changes, with nodes made small so that it grows several levels deep and splits, joins and
collapses; every cached summary is recomputed from scratch and compared.  The shared page
tables are checked through the system calls: a split leaves both halves views of one table, a
merge of neighbours widens the view again, and fork, COW, mremap and munmap still see exactly
their own entries.
"""
import random
from operator import sub

import numpy as np
import pytest

from hmmgpu import (MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MREMAP_MAYMOVE, PAGE_SIZE, PROT_READ,
                    PROT_WRITE)
from hmmgpu.constants import MMAP_BASE, MMAP_MIN_ADDR
from hmmgpu.mm import vmatree
from hmmgpu.mm.vma import pte_table

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


class _V:
    __slots__ = ("start", "end")

    def __init__(self, start, end):
        self.start, self.end = start, end

    def __repr__(self):
        return f"_V({self.start}, {self.end})"


def _ref_area(vmas, length, low, high):
    """get_unmapped_area's top-down walk as it was written before the tree: every VMA."""
    cand = high - length
    for v in reversed(vmas):
        if v.start >= cand + length:
            continue
        if v.end <= cand:
            break
        cand = v.start - length
    return cand if cand >= low else None


def _check(node, is_root=True, spine=True):
    """Every cached summary equals the one computed from scratch; returns (lo, hi, gap, depth).

    On the leftmost path from the root an internal node's first key may be stale (nothing
    reads it); everything else must be exact.
    """
    if not is_root:
        assert vmatree.NODE_MIN <= len(node.keys) <= vmatree.NODE_MAX
    if node.gaps is None:
        assert node.keys == [v.start for v in node.items]
        assert node.ends == [v.end for v in node.items]
        assert node.gap == max(map(sub, node.keys[1:], node.ends), default=-1)
        return node.keys[0], node.ends[-1], node.gap, 1
    assert len(node.items) >= 2
    depths, los = set(), []
    for k, kid in enumerate(node.items):
        lo, hi, gap, d = _check(kid, False, spine and k == 0)
        assert (node.ends[k], node.gaps[k]) == (hi, gap)
        assert node.keys[k] == lo or (spine and k == 0)
        depths.add(d)
        los.append(lo)
    assert len(depths) == 1
    assert node.gap == max(max(node.gaps), max(map(sub, node.keys[1:], node.ends), default=-1))
    return los[0], node.ends[-1], node.gap, depths.pop() + 1


@pytest.mark.parametrize("node_max", [8, 64])
def test_vmatree_matches_a_sorted_list(monkeypatch, node_max):
    monkeypatch.setattr(vmatree, "NODE_MAX", node_max)
    monkeypatch.setattr(vmatree, "NODE_MIN", node_max // 4)
    rng = random.Random(node_max)
    tree, ref = vmatree.VmaTree(), []
    span = 40000
    deepest = 0
    for step in range(4000):
        grow = 0.75 if step < 2500 else 0.35
        op = rng.random()
        if op < grow or not ref:
            a = rng.randrange(span)
            b = a + rng.randrange(1, 12)
            i = next((j for j, v in enumerate(ref) if v.start >= a), len(ref))
            if (i < len(ref) and ref[i].start < b) or (i and ref[i - 1].end > a):
                continue
            v = _V(a, b)
            tree.insert(v)
            ref.insert(i, v)
        elif op < 0.9:
            v = ref.pop(rng.randrange(len(ref)))
            tree.remove(v)
        else:
            i = rng.randrange(len(ref))
            v = ref[i]
            limit = ref[i + 1].start if i + 1 < len(ref) else span + 20
            v.end = rng.randrange(v.start + 1, limit + 1)
            tree.update(v)
        if step % 97 == 0 and ref:
            deepest = max(deepest, _check(tree.root)[3])
            assert list(tree) == ref and len(tree) == len(ref)
            assert tree.size == sum(v.end - v.start for v in ref)
            for _ in range(20):
                x = rng.randrange(-3, span + 30)
                assert tree.find(x) is next((v for v in ref if v.start <= x < v.end), None)
                y = x + rng.randrange(1, 60)
                assert tree.overlapping(x, y) == [v for v in ref if v.start < y and x < v.end]
                length, low = rng.randrange(1, 60), rng.randrange(0, 10)
                high = rng.randrange(low, span + 40)
                assert tree.empty_area_rev(length, low, high) == _ref_area(ref, length, low, high)
    if node_max == 8:
        assert deepest >= 4, "the tree never grew deep enough to exercise splits and joins"
    while ref:                                   # drain it: joins up to a single leaf again
        tree.remove(ref.pop(rng.randrange(len(ref))))
        if len(ref) % 50 == 0 and ref:
            _check(tree.root)
            assert list(tree) == ref
    assert not tree and list(tree) == [] and tree.find(5) is None and tree.size == 0


def test_vmatree_remove_of_an_absent_vma_is_a_keyerror():
    tree = vmatree.VmaTree()
    v = _V(10, 20)
    tree.insert(v)
    with pytest.raises(KeyError):
        tree.remove(_V(10, 20))
    assert list(tree) == [v]


def _sparse_process(system, n):
    """A process with ``n`` one-page mappings that cannot merge (alternating protections)."""
    p = system.spawn()
    addrs = [p.mmap(P, PROT_READ if i % 2 else RW, ANON) for i in range(n)]
    return p, addrs


def test_lookups_at_vma_boundaries_with_many_vmas(mm_system):
    p, addrs = _sparse_process(mm_system, 600)
    assert len(p.mm.vmas) == 600
    assert addrs == sorted(addrs, reverse=True)          # top-down, one under the other
    for a in addrs[::37] + [addrs[0], addrs[-1]]:
        v = p.mm.find_vma(a)
        assert (v.start, v.end) == (a, a + P)
        assert p.mm.find_vma(a + P - 1) is v
        assert p.mm.find_vma(a - 1) is not v
    assert p.mm.find_vma(addrs[-1] - 1) is None
    assert p.mm.find_vma(addrs[0] + P) is None
    lo, hi = addrs[300], addrs[250] + P
    got = p.mm.vmas_in(lo, hi)
    assert [v.start for v in got] == sorted(addrs[250:301])
    assert [v.start for v in p.mm.vmas_in(lo + 1, lo + 2)] == [lo]
    assert p.mm.vmas_in(addrs[-1] - 10 * P, addrs[-1]) == []


def test_get_unmapped_area_takes_the_highest_hole_that_fits(mm_system):
    p, addrs = _sparse_process(mm_system, 500)
    # punch holes of 1, 2 and 3 pages at various heights
    for i, w in ((40, 1), (100, 2), (300, 3), (400, 2)):
        p.munmap(addrs[i + w - 1], w * P)
    ref = [(v.start, v.end) for v in p.mm.vmas]

    def expect(length):
        cand = MMAP_BASE - length
        for s, e in reversed(ref):
            if s >= cand + length:
                continue
            if e <= cand:
                break
            cand = s - length
        assert cand >= MMAP_MIN_ADDR
        return cand

    for npages in (1, 2, 3, 4):
        assert p.mm.get_unmapped_area(npages * P) == expect(npages * P)
    a = p.mmap(3 * P, RW, ANON)
    assert a == addrs[302]                               # the 3-page hole, not the bottom
    assert p.mmap(4 * P, RW, ANON) == addrs[-1] - 4 * P  # nothing fits: under the lowest


def _fill(p, a, npages, seed):
    data = np.random.default_rng(seed).integers(1, 256, npages * P, dtype=np.uint8)
    p.write(a, data)
    return data


def test_mprotect_split_shares_one_table_and_merge_widens_it_again(mm_system):
    p = mm_system.spawn()
    n = 64
    a = p.mmap(n * P, RW, ANON)
    data = _fill(p, a, n, 1)
    table = pte_table(p.mm.find_vma(a).pte)
    p.mprotect(a + 10 * P, 3 * P, PROT_READ)
    parts = list(p.mm.vmas)
    assert [(v.start - a) // P for v in parts] == [0, 10, 13]
    assert all(pte_table(v.pte) is table for v in parts)   # views, nothing copied
    # entries are where they were: the middle part is write-protected, the rest not
    assert all(int(x) & 2 == 0 for x in parts[1].pte)
    assert all(int(x) & 2 for x in parts[2].pte)
    p.mprotect(a + 10 * P, 3 * P, RW)
    (whole,) = list(p.mm.vmas)
    assert (whole.start, whole.end) == (a, a + n * P)
    assert pte_table(whole.pte) is table and whole.pte.size == n
    assert np.array_equal(p.read(a, n * P), data)


def test_fork_cow_and_mremap_of_split_parts_see_their_own_entries(mm_system):
    p = mm_system.spawn()
    n = 32
    a = p.mmap(n * P, RW, ANON)
    data = _fill(p, a, n, 2)
    p.mprotect(a + 8 * P, 8 * P, PROT_READ)              # three VMAs on one table
    c = p.fork()
    # the child got tables of its own; COW still separates the two
    assert all(pte_table(v.pte) is not pte_table(p.mm.find_vma(v.start).pte) for v in c.mm.vmas)
    c.write(a, np.full(P, 7, np.uint8))
    p.write(a + 20 * P, np.full(P, 9, np.uint8))
    assert np.array_equal(p.read(a, P), data[:P])
    assert np.array_equal(c.read(a + 20 * P, P), data[20 * P:21 * P])
    # grow the write-protected middle part: it has to move, its entries go with it and the
    # neighbours keep theirs
    b = p.mremap(a + 8 * P, 8 * P, 9 * P, MREMAP_MAYMOVE)
    assert b != a + 8 * P
    assert np.array_equal(p.read(b, 9 * P)[:8 * P], data[8 * P:16 * P])
    assert not p.read(b + 8 * P, P).any()
    assert np.array_equal(p.read(a, 8 * P), data[:8 * P])
    assert p.mm.find_vma(a + 8 * P) is None
    # mapping the hole again gives fresh zero pages, not the old entries
    assert p.mmap(8 * P, RW, ANON | MAP_FIXED, addr=a + 8 * P) == a + 8 * P
    assert not p.read(a + 8 * P, 8 * P).any()
    assert np.array_equal(p.read(a + 16 * P, 4 * P), data[16 * P:20 * P])
    assert np.array_equal(p.read(a + 20 * P, P), np.full(P, 9, np.uint8))
    c.exit()


def test_munmap_leaves_a_small_neighbour_its_own_table(mm_system):
    p = mm_system.spawn()
    n = 64
    a = p.mmap(n * P, RW, ANON)
    data = _fill(p, a, n, 3)
    table = pte_table(p.mm.find_vma(a).pte)
    p.munmap(a + 2 * P, (n - 2) * P)                      # two pages stay of sixty-four
    (v,) = list(p.mm.vmas)
    assert v.pte.size == 2 and pte_table(v.pte) is not table
    assert np.array_equal(p.read(a, 2 * P), data[:2 * P])
    p.munmap(a, P)
    p.munmap(a + P, P)
    assert not p.mm.vmas
    assert p.rss["anon"] == 0
