// workloads.cuh: what the workload kernels (hmmgpu/workloads/kernels/*.cu) share.
//
// hmmgpu/workloads/base.py's kernel_jobs puts this text in front of each kernel file (after
// hmm.cuh, which the module loader includes).  Float arithmetic goes through wl_add / wl_sub /
// wl_mul: one IEEE rounding each, never contracted into an FMA (nvcc contracts a*b+c by
// default), so a lane computes bit for bit what its NumPy twin computes with float32
// operations in the same order.  Division is plain `/`, IEEE round-to-nearest under CUDA's
// default -prec-div=true.

__device__ __forceinline__ float wl_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float wl_sub(float a, float b) { return __fadd_rn(a, -b); }
__device__ __forceinline__ float wl_mul(float a, float b) { return __fmul_rn(a, b); }

// element i of a float / int / uint array at virtual address base, through the MMU
__device__ __forceinline__ float wl_ldf(hmm_lane& L, hmm_u64 base, hmm_u64 i) {
    return hmm_load<float>(L, base + 4 * i);
}
__device__ __forceinline__ void wl_stf(hmm_lane& L, hmm_u64 base, hmm_u64 i, float v) {
    hmm_store<float>(L, base + 4 * i, v);
}
__device__ __forceinline__ int wl_ldi(hmm_lane& L, hmm_u64 base, hmm_u64 i) {
    return hmm_load<int>(L, base + 4 * i);
}
__device__ __forceinline__ void wl_sti(hmm_lane& L, hmm_u64 base, hmm_u64 i, int v) {
    hmm_store<int>(L, base + 4 * i, v);
}
__device__ __forceinline__ hmm_u32 wl_ldu(hmm_lane& L, hmm_u64 base, hmm_u64 i) {
    return hmm_load<hmm_u32>(L, base + 4 * i);
}
__device__ __forceinline__ void wl_stu(hmm_lane& L, hmm_u64 base, hmm_u64 i, hmm_u32 v) {
    hmm_store<hmm_u32>(L, base + 4 * i, v);
}
