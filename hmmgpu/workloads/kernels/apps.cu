// apps.cu: UVMBench's own programs (OSU-STARLAB/UVM_benchmark: bfs/, kmeans/) as hmmgpu device
// jobs.  The NumPy twins are in hmmgpu/workloads/apps.py.

// bfs, simpleBfs: vertices of the current level relax their edges (CSR: offsets, sizes,
// adjacency); a lane that lowered a distance raises the flag.  Lane u.
__device__ void simple_bfs_lane(hmm_lane& L, hmm_u64 u, const hmm_u64* a) {
    hmm_u64 adj = a[0], off = a[1], sz = a[2], dist = a[3], parent = a[4], changed = a[5];
    int level = (int)a[7];
    if (wl_ldi(L, dist, u) != level || L.faulted) return;
    int lo = wl_ldi(L, off, u);
    int n = wl_ldi(L, sz, u);
    int change = 0;
    for (int i = lo; i < lo + n && !L.faulted; i++) {
        int v = wl_ldi(L, adj, i);
        int dv = wl_ldi(L, dist, v);
        if (level + 1 < dv) {
            wl_sti(L, dist, v, level + 1);
            wl_sti(L, parent, v, i);
            change = 1;
        }
    }
    if (change) wl_sti(L, changed, 0, 1);
}
HMM_DEFINE_JOB(simpleBfs, simple_bfs_lane)

// kmeans, get_dst: squared distance of point i to centroid j; lane (i, j)
__device__ void get_dst_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 dst = a[0], x = a[1], y = a[2], mu_x = a[3], mu_y = a[4], k = a[5];
    hmm_u64 i = lane / k, j = lane % k;
    float xi = wl_ldf(L, x, i);
    float mx = wl_ldf(L, mu_x, j);
    float yi = wl_ldf(L, y, i);
    float my = wl_ldf(L, mu_y, j);
    float dx = wl_sub(xi, mx), dy = wl_sub(yi, my);
    wl_stf(L, dst, lane, wl_add(wl_mul(dx, dx), wl_mul(dy, dy)));
}
HMM_DEFINE_JOB(get_dst, get_dst_lane)

// kmeans, regroup: point i joins its nearest centroid (1-based; the first of equals); lane i
__device__ void regroup_lane(hmm_lane& L, hmm_u64 i, const hmm_u64* a) {
    hmm_u64 group = a[0], dst = a[1], k = a[2];
    float best = wl_ldf(L, dst, i * k);
    int g = 1;
    for (hmm_u64 j = 1; j < k && !L.faulted; j++) {
        float d = wl_ldf(L, dst, i * k + j);
        if (d < best) {
            best = d;
            g = (int)j + 1;
        }
    }
    wl_sti(L, group, i, g);
}
HMM_DEFINE_JOB(regroup, regroup_lane)

// kmeans, recenter (first half): the sums and count of cluster j over one chunk of points, in
// point order; lane (chunk c, cluster j), partials [k][nchunks]
__device__ void recenter_partial_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 psx = a[0], psy = a[1], pcnt = a[2], x = a[3], y = a[4], group = a[5], k = a[6];
    hmm_u64 chunk = a[7], nchunks = a[8];
    hmm_u64 c = lane / k, j = lane % k;
    float sx = 0.0f, sy = 0.0f;
    int cnt = 0;
    for (hmm_u64 i = c * chunk; i < (c + 1) * chunk && !L.faulted; i++) {
        if (wl_ldi(L, group, i) == (int)j + 1) {
            float xv = wl_ldf(L, x, i);
            float yv = wl_ldf(L, y, i);
            sx = wl_add(sx, xv);
            sy = wl_add(sy, yv);
            cnt++;
        }
    }
    wl_stf(L, psx, j * nchunks + c, sx);
    wl_stf(L, psy, j * nchunks + c, sy);
    wl_sti(L, pcnt, j * nchunks + c, cnt);
}
HMM_DEFINE_JOB(recenter_partial, recenter_partial_lane)

// kmeans, recenter_step2: cluster j's sums over its chunks in order, and its new centroid
__device__ void recenter_step2_lane(hmm_lane& L, hmm_u64 j, const hmm_u64* a) {
    hmm_u64 psx = a[0], psy = a[1], pcnt = a[2], mu_x = a[3], mu_y = a[4], sum_x = a[5];
    hmm_u64 sum_y = a[6], nx = a[7], ny = a[8], nchunks = a[9];
    float sx = 0.0f, sy = 0.0f;
    int cnt = 0;
    for (hmm_u64 c = 0; c < nchunks && !L.faulted; c++) {
        float px = wl_ldf(L, psx, j * nchunks + c);
        float py = wl_ldf(L, psy, j * nchunks + c);
        int pc = wl_ldi(L, pcnt, j * nchunks + c);
        sx = wl_add(sx, px);
        sy = wl_add(sy, py);
        cnt += pc;
    }
    wl_stf(L, sum_x, j, sx);
    wl_stf(L, sum_y, j, sy);
    wl_sti(L, nx, j, cnt);
    wl_sti(L, ny, j, cnt);
    wl_stf(L, mu_x, j, sx / (float)cnt);
    wl_stf(L, mu_y, j, sy / (float)cnt);
}
HMM_DEFINE_JOB(recenter_step2, recenter_step2_lane)
