"""The page-table hardware of the NumPy backend: the walker and the command executor.

Same semantics as hmmgpu/kernels/pagetable.cu, vectorised over entries (see
hmmgpu/device/pagetable.py for the encoding and the command set).
"""
import numpy as np

from ..device.hw import DONE
from ..device.pagetable import (PT_BITS, PT_ENTRIES, PT_LEVELS, PT_OP_CLEAR, PT_OP_LINK, PT_OP_MAP,
                                PT_OP_SET, PT_OP_UNMAP, PTE_PFN_SHIFT, PTE_VALID, VPN_BITS)

_U64 = np.uint64


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
        flat = nodes.reshape(-1)
        op = (cmds[:, 0] & _U64(0xFF)).astype(np.int64)
        count = (cmds[:, 0] >> _U64(8)).astype(np.int64)
        total = int(count.sum())
        which = np.repeat(np.arange(len(cmds)), count)
        k = np.arange(total, dtype=np.int64) - cmds[which, 3].astype(np.int64)
        target = cmds[which, 1].astype(np.int64) + k
        value = cmds[which, 2]
        o = op[which]
        link = o == PT_OP_LINK
        if link.any():
            flat[cmds[which[link], 1].astype(np.int64)] = value[link]
        leaf = ~link
        if not leaf.any():
            return
        slots = pt_walk(nodes, target[leaf])
        lo, lv, lk = o[leaf], value[leaf], k[leaf]
        have = slots >= 0
        cur = pt_read(nodes, slots)
        valid = (cur & _U64(PTE_VALID)) != 0
        new = cur.copy()
        m = lo == PT_OP_MAP
        new[m] = lv[m] + (lk[m].astype(np.uint64) << _U64(PTE_PFN_SHIFT))
        new[lo == PT_OP_UNMAP] = 0
        m = (lo == PT_OP_CLEAR) & valid
        new[m] = cur[m] & ~lv[m]
        m = (lo == PT_OP_SET) & valid
        new[m] = cur[m] | lv[m]
        flat[slots[have]] = new[have]

    def lookup(self, nodes, vpns):
        return pt_read(nodes, pt_walk(nodes, vpns))
