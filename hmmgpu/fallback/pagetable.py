"""The page-table hardware of the NumPy backend: the walker and the command executor.

Same semantics as hmmgpu/kernels/pagetable.cu, vectorised over entries (see
hmmgpu/device/pagetable.py for the encoding and the command set).
"""
import numpy as np

from ..device.hw import DONE
from ..device.pagetable import (PT_BITS, PT_ENTRIES, PT_LEVELS, PT_OP_CLEAR, PT_OP_HUGE, PT_OP_LINK, PT_OP_MAP,
                                PT_OP_SET, PT_OP_SPLIT, PT_OP_UNMAP, PTE_HUGE, PTE_PFN_SHIFT, PTE_VALID,
                                VPN_BITS)

_U64 = np.uint64
_FEW = 8            # up to this many commands and table pieces: walk with Python integers
_RAMP = np.arange(PT_ENTRIES, dtype=np.uint64) << _U64(PTE_PFN_SHIFT)    # pfn steps of a split table


def _pmd_slots(flat, vpns):
    """hmm_pt_pmd: flat slot of each vpn's level-2 entry, -1 where a directory is missing."""
    ok = (vpns >= 0) & ((vpns >> VPN_BITS) == 0)
    node = np.zeros(vpns.shape, np.int64)
    for level in range(PT_LEVELS - 2):
        shift = PT_BITS * (PT_LEVELS - 1 - level)
        e = flat[np.where(ok, (node << PT_BITS) + ((vpns >> shift) & (PT_ENTRIES - 1)), 0)]
        ok &= (e & _U64(PTE_VALID)) != 0
        node = (e >> _U64(PTE_PFN_SHIFT)).astype(np.int64)
    return np.where(ok, (node << PT_BITS) + ((vpns >> PT_BITS) & (PT_ENTRIES - 1)), -1)


def pt_walk(flat, vpns):
    """hmm_pt_walk of valid vpns (the host checks them): (flat slot of the entry that translates
    each vpn, -1 where a table is missing; which of them are 2 MiB leaves, whose slot is the
    level-2 one, or None when none is)."""
    node = np.zeros(vpns.shape, np.int64)
    ok = np.ones(vpns.shape, bool)
    for level in range(PT_LEVELS - 2):
        e = flat[(node << PT_BITS) + ((vpns >> (PT_BITS * (PT_LEVELS - 1 - level))) & (PT_ENTRIES - 1))]
        ok &= (e & _U64(PTE_VALID)) != 0
        node = (e >> _U64(PTE_PFN_SHIFT)).astype(np.int64)
    pmd = (node << PT_BITS) + ((vpns >> PT_BITS) & (PT_ENTRIES - 1))
    e = flat[pmd]
    huge = None
    if int(np.bitwise_or.reduce(e)) & PTE_HUGE:
        huge = ok & ((e & _U64(PTE_HUGE)) != 0)       # a 2 MiB leaf, valid or not, ends the walk
    ok &= (e & _U64(PTE_VALID)) != 0
    slot = np.where(ok, ((e >> _U64(PTE_PFN_SHIFT)).astype(np.int64) << PT_BITS) + (vpns & (PT_ENTRIES - 1)), -1)
    if huge is not None:
        slot[huge] = pmd[huge]
    return slot, huge


def _leaf_slot(flat, vpn):
    """``pt_walk`` of one vpn, with Python integers (a handful of loads): (slot, huge)."""
    e = int(flat[(vpn >> 27) & 511])
    if not e & PTE_VALID:
        return -1, False
    e = int(flat[((e >> PTE_PFN_SHIFT) << PT_BITS) + ((vpn >> 18) & 511)])
    if not e & PTE_VALID:
        return -1, False
    slot = ((e >> PTE_PFN_SHIFT) << PT_BITS) + ((vpn >> PT_BITS) & 511)
    e = int(flat[slot])
    if e & PTE_HUGE:
        return slot, True
    if not e & PTE_VALID:
        return -1, False
    return ((e >> PTE_PFN_SHIFT) << PT_BITS) + (vpn & 511), False


def _pmd_slot(flat, vpn):
    """``_pmd_slots`` of one vpn, with Python integers."""
    node = 0
    for level in range(PT_LEVELS - 2):
        e = int(flat[(node << PT_BITS) + ((vpn >> (PT_BITS * (PT_LEVELS - 1 - level))) & (PT_ENTRIES - 1))])
        if not e & PTE_VALID:
            return -1
        node = e >> PTE_PFN_SHIFT
    return (node << PT_BITS) + ((vpn >> PT_BITS) & (PT_ENTRIES - 1))


def _execute_tables_few(flat, rows):
    """``_execute_tables`` of a few commands (each HUGE one a few leaves), with Python integers."""
    for head, target, value, _ in rows:
        code, count = head & 0xFF, head >> 8
        if code == PT_OP_SPLIT:
            slot = _pmd_slot(flat, target)
            e = int(flat[slot]) if slot >= 0 else 0
            if e & PTE_HUGE:
                flat[value << PT_BITS:(value + 1) << PT_BITS] = _U64(e & ~PTE_HUGE) + _RAMP
    for head, target, value, _ in rows:
        code, count = head & 0xFF, head >> 8
        if code == PT_OP_LINK:
            flat[target:target + count] = value
        elif code == PT_OP_HUGE:
            for k in range(count):             # a few 2 MiB leaves
                slot = _pmd_slot(flat, target + (k << PT_BITS))
                if slot >= 0:
                    flat[slot] = value + (k << (PT_BITS + PTE_PFN_SHIFT))


def _execute_few(flat, commands):
    """A few leaf commands (op, first vpn, last vpn, value), piece by piece: each piece is one
    slice of one leaf table, or the one entry of a 2 MiB leaf."""
    for code, first, last, value in commands:
        lo = first
        while lo <= last:
            hi = min(last, lo | (PT_ENTRIES - 1))
            base, huge = _leaf_slot(flat, lo)
            if base >= 0:
                n = 1 if huge else hi - lo + 1
                span = flat[base:base + n]
                if code == PT_OP_MAP:
                    if n == 1:
                        span[0] = value + ((lo - first) << PTE_PFN_SHIFT)
                    else:
                        span[:] = _U64(value) + (np.arange(lo - first, hi - first + 1, dtype=_U64)
                                                 << _U64(PTE_PFN_SHIFT))
                elif code == PT_OP_UNMAP:
                    span[:] = 0
                elif code in (PT_OP_CLEAR, PT_OP_SET):
                    valid = (span & _U64(PTE_VALID)) != 0
                    v = _U64(value)
                    span[valid] = span[valid] & ~v if code == PT_OP_CLEAR else span[valid] | v
            lo = hi + 1


def _ramp(counts):
    """0 .. n-1 for each count n, concatenated."""
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def _execute_tables(flat, cmds, op):
    """The commands that address tables rather than pages: LINK (slot runs), HUGE (level-2
    entries), SPLIT (a 2 MiB leaf copied into a new leaf table)."""
    count = (cmds[:, 0] >> _U64(8)).astype(np.int64)
    target = cmds[:, 1].astype(np.int64)
    value = cmds[:, 2]
    sel = op == PT_OP_SPLIT
    if sel.any():                              # reads its leaf: before anything else is written
        pmd = _pmd_slots(flat, target[sel])
        e = flat[np.maximum(pmd, 0)]
        live = (pmd >= 0) & ((e & _U64(PTE_HUGE)) != 0)
        tables = flat.reshape(-1, PT_ENTRIES)
        tables[value[sel][live].astype(np.int64)] = (e[live] & ~_U64(PTE_HUGE))[:, None] + _RAMP
    sel = op == PT_OP_LINK
    if sel.any():
        c, t, v = count[sel], target[sel], value[sel]
        if (c == 1).all():
            flat[t] = v
        else:
            flat[np.repeat(t, c) + _ramp(c)] = np.repeat(v, c)
    sel = op == PT_OP_HUGE
    if sel.any():
        c = count[sel]
        k = _ramp(c)
        pmd = _pmd_slots(flat, np.repeat(target[sel], c) + (k << PT_BITS))
        ok = pmd >= 0
        flat[pmd[ok]] = (np.repeat(value[sel], c) + (k.astype(_U64) << _U64(PT_BITS + PTE_PFN_SHIFT)))[ok]


class NumpyPageTableHW:
    def alloc(self, capacity):
        return np.zeros((capacity, PT_ENTRIES), dtype=np.uint64)

    def grow(self, nodes, capacity):
        new = np.zeros((capacity, PT_ENTRIES), dtype=np.uint64)
        new[: nodes.shape[0]] = nodes
        return new

    def fence(self):
        return DONE

    def execute(self, nodes, cmds):
        """Run a command buffer: the commands that address tables, then every leaf command.

        A leaf command covers a run of vpns; the run is cut where it crosses from one leaf
        table into the next, and each piece's table is walked once: its entries are
        consecutive slots of that table (a slice), whatever the length of the run, or the one
        entry of a 2 MiB leaf.
        """
        flat = nodes.reshape(-1)
        if len(cmds) <= _FEW:
            rows = cmds.tolist()
            if all(PT_OP_MAP <= r[0] & 0xFF <= PT_OP_SET
                   and ((r[1] + (r[0] >> 8) - 1) >> PT_BITS) - (r[1] >> PT_BITS) < _FEW for r in rows):
                # a few leaf commands: each walked and written with Python integers
                _execute_few(flat, [(r[0] & 0xFF, r[1], r[1] + (r[0] >> 8) - 1, r[2]) for r in rows])
                return
            if all(r[0] & 0xFF == PT_OP_LINK or r[0] & 0xFF == PT_OP_SPLIT
                   or (r[0] & 0xFF == PT_OP_HUGE and r[0] >> 8 <= _FEW) for r in rows):
                _execute_tables_few(flat, rows)
                return
        head = cmds[:, 0]
        op = head & _U64(0xFF)
        tab = op - _U64(PT_OP_MAP) > _U64(PT_OP_SET - PT_OP_MAP)     # not a leaf op (uint64 wraps)
        ntab = int(np.count_nonzero(tab))
        if ntab:
            _execute_tables(flat, cmds[tab], op[tab])
            if ntab == len(cmds):
                return
            cmds, op, head = cmds[~tab], op[~tab], head[~tab]
        count = (head >> _U64(8)).astype(np.int64)
        first = cmds[:, 1].astype(np.int64)
        last = first + count - 1
        ntables = (last >> PT_BITS) - (first >> PT_BITS) + 1
        if len(cmds) <= _FEW and int(ntables.sum()) <= _FEW:
            _execute_few(flat, zip(op.tolist(), first.tolist(), last.tolist(), cmds[:, 2].tolist()))
            return
        # one piece per (command, leaf table): [lo, hi] inclusive, and its command
        which = np.repeat(np.arange(len(cmds)), ntables)
        step = np.arange(which.size) - np.repeat(np.cumsum(ntables) - ntables, ntables)
        lo = np.maximum(first[which], ((first[which] >> PT_BITS) + step) << PT_BITS)
        hi = np.minimum(last[which], lo | (PT_ENTRIES - 1))
        base, huge = pt_walk(flat, lo)
        have = base >= 0
        if np.count_nonzero(have) < have.size:  # pieces without a table: nothing to do there
            which, lo, hi, base = which[have], lo[have], hi[have], base[have]
            huge = None if huge is None else huge[have]
        n = hi - lo + 1
        if huge is not None:                   # a 2 MiB leaf is one entry, however many pages
            n[huge] = 1
        piece = np.repeat(np.arange(n.size), n)
        k = np.arange(piece.size) - np.repeat(np.cumsum(n) - n, n)
        slots = base[piece] + k
        cmd = which[piece]
        o = op[cmd]
        value = cmds[cmd, 2]
        for code in np.unique(op).tolist():
            sel = None if o.size and (o == code).all() else o == code
            sl = slots if sel is None else slots[sel]
            v = value if sel is None else value[sel]
            if code == PT_OP_MAP:
                off = (lo[piece] + k - first[cmd]).astype(np.uint64)
                flat[sl] = v + ((off if sel is None else off[sel]) << _U64(PTE_PFN_SHIFT))
            elif code == PT_OP_UNMAP:
                flat[sl] = 0
            elif code in (PT_OP_CLEAR, PT_OP_SET):
                cur = flat[sl]
                valid = (cur & _U64(PTE_VALID)) != 0
                flat[sl] = np.where(valid, cur & ~v if code == PT_OP_CLEAR else cur | v, cur)

    def lookup(self, nodes, vpns):
        """pt_lookup: the entry that translates each vpn; under a 2 MiB leaf with the page's pfn."""
        flat = nodes.reshape(-1)
        vpns = np.asarray(vpns, dtype=np.int64)
        slots, huge = pt_walk(flat, vpns)
        out = flat[np.maximum(slots, 0)]
        out[slots < 0] = 0
        if huge is not None:
            out[huge] += (vpns[huge] & (PT_ENTRIES - 1)).astype(_U64) << _U64(PTE_PFN_SHIFT)
        return out
