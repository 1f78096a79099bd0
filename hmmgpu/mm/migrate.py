"""Page migration state transfer: folio_migrate_mapping() / folio_migrate_flags() of mm/migrate.c.

When a page's contents move to a new frame (system RAM <-> device memory, or
between RAM frames), the new struct page takes over what the old one stood
for: anon-ness and dirtiness, its page-cache slot (mapping, index), and its
memory-cgroup charge.  The charge *moves* (mem_cgroup_migrate), so migrating
device memory back to system memory can never fail on a cgroup limit (the HMM
documentation, section 7) and nothing is charged twice.
"""
import numpy as np

from .physmem import PG_ANON, PG_DIRTY, PG_SWAPBACKED, PG_UPTODATE, add_at

# Flags that describe the data, not the frame (PG_LOCKED, PG_ZONE_DEVICE, PG_RESERVED stay).
MIGRATE_FLAGS = PG_ANON | PG_DIRTY | PG_SWAPBACKED | PG_UPTODATE


def migrate_expected_refs(system, pfns, extra=0):
    """folio_expected_ref_count() + the migrator's own reference: 1, +1 for a page-cache page."""
    mapping = system.phys.pages.mapping[np.asarray(pfns, dtype=np.int64)]
    return 1 + (mapping >= 0).astype(np.int32) + np.asarray(extra, dtype=np.int32)


def folio_migrate_mapping(system, new, old, extra=0):
    """Move the page-cache slot of ``old`` to ``new``; returns a success mask.

    Fails (like -EAGAIN) where ``old`` has references beyond the expected ones:
    someone pinned it or looked it up meanwhile.  The caller holds phys.lock.
    """
    phys = system.phys
    pg = phys.pages
    new = np.asarray(new, dtype=np.int64)
    old = np.asarray(old, dtype=np.int64)
    mapping = pg.mapping[old]
    # folio_expected_ref_count(): the migrator's reference, and the page cache's
    ok = (pg.refcount[old] - (mapping >= 0) == 1 + np.asarray(extra, dtype=np.int32)) & (
        pg.mapcount[old] == 0) & (pg.pincount[old] == 0)
    filed = ok & (mapping >= 0)
    if np.count_nonzero(filed):
        caches = getattr(system, "caches", {})
        for mid in np.unique(pg.mapping[old[filed]]).tolist():
            sel = filed & (pg.mapping[old] == mid)
            cache = caches.get(mid)
            if cache is None or not hasattr(cache, "replace"):
                ok[sel] = False
                continue
            cache.replace(old[sel], new[sel])
            # the cache's reference moves with the slot
            add_at(pg.refcount, new[sel], 1)
            add_at(pg.refcount, old[sel], -1)
    return ok


def folio_migrate_flags(system, new, old):
    """Copy the data's flags, mapping/index and move the memcg charge from ``old`` to ``new``."""
    pg = system.phys.pages
    new = np.asarray(new, dtype=np.int64)
    old = np.asarray(old, dtype=np.int64)
    pg.flags[new] = (pg.flags[new] & ~MIGRATE_FLAGS) | (pg.flags[old] & MIGRATE_FLAGS)
    mapping = pg.mapping[old]
    pg.mapping[new] = mapping
    if np.count_nonzero(mapping >= 0):
        pg.index[new] = pg.index[old]        # only page-cache pages have an index
    if not system.phys.memcgs:
        return                               # no memory cgroup: nothing is charged
    # mem_cgroup_migrate(): the charge moves; the old frame is freed uncharged.
    cg = pg.memcg[old]
    moved = cg >= 0
    if np.count_nonzero(moved) == moved.size:
        pg.memcg[new] = cg
        pg.memcg[old] = -1
    else:
        pg.memcg[new[moved]] = cg[moved]
        pg.memcg[old[moved]] = -1
