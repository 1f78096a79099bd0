"""The few entry points of the emulated host kernel (hmmgpu/mm) that the HMM core calls.

Kept in one place so the HMM core reads like mm/hmm.c and mm/migrate_device.c
and the seams with mm/ are easy to audit: the VMA walk, handle_mm_fault() as
hmm_vma_fault() uses it (errors become -EFAULT), and migration_entry_wait().
"""
import errno

from ..errors import ProcessKilled


def vmas_in(mm, start, end):
    """The VMAs that intersect [start, end), in address order."""
    return mm.vmas_in(start, end)


def handle_mm_fault(vma, start, end, write):
    """0, or -EFAULT where Linux's handle_mm_fault() would return VM_FAULT_ERROR."""
    try:
        vma.mm.handle_mm_fault(vma, start, end, write)
    except ProcessKilled:
        raise
    except OSError:
        return -errno.EFAULT
    return 0


def migration_entry_wait(phys, pfn):
    """migration_entry_wait(): sleep until the page under a migration entry is unlocked."""
    phys.wait_unlocked(int(pfn))
