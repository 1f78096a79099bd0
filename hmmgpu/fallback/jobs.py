"""The NumPy twins of the device jobs, and the fallback's MMU, fault buffer and lane context.

Every function here is the vectorised counterpart of a kernel in hmmgpu/kernels/jobs.cu or
hmm.cuh, with the same results: memory bytes, page-table ACCESSED/DIRTY bits, lane states, and
the set of fault records.  Loops run over pointer-chasing steps or over operands, never over
lanes or pages.  Completion is immediate; nothing here is a timing.
"""
import numpy as np

from ..device.hw import DONE
from ..device.faults import (ACCESS_ATOMIC, ACCESS_READ, ACCESS_WRITE, FATAL_BAD_PFN, FATAL_MISALIGNED,
                             fatal_word)
from ..device.jobs import LANE_DONE, LANE_FAULTED, Zeros
from ..device.pagetable import PTE_ACCESSED, PTE_ATOMIC, PTE_DIRTY, PTE_VALID, PTE_WRITE
from .pagetable import pt_read, pt_walk

_U64 = np.uint64
BULK_UNITS = 256


class NumpyFaultHW:
    """The fault ring in (emulated) device memory: records (capacity, 4) and the put counter."""

    def __init__(self, capacity):
        self.capacity = int(capacity)
        self.records = np.zeros((self.capacity, 4), dtype=np.uint64)
        self.put = 0

    def append(self, vaddr, access, lane, job):
        n = len(vaddr)
        if n == 0:
            return
        k = max(0, min(n, self.capacity - self.put))
        if k:
            r = self.records[self.put:self.put + k]
            r[:, 0] = np.asarray(vaddr, np.uint64)[:k]
            r[:, 1] = np.asarray(lane, np.int64)[:k].astype(np.uint64)
            r[:, 2] = np.broadcast_to(np.asarray(access, np.int64), (n,))[:k].astype(np.uint64)
            r[:, 3] = _U64(job)
        self.put += n          # keeps counting past the end: the overflow

    def drain(self):
        n = min(self.put, self.capacity)
        out, put = self.records[:n].copy(), self.put
        self.put = 0
        return out, put


def pte_allows(e, access):
    e = np.asarray(e, dtype=np.uint64)
    valid = (e & _U64(PTE_VALID)) != 0
    if access == ACCESS_READ:
        return valid
    w = valid & ((e & _U64(PTE_WRITE)) != 0)
    if access == ACCESS_WRITE:
        return w
    return w & ((e & _U64(PTE_ATOMIC)) != 0)


class NumpyMMU:
    """Translation and physical access for the twins: hmm_translate / hmm_phys of hmm.cuh."""

    def __init__(self, dev_arena, host_arena, pfn_base, nframes, faults):
        self.dev = dev_arena.frames
        self.host = host_arena.frames
        self.pfn_base = int(pfn_base)
        self.nframes = int(nframes)
        self.faults = faults
        self.nodes = None
        self.job_id = 0

    def translate(self, vaddr, access, lanes, record=True, size=1):
        """(ok, pte) per address; sets ACCESSED/DIRTY on success; records the failures in order.

        An entry whose pfn is outside memory (``pfn_ok``) fails too, as a fatal fault."""
        vaddr = np.asarray(vaddr, dtype=np.uint64)
        slots = pt_walk(self.nodes, (vaddr >> _U64(12)).astype(np.int64))
        e = pt_read(self.nodes, slots)
        ok = pte_allows(e, access)
        want = _U64(PTE_ACCESSED | (PTE_DIRTY if access != ACCESS_READ else 0))
        need = ok & ((e & want) != want)
        if need.any():
            flat = self.nodes.reshape(-1)
            flat[slots[need]] |= want
        wild = ok & ~self.pfn_ok(e)
        ok &= ~wild
        if record and not ok.all():
            bad = ~ok
            words = np.where(wild, fatal_word(access, FATAL_BAD_PFN, size), _U64(access))
            self.faults.append(vaddr[bad], words[bad], np.asarray(lanes)[bad], self.job_id)
        return ok, e

    def pfn_ok(self, pte):
        """hmm_pfn_ok: the leaf points at system RAM or at this device's frames."""
        pfn = (np.asarray(pte, np.uint64) >> _U64(12)).astype(np.int64)
        d = pfn - self.pfn_base
        return ((pfn >= 0) & (pfn < self.host.shape[0])) | ((d >= 0) & (d < self.nframes))

    def _where(self, pte, off, itemsize):
        pfn = (np.asarray(pte, np.uint64) >> _U64(12)).astype(np.int64)
        d = pfn - self.pfn_base
        dev = (d >= 0) & (d < self.nframes)
        byte = np.where(dev, d, pfn) * 4096 + np.asarray(off, np.int64)
        return dev, byte // itemsize

    def _views(self, dtype, width):
        dt = np.dtype(dtype)
        return (self.dev.reshape(-1).view(dt).reshape(-1, width),
                self.host.reshape(-1).view(dt).reshape(-1, width))

    def load(self, pte, off, dtype, width=1):
        dv, hv = self._views(dtype, width)
        dev, idx = self._where(pte, off, np.dtype(dtype).itemsize * width)
        out = np.empty((idx.size, width), dtype=dtype)
        out[dev] = dv[idx[dev]]
        out[~dev] = hv[idx[~dev]]
        return out if width > 1 else out[:, 0]

    def store(self, pte, off, values, dtype, width=1):
        dv, hv = self._views(dtype, width)
        dev, idx = self._where(pte, off, np.dtype(dtype).itemsize * width)
        values = np.asarray(values, dtype=dtype).reshape(idx.size, width)
        dv[idx[dev]] = values[dev]
        hv[idx[~dev]] = values[~dev]

    def atomic_add(self, pte, off, values, dtype):
        """Old values as if the lanes had gone in lane order; then the sums land."""
        dv, hv = self._views(dtype, 1)
        dev, idx = self._where(pte, off, np.dtype(dtype).itemsize)
        values = np.asarray(values, dtype=dtype)
        key = np.where(dev, idx, -1 - idx)             # one key space for both memories
        order = np.argsort(key, kind="stable")
        sk, sv = key[order], values[order]
        start = np.concatenate(([True], sk[1:] != sk[:-1]))
        cs = np.cumsum(sv, dtype=dtype) - sv
        excl = cs - cs[np.maximum.accumulate(np.where(start, np.arange(sk.size), 0))]
        cur = np.empty(idx.size, dtype=dtype)
        cur[dev] = dv[idx[dev], 0]
        cur[~dev] = hv[idx[~dev], 0]
        old = np.empty_like(cur)
        old[order] = cur[order] + excl
        np.add.at(dv[:, 0], idx[dev], values[dev])
        np.add.at(hv[:, 0], idx[~dev], values[~dev])
        return old


class NumpyLaneContext:
    """hmm_lane of hmm.cuh for a vector of lanes: each call acts on the still-active lanes
    (optionally only the positions ``sel``); a lane that faults stops, later calls skip it and
    its loads read 0.  ``probe=True`` is the first pass of a two-phase job: loads happen,
    stores and atomics only translate."""

    def __init__(self, mmu, lanes, probe=False):
        self.mmu = mmu
        self.lanes = np.asarray(lanes, dtype=np.int64)
        self.active = np.ones(self.lanes.size, dtype=bool)
        self.probe_pass = probe

    @property
    def faulted(self):
        return ~self.active

    def _xlate(self, vaddr, access, sel, size=1):
        sel = np.arange(self.lanes.size) if sel is None else np.asarray(sel, dtype=np.int64)
        vaddr = np.broadcast_to(np.asarray(vaddr, dtype=np.uint64), sel.shape)
        live = self.active[sel]
        if size > 1:
            # hmm_xlate: a misaligned access is never made; it is a fatal fault of the lane
            mis = live & ((vaddr & _U64(size - 1)) != 0)
            if mis.any():
                self.mmu.faults.append(vaddr[mis], fatal_word(access, FATAL_MISALIGNED, size),
                                       self.lanes[sel[mis]], self.mmu.job_id)
                self.active[sel[mis]] = False
                live = live & ~mis
        ok = np.zeros(sel.size, bool)
        pte = np.zeros(sel.size, np.uint64)
        s = sel[live]
        o, e = self.mmu.translate(vaddr[live], access, self.lanes[s], size=size)
        self.active[s[~o]] = False
        ok[live] = o
        pte[live] = e
        return ok, pte, vaddr

    def probe(self, vaddr, access, sel=None):
        return self._xlate(vaddr, access, sel)[0]

    def load(self, vaddr, dtype, sel=None):
        ok, pte, vaddr = self._xlate(vaddr, ACCESS_READ, sel, np.dtype(dtype).itemsize)
        out = np.zeros(ok.size, dtype=dtype)
        out[ok] = self.mmu.load(pte[ok], vaddr[ok] & _U64(4095), dtype)
        return out

    def store(self, vaddr, values, sel=None):
        values = np.asarray(values)
        ok, pte, vaddr = self._xlate(vaddr, ACCESS_WRITE, sel, values.dtype.itemsize)
        if not self.probe_pass and ok.any():
            values = np.broadcast_to(values, ok.shape)
            self.mmu.store(pte[ok], vaddr[ok] & _U64(4095), values[ok], values.dtype)

    def atomic_add(self, vaddr, values, sel=None):
        values = np.asarray(values)
        ok, pte, vaddr = self._xlate(vaddr, ACCESS_ATOMIC, sel, values.dtype.itemsize)
        values = np.broadcast_to(values, ok.shape)
        old = np.zeros(ok.size, dtype=values.dtype)
        if not self.probe_pass and ok.any():
            old[ok] = self.mmu.atomic_add(pte[ok], vaddr[ok] & _U64(4095), values[ok], values.dtype)
        return old


# ------------------------------------------------------------------------------------------------
# the twins of jobs.cu

def _bulk_translate(mmu, lanes, args, ops):
    """Translate every page of every operand for each lane; record every failing page.

    Returns (all-ok mask, per operand (first vaddr, pteA, pteB)).
    """
    nunits = int(args[2])
    lanes = np.asarray(lanes, dtype=np.int64)
    nu = np.minimum(BULK_UNITS, nunits - lanes * BULK_UNITS)
    allok = np.ones(lanes.size, bool)
    rec_pos, rec_ord, rec_va, rec_acc = [], [], [], []
    per_op = []
    for j, (ai, acc) in enumerate(ops):               # one iteration per operand (1 or 2)
        first = np.uint64(args[ai]) + lanes.astype(np.uint64) * _U64(4096)
        vA = first >> _U64(12)
        vB = (first + nu.astype(np.uint64) * _U64(16) - _U64(1)) >> _U64(12)
        okA, eA = mmu.translate(first, acc, lanes, record=False)
        two = vB != vA
        okB = np.ones(lanes.size, bool)
        eB = np.zeros(lanes.size, np.uint64)
        if two.any():
            o, e = mmu.translate(vB[two] << _U64(12), acc, lanes[two], record=False)
            okB[two] = o
            eB[two] = e
        for which, (ok, e, va) in enumerate(((okA, eA, first), (okB, eB, vB << _U64(12)))):
            p = np.flatnonzero(~ok)
            rec_pos.append(p)
            rec_ord.append(np.full(p.size, 2 * j + which))
            rec_va.append(va[p])
            # translated, but to a pfn outside memory: fatal (bulk_translate's hmm_pfn_ok)
            wild = pte_allows(e[p], acc)
            rec_acc.append(np.where(wild, fatal_word(acc, FATAL_BAD_PFN, 16), _U64(acc)))
        allok &= okA & okB
        per_op.append((first, eA, eB))
    pos = np.concatenate(rec_pos)
    if pos.size:
        order = np.lexsort((np.concatenate(rec_ord), pos))
        mmu.faults.append(np.concatenate(rec_va)[order], np.concatenate(rec_acc).astype(np.uint64)[order],
                          lanes[pos[order]], mmu.job_id)
    return allok, nu, per_op


def _bulk_units(c, nu, per_op):
    """Unit addresses of committing lanes ``c``: for each operand (pte, page offset) per unit."""
    cnu = nu[c]
    total = int(cnu.sum())
    starts = np.cumsum(cnu) - cnu
    rep = np.repeat(np.arange(c.size), cnu)
    k = (np.arange(total, dtype=np.int64) - starts[rep]).astype(np.uint64)
    out = []
    for first, eA, eB in per_op:
        f = first[c][rep]
        va = f + k * _U64(16)
        pte = np.where((va >> _U64(12)) == (f >> _U64(12)), eA[c][rep], eB[c][rep])
        out.append((pte, va & _U64(4095)))
    return out, starts


BULK_OPS = {"memset": ((0, ACCESS_WRITE),),
            "copy": ((0, ACCESS_WRITE), (1, ACCESS_READ)),
            "axpy": ((0, ACCESS_READ), (1, ACCESS_WRITE)),
            "reduce": ((0, ACCESS_READ),)}
BULK_CHUNK_LANES = 2048          # bounds the temporaries: 8 MiB of data per step


def _bulk_apply(mmu, name, args, units, width, lanes_out, lane_starts=None):
    """The data step of a bulk job over (pte, page offset) pieces of ``width`` uint32 words:
    16-byte units (width 4), or whole pages (width 1024) when every operand is page-aligned."""
    if name == "memset":
        pte, off = units[0]
        b = np.uint32(int(args[1]) * 0x01010101)
        mmu.store(pte, off, np.full((pte.size, width), b, np.uint32), np.uint32, width)
    elif name == "copy":
        (dp, do), (sp, so) = units
        mmu.store(dp, do, mmu.load(sp, so, np.uint32, width), np.uint32, width)
    elif name == "axpy":
        (xp, xo), (yp, yo) = units
        a = np.array(int(args[3]), np.uint32).view(np.float32)
        x = mmu.load(xp, xo, np.float32, width)
        y = mmu.load(yp, yo, np.float32, width)
        mmu.store(yp, yo, a * x + y, np.float32, width)   # two roundings, like __fmul_rn/__fadd_rn
    else:
        pte, off = units[0]
        sums = mmu.load(pte, off, np.uint32, width).astype(np.uint64).sum(axis=1, dtype=np.uint64)
        args[3][lanes_out] = sums if lane_starts is None else np.add.reduceat(sums, lane_starts)


def bulk_job(mmu, state, lanes, name, args):
    ops = BULK_OPS[name]
    ok, nu, per_op = _bulk_translate(mmu, lanes, args, ops)
    state[lanes[~ok]] = LANE_FAULTED
    c = np.flatnonzero(ok)
    if c.size == 0:
        return
    if all(int(args[ai]) % 4096 == 0 for ai, _ in ops):
        # page-aligned operands: a full lane is exactly one page of each operand
        full = c[nu[c] == BULK_UNITS]
        if full.size:
            zero = np.zeros(full.size, np.uint64)
            _bulk_apply(mmu, name, args, [(eA[full], zero) for _, eA, _ in per_op], 1024, lanes[full])
        c = c[nu[c] != BULK_UNITS]
    if c.size:
        units, starts = _bulk_units(c, nu, per_op)
        _bulk_apply(mmu, name, args, units, 4, lanes[c], starts)
    state[lanes[ok]] = LANE_DONE


def gather_lane(ctx, lanes, args):
    i = lanes.astype(np.uint64)
    dst, src, idx = (np.uint64(a) for a in args[:3])
    j = ctx.load(idx + _U64(8) * i, np.int64)
    ctx.probe(dst + _U64(4) * i, ACCESS_WRITE)
    v = ctx.load(src + _U64(4) * j.astype(np.uint64), np.uint32)
    ctx.store(dst + _U64(4) * i, v)


def list_lane(ctx, lanes, args):
    cur, sums, steps, max_steps = args[0], args[1], args[2], int(args[3])
    p, s, n = cur[lanes].copy(), sums[lanes].copy(), steps[lanes].copy()
    while True:                                   # one iteration per step along the lists
        sel = np.flatnonzero(ctx.active & (p != 0) & (n < max_steps))
        if sel.size == 0:
            break
        nxt = ctx.load(p[sel], np.uint64, sel)
        v = ctx.load(p[sel] + _U64(8), np.uint64, sel)
        ok = ctx.active[sel]
        t = sel[ok]
        s[t] += v[ok]
        n[t] += _U64(1)
        p[t] = nxt[ok]
    cur[lanes], sums[lanes], steps[lanes] = p, s, n


def tree_lane(ctx, lanes, args):
    cur, depth, result, keys, max_depth = args[0], args[1], args[2], args[3], int(args[4])
    p, d, r, key = cur[lanes].copy(), depth[lanes].copy(), result[lanes].copy(), keys[lanes]
    while True:                                   # one iteration per tree level
        sel = np.flatnonzero(ctx.active & (p != 0) & (d < max_depth))
        if sel.size == 0:
            break
        k = ctx.load(p[sel] + _U64(16), np.uint64, sel)
        ok = ctx.active[sel]
        sel, k = sel[ok], k[ok]
        v = ctx.load(p[sel] + _U64(24), np.uint64, sel)
        left = ctx.load(p[sel], np.uint64, sel)
        right = ctx.load(p[sel] + _U64(8), np.uint64, sel)
        d[sel] += _U64(1)
        hit = k == key[sel]
        r[sel[hit]] = v[hit]
        p[sel] = np.where(hit, _U64(0), np.where(key[sel] < k, left, right))
    cur[lanes], depth[lanes], result[lanes] = p, d, r


LANE_JOBS = {"gather": gather_lane, "list_chase": list_lane, "tree_search": tree_lane}


def run_lanes(mmu, state, lanes, fn, args, two_phase):
    """hmm_run_lanes: optional probe pass, then the real pass; lane states updated."""
    if two_phase:
        ctx = NumpyLaneContext(mmu, lanes, probe=True)
        fn(ctx, lanes, args)
        state[lanes[ctx.faulted]] = LANE_FAULTED
        lanes = lanes[ctx.active]
        if lanes.size == 0:
            return
    ctx = NumpyLaneContext(mmu, lanes)
    fn(ctx, lanes, args)
    state[lanes] = np.where(ctx.active, LANE_DONE, LANE_FAULTED).astype(np.uint8)


class _Job:
    def __init__(self, spec, job_id):
        self.spec = spec
        self.job_id = job_id
        self.state = np.zeros(spec.nlanes, dtype=np.uint8)
        self.args = [a.copy() if isinstance(a, np.ndarray) else
                     np.zeros(a.n, a.dtype) if isinstance(a, Zeros) else a for a in spec.args]


class NumpyJobExecutor:
    def __init__(self, device):
        self.mmu = NumpyMMU(device.arena, device.host_arena, device.pfn_base, device.nframes,
                            device.fault_buffer.hw)

    def prepare(self, spec, job_id):
        if spec.user is not None and spec.user.numpy_lane is None:
            raise ValueError(f"user job '{spec.name}' has no NumPy lane function for the numpy backend")
        return _Job(spec, job_id)

    def launch(self, h, pending, lo, n, nodes):
        self.mmu.nodes = nodes
        self.mmu.job_id = h.job_id
        lanes = np.arange(lo, lo + n, dtype=np.int64) if pending is None else pending[lo:lo + n]
        spec = h.spec
        if spec.user is not None:
            run_lanes(self.mmu, h.state, lanes, spec.user.numpy_lane, h.args, True)
        elif spec.warp:
            for lo in range(0, lanes.size, BULK_CHUNK_LANES):     # bounded temporaries
                bulk_job(self.mmu, h.state, lanes[lo:lo + BULK_CHUNK_LANES], spec.name, h.args)
        else:
            run_lanes(self.mmu, h.state, lanes, LANE_JOBS[spec.name], h.args, False)
        return DONE

    def sync(self):
        pass

    def faulted(self, h):
        f = np.flatnonzero(h.state == LANE_FAULTED)
        return f, int(f.size)

    def finish(self, h):
        return tuple(h.args[i] for i in h.spec.outputs)
