"""Pieces the suites share: a process with data and a dmirror device, the migration itself,
and the baselines (CUDA ones on the CuPy backend, NumPy ones on the fallback).

A NumPy baseline is the fastest plain NumPy way to do the same work, chosen in the same run
from several (``numpy_copy`` / ``numpy_sum``: fancy indexing, ``np.take`` into a buffer, one
contiguous copy of as many bytes), so a sceptical reader cannot say it was a weak one."""
import ctypes
import gc

import numpy as np

from ..measure import BestOf, Unavailable

PAGE = 4096
RW = 0x3            # PROT_READ | PROT_WRITE
PRIV_ANON = 0x22    # MAP_PRIVATE | MAP_ANONYMOUS
cudaMemcpyDefault = 4


def need(modname, what):
    """Import ``modname`` or raise Unavailable naming the missing piece."""
    import importlib
    try:
        return importlib.import_module(modname)
    except Exception as e:
        raise Unavailable(f"{what} is not there yet ({modname}: {type(e).__name__}: {e})")


def size_label(nbytes):
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):g} GiB"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):g} MiB"
    return f"{nbytes >> 10} KiB"


def shuffle_free_list(phys, seed=1):
    """Scatter future RAM allocations (as after a long uptime): permute the free stack."""
    n = getattr(phys, "_nfree", None)
    free = getattr(phys, "_free", None)
    if n is None or free is None:
        raise Unavailable("physmem has no free stack to shuffle (hmmgpu.mm.physmem changed)")
    free[:n] = np.random.default_rng(seed).permutation(free[:n])


class Workload:
    """A System, one process with ``npages`` of written anonymous memory, a dmirror device."""

    def __init__(self, backend_name, npages, scattered=True, memory="private", seed=2, ram_extra_pages=16384):
        import hmmgpu
        dmirror = need("hmmgpu.drivers.dmirror", "the dmirror driver")
        self.dmirror = dmirror
        self.npages = int(npages)
        self.nbytes = self.npages * PAGE
        self.system = hmmgpu.System(backend=backend_name, ram_bytes=(2 * self.npages + ram_extra_pages) * PAGE)
        if scattered:
            shuffle_free_list(self.system.phys)
        chunk = max(512, ((self.npages + 511) // 512) * 512)
        self.dev = dmirror.DMirrorDevice(self.system, memory=memory, chunk_pages=chunk, max_chunks=1)
        self.proc = self.system.spawn()
        self.mirror = self.dev.open(self.proc)
        self.addr = self.proc.mmap(self.nbytes, RW, PRIV_ANON)
        pattern = np.full(self.nbytes // 8, 0x0123456789ABCDEF, np.uint64)
        pattern[::513] = np.arange(pattern[::513].size, dtype=np.uint64)
        self.proc.write(self.addr, pattern)
        self.pattern = pattern                 # what the range must hold after any round trip
        self.vma = self.proc.mm.find_vma(self.addr)

    def pfns(self):
        from hmmgpu.mm import pgtable as pt
        return pt.pte_pfn(self.vma.pte[:self.npages])

    def runs(self):
        p = self.pfns()
        return int(np.count_nonzero(np.diff(p) != 1) + 1)

    # the migration itself (what hmm_bench.py times): setup, alloc+copy, pages, map, finalize
    def to_dev(self):
        hmm = need("hmmgpu.hmm", "the HMM core")
        m = self.mirror
        with self.proc.mm.mmap_lock.read():
            self.vma = self.proc.mm.find_vma(self.addr)
            args = hmm.MigrateVma(self.vma, self.addr, self.addr + self.nbytes, pgmap_owner=self.dev,
                                  flags=hmm.MIGRATE_VMA_SELECT_SYSTEM)
            ret = hmm.migrate_vma_setup(args)
            if ret:
                raise OSError(-ret, "migrate_vma_setup failed")
            m._migrate_alloc_and_copy(args)
            hmm.migrate_vma_pages(args)
            m._migrate_finalize_and_map(args)
            hmm.migrate_vma_finalize(args)

    def to_sys(self):
        r = self.mirror.migrate_to_sys(self.addr, self.npages)
        assert r.cpages == self.npages, r

    def close(self):
        try:
            self.mirror.close()
            self.proc.exit()
        except Exception:
            pass
        # a System's reference cycles would keep its arenas (GiBs of pinned memory) alive
        self.mirror = self.proc = self.vma = self.dev = self.system = None
        gc.collect()


# -- NumPy baselines ------------------------------------------------------------------------------

def numpy_copy(frames, pfns):
    """BestOf the plain NumPy ways to copy pages ``pfns`` of ``frames`` somewhere else: fancy
    indexing (a new array), ``np.take`` into a buffer, and one contiguous copy of as many bytes
    (what a memcpy of the same bytes costs: the bound for scattered pages)."""
    pfns = np.asarray(pfns, dtype=np.int64)
    n = pfns.size
    out = np.empty((n, PAGE), np.uint8)
    out.fill(1)                          # touched: the copies write into memory that is there
    lo = min(n, frames.shape[0] - n)              # frames the gather does not read
    src = frames[lo:lo + n]
    return BestOf([("fancy indexing", lambda: frames[pfns]),
                   ("np.take", lambda: np.take(frames, pfns, axis=0, out=out)),
                   ("contiguous copy", lambda: np.copyto(out, src))])


def numpy_sum(frames, pfns):
    """BestOf the plain NumPy ways to sum (as uint32) the bytes of pages ``pfns``: gather by
    fancy indexing or ``np.take`` then sum, and a sum over contiguous frames of as many bytes."""
    pfns = np.asarray(pfns, dtype=np.int64)
    n = pfns.size
    out = np.empty((n, PAGE), np.uint8)
    out.fill(1)
    src = frames[:n]

    def take_sum():
        np.take(frames, pfns, axis=0, out=out)
        return out.view(np.uint32).sum(dtype=np.uint64)
    return BestOf([("fancy indexing + sum", lambda: frames[pfns].view(np.uint32).sum(dtype=np.uint64)),
                   ("np.take + sum", take_sum),
                   ("contiguous sum", lambda: src.view(np.uint32).sum(dtype=np.uint64))])


# -- CUDA baselines (CuPy backend only) ---------------------------------------------------------

class Cuda:
    """Baselines measured with CUDA itself, in the same process and run."""

    def __init__(self, ctx):
        import cupy
        self.cp = cupy
        self.rt = cupy.cuda.runtime
        self.ctx = ctx

    def free_bytes(self):
        self.cp.get_default_memory_pool().free_all_blocks()
        free, _ = self.rt.memGetInfo()
        return free

    def memcpy(self, dst_ptr, src_ptr, nbytes):
        s = self.cp.cuda.get_current_stream()
        self.rt.memcpyAsync(int(dst_ptr), int(src_ptr), int(nbytes), cudaMemcpyDefault, s.ptr)

    def reduce_kernel(self):
        """The jobs' own flat reduce kernel (the same code the page-table job runs, minus the walk)."""
        try:
            from hmmgpu.kernels.module import launch, load_module
        except Exception as e:
            raise Unavailable(f"hmmgpu.kernels.backend has no load_module/launch ({e})")
        mod = load_module("jobs.cu", 0)
        stream = self.cp.cuda.get_current_stream()

        def run(ptr_or_array, nbytes, partials):
            npg = nbytes // PAGE
            arg = ptr_or_array if not isinstance(ptr_or_array, int) else np.uint64(ptr_or_array)
            launch(mod, "job_reduce_flat", 32 * npg, (arg, np.uint64(nbytes // 16), np.uint64(npg), partials),
                   stream)
        return run

    def managed(self, nbytes):
        """CUDA managed memory (never more than the GPU has free) and a host view of it."""
        free = self.free_bytes()
        if nbytes > free // 2:
            raise Unavailable(f"managed-memory baseline of {nbytes} bytes would exceed half of the "
                              f"{free} bytes the GPU has free")
        mem = self.cp.cuda.malloc_managed(nbytes)
        view = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(mem.ptr))
        return mem, view

    def prefetch(self, ptr, nbytes, device):
        """cudaMemPrefetchAsync to GPU ``device``.  Not to the CPU: CuPy 14 built for CUDA 13 reads
        the device argument as a device location, so -1 (cudaCpuDeviceId) is refused there."""
        s = self.cp.cuda.get_current_stream()
        self.rt.memPrefetchAsync(int(ptr), int(nbytes), int(device), s.ptr)
