"""Which root chunk to evict when device memory runs out: pick_root_chunk_to_evict of uvm_pmm_gpu.c.

UVM evicts whole 2 MiB root chunks.  Its choice (``UvmLru``, the default) is the first root chunk
on the first non-empty eviction list, UNUSED, then DISCARDED, then USED; a root moves to the tail
of USED whenever a chunk under it is allocated, unpinned or freed, or the driver marks it used
(uvm_pmm_gpu_mark_root_chunk_used), so the head is the least recently used.  The alternatives
order the same candidates differently: ``Lfu`` by the fewest use events, ``Fifo`` by when the
root was first allocated, ``RandomEviction`` by a seeded generator.  A candidate is never a root
with a pinned chunk (being allocated for the fault in progress) or one already being evicted.
"""
import numpy as np

from .policy import Knob, Policy


class EvictionPolicy(Policy):
    """Hook: ``choose_victim(pmm)`` returns a root chunk index from ``pmm.evictable_roots()``, or
    None when it wants nothing evicted (the allocation then fails with what it got)."""
    name = "eviction"

    def choose_victim(self, pmm):
        raise NotImplementedError


class UvmLru(EvictionPolicy):
    """pick_root_chunk_to_evict: the head of UNUSED, DISCARDED, USED, in that order."""
    name = "lru"

    def choose_victim(self, pmm):
        roots = pmm.evictable_roots()
        return int(roots[0]) if roots.size else None


class Lfu(EvictionPolicy):
    """The root with the fewest use events (allocations into it, marks of use); ties go to UVM's
    order."""
    name = "lfu"

    def choose_victim(self, pmm):
        roots = pmm.evictable_roots()
        if roots.size == 0:
            return None
        return int(roots[np.argmin(pmm.use_count[roots])])     # argmin keeps the first of a tie


class Fifo(EvictionPolicy):
    """The root allocated longest ago, however recently it was used."""
    name = "fifo"

    def choose_victim(self, pmm):
        roots = pmm.evictable_roots()
        if roots.size == 0:
            return None
        return int(roots[np.argmin(pmm.alloc_seq[roots])])


class RandomEviction(EvictionPolicy):
    """A uniformly random evictable root, from a generator seeded with ``seed``."""
    name = "random"
    KNOBS = {"seed": Knob(0, 0, None, "seed of the victim generator")}

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.rng = np.random.default_rng(self.seed)

    def choose_victim(self, pmm):
        roots = np.sort(pmm.evictable_roots())
        if roots.size == 0:
            return None
        return int(roots[self.rng.integers(roots.size)])


POLICIES = {cls.name: cls for cls in (UvmLru, Lfu, Fifo, RandomEviction)}
