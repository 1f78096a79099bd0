"""CPU page-table entries (arch/x86 pgtable + include/linux/swapops.h), as uint64 arrays.

Each VMA owns one PTE per page in a NumPy ``uint64`` array, so every range
operation is a single vectorised pass over a slice.  Layout::

    bits 63..12  pfn (present entries and swap-like entries alike)
    bit 0 PRESENT   1 WRITE   2 DIRTY   3 YOUNG   4 SPECIAL (driver page in a mixed map)
    bit 5 HUGE (_PAGE_PSE): the entry is one of the 512 of a PMD-level mapping
    bits 11..8   type of a non-present, non-none entry (SWP_*)
    0            pte_none: nothing mapped

A PMD mapping (a THP, the huge zero page, a hugetlb page, a device-private or
migration PMD entry) stays 512 entries of the VMA's array, one per 4 KiB page,
all with HUGE set, all of one kind, pointing at the consecutive pages of one
naturally aligned 2 MiB folio, at a 2 MiB aligned virtual address.  Splitting
the PMD (split_huge_pmd) is clearing HUGE on those 512 entries: every entry
already names its own page, and the reference counts are per page.

The non-present types are the "special swap entries" HMM adds: a device-private
page (readable or writable), a device-exclusive entry (the device holds the page
for atomics), and a migration entry (the page is locked and being moved).
"""
import numpy as np

PFN_SHIFT = 12

PTE_PRESENT = np.uint64(1 << 0)
PTE_WRITE = np.uint64(1 << 1)
PTE_DIRTY = np.uint64(1 << 2)
PTE_YOUNG = np.uint64(1 << 3)
PTE_SPECIAL = np.uint64(1 << 4)
PTE_HUGE = np.uint64(1 << 5)

SWP_SHIFT = 8
SWP_MASK = np.uint64(0xF << SWP_SHIFT)
SWP_DEVICE_PRIVATE_READ = 1
SWP_DEVICE_PRIVATE_WRITE = 2
SWP_DEVICE_EXCLUSIVE_READ = 3
SWP_DEVICE_EXCLUSIVE_WRITE = 4
SWP_MIGRATION_READ = 5
SWP_MIGRATION_WRITE = 6

_U64 = np.uint64
_PFN_SHIFT = np.uint64(PFN_SHIFT)
_SWP_SHIFT = np.uint64(SWP_SHIFT)


def pte_pfn(pte):
    return (np.asarray(pte, dtype=_U64) >> _PFN_SHIFT).astype(np.int64)


def pte_none(pte):
    return np.asarray(pte, dtype=_U64) == 0


def pte_present(pte):
    return (np.asarray(pte, dtype=_U64) & PTE_PRESENT) != 0


def pte_write(pte):
    """Writable present entry."""
    p = np.asarray(pte, dtype=_U64)
    return (p & (PTE_PRESENT | PTE_WRITE)) == (PTE_PRESENT | PTE_WRITE)


def pte_huge(pte):
    """Entries of a PMD-level mapping (pmd_trans_huge / pmd_leaf / a PMD swap entry)."""
    return (np.asarray(pte, dtype=_U64) & PTE_HUGE) != 0


def swp_type(pte):
    """Type of a non-present entry (0 for present or none entries)."""
    p = np.asarray(pte, dtype=_U64)
    t = ((p & SWP_MASK) >> _SWP_SHIFT).astype(np.int64)
    return np.where((p & PTE_PRESENT) != 0, 0, t)


def is_swap(pte):
    p = np.asarray(pte, dtype=_U64)
    return ((p & PTE_PRESENT) == 0) & (p != 0)


def is_device_private(pte):
    t = swp_type(pte)
    return (t == SWP_DEVICE_PRIVATE_READ) | (t == SWP_DEVICE_PRIVATE_WRITE)


def is_device_exclusive(pte):
    t = swp_type(pte)
    return (t == SWP_DEVICE_EXCLUSIVE_READ) | (t == SWP_DEVICE_EXCLUSIVE_WRITE)


def is_migration(pte):
    t = swp_type(pte)
    return (t == SWP_MIGRATION_READ) | (t == SWP_MIGRATION_WRITE)


def is_writable_swp(pte):
    """The swap-like entry remembers a writable mapping."""
    t = swp_type(pte)
    return (t == SWP_DEVICE_PRIVATE_WRITE) | (t == SWP_DEVICE_EXCLUSIVE_WRITE) | (t == SWP_MIGRATION_WRITE)


def has_pfn(pte):
    """Entries that hold a page reference: present ones and every swap-like type here."""
    return ~pte_none(pte)


def mk_pte(pfns, flags=PTE_PRESENT):
    """Present entries for ``pfns`` with ``flags`` (PRESENT is always set)."""
    pfns = np.asarray(pfns, dtype=_U64)
    return (pfns << _PFN_SHIFT) | _U64(flags) | PTE_PRESENT


def mk_swp(pfns, types):
    """Non-present entries of type(s) ``types`` pointing at ``pfns``."""
    pfns = np.asarray(pfns, dtype=_U64)
    return (pfns << _PFN_SHIFT) | (np.asarray(types, dtype=_U64) << _SWP_SHIFT)


def pte_wrprotect(pte):
    """Clear WRITE on present entries; turn writable swap-like entries into their read form."""
    p = np.asarray(pte, dtype=_U64)
    if not is_swap(p).any():
        return p & ~PTE_WRITE                  # present and none entries only: one pass
    p = p.copy()
    present = (p & PTE_PRESENT) != 0
    p[present] &= ~PTE_WRITE
    t = swp_type(p)
    for w, r in ((SWP_DEVICE_PRIVATE_WRITE, SWP_DEVICE_PRIVATE_READ),
                 (SWP_DEVICE_EXCLUSIVE_WRITE, SWP_DEVICE_EXCLUSIVE_READ),
                 (SWP_MIGRATION_WRITE, SWP_MIGRATION_READ)):
        sel = t == w
        p[sel] = (p[sel] & ~SWP_MASK) | _U64(r << SWP_SHIFT)
    return p
