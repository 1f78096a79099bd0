"""The fallback DMA engine: vectorised NumPy copies, complete at once.

Every run of at least ``MIN_RUN`` pages consecutive on both sides (a 2 MiB folio, say) is one
slice assignment: one contiguous copy.  The rest is copied in chunks of ``CHUNK_PAGES`` pages: each chunk is gathered into a buffer that
stays in the CPU cache and scattered from there, so the copy reads and writes memory about once,
like a single NumPy gather, instead of twice (gather to a temporary, then scatter).  When one
side of the batch is a single run of consecutive frames (a driver's freshly allocated device
pages, usually) that side is a slice: the chunks are gathered straight into it, or the whole
batch is one scatter from it.
"""
import numpy as np

from ..device.hw import DONE
from ..device.dma import MIN_RUN, DmaEngine, long_runs

CHUNK_PAGES = 256          # 1 MiB: fits in L2


class NumpyDmaEngine(DmaEngine):
    def _copy(self, dst_arena, dst_idx, src_arena, src_idx):
        dst, src = dst_arena.frames, src_arena.frames
        starts, lengths = long_runs(dst_idx, src_idx, MIN_RUN)
        if starts.size:
            d0, s0 = dst_idx[starts].tolist(), src_idx[starts].tolist()
            for d, s, ln in zip(d0, s0, lengths.tolist()):    # one contiguous copy per long run
                dst[d:d + ln] = src[s:s + ln]
            self.contiguous_copies += int(starts.size)
            if int(lengths.sum()) == dst_idx.size:
                return DONE
            rest = np.ones(dst_idx.size, bool)
            rest[np.repeat(starts, lengths) + (np.arange(int(lengths.sum())) -
                                               np.repeat(np.cumsum(lengths) - lengths, lengths))] = False
            dst_idx, src_idx = dst_idx[rest], src_idx[rest]
        n = dst_idx.size
        if n > CHUNK_PAGES:
            if _one_run(dst_idx):
                first = int(dst_idx[0])
                for lo in range(0, n, CHUNK_PAGES):      # gathered a chunk at a time, in cache
                    hi = min(lo + CHUNK_PAGES, n)
                    dst[first + lo:first + hi] = src[src_idx[lo:hi]]
                return DONE
            if _one_run(src_idx):
                first = int(src_idx[0])
                dst[dst_idx] = src[first:first + n]
                return DONE
        if n <= CHUNK_PAGES:
            dst[dst_idx] = src[src_idx]
            return DONE
        for lo in range(0, n, CHUNK_PAGES):              # one iteration per 1 MiB chunk
            hi = lo + CHUNK_PAGES
            dst[dst_idx[lo:hi]] = src[src_idx[lo:hi]]
        return DONE


def _one_run(idx):
    """Are ``idx`` consecutive ascending frames?"""
    return int(idx[-1]) - int(idx[0]) == idx.size - 1 and not np.count_nonzero(np.diff(idx) != 1)
