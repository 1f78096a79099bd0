"""Fuzzing every public entry point with hostile arguments (issue 10).

Each hypothesis example builds a small machine -- three processes (one forked), a private and a
coherent dmirror device with every process open on both, canary pages spread over system RAM,
both devices and an exclusive entry, a shared file mapping -- and then makes a few dozen calls
chosen from every Process method, every dmirror ioctl and the kernel-level HMM API, with
arguments drawn from plausible values and hostile ones: negatives, values past 2**64 and
TASK_SIZE, unaligned addresses, floats, None, strings, lists where arrays belong, huge counts.

After every call:

* it returned, or raised OSError (kernel-level functions: returned a negative errno); anything
  else is an *unclean* exception and fails the test at once, naming the call;
* a call that cannot change data (reads, migrations, snapshots, exclusive access, pins, fork,
  the kernel-level API, whose callers here always finish what they start) left every canary
  page holding what it held; a call that may change data or the layout left them unchanged
  when it was rejected with an errno the kernel raises before touching anything (EINVAL ...);
  the few rejections Linux applies partly (madvise/mprotect over a hole, a store cut short by
  SIGBUS or a fault) are the only exceptions;
* the whole-machine invariant checker (tests/invariants.py) holds.

At the end every pin is released, every file closed, every process exits, and every frame of
RAM and of both devices must be free.  Deterministic (derandomize=True).  The default is ~2,400
calls; HMMGPU_FUZZ_EXAMPLES and HMMGPU_FUZZ_CALLS make longer runs, HMMGPU_FUZZ_REPORT=path
writes the counts as JSON, and HMMGPU_FUZZ_KEEP_GOING=1 counts findings instead of stopping at the
first (to measure a tree that has some; the test still fails at the end).
"""
import errno
import json
import os
import shutil
import tempfile
import traceback

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import hmmgpu
from hmmgpu import (MADV_DONTNEED, MADV_FREE, MADV_HUGEPAGE, MADV_NORMAL, MAP_ANONYMOUS, MAP_FIXED,
                    MAP_FIXED_NOREPLACE, MAP_POPULATE, MAP_PRIVATE, MAP_SHARED, MREMAP_DONTUNMAP,
                    MREMAP_FIXED, MREMAP_MAYMOVE, MS_ASYNC, MS_SYNC, PAGE_SIZE, PROT_EXEC, PROT_NONE,
                    PROT_READ, PROT_WRITE)
from hmmgpu.constants import MMAP_MIN_ADDR, TASK_SIZE
from hmmgpu.drivers import dmirror
from hmmgpu.hmm import (HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, MEMORY_DEVICE_COHERENT,
                        MEMORY_DEVICE_PRIVATE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                        MIGRATE_VMA_SELECT_SYSTEM, DevPagemap, HmmRange, MigrateVma, hmm_range_fault,
                        make_device_exclusive_range, memremap_pages, memunmap_pages,
                        migrate_device_finalize, migrate_device_pages, migrate_device_range,
                        migrate_vma_finalize, migrate_vma_pages, migrate_vma_setup,
                        mmu_interval_notifier_insert, mmu_interval_notifier_remove,
                        mmu_interval_read_begin)
from hmmgpu.mm.notifier import MmuIntervalNotifier, mmu_interval_set_seq
from invariants import check_system

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
RAM_PAGES = 1024
EXAMPLES = int(os.environ.get("HMMGPU_FUZZ_EXAMPLES", "32"))
CALLS = int(os.environ.get("HMMGPU_FUZZ_CALLS", "75"))
KEEP_GOING = bool(os.environ.get("HMMGPU_FUZZ_KEEP_GOING"))
STATS = {"calls": 0, "returned": 0, "clean_errors": 0, "unclean": 0, "corruptions": 0,
         "oom_kills": 0, "examples": 0, "by_errno": {}, "by_call": {}}

# Values no C caller could pass, or that sit on a boundary.
HOSTILE = [None, -1, -P, 1 << 64, (1 << 64) - P, (1 << 64) + P, 1 << 63, -(1 << 63) - 1, 1.5,
           float("inf"), float("nan"), "4096", [P], np.int64(-P), np.uint64((1 << 64) - P), True,
           1 << 47, TASK_SIZE, TASK_SIZE - P, 0]
LENGTHS = [0, 1, P - 1, P, 2 * P, 3 * P, 8 * P, 64 * P, 1 << 30, 1 << 40, 1 << 47, (1 << 64) - 1]
SANE_LENGTHS = [1, P - 1, P, 2 * P, 3 * P, 8 * P]
SANE_PROTS = [PROT_NONE, PROT_READ, RW]
NPAGES = [0, 1, 2, 3, 8, 64, 4096, 1 << 22, 1 << 24, 1 << 40, 1 << 52, (1 << 64) - 1]
PROTS = [PROT_NONE, PROT_READ, RW, RW | PROT_EXEC, 0x8, 0xFF]
MMAP_FLAGS = [ANON, MAP_SHARED | MAP_ANONYMOUS, ANON | MAP_FIXED, ANON | MAP_POPULATE,
              ANON | MAP_FIXED_NOREPLACE, MAP_PRIVATE, MAP_SHARED, MAP_PRIVATE | MAP_SHARED | MAP_ANONYMOUS,
              0, ANON | MAP_FIXED | MAP_POPULATE]
ADVICE = [MADV_NORMAL, MADV_DONTNEED, MADV_FREE, MADV_HUGEPAGE, 7, 1 << 40]
MREMAP_FLAGS = [0, MREMAP_MAYMOVE, MREMAP_MAYMOVE | MREMAP_FIXED, MREMAP_FIXED,
                MREMAP_MAYMOVE | MREMAP_DONTUNMAP, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, 8]

# Errors the kernel raises before it changes anything: a call rejected with one of these must
# leave data and layout exactly as they were.
CHANGES_NOTHING = {errno.EINVAL, errno.EBADF, errno.EOVERFLOW, errno.EPERM, errno.EACCES,
                   errno.EEXIST, errno.ESRCH, errno.ERANGE, errno.ENODEV}


class Seq:
    def invalidate(self, mni, rng, cur_seq):
        mmu_interval_set_seq(mni, cur_seq)
        return True


class World:
    """The machine one example fuzzes, and what it must keep."""

    def __init__(self):
        self.system = hmmgpu.System(backend="numpy", ram_bytes=RAM_PAGES * P)
        s = self.system
        self.free0 = s.phys.nr_free()
        self.devs = [dmirror.DMirrorDevice(s, memory="private", chunk_pages=32, max_chunks=2),
                     dmirror.DMirrorDevice(s, memory="coherent", chunk_pages=32, max_chunks=2)]
        self.dir = tempfile.mkdtemp(prefix="hmmgpu-fuzz-")
        path = os.path.join(self.dir, "file")
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * (4 * P // 256))
        self.fd = os.open(path, os.O_RDWR)
        A = s.spawn()
        a = A.mmap(8 * P, RW, ANON)
        A.write(a, np.random.default_rng(1).integers(1, 256, 8 * P, dtype=np.uint8))
        self.file = A.mmap(4 * P, RW, MAP_SHARED, self.fd)
        mA = [d.open(A) for d in self.devs]
        mA[0].migrate_to_dev(a + 2 * P, 2)
        mA[1].migrate_to_dev(a + 4 * P, 2)
        mA[0].exclusive(a + 6 * P, 1)
        B = A.fork()
        C = s.spawn()
        c = C.mmap(4 * P, RW, ANON)
        C.write(c, np.random.default_rng(2).integers(1, 256, 4 * P, dtype=np.uint8))
        self.scratch = A.mmap(16 * P, RW, ANON)
        self.procs = [A, B, C]
        self.mirrors = mA + [d.open(B) for d in self.devs] + [d.open(C) for d in self.devs]
        self.canaries = [(A, a, 8), (B, a, 8), (C, c, 4)]
        self.pins = []
        self.dead = s.spawn()
        self.dead.exit()
        self.notifiers = {}
        for p in self.procs:
            mni = MmuIntervalNotifier()
            assert mmu_interval_notifier_insert(mni, p.mm, 0, 1 << 47, Seq()) == 0
            self.notifiers[p.pid] = mni
        # addresses inside mappings (what a sane call names) and at their edges or in holes
        self.mapped = sorted({x for p, a0, n in self.canaries for x in (a0, a0 + P, a0 + (n - 2) * P)}
                             | {self.file, self.scratch, self.scratch + 8 * P})
        self.addrs = self.mapped + sorted({a0 + n * P for p, a0, n in self.canaries}
                                          | {0x10000000, MMAP_MIN_ADDR - P, MMAP_MIN_ADDR, TASK_SIZE - P})
        self.resnap()

    # -- what must not change -------------------------------------------------------------------
    def peek(self, proc, addr, npages):
        """What the pages hold (wherever they live), privileged: no fault, no permission check."""
        phys = self.system.phys
        out = np.zeros((npages, P), np.uint8)
        mapped = np.zeros(npages, bool)
        for k in range(npages):
            v = proc.mm.find_vma(addr + k * P)
            if v is None:
                continue
            mapped[k] = True
            e = int(v.pte[v.idx(addr + k * P)])
            if e:
                out[k] = phys.read(np.array([e >> 12]))[0]
        return mapped, out

    def layout(self):
        return {p.pid: [(v.start, v.end, v.vm_flags) for v in p.mm.vmas] for p in self.procs if p.alive}

    def resnap(self):
        self.snap = [(p.alive, self.peek(p, a, n)) if p.alive else (False, None) for p, a, n in self.canaries]
        self.shape = self.layout()

    def unchanged(self, what, layout=True):
        for (p, a, n), (alive, before) in zip(self.canaries, self.snap):
            if not alive or not p.alive:
                continue
            mapped, data = self.peek(p, a, n)
            ok = np.array_equal(mapped, before[0]) and np.array_equal(data, before[1])
            if not ok:
                STATS["corruptions"] += 1
                raise AssertionError(f"{what} changed pid {p.pid}'s pages at 0x{a:x} "
                                     f"(mapped {before[0].tolist()} -> {mapped.tolist()})")
        if layout and self.layout() != self.shape:
            STATS["corruptions"] += 1
            raise AssertionError(f"{what} was rejected but changed the layout")

    # -- one call ---------------------------------------------------------------------------------
    def run(self, op, name, thunk, mode):
        """mode: "pure" (never changes data), "write", "destructive", "prot" (see the docstring)."""
        STATS["calls"] += 1
        label = f"call #{STATS['calls']}: {name}"
        err = None
        try:
            ret = thunk()
            if isinstance(ret, int) and not isinstance(ret, bool) and ret < 0:
                err = -ret
        except OSError as ex:
            err = ex.errno
            assert isinstance(err, int) and err > 0, f"{label}: OSError without an errno: {ex!r}"
            if isinstance(ex, hmmgpu.ProcessKilled) and "OOM" in str(ex):
                STATS["oom_kills"] += 1
        except BaseException as ex:  # noqa: BLE001 -- every other exception is the finding
            STATS["unclean"] += 1
            raise AssertionError(f"{label} raised {type(ex).__name__} (not OSError):\n"
                                 + "".join(traceback.format_exception(type(ex), ex, ex.__traceback__)[-6:]))
        tally = STATS["by_call"].setdefault(op, [0, 0])
        tally[err is not None] += 1
        if err is None:
            STATS["returned"] += 1
        else:
            STATS["clean_errors"] += 1
            STATS["by_errno"][errno.errorcode.get(err, str(err))] = (
                STATS["by_errno"].get(errno.errorcode.get(err, str(err)), 0) + 1)
        if self.system.oom_kills and any(not p.alive for p in self.procs):
            self.resnap()                       # the OOM killer took a canary's process: fair
        elif mode == "pure":
            self.unchanged(label, layout=False)
        elif err is not None and (err in CHANGES_NOTHING or mode == "destructive" and err != errno.ENOMEM):
            self.unchanged(label, layout=mode != "prot" or err in CHANGES_NOTHING)
        self.resnap()
        check_system(self.system, pins=self.pins, devices=self.devs)

    def finish(self):
        for pin in self.pins:
            if pin.active:
                pin.unpin()
        for m in self.mirrors:
            m.close()
        for p in list(self.system.processes):
            if p.alive:
                p.exit()
        for mni in self.notifiers.values():
            mmu_interval_notifier_remove(mni)
        self.system.drop_caches()
        os.close(self.fd)
        shutil.rmtree(self.dir, ignore_errors=True)
        phys = self.system.phys
        used = np.nonzero(phys.pages.refcount[1:phys.nr_ram])[0] + 1
        assert phys.nr_free() == self.free0, (
            f"{self.free0 - phys.nr_free()} RAM frames leaked: pfn {used[:6].tolist()} refcount "
            f"{phys.pages.refcount[used[:6]].tolist()} mapcount {phys.pages.mapcount[used[:6]].tolist()} "
            f"flags {[hex(int(f)) for f in phys.pages.flags[used[:6]]]} "
            f"mapping {phys.pages.mapping[used[:6]].tolist()} "
            f"caches {list(self.system.caches.values())}")
        assert not phys.pages.refcount[1:].any(), "a page still referenced after every exit"
        assert not (phys.pages.flags[1:] & 1).any(), "a page left locked"
        assert all(d.nr_allocated() == 0 for d in self.devs), "device pages leaked"
        for cg in self.system.memcgs:
            assert cg.pages == 0, f"{cg!r} still charged"


# -- argument strategies --------------------------------------------------------------------------

def _mostly(plausible, *others):
    """``plausible`` seven times in ten, else one of ``others``: calls must get past the
    argument checks often enough to reach the code behind them."""
    return st.integers(0, 9).flatmap(
        lambda k: plausible if k < 7 else others[(k - 7) % len(others)])


def ival(world, plausible, sane=None):
    """An integer argument: in a sane call one of ``sane`` (default ``plausible``); in a hostile
    call mostly ``plausible``, else a hostile value or any integer."""
    if world.sane:
        return st.sampled_from(sane if sane is not None else plausible)
    return _mostly(st.sampled_from(plausible), st.sampled_from(HOSTILE), st.integers(-(1 << 65), 1 << 65))


def pick(world, sane, hostile):
    """A non-integer argument: one of ``sane``, or in a hostile call one of either."""
    return st.sampled_from(sane if world.sane else sane + hostile)


def addr(world, data, unaligned=True):
    if world.sane:
        return data.draw(st.sampled_from(world.mapped))
    a = data.draw(_mostly(st.sampled_from(world.addrs), st.sampled_from(HOSTILE),
                          st.integers(0, 1 << 48).map(lambda x: x & ~(P - 1))))
    if unaligned and isinstance(a, int) and data.draw(st.integers(0, 4)) == 0:
        a += 1
    return a


def proc_of(world, data, dead=False):
    pool = world.procs + ([world.dead, None, "pid"] if dead else [])
    return data.draw(st.sampled_from(pool))


def payload(world, data, proc, a):
    """What a store writes: most often the current bytes of the target (so even a store that
    lands changes nothing), sometimes fresh bytes, sometimes something that is no buffer."""
    k = data.draw(st.integers(0, 9))
    n = data.draw(st.sampled_from([P, 2 * P] if world.sane else [1, P - 1, P, 2 * P, 3 * P]))
    if k <= 5 and isinstance(a, int) and 0 <= a and a + n <= TASK_SIZE and proc is not None \
            and hasattr(proc, "mm"):
        npg = -(-((a % P) + n) // P)
        mapped, cur = world.peek(proc, a & ~(P - 1), npg)
        return cur.reshape(-1)[a % P:a % P + n].copy()
    if k <= 7:
        return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    return data.draw(st.sampled_from([None, [1, 2, 3], "text", np.array([object()]), 3.5,
                                      np.zeros((2, 3), np.float64)]))


# -- the calls ----------------------------------------------------------------------------------

def op_mmap(w, d):
    p = proc_of(w, d)
    args = (d.draw(ival(w, LENGTHS, SANE_LENGTHS)), d.draw(ival(w, PROTS, SANE_PROTS)),
            d.draw(ival(w, MMAP_FLAGS, MMAP_FLAGS[:5])),
            d.draw(pick(w, [None, w.fd, w.mirrors[0]], [-1, 10 ** 6, "fd"])),
            d.draw(ival(w, [0, P, 4 * P, 1 << 60], [0, P])), addr(w, d))
    return f"pid {p.pid}.mmap{args!r:.200}", lambda: p.mmap(*args), "destructive"


def op_munmap(w, d):
    p = proc_of(w, d)
    args = (addr(w, d), d.draw(ival(w, LENGTHS, SANE_LENGTHS)))
    return f"pid {p.pid}.munmap{args!r}", lambda: p.munmap(*args), "destructive"


def op_mprotect(w, d):
    p = proc_of(w, d)
    args = (addr(w, d), d.draw(ival(w, LENGTHS, SANE_LENGTHS)), d.draw(ival(w, PROTS, SANE_PROTS)))
    return f"pid {p.pid}.mprotect{args!r}", lambda: p.mprotect(*args), "prot"


def op_madvise(w, d):
    p = proc_of(w, d)
    args = (addr(w, d), d.draw(ival(w, LENGTHS, SANE_LENGTHS)), d.draw(ival(w, ADVICE, ADVICE[:4])))
    return f"pid {p.pid}.madvise{args!r}", lambda: p.madvise(*args), "destructive"


def op_mremap(w, d):
    p = proc_of(w, d)
    size = d.draw(ival(w, LENGTHS, SANE_LENGTHS))
    args = (addr(w, d), size, d.draw(ival(w, LENGTHS, [size, P, 4 * P])),
            d.draw(ival(w, MREMAP_FLAGS, MREMAP_FLAGS[:5])), addr(w, d))
    return f"pid {p.pid}.mremap{args!r}", lambda: p.mremap(*args), "destructive"


def op_msync(w, d):
    p = proc_of(w, d)
    args = (addr(w, d), d.draw(ival(w, LENGTHS, SANE_LENGTHS)),
            d.draw(ival(w, [MS_SYNC, MS_ASYNC, MS_SYNC | MS_ASYNC, 8], [MS_SYNC, MS_ASYNC])))
    return f"pid {p.pid}.msync{args!r}", lambda: p.msync(*args), "pure"


def op_read(w, d):
    p = proc_of(w, d)
    args = (addr(w, d), d.draw(ival(w, [1, P, 3 * P + 5, 1 << 20, 1 << 40], [1, P, 3 * P + 5])))
    return f"pid {p.pid}.read{args!r}", lambda: p.read(*args), "pure"


def op_write(w, d):
    p = proc_of(w, d)
    a = addr(w, d)
    data = payload(w, d, p, a)
    return f"pid {p.pid}.write({a!r}, <{type(data).__name__}>)", lambda: p.write(a, data), "write"


def op_pin(w, d):
    p = proc_of(w, d)
    args = (addr(w, d), d.draw(ival(w, [0, 1, 2, 8, 1 << 30], [1, 2, 8])), d.draw(st.booleans()),
            d.draw(st.booleans()))

    def call():
        pin = p.pin_user_pages(*args)
        w.pins.append(pin)
        if d.draw(st.booleans()):
            pin.unpin()
            pin.unpin()                          # twice: EINVAL the second time
    return f"pid {p.pid}.pin_user_pages{args!r}", call, "pure"


def op_unpin(w, d):
    live = [p for p in w.pins if p.active]
    if not live:
        return "no pin", lambda: None, "pure"
    pin = d.draw(st.sampled_from(live))
    return "unpin", pin.unpin, "pure"


def op_populate(w, d):
    p = proc_of(w, d)
    args = (addr(w, d), d.draw(ival(w, LENGTHS, SANE_LENGTHS)), d.draw(st.booleans()))
    return f"pid {p.pid}.populate{args!r}", lambda: p.populate(*args), "pure"


def op_fork_exit(w, d):
    p = d.draw(st.sampled_from(w.procs + [w.dead]))

    status = d.draw(ival(w, [0, 1]))

    def call():
        c = p.fork()
        try:
            c.read(w.scratch, P)
        finally:
            c.exit(status)
    return f"fork+exit of {p!r:.40}", call, "pure"


def _mirror(w, d):
    return d.draw(st.sampled_from(w.mirrors))


def op_dmirror(w, d):
    m = _mirror(w, d)
    which = d.draw(st.sampled_from(["read", "migrate_to_dev", "migrate_to_sys", "snapshot", "exclusive",
                                    "check_exclusive"]))
    args = (addr(w, d), d.draw(ival(w, NPAGES, [1, 2, 3, 8])))
    fn = getattr(m, which)
    return f"{m!r}.{which}{args!r}", lambda: fn(*args), "pure"


def op_dmirror_write(w, d):
    m = _mirror(w, d)
    a = addr(w, d)
    data = payload(w, d, m.proc, a)
    return f"{m!r}.write({a!r}, <{type(data).__name__}>)", lambda: m.write(a, data), "write"


def op_dmirror_misc(w, d):
    m = _mirror(w, d)
    which = d.draw(st.integers(0, 3))
    if which == 0:
        return f"{m!r}.release()", m.release, "pure"
    if which == 1:
        f = d.draw(ival(w, [0, dmirror.FLAG_FAIL_ALLOC]))
        return f"{m!r}.set_flags({f!r})", lambda: m.set_flags(f), "pure"
    if which == 2:
        p = proc_of(w, d, dead=True)
        dev = d.draw(st.sampled_from(w.devs))

        def call():
            extra = dev.open(p)
            try:
                extra.read(w.scratch, 1)
            finally:
                extra.close()
                extra.close()
            extra.read(w.scratch, 1)           # closed: EBADF
        return f"open/close of {p!r:.40}", call, "pure"
    kw = d.draw(st.sampled_from([dict(memory="gpu"), dict(chunk_pages=-1), dict(max_chunks=1 << 40),
                                 dict(chunk_pages=1.5), dict(memory=None)]))
    return f"DMirrorDevice({kw})", lambda: dmirror.DMirrorDevice(w.system, **kw), "pure"


def op_hmm_range_fault(w, d):
    p = proc_of(w, d)
    mni = w.notifiers[p.pid]
    start = addr(w, d)
    sane_end = isinstance(start, int) and (w.sane or d.draw(st.booleans()))
    end = start + 4 * P if sane_end else d.draw(ival(w, [0, P]))
    pfns = d.draw(pick(w, ["ok", "none"], ["list", "short", "int64"]))
    flags = d.draw(ival(w, [0, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE]))
    mask = d.draw(ival(w, [0, HMM_PFN_REQ_FAULT], [0]))

    def call():
        n = 4
        arr = {"ok": np.zeros(n, np.uint64), "none": None, "list": [0] * n, "short": np.zeros(1, np.uint64),
               "int64": np.zeros(n, np.int64)}[pfns]
        r = HmmRange(notifier=mni, start=start, end=end, hmm_pfns=arr, default_flags=flags, pfn_flags_mask=mask)
        r.notifier_seq = mmu_interval_read_begin(mni)
        with p.mm.mmap_lock.read():
            return hmm_range_fault(r)
    return f"hmm_range_fault(pid {p.pid}, {start!r}, {end!r}, {pfns}, {flags!r}, {mask!r})", call, "pure"


def op_migrate_vma(w, d):
    p = proc_of(w, d)
    start = addr(w, d)
    own = p.mm.find_vma(start) if isinstance(start, int) and 0 <= start < 1 << 64 else None
    vma = own if w.sane else d.draw(st.sampled_from(list(p.mm.vmas) + [own, None, "vma"]))
    end = start + 2 * P if isinstance(start, int) and (w.sane or d.draw(st.booleans())) else d.draw(ival(w, [0]))
    flags = d.draw(ival(w, [MIGRATE_VMA_SELECT_SYSTEM, MIGRATE_VMA_SELECT_DEVICE_PRIVATE, 7]))
    fault_page = d.draw(pick(w, [None], [1, -1, 1 << 40, 1.5]))
    owner = d.draw(st.sampled_from([None] + w.devs))

    def call():
        args = MigrateVma(vma, start, end, pgmap_owner=owner, flags=flags, fault_page=fault_page)
        with p.mm.mmap_lock.read():
            ret = migrate_vma_setup(args)
            if ret == 0:                   # a driver that copies nothing: every page stays
                migrate_vma_pages(args)
                migrate_vma_finalize(args)
        return ret
    return f"migrate_vma(pid {p.pid}, {vma!r:.40}, {start!r}, {end!r}, {flags!r}, {fault_page!r})", call, "pure"


def op_migrate_device_range(w, d):
    dev = d.draw(st.sampled_from(w.devs))
    first = dev.chunks[0].pgmap.pfn_first if dev.chunks else 0
    start = d.draw(ival(w, [first, first + 3, 0, 1, w.system.phys.pages.n - 2], [first, first + 3, 1]))
    npages = d.draw(ival(w, [1, 4, 32]))
    src_kind = d.draw(pick(w, ["ok"], ["list", "short"]))

    def call():
        src = {"ok": np.zeros(64, np.uint64), "list": [0] * 64, "short": np.zeros(1, np.uint64)}[src_kind]
        ret = migrate_device_range(w.system, src, start, npages)
        if ret == 0:                      # nothing copied: every page stays where it was
            dst = np.zeros(len(src), np.uint64)
            assert migrate_device_pages(w.system, src, dst, npages) in (0, None)
            assert migrate_device_finalize(w.system, src, dst, npages) in (0, None)
        return ret
    return f"migrate_device_range({start!r}, {npages!r}, {src_kind})", call, "pure"


def op_make_device_exclusive(w, d):
    p = proc_of(w, d)
    start = addr(w, d)
    end = start + 2 * P if isinstance(start, int) and (w.sane or d.draw(st.booleans())) else d.draw(ival(w, [0]))
    mm = d.draw(pick(w, [p.mm], [None]))

    def call():
        with p.mm.mmap_lock.read():
            r = make_device_exclusive_range(mm, start, end, None)
        if isinstance(r, np.ndarray):      # the caller unlocks and drops what it got
            got = r[r >= 0]
            w.system.phys.unlock(got)
            w.system.phys.put(got)
            return 0
        return r
    return f"make_device_exclusive_range({start!r}, {end!r})", call, "pure"


def op_notifier_and_memremap(w, d):
    p = proc_of(w, d)
    if d.draw(st.booleans()):
        args = (d.draw(ival(w, [0, P])), d.draw(ival(w, [P, 1 << 47, 0], [P, 1 << 47])))
        ops = d.draw(pick(w, [Seq()], [None, object()]))

        def call():
            mni = MmuIntervalNotifier()
            ret = mmu_interval_notifier_insert(mni, d.draw(pick(w, [p.mm], [None])), *args, ops)
            if ret == 0:
                mmu_interval_notifier_remove(mni)
            return ret
        return f"mmu_interval_notifier_insert{args!r}", call, "pure"
    nr = d.draw(st.sampled_from([0, -1, 1.5, None, 1 << 40, 1 << 34, 16]))
    kind = d.draw(st.sampled_from([MEMORY_DEVICE_PRIVATE, MEMORY_DEVICE_COHERENT, 9]))
    owner = d.draw(st.sampled_from([None, w]))

    def call():
        pgmap = DevPagemap(kind, w.devs[0].ops, owner, nr)
        memremap_pages(pgmap, w.system)
        memunmap_pages(pgmap)
    return f"memremap_pages({kind}, {nr!r}, owner={owner is not None})", call, "pure"


class _Legacy:
    """A 2017 driver that mirrors and migrates nothing: ops that accept every call."""

    def sync_cpu_device_pagetables(self, mirror, update):
        pass

    def alloc_and_copy(self, vma, src, dst, start, end, private):
        pass

    def finalize_and_map(self, vma, src, dst, start, end, private):
        pass


def op_legacy(w, d):
    from hmmgpu.hmm import legacy
    p = proc_of(w, d)
    start = addr(w, d)
    sane_end = isinstance(start, int) and (w.sane or d.draw(st.booleans()))
    end = start + 2 * P if sane_end else d.draw(ival(w, [0, P]))
    own = p.mm.find_vma(start) if isinstance(start, int) and 0 <= start < 1 << 64 else None
    vma = own if w.sane else d.draw(st.sampled_from([own, None, "vma"] + list(p.mm.vmas)))
    arr = d.draw(pick(w, ["ok"], ["list", "short", "int64"]))
    which = d.draw(st.integers(0, 2))

    def call():
        pfns = {"ok": np.zeros(2, np.uint64), "list": [0, 0], "short": np.zeros(1, np.uint64),
                "int64": np.zeros(2, np.int64)}[arr]
        mirror = legacy.HmmMirror(_Legacy())
        assert legacy.hmm_mirror_register(mirror, p.mm) == 0
        try:
            with p.mm.mmap_lock.read():
                if which == 0:
                    return legacy.hmm_vma_get_pfns(vma, legacy.LegacyRange(), start, end, pfns)
                if which == 1:
                    return legacy.hmm_vma_fault(vma, legacy.LegacyRange(), start, end, pfns, True)
                return legacy.migrate_vma(_Legacy(), vma, start, end, pfns, np.zeros(2, np.uint64))
        finally:
            legacy.hmm_mirror_unregister(mirror)
    return f"legacy #{which}({vma!r:.40}, {start!r}, {end!r}, {arr})", call, "pure"


OPS = [op_mmap, op_munmap, op_mprotect, op_madvise, op_mremap, op_msync, op_read, op_write, op_pin,
       op_unpin, op_populate, op_fork_exit, op_dmirror, op_dmirror, op_dmirror_write, op_dmirror_misc,
       op_hmm_range_fault, op_migrate_vma, op_migrate_device_range, op_make_device_exclusive,
       op_notifier_and_memremap, op_legacy]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
@given(st.data())
def test_every_entry_point_under_hostile_arguments(data):
    w = World()
    STATS["examples"] += 1
    # Which calls, and whether sane or hostile, from a generator seeded by a drawn number
    # (a sampled_from per call would favour the first few calls); hypothesis draws the arguments.
    rng = np.random.default_rng(data.draw(st.integers(0, (1 << 32) - 1)))
    try:
        for _ in range(CALLS):
            op = OPS[int(rng.integers(len(OPS)))]
            w.sane = bool(rng.integers(10) < 5)
            name, thunk, mode = op(w, data)
            try:
                w.run(op.__name__[3:], name, thunk, mode)
            except AssertionError as ex:
                if not KEEP_GOING:
                    raise
                if "(not OSError)" not in str(ex) and "changed" not in str(ex):
                    STATS["corruptions"] += 1          # the invariant checker's finding
                STATS.setdefault("findings", []).append(str(ex).splitlines()[0][:200])
                w.resnap()
            if not any(p.alive for p in w.procs):
                break
        try:
            w.finish()
        except AssertionError as ex:
            if not KEEP_GOING:
                raise
            STATS["corruptions"] += 1
            STATS.setdefault("findings", []).append("at the end: " + str(ex).splitlines()[0][:200])
    finally:
        report = os.environ.get("HMMGPU_FUZZ_REPORT")
        if report:
            with open(report, "w") as f:
                json.dump(STATS, f, indent=1)
    if not KEEP_GOING:
        assert STATS["unclean"] == 0 and STATS["corruptions"] == 0, STATS.get("findings", [])[:5]


def test_fuzz_found_nothing():
    """What the fuzzer counted over all its examples (it stops at the first finding unless
    HMMGPU_FUZZ_KEEP_GOING is set): no unclean exception, no corruption."""
    print(f"\nfuzz: {STATS['calls']} calls in {STATS['examples']} examples, {STATS['returned']} returned, "
          f"{STATS['clean_errors']} clean errors {STATS['by_errno']}, {STATS['unclean']} unclean, "
          f"{STATS['corruptions']} corruptions, {STATS['oom_kills']} OOM kills")
    assert STATS["unclean"] == 0 and STATS["corruptions"] == 0, STATS.get("findings", [])[:10]
