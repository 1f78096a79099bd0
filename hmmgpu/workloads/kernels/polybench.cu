// polybench.cu: the PolyBench/GPU kernels of UVMBench (OSU-STARLAB/UVM_benchmark, polybench/)
// as hmmgpu device jobs.  One lane is one CUDA thread of the original: GEMM, 2DCONV and FDTD-2D
// one per output element, the matrix-vector kernels one per row or column.  A loop over a
// reduction dimension runs over [lo, hi) per launch (hmmgpu/workloads/base.py says why), its
// running value carried in the output array; operations and their order are the original's.
// Loads are sequenced into locals: C++ leaves the order of argument evaluation open, and the
// NumPy twins (hmmgpu/workloads/polybench.py) make the same accesses in the same order.

// GEMM: C = alpha * A * B + beta * C; lane (i, j); k over [k0, k1)
__device__ void gemm_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 A = a[0], B = a[1], C = a[2], nj = a[4], nk = a[5], k0 = a[6], k1 = a[7];
    float alpha = hmm_arg_f32(a[8]), beta = hmm_arg_f32(a[9]);
    hmm_u64 i = lane / nj, j = lane % nj;
    float c = wl_ldf(L, C, i * nj + j);
    if (k0 == 0) c = wl_mul(c, beta);
    for (hmm_u64 k = k0; k < k1 && !L.faulted; k++) {
        float x = wl_ldf(L, A, i * nk + k);
        float y = wl_ldf(L, B, k * nj + j);
        c = wl_add(c, wl_mul(wl_mul(alpha, x), y));
    }
    wl_stf(L, C, i * nj + j, c);
}
HMM_DEFINE_JOB(gemm_kernel, gemm_lane)

// 2DCONV: B = 3x3 stencil of A on the interior; lane (i, j)
__device__ void conv2d_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 A = a[0], B = a[1], ni = a[2], nj = a[3];
    hmm_u64 i = lane / nj, j = lane % nj;
    if (i == 0 || j == 0 || i + 1 >= ni || j + 1 >= nj) return;
    // c11 c21 c31 c12 c22 c32 c13 c23 c33, in the kernel's order of terms
    const float c[9] = {0.2f, 0.5f, -0.8f, -0.3f, 0.6f, -0.9f, 0.4f, 0.7f, 0.10f};
    float s = 0.0f;
    for (int t = 0; t < 9; t++) {
        hmm_u64 r = i + t / 3 - 1, q = j + t % 3 - 1;
        float v = wl_ldf(L, A, r * nj + q);
        s = t ? wl_add(s, wl_mul(c[t], v)) : wl_mul(c[t], v);
    }
    wl_stf(L, B, i * nj + j, s);
}
HMM_DEFINE_JOB(convolution2d_kernel, conv2d_lane)

// out[i] (+)= sum over j in [lo, hi) of M[i, j] * v[j]; lane i (a row walk); a[7]: start at 0
__device__ void mv_row_lane(hmm_lane& L, hmm_u64 i, const hmm_u64* a) {
    hmm_u64 M = a[0], v = a[1], out = a[2], ncols = a[4], lo = a[5], hi = a[6];
    float acc = (lo == 0 && a[7]) ? 0.0f : wl_ldf(L, out, i);
    for (hmm_u64 j = lo; j < hi && !L.faulted; j++) {
        float m = wl_ldf(L, M, i * ncols + j);
        float x = wl_ldf(L, v, j);
        acc = wl_add(acc, wl_mul(m, x));
    }
    wl_stf(L, out, i, acc);
}

// out[j] (+)= sum over i in [lo, hi) of M[i, j] * v[i]; lane j (a column walk)
__device__ void mv_col_lane(hmm_lane& L, hmm_u64 j, const hmm_u64* a) {
    hmm_u64 M = a[0], v = a[1], out = a[2], ncols = a[4], lo = a[5], hi = a[6];
    float acc = (lo == 0 && a[7]) ? 0.0f : wl_ldf(L, out, j);
    for (hmm_u64 i = lo; i < hi && !L.faulted; i++) {
        float m = wl_ldf(L, M, i * ncols + j);
        float x = wl_ldf(L, v, i);
        acc = wl_add(acc, wl_mul(m, x));
    }
    wl_stf(L, out, j, acc);
}
HMM_DEFINE_JOB(atax_kernel1, mv_row_lane)
HMM_DEFINE_JOB(atax_kernel2, mv_col_lane)
HMM_DEFINE_JOB(mvt_kernel1, mv_row_lane)
HMM_DEFINE_JOB(mvt_kernel2, mv_col_lane)
HMM_DEFINE_JOB(bicg_kernel1, mv_col_lane)
HMM_DEFINE_JOB(bicg_kernel2, mv_row_lane)

// GESUMMV: tmp = A x, y = B x over j in [lo, hi); the last launch makes y = alpha tmp + beta y
__device__ void gesummv_lane(hmm_lane& L, hmm_u64 i, const hmm_u64* a) {
    hmm_u64 A = a[0], B = a[1], x = a[2], y = a[3], tmp = a[4], n = a[5], lo = a[6], hi = a[7];
    float alpha = hmm_arg_f32(a[8]), beta = hmm_arg_f32(a[9]);
    float t = wl_ldf(L, tmp, i);
    float s = wl_ldf(L, y, i);
    for (hmm_u64 j = lo; j < hi && !L.faulted; j++) {
        float av = wl_ldf(L, A, i * n + j);
        float xv = wl_ldf(L, x, j);
        float bv = wl_ldf(L, B, i * n + j);
        t = wl_add(t, wl_mul(av, xv));
        s = wl_add(s, wl_mul(bv, xv));
    }
    if (hi == n) s = wl_add(wl_mul(alpha, t), wl_mul(beta, s));
    wl_stf(L, tmp, i, t);
    wl_stf(L, y, i, s);
}
HMM_DEFINE_JOB(gesummv_kernel, gesummv_lane)

// FDTD-2D, time step t: ey (rows nx+1, row 0 driven by fict[t]), ex (ny+1 columns), then hz
__device__ void fdtd_step1_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 fict = a[0], ey = a[2], hz = a[3], ny = a[5], t = a[6];
    hmm_u64 i = lane / ny, j = lane % ny;
    if (i == 0) {
        wl_stf(L, ey, j, wl_ldf(L, fict, t));
        return;
    }
    float e = wl_ldf(L, ey, i * ny + j);
    float h = wl_ldf(L, hz, i * ny + j);
    float hn = wl_ldf(L, hz, (i - 1) * ny + j);
    wl_stf(L, ey, i * ny + j, wl_sub(e, wl_mul(0.5f, wl_sub(h, hn))));
}
HMM_DEFINE_JOB(fdtd_step1_kernel, fdtd_step1_lane)

__device__ void fdtd_step2_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 ex = a[1], hz = a[3], ny = a[5];
    hmm_u64 i = lane / ny, j = lane % ny;
    if (j == 0) return;
    float e = wl_ldf(L, ex, i * (ny + 1) + j);
    float h = wl_ldf(L, hz, i * ny + j);
    float hw = wl_ldf(L, hz, i * ny + j - 1);
    wl_stf(L, ex, i * (ny + 1) + j, wl_sub(e, wl_mul(0.5f, wl_sub(h, hw))));
}
HMM_DEFINE_JOB(fdtd_step2_kernel, fdtd_step2_lane)

__device__ void fdtd_step3_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 ex = a[1], ey = a[2], hz = a[3], ny = a[5];
    hmm_u64 i = lane / ny, j = lane % ny;
    float h = wl_ldf(L, hz, i * ny + j);
    float xe = wl_ldf(L, ex, i * (ny + 1) + j + 1);
    float xw = wl_ldf(L, ex, i * (ny + 1) + j);
    float ys = wl_ldf(L, ey, (i + 1) * ny + j);
    float yn = wl_ldf(L, ey, i * ny + j);
    float d = wl_sub(wl_add(wl_sub(xe, xw), ys), yn);
    wl_stf(L, hz, i * ny + j, wl_sub(h, wl_mul(0.7f, d)));
}
HMM_DEFINE_JOB(fdtd_step3_kernel, fdtd_step3_lane)
