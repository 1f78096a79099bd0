"""Memory cgroups (mm/memcontrol.c), reduced to what HMM's accounting needs.

Pages are charged to the cgroup of the process that faults them in and
uncharged when freed.  Device pages are charged like ordinary pages (the HMM
documentation, section 7): migration moves the charge with the page, so
migrating back to system memory can never fail on the limit.
"""
import threading

from ..constants import PAGE_SIZE


class MemCgroup:
    def __init__(self, id, name, limit_bytes):
        self.id = id
        self.name = name
        self.limit = None if limit_bytes is None else int(limit_bytes)
        self.pages = 0
        self.max_pages = 0
        self.oom_kills = 0
        self.lock = threading.Lock()
        self.procs = []

    @property
    def usage(self):
        """memory.current, in bytes."""
        return self.pages * PAGE_SIZE

    def try_charge(self, n):
        with self.lock:
            if self.limit is not None and (self.pages + n) * PAGE_SIZE > self.limit:
                return False
            self.pages += n
            self.max_pages = max(self.max_pages, self.pages)
            return True

    def force_charge(self, n):
        with self.lock:
            self.pages += n

    def uncharge(self, n):
        with self.lock:
            self.pages -= n
            assert self.pages >= 0, f"memcg {self.name}: uncharge below zero"

    def attach(self, proc):
        """Move ``proc`` into this group (new pages are charged here; old ones stay)."""
        proc.mm.memcg = self
        if proc not in self.procs:
            self.procs.append(proc)

    def __repr__(self):
        lim = "max" if self.limit is None else f"{self.limit}"
        return f"MemCgroup({self.name!r}, usage={self.usage}, limit={lim})"
