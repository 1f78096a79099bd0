"""The DMA (copy) engine that migrate_vma's copies go through.

Drivers hand it whole batches: destination frames and source frames as index
arrays into two arenas.  The public method validates and counts once; each
backend implements ``_copy``: both copy every run of at least ``MIN_RUN`` pages
that is consecutive on both sides as one contiguous copy (so a 2 MiB folio moves
with one copy; ``contiguous_copies`` counts them), and the scattered rest in one
step (the CuPy one with one gather/scatter kernel on a stream, returning a
CUDA-event fence; the NumPy one with vectorised gathers).
"""
import numpy as np

from ..constants import PAGE_SIZE
from .hw import DONE

MIN_RUN = 64                  # 256 KiB: a run this long is one contiguous copy on either backend


def coalesce_runs(dst_idx, src_idx):
    """Runs of a copy batch where destination and source frames both step by +1.

    Returns (starts, lengths) as int64 arrays, in batch order; one vectorised pass.
    """
    dst_idx = np.asarray(dst_idx, dtype=np.int64)
    src_idx = np.asarray(src_idx, dtype=np.int64)
    n = dst_idx.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cont = (np.diff(dst_idx) == 1) & (np.diff(src_idx) == 1)
    starts = np.flatnonzero(np.concatenate(([True], ~cont)))
    lengths = np.diff(np.concatenate((starts, [n])))
    return starts, lengths


def long_runs(dst_idx, src_idx, min_run):
    """The runs of at least ``min_run`` pages (see ``coalesce_runs``), with a fast exit when a
    batch has too few contiguous steps to hold one: the usual case for scattered pages."""
    dst_idx = np.asarray(dst_idx, dtype=np.int64)
    src_idx = np.asarray(src_idx, dtype=np.int64)
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if dst_idx.size < max(min_run, 2):
        return none
    cont = (dst_idx[1:] - dst_idx[:-1] == 1)
    cont &= (src_idx[1:] - src_idx[:-1] == 1)
    if np.count_nonzero(cont) < min_run - 1:
        return none
    starts, lengths = coalesce_runs(dst_idx, src_idx)
    keep = lengths >= min_run
    return starts[keep], lengths[keep]


class DmaEngine:
    def __init__(self, backend):
        self.backend = backend
        self.pages_copied = 0
        self.bytes_copied = 0
        self.batches = 0
        self.contiguous_copies = 0            # runs of >= MIN_RUN pages copied as one

    def copy(self, dst_arena, dst_idx, src_arena, src_idx):
        """Copy frames src_arena[src_idx] -> dst_arena[dst_idx]; returns a Fence."""
        dst_idx = np.asarray(dst_idx, dtype=np.int64)
        src_idx = np.asarray(src_idx, dtype=np.int64)
        if dst_idx.shape != src_idx.shape:
            raise ValueError(f"DMA batch mismatch: {dst_idx.size} destination vs {src_idx.size} source frames")
        if dst_idx.size == 0:
            return DONE
        self.batches += 1
        self.pages_copied += int(dst_idx.size)
        self.bytes_copied += int(dst_idx.size) * PAGE_SIZE
        return self._copy(dst_arena, dst_idx, src_arena, src_idx)

    def _copy(self, dst_arena, dst_idx, src_arena, src_idx):
        raise NotImplementedError
