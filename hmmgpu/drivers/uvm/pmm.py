"""The GPU physical memory manager: uvm_pmm_gpu.c.

Device memory is a flat array of 2 MiB root chunks (UVM_CHUNK_SIZE_MAX), each split on demand
into 64 KiB and then 4 KiB chunks (the user chunk sizes of Pascal and later).  As in UVM, every
chunk is FREE (on the free list of its size), IS_SPLIT (an inner node), TEMP_PINNED (just
allocated, or held by an eviction) or ALLOCATED (owned by one VA block).  Splitting is lazy (only
when no chunk of the asked size is free: the first subchunk is used, the rest go to the tail of
their free list), merging eager (when every child of a split chunk is free, they merge back, up
to the root).  Allocated user root chunks sit on three ordered lists, UNUSED, DISCARDED and USED;
any allocation, unpin or free under a root moves it to the tail of USED
(chunk_update_lists_locked), and pick_root_chunk_to_evict takes the first root of the first
non-empty list: that is UVM's LRU.  A root with any pinned chunk is on no list and is never
evicted, which is what keeps an eviction from taking the chunks being allocated for the fault
that caused it.

State is arrays, one set per chunk size: ``state``, ``owner`` (the VA block, -1 for none) and
``free_seq`` (position in the free list) indexed by chunk number; per root, the eviction list and
its position, the count of pinned chunks, and the eviction flag.  A chunk is named by its first
4 KiB frame (its device address / 4 KiB).  Free lists and alloc lists are sequence numbers: the
head of a list is its smallest number, moving to the tail takes the next number.  One PMA is not
modelled: root chunks not in use are simply free 2 MiB chunks, handed out in list order.
"""
import numpy as np

from ...device.clock import PAGE_SIZE
from .va_block import group_sorted

UVM_CHUNK_SIZE_4K = 4 << 10
UVM_CHUNK_SIZE_64K = 64 << 10
UVM_CHUNK_SIZE_2M = 2 << 20
UVM_CHUNK_SIZE_MAX = UVM_CHUNK_SIZE_2M
# gpu->parent->mmu_user_chunk_sizes on Pascal and later
DEFAULT_CHUNK_SIZES = (UVM_CHUNK_SIZE_4K, UVM_CHUNK_SIZE_64K, UVM_CHUNK_SIZE_2M)

# uvm_pmm_gpu_chunk_state_t (PMA_OWNED is not modelled); NONE marks a slot that is not a chunk now
# (its parent is not split).
CHUNK_STATE_NONE = 0
CHUNK_STATE_FREE = 1
CHUNK_STATE_IS_SPLIT = 2
CHUNK_STATE_TEMP_PINNED = 3
CHUNK_STATE_ALLOCATED = 4

# uvm_pmm_alloc_list_t: the eviction priority order
ALLOC_LIST_NONE = -1
UVM_PMM_ALLOC_LIST_UNUSED = 0
UVM_PMM_ALLOC_LIST_DISCARDED = 1
UVM_PMM_ALLOC_LIST_USED = 2

FRAMES_PER_ROOT = UVM_CHUNK_SIZE_MAX // PAGE_SIZE


class PmmError(RuntimeError):
    """A PMM call that breaks the manager's rules (a bug in the caller, never a normal failure)."""


class EvictionFailed(Exception):
    """Raised by an ``evict`` callback when a root chunk cannot be evicted now (a page of it is
    busy, or system memory is full): the eviction is abandoned and another victim tried."""


class Pmm:
    """uvm_pmm_gpu_t over ``memory_bytes`` of device memory (a multiple of 2 MiB).

    ``clock`` (an EmulatedClock, optional) stamps allocations and uses for the eviction policies.
    """

    def __init__(self, memory_bytes, chunk_sizes=DEFAULT_CHUNK_SIZES, clock=None):
        memory_bytes = int(memory_bytes)
        if memory_bytes <= 0 or memory_bytes % UVM_CHUNK_SIZE_MAX:
            raise ValueError(f"device memory of {memory_bytes} bytes is not a positive multiple of 2 MiB")
        sizes = sorted(set(int(s) for s in chunk_sizes), reverse=True)
        if sizes[0] != UVM_CHUNK_SIZE_MAX or sizes[-1] < PAGE_SIZE or any(s & (s - 1) for s in sizes):
            raise ValueError(f"chunk sizes {chunk_sizes} must be powers of two from 4 KiB up to 2 MiB, 2 MiB included")
        self.clock = clock
        self.sizes = sizes                                   # level 0 = root chunks
        self.nlevels = len(sizes)
        self.nroots = memory_bytes // UVM_CHUNK_SIZE_MAX
        self.nframes = self.nroots * FRAMES_PER_ROOT
        self.fpc = [s // PAGE_SIZE for s in sizes]           # frames per chunk, per level
        self.per_root = [UVM_CHUNK_SIZE_MAX // s for s in sizes]
        self.ratio = [1] + [sizes[i - 1] // sizes[i] for i in range(1, self.nlevels)]
        self.state = [np.zeros(self.nroots * r, np.int8) for r in self.per_root]
        self.owner = [np.full(self.nroots * r, -1, np.int64) for r in self.per_root]
        self.free_seq = [np.full(self.nroots * r, -1, np.int64) for r in self.per_root]
        self.state[0][:] = CHUNK_STATE_FREE
        self.free_seq[0][:] = np.arange(self.nroots)
        self._seq = self.nroots
        # per root chunk
        self.alloc_list = np.full(self.nroots, ALLOC_LIST_NONE, np.int8)
        self.list_seq = np.full(self.nroots, -1, np.int64)
        self.pinned = np.zeros(self.nroots, np.int64)        # TEMP_PINNED chunks under the root
        self.in_eviction = np.zeros(self.nroots, bool)
        self.alloc_seq = np.full(self.nroots, -1, np.int64)  # when the root left the free list (FIFO)
        self.alloc_ns = np.zeros(self.nroots, np.int64)
        self.last_used_ns = np.zeros(self.nroots, np.int64)
        self.use_count = np.zeros(self.nroots, np.int64)     # use events (LFU)
        self.stats = {"root_chunks_evicted": 0, "splits": 0, "merges": 0}

    # -- helpers ---------------------------------------------------------------------------------
    def _now(self):
        return int(self.clock.now_ns) if self.clock is not None else 0

    def _next_seq(self, n):
        s = np.arange(self._seq, self._seq + n, dtype=np.int64)
        self._seq += n
        return s

    def root_of(self, level, nodes):
        return np.asarray(nodes, np.int64) // self.per_root[level]

    def frames_of(self, level, nodes):
        return np.asarray(nodes, np.int64) * self.fpc[level]

    def _set_state(self, level, nodes, new_state):
        """Move chunks to ``new_state``, keeping the per-root pinned counts."""
        if nodes.size == 0:
            return
        old = self.state[level][nodes]
        roots = nodes // self.per_root[level]
        delta = (np.int64(new_state == CHUNK_STATE_TEMP_PINNED)
                 - (old == CHUNK_STATE_TEMP_PINNED).astype(np.int64))
        if np.any(delta):
            np.add.at(self.pinned, roots, delta)
        self.state[level][nodes] = new_state
        if new_state == CHUNK_STATE_FREE:
            self.free_seq[level][nodes] = self._next_seq(nodes.size)
        else:
            self.free_seq[level][nodes] = -1

    def _update_lists(self, roots):
        """chunk_update_lists_locked for every root touched, in order of the last touch."""
        roots = np.asarray(roots, np.int64)
        if roots.size == 0:
            return
        if np.any(roots[1:] < roots[:-1]):
            rev = roots[::-1]
            uniq, first_in_rev = np.unique(rev, return_index=True)
            order = np.argsort(-(first_in_rev.astype(np.int64)), kind="stable")  # by last touch, oldest first
            roots = uniq[order]
        else:                            # ascending: the last touches are in that order too
            roots = group_sorted(roots)[0]
        off = ((self.pinned[roots] > 0) | (self.state[0][roots] == CHUNK_STATE_FREE) | self.in_eviction[roots])
        self.alloc_list[roots[off]] = ALLOC_LIST_NONE
        self.list_seq[roots[off]] = -1
        on = roots[~off]
        self.alloc_list[on] = UVM_PMM_ALLOC_LIST_USED
        self.list_seq[on] = self._next_seq(on.size)

    def _leaf_level(self, frames):
        """The level of the allocated or pinned chunk that starts at each frame; -1 where none does."""
        frames = np.asarray(frames, np.int64)
        lvl = np.full(frames.size, -1, np.int64)
        for level in range(self.nlevels):
            node = frames // self.fpc[level]
            st = self.state[level][node]
            hit = ((st == CHUNK_STATE_ALLOCATED) | (st == CHUNK_STATE_TEMP_PINNED)) & (frames % self.fpc[level] == 0)
            lvl[hit & (lvl < 0)] = level
        return lvl

    def _check_frames(self, frames, what):
        frames = np.asarray(frames, np.int64).ravel()
        if frames.size and (frames.min() < 0 or frames.max() >= self.nframes):
            raise PmmError(f"{what}: frame out of range [0, {self.nframes})")
        if np.any(frames[1:] <= frames[:-1]) and np.unique(frames).size != frames.size:   # ascending: no twice
            raise PmmError(f"{what}: a chunk is named twice")
        return frames

    def _level_of_size(self, size):
        try:
            return self.sizes.index(int(size))
        except ValueError:
            raise ValueError(f"chunk size {size} is not one of {sorted(self.sizes)}") from None

    # -- allocation --------------------------------------------------------------------------------
    def _claim(self, level, n, note=True):
        """claim_free_chunk + alloc_chunk_with_splits for ``n`` chunks of one level: free chunks in
        free-list order first, then the first subchunks of split bigger chunks.  Returns the chunk
        numbers, now TEMP_PINNED (fewer than ``n`` when memory runs out); without ``note`` the
        roots taken from the free list are left for the caller to stamp (``_note_requests``).

        Claims compose: one claim of n1 + n2 chunks takes the chunks that a claim of n1 and then
        one of n2 take, in the same order, and leaves the same spare subchunks free, because a
        claim splits a bigger chunk only once the free list of its level is empty and the spares
        of a split go to the tail of that list.  ``alloc_many`` relies on it."""
        st = self.state[level]
        free = np.flatnonzero(st == CHUNK_STATE_FREE)
        if free.size:
            free = free[~self.in_eviction[free // self.per_root[level]]]
        if free.size > n:
            free = free[np.argpartition(self.free_seq[level][free], n - 1)[:n]]
        free = free[np.argsort(self.free_seq[level][free], kind="stable")]
        if free.size:
            self._set_state(level, free, CHUNK_STATE_TEMP_PINNED)
            if note:
                self._note_root_alloc(self.root_of(level, free))
        rest = n - free.size
        if rest == 0 or level == 0:
            return free
        ratio = self.ratio[level]
        parents = self._claim(level - 1, -(-rest // ratio), note)
        if parents.size == 0:
            return free
        children = (parents[:, None] * ratio + np.arange(ratio)).ravel()
        # split_gpu_chunk: the parent turns IS_SPLIT, its children inherit TEMP_PINNED
        self.owner[level - 1][parents] = -1
        self._set_state(level - 1, parents, CHUNK_STATE_IS_SPLIT)
        self._set_state(level, children, CHUNK_STATE_TEMP_PINNED)
        self.stats["splits"] += int(parents.size)
        used, spare = children[:rest], children[rest:]
        self._set_state(level, spare, CHUNK_STATE_FREE)      # chunk_free_locked: tail of the free list
        return np.concatenate([free, used])

    def _note_root_alloc(self, roots):
        fresh = roots[self.alloc_seq[roots] < 0]
        if fresh.size:
            fresh = np.unique(fresh)
            self.alloc_seq[fresh] = self._next_seq(fresh.size)
            self.alloc_ns[fresh] = self._now()

    def alloc(self, n, size, owner, evict=None, policy=None):
        """pmm_gpu_alloc of ``n`` user chunks of ``size`` bytes for VA block ``owner``.

        Returns the chunks' first frames (int64), TEMP_PINNED: they cannot be evicted until
        ``unpin_allocated``.  Without ``evict`` the result may be shorter than ``n`` (out of memory).
        With ``evict(root, frames, owners)`` (UVM_PMM_ALLOC_FLAGS_EVICT) the PMM evicts root chunks
        chosen by ``policy.choose_victim(pmm)``: ``evict`` must move the listed chunks' pages out of
        their blocks and ``free`` them; the evicted root then serves the allocation.  The result is
        short only when no root chunk can be evicted (all pinned): UVM's NV_ERR_NO_MEMORY /
        NV_ERR_MORE_PROCESSING_REQUIRED, for the caller to back off.  ``evict`` may raise
        EvictionFailed for a root it cannot evict now; the PMM then tries another victim.
        """
        return self.alloc_many([int(n)], size, [owner], evict=evict, policy=policy)[0]

    def alloc_many(self, counts, size, owners, evict=None, policy=None):
        """``alloc(counts[i], size, owners[i], evict, policy)`` for each i in turn -- one request
        per VA block, as a driver allocates for a batch -- with the same result, chunk for chunk
        (the same chunks for each request, states, free and eviction lists, stamps and evictions),
        but one claim for all the requests that free memory serves: only a request that has to
        evict runs on its own.  Returns (the frames of every request, in request order; how many
        each request got)."""
        level = self._level_of_size(size)
        counts = np.asarray(counts, np.int64).ravel()
        owners = np.asarray(owners, np.int64).ravel()
        if counts.shape != owners.shape:
            raise ValueError(f"{counts.size} chunk counts for {owners.size} owners")
        if np.any(counts < 0):
            raise ValueError(f"cannot allocate {int(counts.min())} chunks")
        got = np.zeros(counts.size, np.int64)
        out = [np.zeros(0, np.int64)]
        i = 0
        while i < counts.size:
            ends = np.cumsum(counts[i:])
            nodes = self._claim(level, int(ends[-1]), note=False)
            # the request of each chunk (relative to i): claims compose, so request i + r gets
            # chunks [ends[r - 1], ends[r]) of the one claim
            req = np.searchsorted(ends, np.arange(nodes.size), "right")
            self._note_requests(self.root_of(level, nodes), req)
            # chunk_pin takes a root off its eviction list at once: the chunks just claimed must
            # not be evicted to serve the rest of this very allocation
            self._update_lists(self.root_of(level, nodes))
            served = int(np.searchsorted(ends, nodes.size, "right"))   # requests served in full
            whole = req < served
            self._own(level, nodes[whole], owners[i + req[whole]])
            out.append(nodes[whole])
            got[i:i + served] = counts[i:i + served]
            j = i + served
            if j == counts.size:
                break
            if evict is None:            # memory ran out: every later request gets nothing
                out.append(nodes[~whole])
                self._own(level, nodes[~whole], owners[j])
                got[j] = np.count_nonzero(~whole)
                break
            # request j ran short: it evicts for the rest, as one alloc call would
            mine = self._evict_and_claim(level, nodes[~whole], int(counts[j]), evict, policy)
            self._own(level, mine, owners[j])
            out.append(mine)
            got[j] = mine.size
            i = j + 1
        return self.frames_of(level, np.concatenate(out)), got

    def _note_requests(self, roots, req):
        """_note_root_alloc for the roots of chunks claimed for several requests at once (``req``:
        each chunk's request, ascending): the roots fresh from the free list stamped request by
        request, each request's in root order, as one ``alloc`` per request stamps them."""
        fresh = self.alloc_seq[roots] < 0
        if not fresh.any():
            return
        u, first = np.unique(roots[fresh], return_index=True)
        u = u[np.lexsort((u, req[fresh][first]))]
        self.alloc_seq[u] = self._next_seq(u.size)
        self.alloc_ns[u] = self._now()

    def _own(self, level, nodes, owner):
        """The end of an allocation: the chunks belong to their blocks, their roots were used now."""
        self.owner[level][nodes] = owner
        self.last_used_ns[self.root_of(level, nodes)] = self._now()

    def _evict_and_claim(self, level, nodes, n, evict, policy):
        """The rest of an allocation of ``n`` chunks that got ``nodes`` from free memory: evict
        root chunks chosen by ``policy`` and claim again until it has ``n`` (or nothing more can
        be evicted); returns all its chunks."""
        got = [nodes]
        count = nodes.size
        failures = 0
        while count < n and evict is not None:
            root = policy.choose_victim(self) if policy is not None else None
            if root is None:
                break
            try:
                self.evict_root_chunk(root, evict)
            except EvictionFailed:
                # the root is back on its list; give up after as many failures as there are
                # roots, so that an allocation always ends (short) instead of spinning
                failures += 1
                if failures > self.nroots:
                    break
                continue
            more = self._claim(level, n - count)
            self._update_lists(self.root_of(level, more))
            got.append(more)
            count += more.size
        return np.concatenate(got)

    def unpin_allocated(self, frames):
        """uvm_pmm_gpu_unpin_allocated: TEMP_PINNED -> ALLOCATED; each root goes to the tail of USED
        once nothing under it is pinned."""
        frames = self._check_frames(frames, "unpin_allocated")
        lvl = self._leaf_level(frames)
        roots = []
        for level in range(self.nlevels):
            nodes = frames[lvl == level] // self.fpc[level]
            if nodes.size == 0:
                continue
            if np.any(self.state[level][nodes] != CHUNK_STATE_TEMP_PINNED) or np.any(self.owner[level][nodes] < 0):
                raise PmmError("unpin_allocated: a chunk is not pinned for a VA block")
            self._set_state(level, nodes, CHUNK_STATE_ALLOCATED)
            roots.append(self.root_of(level, nodes))
        if np.any(lvl < 0):
            raise PmmError("unpin_allocated: a frame does not start an allocated chunk")
        roots = np.concatenate(roots) if roots else np.zeros(0, np.int64)
        self._mark_use(roots)
        self._update_lists(roots)

    def _mark_use(self, roots):
        if roots.size:
            u = group_sorted(roots)[0]
            self.use_count[u] += 1
            self.last_used_ns[u] = self._now()

    # -- free and merge -------------------------------------------------------------------------------
    def free(self, frames):
        """uvm_pmm_gpu_free of allocated or pinned chunks (named by first frame), merging eagerly.

        Chunks of a root chunk being evicted are not freed but pinned for the eviction, as
        chunk_free_locked does."""
        frames = self._check_frames(frames, "free")
        lvl = self._leaf_level(frames)
        if np.any(lvl < 0):
            bad = frames[lvl < 0][:4]
            raise PmmError(f"free: frame(s) {bad.tolist()} do not start an allocated or pinned chunk")
        touched, freed = [], [np.zeros(0, np.int64)] * self.nlevels
        for level in range(self.nlevels):
            nodes = frames[lvl == level] // self.fpc[level]
            if nodes.size == 0:
                continue
            roots = self.root_of(level, nodes)
            ev = self.in_eviction[roots]
            held = nodes[ev]
            if held.size:
                self._set_state(level, held, CHUNK_STATE_TEMP_PINNED)
                self.owner[level][held] = -1
            go = nodes[~ev]
            self.owner[level][go] = -1
            self._set_state(level, go, CHUNK_STATE_FREE)
            freed[level] = go
            touched.append(roots)
        self._merge_free(freed)
        roots = np.concatenate(touched)
        self._retire_free_roots(roots)
        self._update_lists(roots)

    def _merge_free(self, freed):
        """free_chunk_with_merges: a split chunk whose children are now all free merges into one
        free chunk, up the tree.  ``freed[level]`` are the chunks just freed at each level."""
        carry = np.zeros(0, np.int64)
        for level in range(self.nlevels - 1, 0, -1):
            cand = np.concatenate([freed[level], carry])
            if cand.size == 0:
                carry = np.zeros(0, np.int64)
                continue
            ratio = self.ratio[level]
            parents = np.unique(cand // ratio)
            parents = parents[self.state[level - 1][parents] == CHUNK_STATE_IS_SPLIT]
            kids = self.state[level][parents[:, None] * ratio + np.arange(ratio)]
            parents = parents[(kids == CHUNK_STATE_FREE).all(axis=1)]
            carry = parents
            if parents.size == 0:
                continue
            children = (parents[:, None] * ratio + np.arange(ratio)).ravel()
            self._set_state(level, children, CHUNK_STATE_NONE)
            self._set_state(level - 1, parents, CHUNK_STATE_FREE)
            self.stats["merges"] += int(parents.size)

    def _retire_free_roots(self, roots):
        roots = np.unique(roots)
        gone = roots[self.state[0][roots] == CHUNK_STATE_FREE]
        self.alloc_seq[gone] = -1
        self.use_count[gone] = 0

    # -- split and merge of allocated chunks (uvm_pmm_gpu_split_chunk / uvm_pmm_gpu_merge_chunk) ------
    def split_chunk(self, frames, size):
        """Split allocated (or pinned) chunks down to ``size``; the subchunks keep state and owner."""
        frames = self._check_frames(frames, "split_chunk")
        target = self._level_of_size(size)
        lvl = self._leaf_level(frames)
        if np.any(lvl < 0) or np.any(lvl > target):
            raise PmmError(f"split_chunk: every chunk must be allocated and at least {size} bytes")
        carry = np.zeros(0, np.int64)
        for level in range(target):
            nodes = np.concatenate([frames[lvl == level] // self.fpc[level], carry])
            if nodes.size == 0:
                continue
            ratio = self.ratio[level + 1]
            st = self.state[level][nodes]
            own = self.owner[level][nodes]
            children = (nodes[:, None] * ratio + np.arange(ratio)).ravel()
            self._set_state(level, nodes, CHUNK_STATE_IS_SPLIT)
            self.owner[level][nodes] = -1
            for s_ in (CHUNK_STATE_ALLOCATED, CHUNK_STATE_TEMP_PINNED):
                pick = np.repeat(st == s_, ratio)
                self._set_state(level + 1, children[pick], s_)
            self.owner[level + 1][children] = np.repeat(own, ratio)
            carry = children
            self.stats["splits"] += int(nodes.size)

    def _leaf_state_owner(self, frames):
        """State and owner of the chunk (at any level) that covers each frame."""
        frames = np.asarray(frames, np.int64)
        state = np.zeros(frames.shape, np.int8)
        owner = np.full(frames.shape, -1, np.int64)
        for level in range(self.nlevels):
            node = frames // self.fpc[level]
            st = self.state[level][node]
            leaf = (st != CHUNK_STATE_NONE) & (st != CHUNK_STATE_IS_SPLIT)
            state[leaf] = st[leaf]
            owner[leaf] = self.owner[level][node[leaf]]
        return state, owner

    def merge_chunk(self, frames, size):
        """Merge everything under split chunks of ``size`` back into one chunk each; the chunks
        under one must all be ALLOCATED to the same block, or all TEMP_PINNED
        (assert_chunk_mergeable)."""
        frames = self._check_frames(frames, "merge_chunk")
        top = self._level_of_size(size)
        nodes = frames // self.fpc[top]
        if np.any(frames % self.fpc[top]) or np.any(self.state[top][nodes] != CHUNK_STATE_IS_SPLIT):
            raise PmmError("merge_chunk: not a split chunk")
        cover = frames[:, None] + np.arange(self.fpc[top])
        st, own = self._leaf_state_owner(cover)
        uniform = (st == st[:, :1]).all(axis=1) & (own == own[:, :1]).all(axis=1)
        ok = (st[:, 0] == CHUNK_STATE_ALLOCATED) | (st[:, 0] == CHUNK_STATE_TEMP_PINNED)
        if not np.all(uniform & ok):
            raise PmmError("merge_chunk: the subchunks are not all allocated to one block, or all pinned")
        for level in range(top + 1, self.nlevels):
            span = self.per_root[level] // self.per_root[top]
            sub = (nodes[:, None] * span + np.arange(span)).ravel()
            self._set_state(level, sub, CHUNK_STATE_NONE)
            self.owner[level][sub] = -1
        for s_ in (CHUNK_STATE_ALLOCATED, CHUNK_STATE_TEMP_PINNED):
            self._set_state(top, nodes[st[:, 0] == s_], s_)
        self.owner[top][nodes] = own[:, 0]
        self.stats["merges"] += int(nodes.size)
        self._update_lists(self.root_of(top, nodes))

    # -- eviction lists ------------------------------------------------------------------------------
    def _mark_list(self, frames, alloc_list):
        """root_chunk_update_eviction_list: to the tail of ``alloc_list`` unless pinned or in eviction."""
        roots = np.asarray(frames, np.int64) // FRAMES_PER_ROOT
        rev = roots[::-1]
        uniq, first_in_rev = np.unique(rev, return_index=True)
        roots = uniq[np.argsort(-(first_in_rev.astype(np.int64)), kind="stable")]
        ok = (self.pinned[roots] == 0) & ~self.in_eviction[roots] & (self.state[0][roots] != CHUNK_STATE_FREE)
        roots = roots[ok]
        self.alloc_list[roots] = alloc_list
        self.list_seq[roots] = self._next_seq(roots.size)
        if alloc_list == UVM_PMM_ALLOC_LIST_USED:
            self._mark_use(roots)

    def mark_root_chunk_used(self, frames):
        """uvm_pmm_gpu_mark_root_chunk_used for the roots holding these frames."""
        self._mark_list(frames, UVM_PMM_ALLOC_LIST_USED)

    def mark_root_chunk_unused(self, frames):
        self._mark_list(frames, UVM_PMM_ALLOC_LIST_UNUSED)

    def mark_root_chunk_discarded(self, frames):
        self._mark_list(frames, UVM_PMM_ALLOC_LIST_DISCARDED)

    def evictable_roots(self):
        """Root chunks on an eviction list (allocated, nothing pinned, not being evicted), in UVM's
        pick order: UNUSED, DISCARDED, USED, each from head to tail."""
        roots = np.flatnonzero(self.alloc_list != ALLOC_LIST_NONE)
        order = np.lexsort((self.list_seq[roots], self.alloc_list[roots]))
        return roots[order]

    # -- eviction ----------------------------------------------------------------------------------
    def allocated_under(self, root):
        """(frames, sizes, owners) of the ALLOCATED chunks under a root chunk, in address order."""
        frames, sizes, owners = [], [], []
        for level in range(self.nlevels):
            per = self.per_root[level]
            nodes = np.arange(root * per, (root + 1) * per)
            hit = nodes[self.state[level][nodes] == CHUNK_STATE_ALLOCATED]
            frames.append(self.frames_of(level, hit))
            sizes.append(np.full(hit.size, self.sizes[level], np.int64))
            owners.append(self.owner[level][hit])
        frames = np.concatenate(frames)
        order = np.argsort(frames, kind="stable")
        return frames[order], np.concatenate(sizes)[order], np.concatenate(owners)[order]

    def start_eviction(self, root):
        """chunk_start_eviction + pin_free_chunks_func: the root leaves its list and its free
        subchunks are pinned so that no allocation takes them."""
        root = int(root)
        if (self.alloc_list[root] == ALLOC_LIST_NONE or self.pinned[root] > 0 or self.in_eviction[root]
                or self.state[0][root] == CHUNK_STATE_FREE):
            raise PmmError(f"root chunk {root} is not evictable (free, pinned or already being evicted)")
        self.in_eviction[root] = True
        self.alloc_list[root] = ALLOC_LIST_NONE
        self.list_seq[root] = -1
        for level in range(self.nlevels):
            per = self.per_root[level]
            nodes = np.arange(root * per, (root + 1) * per)
            self._set_state(level, nodes[self.state[level][nodes] == CHUNK_STATE_FREE], CHUNK_STATE_TEMP_PINNED)

    def finish_eviction(self, root):
        """Merge the evicted root chunk (all its chunks now pinned) and free it."""
        root = int(root)
        if not self.in_eviction[root]:
            raise PmmError(f"root chunk {root} is not being evicted")
        frames, _, owners = self.allocated_under(root)
        if frames.size:
            raise PmmError(f"root chunk {root}: {frames.size} chunk(s) still allocated to blocks "
                           f"{np.unique(owners)[:4].tolist()} after eviction")
        for level in range(1, self.nlevels):
            per = self.per_root[level]
            nodes = np.arange(root * per, (root + 1) * per)
            self._set_state(level, nodes, CHUNK_STATE_NONE)
            self.owner[level][nodes] = -1
        self.owner[0][root] = -1
        self.in_eviction[root] = False
        self._set_state(0, np.array([root]), CHUNK_STATE_FREE)
        self._retire_free_roots(np.array([root]))
        self.stats["root_chunks_evicted"] += 1

    def abort_eviction(self, root):
        """The error path of evict_root_chunk: stop evicting and free what the eviction holds."""
        root = int(root)
        self.in_eviction[root] = False
        held = []
        for level in range(self.nlevels):
            per = self.per_root[level]
            nodes = np.arange(root * per, (root + 1) * per)
            pin = nodes[(self.state[level][nodes] == CHUNK_STATE_TEMP_PINNED) & (self.owner[level][nodes] < 0)]
            self._set_state(level, pin, CHUNK_STATE_FREE)
            held.append(pin)
        self._merge_free(held)
        self._retire_free_roots(np.array([root]))
        self._update_lists(np.array([root]))

    def evict_root_chunk(self, root, evict):
        """evict_root_chunk: pin the root's free chunks, have ``evict(root, frames, owners)`` move
        every allocated chunk's pages out (it frees them, which pins them here), merge and free."""
        self.start_eviction(root)
        frames, _, owners = self.allocated_under(root)
        try:
            if frames.size:
                evict(int(root), frames, owners)
        except BaseException:
            self.abort_eviction(root)
            raise
        self.finish_eviction(root)

    # -- inspection --------------------------------------------------------------------------------
    def frame_owner(self):
        """Per 4 KiB frame: the block owning the chunk that covers it, -1 when free or unowned."""
        out = np.full(self.nframes, -1, np.int64)
        for level in range(self.nlevels):
            st = self.state[level]
            leaf = (st == CHUNK_STATE_ALLOCATED) | (st == CHUNK_STATE_TEMP_PINNED)
            cover = np.repeat(leaf, self.fpc[level])
            out[cover] = np.repeat(self.owner[level][leaf], self.fpc[level])
        return out

    def free_bytes(self):
        return int(sum(np.count_nonzero(self.state[lv] == CHUNK_STATE_FREE) * self.sizes[lv]
                       for lv in range(self.nlevels)))

    def check(self, block_frames=None):
        """Assert every PMM invariant; with ``block_frames`` = (owners, frames) pairs from the VA
        blocks' page maps, also that every frame a block maps is in a chunk owned by that block and
        mapped by no other page.  Raises PmmError naming the first broken rule."""
        def fail(msg):
            raise PmmError(f"pmm invariant: {msg}")
        if np.any(self.state[0] == CHUNK_STATE_NONE):
            fail("a root chunk slot is not a chunk")
        for level in range(self.nlevels):
            st, own = self.state[level], self.owner[level]
            if np.any((st < CHUNK_STATE_NONE) | (st > CHUNK_STATE_ALLOCATED)):
                fail(f"bad state at level {level}")
            if np.any((st == CHUNK_STATE_ALLOCATED) & (own < 0)):
                fail(f"an allocated {self.sizes[level]}-byte chunk has no block")
            if np.any(((st == CHUNK_STATE_FREE) | (st == CHUNK_STATE_IS_SPLIT) | (st == CHUNK_STATE_NONE)) & (own >= 0)):
                fail(f"a free, split or absent {self.sizes[level]}-byte chunk names a block")
            fs = self.free_seq[level][st == CHUNK_STATE_FREE]
            if np.any(fs < 0) or np.unique(fs).size != fs.size:
                fail(f"free list of {self.sizes[level]}-byte chunks out of order")
            if np.any(self.free_seq[level][st != CHUNK_STATE_FREE] >= 0):
                fail("a chunk not free is on a free list")
            if level + 1 < self.nlevels:
                kids = self.state[level + 1].reshape(-1, self.ratio[level + 1])
                split = st == CHUNK_STATE_IS_SPLIT
                if np.any(split[:, None] & (kids == CHUNK_STATE_NONE)):
                    fail(f"a split {self.sizes[level]}-byte chunk misses a child")
                if np.any(~split[:, None] & (kids != CHUNK_STATE_NONE)):
                    fail(f"a {self.sizes[level + 1]}-byte chunk under an unsplit parent")
                if np.any(split & (kids == CHUNK_STATE_FREE).all(axis=1)):
                    fail(f"a split {self.sizes[level]}-byte chunk whose children are all free was not merged")
            elif np.any(st == CHUNK_STATE_IS_SPLIT):
                fail("a smallest chunk is split")
        pinned = np.zeros(self.nroots, np.int64)
        for level in range(self.nlevels):
            np.add.at(pinned, np.flatnonzero(self.state[level] == CHUNK_STATE_TEMP_PINNED) // self.per_root[level], 1)
        if not np.array_equal(pinned, self.pinned):
            fail("pinned chunk counts disagree with the chunk states")
        off = (self.pinned > 0) | (self.state[0] == CHUNK_STATE_FREE) | self.in_eviction
        if np.any(off != (self.alloc_list == ALLOC_LIST_NONE)):
            fail("a root chunk is on an eviction list iff it is allocated, unpinned and not being evicted")
        ls = self.list_seq[~off]
        if np.any(ls < 0) or np.unique(ls).size != ls.size:
            fail("eviction list positions are not unique")
        for level in range(self.nlevels):
            fr = np.flatnonzero(self.state[level] == CHUNK_STATE_FREE) // self.per_root[level]
            if np.any(self.in_eviction[fr]):
                fail("a root chunk being evicted has a free chunk")
        if block_frames is not None:
            owners, frames = (np.asarray(a, np.int64).ravel() for a in block_frames)
            if np.unique(frames).size != frames.size:
                fail("a device frame is mapped by two VA block pages")
            fo = self.frame_owner()
            bad = fo[frames] != owners
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                fail(f"frame {int(frames[i])} is mapped by block {int(owners[i])} but owned by {int(fo[frames[i]])}")
