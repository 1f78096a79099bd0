"""mmap_lock: the reader/writer semaphore of an address space (include/linux/mmap_lock.h).

Writers (mmap, munmap, mprotect, mremap, fork, exit) exclude everyone; readers
(faults, hmm_range_fault, GUP, migrate_vma_setup) share.  Re-entrant for the
thread that holds it for writing, so a fault taken inside a write-locked
operation does not deadlock against itself.
"""
import threading

_ident = threading.get_ident


class _Hold:
    """``with lock.read():`` / ``with lock.write():`` -- one reusable guard per mode (the
    holder is the calling thread, so the guard itself keeps no state)."""

    __slots__ = ("__enter__", "_release")

    def __init__(self, acquire, release):
        self.__enter__ = acquire
        self._release = release

    def __exit__(self, *exc):
        self._release()
        return False


class RWLock:
    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = {}            # thread id -> depth
        self._writer = None
        self._wdepth = 0
        self._waiting_writers = 0
        self._sleepers = 0            # threads waiting on _cond: only then does a release notify
        self._read = _Hold(self._read_lock, self._read_unlock)
        self._write = _Hold(self._write_lock, self._write_unlock)

    def held_by_me(self):
        me = _ident()
        with self._cond:
            return self._writer == me or me in self._readers

    def read(self):
        return self._read

    def write(self):
        return self._write

    def _wait(self, ready):
        self._sleepers += 1
        try:
            self._cond.wait_for(ready)
        finally:
            self._sleepers -= 1

    def _read_lock(self):
        me = _ident()
        with self._cond:
            if self._writer != me and me not in self._readers and (
                    self._writer is not None or self._waiting_writers):
                self._wait(lambda: self._writer is None and not self._waiting_writers)
            self._readers[me] = self._readers.get(me, 0) + 1

    def _read_unlock(self):
        me = _ident()
        with self._cond:
            depth = self._readers[me] - 1
            if depth:
                self._readers[me] = depth
            else:
                del self._readers[me]
                if self._sleepers:
                    self._cond.notify_all()

    def _write_lock(self):
        me = _ident()
        with self._cond:
            if self._writer != me:
                if me in self._readers:
                    raise RuntimeError("mmap_lock: upgrading a read lock to write would deadlock")
                if self._writer is not None or self._readers:
                    self._waiting_writers += 1
                    try:
                        self._wait(lambda: self._writer is None and not self._readers)
                    finally:
                        self._waiting_writers -= 1
                self._writer = me
            self._wdepth += 1

    def _write_unlock(self):
        with self._cond:
            self._wdepth -= 1
            if not self._wdepth:
                self._writer = None
                if self._sleepers:
                    self._cond.notify_all()
