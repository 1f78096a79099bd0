// patterns.cu: the three read kernels of NVIDIA's unified-memory oversubscription sample
// (NVIDIA-developer-blog/code-samples, posts/unified-memory-oversubscription/uvm_oversubs.cu)
// as hmmgpu device jobs.  One lane is one thread of the sample's grid; a thread's loop runs over
// iterations [s0, s1) per launch, its running sum (and random_warp's generator state) carried in
// per-thread arrays between launches.  Sums are uint32, wrapping.  NumPy twins:
// hmmgpu/workloads/patterns.py.

// streaming (read_thread_blocksync): the grid sweeps the array, thread t reading t + s * T
__device__ void streaming_lane(hmm_lane& L, hmm_u64 t, const hmm_u64* a) {
    hmm_u64 data = a[0], acc = a[1], n = a[3], T = a[4], s0 = a[5], s1 = a[6];
    hmm_u32 sum = s0 ? wl_ldu(L, acc, t) : 0u;
    for (hmm_u64 s = s0; s < s1 && !L.faulted; s++) {
        hmm_u64 idx = t + s * T;
        if (idx < n) sum += wl_ldu(L, data, idx);
    }
    wl_stu(L, acc, t, sum);
}
HMM_DEFINE_JOB(read_thread_blocksync, streaming_lane)

// block_streaming (read_thread_blockCont_blocksync): block b reads its own contiguous share of
// E = ceil(n / G) + 1 elements, its B threads striding by B; like the sample's loop, the last
// iteration may read up to B - 1 elements past the share
__device__ void block_streaming_lane(hmm_lane& L, hmm_u64 t, const hmm_u64* a) {
    hmm_u64 data = a[0], acc = a[1], n = a[3], B = a[4], E = a[5], s0 = a[6], s1 = a[7];
    hmm_u64 start = (t / B) * E + t % B;
    hmm_u32 sum = s0 ? wl_ldu(L, acc, t) : 0u;
    for (hmm_u64 k = s0; k < s1 && !L.faulted; k++) {
        hmm_u64 idx = start + k * B;
        if (idx < n) sum += wl_ldu(L, data, idx);
    }
    wl_stu(L, acc, t, sum);
}
HMM_DEFINE_JOB(read_thread_blockCont_blocksync, block_streaming_lane)

// glibc's LCG, as the sample's myrand: x' = (1103515245 x + 12345) mod 2^31
__device__ __forceinline__ hmm_u64 wl_myrand(hmm_u64 x) {
    return (1103515245ULL * x + 12345ULL) % (1ULL << 31);
}

// random_warp (cta_random_warp_streaming_read): each iteration a warp picks a random page of
// page_size bytes (lane 0's generator, seeded with its thread index) and its 32 lanes read 32
// consecutive words at a random offset in it
__device__ void random_warp_lane(hmm_lane& L, hmm_u64 t, const hmm_u64* a) {
    hmm_u64 data = a[0], acc = a[1], state = a[2], num_pages = a[4], dpp = a[5];
    hmm_u64 s0 = a[6], s1 = a[7];
    hmm_u64 lane = t & 31;
    hmm_u32 sum = s0 ? wl_ldu(L, acc, t) : 0u;
    hmm_u64 r = s0 ? hmm_load<hmm_u64>(L, state + 8 * t) : wl_myrand(t - lane);
    for (hmm_u64 i = s0; i < s1 && !L.faulted; i++) {
        r = wl_myrand(r);
        hmm_u64 page = r % num_pages, off = r % (dpp - 32);
        sum += wl_ldu(L, data, page * dpp + off + lane);
    }
    wl_stu(L, acc, t, sum);
    hmm_store<hmm_u64>(L, state + 8 * t, r);
}
HMM_DEFINE_JOB(cta_random_warp_streaming_read, random_warp_lane)
