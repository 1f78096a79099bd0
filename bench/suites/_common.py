"""Pieces the suites share: a process with data and a dmirror device, the migration itself, a
UVM driver sized for a range, and the baselines (CUDA ones on the CuPy backend, NumPy ones on the fallback).

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
    """A System, one process with ``npages`` of written anonymous memory, and a dmirror device
    (``with_dmirror=False``: none; the suites that drive the UVM driver bring their own)."""

    def __init__(self, backend_name, npages, scattered=True, memory="private", seed=2, ram_extra_pages=16384,
                 with_dmirror=True):
        import hmmgpu
        self.npages = int(npages)
        self.nbytes = self.npages * PAGE
        self.system = hmmgpu.System(backend=backend_name, ram_bytes=(2 * self.npages + ram_extra_pages) * PAGE)
        if scattered:
            shuffle_free_list(self.system.phys)
        self.proc = self.system.spawn()
        self.dev = self.mirror = None
        if with_dmirror:
            dmirror = need("hmmgpu.drivers.dmirror", "the dmirror driver")
            # device memory for every page, in as few chunks (memremap_pages) as dmirror allows
            chunk = min(dmirror.DEVMEM_CHUNK_PAGES, max(512, ((self.npages + 511) // 512) * 512))
            self.dev = dmirror.DMirrorDevice(self.system, memory=memory, chunk_pages=chunk,
                                             max_chunks=-(-self.npages // chunk))
            self.mirror = self.dev.open(self.proc)
        self.addr = self.proc.mmap(self.nbytes, RW, PRIV_ANON)
        # the same pattern as one array would give, written 64 MiB at a time (no GiB temporary)
        for lo, chunk in self.pattern_chunks():
            self.proc.write(self.addr + lo * 8, chunk)
        self.vma = self.proc.mm.find_vma(self.addr)

    def pattern_chunks(self, step=1 << 23):
        """(first word, uint64 words) of the range's pattern, 64 MiB at a time."""
        words = self.nbytes // 8
        for lo in range(0, words, step):
            w = np.arange(lo, min(words, lo + step), dtype=np.int64)
            yield lo, np.where(w % 513 == 0, (w // 513).astype(np.uint64), np.uint64(0x0123456789ABCDEF))

    def check_pattern(self):
        """Raise AssertionError unless the range still holds its pattern, every word of it."""
        for lo, want in self.pattern_chunks():
            got = self.proc.read(self.addr + lo * 8, want.nbytes).view(np.uint64)
            bad = np.flatnonzero(got != want)
            assert bad.size == 0, (f"migration corrupted the data ({bad.size} words of a 64 MiB piece, "
                                   f"first at byte {8 * (lo + int(bad[0]))})")

    def pfns(self):
        """The frames that hold the range now (after a migration there and back: new ones)."""
        from hmmgpu.mm import pgtable as pt
        self.vma = self.proc.mm.find_vma(self.addr)
        return pt.pte_pfn(self.vma.pte[:self.npages])

    def runs(self):
        p = self.pfns()
        return int(np.count_nonzero(np.diff(p) != 1) + 1)

    # the migration itself (what hmm_bench.py times): setup, alloc+copy, pages, map, finalize
    def to_dev(self):
        hmm = need("hmmgpu.hmm", "the HMM core")
        self.vma = dmirror_migrate_steps(self.mirror, self.addr, self.nbytes, self.dev, hmm.MIGRATE_VMA_SELECT_SYSTEM)

    def to_sys(self):
        r = self.mirror.migrate_to_sys(self.addr, self.npages)
        assert r.cpages == self.npages, r

    def close(self):
        try:
            if self.mirror is not None:
                self.mirror.close()
            self.proc.exit()
        except Exception:
            pass
        # a System's reference cycles would keep its arenas (GiBs of pinned memory) alive
        self.mirror = self.proc = self.vma = self.dev = self.system = None
        gc.collect()


ROOT_CHUNK = 2 << 20        # UVM's device memory comes in 2 MiB root chunks


def uvm_driver(w, nbytes=None, **kw):
    """A UvmDriver (hmmgpu.drivers.uvm) over the workload's process, with device memory for the
    whole range and no oversubscription: ``nbytes`` (default the range's) rounded up to 2 MiB,
    plus one root chunk for a range that does not start on a 2 MiB boundary."""
    uvm = need("hmmgpu.drivers.uvm", "the UVM driver (UvmDriver)")
    n = w.nbytes if nbytes is None else int(nbytes)
    return uvm.UvmDriver(w.system, w.proc, device_bytes=(-(-n // ROOT_CHUNK) + 1) * ROOT_CHUNK, **kw)


# -- NumPy baselines ------------------------------------------------------------------------------

def dmirror_migrate_steps(mirror, addr, nbytes, owner, flags):
    """dmirror_migrate_to_device() step by step (setup, alloc+copy, pages, map, finalize) on
    [addr, addr+nbytes) of the mirror's process: what the migration rows time.  Returns the VMA."""
    hmm = need("hmmgpu.hmm", "the HMM core")
    mm = mirror.proc.mm
    with mm.mmap_lock.read():
        vma = mm.find_vma(addr)
        args = hmm.MigrateVma(vma, addr, addr + nbytes, pgmap_owner=owner, flags=flags)
        ret = hmm.migrate_vma_setup(args)
        if ret:
            raise OSError(-ret, "migrate_vma_setup failed")
        mirror._migrate_alloc_and_copy(args)
        hmm.migrate_vma_pages(args)
        mirror._migrate_finalize_and_map(args)
        hmm.migrate_vma_finalize(args)
    return vma


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


def numpy_gather_sum(frames, pfns):
    """BestOf the plain NumPy ways to gather pages ``pfns`` of ``frames`` and sum them as uint32:
    fancy indexing or ``np.take`` into a buffer, then the sum."""
    pfns = np.asarray(pfns, dtype=np.int64)
    out = np.empty((pfns.size, PAGE), np.uint8)
    out.fill(1)

    def take_sum():
        np.take(frames, pfns, axis=0, out=out)
        return out.view(np.uint32).sum(dtype=np.uint64)
    return BestOf([("fancy indexing + sum", lambda: frames[pfns].view(np.uint32).sum(dtype=np.uint64)),
                   ("np.take + sum", take_sum)])


def numpy_fresh_fill(nbytes, value):
    """BestOf the plain NumPy ways to make a fresh array filled with ``value``."""
    return BestOf([("np.empty + fill", lambda: np.empty(nbytes, np.uint8).fill(value)),
                   ("np.full", lambda: np.full(nbytes, value, np.uint8))])


def target_row(ctx, figure, samples, target, unit, scale, *, size, note="", label=None):
    """A cost row against a fixed target (seconds per item ``samples``; ``target`` in ``unit``,
    ``scale`` converting seconds to it): ratio = target / ours, higher is better, passes at 1."""
    s = sorted(float(x) * scale for x in samples)
    med = float(np.median(s))
    return ctx.row(figure, ours=med, ours_unit=unit, ours_spread=(s[0], med, s[-1]),
                   baseline_name=f"target: {target:g} {unit}", baseline=target,
                   ratio=target / med, spread=(target / s[-1], target / med, target / s[0]),
                   target=">= 1", size=size, note=note, label=label)


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


# -- fault-driven jobs ----------------------------------------------------------------------------

class DeviceClock:
    """Seconds spent inside a job engine's executor: the device's own work (on the fallback the
    lanes' NumPy twins run there).  Whatever else a fault-driven job costs is the host's control
    plane: draining the fault buffer, servicing (hmm_range_fault, page-table updates), replaying.

    ``with DeviceClock(engine) as clk: ...`` then ``clk.seconds``; the engine's executor is
    swapped for a timing proxy only inside the block.
    """

    def __init__(self, engine):
        self.engine = engine
        self.seconds = 0.0

    def __enter__(self):
        import time
        real, clk = self.engine.ex, self

        class _Timed:
            def __getattr__(self, name):
                attr = getattr(real, name)
                if not callable(attr):
                    return attr

                def timed(*a, **k):
                    t0 = time.perf_counter()
                    try:
                        return attr(*a, **k)
                    finally:
                        clk.seconds += time.perf_counter() - t0
                return timed
        self._real = real
        self.engine.ex = _Timed()
        return self

    def __exit__(self, *exc):
        self.engine.ex = self._real
        return False


def frames_sum(frames, pfns, chunk=8192):
    """The uint32 sum (mod 2**64) of frames ``pfns``, a chunk at a time (no GiB temporaries)."""
    total = np.uint64(0)
    for lo in range(0, pfns.size, chunk):
        total += frames[pfns[lo:lo + chunk]].view(np.uint32).sum(dtype=np.uint64)
    return int(total)
