"""The fallback DMA engine: vectorised NumPy copies, complete at once.

A batch is copied in chunks of ``CHUNK_PAGES`` pages: each chunk is gathered into a buffer that
stays in the CPU cache and scattered from there, so the copy reads and writes memory about once,
like a single NumPy gather, instead of twice (gather to a temporary, then scatter).
"""
from ..device.hw import DONE
from ..device.dma import DmaEngine

CHUNK_PAGES = 256          # 1 MiB: fits in L2


class NumpyDmaEngine(DmaEngine):
    def _copy(self, dst_arena, dst_idx, src_arena, src_idx):
        dst, src = dst_arena.frames, src_arena.frames
        n = dst_idx.size
        if n <= CHUNK_PAGES:
            dst[dst_idx] = src[src_idx]
            return DONE
        for lo in range(0, n, CHUNK_PAGES):              # one iteration per 1 MiB chunk
            hi = lo + CHUNK_PAGES
            dst[dst_idx[lo:hi]] = src[src_idx[lo:hi]]
        return DONE
