"""Fault-driven prefetching: uvm_perf_prefetch.c's density prefetcher, and alternatives.

When faults migrate pages of a VA block to a processor, UVM also migrates neighbours it expects
to be touched next.  Its prefetcher builds a binary tree over the block's 512 pages whose leaves
are the pages already resident on the destination or faulted now, first grown to whole 64 KiB
big pages (a faulted page marks its big page, unless a page there thrashes), then for every
faulted page walks from its leaf to the root and keeps the largest subtree in which more than
``uvm_perf_prefetch_threshold`` percent of the leaves are set: those pages are prefetched.  With
the default 51, once just over half of a block is resident or faulting the whole block follows.
The tree is aligned to big pages when the region allowed (the VMA's part of the block) starts
inside one.  Nothing is prefetched until ``uvm_perf_prefetch_min_faults`` faults have migrated to
the same processor, nothing out of a preferred location (unless this is the block's first touch
and the destination is that location: then the whole region is populated), and never a page
that thrashes; faulted pages themselves are not counted as prefetched.

The policy hook is ``choose(ctx)`` (a ``PrefetchContext``); ``PrefetchPolicy.prefetch`` applies
the rules above that do not depend on the choice.  Alternatives: ``NoPrefetch``,
``SequentialPrefetch`` (the next 64 KiB after each faulted page, like a read-ahead window) and
``WholeBlockPrefetch`` (the rest of every faulted block).
"""
import numpy as np

from .policy import Knob, Policy
from .va_block import PAGES_PER_BIG_PAGE, PAGES_PER_UVM_VA_BLOCK, UVM_ID_INVALID

PAGES = PAGES_PER_UVM_VA_BLOCK

# Module parameters of uvm_perf_prefetch.c, with nvidia-uvm's defaults.
uvm_perf_prefetch_enable = 1          # enable/disable the prefetch heuristics
uvm_perf_prefetch_threshold = 51      # % of a subtree resident or faulted that prefetches the rest (0-100)
uvm_perf_prefetch_min_faults = 1      # faults migrated to one processor before prefetching starts (1-20)


class PrefetchContext:
    """What a prefetch decision sees for one batch of faulted blocks migrating to ``dest``.

    Per block (``rows``, n of them): ``first``/``outer`` the region prefetching may cover (the
    block, or the part of it in one VMA and policy range), ``preferred_location`` (-1 none),
    ``first_touch`` (no processor holds any page of the block).  Per page (n x 512): ``faulted``
    pages migrating because of faults, ``resident`` pages already on ``dest``, ``thrashing``.
    """

    def __init__(self, rows, faulted, dest, resident=None, first=None, outer=None, thrashing=None,
                 preferred_location=None, first_touch=None, now_ns=0):
        self.rows = np.asarray(rows, np.int64)
        n = self.rows.size
        self.faulted = np.asarray(faulted, bool).reshape(n, PAGES)
        self.dest = int(dest)
        self.resident = (np.zeros((n, PAGES), bool) if resident is None
                         else np.asarray(resident, bool).reshape(n, PAGES))
        self.first = np.zeros(n, np.int64) if first is None else np.asarray(first, np.int64)
        self.outer = np.full(n, PAGES, np.int64) if outer is None else np.asarray(outer, np.int64)
        if np.any((self.first < 0) | (self.outer > PAGES) | (self.first >= self.outer)):
            raise ValueError("a prefetch region is empty or outside its block")
        self.thrashing = (np.zeros((n, PAGES), bool) if thrashing is None
                          else np.asarray(thrashing, bool).reshape(n, PAGES))
        self.preferred_location = (np.full(n, UVM_ID_INVALID, np.int64) if preferred_location is None
                                   else np.asarray(preferred_location, np.int64))
        self.first_touch = np.zeros(n, bool) if first_touch is None else np.asarray(first_touch, bool)
        self.now_ns = int(now_ns)
        page = np.arange(PAGES)
        self.region = (page >= self.first[:, None]) & (page < self.outer[:, None])

    def __len__(self):
        return int(self.rows.size)

    @property
    def seeds(self):
        """Faulted pages that may seed a prefetch: not thrashing."""
        return self.faulted & ~self.thrashing


def fill_ranges(nrows, row_idx, first, outer):
    """(nrows x 512) mask with [first, outer) set in row ``row_idx`` for every triple."""
    diff = np.zeros((nrows, PAGES + 1), np.int32)
    ok = outer > first
    np.add.at(diff, (row_idx[ok], first[ok]), 1)
    np.add.at(diff, (row_idx[ok], outer[ok]), -1)
    return np.cumsum(diff[:, :PAGES], axis=1) > 0


class PrefetchPolicy(Policy):
    """Hook: ``choose(ctx)`` returns an (n x 512) mask of pages worth bringing to ``ctx.dest``."""
    name = "prefetch"
    KNOBS = {
        "uvm_perf_prefetch_enable": Knob(uvm_perf_prefetch_enable, 0, 1, "uvm_perf_prefetch.c"),
        "uvm_perf_prefetch_min_faults": Knob(uvm_perf_prefetch_min_faults, 1, 20, "uvm_perf_prefetch.c"),
    }

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self._last_proc = np.zeros(0, np.int64)
        self._migrations = np.zeros(0, np.int64)

    def choose(self, ctx):
        raise NotImplementedError

    def _prefetch_info(self, rows):
        need = int(rows.max()) + 1 if rows.size else 0
        if need > self._last_proc.size:
            grow = max(need, 2 * self._last_proc.size)
            self._last_proc = np.concatenate([self._last_proc, np.full(grow - self._last_proc.size, UVM_ID_INVALID)])
            self._migrations = np.concatenate([self._migrations, np.zeros(grow - self._migrations.size, np.int64)])

    def prefetch(self, ctx):
        """uvm_perf_prefetch_get_hint_va_block for every block of ``ctx``: the pages to prefetch to
        ``ctx.dest`` (n x 512 bool)."""
        n = len(ctx)
        out = np.zeros((n, PAGES), bool)
        if not self.uvm_perf_prefetch_enable or n == 0:
            return out
        rows = ctx.rows
        self._prefetch_info(rows)
        moved = self._last_proc[rows] != ctx.dest          # prefetch_info.last_migration_proc_id
        self._last_proc[rows] = ctx.dest
        self._migrations[rows[moved]] = 0
        pref = ctx.preferred_location
        populate = ctx.first_touch & (pref == ctx.dest)
        out[populate] = ctx.region[populate]
        # Never prefetch out of a preferred location (no confidential-computing exception here).
        apply = ~populate & ((pref == UVM_ID_INVALID) | (pref == ctx.dest))
        if apply.any():
            chosen = np.asarray(self.choose(ctx), bool)
            out[apply] = chosen[apply] & ctx.region[apply]
        out &= ~ctx.faulted
        out &= ~ctx.thrashing
        # UVM leaves pages already on the destination to make_resident, which skips them; here
        # the mask says what will move.
        out &= ~ctx.resident
        self._migrations[rows] += ctx.faulted.sum(axis=1)
        keep = self._migrations[rows] >= self.uvm_perf_prefetch_min_faults
        out[~keep] = False
        return out


class DensityPrefetcher(PrefetchPolicy):
    """UVM's tree-based density prefetcher (the default)."""
    name = "density"
    KNOBS = dict(PrefetchPolicy.KNOBS,
                 uvm_perf_prefetch_threshold=Knob(uvm_perf_prefetch_threshold, 0, 100, "uvm_perf_prefetch.c"))

    def choose(self, ctx):
        n = len(ctx)
        page = np.arange(PAGES)
        a, b = ctx.first[:, None], ctx.outer[:, None]
        big_first = -(-ctx.first // PAGES_PER_BIG_PAGE) * PAGES_PER_BIG_PAGE
        big_outer = ctx.outer // PAGES_PER_BIG_PAGE * PAGES_PER_BIG_PAGE
        has_big = big_outer > big_first
        # update_bitmap_tree_from_va_block: a region starting inside a big page shifts the tree so
        # that its nodes fall on big-page boundaries.
        offset = np.where(has_big & (big_first > ctx.first), PAGES_PER_BIG_PAGE - (big_first - ctx.first), 0)
        origin = ctx.first - offset
        leaf_count = ctx.outer - origin
        top = 1 << np.ceil(np.log2(leaf_count)).astype(np.int64)    # roundup_pow_of_two(leaf_count)
        # init_bitmap_tree_from_region: resident on the destination or faulted now, inside the region
        bitmap = (ctx.resident | ctx.faulted) & ctx.region
        # grow_fault_granularity: each faulted unit (the prefix before the first big page, each big
        # page, the suffix; or the whole region when it holds no big page) fills up unless a page
        # in it thrashes.
        bf, bo = big_first[:, None], big_outer[:, None]
        hb = has_big[:, None]
        p = np.clip(page[None], a, b - 1)
        u_first = np.where(hb, np.where(p < bf, a, np.where(p >= bo, bo, bf + (p - bf) // PAGES_PER_BIG_PAGE
                                                            * PAGES_PER_BIG_PAGE)), a)
        u_outer = np.where(hb, np.where(p < bf, bf, np.where(p >= bo, b, u_first + PAGES_PER_BIG_PAGE)), b)
        rix = np.arange(n)[:, None]
        csf = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(ctx.faulted, axis=1)], axis=1)
        cst = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(ctx.thrashing, axis=1)], axis=1)
        hit = (csf[rix, u_outer] > csf[rix, u_first]) & (cst[rix, u_outer] == cst[rix, u_first])
        bitmap |= hit & ctx.region
        cs = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(bitmap, axis=1)], axis=1)
        # compute_prefetch_region for every faulted page that does not thrash: walk leaf -> root,
        # keep the largest subtree denser than the threshold.
        ri, pg = np.nonzero(ctx.seeds)
        o, bb = origin[ri], ctx.outer[ri]
        best_first = np.full(ri.size, -1, np.int64)
        best_outer = np.full(ri.size, -1, np.int64)
        size = 1
        while size <= PAGES:
            start = o + (pg - o) // size * size
            end = np.minimum(start + size, bb)
            count = cs[ri, end] - cs[ri, start]
            dense = (size <= top[ri]) & (count * 100 > (end - start) * self.uvm_perf_prefetch_threshold)
            best_first = np.where(dense, start, best_first)
            best_outer = np.where(dense, end, best_outer)
            size *= 2
        found = best_first >= 0
        first = np.maximum(best_first, ctx.first[ri])
        outer = np.minimum(best_outer, ctx.outer[ri])
        return fill_ranges(n, ri[found], first[found], outer[found])


class NoPrefetch(PrefetchPolicy):
    """Migrate only what faulted."""
    name = "none"

    def choose(self, ctx):
        return np.zeros((len(ctx), PAGES), bool)


class SequentialPrefetch(PrefetchPolicy):
    """The ``sequential_prefetch_bytes`` (64 KiB) after each faulted page, within its region."""
    name = "sequential"
    KNOBS = dict(PrefetchPolicy.KNOBS,
                 sequential_prefetch_bytes=Knob(64 << 10, 4096, 2 << 20, "read-ahead window after a fault"))

    def choose(self, ctx):
        ri, pg = np.nonzero(ctx.seeds)
        window = self.sequential_prefetch_bytes // 4096
        return fill_ranges(len(ctx), ri, pg + 1, np.minimum(pg + 1 + window, ctx.outer[ri]))


class WholeBlockPrefetch(PrefetchPolicy):
    """The whole region of every block with a faulted page that does not thrash."""
    name = "block"

    def choose(self, ctx):
        return ctx.region & ctx.seeds.any(axis=1)[:, None]


POLICIES = {cls.name: cls for cls in (DensityPrefetcher, NoPrefetch, SequentialPrefetch, WholeBlockPrefetch)}
