"""The page-table hardware of the NumPy backend: the walker and the command executor.

Same semantics as hmmgpu/kernels/pagetable.cu, vectorised over entries (see
hmmgpu/device/pagetable.py for the encoding and the command set).
"""
import numpy as np

from ..device.hw import DONE
from ..device.pagetable import (PT_BITS, PT_ENTRIES, PT_LEVELS, PT_OP_CLEAR, PT_OP_LINK, PT_OP_MAP,
                                PT_OP_SET, PT_OP_UNMAP, PTE_PFN_SHIFT, PTE_VALID, VPN_BITS)

_U64 = np.uint64
_FEW = 8            # up to this many commands and table pieces: walk with Python integers


def _leaf_slots(flat, vpns):
    """Flat slot of each (valid) vpn's leaf entry, -1 where a table is missing."""
    node = np.zeros(vpns.shape, np.int64)
    ok = np.ones(vpns.shape, bool)
    for level in range(PT_LEVELS - 1):
        shift = PT_BITS * (PT_LEVELS - 1 - level)
        e = flat[(node << PT_BITS) + ((vpns >> shift) & (PT_ENTRIES - 1))]
        ok &= (e & _U64(PTE_VALID)) != 0
        node = (e >> _U64(PTE_PFN_SHIFT)).astype(np.int64)
    return np.where(ok, (node << PT_BITS) + (vpns & (PT_ENTRIES - 1)), -1)


def _leaf_slot(flat, vpn):
    """``_leaf_slots`` of one vpn, with Python integers (a handful of loads)."""
    node = 0
    for level in range(PT_LEVELS - 1):
        e = int(flat[(node << PT_BITS) + ((vpn >> (PT_BITS * (PT_LEVELS - 1 - level))) & (PT_ENTRIES - 1))])
        if not e & PTE_VALID:
            return -1
        node = e >> PTE_PFN_SHIFT
    return (node << PT_BITS) + (vpn & (PT_ENTRIES - 1))


def _execute_few(flat, commands):
    """A few leaf commands (op, first vpn, last vpn, value), piece by piece: each piece is one
    slice of one leaf table."""
    for code, first, last, value in commands:
        lo = first
        while lo <= last:
            hi = min(last, lo | (PT_ENTRIES - 1))
            base = _leaf_slot(flat, lo)
            if base >= 0:
                span = flat[base:base + hi - lo + 1]
                if code == PT_OP_MAP:
                    if hi == lo:
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


def pt_walk(nodes, vpns):
    """Flat slot index (into nodes.reshape(-1)) of each vpn's leaf, -1 where a table is missing."""
    vpns = np.asarray(vpns, dtype=np.int64)
    flat = nodes.reshape(-1)
    slot = np.full(vpns.shape, -1, dtype=np.int64)
    ok = (vpns >= 0) & ((vpns >> VPN_BITS) == 0)
    node = np.zeros(vpns.shape, dtype=np.int64)          # the root
    for level in range(PT_LEVELS - 1):
        shift = PT_BITS * (PT_LEVELS - 1 - level)
        idx = node * PT_ENTRIES + ((vpns >> shift) & (PT_ENTRIES - 1))
        e = flat[np.where(ok, idx, 0)]
        ok &= (e & _U64(PTE_VALID)) != 0
        node = (e >> _U64(PTE_PFN_SHIFT)).astype(np.int64)
    slot[ok] = node[ok] * PT_ENTRIES + (vpns[ok] & (PT_ENTRIES - 1))
    return slot


def pt_read(nodes, slots):
    """Entries at flat ``slots`` (0 where slot is -1)."""
    flat = nodes.reshape(-1)
    out = flat[np.maximum(slots, 0)].copy()
    out[slots < 0] = 0
    return out


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
        """Run a command buffer: the LINKs, then every leaf command.

        A leaf command covers a run of vpns; the run is cut where it crosses from one leaf
        table into the next, and each piece's table is walked once: its entries are
        consecutive slots of that table (a slice), whatever the length of the run.
        """
        flat = nodes.reshape(-1)
        if len(cmds) <= _FEW:
            rows = cmds.tolist()
            if all(r[0] & 0xFF != PT_OP_LINK and ((r[1] + (r[0] >> 8) - 1) >> PT_BITS) - (r[1] >> PT_BITS) < _FEW
                   for r in rows):
                # a few leaf commands: each walked and written with Python integers
                _execute_few(flat, [(r[0] & 0xFF, r[1], r[1] + (r[0] >> 8) - 1, r[2]) for r in rows])
                return
        head = cmds[:, 0]
        op = head & _U64(0xFF)
        link = op == PT_OP_LINK
        nlink = int(np.count_nonzero(link))
        if nlink:
            flat[cmds[link, 1].astype(np.int64)] = cmds[link, 2]
            if nlink == len(cmds):
                return
            cmds, op, head = cmds[~link], op[~link], head[~link]
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
        base = _leaf_slots(flat, lo)
        have = base >= 0
        which, lo, hi, base = which[have], lo[have], hi[have], base[have]
        n = hi - lo + 1
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
        return pt_read(nodes, pt_walk(nodes, vpns))
