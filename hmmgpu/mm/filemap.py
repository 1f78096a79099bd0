"""The page cache (mm/filemap.c) over real operating-system files, and shmem.

A ``PageCache`` is one file's ``struct address_space``: an array from page index
to pfn.  Pages are read from the file descriptor on first fault (one ``pread``
per contiguous run of missing pages), shared by every process that maps the
file, and written back (one ``pwrite`` per contiguous run of dirty pages, never
past the end of the file) on msync, when the last mapping goes, on exit and on
``System.writeback()``.  Shared anonymous memory is a ``PageCache`` with no file
behind it (shmem), so fork shares it like Linux does.

Reference rule: a cached page holds one reference (the cache's); each PTE that
maps it holds one more and a mapcount.  Once nothing maps the file, the cache is
written back and every page that only the cache still holds is freed, so data
written to the file behind our back with write(2) is seen by the next mmap.
"""
import errno
import fcntl
import os

import numpy as np

from ..constants import PAGE_SIZE
from ..errors import oserror
from .physmem import PG_DIRTY, PG_SWAPBACKED, PG_UPTODATE


IO_CHUNK_PAGES = 4096                 # 16 MiB per pread/pwrite


def runs(sorted_idx):
    """Split a sorted int array into (start, length) runs of consecutive values."""
    if sorted_idx.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.nonzero(np.diff(sorted_idx) != 1)[0] + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [sorted_idx.size]))
    return sorted_idx[starts], ends - starts


class PageCache:
    def __init__(self, system, id, fd=None, key=None, name=None, size_pages=None):
        self.system = system
        self.phys = system.phys
        self.id = id
        self.key = key
        self.shmem = fd is None
        self.kind = "shmem" if self.shmem else "file"
        self.fd = fd                       # our own dup: the mapping keeps the file open
        self.spare_fds = []                # earlier read-only dups (open_file_cache)
        self.name = name or ("shmem" if self.shmem else f"fd {fd}")
        self.pfn_of = np.full(0, -1, dtype=np.int64)
        self.nr_mappings = 0
        self.size_pages = size_pages       # shmem: the object's size, fixed at creation

    def __repr__(self):
        return f"PageCache({self.name}, cached={int((self.pfn_of >= 0).sum())})"

    def file_pages(self):
        """Pages the file covers (a partial last page counts); shmem: the object's size."""
        if self.shmem:
            return self.size_pages if self.size_pages is not None else 1 << 62
        return -(-os.fstat(self.fd).st_size // PAGE_SIZE)

    def _grow(self, n):
        if n > self.pfn_of.size:
            new = np.full(max(n, 2 * self.pfn_of.size), -1, dtype=np.int64)
            new[:self.pfn_of.size] = self.pfn_of
            self.pfn_of = new

    def find_get(self, index, memcg):
        """filemap_fault(): the pfns caching ``index`` (sorted or not), read in if missing."""
        index = np.asarray(index, dtype=np.int64)
        with self.phys.lock:
            self._grow(int(index.max()) + 1 if index.size else 0)
            missing = np.unique(index[self.pfn_of[index] < 0])
        if missing.size:
            # allocate with the page-table lock released (the OOM killer may run), then
            # insert only what nobody else inserted meanwhile
            pfns = self.phys.alloc(missing.size, memcg, zero=True)
        with self.phys.lock:
            if missing.size:
                raced = self.pfn_of[missing] >= 0
                if raced.any():
                    self.phys.put(pfns[raced])
                    missing, pfns = missing[~raced], pfns[~raced]
                pg = self.phys.pages
                pg.mapping[pfns] = self.id
                pg.index[pfns] = missing
                pg.flags[pfns] |= PG_UPTODATE | (PG_SWAPBACKED if self.shmem else 0)
                if not self.shmem:
                    self._read_in(missing, pfns)
                self.pfn_of[missing] = pfns
            return self.pfn_of[index]

    def _read_in(self, missing, pfns):
        size = os.fstat(self.fd).st_size
        ram = self.phys.ram.host
        starts, lengths = runs(missing)
        pos = 0
        for s, n in zip(starts.tolist(), lengths.tolist()):
            for k in range(0, n, IO_CHUNK_PAGES):      # bounded pieces, one pread each
                m = min(IO_CHUNK_PAGES, n - k)
                buf = np.zeros(m * PAGE_SIZE, np.uint8)      # past EOF reads as zeros
                want = min(m * PAGE_SIZE, max(0, size - (s + k) * PAGE_SIZE))
                if want:
                    got = os.preadv(self.fd, [memoryview(buf)[:want]], (s + k) * PAGE_SIZE)
                    buf[got:want] = 0
                ram[pfns[pos + k:pos + k + m]] = buf.reshape(m, PAGE_SIZE)
            pos += n

    def writeback(self, lo=0, hi=None):
        """Write dirty cached pages with index in [lo, hi) back to the file; returns pages written."""
        if self.shmem or self.fd is None:
            return 0
        with self.phys.lock:
            hi = self.pfn_of.size if hi is None else min(hi, self.pfn_of.size)
            if hi <= lo:
                return 0
            idx = np.arange(lo, hi, dtype=np.int64)
            pfns = self.pfn_of[lo:hi]
            cached = pfns >= 0
            idx, pfns = idx[cached], pfns[cached]
            dirty = (self.phys.pages.flags[pfns] & PG_DIRTY) != 0
            idx, pfns = idx[dirty], pfns[dirty]
            if idx.size == 0:
                return 0
            size = os.fstat(self.fd).st_size
            starts, lengths = runs(idx)
            pos = 0
            for s, n in zip(starts.tolist(), lengths.tolist()):
                # one pwrite per contiguous run, in bounded pieces so that writing back a
                # huge file never gathers it all into memory at once
                for k in range(0, n, IO_CHUNK_PAGES):
                    m = min(IO_CHUNK_PAGES, n - k)
                    nbytes = min(m * PAGE_SIZE, max(0, size - (s + k) * PAGE_SIZE))
                    if nbytes:
                        data = self.phys.read(pfns[pos + k:pos + k + m]).reshape(-1)
                        os.pwrite(self.fd, memoryview(data[:nbytes]), (s + k) * PAGE_SIZE)
                pos += n
            self.phys.pages.flags[pfns] &= ~PG_DIRTY
            return int(idx.size)

    def drop_unused(self):
        """Free every cached page that only the cache holds (after writeback)."""
        with self.phys.lock:
            self.writeback()
            cached = np.nonzero(self.pfn_of >= 0)[0]
            pfns = self.pfn_of[cached]
            only_cache = self.phys.pages.refcount[pfns] == 1
            if self.shmem:
                # shmem has no backing store: unmapped pages simply go (the object is gone)
                only_cache = np.ones(pfns.size, bool) if self.nr_mappings == 0 else only_cache & False
            drop = pfns[only_cache]
            self.pfn_of[cached[only_cache]] = -1
            self.phys.pages.mapping[drop] = -1
            self.phys.put(drop)
        if self.nr_mappings == 0 and not (self.pfn_of >= 0).any():
            self._release()
        return int(drop.size)

    def _release(self):
        """Nothing maps or caches the file any more: let the file go."""
        if self.fd is not None:
            for fd in [self.fd] + self.spare_fds:
                os.close(fd)
            self.fd = None
            self.spare_fds = []
        self.system._forget_cache(self)

    def forget(self, pfns):
        """The pages left the cache by other means (migration replaced them, say)."""
        pg = self.phys.pages
        idx = pg.index[pfns]
        self.pfn_of[idx] = -1

    def replace(self, old_pfns, new_pfns):
        """Migration of cached pages: the cache now points at the new frames."""
        pg = self.phys.pages
        idx = pg.index[old_pfns]
        self.pfn_of[idx] = new_pfns
        pg.mapping[new_pfns] = self.id
        pg.index[new_pfns] = idx

    def unmapped(self):
        """The last mapping went away."""
        self.drop_unused()               # releases the file too unless pages are still held (pinned)


def _writable(fd):
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY


def open_file_cache(system, fd):
    """The shared PageCache of the file behind ``fd`` (one per inode), taking a reference.

    Linux writes a page back through the inode, however the file was opened; here the cache
    writes through its own descriptor, so it keeps a writable one as soon as any mapping
    brings one: a shared writable mapping (the only kind that dirties the cache) needs an
    O_RDWR descriptor, even when the first mapping of the file came through an O_RDONLY one."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise oserror(errno.EBADF, f"mmap of file descriptor {fd}: {e.strerror}") from None
    key = (st.st_dev, st.st_ino)
    cache = system._caches.get(key)
    if cache is None or cache.fd is None:
        cache = PageCache(system, system._new_cache_id(), fd=os.dup(fd), key=key, name=f"inode {st.st_ino}")
        system._register_cache(cache)
    elif not _writable(cache.fd) and _writable(fd):
        # the read-only one stays open until the file is let go: a fault may be using it now
        cache.spare_fds.append(cache.fd)
        cache.fd = os.dup(fd)
    return cache
