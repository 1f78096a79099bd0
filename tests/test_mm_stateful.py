"""A hypothesis state machine over the emulated host kernel, checked against a plain model.

Random mmap (private/shared anonymous, private/shared mappings of one real temp file), munmap,
mprotect, mremap, madvise(MADV_DONTNEED), read, write, fork, exit, pin/unpin, msync and
writeback over several processes.  The model is deliberately simple:

* every process maps virtual page numbers to ``Entry(prot, kind, ref, fidx)``;
* private anonymous pages own a ``Box`` (bytes, or None for zeros) that fork copies;
* shared anonymous pages share one ``Box`` between every process that maps it;
* shared file pages alias the model file (one array per file page);
* private file pages alias the model file until the process writes them (then they own a Box).

After every step the invariants compare the model with the kernel's internals:
data of every present PTE, the VMA layout and protections, refcount / mapcount / pincount of
every frame against what the page tables, the page caches and the pins reference, rss counters,
"writable private PTE => exclusive anonymous page", and the free-frame count.  At the end every
process exits and every frame must be free again.

``MMStateMachineTHP`` adds transparent huge pages: 2 MiB MADV_HUGEPAGE regions written (a
THP) or read (the huge zero page), MADV_COLLAPSE, and every other rule cutting into them
(splits), with one more invariant: a PMD mapping is 512 entries of one naturally aligned,
unsplit folio at a 2 MiB aligned address.
"""
import errno
import functools
import os
import shutil
import tempfile
import threading

import numpy as np
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import hmmgpu
from invariants import check_system
from hmmgpu import (
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    MS_SYNC,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from hmmgpu.mm.notifier import (
    MmuIntervalNotifier,
    mmu_interval_notifier_insert,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
)

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
FILE_PAGES = 8
MAX_PROCS = 4
RAM_PAGES = 1024
PTE_PRESENT = np.uint64(1)
PTE_WRITE = np.uint64(2)
PTE_SPECIAL = np.uint64(16)
PTE_HUGE = np.uint64(32)
PG_ANON = 1 << 2
PG_HEAD = 1 << 8
NR = 512
# a quiet part of the address space for MREMAP_FIXED / MAP_FIXED targets
FIXED_BASE = 0x2000_0000
FIXED_PAGES = 32
THP_BASE = 0x4000_0000            # where the THP variant asks for its 2 MiB regions
PROTS = (PROT_NONE, PROT_READ, RW)
KINDS = ("anon", "shanon", "pvfile", "shfile")


class Box:
    """The content of one page nobody else sees (or, for shmem, everybody sharing it)."""

    __slots__ = ("data",)

    def __init__(self, data=None):
        self.data = data

    def get(self):
        return np.zeros(P, np.uint8) if self.data is None else self.data

    def put(self, off, b):
        if self.data is None:
            self.data = np.zeros(P, np.uint8)
        self.data[off:off + len(b)] = b


class Entry:
    __slots__ = ("prot", "kind", "ref", "fidx")

    def __init__(self, prot, kind, ref=None, fidx=None):
        self.prot, self.kind, self.ref, self.fidx = prot, kind, ref, fidx

    def fork_copy(self):
        if self.kind == "anon" or (self.kind == "pvfile" and self.ref is not None):
            return Entry(self.prot, self.kind, Box(None if self.ref.data is None else self.ref.data.copy()),
                         self.fidx)
        return Entry(self.prot, self.kind, self.ref, self.fidx)


class Mirror:
    """A device mirror of one address space, kept by the interval-notifier protocol.

    After every step it snapshots the present PTEs (pfn, writable) under read_begin/read_retry,
    like a driver installing device mappings.  Each invalidation drops the mirrored entries in its
    range and checks that they were still intact when it was called (invalidate_range_start runs
    *before* the page table changes).  Later, every mirrored entry must still match the CPU page
    table: a PTE that changed pfn or lost its write bit without an invalidation is a stale device
    mapping, the bug HMM's notifiers exist to prevent.
    """

    def __init__(self, proc):
        self.proc = proc
        self.lock = threading.Lock()
        self.entries = {}
        self.violations = []
        self.mni = MmuIntervalNotifier()
        mmu_interval_notifier_insert(self.mni, proc.mm, 0x10000, (1 << 47) - 0x10000, self)

    def pte(self, vpn):
        v = self.proc.mm.find_vma(vpn * P)
        return None if v is None else int(v.pte[vpn - v.start // P])

    def stale(self, vpn, pfn, w):
        e = self.pte(vpn)
        if e is None or not e & 1 or e >> 12 != pfn:
            return f"page 0x{vpn * P:x}: mirrored pfn {pfn}, PTE now {e and hex(e)}"
        if w and not e & 2:
            return f"page 0x{vpn * P:x}: mirrored writable, PTE now read-only"
        return None

    def invalidate(self, mni, rng, cur_seq):
        with self.lock:
            mmu_interval_set_seq(mni, cur_seq)
            lo, hi = rng.start // P, -(-rng.end // P)
            gone = [v for v in self.entries if lo <= v < hi]
            for v in gone:
                why = self.stale(v, *self.entries.pop(v))
                if why:
                    self.violations.append(f"invalidation {rng!r} came after the change: {why}")
        return True

    def check_and_refresh(self):
        for vpn, (pfn, w) in self.entries.items():
            why = self.stale(vpn, pfn, w)
            assert why is None, f"pid {self.proc.pid}: PTE changed with no mmu notifier invalidation: {why}"
        assert not self.violations, self.violations[:3]
        for _ in range(3):
            seq = mmu_interval_read_begin(self.mni)
            snap = {}
            for v in self.proc.mm.vmas:
                pte = np.asarray(v.pte, np.uint64)
                for i in np.nonzero(pte & PTE_PRESENT)[0].tolist():
                    e = int(pte[i])
                    snap[v.start // P + i] = (e >> 12, bool(e & 2))
            with self.lock:
                if not mmu_interval_read_retry(self.mni, seq):
                    self.entries = snap
                    return
        raise AssertionError("mirror refresh kept retrying with nothing else running")


def _oom_tolerant(rule_fn):
    """In the OOM variant a rule's own process may be killed under it (ProcessKilled)."""
    @functools.wraps(rule_fn)
    def call(self, *args, **kwargs):
        self.reap_dead()
        try:
            return rule_fn(self, *args, **kwargs)
        except hmmgpu.ProcessKilled:
            if not self.oom:
                raise
        finally:
            self.reap_dead()
    return call


class MMStateMachine(RuleBasedStateMachine):
    ram_pages = RAM_PAGES
    oom = False           # the OOM variant: processes may be killed at any allocation
    thp = "madvise"

    def __init__(self):
        super().__init__()
        self.system = hmmgpu.System(backend=os.environ.get("HMMGPU_BACKEND", "numpy"),
                                    ram_bytes=self.ram_pages * P, thp=self.thp)
        self.free0 = int(self.system.phys.nr_free())
        self.dir = tempfile.mkdtemp(prefix="hmmgpu-stateful-")
        self.path = os.path.join(self.dir, "file")
        init = np.random.default_rng(1234).integers(0, 256, FILE_PAGES * P, dtype=np.uint8)
        with open(self.path, "wb") as f:
            f.write(init.tobytes())
        self.fd = os.open(self.path, os.O_RDWR)
        self.file = [init[i * P:(i + 1) * P].copy() for i in range(FILE_PAGES)]
        self.procs = []          # [(Process, {vpn: Entry})]
        self.pins = []           # Pin
        self.mirrors = {}        # pid -> Mirror
        self.pinned = {}         # (pid, vpn) -> [(Pin, pfn)]: pins that must stay the mapped page
        self.memcg = self.system.memcg("stateful", None)     # every other process lives in it
        self.nspawned = 0
        self.spawn()

    # -- helpers ---------------------------------------------------------------------------
    def spawn(self):
        self.nspawned += 1
        proc = self.system.spawn(memcg=self.memcg if self.nspawned % 2 == 0 else None)
        self.mirrors[proc.pid] = Mirror(proc)
        self.procs.append((proc, {}))

    def reap_dead(self):
        """Forget processes the OOM killer took; they must be torn down completely."""
        for proc, model in list(self.procs):
            if proc.alive:
                continue
            assert self.oom, f"pid {proc.pid} died unexpectedly: {proc.killed_reason}"
            self.procs.remove((proc, model))
            self.untrack(proc, 0, 1 << 40)
            m = self.mirrors.pop(proc.pid)
            assert not m.entries, f"killed pid {proc.pid} left mirrored entries: {list(m.entries)[:3]}"
            assert not proc.mm.vmas, f"killed pid {proc.pid} still has VMAs"
            assert proc.rss == {"anon": 0, "file": 0, "shmem": 0}, proc.rss

    def untrack(self, proc, lo, hi):
        """The pages [lo, hi) of ``proc`` were unmapped, zapped or moved: their pins may diverge."""
        for key in [k for k in self.pinned if k[0] == proc.pid and lo <= k[1] < hi]:
            del self.pinned[key]

    def pick(self, i):
        return self.procs[i % len(self.procs)]

    def any_mapped(self):
        return any(model for _, model in self.procs)

    def pick_mapped(self, i):
        live = [pm for pm in self.procs if pm[1]]
        return live[i % len(live)]

    def content(self, e):
        if e.kind in ("anon", "shanon"):
            return e.ref.get()
        if e.kind == "shfile" or e.ref is None:
            return self.file[e.fidx]
        return e.ref.get()

    def store(self, e, off, b):
        if e.kind in ("anon", "shanon"):
            e.ref.put(off, b)
        elif e.kind == "shfile":
            self.file[e.fidx][off:off + len(b)] = b
        else:
            if e.ref is None:
                e.ref = Box(self.file[e.fidx].copy())
            e.ref.put(off, b)

    @staticmethod
    def mapped_runs(model):
        """Maximal runs of consecutive mapped vpns: [(first_vpn, npages)]."""
        vpns = sorted(model)
        runs = []
        for v in vpns:
            if runs and runs[-1][0] + runs[-1][1] == v:
                runs[-1][1] += 1
            else:
                runs.append([v, 1])
        return runs

    def pick_range(self, model, i, j, maxlen=4):
        """A fully mapped range [vpn, vpn+n) of ``model``, or None."""
        runs = self.mapped_runs(model)
        if not runs:
            return None
        first, n = runs[i % len(runs)]
        start = first + (j % n)
        length = 1 + (j // 7) % min(maxlen, first + n - start)
        return start, length

    def new_entries(self, kind, prot, npages, fidx0):
        if kind == "anon":
            return [Entry(prot, "anon", Box()) for _ in range(npages)]
        if kind == "shanon":
            return [Entry(prot, "shanon", Box()) for _ in range(npages)]
        return [Entry(prot, kind, None, fidx0 + k) for k in range(npages)]

    # -- rules ---------------------------------------------------------------------------------
    @precondition(lambda self: len(self.procs) < MAX_PROCS)
    @rule()
    @_oom_tolerant
    def spawn_process(self):
        self.spawn()

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 63), kind=st.sampled_from(KINDS), npages=st.integers(1, 4),
          prot=st.sampled_from(PROTS), off=st.integers(0, FILE_PAGES), fixed=st.integers(-1, FIXED_PAGES - 1))
    @_oom_tolerant
    def mmap(self, i, kind, npages, prot, off, fixed):
        proc, model = self.pick(i)
        flags = (MAP_SHARED if kind in ("shanon", "shfile") else MAP_PRIVATE)
        kw = {}
        if kind in ("anon", "shanon"):
            flags |= MAP_ANONYMOUS
            fidx0 = None
        else:
            fidx0 = off % (FILE_PAGES - npages + 1)
            kw = dict(fd=self.fd, offset=fidx0 * P)
        if fixed >= 0:
            flags |= MAP_FIXED
            kw["addr"] = FIXED_BASE + fixed * P
        a = proc.mmap(npages * P, prot, flags, **kw)
        assert a % P == 0
        vpn = a // P
        if fixed >= 0:
            assert a == FIXED_BASE + fixed * P
            self.untrack(proc, vpn, vpn + npages)
        for k, e in enumerate(self.new_entries(kind, prot, npages, fidx0)):
            if fixed < 0:
                assert vpn + k not in model, f"mmap returned 0x{a:x}, which overlaps a mapping"
            model[vpn + k] = e

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 63), kind=st.sampled_from(KINDS), npages=st.integers(1, 4), off=st.integers(0, FILE_PAGES))
    @_oom_tolerant
    def mmap_rw(self, i, kind, npages, off):
        """A second mmap rule (readable-writable, kernel-placed): keeps the address spaces populated."""
        self.mmap(i, kind, npages, RW, off, -1)

    @precondition(lambda self: self.any_mapped())
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023), extra=st.integers(-1, 2))
    @_oom_tolerant
    def munmap(self, i, j, extra):
        proc, model = self.pick_mapped(i)
        r = self.pick_range(model, i // 4, j)
        if r is None:
            return
        start, n = r
        start = max(start + min(extra, 0), 1)          # sometimes start one page before the run
        n = n + max(extra, 0)                          # sometimes run past its end
        proc.munmap(start * P, n * P)
        self.untrack(proc, start, start + n)
        for v in range(start, start + n):
            model.pop(v, None)

    @precondition(lambda self: self.any_mapped())
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023), prot=st.sampled_from(PROTS))
    @_oom_tolerant
    def mprotect(self, i, j, prot):
        proc, model = self.pick_mapped(i)
        r = self.pick_range(model, i // 4, j)
        if r is None:
            return
        start, n = r
        proc.mprotect(start * P, n * P, prot)
        for v in range(start, start + n):
            model[v].prot = prot

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 63))
    @_oom_tolerant
    def mprotect_unmapped_fails_cleanly(self, i):
        proc, model = self.pick(i)
        before = [(v.start, v.end, v.vm_flags, v.pte.tobytes()) for v in proc.mm.vmas]
        hole = FIXED_BASE - 8 * P                       # never mapped by any rule
        try:
            proc.mprotect(hole, P, PROT_READ)
        except OSError as e:
            assert e.errno == errno.ENOMEM
        else:
            raise AssertionError("mprotect of an unmapped page succeeded")
        assert [(v.start, v.end, v.vm_flags, v.pte.tobytes()) for v in proc.mm.vmas] == before

    @precondition(lambda self: self.any_mapped())
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023))
    @_oom_tolerant
    def madvise_dontneed(self, i, j):
        proc, model = self.pick_mapped(i)
        r = self.pick_range(model, i // 4, j)
        if r is None:
            return
        start, n = r
        proc.madvise(start * P, n * P, MADV_DONTNEED)
        self.untrack(proc, start, start + n)
        for v in range(start, start + n):
            e = model[v]
            if e.kind == "anon":
                e.ref = Box()
            elif e.kind == "pvfile":
                e.ref = None

    @precondition(lambda self: self.any_mapped())
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023), mode=st.sampled_from(("shrink", "grow", "fixed", "dontunmap")),
          delta=st.integers(1, 3), dest=st.integers(0, FIXED_PAGES - 8))
    @_oom_tolerant
    def mremap(self, i, j, mode, delta, dest):
        proc, model = self.pick_mapped(i)
        vmas = list(proc.mm.vmas)
        if not vmas:
            return
        v = vmas[j % len(vmas)]
        n_v = (v.end - v.start) // P
        s = v.start // P + (j // 5) % n_v
        n = 1 + (j // 11) % (v.end // P - s)
        old = [model[s + k] for k in range(n)]
        kind = old[0].kind
        if mode == "shrink":
            if n < 2:
                return
            new_n = max(1, n - delta)
        elif mode == "grow":
            if kind == "shanon":
                return                                  # shmem objects have a fixed size
            if kind in ("pvfile", "shfile") and old[-1].fidx + delta >= FILE_PAGES:
                return
            new_n = n + delta
        else:
            new_n = n
        flags = {"shrink": 0, "grow": MREMAP_MAYMOVE, "fixed": MREMAP_MAYMOVE | MREMAP_FIXED,
                 "dontunmap": MREMAP_MAYMOVE | MREMAP_DONTUNMAP}[mode]
        kw = {}
        if mode == "fixed":
            target = FIXED_BASE // P + dest
            if target < s + n and s < target + new_n:
                return                                  # overlapping source and target: EINVAL
            kw["new_addr"] = target * P
        got = proc.mremap(s * P, n * P, new_n * P, flags, **kw)
        assert got % P == 0
        g = got // P
        self.untrack(proc, s, s + n)
        self.untrack(proc, g, g + new_n)
        if mode == "fixed":
            assert g == target
            for k in range(new_n):
                model.pop(g + k, None)
        if mode == "dontunmap":
            assert g != s
        for k in range(n):
            del model[s + k]
        if mode == "dontunmap":
            # the page tables moved; the old range stays mapped and refaults from what backs it:
            # nothing for private anonymous memory, the shared object or the file otherwise
            for k, e in enumerate(old):
                if e.kind == "anon":
                    model[s + k] = Entry(e.prot, "anon", Box())
                elif e.kind == "pvfile":
                    model[s + k] = Entry(e.prot, "pvfile", None, e.fidx)
                else:
                    model[s + k] = Entry(e.prot, e.kind, e.ref, e.fidx)
        keep = min(n, new_n)
        for k in range(keep):
            assert g + k not in model, f"mremap moved onto a mapped page 0x{(g + k) * P:x}"
            model[g + k] = old[k]
        last = old[-1]
        for k in range(keep, new_n):
            assert g + k not in model
            fidx = None if last.fidx is None else last.fidx + (k - keep) + 1
            model[g + k] = self.new_entries(kind, last.prot, 1, fidx)[0]

    @precondition(lambda self: self.any_mapped())
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023), off=st.integers(0, P - 1), extra=st.integers(0, 2 * P))
    @_oom_tolerant
    def read(self, i, j, off, extra):
        proc, model = self.pick_mapped(i)
        r = self.pick_range(model, i // 4, j, maxlen=3)
        if r is None:
            return
        start, n = r
        addr = start * P + off
        nbytes = max(1, min(extra, (start + n) * P - addr))
        first, last = addr // P, (addr + nbytes - 1) // P
        readable = all(model[v].prot != PROT_NONE for v in range(first, last + 1))
        try:
            got = proc.read(addr, nbytes)
        except hmmgpu.SegmentationFault:
            assert not readable, f"read of readable [0x{addr:x}, +{nbytes}) segfaulted"
            return
        assert readable, f"read of PROT_NONE memory at 0x{addr:x} succeeded"
        exp = np.concatenate([self.content(model[v]) for v in range(first, last + 1)])
        o = addr - first * P
        assert np.array_equal(got, exp[o:o + nbytes]), f"data mismatch reading [0x{addr:x}, +{nbytes})"

    @precondition(lambda self: self.any_mapped())
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023), off=st.integers(0, P - 1), extra=st.integers(1, 2 * P),
          seed=st.integers(0, 1 << 16))
    @_oom_tolerant
    def write(self, i, j, off, extra, seed):
        self._write(*self.pick_mapped(i), i, j, off, extra, seed)

    def _write(self, proc, model, i, j, off, extra, seed):
        r = self.pick_range(model, i // 4, j, maxlen=3)
        if r is None:
            return
        start, n = r
        # writable prefix of the range; a store that starts on a non-writable page must fault
        w = 0
        while w < n and model[start + w].prot & PROT_WRITE:
            w += 1
        if w == 0:
            try:
                proc.write(start * P + off, b"\x5a")
            except hmmgpu.SegmentationFault:
                return
            raise AssertionError(f"store to a non-writable page at 0x{start * P + off:x} succeeded")
        addr = start * P + off
        nbytes = max(1, min(extra, (start + w) * P - addr))
        data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
        proc.write(addr, data)
        pos = 0
        while pos < nbytes:
            a = addr + pos
            v, o = a // P, a % P
            k = min(P - o, nbytes - pos)
            self.store(model[v], o, data[pos:pos + k])
            pos += k

    @precondition(lambda self: self.any_mapped())
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023), off=st.integers(0, P - 1), seed=st.integers(0, 1 << 16))
    @_oom_tolerant
    def write_small(self, i, j, off, seed):
        """A second, short store rule: stores are what COW, sharing and writeback are about."""
        self.write(i, j, off, 1 + seed % 64, seed)

    @precondition(lambda self: self.any_mapped() and len(self.procs) < MAX_PROCS)
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023), off=st.integers(0, P - 1), seed=st.integers(0, 1 << 16),
          who=st.sampled_from(("parent", "child", "both")))
    @_oom_tolerant
    def fork_then_write(self, i, j, off, seed, who):
        """COW in one step: fork a process that has memory, then store in the parent and/or child."""
        parent = self.pick_mapped(i)
        self._write(*parent, i, j, off, 64, seed)          # make sure there is an anon page to share
        child = self._fork(*parent)
        targets = {"parent": [parent], "child": [child], "both": [parent, child]}[who]
        for k, t in enumerate(targets):
            self._write(*t, i, j, off, 16, seed + k + 1)

    @precondition(lambda self: 0 < len(self.procs) < MAX_PROCS)
    @rule(i=st.integers(0, 63))
    @_oom_tolerant
    def fork(self, i):
        self._fork(*(self.pick_mapped(i) if self.any_mapped() else self.pick(i)))

    def _fork(self, proc, model):
        child = proc.fork()
        self.mirrors[child.pid] = Mirror(child)
        self.procs.append((child, {v: e.fork_copy() for v, e in model.items()}))
        return self.procs[-1]

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 63))
    @_oom_tolerant
    def exit(self, i):
        proc, model = self.pick(i)
        proc.exit()
        self.procs.remove((proc, model))
        self.untrack(proc, 0, 1 << 40)
        m = self.mirrors.pop(proc.pid)
        assert not m.entries, f"exit left mirrored entries without an invalidation: {list(m.entries)[:3]}"
        assert not m.violations, m.violations[:3]
        assert not proc.alive
        try:
            proc.read(0x10000, 1)
        except hmmgpu.ProcessKilled:
            pass
        else:
            raise AssertionError("an exited process still answers")

    @precondition(lambda self: self.any_mapped() and len(self.pins) < 4)
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023), write=st.booleans())
    @_oom_tolerant
    def pin(self, i, j, write):
        proc, model = self.pick_mapped(i)
        r = self.pick_range(model, i // 4, j, maxlen=2)
        if r is None:
            return
        start, n = r
        need = PROT_WRITE if write else PROT_READ
        ok = all(model[v].prot & need for v in range(start, start + n))
        try:
            pin = proc.pin_user_pages(start * P, n, write=write)
        except hmmgpu.ProcessKilled:
            raise
        except OSError as e:
            assert not ok and e.errno == errno.EFAULT, (ok, e)
            return
        assert ok, "pin_user_pages of a range without the access succeeded"
        if write:
            # FOLL_WRITE faults like a store: private file pages get their private copy
            for v in range(start, start + n):
                e = model[v]
                if e.kind == "pvfile" and e.ref is None:
                    e.ref = Box(self.file[e.fidx].copy())
        self.pins.append(pin)
        pfns = np.asarray(pin.pfns, np.int64).tolist()
        assert len(pfns) == n
        for k, pfn in enumerate(pfns):
            e = model[start + k]
            # R/O pins of the zero page and of not-yet-copied private file pages may legitimately
            # diverge after a later store (Linux unshares only anonymous pages for R/O pins)
            if self.system.phys.zero_mask(np.int64(pfn)) or (not write and e.kind == "pvfile" and e.ref is None):
                continue
            self.pinned.setdefault((proc.pid, start + k), []).append((pin, pfn))

    @precondition(lambda self: self.pins)
    @rule(k=st.integers(0, 63))
    @_oom_tolerant
    def unpin(self, k):
        pin = self.pins.pop(k % len(self.pins))
        pin.unpin()
        for key in list(self.pinned):
            self.pinned[key] = [(p, f) for p, f in self.pinned[key] if p is not pin]
            if not self.pinned[key]:
                del self.pinned[key]

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 63))
    @_oom_tolerant
    def msync_all(self, i):
        proc, model = self.pick(i)
        synced = set()
        for vpn0, n in self.mapped_runs(model):
            proc.msync(vpn0 * P, n * P, MS_SYNC)
            synced.update(model[v].fidx for v in range(vpn0, vpn0 + n) if model[v].kind == "shfile")
        with open(self.path, "rb") as f:
            disk = np.frombuffer(f.read(), np.uint8)
        for fi in synced:
            assert np.array_equal(disk[fi * P:(fi + 1) * P], self.file[fi]), f"file page {fi} not synced"

    @rule()
    @_oom_tolerant
    def writeback(self):
        self.system.writeback()
        with open(self.path, "rb") as f:
            disk = np.frombuffer(f.read(), np.uint8)
        assert disk.size == FILE_PAGES * P, "writeback changed the file size"
        assert np.array_equal(disk, np.concatenate(self.file)), "the file on disk differs from the model"

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def whole_machine_is_consistent(self):
        """Layout, PTEs, struct page (mapcount, pincount against the live pins, refcount), rss,
        memcg, free frames, locks: the checker every test shares (tests/invariants.py)."""
        self.reap_dead()
        check_system(self.system, pins=self.pins)

    @invariant()
    def layout_matches_model(self):
        self.reap_dead()
        for proc, model in self.procs:
            seen = {}
            for v in proc.mm.vmas:
                prot = v.vm_flags & RW
                for vpn in range(v.start // P, v.end // P):
                    assert vpn not in seen, f"page 0x{vpn * P:x} in two VMAs"
                    seen[vpn] = prot
            assert set(seen) == set(model), (
                f"pid {proc.pid}: kernel maps {sorted(set(seen) - set(model))[:4]} the model does not, "
                f"model maps {sorted(set(model) - set(seen))[:4]} the kernel does not")
            for vpn, e in model.items():
                assert seen[vpn] == e.prot, f"pid {proc.pid} page 0x{vpn * P:x}: prot {seen[vpn]} != {e.prot}"

    @invariant()
    def present_ptes_hold_model_data(self):
        self.reap_dead()
        phys = self.system.phys
        for proc, model in self.procs:
            for v in proc.mm.vmas:
                pte = np.asarray(v.pte, np.uint64)
                present = (pte & PTE_PRESENT) != 0
                assert not ((pte != 0) & ~present).any(), "non-present special entries without a device"
                if not present.any():
                    continue
                idx = np.nonzero(present)[0]
                pfns = (pte[idx] >> np.uint64(12)).astype(np.int64)
                data = phys.read(pfns)
                zeroes = phys.zero_mask(pfns)
                untouched = []
                for k, i in enumerate(idx.tolist()):
                    vpn = v.start // P + i
                    e = model[vpn]
                    if e.kind == "anon" and e.ref.data is None:
                        untouched.append(k)          # checked all at once below
                    else:
                        assert np.array_equal(data[k], self.content(e)), (
                            f"pid {proc.pid} page 0x{vpn * P:x} ({e.kind}) pfn {pfns[k]}: frame content differs")
                    if pte[i] & PTE_WRITE:
                        assert e.prot & PROT_WRITE, f"writable PTE at 0x{vpn * P:x} in a {e.prot} mapping"
                    if zeroes[k]:
                        assert e.kind == "anon", f"zero page mapped at 0x{vpn * P:x} ({e.kind})"
                bad = np.nonzero(data[untouched].any(axis=1))[0]
                assert bad.size == 0, (f"pid {proc.pid} page 0x{v.start + idx[untouched[bad[0]]] * P:x}: "
                                       "a page never written holds data")

    @invariant()
    def pinned_pages_stay_mapped(self):
        """A pinned page stays the page the process sees until it unmaps, zaps or moves it (GUP
        breaks COW up front, fork copies pinned anonymous pages, a store reuses the pinned page)."""
        self.reap_dead()
        procs = {p.pid: p for p, _ in self.procs}
        for (pid, vpn), lst in self.pinned.items():
            v = procs[pid].mm.find_vma(vpn * P)
            e = int(v.pte[vpn - v.start // P])
            for _, pfn in lst:
                assert e & 1 and e >> 12 == pfn, (
                    f"pid {pid} page 0x{vpn * P:x}: pinned pfn {pfn}, but the PTE is now {e:#x}")

    @invariant()
    def device_mirrors_are_never_stale(self):
        self.reap_dead()
        for proc, _ in self.procs:
            self.mirrors[proc.pid].check_and_refresh()

    @invariant()
    def rss_is_what_the_model_maps(self):
        """Each process's rss by the kind the model says each mapped page is."""
        self.reap_dead()
        phys = self.system.phys
        for proc, model in self.procs:
            counts = {"anon": 0, "file": 0, "shmem": 0}
            for v in proc.mm.vmas:
                pte = np.asarray(v.pte, np.uint64)
                sel = ((pte & PTE_PRESENT) != 0) & ((pte & PTE_SPECIAL) == 0)
                zero = np.zeros(pte.size, bool)
                zero[sel] = phys.zero_mask((pte[sel] >> np.uint64(12)).astype(np.int64))
                if v.file is None and not v.shared:
                    counts["anon"] += int(np.count_nonzero(sel & ~zero))     # private anonymous
                    continue
                for i in np.nonzero(sel & ~zero)[0].tolist():
                    e = model[v.start // P + i]
                    if e.kind == "shanon":
                        counts["shmem"] += 1
                    elif e.kind == "shfile" or (e.kind == "pvfile" and e.ref is None):
                        counts["file"] += 1
                    else:
                        counts["anon"] += 1
            assert proc.rss == counts, f"pid {proc.pid}: rss {proc.rss} != {counts}"

    def teardown(self):
        try:
            self.reap_dead()
            for pin in self.pins:
                pin.unpin()
            self.pins = []
            for proc, _ in list(self.procs):
                proc.exit()
            self.procs = []
            self.system.drop_caches()
            assert self.memcg.usage == 0, f"memcg still charged {self.memcg.usage} bytes after every exit"
            phys = self.system.phys
            kept = NR if phys.huge_zero_pfn >= 0 else 0          # the huge zero folio stays
            assert int(phys.nr_free()) == self.free0 - kept, (
                f"{self.free0 - kept - int(phys.nr_free())} frames leaked after every process exited")
            rc = phys.pages.refcount[:phys.nr_ram].copy()
            rc[phys.zero_mask(np.arange(phys.nr_ram, dtype=np.int64))] = 0
            assert (rc == 0).all()
            with open(self.path, "rb") as f:
                disk = np.frombuffer(f.read(), np.uint8)
            assert np.array_equal(disk, np.concatenate(self.file)), "file differs after exit"
        finally:
            os.close(self.fd)
            shutil.rmtree(self.dir, ignore_errors=True)


MMStateMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("HMMGPU_STATEFUL_EXAMPLES", "200")),
    stateful_step_count=30,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    # shrinking a 30-step run with these invariants takes minutes: opt in with HMMGPU_STATEFUL_SHRINK=1
    phases=(list(Phase) if os.environ.get("HMMGPU_STATEFUL_SHRINK")
            else [Phase.explicit, Phase.reuse, Phase.generate]),
)
TestMMStateful = MMStateMachine.TestCase


class MMStateMachineOOM(MMStateMachine):
    """The same machine on a 24-page computer: the OOM killer runs all the time."""

    ram_pages = 24
    oom = True

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 63), npages=st.integers(4, 12), seed=st.integers(0, 255),
          kind=st.sampled_from(("anon", "shanon")))
    @_oom_tolerant
    def hog(self, i, npages, seed, kind):
        """Map and fill a big region: memory runs out and somebody gets killed."""
        proc, model = self.pick(i)
        flags = MAP_ANONYMOUS | (MAP_PRIVATE if kind == "anon" else MAP_SHARED)
        a = proc.mmap(npages * P, RW, flags)
        for k, e in enumerate(self.new_entries(kind, RW, npages, None)):
            assert a // P + k not in model
            model[a // P + k] = e
        data = np.full(npages * P, seed, np.uint8)
        proc.write(a, data)
        for k in range(npages):
            self.store(model[a // P + k], 0, data[k * P:(k + 1) * P])


MMStateMachineOOM.TestCase.settings = settings(
    MMStateMachine.TestCase.settings,
    max_examples=int(os.environ.get("HMMGPU_STATEFUL_OOM_EXAMPLES", "100")),
)
TestMMStatefulOOM = MMStateMachineOOM.TestCase


class MMStateMachineTHP(MMStateMachine):
    """The same machine with 2 MiB MADV_HUGEPAGE regions in the address spaces: THPs, the huge
    zero page, MADV_COLLAPSE, and every other rule cutting into them."""

    ram_pages = 4096

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 63), read_first=st.booleans(), seed=st.integers(0, 255))
    @_oom_tolerant
    def mmap_thp(self, i, read_first, seed):
        """A 2 MiB-aligned MADV_HUGEPAGE region (inside a mapping one page longer each side),
        faulted in by a read (the huge zero page) or a write (a THP)."""
        proc, model = self.pick(i)
        self.nthp = getattr(self, "nthp", 0) + 1
        hint = THP_BASE + (self.nthp % 64) * 2 * NR * P - P
        base = proc.mmap(NR * P + 2 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS, addr=hint)
        for k, e in enumerate(self.new_entries("anon", RW, NR + 2, None)):
            assert base // P + k not in model
            model[base // P + k] = e
        start = -(-base // (NR * P)) * (NR * P)
        if start + NR * P > base + NR * P + 2 * P:
            return                                    # the hint was taken: no aligned 2 MiB here
        proc.madvise(start, NR * P, MADV_HUGEPAGE)
        if read_first:
            assert not proc.read(start + seed * P, 1).any()
        else:
            b = np.array([seed | 1], np.uint8)
            proc.write(start + seed * P, b)
            self.store(model[start // P + seed], 0, b)

    @precondition(lambda self: self.any_mapped())
    @rule(i=st.integers(0, 63), j=st.integers(0, 1023))
    @_oom_tolerant
    def collapse(self, i, j):
        """MADV_COLLAPSE of a mapped, anonymous, 2 MiB-aligned 2 MiB: the data stays."""
        cands = []
        for proc, model in self.procs:
            starts = sorted({v - v % NR for v in model if (v - v % NR) in model})
            cands += [(proc, s) for s in starts if all(
                model.get(s + k) is not None and model[s + k].kind == "anon"
                and model[s + k].prot != PROT_NONE for k in range(NR))]
        if not cands:
            return
        proc, s = cands[(i * 1024 + j) % len(cands)]
        try:
            proc.madvise(s * P, NR * P, MADV_COLLAPSE)
        except OSError as e:
            # a pinned page (EAGAIN) or no free 2 MiB block (ENOMEM) are the only excuses
            pinned = any(k[0] == proc.pid and s <= k[1] < s + NR for k in self.pinned)
            assert e.errno == errno.ENOMEM or (e.errno == errno.EAGAIN and pinned), e
            return
        v = proc.mm.find_vma(s * P)
        if v.end < (s + NR) * P:
            return                # the 2 MiB spans two VMAs: no PMD can map it (and that is no error)
        pte = np.asarray(v.pte[s - v.start // P:s - v.start // P + NR], np.uint64)
        assert ((pte & PTE_HUGE) != 0).all(), "MADV_COLLAPSE succeeded without a PMD mapping"

    @invariant()
    def pmd_mappings_are_whole_folios(self):
        self.reap_dead()
        phys = self.system.phys
        pg = phys.pages
        for proc, _ in self.procs:
            for v in proc.mm.vmas:
                pte = np.asarray(v.pte, np.uint64)
                huge = np.nonzero((pte & PTE_HUGE) != 0)[0]
                if huge.size == 0:
                    continue
                assert huge.size % NR == 0, f"pid {proc.pid}: a PMD mapping of {huge.size} entries"
                groups = huge.reshape(-1, NR)
                assert (np.diff(groups, axis=1) == 1).all(), "a PMD mapping with holes"
                assert ((v.start // P + groups[:, 0]) % NR == 0).all(), "a PMD mapping off a 2 MiB boundary"
                pfn = (pte[groups] >> np.uint64(12)).astype(np.int64)
                assert (pfn[:, 0] % NR == 0).all() and (np.diff(pfn, axis=1) == 1).all(), \
                    "a PMD mapping of pages that are not one aligned folio"
                assert (pg.order[pfn] == 9).all(), "a PMD maps a folio that was split"
                assert (pg.flags[pfn[:, 0]] & PG_HEAD).all()
                kinds = pte[groups] & np.uint64(0xF03)
                assert (kinds == kinds[:, :1]).all(), "a PMD mapping mixes kinds or permissions"


MMStateMachineTHP.TestCase.settings = settings(
    MMStateMachine.TestCase.settings,
    max_examples=int(os.environ.get("HMMGPU_STATEFUL_THP_EXAMPLES", "40")),
)
TestMMStatefulTHP = MMStateMachineTHP.TestCase
