// replay.cu: trace replay (hmmgpu/workloads/replay.py).  Lane i makes access i of the batch, whose
// address and kind sit in lane-private arrays (so reading the trace itself touches no traced
// page): a read loads the 8-byte word at the address into out[i]; a write stores a stamp of the
// address into the first word of its 16-byte pair; an atomic adds 1 to the pair's second word.

__device__ __forceinline__ hmm_u64 wl_stamp(hmm_u64 w) { return w * 0x9E3779B97F4A7C15ULL + 1ULL; }

__device__ void replay_lane(hmm_lane& L, hmm_u64 i, const hmm_u64* a) {
    const hmm_u64* vaddr = (const hmm_u64*)a[0];
    const hmm_u64* kind = (const hmm_u64*)a[1];
    hmm_u64* out = (hmm_u64*)a[2];
    hmm_u64 v = vaddr[i], k = kind[i];
    if (k == 0) {
        out[i] = hmm_load<hmm_u64>(L, v & ~7ULL);
    } else if (k == 1) {
        hmm_store<hmm_u64>(L, v & ~15ULL, wl_stamp(v & ~15ULL));
    } else {
        hmm_atomic_add<unsigned long long>(L, (v & ~15ULL) + 8, 1ULL);
    }
}
HMM_DEFINE_JOB(trace_replay, replay_lane)
