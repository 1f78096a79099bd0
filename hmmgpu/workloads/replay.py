"""Trace replay: a workload driven by a page-access trace captured elsewhere (NVBit, UVMSmart, a
simulator), so a policy can be measured on a program that is not ported.

A trace is a list of accesses (order, virtual address, kind): a CSV file with a header naming
the columns ``order``, ``vaddr`` and ``access``, or an ``.npz`` holding three arrays of those
names (docs/workloads.md gives the format).  Replay maps the traced address ranges into the
process -- each run of consecutive 2 MiB blocks becomes one anonymous mapping from its first to
its last traced page, placed at the same offset within a 2 MiB block as in the trace, so UVM's
VA-block boundaries fall where they fell -- lets the CPU write random words into them (first
touch on the host), then runs the accesses in ascending order (ties in file order), ``batch``
at a time: one launch per batch, one lane per access, each making exactly its one access
through the device page table.  A read loads the 8-byte word at the address; a write stores a
stamp of the address into the first word of the address's 16-byte pair; an atomic adds 1 to the
pair's second word.  The check follows: the final memory is exact, and every read saw what
the accesses before its batch left there (or what a racing access of its own batch wrote).
"""
import os

import numpy as np

from ..constants import PAGE_SHIFT, PMD_SIZE, TASK_SIZE
from ..device.jobs import Zeros
from .base import Check, Workload, kernel_jobs

_U = np.uint64
ACCESS_KINDS = {"0": 0, "r": 0, "read": 0, "1": 1, "w": 1, "write": 1, "2": 2, "a": 2, "atomic": 2}
ACCESS_HELP = "0/r/read, 1/w/write or 2/a/atomic"
COLUMNS = ("order", "vaddr", "access")
STAMP = _U(0x9E3779B97F4A7C15)


class TraceFormatError(ValueError):
    """A trace file that cannot be replayed; the message names the file, the line (or record)
    and the field."""


def stamp(words):
    """What a replayed write stores at word ``w`` (an odd multiplicative hash of the address)."""
    return np.asarray(words, _U) * STAMP + _U(1)


def replay_np(ctx, lanes, a):
    vaddr, kind, out = a[0], a[1], a[2]
    v, k = vaddr[lanes], kind[lanes]
    r = np.flatnonzero(k == 0)
    out[lanes[r]] = ctx.load(v[r] & ~_U(7), _U, r)
    w = np.flatnonzero(k == 1)
    ctx.store(v[w] & ~_U(15), stamp(v[w] & ~_U(15)), w)
    t = np.flatnonzero(k == 2)
    ctx.atomic_add((v[t] & ~_U(15)) + _U(8), np.ones(t.size, _U), t)


KERNELS = kernel_jobs("replay.cu", {"trace_replay": replay_np})


# ------------------------------------------------------------------------------------------------
# the file format

class Trace:
    """A validated trace: ``order`` (int64), ``vaddr`` (uint64), ``access`` (uint8: 0 read,
    1 write, 2 atomic), sorted by order (stable)."""

    def __init__(self, order, vaddr, access, source="<trace>"):
        order = np.asarray(order, np.int64)
        k = np.argsort(order, kind="stable")
        self.order = order[k]
        self.vaddr = np.asarray(vaddr, _U)[k]
        self.access = np.asarray(access, np.uint8)[k]
        self.source = source

    def __len__(self):
        return int(self.order.size)


def _where(path, line=None, record=None, field=None):
    at = [os.fspath(path)]
    if line is not None:
        at.append(f"line {line}")
    if record is not None:
        at.append(f"record {record}")
    if field is not None:
        at.append(f"field '{field}'")
    return ", ".join(at)


def _parse_int(s):
    t = s.strip().lower()
    return int(t, 16) if t.startswith("0x") else int(t, 10)


def _check_values(path, order, vaddr, access, where):
    """Range checks shared by both formats; ``where(i, field)`` names record i."""
    bad = np.flatnonzero((vaddr < 0) | (vaddr >= TASK_SIZE))
    if bad.size:
        i = int(bad[0])
        raise TraceFormatError(f"{where(i, 'vaddr')}: 0x{int(vaddr[i]) & (2**64 - 1):x} is not a user "
                               f"address (below 0x{TASK_SIZE:x})")
    bad = np.flatnonzero((access < 0) | (access > 2))
    if bad.size:
        i = int(bad[0])
        raise TraceFormatError(f"{where(i, 'access')}: {int(access[i])} is not an access kind ({ACCESS_HELP})")


def _load_csv(path):
    with open(path) as f:
        lines = f.read().splitlines()
    header, cols, rows, linenos = None, None, [], []
    for no, line in enumerate(lines, 1):          # one iteration per line of text
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        fields = [x.strip() for x in s.split(",")]
        if header is None:
            header = [h.lower() for h in fields]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise TraceFormatError(f"{_where(path, line=no)}: the header must name the columns "
                                       f"{', '.join(COLUMNS)}; {', '.join(missing)} missing (found: {s})")
            cols = [header.index(c) for c in COLUMNS]
            continue
        if len(fields) != len(header):
            raise TraceFormatError(f"{_where(path, line=no)}: {len(fields)} fields, the header has "
                                   f"{len(header)}")
        rows.append([fields[c] for c in cols])
        linenos.append(no)
    if header is None or not rows:
        raise TraceFormatError(f"{_where(path)}: no records (a header line naming {', '.join(COLUMNS)}, "
                               "then one access per line)")
    out = []
    for j, (name, conv) in enumerate((("order", _parse_int), ("vaddr", _parse_int),
                                       ("access", lambda s: ACCESS_KINDS[s.lower()]))):
        strings = [r[j] for r in rows]
        try:
            out.append(np.array([conv(s) for s in strings], dtype=np.int64))
        except (ValueError, KeyError, OverflowError):
            for i, s in enumerate(strings):       # the error path only: find the first bad field
                try:
                    np.int64(conv(s))
                except (ValueError, KeyError, OverflowError):
                    what = {"order": "an integer", "vaddr": "an address (decimal or 0x-hex)",
                            "access": f"an access kind ({ACCESS_HELP})"}[name]
                    raise TraceFormatError(f"{_where(path, line=linenos[i], field=name)}: {s!r} is not "
                                           f"{what}") from None
            raise
    order, vaddr, access = out
    _check_values(path, order, vaddr, access, lambda i, f: _where(path, line=linenos[i], field=f))
    return Trace(order, vaddr.astype(_U), access, os.fspath(path))


def _load_npz(path):
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TraceFormatError(f"{_where(path)}: not a readable .npz file ({e})") from None
    with z:
        missing = [c for c in COLUMNS if c not in z.files]
        if missing:
            raise TraceFormatError(f"{_where(path)}: array(s) {', '.join(missing)} missing; it holds "
                                   f"{', '.join(z.files) or 'nothing'}")
        arrs = {c: z[c] for c in COLUMNS}
    n = arrs["order"].size
    for c, a in arrs.items():
        if a.ndim != 1 or a.size != n:
            raise TraceFormatError(f"{_where(path)}: array '{c}' has shape {a.shape}; the three arrays must "
                                   f"be 1-D of one length ({n} for 'order')")
    if n == 0:
        raise TraceFormatError(f"{_where(path)}: no records")
    for c in ("order", "vaddr"):
        if arrs[c].dtype.kind not in "iu":
            raise TraceFormatError(f"{_where(path)}: array '{c}' holds {arrs[c].dtype}, not integers")
    acc = arrs["access"]
    if acc.dtype.kind in "US":
        codes = np.array([ACCESS_KINDS.get(str(s).lower(), -1) for s in acc.astype(str)], np.int64)
        acc_show = acc.astype(str)
    elif acc.dtype.kind in "iu":
        codes, acc_show = acc.astype(np.int64), acc
    else:
        raise TraceFormatError(f"{_where(path)}: array 'access' holds {acc.dtype}, not kinds ({ACCESS_HELP})")
    bad = np.flatnonzero((codes < 0) | (codes > 2))
    if bad.size:
        i = int(bad[0])
        raise TraceFormatError(f"{_where(path, record=i, field='access')}: {acc_show[i]!r} is not an "
                               f"access kind ({ACCESS_HELP})")
    vaddr = arrs["vaddr"]
    v = vaddr.astype(np.int64) if vaddr.dtype.kind == "i" else np.where(
        vaddr > _U(np.iinfo(np.int64).max), -1, vaddr.astype(np.int64))
    _check_values(path, arrs["order"], v, codes, lambda i, f: _where(path, record=i, field=f))
    return Trace(arrs["order"].astype(np.int64), v.astype(_U), codes, os.fspath(path))


def load_trace(path):
    """Read and validate a trace file (``.npz``, else CSV); TraceFormatError names what is wrong."""
    if os.fspath(path).endswith(".npz"):
        return _load_npz(path)
    return _load_csv(path)


def save_trace(path, order, vaddr, access):
    """Write a trace as ``.npz`` (by extension) or CSV (vaddr in hex, access as r/w/a)."""
    order = np.asarray(order, np.int64)
    vaddr = np.asarray(vaddr, _U)
    access = np.asarray(access, np.uint8)
    if os.fspath(path).endswith(".npz"):
        np.savez(path, order=order, vaddr=vaddr, access=access)
        return
    names = np.array(["r", "w", "a"])[access]
    with open(path, "w") as f:
        f.write("order,vaddr,access\n")
        f.writelines(f"{o},0x{v:x},{k}\n" for o, v, k in zip(order.tolist(), vaddr.tolist(), names.tolist()))


# ------------------------------------------------------------------------------------------------

class TraceReplay(Workload):
    """Replay of a page-access trace file (``path``), ``batch`` accesses per launch.  Its
    footprint is the trace's: runs of consecutive traced 2 MiB blocks, first to last traced page."""

    name = "trace"
    suite = "trace"
    params = {"path": None, "batch": 4096}
    KERNELS = KERNELS

    def __init__(self, footprint=None, *, trace=None, **kw):
        if footprint is not None:
            raise ValueError("trace: a replay's footprint is its trace's; it cannot be sized")
        super().__init__(None, **kw)
        if trace is None:
            if self.p["path"] is None:
                raise ValueError("trace: give path= (a trace file) or trace= (a Trace)")
            trace = load_trace(self.p["path"])
        if int(self.p["batch"]) <= 0:
            raise ValueError(f"trace: batch must be positive, not {self.p['batch']}")
        self.trace = trace
        pages = np.unique(trace.vaddr >> _U(PAGE_SHIFT)).astype(np.int64)
        blocks = np.unique(pages >> 9)                                   # traced 2 MiB blocks
        run = np.concatenate(([0], np.cumsum(np.diff(blocks) != 1)))     # block -> its run
        seg = run[np.searchsorted(blocks, pages >> 9)]                   # page -> its run
        nseg = int(seg.max()) + 1
        lo = np.full(nseg, np.iinfo(np.int64).max)
        hi = np.zeros(nseg, np.int64)
        np.minimum.at(lo, seg, pages)
        np.maximum.at(hi, seg, pages)
        self.seg_lo, self.seg_hi = lo, hi + 1          # traced pages [lo, hi) of each segment
        self.dims = {"records": len(trace), "segments": nseg}

    def layout(self, dims=None):
        return [(f"seg{i}", int(h - l) << PAGE_SHIFT) for i, (l, h) in enumerate(zip(self.seg_lo, self.seg_hi))]

    def align_of(self, name):
        return (int(self.seg_lo[int(name[3:])]) << PAGE_SHIFT) % PMD_SIZE

    def init(self, rng):
        self.words0 = {}
        for name, r in self.regions.items():     # one iteration per segment
            w = rng.integers(0, 1 << 62, r.nbytes // 8, dtype=np.int64).astype(_U)
            self.words0[name] = w
            self.write(name, w)
        t = self.trace
        seg = np.searchsorted(self.seg_lo, (t.vaddr >> _U(PAGE_SHIFT)).astype(np.int64), side="right") - 1
        bases = np.array([self.regions[f"seg{i}"].addr for i in range(self.dims["segments"])], np.int64)
        self.seg_of = seg
        self.vaddr = (t.vaddr.astype(np.int64) - (self.seg_lo[seg] << PAGE_SHIFT) + bases[seg]).astype(_U)

    def execute(self):
        n, b = len(self.trace), int(self.p["batch"])
        kind = self.trace.access.astype(_U)
        self.values = np.zeros(n, _U)
        for lo in range(0, n, b):                # one launch per batch
            hi = min(n, lo + b)
            r = self.launch("trace_replay", hi - lo, [self.vaddr[lo:hi], kind[lo:hi], Zeros(hi - lo, _U)])
            self.values[lo:hi] = r.outputs[2]

    def check(self):
        t, b = self.trace, int(self.p["batch"])
        batch = np.arange(len(t)) // b
        acc = t.access
        word = {0: self.vaddr & ~_U(7), 1: self.vaddr & ~_U(15), 2: (self.vaddr & ~_U(15)) + _U(8)}
        # the final memory: stamps where written, +1 per atomic
        expect = {k: v.copy() for k, v in self.words0.items()}
        regions = [self.regions[f"seg{i}"] for i in range(self.dims["segments"])]
        for kind in (1, 2):
            m = acc == kind
            s = self.seg_of[m]
            idx = ((word[kind][m] - np.array([r.addr for r in regions], _U)[s]) // _U(8)).astype(np.int64)
            for i in np.unique(s):                # one iteration per segment touched
                j = idx[s == i]
                e = expect[f"seg{i}"]
                if kind == 1:
                    e[j] = stamp(word[1][m][s == i])
                else:
                    np.add.at(e, j, _U(1))
        bad = [k for k in expect if not np.array_equal(expect[k], self.read(k, _U))]
        if bad:
            return Check(False, "final memory; every read", "exact", f"memory differs in {', '.join(bad)}")
        # every read: the value before its batch, or what a racing access of its batch left
        r = np.flatnonzero(acc == 0)
        if r.size:
            init = np.concatenate([self.words0[f"seg{i}"] for i in range(len(regions))])
            starts = np.cumsum([0] + [w.size for w in list(self.words0.values())[:-1]])
            seg_r = self.seg_of[r]
            wr = word[0][r]
            at = starts[seg_r] + ((wr - np.array([x.addr for x in regions], _U)[seg_r]) // _U(8)).astype(np.int64)
            ok = self._reads_ok(wr, batch[r], self.values[r], init[at], word, batch, acc)
            if not ok.all():
                i = int(r[np.flatnonzero(~ok)[0]])
                return Check(False, "final memory; every read", "exact",
                             f"{int((~ok).sum())} reads wrong; first: access {i} (order {int(t.order[i])}) at "
                             f"0x{int(t.vaddr[i]):x} read 0x{int(self.values[i]):x}")
        return Check(True, "final memory; every read", "exact")

    @staticmethod
    def _reads_ok(wr, br, got, init, word, batch, acc):
        """Whether each read (word wr in batch br) saw a value the accesses allow."""
        keys = np.unique(np.concatenate([wr, word[1][acc == 1], word[2][acc == 2]]))
        nb = int(batch.max()) + 2
        ok = np.zeros(wr.size, bool)
        # a write slot: the stamp once a write of an earlier batch happened; either in a racing batch
        wm = acc == 1
        wk = np.searchsorted(keys, word[1][wm])
        first = np.full(keys.size, nb, np.int64)
        np.minimum.at(first, wk, batch[wm])
        fw = first[np.searchsorted(keys, wr)]
        st = stamp(wr)
        slot_w = (wr % _U(16)) == 0
        ok |= slot_w & (((fw < br) & (got == st)) | ((fw > br) & (got == init))
                        | ((fw == br) & ((got == st) | (got == init))))
        # an atomic slot: the initial value plus the atomics before, up to those of its own batch
        am = acc == 2
        akey = np.sort(np.searchsorted(keys, word[2][am]).astype(np.int64) * nb + batch[am])
        rk = np.searchsorted(keys, wr).astype(np.int64) * nb
        before = np.searchsorted(akey, rk + br) - np.searchsorted(akey, rk)
        upto = np.searchsorted(akey, rk + br + 1) - np.searchsorted(akey, rk)
        n = got - init
        ok |= ~slot_w & (n >= before.astype(_U)) & (n <= upto.astype(_U))
        return ok
