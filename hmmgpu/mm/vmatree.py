"""The VMA tree of an address space: mm->mm_mt, the maple tree of lib/maple_tree.c.

Linux keeps an mm's VMAs in a B-tree keyed by address whose nodes also record the
largest gap inside them, so that finding the VMA at an address (find_vma), the VMAs
of a range (the VMA iterator) and a free hole for a new mapping
(mas_empty_area_rev(), behind get_unmapped_area) each cost O(log n) plus what is
returned, however many VMAs there are.  ``VmaTree`` is that structure as a B+tree:
leaves hold up to ``NODE_MAX`` VMAs sorted by start (their starts and ends in plain
lists, so each level is searched by ``bisect`` in C) and are chained left to right;
an internal node keeps, per child, its lowest start, highest end and largest hole.
Every node caches its own largest hole and changes it in O(1) when one entry moves,
looking at all its entries again only when the hole that was largest shrank.  A
VMA's start never changes while it is in the tree; when its end does (a split, a
merge, mremap growing in place) the caller says so with ``update``.
"""
from bisect import bisect_right
from operator import sub

NODE_MAX = 64                 # entries per node (the maple tree's range64 nodes hold 16)
NODE_MIN = NODE_MAX // 4      # below this a node is joined with a neighbour

_NONE = -1                    # "no hole": a node with one entry


class _Node:
    """A node: ``keys`` are the lowest starts of its entries, ``ends`` their highest ends,
    ``items`` the entries (VMAs in a leaf, nodes above), ``gap`` its largest hole.  An
    internal node also keeps each child's largest hole (``gaps``); leaves are chained by
    ``next``."""

    __slots__ = ("keys", "ends", "items", "gaps", "gap", "next")

    def __init__(self, keys, ends, items, gaps=None, nxt=None):
        self.keys, self.ends, self.items, self.gaps, self.next = keys, ends, items, gaps, nxt
        self.recount()

    @classmethod
    def above(cls, kids):
        return cls([k.keys[0] for k in kids], [k.ends[-1] for k in kids], kids, [k.gap for k in kids])

    def recount(self):
        """Largest hole, from every entry (after a change that may have shrunk it)."""
        inside = max(map(sub, self.keys[1:], self.ends), default=_NONE)
        self.gap = inside if self.gaps is None else max(inside, max(self.gaps))


def _around(node, k):
    """The largest hole that entry ``k`` of ``node`` takes part in."""
    keys, ends = node.keys, node.ends
    h = node.gaps[k] if node.gaps is not None else _NONE
    if k:
        h = max(h, keys[k] - ends[k - 1])
    if k + 1 < len(keys):
        h = max(h, keys[k + 1] - ends[k])
    return h


def _halve(node):
    """Split an overfull node in two; returns the new right half (the left is ``node``)."""
    h = len(node.keys) // 2
    gaps = None if node.gaps is None else node.gaps[h:]
    right = _Node(node.keys[h:], node.ends[h:], node.items[h:], gaps, node.next)
    del node.keys[h:], node.ends[h:], node.items[h:]
    if gaps is None:
        node.next = right
    else:
        del node.gaps[h:]
    node.recount()
    return right


def _join(left, right):
    """Append ``right``'s entries to its left neighbour ``left``."""
    left.keys += right.keys
    left.ends += right.ends
    left.items += right.items
    if left.gaps is None:
        left.next = right.next
    else:
        left.gaps += right.gaps
    left.recount()


def _put(parent, k, kid):
    """Child ``k`` of ``parent`` is ``kid`` (new, or changed beyond a local update)."""
    parent.keys[k], parent.ends[k], parent.gaps[k] = kid.keys[0], kid.ends[-1], kid.gap


def _add(parent, k, kid):
    parent.keys.insert(k, kid.keys[0])
    parent.ends.insert(k, kid.ends[-1])
    parent.gaps.insert(k, kid.gap)
    parent.items.insert(k, kid)


def _hole(s, e, i):
    """The hole below entry ``i`` of a node (None for the first entry or past the end)."""
    return s[i] - e[i - 1] if 0 < i < len(s) else None


class VmaTree:
    """The VMAs of one address space, in address order (iterable, ``len``, truth value).

    ``size`` is the bytes they cover together (mm->total_vm, in bytes), kept as they change.
    """

    __slots__ = ("root", "n", "size")

    def __init__(self):
        self.root = _Node([], [], [])
        self.n = 0
        self.size = 0

    def __len__(self):
        return self.n

    def __bool__(self):
        return self.n != 0

    def __iter__(self):
        leaf = self._leftmost()
        while leaf is not None:
            yield from leaf.items
            leaf = leaf.next

    def __repr__(self):
        return f"VmaTree({self.n} vmas)"

    def _leftmost(self):
        node = self.root
        while node.gaps is not None:
            node = node.items[0]
        return node

    def _path(self, addr):
        """The leaf whose range of starts holds ``addr``, and the (node, child) pairs above it."""
        node = self.root
        path = []
        while node.gaps is not None:
            k = bisect_right(node.keys, addr) - 1
            if k < 0:
                k = 0
            path.append((node, k))
            node = node.items[k]
        return node, path

    # -- lookups ----------------------------------------------------------------------------
    def find(self, addr):
        """find_vma() as vma_lookup(): the VMA containing ``addr``, or None."""
        node = self.root
        while node.gaps is not None:
            k = bisect_right(node.keys, addr) - 1
            node = node.items[k if k > 0 else 0]
        i = bisect_right(node.keys, addr) - 1
        if i >= 0 and node.ends[i] > addr:
            return node.items[i]
        return None

    def overlapping(self, start, end):
        """The VMAs overlapping [start, end), in address order (for_each_vma_range)."""
        leaf, _ = self._path(start)
        i = bisect_right(leaf.keys, start) - 1
        if i < 0 or leaf.ends[i] <= start:
            i += 1
        out = []
        while leaf is not None:
            keys = leaf.keys
            j = bisect_right(keys, end - 1, i)
            out += leaf.items[i:j]
            if j < len(keys):
                break
            leaf, i = leaf.next, 0
        return out

    def empty_area_rev(self, length, low, high):
        """mas_empty_area_rev(): the highest ``addr`` with [addr, addr + length) free and
        inside [low, high), or None.  O(log n): subtrees whose largest hole is too small are
        never entered."""
        top = self._top_hole(high)
        if top is None or high - top >= length:
            hit = high                    # the hole just below ``high`` is big enough
        else:
            hit = self._search(self.root, high - 1, length)
            if hit is None:
                hit = self._leftmost().keys[0]          # the hole below the first VMA
        return hit - length if hit - length >= low else None

    def _top_hole(self, high):
        """End of the last VMA that starts below ``high`` (None when there is none)."""
        node = self.root
        while node.gaps is not None:
            k = bisect_right(node.keys, high - 1) - 1
            node = node.items[k if k > 0 else 0]    # (the first key may be stale: see _fix)
        k = bisect_right(node.keys, high - 1) - 1
        return node.ends[k] if k >= 0 else None

    def _search(self, node, key, length):
        """Start of the highest VMA of ``node`` starting at or below ``key`` whose hole below
        it (from the previous VMA of ``node``) is at least ``length``; None if there is none."""
        if node.gap < length:
            return None                       # no hole of this node is large enough
        keys, ends, gaps = node.keys, node.ends, node.gaps
        top = bisect_right(keys, key) - 1
        if gaps is None:
            for k in range(top, 0, -1):
                if keys[k] - ends[k - 1] >= length:
                    return keys[k]
            return None
        for k in range(max(top, 0), -1, -1):          # (the first key may be stale: see _fix)
            if gaps[k] >= length:
                hit = self._search(node.items[k], key, length)
                if hit is not None:
                    return hit
            if k and keys[k] - ends[k - 1] >= length:
                return keys[k]
        return None

    # -- changes ----------------------------------------------------------------------------
    def insert(self, vma):
        """Add ``vma`` (it overlaps no VMA of the tree)."""
        start = vma.start
        leaf, path = self._path(start)
        s, e = leaf.keys, leaf.ends
        i = bisect_right(s, start)
        old = _hole(s, e, i)                  # the hole the new VMA goes into
        s.insert(i, start)
        e.insert(i, vma.end)
        leaf.items.insert(i, vma)
        if old is not None and old == leaf.gap:
            leaf.recount()
        else:
            leaf.gap = max(leaf.gap, _around(leaf, i))
        self.n += 1
        self.size += vma.end - start
        self._fix(leaf, path)

    def remove(self, vma):
        """Take ``vma`` out of the tree (KeyError if it is not there)."""
        leaf, path = self._path(vma.start)
        s, e = leaf.keys, leaf.ends
        i = bisect_right(s, vma.start) - 1
        if i < 0 or leaf.items[i] is not vma:
            raise KeyError(f"{vma!r} is not in the VMA tree")
        lost = _around(leaf, i)
        self.size -= e[i] - s[i]
        del s[i], e[i], leaf.items[i]
        joined = _hole(s, e, i)               # the two holes around it become one, larger
        if joined is not None:
            if joined > leaf.gap:
                leaf.gap = joined
        elif lost == leaf.gap:
            leaf.recount()
        self.n -= 1
        self._fix(leaf, path)

    def update(self, vma):
        """``vma.end`` changed (split, merge, growth in place): refresh what depends on it."""
        leaf, path = self._path(vma.start)
        i = bisect_right(leaf.keys, vma.start) - 1
        if i < 0 or leaf.items[i] is not vma:
            raise KeyError(f"{vma!r} is not in the VMA tree")
        old = _around(leaf, i)
        self.size += vma.end - leaf.ends[i]
        leaf.ends[i] = vma.end
        new = _around(leaf, i)
        if new >= leaf.gap:
            leaf.gap = new
        elif old == leaf.gap:
            leaf.recount()
        self._fix(leaf, path)

    def _fix(self, node, path):
        """Carry a change of ``node`` up ``path``: summaries, then splits and joins.

        On the leftmost path from the root a changed lowest start goes no further up: nothing
        reads an internal node's first key (lookups clamp to its first child, holes are
        measured from a child's start only for the second child on).  So mmap's usual
        placement, just under the lowest VMA, touches one leaf.
        """
        spine = not any(k for _, k in path)
        while path:
            parent, k = path.pop()
            size = len(node.keys)
            if NODE_MIN <= size <= NODE_MAX:
                lo, hi, gap = node.keys[0], node.ends[-1], node.gap
                keys, ends, gaps = parent.keys, parent.ends, parent.gaps
                if (spine or lo == keys[k]) and hi == ends[k] and gap == gaps[k]:
                    return              # nothing above depends on what changed
                old = _around(parent, k)
                keys[k], ends[k], gaps[k] = lo, hi, gap
                new = _around(parent, k)
                if new >= parent.gap:
                    parent.gap = new
                elif old == parent.gap:
                    parent.recount()    # the largest hole may have shrunk
            elif size > NODE_MAX:
                _add(parent, k + 1, _halve(node))
                _put(parent, k, node)
                parent.recount()
            else:
                # underfull: join with a neighbour (an internal node always has two or more
                # children: the root is collapsed when it has one), halve again if too big
                a = k - 1 if k else k
                left = parent.items[a]
                _join(left, parent.items[a + 1])
                del parent.keys[a + 1], parent.ends[a + 1], parent.gaps[a + 1], parent.items[a + 1]
                if len(left.keys) > NODE_MAX:
                    _add(parent, a + 1, _halve(left))
                _put(parent, a, left)
                parent.recount()
            node = parent
        # at the root
        if len(node.keys) > NODE_MAX:
            right = _halve(node)
            self.root = _Node.above([node, right])
        elif node.gaps is not None and len(node.keys) == 1:
            self.root = node.items[0]
