"""Threads racing each other over one process and its devices (issue 10), with a model of
acknowledged writes.

Every page holds a stamp: (page id, version) records repeated over the page.  The *stable*
pages are written by exactly one writer each -- a CPU writer owns the first half, a device
writer (dmirror) the second -- which counts every version it tries (``attempted``) and every one
the call acknowledged (``acked``).  Around them, threads move the same pages (migrate_to_dev /
migrate_to_sys on a private and a coherent device, exclusive access, release), change their
protection (mprotect splits the VMA), fork children and exit them, and churn a second region
(munmap + mmap, MADV_DONTNEED, mremap away and back), while readers check every page they read.

What must hold (each a failure naming the page and the versions):

* a read of a stable page returns records of that page only, each version at least the last
  one acknowledged before the read began and at most the last one tried when it ended;
* every record of a churned page reads as zeros or as a record of that page -- never another
  page's or another process's bytes (a read racing a write may see part of each, as on a CPU);
* a forked child sees a snapshot of the parent taken at the fork, and keeps seeing it however
  the parent writes, migrates or releases afterwards (a frame freed while still mapped, or a
  write through a stale mapping, shows up here);
* at the end, every stable page holds a version between the last acknowledged and the last
  tried: 0 lost writes; the whole-machine checker holds; and once every process has exited
  and every mirror is closed, every frame of RAM and of each device is free, nothing locked;
* no call raises anything but OSError, none reports a stuck page lock (EDEADLK), and no thread
  hangs: every join has a timeout, and a thread still running is a failure with its stack.

Each thread does a fixed number of operations, a few seconds per scenario on the CI box;
HMMGPU_STRESS_SCALE=k multiplies them for a longer run.  The interleaving varies from run to
run; what is checked does not depend on it.
"""
import errno
import os
import sys
import threading
import time
import traceback

import numpy as np
import pytest

import hmmgpu
from hmmgpu import (MADV_DONTNEED, MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MREMAP_FIXED, MREMAP_MAYMOVE,
                    PAGE_SIZE, PROT_READ, PROT_WRITE)
from hmmgpu.drivers import dmirror
from invariants import check_system

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SCALE = float(os.environ.get("HMMGPU_STRESS_SCALE", "1"))
NSTABLE = 32            # pages [0, 16) written by the CPU writer, [16, 32) by the device writer
NCHURN = 16
JOIN_TIMEOUT = 60.0     # a thread still running this long after the start is hung
REPORT = {}


def stamp(page_id, version, npages=1):
    rec = np.array([page_id, version], dtype=np.uint64)
    out = np.tile(rec, (npages, P // 16))
    out[:, 0::2] += np.arange(npages, dtype=np.uint64)[:, None]
    return out.view(np.uint8).reshape(-1)


def records(data):
    """(page ids, versions) of each 16-byte record, one row per page."""
    w = np.asarray(data, np.uint8).reshape(-1, P).view(np.uint64).reshape(-1, P // 16, 2)
    return w[:, :, 0], w[:, :, 1]


class Stress:
    def __init__(self, kinds):
        self.system = hmmgpu.System(backend="numpy", ram_bytes=48 << 20)
        self.free0 = self.system.phys.nr_free()
        self.devs = [dmirror.DMirrorDevice(self.system, memory=k, chunk_pages=64, max_chunks=2) for k in kinds]
        self.p = self.system.spawn()
        self.base = self.p.mmap(NSTABLE * P, RW, ANON)
        self.p.write(self.base, stamp(0, 0, NSTABLE))
        self.churn = self.p.mmap(NCHURN * P, RW, ANON)
        self.away = self.p.mmap(NCHURN * P, RW, ANON)          # where mremap parks churn pages
        self.mirrors = [d.open(self.p) for d in self.devs]
        self.acked = np.zeros(NSTABLE, np.int64)
        self.attempted = np.zeros(NSTABLE, np.int64)
        self.ops = {}
        self.errors = {}
        self.failures = []
        self.lock = threading.Lock()

    # -- bookkeeping ------------------------------------------------------------------------------
    def count(self, name, err=None):
        with self.lock:
            self.ops[name] = self.ops.get(name, 0) + 1
            if err is not None:
                key = errno.errorcode.get(err, str(err))
                self.errors[key] = self.errors.get(key, 0) + 1

    def fail(self, what):
        with self.lock:
            self.failures.append(what)

    def attempt(self, name, fn, *args):
        """Run one call: its result, or None after a clean OSError (counted)."""
        try:
            out = fn(*args)
        except OSError as ex:
            self.count(name, ex.errno)
            if ex.errno == errno.EDEADLK:
                self.fail(f"{name}{args!r:.80}: {ex}")
            return None
        except BaseException as ex:  # noqa: BLE001 -- the finding
            self.fail(f"{name}{args!r:.80} raised {type(ex).__name__}: {ex}\n"
                      + "".join(traceback.format_exception(type(ex), ex, ex.__traceback__)[-4:]))
            return None
        self.count(name)
        return out

    def check_stable(self, who, first, data, lo, hi):
        """Pages [first, first + n) read as ``data``: their own records, versions in [lo, hi]."""
        ids, vers = records(data)
        n = ids.shape[0]
        want = np.arange(first, first + n, dtype=np.uint64)[:, None]
        if not (ids == want).all():
            k = int(np.nonzero((ids != want).any(axis=1))[0][0])
            self.fail(f"{who}: page {first + k} holds records of page(s) {np.unique(ids[k]).tolist()[:3]} "
                      f"versions {np.unique(vers[k]).tolist()[:3]}; {self._where(first + k)}")
            return
        low = lo[first:first + n][:, None]
        high = hi[first:first + n][:, None]
        bad = (vers < low.astype(np.uint64)) | (vers > high.astype(np.uint64))
        if bad.any():
            k = int(np.nonzero(bad.any(axis=1))[0][0])
            self.fail(f"{who}: page {first + k} holds version {int(vers[k][bad[k]][0])}, acknowledged "
                      f"{int(lo[first + k])}, tried {int(hi[first + k])}"
                      + (" (a LOST WRITE)" if int(vers[k][bad[k]][0]) < int(lo[first + k]) else ""))

    def _where(self, page):
        """What maps stable ``page`` now (for a failure message)."""
        e = int(self.p.pages(self.base + page * P, 1)[0])
        pg = self.system.phys.pages
        pfn = e >> 12
        return (f"PTE {e:#x} -> pfn {pfn} (refcount {int(pg.refcount[pfn])}, mapcount "
                f"{int(pg.mapcount[pfn])}, flags {int(pg.flags[pfn]):#x})")

    def check_churn(self, who, first, data):
        ids, vers = records(data)
        for k in range(ids.shape[0]):
            # record by record: a read racing a write of the same page (or a zap) may see part
            # of each, as on a real CPU; what must never show up is another page's record
            zero = (ids[k] == 0) & (vers[k] == 0)
            if not ((ids[k] == 1000 + first + k) | zero).all():
                bad = ids[k][~zero & (ids[k] != 1000 + first + k)]
                self.fail(f"{who}: churn page {first + k} holds foreign records {np.unique(bad).tolist()[:3]}")
                return

    # -- threads ----------------------------------------------------------------------------------
    def cpu_writer(self, rng, n):
        for _ in range(n):
            first = int(rng.integers(0, NSTABLE // 2))
            k = int(rng.integers(1, 4))
            k = min(k, NSTABLE // 2 - first)
            self._write("cpu write", first, k, lambda a, d: self.p.write(a, d))

    def dev_writer(self, rng, n):
        m = self.mirrors[0]
        for _ in range(n):
            first = int(rng.integers(NSTABLE // 2, NSTABLE))
            k = min(int(rng.integers(1, 4)), NSTABLE - first)
            self._write("device write", first, k, lambda a, d: m.write(a, d))

    def _write(self, name, first, k, fn):
        vers = self.attempted[first:first + k] + 1
        self.attempted[first:first + k] = vers
        data = np.concatenate([stamp(first + i, int(v)) for i, v in enumerate(vers)])
        try:
            fn(self.base + first * P, data)
        except OSError as ex:
            self.count(name, ex.errno)           # not acknowledged
            if ex.errno == errno.EDEADLK:
                self.fail(f"{name} of pages {first}+{k}: {ex}")
            return
        except BaseException as ex:  # noqa: BLE001
            self.fail(f"{name} of pages {first}+{k} raised {type(ex).__name__}: {ex}\n"
                      + "".join(traceback.format_exception(type(ex), ex, ex.__traceback__)[-4:]))
            return
        self.count(name)
        self.acked[first:first + k] = vers

    def cpu_reader(self, rng, n):
        for _ in range(n):
            first = int(rng.integers(0, NSTABLE))
            k = min(int(rng.integers(1, 9)), NSTABLE - first)
            lo = self.acked.copy()
            data = self.attempt("cpu read", self.p.read, self.base + first * P, k * P)
            hi = self.attempted.copy()
            if data is not None:
                self.check_stable("cpu read", first, data, lo, hi)
            data = self.attempt("cpu read churn", self.p.read, self.churn, NCHURN * P)
            if data is not None:
                self.check_churn("cpu read", 0, data)

    def dev_reader(self, rng, n):
        for _ in range(n):
            m = self.mirrors[int(rng.integers(len(self.mirrors)))]
            first = int(rng.integers(0, NSTABLE))
            k = min(int(rng.integers(1, 9)), NSTABLE - first)
            lo = self.acked.copy()
            r = self.attempt("device read", m.read, self.base + first * P, k)
            hi = self.attempted.copy()
            if r is not None:
                self.check_stable(f"device read ({m.mdevice.memory})", first, r.data, lo, hi)

    def migrator(self, rng, n):
        for _ in range(n):
            m = self.mirrors[int(rng.integers(len(self.mirrors)))]
            first = int(rng.integers(0, NSTABLE))
            k = min(int(rng.integers(1, 9)), NSTABLE - first)
            lo = self.acked.copy()
            if rng.integers(3):
                r = self.attempt("migrate_to_dev", m.migrate_to_dev, self.base + first * P, k)
                hi = self.attempted.copy()
                if r is not None:
                    self.check_stable(f"migrate_to_dev readback ({m.mdevice.memory})", first, r.data, lo, hi)
            else:
                self.attempt("migrate_to_sys", m.migrate_to_sys, self.base + first * P, k)

    def exclusive(self, rng, n):
        m = self.mirrors[0]
        for _ in range(n):
            first = int(rng.integers(0, NSTABLE))
            k = min(int(rng.integers(1, 5)), NSTABLE - first)
            lo = self.acked.copy()
            r = self.attempt("exclusive", m.exclusive, self.base + first * P, k)
            hi = self.attempted.copy()
            if r is not None:
                self.check_stable("exclusive readback", first, r.data, lo, hi)

    def releaser(self, rng, n):
        for _ in range(max(1, n // 4)):
            m = self.mirrors[int(rng.integers(len(self.mirrors)))]
            self.attempt("release", m.release)

    def protector(self, rng, n):
        for _ in range(n):
            first = int(rng.integers(0, NSTABLE - 1))
            k = min(int(rng.integers(1, 4)), NSTABLE - first)
            a = self.base + first * P
            self.attempt("mprotect", self.p.mprotect, a, k * P, PROT_READ)
            self.attempt("mprotect", self.p.mprotect, a, k * P, RW)

    def churner(self, rng, n):
        m = self.mirrors[0]
        for _ in range(n):
            first = int(rng.integers(0, NCHURN - 1))
            k = min(int(rng.integers(1, 4)), NCHURN - first)
            a = self.churn + first * P
            op = int(rng.integers(5))
            if op == 0:
                self.attempt("munmap", self.p.munmap, a, k * P)
                self.attempt("mmap fixed", self.p.mmap, k * P, RW, ANON | MAP_FIXED, None, 0, a)
            elif op == 1:
                self.attempt("madvise", self.p.madvise, a, k * P, MADV_DONTNEED)
            elif op == 2:
                away = self.away + first * P
                if self.attempt("mremap", self.p.mremap, a, k * P, k * P, MREMAP_MAYMOVE | MREMAP_FIXED, away):
                    self.attempt("mremap", self.p.mremap, away, k * P, k * P, MREMAP_MAYMOVE | MREMAP_FIXED, a)
            elif op == 3:
                self.attempt("cpu write churn", self.p.write, a, stamp(1000 + first, 1, k))
            else:
                self.attempt("device write churn", m.write, a, stamp(1000 + first, 2, k))
                r = self.attempt("device read churn", m.read, a, k)
                if r is not None:
                    self.check_churn("device read", first, r.data)

    def forker(self, rng, n):
        for _ in range(max(1, n // 6)):
            lo = self.acked.copy()
            c = self.attempt("fork", self.p.fork)
            hi = self.attempted.copy()
            if c is None:
                continue
            try:
                first = self.attempt("child read", c.read, self.base, NSTABLE * P)
                if first is None:
                    continue
                # pages read-only at the fork (mprotect) may be stale by one version: the child
                # copies its page tables under the parent's mmap_lock, so bounds hold as read
                self.check_stable(f"child {c.pid} read", 0, first, lo, hi)
                m = self.attempt("child open", self.devs[0].open, c)
                for _ in range(3):
                    if m is not None:
                        r = self.attempt("child device read", m.read, self.base, NSTABLE)
                        if r is not None and not np.array_equal(r.data, first):
                            self.fail(f"child {c.pid}: its device read differs from its snapshot")
                    again = self.attempt("child read", c.read, self.base, NSTABLE * P)
                    if again is not None and not np.array_equal(again, first):
                        ids, vers = records(again)
                        self.fail(f"child {c.pid}: its memory changed after the fork (versions "
                                  f"{records(first)[1][:, 0].tolist()[:8]} -> {vers[:, 0].tolist()[:8]})")
                        break
                if m is not None:
                    # the child exits while its mirror is still open and in use
                    t = threading.Thread(target=lambda: self.attempt("child device read", m.read, self.base, 4))
                    t.start()
                    self.attempt("exit", c.exit)
                    t.join(JOIN_TIMEOUT)
                    self.attempt("child close", m.close)
            finally:
                if c.alive:
                    self.attempt("exit", c.exit)

    # -- running --------------------------------------------------------------------------------
    def run(self, workers, nops, seed):
        threads = []
        for i, (name, fn) in enumerate(workers):
            rng = np.random.default_rng(seed * 100 + i)
            t = threading.Thread(target=self._body, args=(name, fn, rng, nops), name=name, daemon=True)
            threads.append(t)
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)           # switch threads often: more interleavings
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + JOIN_TIMEOUT
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
        finally:
            sys.setswitchinterval(old)
        hung = [t for t in threads if t.is_alive()]
        if hung:
            frames = sys._current_frames()
            stacks = "\n".join(f"--- {t.name}:\n" + "".join(traceback.format_stack(frames[t.ident])[-14:])
                               for t in hung if t.ident in frames)
            pytest.fail(f"{len(hung)} thread(s) hung for {JOIN_TIMEOUT} s: {[t.name for t in hung]}\n{stacks}")

    def _body(self, name, fn, rng, nops):
        try:
            fn(rng, nops)
        except BaseException as ex:  # noqa: BLE001
            self.fail(f"thread {name} died: {type(ex).__name__}: {ex}\n" + traceback.format_exc()[-800:])

    def finish(self, scenario):
        if self.failures:
            try:
                check_system(self.system, pins=(), devices=self.devs)
            except AssertionError as ex:
                self.failures.insert(0, f"and the machine is inconsistent: {ex}")
        assert not self.failures, f"{len(self.failures)} failures, e.g.:\n" + "\n".join(self.failures[:5])
        # quiescent now: every stable page holds what was last acknowledged, or a later try
        self.p.mprotect(self.base, NSTABLE * P, RW)
        lo, hi = self.acked.copy(), self.attempted.copy()
        data = self.p.read(self.base, NSTABLE * P)
        ids, vers = records(data)
        lost = int((vers[:, 0].astype(np.int64) < lo).sum())
        self.check_stable("final read", 0, data, lo, hi)
        check_system(self.system, pins=(), devices=self.devs)
        for m in self.mirrors:
            m.close()
        for proc in list(self.system.processes):
            proc.exit()
        phys = self.system.phys
        assert phys.nr_free() == self.free0, f"{self.free0 - phys.nr_free()} RAM frames leaked"
        assert not phys.pages.refcount[1:].any(), "a page still referenced after every exit"
        assert not (phys.pages.flags[1:] & 1).any(), "a page left locked"
        assert all(d.nr_allocated() == 0 for d in self.devs), "device pages leaked"
        REPORT[scenario] = {"operations": sum(self.ops.values()), "lost_writes": lost,
                            "acknowledged_writes": int(self.acked.sum()), "ops": dict(self.ops),
                            "errors": dict(self.errors)}
        print(f"\nstress {scenario}: {REPORT[scenario]['operations']} operations, "
              f"{REPORT[scenario]['acknowledged_writes']} acknowledged writes, {lost} lost; errors {self.errors}")
        assert not self.failures, "\n".join(self.failures[:5])
        assert lost == 0


def ops(n):
    return max(1, int(n * SCALE))


@pytest.mark.parametrize("kind", ["private", "coherent"])
def test_writers_racing_migrations(kind):
    """CPU and device writers, readers, and migrations both ways of the same pages."""
    s = Stress([kind])
    s.run([("cpu writer", s.cpu_writer), ("device writer", s.dev_writer), ("cpu reader", s.cpu_reader),
           ("device reader", s.dev_reader), ("migrator", s.migrator), ("migrator 2", s.migrator)],
          ops(200), seed=1)
    s.finish(f"writers+migrations ({kind})")


def test_everything_at_once():
    """Every kind of thread at once, on a private and a coherent device."""
    s = Stress(["private", "coherent"])
    s.run([("cpu writer", s.cpu_writer), ("device writer", s.dev_writer), ("cpu reader", s.cpu_reader),
           ("device reader", s.dev_reader), ("migrator", s.migrator), ("exclusive", s.exclusive),
           ("releaser", s.releaser), ("protector", s.protector), ("churner", s.churner),
           ("forker", s.forker)], ops(120), seed=2)
    s.finish("everything")
