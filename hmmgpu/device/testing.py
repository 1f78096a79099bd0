"""A toy driver for the device layer's tests and benchmarks (no mm, no HMM core).

``ToyDriver`` keeps a "CPU page table" of its own -- one window of virtual pages, each backed
by a frame that holds its data -- and services device faults the way a real driver would after
hmm_range_fault: map the backing frame remotely (zero-copy over PCIe), or migrate it to a fresh
device frame with the DMA engine first.  Everything is vectorised; it is deterministic for a
given seed, so the two backends can be compared byte for byte.
"""
import errno

import numpy as np

from ..constants import PAGE_SIZE
from .pagetable import PTE_ATOMIC, PTE_WRITE

WINDOW_BASE = 0x7F0000000000


class ToyDriver:
    def __init__(self, dev, npages, *, migrate="odd", block_pages=1, ram_start=1, space=None):
        self.dev = dev
        self.pt = (space if space is not None else dev).pt   # a context's page table, or the device's
        self.base = WINDOW_BASE
        self.vpn0 = self.base >> 12
        self.npages = int(npages)
        self.backing = np.full(self.npages, -1, dtype=np.int64)   # pfn holding each page's data
        self.prot_none = np.zeros(self.npages, dtype=bool)        # PROT_NONE: fatal on fault
        self.next_ram = int(ram_start)            # pfn 0 stays unused, like the zero page
        self.next_dev = dev.pfn_base
        self.next_va = 0
        self.migrate = migrate                    # "odd": odd vpns migrate; "all"; "none"
        self.block_pages = int(block_pages)       # service whole blocks (UVM's 2 MiB = 512)
        self.serviced = []                        # (vpn, access) arrays, one per batch
        self.calls = 0

    # -- building memory ---------------------------------------------------------------------
    def alloc_ram(self, n):
        if self.next_ram + n > self.dev.nr_ram:
            raise MemoryError("toy driver: out of system RAM frames")
        p = np.arange(self.next_ram, self.next_ram + n, dtype=np.int64)
        self.next_ram += n
        return p

    def alloc_dev(self, n):
        if self.next_dev + n > self.dev.pfn_base + self.dev.nframes:
            raise MemoryError("toy driver: out of device frames")
        p = np.arange(self.next_dev, self.next_dev + n, dtype=np.int64)
        self.next_dev += n
        return p

    def region(self, npages, data=None, rng=None, scatter=True):
        """A new range of ``npages`` virtual pages backed by RAM frames (shuffled when ``rng``
        and ``scatter``); ``data`` (bytes, npages * 4096) is written into them.  Returns vaddr."""
        if self.next_va + npages > self.npages:
            raise MemoryError("toy driver: window full")
        first = self.next_va
        self.next_va += npages
        pfns = self.alloc_ram(npages)
        if rng is not None and scatter:
            pfns = rng.permutation(pfns)
        self.backing[first:first + npages] = pfns
        if data is not None:
            self.dev.write_pages(pfns, np.frombuffer(bytes(data), np.uint8).reshape(npages, PAGE_SIZE)
                                 if not isinstance(data, np.ndarray) else data.reshape(npages, PAGE_SIZE))
        return self.base + first * PAGE_SIZE

    def vpns(self, vaddr, npages):
        return (vaddr >> 12) + np.arange(npages, dtype=np.int64)

    def map(self, vpns, flags=PTE_WRITE | PTE_ATOMIC):
        """Map ``vpns`` to their backing frames now (no fault needed)."""
        i = np.asarray(vpns, np.int64) - self.vpn0
        return self.pt.map(vpns, self.backing[i], flags)

    def data(self, vaddr, npages):
        """The current bytes of a virtual range, wherever its pages live."""
        i = self.vpns(vaddr, npages) - self.vpn0
        return self.dev.read_pages(self.backing[i]).reshape(-1)

    # -- the fault handler -------------------------------------------------------------------
    def service(self, faults):
        self.calls += 1
        vpn = faults.vpn
        self.serviced.append((vpn.copy(), faults.access.copy()))
        i = vpn - self.vpn0
        inside = (i >= 0) & (i < self.npages)
        ok = inside.copy()
        ok[inside] = (self.backing[i[inside]] >= 0) & ~self.prot_none[i[inside]]
        fatal = np.where(ok, 0, errno.EFAULT)
        i = np.unique(i[ok])                 # sorted: frames are handed out in address order
        if self.block_pages > 1:            # the whole aligned block around each fault
            blk = np.unique(i // self.block_pages) * self.block_pages
            i = (blk[:, None] + np.arange(self.block_pages)).reshape(-1)
            i = i[(i < self.npages)]
            i = i[(self.backing[i] >= 0) & ~self.prot_none[i]]
        if i.size == 0:
            return fatal
        pf = self.backing[i]
        if self.migrate != "none":
            move = ~self.dev.owns(pf)
            if self.migrate == "odd":
                move &= ((i + self.vpn0) % 2) == 1
            if move.any():
                new = self.alloc_dev(int(move.sum()))
                # no wait: the device runs the copy, the map and the replay in queue order
                self.dev.copy_pages(new, pf[move])
                pf = pf.copy()
                pf[move] = new
                self.backing[i[move]] = new
        self.pt.map(i + self.vpn0, pf, PTE_WRITE | PTE_ATOMIC)
        return fatal
