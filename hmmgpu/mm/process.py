"""A process: an address space plus the system calls of the public contract.

``Process`` is the user's handle (a task_struct reduced to what memory needs).
Each call takes the address space's locks, and a process that has exited or
been OOM-killed refuses every later call with ``ProcessKilled``.
"""
import errno
import functools

import numpy as np

from ..constants import MS_SYNC, PAGE_SIZE
from ..errors import ProcessKilled, oserror
from .mm import MM
from .physmem import add_at
from .validate import check_no_wrap, check_user_range, raw_bytes, ulong


def _alive(method):
    # An OOM victim busy in its own call is torn down when it lets go of its mmap_lock
    # (MM._reap_if_oom_victim), so the ProcessKilled that reaches the caller is final.
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if not self.alive:
            raise ProcessKilled(self.pid, self.killed_reason or "exited")
        return method(self, *args, **kwargs)
    return call


class Pin:
    """Pages held by pin_user_pages(); ``unpin()`` (unpin_user_pages) lets them go."""

    def __init__(self, phys, pfns, addr, longterm):
        self.phys = phys
        self.pfns = pfns
        self.addr = addr
        self.longterm = longterm
        self.active = True

    def unpin(self):
        if not self.active:
            raise oserror(errno.EINVAL, "pin already released", self.addr)
        self.active = False
        with self.phys.lock:
            add_at(self.phys.pages.pincount, self.pfns, -1)
            self.phys.put(self.pfns)

    @property
    def npages(self):
        return int(self.pfns.size)


class Process:
    def __init__(self, system, pid, memcg=None):
        self.system = system
        self.pid = pid
        self.mm = MM(system, self)
        self.mm.memcg = memcg
        self.alive = True
        self.exit_status = None
        self.killed_reason = None

    def __repr__(self):
        state = "alive" if self.alive else f"dead ({self.killed_reason})"
        return f"Process(pid={self.pid}, {state}, rss={self.rss})"

    @property
    def rss(self):
        """Linux's rss counters in pages: {"anon", "file", "shmem"}."""
        return dict(self.mm.rss)

    @property
    def memcg(self):
        return self.mm.memcg

    @_alive
    def mmap(self, length, prot, flags, fd=None, offset=0, addr=0):
        return self.mm.mmap(length, prot, flags, fd, offset, addr)

    @_alive
    def munmap(self, addr, length):
        self.mm.munmap(addr, length)

    @_alive
    def mprotect(self, addr, length, prot):
        self.mm.mprotect(addr, length, prot)

    @_alive
    def madvise(self, addr, length, advice):
        self.mm.madvise(addr, length, advice)

    @_alive
    def mremap(self, old_addr, old_size, new_size, flags, new_addr=0):
        return self.mm.mremap(old_addr, old_size, new_size, flags, new_addr)

    @_alive
    def msync(self, addr, length, flags=MS_SYNC):
        self.mm.msync(addr, length, flags)

    @_alive
    def read(self, addr, nbytes):
        """A CPU load of ``nbytes`` at ``addr``: a uint8 copy; takes CPU page faults."""
        return self.mm.access(addr, nbytes, write=False)

    @_alive
    def write(self, addr, data):
        """A CPU store of bytes-like or ndarray ``data`` at ``addr``."""
        b = raw_bytes(data, addr if isinstance(addr, int) else None)
        self.mm.access(addr, b.size, write=True, data=b)

    @_alive
    def fork(self):
        return self.system._fork(self)

    @_alive
    def exit(self, status=0):
        self.exit_status = status
        self.system._reap(self, f"exited with status {status}")

    @_alive
    def pin_user_pages(self, addr, npages, write=False, longterm=False):
        """pin_user_pages(): FOLL_PIN (+FOLL_WRITE, +FOLL_LONGTERM); returns a Pin."""
        pfns = self.mm.get_user_pages(addr, npages, write, longterm)
        phys = self.system.phys
        with phys.lock:
            add_at(phys.pages.refcount, pfns, 1)
            add_at(phys.pages.pincount, pfns, 1)
        return Pin(phys, pfns, addr, longterm)

    @_alive
    def populate(self, addr, length, write=False):
        addr = ulong(addr, "populate address")
        end = check_no_wrap(addr, ulong(length, "populate length", addr), "populate")
        self.mm.populate(addr, end, write)

    def pages(self, addr, npages):
        """Debug view: the raw PTEs of [addr, +npages) (0 where unmapped)."""
        addr = ulong(addr, "address")
        npages = ulong(npages, "page count", addr)
        end = check_user_range(addr, npages * PAGE_SIZE, "pages")
        out = np.zeros(npages, np.uint64)
        for v in self.mm.vmas_in(addr, end):
            s, e = max(v.start, addr), min(v.end, end)
            out[(s - addr) // PAGE_SIZE:(e - addr) // PAGE_SIZE] = v.pte[v.idx(s):v.idx(e - 1) + 1]
        return out
