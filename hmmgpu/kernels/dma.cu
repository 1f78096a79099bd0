// The copy engine's scatter/gather kernel: whole 4 KiB pages between two frame arrays.
//
// Either side may be system RAM (pinned, mapped host memory: the kernel reads or writes it over
// PCIe with no staging copy) or device memory.  One warp moves one page; each thread issues its
// eight 16-byte loads before its first store, because over PCIe it is the loads in flight, not
// the number of threads, that hide the latency.
#include "hmm.cuh"

extern "C" __global__ void dma_copy_pages(hmm_u8* dst, const hmm_u8* src, const hmm_i64* dst_idx,
                                          const hmm_i64* src_idx, hmm_u64 n) {
    hmm_u64 w = ((hmm_u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int t = threadIdx.x & 31;
    if (w >= n) return;
    const uint4* s = (const uint4*)(src + ((hmm_u64)src_idx[w] << HMM_PAGE_SHIFT));
    uint4* d = (uint4*)(dst + ((hmm_u64)dst_idx[w] << HMM_PAGE_SHIFT));
    uint4 v[8];
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = s[i * 32 + t];
#pragma unroll
    for (int i = 0; i < 8; i++) d[i * 32 + t] = v[i];
}
