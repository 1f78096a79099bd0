"""mmap_lock: the reader/writer semaphore of an address space (include/linux/mmap_lock.h).

Writers (mmap, munmap, mprotect, mremap, fork, exit) exclude everyone; readers
(faults, hmm_range_fault, GUP, migrate_vma_setup) share.  Re-entrant for the
thread that holds it for writing, so a fault taken inside a write-locked
operation does not deadlock against itself.

``on_idle`` is called (by the releasing thread, outside the lock) whenever the lock
becomes entirely free: an OOM victim that was busy in its own system call dies there,
as a task the OOM killer signalled dies on its way back to user space.
"""
import threading
from contextlib import contextmanager


class RWLock:
    def __init__(self, on_idle=None):
        self.on_idle = on_idle
        self._cond = threading.Condition(threading.Lock())
        self._readers = {}            # thread id -> depth
        self._writer = None
        self._wdepth = 0
        self._waiting_writers = 0

    def held_by_me(self):
        me = threading.get_ident()
        with self._cond:
            return self._writer == me or me in self._readers

    @contextmanager
    def read(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and me not in self._readers:
                self._cond.wait_for(lambda: self._writer is None and not self._waiting_writers)
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                self._cond.notify_all()
                idle = self._writer is None and not self._readers
            if idle and self.on_idle is not None:
                self.on_idle()

    @contextmanager
    def write(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                if me in self._readers:
                    raise RuntimeError("mmap_lock: upgrading a read lock to write would deadlock")
                self._waiting_writers += 1
                self._cond.wait_for(lambda: self._writer is None and not self._readers)
                self._waiting_writers -= 1
                self._writer = me
            self._wdepth += 1
        try:
            yield
        finally:
            with self._cond:
                self._wdepth -= 1
                if not self._wdepth:
                    self._writer = None
                self._cond.notify_all()
                idle = self._writer is None and not self._readers
            if idle and self.on_idle is not None:
                self.on_idle()
