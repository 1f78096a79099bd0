"""ZONE_DEVICE memory: struct dev_pagemap, memremap_pages() of mm/memremap.c.

A driver describes a range of its device memory with a ``DevPagemap`` (type,
ops, owner) and hands it to ``memremap_pages``, which takes a free physical
range (``request_free_mem_region``), gives every device frame a struct page,
and backs the frames with the device's own arena from the backend (GPU memory
on CuPy, a NumPy array on the fallback).

Two types, as in today's Linux:

* ``MEMORY_DEVICE_PRIVATE``: the CPU cannot address the frames.  A page that
  backs process memory is mapped by a device-private swap entry; a CPU access
  faults into ``ops.migrate_to_ram``.
* ``MEMORY_DEVICE_COHERENT``: the CPU can address them (CXL, CAPI...), so they
  are mapped with ordinary present PTEs.  They sit on their own memory node
  whose capability mask, set by the driver at registration, says which kernel
  features may use them (``page_node_allow``, the per-page check of
  reference/cdm-vma-flag-thread.txt, rather than a per-VMA flag).

Refcount lifecycle: a device page is free at refcount 0 (today's rule; the
2017 seed documents free at refcount 1, the 2 -> 1 transition of
reference/zone-device-refcount-thread.txt).  ``zone_device_page_init`` takes a
free page (with ``order``, a free 2 MiB folio: the 2025 device-THP series'
zone_device_folio_init) to refcount 1, locked, when the driver allocates it;
when the last reference goes, physmem hands it back through
``ops.folio_free(heads, order)`` -- one call per pgmap and order, the head pfns
of the folios freed -- or, for a driver written to the older name,
``ops.page_free(pfns)`` with every page.  A device folio split into small pages
(a 2 MiB migration whose other side took small pages) is announced through
``ops.folio_split(heads, order)`` when the driver has it.
"""
import errno

import numpy as np

from ..constants import HPAGE_PMD_ORDER
from ..errors import DriverBug, oserror
from ..mm.physmem import (MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_FS_DAX, MEMORY_DEVICE_GENERIC,  # noqa: F401
                          MEMORY_DEVICE_PCI_P2PDMA, MEMORY_DEVICE_PRIVATE, NODE_ALLOW_ALL,
                          NODE_ALLOW_FALLBACK_ALLOC, NODE_ALLOW_HUGETLB, NODE_ALLOW_KSM,
                          NODE_ALLOW_LONGTERM_PIN, NODE_ALLOW_NUMA_BALANCING, PG_HEAD, PG_LOCKED,
                          PG_ZONE_DEVICE)

# x86-64 with 4-level paging: 46 bits of physical address, the pfns every segment must fit in
MAX_PHYSMEM_BITS = 46
MAX_PHYSMEM_PFNS = 1 << (MAX_PHYSMEM_BITS - 12)


class DevPagemapOps:
    """struct dev_pagemap_ops: what the kernel calls back into a driver about its pages.

    ``folio_free(heads, order)`` (today's name) or ``page_free(pfns)`` (the older one) hands
    freed pages back; ``folio_split(heads, order)``, optional, announces a device folio split
    into small pages."""

    def page_free(self, pfns):
        """The last reference of each page in ``pfns`` (a NumPy array) went: the pages are the
        driver's again (back on its free list).  Called once per pgmap with every such pfn."""
        raise NotImplementedError

    def migrate_to_ram(self, vmf):
        """A CPU access faulted on device-private pages (``vmf.addresses`` / ``vmf.pfns``, in
        ``vmf.vma``): migrate them to system memory with migrate_vma_setup (``fault_page``),
        the copy, migrate_vma_pages and migrate_vma_finalize.  Returns 0 or VM_FAULT_*."""
        raise NotImplementedError


class MemoryNode:
    """A NUMA node holding coherent device memory, with the driver's capability mask."""

    def __init__(self, nid, caps):
        self.nid = nid
        self.caps = int(caps)

    def __repr__(self):
        return f"MemoryNode({self.nid}, caps=0x{self.caps:x})"


class DevPagemap:
    """struct dev_pagemap: ``nr_pages`` frames of one device's memory.

    Filled by the driver: ``type``, ``ops``, ``owner`` (the ``dev_private_owner``
    that hmm_range_fault and migrate_vma match against), ``nr_pages``, and for
    coherent memory ``caps`` (a NODE_ALLOW_* mask).  Filled by memremap_pages:
    ``pfn_first``, ``pfn_last`` (exclusive), ``arena``, ``index`` (in
    ``phys.pgmaps``), ``node``.  A driver whose frames exist already (an
    EmulatedDevice's arena, known to the device's MMU at its pfn_base) passes
    ``arena`` and ``pfn_first`` (taken with ``phys.request_free_mem_region``).
    """

    def __init__(self, type, ops, owner, nr_pages, caps=0, gpu=0, arena=None, pfn_first=-1):
        self.type = type
        self.ops = ops
        self.owner = owner
        self.nr_pages = nr_pages            # checked by memremap_pages
        self.caps = caps
        self.gpu = gpu
        self.system = None
        self.pfn_first = int(pfn_first)
        self.pfn_last = -1
        self.arena = arena
        self.index = -1
        self.node = None
        self.live = False

    def __repr__(self):
        kind = {MEMORY_DEVICE_PRIVATE: "private", MEMORY_DEVICE_COHERENT: "coherent"}.get(self.type, self.type)
        return f"DevPagemap({kind}, pfn [{self.pfn_first}, {self.pfn_last}), owner={self.owner!r})"


def memremap_pages(pgmap, system):
    """memremap_pages() of mm/memremap.c: hotplug ``pgmap.nr_pages`` frames of device memory.

    The driver fills ``pgmap``: ``type`` (MEMORY_DEVICE_PRIVATE or _COHERENT), ``ops`` (with
    ``page_free``, and ``migrate_to_ram`` for private memory), ``owner`` (matched by
    hmm_range_fault's ``dev_private_owner`` and migrate_vma's ``pgmap_owner``) and
    ``nr_pages``; optionally ``arena`` + ``pfn_first`` when the device's frames exist already.
    Every frame gets a struct page, free (refcount 0) until ``zone_device_page_init``.  Returns
    the first pfn; OSError(EINVAL) for a pgmap missing what its type needs or a page count that
    is not a positive integer, ERANGE when it does not fit the physical address space, EBUSY
    if mapped.
    """
    if not isinstance(pgmap, DevPagemap):
        raise oserror(errno.EINVAL, f"memremap_pages needs a DevPagemap, not {type(pgmap).__name__}")
    if pgmap.live:
        raise oserror(errno.EBUSY, f"{pgmap!r} is already mapped")
    if not isinstance(pgmap.nr_pages, (int, np.integer)) or pgmap.nr_pages <= 0:
        raise oserror(errno.EINVAL, f"a dev_pagemap of {pgmap.nr_pages!r:.40} pages")
    pgmap.nr_pages = int(pgmap.nr_pages)
    phys = system.phys
    if phys.pages.n + pgmap.nr_pages > MAX_PHYSMEM_PFNS:
        # request_free_mem_region(): no free range that large in the physical address space
        raise oserror(errno.ERANGE, f"a dev_pagemap of {pgmap.nr_pages} pages does not fit in the "
                      f"{MAX_PHYSMEM_BITS}-bit physical address space")
    ops = pgmap.ops
    if pgmap.type == MEMORY_DEVICE_PRIVATE:
        if ops is None or getattr(ops, "migrate_to_ram", None) is None:
            raise oserror(errno.EINVAL, "device private memory needs ops.migrate_to_ram")
        if not _frees(ops):
            raise oserror(errno.EINVAL, "device private memory needs ops.folio_free or ops.page_free")
        if pgmap.owner is None:
            raise oserror(errno.EINVAL, "device private memory needs an owner")
    elif pgmap.type == MEMORY_DEVICE_COHERENT:
        if ops is None or not _frees(ops):
            raise oserror(errno.EINVAL, "device coherent memory needs ops.folio_free or ops.page_free")
        if pgmap.owner is None:
            raise oserror(errno.EINVAL, "device coherent memory needs an owner")
    else:
        raise oserror(errno.EINVAL, f"memory type {pgmap.type} is not supported here")

    if pgmap.arena is not None:
        # The driver brings its memory: e.g. an EmulatedDevice's arena, whose frames the
        # device's MMU knows at pfn_first (taken earlier with request_free_mem_region).
        arena = pgmap.arena
        if arena.nframes != pgmap.nr_pages or pgmap.pfn_first < phys.nr_ram:
            raise oserror(errno.EINVAL, f"preset arena of {arena.nframes} frames at pfn {pgmap.pfn_first} "
                          f"does not fit a dev_pagemap of {pgmap.nr_pages} pages")
        base = pgmap.pfn_first
    else:
        try:
            arena = system.backend.device_arena(pgmap.nr_pages, gpu=pgmap.gpu)
        except MemoryError:
            raise oserror(errno.ENOMEM, f"no memory for {pgmap.nr_pages} device frames") from None
        base = phys.request_free_mem_region(pgmap.nr_pages)
    pgmap.index = phys.add_segment(base, arena, pgmap)
    pgmap.system = system
    pgmap.arena = arena
    pgmap.pfn_first = base
    pgmap.pfn_last = base + pgmap.nr_pages
    if pgmap.type == MEMORY_DEVICE_COHERENT:
        nodes = _nodes(system)
        pgmap.node = MemoryNode(len(nodes) + 1, pgmap.caps)
        nodes.append(pgmap.node)
    # Private and coherent pages start free: refcount 0 until zone_device_page_init().
    phys.pages.refcount[base:pgmap.pfn_last] = 0
    pgmap.live = True
    return base


def _frees(ops):
    return getattr(ops, "folio_free", None) is not None or getattr(ops, "page_free", None) is not None


def memunmap_pages(pgmap):
    """memunmap_pages(): unplug the pgmap's frames.  Every page must be free -- the driver
    evicts what is in use first (migrate_device_range) -- or it raises OSError(EBUSY)."""
    if not pgmap.live:
        return
    phys = pgmap.system.phys
    phys.remove_segment(pgmap.pfn_first)
    if pgmap.node is not None:
        _nodes(pgmap.system).remove(pgmap.node)
    pgmap.live = False


def _nodes(system):
    nodes = getattr(system, "_hmm_memory_nodes", None)
    if nodes is None:
        nodes = []
        system._hmm_memory_nodes = nodes
    return nodes


def zone_device_page_init(system, pfns, order=0):
    """zone_device_page_init() / zone_device_folio_init(): a driver takes free device pages
    ``pfns`` for a migration's destination: refcount 1 (the driver's reference) and locked, as
    migrate_vma_pages needs; with ``order``, ``pfns`` are the heads of free, naturally aligned
    folios of 2**order pages, which become large folios.  DriverBug for a page that is not
    device memory or still referenced, or a folio head off its alignment."""
    phys = system.phys
    heads = np.asarray(pfns, dtype=np.int64)
    if order and (heads & ((1 << order) - 1)).any():
        raise DriverBug(f"zone_device_folio_init: heads {heads[:4].tolist()} are not aligned to order {order}")
    pfns = phys.folio_pages(heads, order) if order else heads
    pages = phys.pages
    with phys.lock:
        if pfns.size and not ((pages.flags[pfns] & PG_ZONE_DEVICE) != 0).all():
            bad = pfns[(pages.flags[pfns] & PG_ZONE_DEVICE) == 0][0]
            raise DriverBug(f"zone_device_page_init: pfn 0x{int(bad):x} is not device memory (no dev_pagemap)")
        if pfns.size and np.count_nonzero(pages.refcount[pfns]):
            bad = pfns[pages.refcount[pfns] != 0][0]
            raise DriverBug(f"zone_device_page_init: device pfn 0x{int(bad):x} handed out while still "
                            f"referenced (refcount {int(pages.refcount[bad])})")
        pages.refcount[pfns] = 1
        pages.flags[pfns] |= PG_LOCKED
        if order:
            pages.order[pfns] = order
            pages.flags[heads] |= PG_HEAD
            phys.nr_folios += int(heads.size)


def zone_device_folio_init(system, heads, order=HPAGE_PMD_ORDER):
    """zone_device_folio_init(): ``zone_device_page_init`` of whole folios."""
    zone_device_page_init(system, heads, order)


def page_pgmap(system, pfns):
    """page_pgmap() for many pages: index into phys.pgmaps (-1 for RAM)."""
    pages = system.phys.pages
    pfns = np.asarray(pfns, dtype=np.int64)
    return pages.pgmap[pfns]


def zone_device_type(system, pfns):
    """The memory_type of each pfn's pgmap, 0 for system RAM (one pass for every type test)."""
    return system.phys.zone_device_type(pfns)


def is_device_private_page(system, pfns):
    """is_device_private_page() for many pfns: a bool mask."""
    return zone_device_type(system, pfns) == MEMORY_DEVICE_PRIVATE


def is_device_coherent_page(system, pfns):
    """is_device_coherent_page() for many pfns: a bool mask."""
    return zone_device_type(system, pfns) == MEMORY_DEVICE_COHERENT


def is_zone_device_page(system, pfns):
    """is_zone_device_page() for many pfns: a bool mask."""
    pfns = np.asarray(pfns, dtype=np.int64)
    return (system.phys.pages.flags[pfns] & PG_ZONE_DEVICE) != 0


class _AnyOwner:
    """Matches every pgmap owner (the 2017 API had no owners: any device page was selected)."""

    def __repr__(self):
        return "ANY_OWNER"


ANY_OWNER = _AnyOwner()


def pgmap_owner_is(system, pfns, owner):
    """Mask of ``pfns`` whose pgmap's owner is ``owner`` (RAM: never; ANY_OWNER: every device page)."""
    phys = system.phys
    pfns = np.asarray(pfns, dtype=np.int64)
    out = np.zeros(pfns.shape, dtype=bool)
    dev = pfns >= phys.nr_ram
    if not np.count_nonzero(dev) or owner is None:
        return out
    match = phys.pgmap_table(("owner", id(owner)),
                             lambda p: owner is ANY_OWNER or p.owner is owner).astype(bool)
    out[dev] = match[phys.pages.pgmap[pfns[dev]]]
    return out


def page_node_allow(system, pfns, feature):
    """May ``feature`` (a NODE_ALLOW_* bit) use these pages?  A mask, one per pfn (the node
    masks live with struct page, in mm/physmem.py, where GUP consults them too)."""
    return system.phys.node_allows(pfns, feature)


def folio_is_longterm_pinnable(system, pfns):
    """folio_is_longterm_pinnable(): device pages are not, unless their node allows it."""
    return system.phys.longterm_pinnable(pfns)
