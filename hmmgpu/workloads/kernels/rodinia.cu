// rodinia.cu: the Rodinia kernels of UVMBench (OSU-STARLAB/UVM_benchmark, rodinia/) as hmmgpu
// device jobs: hotspot, pathfinder, srad (v1) and backprop.  One lane is one CUDA thread of the
// original; what the originals stage through __shared__ memory a lane loads itself (a lane has
// no block to share with), so hotspot and pathfinder run one time step per launch (a pyramid of
// height 1).  Border cells clamp to the edge, as the originals' valid-range checks do.  The
// NumPy twins are in hmmgpu/workloads/rodinia.py.

// hotspot: one step of the thermal stencil, src -> dst; lane (r, c)
__device__ void hotspot_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 power = a[0], src = a[1], dst = a[2], rows = a[3], cols = a[4];
    float sdc = hmm_arg_f32(a[5]), rx1 = hmm_arg_f32(a[6]), ry1 = hmm_arg_f32(a[7]);
    float rz1 = hmm_arg_f32(a[8]), amb = hmm_arg_f32(a[9]);
    hmm_u64 r = lane / cols, c = lane % cols;
    hmm_u64 n = r ? r - 1 : r, s = r + 1 < rows ? r + 1 : r;
    hmm_u64 w = c ? c - 1 : c, e = c + 1 < cols ? c + 1 : c;
    float t = wl_ldf(L, src, r * cols + c);
    float p = wl_ldf(L, power, r * cols + c);
    float ts = wl_ldf(L, src, s * cols + c);
    float tn = wl_ldf(L, src, n * cols + c);
    float te = wl_ldf(L, src, r * cols + e);
    float tw = wl_ldf(L, src, r * cols + w);
    float t2 = wl_mul(2.0f, t);
    float v = wl_add(p, wl_mul(wl_sub(wl_add(ts, tn), t2), ry1));
    v = wl_add(v, wl_mul(wl_sub(wl_add(te, tw), t2), rx1));
    v = wl_add(v, wl_mul(wl_sub(amb, t), rz1));
    wl_stf(L, dst, r * cols + c, wl_add(t, wl_mul(sdc, v)));
}
HMM_DEFINE_JOB(calculate_temp, hotspot_lane)

// pathfinder: one row of the dynamic program, src -> dst; lane x
__device__ void pathfinder_lane(hmm_lane& L, hmm_u64 x, const hmm_u64* a) {
    hmm_u64 wall = a[0], src = a[1], dst = a[2], cols = a[3], row = a[4];
    hmm_u64 w = x ? x - 1 : x, e = x + 1 < cols ? x + 1 : x;
    int up = wl_ldi(L, src, x);
    int left = wl_ldi(L, src, w);
    int right = wl_ldi(L, src, e);
    int shortest = left <= up ? left : up;
    shortest = shortest <= right ? shortest : right;
    wl_sti(L, dst, x, shortest + wl_ldi(L, wall, row * cols + x));
}
HMM_DEFINE_JOB(dynproc_kernel, pathfinder_lane)

// srad_cuda_1: directional derivatives of J and the diffusion coefficient C; lane (i, j)
__device__ void srad1_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 J = a[0], C = a[1], E = a[2], W = a[3], N = a[4], S = a[5], rows = a[6], cols = a[7];
    float q0sqr = hmm_arg_f32(a[8]);
    hmm_u64 i = lane / cols, j = lane % cols, k = i * cols + j;
    hmm_u64 in = i ? i - 1 : i, is = i + 1 < rows ? i + 1 : i;
    hmm_u64 jw = j ? j - 1 : j, je = j + 1 < cols ? j + 1 : j;
    float jc = wl_ldf(L, J, k);
    float dn = wl_sub(wl_ldf(L, J, in * cols + j), jc);
    float ds = wl_sub(wl_ldf(L, J, is * cols + j), jc);
    float dw = wl_sub(wl_ldf(L, J, i * cols + jw), jc);
    float de = wl_sub(wl_ldf(L, J, i * cols + je), jc);
    float g2 = wl_add(wl_add(wl_add(wl_mul(dn, dn), wl_mul(ds, ds)), wl_mul(dw, dw)), wl_mul(de, de));
    g2 = g2 / wl_mul(jc, jc);
    float l = wl_add(wl_add(wl_add(dn, ds), dw), de) / jc;
    float num = wl_sub(wl_mul(0.5f, g2), wl_mul(0.0625f, wl_mul(l, l)));
    float den = wl_add(1.0f, wl_mul(0.25f, l));
    float qsqr = num / wl_mul(den, den);
    den = wl_sub(qsqr, q0sqr) / wl_mul(q0sqr, wl_add(1.0f, q0sqr));
    float c = 1.0f / wl_add(1.0f, den);
    c = c < 0.0f ? 0.0f : (c > 1.0f ? 1.0f : c);
    wl_stf(L, C, k, c);
    wl_stf(L, E, k, de);
    wl_stf(L, W, k, dw);
    wl_stf(L, S, k, ds);
    wl_stf(L, N, k, dn);
}
HMM_DEFINE_JOB(srad_cuda_1, srad1_lane)

// srad_cuda_2: the divergence and the image update J += (lambda / 4) D; lane (i, j)
__device__ void srad2_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 J = a[0], C = a[1], E = a[2], W = a[3], N = a[4], S = a[5], rows = a[6], cols = a[7];
    float q = hmm_arg_f32(a[8]);
    hmm_u64 i = lane / cols, j = lane % cols, k = i * cols + j;
    hmm_u64 is = i + 1 < rows ? i + 1 : i, je = j + 1 < cols ? j + 1 : j;
    float jv = wl_ldf(L, J, k);
    float cc = wl_ldf(L, C, k);
    float cs = wl_ldf(L, C, is * cols + j);
    float ce = wl_ldf(L, C, i * cols + je);
    float nv = wl_ldf(L, N, k);
    float sv = wl_ldf(L, S, k);
    float wv = wl_ldf(L, W, k);
    float ev = wl_ldf(L, E, k);
    float d = wl_add(wl_add(wl_add(wl_mul(cc, nv), wl_mul(cs, sv)), wl_mul(cc, wv)), wl_mul(ce, ev));
    wl_stf(L, J, k, wl_add(jv, wl_mul(q, d)));
}
HMM_DEFINE_JOB(srad_cuda_2, srad2_lane)

// backprop, bpnn_layerforward_CUDA: the partial sum of 16 input rows for hidden unit j, in the
// original's tree order; lane (block by, j)
__device__ void layerforward_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 input = a[0], w = a[1], partial = a[2], hid = a[3];
    hmm_u64 by = lane / hid, j = lane % hid;
    float v[16];
    for (int ty = 0; ty < 16; ty++) {
        hmm_u64 row = 16 * by + ty + 1;
        float x = wl_ldf(L, input, row);
        float m = wl_ldf(L, w, row * (hid + 1) + j + 1);
        v[ty] = wl_mul(m, x);
    }
    for (int p = 1; p < 16; p *= 2)
        for (int ty = 0; ty < 16; ty += 2 * p) v[ty] = wl_add(v[ty], v[ty + p]);
    wl_stf(L, partial, by * hid + j, v[0]);
}
HMM_DEFINE_JOB(bpnn_layerforward_CUDA, layerforward_lane)

// backprop, bpnn_adjust_weights_cuda: w += eta delta ly + momentum oldw, oldw = that change;
// lane (block by, row ty, unit tx); the lanes of row 0 of block 0 also adjust the bias row
__device__ void adjust_weights_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 delta = a[0], ly = a[1], w = a[2], oldw = a[3], hid = a[4];
    float eta = hmm_arg_f32(a[5]), momentum = hmm_arg_f32(a[6]);
    hmm_u64 by = lane / (16 * hid), ty = lane / hid % 16, tx = lane % hid;
    hmm_u64 ix = tx + 1, iy = 16 * by + ty + 1, index = (hid + 1) * iy + ix;
    float d = wl_ldf(L, delta, ix);
    float y = wl_ldf(L, ly, iy);
    float o = wl_ldf(L, oldw, index);
    float wv = wl_ldf(L, w, index);
    float nd = wl_add(wl_mul(wl_mul(eta, d), y), wl_mul(momentum, o));
    wl_stf(L, w, index, wl_add(wv, nd));
    wl_stf(L, oldw, index, nd);
    if (ty == 0 && by == 0) {
        float o0 = wl_ldf(L, oldw, ix);
        float w0 = wl_ldf(L, w, ix);
        float nd0 = wl_add(wl_mul(eta, d), wl_mul(momentum, o0));
        wl_stf(L, w, ix, wl_add(w0, nd0));
        wl_stf(L, oldw, ix, nd0);
    }
}
HMM_DEFINE_JOB(bpnn_adjust_weights_cuda, adjust_weights_lane)
