"""The emulated machine: physical memory, processes, page caches, memcgs, OOM killer.

``System`` is what a user creates first.  It picks the backend (CuPy on a CUDA
machine, NumPy elsewhere), owns system RAM as an arena of page frames from that
backend, and runs the kernel-wide parts of memory management: the registry of
page caches, memory cgroups, writeback and the OOM killer.
"""
import errno
import itertools
import threading

from .constants import HPAGE_PMD_NR, PAGE_SIZE
from .device.backend import get_backend
from .errors import ProcessKilled
from .errors import oserror
from .mm.huge_memory import THP_MODES
from .mm.hugetlb import DEFAULT_POOL_MIN_RAM_FACTOR, DEFAULT_POOL_PAGES, HugetlbPool
from .mm.memcg import MemCgroup
from .mm.physmem import PhysicalMemory
from .mm.process import Process

DEFAULT_RAM_BYTES = 1 << 30


class System:
    def __init__(self, backend="auto", ram_bytes=DEFAULT_RAM_BYTES, thp="madvise", hugetlb_pages=None):
        """``backend``: "auto" (or the HMMGPU_BACKEND variable), "cupy" or "numpy".

        ``thp``: the transparent huge page mode (sysfs transparent_hugepage/enabled): "always",
        "madvise" (MADV_HUGEPAGE ranges only) or "never".  ``hugetlb_pages``: the 2 MiB pages
        of the hugetlbfs pool (nr_hugepages); by default a small pool (DEFAULT_POOL_PAGES) when
        RAM is large enough for it to be a small part of it, as the selftests' runner reserves.
        """
        if thp not in THP_MODES:
            raise oserror(errno.EINVAL, f"thp must be one of {', '.join(THP_MODES)}, not {thp!r:.40}")
        self.backend = get_backend(None if backend == "auto" else backend)
        self.phys = PhysicalMemory(self.backend, int(ram_bytes) // PAGE_SIZE)
        self.phys.oom = self._oom
        self.thp = thp
        self.thp_use_zero_page = True          # transparent_hugepage/use_zero_page
        nr_ram = self.phys.nr_ram
        if hugetlb_pages is None:
            fits = nr_ram >= DEFAULT_POOL_PAGES * HPAGE_PMD_NR * DEFAULT_POOL_MIN_RAM_FACTOR
            hugetlb_pages = DEFAULT_POOL_PAGES if fits else 0
        elif not isinstance(hugetlb_pages, int) or hugetlb_pages < 0:
            raise oserror(errno.EINVAL, f"hugetlb_pages must be a count of 2 MiB pages, not {hugetlb_pages!r:.40}")
        elif hugetlb_pages * HPAGE_PMD_NR >= nr_ram:
            raise oserror(errno.ENOMEM, f"a hugetlb pool of {hugetlb_pages} pages does not fit in "
                          f"{nr_ram * PAGE_SIZE >> 20} MiB of RAM")
        self.phys.hugetlb = HugetlbPool(self.phys, hugetlb_pages)
        self.lock = threading.RLock()
        self.processes = []
        self.memcgs = self.phys.memcgs
        self._pids = itertools.count(1)
        self._anon_ids = itertools.count(1)
        self._cache_ids = itertools.count(0)
        self._caches = {}          # (st_dev, st_ino) -> PageCache of a real file
        self.caches = {}           # id -> PageCache (files and shmem), what struct page .mapping names
        self.oom_kills = []        # (pid, reason) in order

    def __repr__(self):
        return (f"System(backend={self.backend_name!r}, ram={self.phys.nr_ram * PAGE_SIZE >> 20} MiB, "
                f"{len(self.processes)} processes)")

    @property
    def backend_name(self):
        return self.backend.name

    # -- processes -----------------------------------------------------------------
    def spawn(self, memcg=None):
        """A new process with an empty address space."""
        with self.lock:
            proc = Process(self, next(self._pids), memcg)
            self.processes.append(proc)
            if memcg is not None:
                memcg.procs.append(proc)
            return proc

    def _fork(self, parent):
        child = self.spawn(parent.mm.memcg)
        try:
            with parent.mm.mmap_lock.write():
                parent.mm.dup_into(child.mm)
        except BaseException:
            self._reap(child, "fork failed")
            raise
        return child

    def _reap(self, proc, reason):
        """Tear a process down: exit_mmap(), then forget it."""
        with self.lock:
            if not proc.alive:
                return
            proc.alive = False
            proc.killed_reason = reason
        proc.mm.teardown()
        with self.lock:
            if proc in self.processes:
                self.processes.remove(proc)
            cg = proc.mm.memcg
            if cg is not None and proc in cg.procs:
                cg.procs.remove(proc)

    # -- memory cgroups and the OOM killer ------------------------------------------------
    def memcg(self, name, limit_bytes=None):
        """The memory cgroup ``name`` (created on first use) with ``limit_bytes`` (None: no limit)."""
        with self.lock:
            for cg in self.memcgs:
                if cg.name == name:
                    if limit_bytes is not None:
                        cg.limit = int(limit_bytes)
                    return cg
            cg = MemCgroup(len(self.memcgs), name, limit_bytes)
            self.memcgs.append(cg)
            return cg

    def _oom(self, npages, memcg):
        """out_of_memory(): reclaim clean page cache, else kill the largest rss; True if anything freed."""
        if memcg is None and self.drop_caches() > 0:
            return True
        with self.lock:
            pool = memcg.procs if memcg is not None else self.processes
            pool = [p for p in pool if p.alive and not p.mm.oom_victim]
            if not pool:
                return False
            # A vectorised fault asks for all its pages at once, where Linux faults them one by
            # one and the faulting task's rss grows until memory runs out: count what it would
            # have reached by then as its own.
            if memcg is not None:
                room = max(0, (memcg.limit - memcg.usage) // PAGE_SIZE)
            else:
                room = self.phys.nr_free()

            def badness(p):
                return sum(p.mm.rss.values()) + (min(npages, room) if p.mm.mmap_lock.held_by_me() else 0)
            victim = max(pool, key=badness)
            where = f"memcg {memcg.name!r} over its limit" if memcg is not None else "system out of memory"
            reason = f"killed by the OOM killer ({where}, rss {sum(victim.mm.rss.values())} pages)"
            self.oom_kills.append((victim.pid, reason))
            if memcg is not None:
                memcg.oom_kills += 1
        if victim.mm.mmap_lock.held_by_me():
            # the faulting task itself: it unwinds and is reaped outside its own lock
            victim.mm.oom_victim = True
            victim.killed_reason = reason
            raise ProcessKilled(victim.pid, reason)
        self._reap(victim, reason)
        return True

    # -- page caches ---------------------------------------------------------------------
    def _new_cache_id(self):
        return next(self._cache_ids)

    def _register_cache(self, cache):
        self.caches[cache.id] = cache
        if cache.key is not None:
            self._caches[cache.key] = cache

    def _forget_cache(self, cache):
        self.caches.pop(cache.id, None)
        if cache.key is not None and self._caches.get(cache.key) is cache:
            del self._caches[cache.key]

    def _anon_family(self, mm):
        return next(self._anon_ids)

    def writeback(self):
        """Write every dirty page-cache page back to its file (the flusher threads' work)."""
        return sum(self.writeback_range(c) for c in list(self.caches.values()) if not c.shmem)

    def writeback_range(self, cache, lo=0, hi=None):
        """folio_clear_dirty_for_io() + write: clean every mapping of pages [lo, hi), then write them."""
        for proc in list(self.processes):
            mm = proc.mm
            for v in list(mm.vmas):
                if v.file is not cache or not v.shared:
                    continue
                a = max(lo, v.pgoff)
                b = v.pgoff + v.npages if hi is None else min(hi, v.pgoff + v.npages)
                if a < b:
                    mm.mkclean(v, a - v.pgoff, b - v.pgoff)
        return cache.writeback(lo, hi)

    def drop_caches(self):
        """echo 3 > /proc/sys/vm/drop_caches: write back, then free pages only the cache holds."""
        self.writeback()
        return sum(c.drop_unused() for c in list(self.caches.values()) if not c.shmem)
