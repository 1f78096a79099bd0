"""CONFIG_DEBUG_VM for drivers: checks in the spirit of VM_BUG_ON that catch a driver's mistakes.

The HMM API leaves a driver rules that the kernel only checks in debug builds, if at all; broken,
they corrupt memory or deadlock much later.  Here they raise ``DriverBug`` at the call that broke
them, naming the rule:

* ``migrate_vma_pages`` / ``migrate_device_pages``: every destination page is locked (the driver
  allocated it with ``zone_device_page_init`` or locked it) and holds the driver's reference;
  no destination pfn lies outside the machine's memory (system RAM or a live ``dev_pagemap``),
  and one in device memory belongs to a ``dev_pagemap`` of the migration's ``pgmap_owner`` when
  that owner has device memory of its own;
* a device mapping of pages that ``hmm_range_fault`` returned is installed only after
  ``mmu_interval_read_retry`` said the sequence still holds, in the same thread, with no
  ``mmu_interval_read_begin`` in between (a driver asks for the check on its device page table
  with ``check_device_mappings``; pages still locked by a migration are exempt, as the kernel's
  drivers map them under the page lock);
* every ``migrate_vma_setup`` that collected pages ends with ``migrate_vma_finalize`` in the
  same thread before that thread sets the same ``MigrateVma`` up again, or migrates or calls
  ``hmm_range_fault`` on a range that overlaps it (its pages stay locked behind migration
  entries until then; a driver may run several migrations of other ranges before finalizing
  them all, as UvmDriver does).

The checks are vectorised over the pfn arrays the calls handle anyway, so they are on by
default; ``HMMGPU_DEBUG_VM=0`` in the environment, or ``debug.enabled = False``, turns them off.
"""
import os
import threading

import numpy as np

from ..constants import TASK_SIZE
from ..errors import DriverBug
from ..mm.physmem import PG_LOCKED
from .memremap import ANY_OWNER

__all__ = ["DriverBug", "enabled", "check_device_mappings"]

enabled = os.environ.get("HMMGPU_DEBUG_VM", "1").strip() not in ("0", "no", "off", "false")

_pending = threading.local()          # .migrations: this thread's MigrateVma not yet finalized


def _rng(args):
    return f"[0x{args.start:x}, 0x{args.end:x})"


# -- migrate_vma_pages: the destination pages ------------------------------------------------------

def check_destinations(system, dpfn, moving, owner=None, what="migrate_vma_pages", args=None):
    """The destination pfns ``dpfn`` (-1: none) a driver filled in for the entries ``moving``."""
    if not enabled:
        return
    idx = np.flatnonzero((dpfn >= 0) & moving)
    if idx.size == 0:
        return
    phys = system.phys
    d = dpfn[idx]
    where = f" of {_rng(args)}" if args is not None else ""
    limit = phys.pages.refcount.size
    outside = d >= limit
    if not outside.any():
        seg = phys.pages.pgmap[d]
        ram = d < phys.nr_ram
        outside = ~ram & (seg < 0)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise DriverBug(f"{what}: destination pfn 0x{int(d[i]):x} (entry {int(idx[i])}{where}) is not memory of "
                        f"this machine: neither system RAM nor a live dev_pagemap; fill args.dst with "
                        f"migrate_pfn() of pages the driver allocated")
    dev = d >= phys.nr_ram
    pgmaps = phys.pgmaps
    owners_ok = np.array([p is not None and p.owner is owner for p in pgmaps] + [False], dtype=bool)
    # an owner with device memory of its own migrates into it; a cookie that owns none (a driver
    # borrowing another's memory under an owner of its own) is only held to "inside a pgmap"
    if dev.any() and owner is not None and owner is not ANY_OWNER and owners_ok.any():
        seg = phys.pages.pgmap[d[dev]]
        bad = ~owners_ok[seg]
        if bad.any():
            i = int(np.flatnonzero(dev)[np.flatnonzero(bad)[0]])
            other = pgmaps[int(phys.pages.pgmap[d[i]])]
            raise DriverBug(f"{what}: destination pfn 0x{int(d[i]):x} (entry {int(idx[i])}{where}) is in "
                            f"{other!r}, not in a dev_pagemap of this migration's pgmap_owner "
                            f"{owner!r}; a driver migrates into its own memory")
    flags = phys.pages.flags[d]
    unlocked = (flags & PG_LOCKED) == 0
    if unlocked.any():
        i = int(np.flatnonzero(unlocked)[0])
        raise DriverBug(f"{what}: destination page pfn 0x{int(d[i]):x} (entry {int(idx[i])}{where}) is not "
                        f"locked; lock every new page (zone_device_page_init() for device pages, "
                        f"lock_page() for system pages) before {what}")
    unref = phys.pages.refcount[d] <= 0
    if unref.any():
        i = int(np.flatnonzero(unref)[0])
        raise DriverBug(f"{what}: destination page pfn 0x{int(d[i]):x} (entry {int(idx[i])}{where}) is a "
                        f"free page (refcount 0); take it with zone_device_page_init() or a page "
                        f"allocation so the driver holds a reference")


# -- device mappings and the notifier sequence ------------------------------------------------------

def check_device_mappings(pt, mni, system):
    """Ask for the sequence check on device page table ``pt``, which mirrors ``mni``'s range of
    its mm: every later ``pt.map`` of pages not locked by a migration must come after
    ``mmu_interval_read_retry(mni, seq)`` returned False in the same thread, with no
    ``mmu_interval_read_begin(mni)`` and no invalidation in between (the driver lock held)."""
    def map_check(vpns, pfns):
        if not enabled:
            return
        # only user addresses can change under a notifier (a driver may map its own pages above)
        lo, hi = mni.start >> 12, min(mni.last, TASK_SIZE) >> 12
        vpns = np.asarray(vpns, dtype=np.int64)
        inside = (vpns >= lo) & (vpns <= hi)
        if not inside.any():
            return
        pfns = np.asarray(pfns, dtype=np.int64)[inside]
        phys = system.phys
        ok = pfns < phys.pages.flags.size
        locked = np.zeros(pfns.shape, bool)
        locked[ok] = (phys.pages.flags[pfns[ok]] & PG_LOCKED) != 0
        if locked.all():
            return                    # pages a migration holds locked: mapped under the page lock
        seq = mni.checked.get(threading.get_ident())
        if seq is None or seq != mni.invalidate_seq:
            first = int(vpns[inside][~locked][0]) << 12
            why = ("mmu_interval_read_retry() was not called (or returned True) since "
                   "mmu_interval_read_begin()" if seq is None else
                   "an invalidation ran after mmu_interval_read_retry(): the driver lock was not held")
            raise DriverBug(f"device mapping at 0x{first:x} installed without the notifier sequence check: "
                            f"{why}; take the driver lock, call mmu_interval_read_retry(mni, "
                            f"range.notifier_seq), and map only when it returns False")
    pt.map_check = map_check
    return pt


# -- migrate_vma_setup ... migrate_vma_finalize --------------------------------------------------

def _mine():
    m = getattr(_pending, "migrations", None)
    if m is None:
        m = _pending.migrations = []
    return m


def migration_started(args):
    """migrate_vma_setup collected pages: they stay locked until migrate_vma_finalize."""
    if enabled and args.cpages:
        _mine().append(args)


def migration_finalized(args):
    """migrate_vma_finalize: the migration's pages are unlocked."""
    m = _mine()
    for i, a in enumerate(m):
        if a is args:
            del m[i]
            return


def check_no_unfinished_migration(what, mm, start, end, args=None):
    """Raise DriverBug if this thread left a migration of [start, end) of ``mm`` (or ``args``
    itself) without migrate_vma_finalize: its pages are locked behind migration entries, so a
    new migration would skip them and a fault on them would wait for this thread forever."""
    if not enabled:
        return
    for a in _mine():
        if a is args:
            raise DriverBug(f"{what}: the MigrateVma of {_rng(a)} is set up again before "
                            f"migrate_vma_finalize; finalize every migrate_vma_setup that collected pages")
        if a.vma is not None and a.vma.mm is mm and a.start < end and start < a.end:
            step = "migrate_vma_pages" if a._pages_started else "migrate_vma_setup"
            raise DriverBug(f"{what} of [0x{start:x}, 0x{end:x}): the migration of {_rng(a)} has had {step} "
                            f"but no migrate_vma_finalize (its pages stay locked behind migration entries); "
                            f"call migrate_vma_finalize(args) for every migrate_vma_setup that collected pages")
