"""VA blocks: uvm_va_block.c's per-page residency and mapping state of every 2 MiB block.

UVM splits the address space it manages into 2 MiB-aligned VA blocks (uvm_va_block_t) and keeps,
per block and per processor (the CPU and each GPU), which of the block's 512 pages are resident
there (``resident`` masks), which physical frame backs each resident GPU page (the chunks), and
how each processor maps each page (``pte_bits``: read, write, atomic).  A page may be resident on
several processors at once only when read-duplicated (cudaMemAdviseSetReadMostly): every copy is
valid and writes are revoked everywhere; the first write collapses the copies to the writer's.

Here the state of all blocks is struct-of-arrays: row ``r`` of ``resident[p]``, ``frame[p]``,
``prot[p]`` and ``map_target[p]`` (shape processors x blocks x 512) is the block whose 2 MiB
number is ``blocks[r]``, and every operation takes rows with a (rows x 512) page mask, so one
call covers any number of blocks with one vectorised pass.  Processor ids are UVM's: 0 is the
CPU (UVM_ID_CPU), GPU ``i`` is ``i + 1``.  The policy of each page (uvm_va_policy_t: preferred
location, accessed-by processors, read duplication) lives here too.  Pages resident nowhere have
not been seen by the driver yet: under HMM they live in system memory, where Linux's page tables
are the truth; ``make_resident`` reports them as to be populated rather than copied.
"""
import numpy as np

from ...device.clock import PAGE_SIZE

UVM_VA_BLOCK_SIZE = 2 << 20
PAGES_PER_UVM_VA_BLOCK = UVM_VA_BLOCK_SIZE // PAGE_SIZE
UVM_BIG_PAGE_SIZE = 64 << 10
PAGES_PER_BIG_PAGE = UVM_BIG_PAGE_SIZE // PAGE_SIZE
UVM_VA_BLOCK_SHIFT = 21

UVM_ID_INVALID = -1
UVM_ID_CPU = 0

# uvm_prot_t
UVM_PROT_NONE = 0
UVM_PROT_READ_ONLY = 1
UVM_PROT_READ_WRITE = 2
UVM_PROT_READ_WRITE_ATOMIC = 3


# uvm_make_resident_cause_t: why pages move (the heuristics treat each differently)
UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT = 0
UVM_MAKE_RESIDENT_CAUSE_NON_REPLAYABLE_FAULT = 1
UVM_MAKE_RESIDENT_CAUSE_ACCESS_COUNTER = 2
UVM_MAKE_RESIDENT_CAUSE_PREFETCH = 3
UVM_MAKE_RESIDENT_CAUSE_EVICTION = 4
UVM_MAKE_RESIDENT_CAUSE_API_TOOLS = 5
UVM_MAKE_RESIDENT_CAUSE_API_MIGRATE = 6
UVM_MAKE_RESIDENT_CAUSE_API_SET_RANGE_GROUP = 7
UVM_MAKE_RESIDENT_CAUSE_API_HINT = 8


def group_sorted(x):
    """``np.unique(x, return_inverse=True, return_counts=True)`` of integers, in one pass without
    a sort when ``x`` is already ascending -- vpns in address order and their blocks, as the fault
    and migration paths hand them over; any other ``x`` is sorted by np.unique."""
    x = np.asarray(x, np.int64).ravel()
    if x.size > 1 and np.any(x[1:] < x[:-1]):
        return np.unique(x, return_inverse=True, return_counts=True)
    head = np.flatnonzero(x[1:] != x[:-1]) + 1
    if x.size:
        head = np.concatenate(([0], head))
    counts = np.diff(np.append(head, x.size))
    return x[head], np.repeat(np.arange(head.size), counts), counts


def uvm_gpu_id(index):
    """The processor id of GPU ``index`` (0-based)."""
    return int(index) + 1


def processor_name(pid):
    return "cpu" if pid == UVM_ID_CPU else f"gpu{pid - 1}"


class Topology:
    """Who can reach whose memory (uvm_va_space_t's accessible_from, can_access, has_fast_link),
    as processor bitmasks (bit ``p`` = processor ``p``).

    The default is a PCIe machine: every processor reaches system memory, GPUs reach each other's
    memory as peers, the CPU reaches no GPU memory (not coherent), and no link is fast (no
    NVLink, so no processor has fast access with native atomics to another's memory).
    """

    def __init__(self, nprocs, accessible_from=None, fast_link=None):
        self.nprocs = int(nprocs)
        everyone = (1 << self.nprocs) - 1
        gpus = everyone & ~1
        if accessible_from is None:
            accessible_from = [everyone] + [gpus] * (self.nprocs - 1)
        self.accessible_from = [int(m) for m in accessible_from]
        self.fast_link = [0] * self.nprocs if fast_link is None else [int(m) for m in fast_link]
        # can_access[p]: the processors whose memory p can map
        self.can_access = [sum(1 << q for q in range(self.nprocs) if self.accessible_from[q] >> p & 1)
                           for p in range(self.nprocs)]

    def can_all_access(self, procs, to):
        """Per element: can every processor of mask ``procs`` access memory of processor ``to``."""
        to = np.asarray(to, np.int64)
        acc = np.asarray(self.accessible_from, np.int64)[np.maximum(to, 0)]
        return (to >= 0) & ((np.asarray(procs, np.int64) & ~acc) == 0)

    def fast_access(self, procs, to):
        """thrashing_processors_have_fast_access_to: every processor of ``procs`` reaches ``to``'s
        memory over a fast link with native atomics (or is ``to`` itself)."""
        to = np.asarray(to, np.int64)
        fast = np.asarray(self.fast_link, np.int64)[np.maximum(to, 0)] | (np.int64(1) << np.maximum(to, 0))
        return (to >= 0) & ((np.asarray(procs, np.int64) & ~fast) == 0)

    def closest_in(self, candidates, src):
        """uvm_processor_mask_find_closest_id, vectorised over candidate masks: ``src`` itself;
        else among those reachable over a fast link, then among those ``src`` can access, the
        lowest GPU before the CPU; else the first processor of the mask; -1 for an empty mask."""
        c = np.asarray(candidates, np.int64)

        def lowest(m, gpu_first):
            g = m & ~np.int64(1) if gpu_first else m
            bit = np.where(g != 0, np.log2(np.maximum(g & -g, 1)).astype(np.int64), -1)
            if gpu_first:
                bit = np.where(bit >= 0, bit, np.where(m & 1 == 1, UVM_ID_CPU, UVM_ID_INVALID))
            return bit

        fast = c & self.fast_link[src]
        reach = c & self.can_access[src]
        out = np.where(fast != 0, lowest(fast, True),
                       np.where(reach != 0, lowest(reach, True), lowest(c, False)))
        return np.where((c >> src) & 1 == 1, src, out)


class ResidencyChange:
    """What ``make_resident`` decided, for the driver to carry out (copies, frees, PT updates).

    ``rows`` the blocks; per page (rows x 512): ``copy_from`` the processor to copy from (-1: no
    copy), ``populate`` pages resident nowhere until now; per processor (processors x rows x 512):
    ``dropped`` copies invalidated (their GPU frames are in ``dropped_frames``), ``unmap`` mappings
    to revoke, ``revoke_write`` mappings to downgrade to read-only.
    """

    def __init__(self, rows, dest, copy_from, populate, dropped, dropped_frames, unmap, revoke_write):
        self.rows, self.dest = rows, dest
        self.copy_from, self.populate = copy_from, populate
        self.dropped, self.dropped_frames = dropped, dropped_frames
        self.unmap, self.revoke_write = unmap, revoke_write

    @property
    def copied(self):
        return self.copy_from >= 0

    def __repr__(self):
        return (f"ResidencyChange(to {processor_name(self.dest)}: {int(self.copied.sum())} copied, "
                f"{int(self.populate.sum())} populated, {int(self.dropped.sum())} copies dropped)")


class VaBlocks:
    """The uvm_va_block_t state of every block a driver has touched, for ``ngpus`` GPUs and the CPU."""

    def __init__(self, ngpus=1, capacity=64):
        self.nprocs = 1 + int(ngpus)
        self.nblocks = 0
        self.blocks = np.zeros(0, np.int64)          # row -> 2 MiB block number (vaddr >> 21)
        # (block numbers sorted, their rows), replaced whole when blocks are added: a reader that
        # takes it once (an mmu notifier, on any thread) sees one consistent version
        self._index = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self._cap = 0
        self._grow(max(int(capacity), 1))
        self.counters = {"num_read_duplicates": 0, "num_read_duplicate_invalidates": 0}

    def _grow(self, cap):
        P, old = self.nprocs, self._cap

        def grown(arr, shape, fill, dtype):
            new = np.full(shape, fill, dtype)
            if old:
                new[..., :old, :] = arr
            return new

        self.resident = grown(getattr(self, "resident", None), (P, cap, PAGES_PER_UVM_VA_BLOCK), False, bool)
        self.frame = grown(getattr(self, "frame", None), (P, cap, PAGES_PER_UVM_VA_BLOCK), -1, np.int64)
        self.prot = grown(getattr(self, "prot", None), (P, cap, PAGES_PER_UVM_VA_BLOCK), UVM_PROT_NONE, np.int8)
        self.map_target = grown(getattr(self, "map_target", None), (P, cap, PAGES_PER_UVM_VA_BLOCK), -1, np.int8)
        self.preferred_location = grown(getattr(self, "preferred_location", None),
                                        (cap, PAGES_PER_UVM_VA_BLOCK), UVM_ID_INVALID, np.int8)
        self.accessed_by = grown(getattr(self, "accessed_by", None), (cap, PAGES_PER_UVM_VA_BLOCK), 0, np.uint32)
        self.read_duplication = grown(getattr(self, "read_duplication", None),
                                      (cap, PAGES_PER_UVM_VA_BLOCK), False, bool)
        # driver bookkeeping per processor: pages it maps remotely and whose accesses the access
        # counters see, and how often each page was evicted from it during its running job
        self.remote = grown(getattr(self, "remote", None), (P, cap, PAGES_PER_UVM_VA_BLOCK), False, bool)
        self.job_evicted = grown(getattr(self, "job_evicted", None), (P, cap, PAGES_PER_UVM_VA_BLOCK), 0, np.uint8)
        self._cap = cap

    # -- lookup -------------------------------------------------------------------------------------
    def rows_of_blocks(self, block_numbers, create=True):
        """Rows of 2 MiB blocks (vaddr >> 21); new blocks get rows when ``create``, else -1."""
        b = np.asarray(block_numbers, np.int64).ravel()
        if b.size > PAGES_PER_UVM_VA_BLOCK // 8:        # many pages' blocks: look each block up once
            u, inv, _ = group_sorted(b)
            if u.size < b.size:
                return self.rows_of_blocks(u, create)[inv]
        srt, srt_rows = self._index
        if srt.size:
            pos = np.minimum(np.searchsorted(srt, b), srt.size - 1)
            found = srt[pos] == b
            rows = np.where(found, srt_rows[pos], -1)
        else:
            found = np.zeros(b.size, bool)
            rows = np.full(b.size, -1, np.int64)
        if create and not found.all():
            new = np.unique(b[~found])
            start = self.nblocks
            if start + new.size > self._cap:
                self._grow(max(2 * self._cap, start + new.size))
            new_rows = np.arange(start, start + new.size, dtype=np.int64)
            self.blocks = np.concatenate([self.blocks, new])
            self.nblocks += new.size
            ins = np.searchsorted(srt, new)
            self._index = (np.insert(srt, ins, new), np.insert(srt_rows, ins, new_rows))
            rows[~found] = new_rows[np.searchsorted(new, b[~found])]
        return rows

    def rows_in(self, first_vpn, end_vpn):
        """(rows, rows x 512 page masks) of the known blocks' pages in vpns [first_vpn, end_vpn)."""
        b0, b1 = int(first_vpn) // PAGES_PER_UVM_VA_BLOCK, (int(end_vpn) - 1) // PAGES_PER_UVM_VA_BLOCK
        srt, srt_rows = self._index
        lo, hi = np.searchsorted(srt, b0, "left"), np.searchsorted(srt, b1, "right")
        rows = srt_rows[lo:hi]
        vpn = self.blocks[rows][:, None] * PAGES_PER_UVM_VA_BLOCK + np.arange(PAGES_PER_UVM_VA_BLOCK)
        return rows, (vpn >= first_vpn) & (vpn < end_vpn)

    def rows_of(self, vaddrs, create=True):
        """(rows, page indices) of virtual addresses."""
        v = np.asarray(vaddrs, np.int64).ravel()
        return self.rows_of_blocks(v >> UVM_VA_BLOCK_SHIFT, create), (v >> 12) & (PAGES_PER_UVM_VA_BLOCK - 1)

    def start_of(self, rows):
        return self.blocks[np.asarray(rows, np.int64)] << UVM_VA_BLOCK_SHIFT

    # -- queries ------------------------------------------------------------------------------------
    def resident_on(self, pid, rows):
        return self.resident[pid, np.asarray(rows, np.int64)]

    def resident_count(self, rows):
        """Per page: on how many processors it is resident."""
        return self.resident[:, np.asarray(rows, np.int64)].sum(axis=0)

    def resident_anywhere(self, rows):
        """uvm_processor_mask_empty(&block->resident) negated: per row, does any processor hold a page."""
        return self.resident[:, np.asarray(rows, np.int64)].any(axis=(0, 2))

    def closest_resident(self, rows, requester):
        """uvm_va_block_page_get_closest_resident for every page: the requester itself, else the
        lowest-numbered GPU holding the page (peers come before the CPU), else the CPU; -1 where the
        page is resident nowhere."""
        return self._closest(self.resident[:, np.asarray(rows, np.int64)], requester)

    def closest_resident_pages(self, rows, pages, requester):
        """closest_resident of single pages: (row, page) pairs, one answer each."""
        return self._closest(self.resident[:, np.asarray(rows, np.int64), np.asarray(pages, np.int64)], requester)

    def _closest(self, res, requester):
        order = [requester] + [p for p in range(1, self.nprocs) if p != requester]
        if requester != UVM_ID_CPU:
            order.append(UVM_ID_CPU)
        stacked = res[order]
        first = stacked.argmax(axis=0)
        out = np.asarray(order, np.int64)[first]
        return np.where(stacked.any(axis=0), out, UVM_ID_INVALID)

    # -- residency changes -----------------------------------------------------------------------
    def make_resident(self, rows, mask, dest, read_duplicate=False, frames=None):
        """uvm_va_block_make_resident (MOVE) or uvm_va_block_make_resident_read_duplicate.

        ``mask`` (rows x 512) pages become resident on ``dest``; ``frames`` (rows x 512, GPU dest)
        gives the device frames for pages not yet resident there.  A move invalidates every other
        copy and every mapping that pointed at one; a read duplication keeps the other copies and
        revokes write access everywhere.  Returns a ResidencyChange.
        """
        rows = np.asarray(rows, np.int64)
        mask = np.asarray(mask, bool)
        if mask.shape != (rows.size, PAGES_PER_UVM_VA_BLOCK):
            raise ValueError(f"page mask of shape {mask.shape} for {rows.size} blocks")
        res = self.resident[:, rows]
        arriving = mask & ~res[dest]
        src = self.closest_resident(rows, dest)
        copy_from = np.where(arriving & (src >= 0), src, -1).astype(np.int8)
        populate = arriving & (src < 0)
        if dest != UVM_ID_CPU:
            if frames is None:
                if arriving.any():
                    raise ValueError(f"pages arriving on {processor_name(dest)} need device frames")
            else:
                frames = np.asarray(frames, np.int64)
                if np.any(frames[arriving] < 0):
                    raise ValueError("a page arriving on a GPU has no frame")
                self.frame[dest, rows] = np.where(arriving, frames, self.frame[dest, rows])
        self.resident[dest, rows] = res[dest] | mask
        P = self.nprocs
        dropped = np.zeros((P,) + mask.shape, bool)
        unmap = np.zeros((P,) + mask.shape, bool)
        revoke_write = np.zeros((P,) + mask.shape, bool)
        dropped_frames = [np.zeros(0, np.int64) for _ in range(P)]
        prot = self.prot[:, rows]
        target = self.map_target[:, rows]
        if read_duplicate:
            newly_dup = mask & (res.sum(axis=0) >= 1) & ~res[dest]
            self.counters["num_read_duplicates"] += int(newly_dup.sum())
            revoke_write = mask[None] & (prot > UVM_PROT_READ_ONLY)
            self.prot[:, rows] = np.where(revoke_write, UVM_PROT_READ_ONLY, prot)
        else:
            was_dup = mask & (res.sum(axis=0) >= 2)
            self.counters["num_read_duplicate_invalidates"] += int(was_dup.sum())
            for p in range(P):
                if p == dest:
                    continue
                dropped[p] = res[p] & mask
                if dropped[p].any():
                    self.resident[p, rows] = res[p] & ~mask
                    if p != UVM_ID_CPU:
                        f = self.frame[p, rows]
                        dropped_frames[p] = f[dropped[p]]
                        self.frame[p, rows] = np.where(dropped[p], -1, f)
            unmap = mask[None] & (prot > UVM_PROT_NONE) & (target != dest)
            self.prot[:, rows] = np.where(unmap, UVM_PROT_NONE, prot)
            self.map_target[:, rows] = np.where(unmap, -1, target)
        return ResidencyChange(rows, dest, copy_from, populate, dropped, dropped_frames, unmap, revoke_write)

    def drop(self, rows, mask, pid):
        """Forget ``pid``'s copies of the masked pages (eviction after the data moved, or pages
        unmapped from the process); mappings pointing at them are revoked.  Returns the GPU frames
        released (empty for the CPU)."""
        rows = np.asarray(rows, np.int64)
        mask = np.asarray(mask, bool) & self.resident[pid, rows]
        self.resident[pid, rows] &= ~mask
        frames = np.zeros(0, np.int64)
        if pid != UVM_ID_CPU:
            f = self.frame[pid, rows]
            frames = f[mask]
            self.frame[pid, rows] = np.where(mask, -1, f)
        gone = mask[None] & (self.map_target[:, rows] == pid)
        self.prot[:, rows] = np.where(gone, UVM_PROT_NONE, self.prot[:, rows])
        self.map_target[:, rows] = np.where(gone, -1, self.map_target[:, rows])
        return frames

    def map(self, rows, mask, pid, prot, target=None):
        """Record that processor ``pid`` maps the masked pages with ``prot`` (uvm_prot_t) on the
        copy held by ``target`` (default: its closest resident copy)."""
        rows = np.asarray(rows, np.int64)
        mask = np.asarray(mask, bool)
        if target is None:
            tgt = self.closest_resident(rows, pid)
        else:
            tgt = np.full(mask.shape, int(target), np.int64)
        res_t = np.take_along_axis(self.resident[:, rows], np.maximum(tgt, 0)[None], axis=0)[0]
        if np.any(mask & ((tgt < 0) | ~res_t)):
            raise ValueError(f"{processor_name(pid)} maps a page that is not resident where it points")
        if prot > UVM_PROT_READ_ONLY and np.any(mask & (self.resident[:, rows].sum(axis=0) > 1)):
            raise ValueError("a read-duplicated page cannot be mapped writable; collapse it first")
        self.prot[pid, rows] = np.where(mask, prot, self.prot[pid, rows])
        self.map_target[pid, rows] = np.where(mask, tgt, self.map_target[pid, rows])

    def unmap(self, rows, mask, pid):
        rows = np.asarray(rows, np.int64)
        mask = np.asarray(mask, bool)
        self.prot[pid, rows] = np.where(mask, UVM_PROT_NONE, self.prot[pid, rows])
        self.map_target[pid, rows] = np.where(mask, -1, self.map_target[pid, rows])

    def block_frames(self, pid):
        """(rows, frames) of every GPU page resident on processor ``pid`` (for Pmm.check)."""
        r, pg = np.nonzero(self.resident[pid, :self.nblocks])
        return r.astype(np.int64), self.frame[pid, r, pg]

    def check(self):
        """Assert the residency invariants: GPU frames exactly for GPU-resident pages, mappings only
        onto resident copies, no writable mapping of a duplicated page."""
        n = self.nblocks
        res = self.resident[:, :n]
        for p in range(1, self.nprocs):
            if np.any(res[p] != (self.frame[p, :n] >= 0)):
                raise AssertionError(f"{processor_name(p)}: frames do not match residency")
        if np.any(self.frame[0, :n] >= 0):
            raise AssertionError("the CPU holds device frames")
        prot, tgt = self.prot[:, :n], self.map_target[:, :n]
        mapped = prot > UVM_PROT_NONE
        if np.any(mapped != (tgt >= 0)):
            raise AssertionError("a mapping without a target, or a target without a mapping")
        on_copy = np.take_along_axis(res, np.maximum(tgt, 0).astype(np.int64), axis=0)
        if np.any(mapped & ~on_copy):
            raise AssertionError("a processor maps a copy that is not resident")
        if np.any((prot > UVM_PROT_READ_ONLY) & (res.sum(axis=0) > 1)[None]):
            raise AssertionError("a read-duplicated page is mapped writable")
