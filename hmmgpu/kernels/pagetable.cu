// The device page table's command processor and walker (encoding: hmmgpu/device/pagetable.py).
//
// The host never writes entries: it uploads command records (op | count << 8, target, value,
// first) and this kernel applies them on the device's stream, one thread per affected entry.
// A thread finds its command by binary search over `first` (the running sum of counts), so a
// contiguous run of a million pages costs one 32-byte record.
#include "hmm.cuh"

#define PT_OP_LINK 1
#define PT_OP_MAP 2
#define PT_OP_UNMAP 3
#define PT_OP_CLEAR 4
#define PT_OP_SET 5

extern "C" __global__ void pt_execute(hmm_u64* pt, const hmm_u64* cmds, hmm_u64 ncmds, hmm_u64 total) {
    hmm_u64 t = (hmm_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    hmm_u64 lo = 0, hi = ncmds;            // last command with first <= t
    while (hi - lo > 1) {
        hmm_u64 mid = (lo + hi) >> 1;
        if (cmds[mid * 4 + 3] <= t) lo = mid; else hi = mid;
    }
    const hmm_u64* c = cmds + lo * 4;
    int op = (int)(c[0] & 0xff);
    hmm_u64 k = t - c[3];
    if (op == PT_OP_LINK) {                // directory entries were allocated by the host
        pt[c[1]] = c[2];
        return;
    }
    hmm_u64* slot = hmm_pt_walk(pt, c[1] + k);
    if (!slot) return;                     // no table: nothing to unmap or protect
    hmm_u64 e = *slot;
    switch (op) {
    case PT_OP_MAP: *slot = c[2] + (k << HMM_PAGE_SHIFT); break;
    case PT_OP_UNMAP: *slot = 0; break;
    case PT_OP_CLEAR: if (e & HMM_PTE_VALID) *slot = e & ~c[2]; break;
    case PT_OP_SET: if (e & HMM_PTE_VALID) *slot = e | c[2]; break;
    }
}

extern "C" __global__ void pt_lookup(hmm_u64* pt, const hmm_u64* vpns, hmm_u64 n, hmm_u64* out) {
    hmm_u64 i = (hmm_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    hmm_u64* slot = hmm_pt_walk(pt, vpns[i]);
    out[i] = slot ? *slot : 0ULL;
}
