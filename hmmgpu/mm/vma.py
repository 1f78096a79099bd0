"""struct vm_area_struct: one mapping of an address space, with its PTE array.

A VMA is [start, end) with vm_flags, what backs it (nothing for private
anonymous memory, a ``PageCache`` for files and shmem, a driver for mixed
maps), the page offset into that backing, and ``pte``: one uint64 entry per page
(see pgtable.py).

``pte`` is a view into a page table that neighbouring VMAs may share, as the
VMAs of one PMD share a PTE page in Linux: splitting a VMA (mprotect, munmap of
a part, mremap) gives both halves views of the same table, and merging two
VMAs whose views lie side by side in one table (what a split made) widens the
view again.  Neither copies an entry, so a one-page mprotect costs the same in
a VMA of any size.  The table (``pte.base``) lives as long as some view of it.
"""
import numpy as np

from ..constants import PAGE_SHIFT, PROT_EXEC, PROT_READ, PROT_WRITE

VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_SHARED = 0x8
VM_MAYREAD = 0x10
VM_MAYWRITE = 0x20
VM_MAYEXEC = 0x40
VM_MAYSHARE = 0x80
VM_PFNMAP = 0x400
VM_IO = 0x4000
VM_DONTCOPY = 0x20000
VM_DONTEXPAND = 0x40000
VM_HUGETLB = 0x00400000
VM_MIXEDMAP = 0x10000000
VM_HUGEPAGE = 0x20000000
VM_NOHUGEPAGE = 0x40000000

VM_ACCESS = VM_READ | VM_WRITE | VM_EXEC


def prot_to_vm(prot):
    return ((VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0)
            | (VM_EXEC if prot & PROT_EXEC else 0))


class VMA:
    __slots__ = ("mm", "start", "end", "vm_flags", "file", "pgoff", "pte", "driver", "anon_id")

    def __init__(self, mm, start, end, vm_flags, file=None, pgoff=0, driver=None, anon_id=0, pte=None):
        self.mm = mm
        self.start = int(start)
        self.end = int(end)
        self.vm_flags = vm_flags
        self.file = file
        self.pgoff = int(pgoff)
        self.driver = driver
        self.anon_id = anon_id        # fork family: which address spaces may share its anon pages
        self.pte = np.zeros(self.npages, dtype=np.uint64) if pte is None else pte

    @property
    def npages(self):
        return (self.end - self.start) >> PAGE_SHIFT

    def idx(self, addr):
        """Index into ``pte`` of the page holding ``addr``."""
        return (int(addr) - self.start) >> PAGE_SHIFT

    def addrs(self, i0, i1):
        return self.start + (np.arange(i0, i1, dtype=np.int64) << PAGE_SHIFT)

    @property
    def shared(self):
        return bool(self.vm_flags & VM_SHARED)

    @property
    def cow(self):
        """is_cow_mapping(): private and potentially writable."""
        return (self.vm_flags & (VM_SHARED | VM_MAYWRITE)) == VM_MAYWRITE

    def split(self, addr):
        """Cut at ``addr``: self keeps [start, addr), the returned VMA is [addr, end)."""
        i = self.idx(addr)
        right = VMA(self.mm, addr, self.end, self.vm_flags, self.file,
                    self.pgoff + (i if self.file is not None else 0), self.driver, self.anon_id,
                    self.pte[i:])
        self.pte = self.pte[:i]
        self.end = int(addr)
        if self.file is not None:
            self.file.nr_mappings += 1
        return right

    def __repr__(self):
        flags = "".join(c if self.vm_flags & f else "-" for c, f in
                        (("r", VM_READ), ("w", VM_WRITE), ("x", VM_EXEC))) + ("s" if self.shared else "p")
        what = self.file.name if self.file is not None else ("driver" if self.driver is not None else "anon")
        return f"VMA([0x{self.start:x}, 0x{self.end:x}) {flags} {what})"


def pte_table(pte):
    """The page table that ``pte`` (a VMA's entries) is a view of."""
    return pte if pte.base is None else pte.base


def ptes_join(left, right):
    """The entries of two VMAs side by side in the address space, as one array.

    Views that sit side by side in one table (two halves of a split) become one wider
    view of it, at no cost; anything else is copied into a new table.
    """
    table = pte_table(left)
    if pte_table(right) is table:
        lp, rp = left.ctypes.data, right.ctypes.data
        if lp + left.nbytes == rp:
            first = (lp - table.ctypes.data) // table.itemsize
            return table[first:first + left.size + right.size]
    return np.concatenate((left, right))


def ptes_compact(vma):
    """Give ``vma`` a table of its own when its view holds under a quarter of a shared
    table (its neighbours were unmapped), so that the rest of the table can be freed."""
    table = pte_table(vma.pte)
    if table is not vma.pte and vma.pte.size * 4 < table.size:
        vma.pte = vma.pte.copy()


def vma_is_anonymous(vma):
    """Private anonymous memory (shmem, hugetlb and driver mappings are not)."""
    return vma.file is None and vma.driver is None and not vma.vm_flags & VM_HUGETLB
