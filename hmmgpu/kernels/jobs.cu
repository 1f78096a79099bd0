// Built-in device jobs.  Each has a NumPy twin in hmmgpu/fallback/jobs.py with the same results,
// byte for byte: same faults (as a set), same memory, same ACCESSED/DIRTY bits.
//
// Bulk jobs (memset, copy, axpy, reduce): a lane is one 4 KiB chunk of the operands (chunk i
// covers bytes [4096 i, 4096 i + 4096) from each operand's start) and one warp runs it.
// Operands are 16-byte aligned, so a 16-byte unit never crosses a page and a chunk touches at
// most two pages per operand.  The warp first translates every page the lane will touch, one
// thread per (operand, page), records a fault for each page that fails, and stops if any did:
// all faults of a lane are reported in one go, and nothing is written before all pages are in.
//
// Pointer jobs (gather, list chase, tree search): one thread per lane through hmm_lane, stopping
// at the first fault.  The chases keep their progress (current node, sum, depth) in lane-private
// scratch, so a replay resumes where the lane stopped, like a replayed GPU instruction.
#include "hmm.cuh"

#define BULK_UNITS 256          // 16-byte units per 4 KiB lane

__device__ __forceinline__ hmm_u64 bulk_units(hmm_u64 lane, hmm_u64 nunits) {
    hmm_u64 u0 = lane * BULK_UNITS;
    hmm_u64 left = nunits - u0;
    return left < BULK_UNITS ? left : BULK_UNITS;
}

// Translate the pages of up to NOPS operands for one lane (a warp).  Thread 2j handles the
// first page of operand j, thread 2j+1 its second page when the chunk crosses a page boundary;
// frameA / frameB receive the frames (hmm_frame) of each operand's two pages.
template <int NOPS>
__device__ __forceinline__ bool bulk_translate(const hmm_job_params& P, hmm_u64* pt, hmm_u64 lane,
                                               hmm_u64 nu, const hmm_u64 (&base)[NOPS],
                                               const int (&access)[NOPS], hmm_u64 (&frameA)[NOPS],
                                               hmm_u64 (&frameB)[NOPS], int t) {
    bool ok = true;
    hmm_u64 mine = 0;
    if (t < 2 * NOPS) {
        static_assert(NOPS == 1 || NOPS == 2, "bulk jobs have one or two operands");
        // a select, not base[t >> 1]: an indexed operand array would live in local memory
        bool op1 = NOPS == 2 && (t >> 1) == 1;
        hmm_u64 b = op1 ? base[NOPS - 1] : base[0];
        int acc = op1 ? access[NOPS - 1] : access[0];
        hmm_u64 first = b + lane * HMM_PAGE_SIZE;
        hmm_u64 vA = first >> HMM_PAGE_SHIFT;
        hmm_u64 vB = (first + nu * 16 - 1) >> HMM_PAGE_SHIFT;
        bool second = t & 1;
        if (!second || vB != vA) {
            hmm_u64 vpn = second ? vB : vA;
            hmm_u64 va = second ? (vB << HMM_PAGE_SHIFT) : first;
            hmm_u64 e;
            if (!hmm_translate(pt, vpn, acc, &e)) {
                ok = false;
                hmm_fault_record(P, va, (hmm_u64)acc, lane);
            } else if (!(mine = (hmm_u64)hmm_frame(P, e))) {
                ok = false;
                hmm_fault_record(P, va, hmm_fatal(acc, HMM_FATAL_BAD_PFN, 16), lane);
            }
        }
    }
    unsigned bad = __ballot_sync(0xffffffffu, !ok);
#pragma unroll
    for (int j = 0; j < NOPS; j++) {
        frameA[j] = __shfl_sync(0xffffffffu, mine, 2 * j);
        frameB[j] = __shfl_sync(0xffffffffu, mine, 2 * j + 1);
    }
    return bad == 0;
}

// Physical address of unit k of an operand at ``base`` whose lane's two pages are in frameA and
// frameB: a lane starts at base + 4096 lane, so its unit k lies off = base % 4096 + 16 k bytes
// into the first page, or in the second once off passes 4096.  (32-bit arithmetic, no address
// held per unit: as cheap in registers as the pte-based form was -- axpy 55, copy 60, sm_90.)
__device__ __forceinline__ hmm_u8* bulk_unit(hmm_u64 base, hmm_u64 k, hmm_u64 frameA, hmm_u64 frameB) {
    hmm_u32 off = (hmm_u32)(base & HMM_PAGE_MASK) + (hmm_u32)k * 16;
    return (hmm_u8*)(off < HMM_PAGE_SIZE ? frameA : frameB) + (off & HMM_PAGE_MASK);
}

#define BULK_PROLOGUE(NOPS)                                                             \
    HMM_JOB_PARAMS_INIT(P);                                                             \
    hmm_u64 w = ((hmm_u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;                  \
    int t = threadIdx.x & 31;                                                           \
    if (w >= nlanes) return; /* warp-uniform */                                         \
    hmm_u64 lane = hmm_lane_index(lanes, lane_base, w);                                 \
    hmm_u64 nu = bulk_units(lane, args[2]);                                             \
    hmm_u64 frameA[NOPS], frameB[NOPS];

#define BULK_FAULTED()                                                                  \
    {                                                                                   \
        if (t == 0) P.lane_state[lane] = HMM_LANE_FAULTED;                              \
        return;                                                                         \
    }

// memset: args = {dst, byte value, nunits}
extern "C" __global__ void job_memset(HMM_JOB_PARAMS) {
    BULK_PROLOGUE(1)
    const hmm_u64 base[1] = {args[0]};
    const int acc[1] = {HMM_ACCESS_WRITE};
    if (!bulk_translate<1>(P, pt, lane, nu, base, acc, frameA, frameB, t)) BULK_FAULTED();
    hmm_u32 b = (hmm_u32)(args[1] & 0xff) * 0x01010101u;
    uint4 v = make_uint4(b, b, b, b);
#pragma unroll
    for (int it = 0; it < 8; it++) {
        hmm_u64 k = it * 32 + t;
        if (k < nu) *(uint4*)bulk_unit(base[0], k, frameA[0], frameB[0]) = v;
    }
    if (t == 0) P.lane_state[lane] = HMM_LANE_DONE;
}

// copy (non-overlapping, like memcpy): args = {dst, src, nunits}
extern "C" __global__ void job_copy(HMM_JOB_PARAMS) {
    BULK_PROLOGUE(2)
    const hmm_u64 base[2] = {args[0], args[1]};
    const int acc[2] = {HMM_ACCESS_WRITE, HMM_ACCESS_READ};
    if (!bulk_translate<2>(P, pt, lane, nu, base, acc, frameA, frameB, t)) BULK_FAULTED();
    uint4 v[8];
#pragma unroll
    for (int it = 0; it < 8; it++) {
        hmm_u64 k = it * 32 + t;
        if (k < nu) v[it] = *(const uint4*)bulk_unit(base[1], k, frameA[1], frameB[1]);
    }
#pragma unroll
    for (int it = 0; it < 8; it++) {
        hmm_u64 k = it * 32 + t;
        if (k < nu) *(uint4*)bulk_unit(base[0], k, frameA[0], frameB[0]) = v[it];
    }
    if (t == 0) P.lane_state[lane] = HMM_LANE_DONE;
}

// axpy on float32: y = a * x + y, rounded twice (no FMA) like NumPy.  args = {x, y, nunits, a}
// Two passes of four units per thread, eight 16-byte loads in flight in each: one pass over all
// eight units needed 89 registers (25% occupancy on Hopper), two need 56 (50%; NVRTC 12.9, sm_90).
extern "C" __global__ void job_axpy(HMM_JOB_PARAMS) {
    BULK_PROLOGUE(2)
    const hmm_u64 base[2] = {args[0], args[1]};
    const int acc[2] = {HMM_ACCESS_READ, HMM_ACCESS_WRITE};
    if (!bulk_translate<2>(P, pt, lane, nu, base, acc, frameA, frameB, t)) BULK_FAULTED();
    float a = hmm_arg_f32(args[3]);
#pragma unroll
    for (int half = 0; half < 2; half++) {
        float4 x[4], y[4];
#pragma unroll
        for (int it = 0; it < 4; it++) {
            hmm_u64 k = (half * 4 + it) * 32 + t;
            if (k < nu) {
                x[it] = *(const float4*)bulk_unit(base[0], k, frameA[0], frameB[0]);
                y[it] = *(const float4*)bulk_unit(base[1], k, frameA[1], frameB[1]);
            }
        }
#pragma unroll
        for (int it = 0; it < 4; it++) {
            hmm_u64 k = (half * 4 + it) * 32 + t;
            if (k < nu) {
                float4 r;
                r.x = __fadd_rn(__fmul_rn(a, x[it].x), y[it].x);
                r.y = __fadd_rn(__fmul_rn(a, x[it].y), y[it].y);
                r.z = __fadd_rn(__fmul_rn(a, x[it].z), y[it].z);
                r.w = __fadd_rn(__fmul_rn(a, x[it].w), y[it].w);
                *(float4*)bulk_unit(base[1], k, frameA[1], frameB[1]) = r;
            }
        }
    }
    if (t == 0) P.lane_state[lane] = HMM_LANE_DONE;
}

__device__ __forceinline__ hmm_u64 warp_sum(hmm_u64 s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    return s;
}

__device__ __forceinline__ hmm_u64 sum_words(uint4 v) {
    return (hmm_u64)v.x + (hmm_u64)v.y + (hmm_u64)v.z + (hmm_u64)v.w;
}

// reduce: the sum of the uint32 words, modulo 2^64 (exact, so any order gives the same bytes).
// args = {src, unused, nunits, partials}; partials[lane] receives the lane's sum.
extern "C" __global__ void job_reduce(HMM_JOB_PARAMS) {
    BULK_PROLOGUE(1)
    const hmm_u64 base[1] = {args[0]};
    const int acc[1] = {HMM_ACCESS_READ};
    if (!bulk_translate<1>(P, pt, lane, nu, base, acc, frameA, frameB, t)) BULK_FAULTED();
    uint4 v[8];
#pragma unroll
    for (int it = 0; it < 8; it++) {
        hmm_u64 k = it * 32 + t;
        v[it] = k < nu ? *(const uint4*)bulk_unit(base[0], k, frameA[0], frameB[0])
                       : make_uint4(0, 0, 0, 0);
    }
    hmm_u64 s = 0;
#pragma unroll
    for (int it = 0; it < 8; it++) s += sum_words(v[it]);
    s = warp_sum(s);
    if (t == 0) {
        ((hmm_u64*)args[3])[lane] = s;
        P.lane_state[lane] = HMM_LANE_DONE;
    }
}

// The same reduce with no MMU: the baseline a benchmark compares the translated job with
// (a flat array in device memory, or zero-copy reads of mapped host memory).
extern "C" __global__ void job_reduce_flat(const uint4* src, hmm_u64 nunits, hmm_u64 nlanes,
                                           hmm_u64* partials) {
    hmm_u64 lane = ((hmm_u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int t = threadIdx.x & 31;
    if (lane >= nlanes) return;
    hmm_u64 nu = bulk_units(lane, nunits);
    const uint4* s0 = src + lane * BULK_UNITS;
    uint4 v[8];
#pragma unroll
    for (int it = 0; it < 8; it++) {
        hmm_u64 k = it * 32 + t;
        v[it] = k < nu ? s0[k] : make_uint4(0, 0, 0, 0);
    }
    hmm_u64 s = 0;
#pragma unroll
    for (int it = 0; it < 8; it++) s += sum_words(v[it]);
    s = warp_sum(s);
    if (t == 0) partials[lane] = s;
}

// gather: dst[i] = src[idx[i]] on uint32 elements, idx int64; args = {dst, src, idx}.
// The store's page is probed before the src load so a lane never writes and then faults.
__device__ void gather_lane(hmm_lane& L, hmm_u64 i, const hmm_u64* a) {
    hmm_i64 j = hmm_load<hmm_i64>(L, a[2] + 8 * i);
    hmm_probe(L, a[0] + 4 * i, HMM_ACCESS_WRITE);
    hmm_u32 v = hmm_load<hmm_u32>(L, a[1] + 4 * (hmm_u64)j);
    hmm_store<hmm_u32>(L, a[0] + 4 * i, v);
}

// list chase: nodes {u64 next; u64 value} built by the CPU with ordinary pointers.
// args = {cur[], sum[], steps[], max_steps}: lane-private state, so a replay resumes.
__device__ void list_lane(hmm_lane& L, hmm_u64 i, const hmm_u64* a) {
    hmm_u64* cur = (hmm_u64*)a[0];
    hmm_u64* sum = (hmm_u64*)a[1];
    hmm_u64* steps = (hmm_u64*)a[2];
    hmm_u64 p = cur[i], s = sum[i], n = steps[i];
    while (p && n < a[3]) {
        hmm_u64 next = hmm_load<hmm_u64>(L, p);
        hmm_u64 v = hmm_load<hmm_u64>(L, p + 8);
        if (L.faulted) break;
        s += v;
        n++;
        p = next;
    }
    cur[i] = p;
    sum[i] = s;
    steps[i] = n;
}

// tree search in a binary search tree: nodes {u64 left; u64 right; u64 key; u64 value}.
// args = {cur[], depth[], result[], keys[], max_depth}; result stays ~0 when the key is absent.
__device__ void tree_lane(hmm_lane& L, hmm_u64 i, const hmm_u64* a) {
    hmm_u64* cur = (hmm_u64*)a[0];
    hmm_u64* depth = (hmm_u64*)a[1];
    hmm_u64* result = (hmm_u64*)a[2];
    hmm_u64 key = ((const hmm_u64*)a[3])[i];
    hmm_u64 p = cur[i], d = depth[i], r = result[i];
    while (p && d < a[4]) {
        hmm_u64 k = hmm_load<hmm_u64>(L, p + 16);
        if (L.faulted) break;
        // the node is 32-byte aligned: its other fields are on the same page, no fault possible
        hmm_u64 v = hmm_load<hmm_u64>(L, p + 24);
        hmm_u64 left = hmm_load<hmm_u64>(L, p);
        hmm_u64 right = hmm_load<hmm_u64>(L, p + 8);
        d++;
        if (k == key) {
            r = v;
            p = 0;
            break;
        }
        p = key < k ? left : right;
    }
    cur[i] = p;
    depth[i] = d;
    result[i] = r;
}

extern "C" __global__ void job_gather(HMM_JOB_PARAMS) {
    HMM_JOB_PARAMS_INIT(P);
    hmm_run_lanes<gather_lane, false>(P, pt, lanes, lane_base, nlanes, args, args);
}

extern "C" __global__ void job_list_chase(HMM_JOB_PARAMS) {
    HMM_JOB_PARAMS_INIT(P);
    hmm_run_lanes<list_lane, false>(P, pt, lanes, lane_base, nlanes, args, args);
}

extern "C" __global__ void job_tree_search(HMM_JOB_PARAMS) {
    HMM_JOB_PARAMS_INIT(P);
    hmm_run_lanes<tree_lane, false>(P, pt, lanes, lane_base, nlanes, args, args);
}
