"""A hypothesis state machine mixing CPU writes, device writes, migrations both ways,
atomics, fork, munmap/mmap, mprotect and device eviction, against a flat model.

After every step it checks what HMM promises:

* data: every readable page reads (by CPU and by device) what the model says;
* the whole machine, with the checker every test shares (tests/invariants.py):
  struct page against every page table (nothing leaks, nothing is freed while
  mapped), rss, memcg, free frames, device frames, and every mirror's device
  page table against the CPU's (same pfn, writable only where the CPU entry is);

and at the end, with every process gone, that every device page is back on
its device's free list and every RAM page back in the allocator.
Deterministic (derandomized); sizes small enough for a 2-core CI box.

The THP variants map a 2 MiB MADV_HUGEPAGE region instead, on a device with
2 MiB folios: whole-region writes, reads, migrations both ways (THP <-> device
folio, or a split when the 2 MiB allocation is made to fail) and MADV_COLLAPSE
mix with the small-range rules, which split what they cut into; one more
invariant checks that every PMD mapping is one whole, aligned folio.
"""
import errno

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import hmmgpu
from hmmgpu import (MADV_COLLAPSE, MADV_HUGEPAGE, MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, PAGE_SIZE,
                    PMD_SIZE, PROT_NONE, PROT_READ, PROT_WRITE)
from hmmgpu.drivers import dmirror
from hmmgpu.mm import pgtable as pt
from hmmgpu.mm.physmem import PG_HEAD
from invariants import check_system

N = 12                      # pages in the region every process maps at the same address
NR = PMD_SIZE // PAGE_SIZE
HUGE = np.uint64(1 << 5)
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
MAX_PROCS = 3
U = np.uint64


def readable(prot):
    return (prot >= 0) & ((prot & PROT_READ) != 0)


class Proc:
    def __init__(self, proc, mirror, data, prot):
        self.proc, self.mirror, self.data, self.prot = proc, mirror, data, prot


ranges = st.tuples(st.integers(0, N - 1), st.integers(1, 4)).map(lambda t: (t[0], min(t[1], N - t[0])))


class HmmMachine(RuleBasedStateMachine):
    memory = "private"
    N = N
    chunk_pages = 16

    @initialize()
    def setup(self):
        self.system = hmmgpu.System(backend="numpy", ram_bytes=16 << 20)
        self.baseline_free = self.system.phys.nr_free()
        self.dev = dmirror.DMirrorDevice(self.system, memory=self.memory, chunk_pages=self.chunk_pages)
        p = self.system.spawn()
        self.base = self._map_region(p)
        self.procs = [Proc(p, self.dev.open(p), np.zeros((self.N, PAGE_SIZE), np.uint8), np.full(self.N, RW))]
        self.counter = 0

    def _map_region(self, p):
        return p.mmap(self.N * PAGE_SIZE, RW, ANON)

    def teardown(self):
        if not hasattr(self, "system"):
            return
        for pr in self.procs:
            pr.mirror.close()
            pr.proc.exit()
        assert self.dev.nr_allocated() == 0
        assert self.dev.nr_free() == len(self.dev.chunks) * self.dev.chunk_pages
        phys = self.system.phys
        kept = NR if phys.huge_zero_pfn >= 0 else 0           # the huge zero folio stays
        assert phys.nr_free() == self.baseline_free - kept
        pg = phys.pages
        rc = pg.refcount.copy()
        rc[phys.zero_mask(np.arange(pg.n, dtype=np.int64))] = 0
        assert (rc == 0).all() and (pg.mapcount == 0).all()

    # -- helpers -----------------------------------------------------------------------------------
    def _pick(self, i):
        return self.procs[i % len(self.procs)]

    def _fill(self, npages):
        self.counter += 1
        rng = np.random.default_rng(self.counter)
        return rng.integers(0, 256, size=(npages, PAGE_SIZE), dtype=np.uint8)

    def _addr(self, page):
        return self.base + page * PAGE_SIZE

    # -- CPU ---------------------------------------------------------------------------------------
    @rule(i=st.integers(0, 9), r=ranges)
    def cpu_write(self, i, r):
        pr = self._pick(i)
        s, n = r
        if not (pr.prot[s:s + n] == RW).all():
            return
        d = self._fill(n)
        pr.proc.write(self._addr(s), d)
        pr.data[s:s + n] = d

    @rule(i=st.integers(0, 9), r=ranges)
    def cpu_read(self, i, r):
        pr = self._pick(i)
        s, n = r
        if not readable(pr.prot[s:s + n]).all():
            return
        got = pr.proc.read(self._addr(s), n * PAGE_SIZE).reshape(n, PAGE_SIZE)
        assert (got == pr.data[s:s + n]).all()

    # -- device ------------------------------------------------------------------------------------
    @rule(i=st.integers(0, 9), r=ranges)
    def dev_write(self, i, r):
        pr = self._pick(i)
        s, n = r
        d = self._fill(n)
        if (pr.prot[s:s + n] == RW).all():
            try:
                res = pr.mirror.write(self._addr(s), d)
            except OSError as e:
                # hmm_range_fault reports the owner's device-private pages as they are and never
                # faults them: one that fork left read-only (COW) cannot be written by the device,
                # -EFAULT as in Linux; pages before it may have been written
                v = pr.proc.mm.find_vma(self._addr(s))
                ent = np.asarray(pr.proc.pages(self._addr(s), n), U)
                assert e.errno == errno.EFAULT and (pt.swp_type(ent) == pt.SWP_DEVICE_PRIVATE_READ).any(), e
                assert v is not None
                got = pr.proc.read(self._addr(s), n * PAGE_SIZE).reshape(n, PAGE_SIZE)
                assert ((got == d).all(axis=1) | (got == pr.data[s:s + n]).all(axis=1)).all()
                pr.data[s:s + n] = got
                return
            assert res.cpages == n
            pr.data[s:s + n] = d
        elif pr.prot[s] == PROT_READ:
            try:
                pr.mirror.write(self._addr(s), d)
            except OSError as e:
                assert e.errno == errno.EPERM
            else:
                raise AssertionError("device write to a read-only page succeeded")

    @rule(i=st.integers(0, 9), r=ranges)
    def dev_read(self, i, r):
        pr = self._pick(i)
        s, n = r
        if readable(pr.prot[s:s + n]).all():
            res = pr.mirror.read(self._addr(s), n)
            assert res.cpages == n
            assert (res.data.reshape(n, PAGE_SIZE) == pr.data[s:s + n]).all()
        elif not readable(pr.prot[s:s + 1])[0]:
            try:
                pr.mirror.read(self._addr(s), n)
            except OSError as e:
                assert e.errno == errno.EFAULT
            else:
                raise AssertionError("device read of an unreadable page succeeded")

    @rule(i=st.integers(0, 9), r=ranges)
    def migrate_to_dev(self, i, r):
        pr = self._pick(i)
        s, n = r
        try:
            res = pr.mirror.migrate_to_dev(self._addr(s), n)
        except OSError as e:
            ok = readable(pr.prot[s:s + n]).all()
            # EINVAL at a hole or an unreadable page; ENOENT when a page stays behind
            # (already device memory whose mirror entry a fork or mprotect invalidated)
            assert e.errno == (errno.ENOENT if ok else errno.EINVAL), e
        else:
            assert readable(pr.prot[s:s + n]).all()
            assert res.cpages == n
            assert (res.data.reshape(n, PAGE_SIZE) == pr.data[s:s + n]).all()

    @rule(i=st.integers(0, 9), r=ranges)
    def migrate_to_sys(self, i, r):
        pr = self._pick(i)
        s, n = r
        try:
            pr.mirror.migrate_to_sys(self._addr(s), n)
        except OSError as e:
            assert e.errno == errno.EINVAL and not readable(pr.prot[s:s + n]).all()

    @rule(i=st.integers(0, 9), r=ranges)
    def exclusive(self, i, r):
        pr = self._pick(i)
        s, n = r
        if not (pr.prot[s:s + n] == RW).all():
            return
        res = pr.mirror.exclusive(self._addr(s), n)
        assert (res.data.reshape(n, PAGE_SIZE) == pr.data[s:s + n]).all()

    @rule(i=st.integers(0, 9))
    def release(self, i):
        self._pick(i).mirror.release()

    # -- address space -----------------------------------------------------------------------------
    @rule(i=st.integers(0, 9), r=ranges, prot=st.sampled_from([PROT_NONE, PROT_READ, RW]))
    def mprotect(self, i, r, prot):
        pr = self._pick(i)
        s, n = r
        if (pr.prot[s:s + n] < 0).any():
            return
        pr.proc.mprotect(self._addr(s), n * PAGE_SIZE, prot)
        pr.prot[s:s + n] = prot

    @rule(i=st.integers(0, 9), r=ranges)
    def munmap(self, i, r):
        pr = self._pick(i)
        s, n = r
        pr.proc.munmap(self._addr(s), n * PAGE_SIZE)
        pr.prot[s:s + n] = -1

    @rule(i=st.integers(0, 9), r=ranges)
    def remap(self, i, r):
        pr = self._pick(i)
        s, n = r
        pr.proc.mmap(n * PAGE_SIZE, RW, ANON | MAP_FIXED, addr=self._addr(s))
        pr.prot[s:s + n] = RW
        pr.data[s:s + n] = 0

    @precondition(lambda self: len(self.procs) < MAX_PROCS)
    @rule(i=st.integers(0, 9))
    def fork(self, i):
        pr = self._pick(i)
        c = pr.proc.fork()
        self.procs.append(Proc(c, self.dev.open(c), pr.data.copy(), pr.prot.copy()))

    @precondition(lambda self: len(self.procs) > 1)
    @rule(i=st.integers(0, 9), close_first=st.booleans())
    def exit(self, i, close_first):
        pr = self.procs.pop(1 + i % (len(self.procs) - 1))
        if close_first:
            pr.mirror.close()
            pr.proc.exit()
        else:
            pr.proc.exit()
            pr.mirror.close()

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def whole_machine_is_consistent(self):
        """struct page against every page table, rss, memcg, free frames, device frames, and
        every mirror's device page table against its CPU page table (tests/invariants.py)."""
        if not hasattr(self, "system"):
            return
        check_system(self.system, pins=(), devices=[self.dev])

    @invariant()
    def mirrors_map_only_what_the_model_maps(self):
        if not hasattr(self, "system"):
            return
        for pr in self.procs:
            vpn0 = self.base >> 12
            ent = pr.mirror.pt.lookup(np.arange(vpn0, vpn0 + self.N))
            assert (pr.prot[(ent & U(dmirror.DPT_VALID)) != 0] >= 0).all()


class HmmCoherentMachine(HmmMachine):
    memory = "coherent"


_settings = settings(max_examples=60, stateful_step_count=40, deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))

TestHmmPrivate = HmmMachine.TestCase
TestHmmPrivate.settings = _settings
TestHmmCoherent = HmmCoherentMachine.TestCase
TestHmmCoherent.settings = _settings


class HmmThpMachine(HmmMachine):
    """One 2 MiB MADV_HUGEPAGE region, a device with 2 MiB folios, and whole-region rules."""

    N = NR
    chunk_pages = 4 * NR

    def _map_region(self, p):
        a = p.mmap(2 * PMD_SIZE, RW, ANON)
        base = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
        if base > a:
            p.munmap(a, base - a)
        p.munmap(base + PMD_SIZE, a + 2 * PMD_SIZE - base - PMD_SIZE)
        p.madvise(base, PMD_SIZE, MADV_HUGEPAGE)
        return base

    @rule(i=st.integers(0, 9), write=st.booleans())
    def reset_region(self, i, write):
        """Map the region afresh (MAP_FIXED, MADV_HUGEPAGE), then fill it with a write (a THP)."""
        pr = self._pick(i)
        pr.proc.mmap(PMD_SIZE, RW, ANON | MAP_FIXED, addr=self.base)
        pr.proc.madvise(self.base, PMD_SIZE, MADV_HUGEPAGE)
        pr.prot[:] = RW
        pr.data[:] = 0
        if write:
            d = self._fill(NR)
            pr.proc.write(self.base, d)
            pr.data[:] = d
            assert (np.asarray(pr.proc.pages(self.base, NR), U) & HUGE).all()

    @rule(i=st.integers(0, 9))
    def cpu_read_all(self, i):
        pr = self._pick(i)
        if readable(pr.prot).all():
            got = pr.proc.read(self.base, PMD_SIZE).reshape(NR, PAGE_SIZE)
            assert (got == pr.data).all()

    @rule(i=st.integers(0, 9), fail=st.booleans())
    def migrate_all_to_dev(self, i, fail):
        pr = self._pick(i)
        if fail:
            pr.mirror.set_flags(dmirror.FLAG_FAIL_ALLOC)
        whole = (np.asarray(pr.proc.pages(self.base, NR), U) & HUGE).all()
        try:
            res = pr.mirror.migrate_to_dev(self.base, NR)
        except OSError as e:
            # EINVAL at a hole or an unreadable page; ENOENT when a page stays behind
            assert e.errno == (errno.ENOENT if readable(pr.prot).all() else errno.EINVAL), e
        else:
            assert (res.data.reshape(NR, PAGE_SIZE) == pr.data).all()
            if whole and self.memory == "private":
                # a THP went to one device folio, by a device-private PMD -- or, with the 2 MiB
                # allocation failed, to small pages
                e = np.asarray(pr.proc.pages(self.base, NR), U)
                assert (e & HUGE).all() != fail and pt.is_device_private(e).all()

    @rule(i=st.integers(0, 9), fail=st.booleans())
    def migrate_all_to_sys(self, i, fail):
        pr = self._pick(i)
        if fail:
            pr.mirror.set_flags(dmirror.FLAG_FAIL_ALLOC)
        try:
            pr.mirror.migrate_to_sys(self.base, NR)
        except OSError as e:
            assert e.errno == errno.EINVAL and not readable(pr.prot).all()

    @rule(i=st.integers(0, 9))
    def collapse(self, i):
        pr = self._pick(i)
        if (pr.prot < 0).any():
            return
        ent = np.asarray(pr.proc.pages(self.base, NR), U)
        coherent = (pt.pte_present(ent) & (pt.pte_pfn(ent) >= self.system.phys.nr_ram)).any()
        try:
            pr.proc.madvise(self.base, PMD_SIZE, MADV_COLLAPSE)
        except OSError as e:
            # device-private pages are brought back first; coherent device pages are not taken
            # (SCAN_PAGE_NULL: EINVAL); a full RAM is the other excuse
            assert e.errno == errno.ENOMEM or (e.errno == errno.EINVAL and coherent), e
        else:
            if len(pr.proc.mm.vmas_in(self.base, self.base + PMD_SIZE)) == 1:
                assert (np.asarray(pr.proc.pages(self.base, NR), U) & HUGE).all()

    @invariant()
    def pmd_mappings_are_whole_folios(self):
        if not hasattr(self, "system"):
            return
        pg = self.system.phys.pages
        for pr in self.procs:
            for v in pr.proc.mm.vmas:
                e = np.asarray(v.pte, U)
                huge = np.nonzero((e & HUGE) != 0)[0]
                if huge.size == 0:
                    continue
                assert huge.size == NR and v.start + (int(huge[0]) << 12) == self.base
                pfn = pt.pte_pfn(e[huge])
                assert pfn[0] % NR == 0 and (np.diff(pfn) == 1).all()
                assert (pg.order[pfn] == 9).all() and pg.flags[pfn[0]] & PG_HEAD
                kinds = e[huge] & U(0xF03)
                assert (kinds == kinds[0]).all()


class HmmThpCoherentMachine(HmmThpMachine):
    memory = "coherent"


_thp_settings = settings(max_examples=40, stateful_step_count=30, deadline=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))
TestHmmThpPrivate = HmmThpMachine.TestCase
TestHmmThpPrivate.settings = _thp_settings
TestHmmThpCoherent = HmmThpCoherentMachine.TestCase
TestHmmThpCoherent.settings = _thp_settings
