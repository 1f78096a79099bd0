// The device page table's command processor and walker (encoding: hmmgpu/device/pagetable.py).
//
// The host never writes entries: it uploads command records (op | count << 8, target, value,
// first) and this kernel applies them on the device's stream, one thread per affected entry.
// A thread finds its command by binary search over `first` (the running sum of counts), so a
// contiguous run of a million pages costs one 32-byte record.  Commands in one buffer never
// depend on each other (the host queues a split's copy and its link in two buffers).
#include "hmm.cuh"

#define PT_OP_LINK 1
#define PT_OP_MAP 2
#define PT_OP_UNMAP 3
#define PT_OP_CLEAR 4
#define PT_OP_SET 5
#define PT_OP_HUGE 6
#define PT_OP_SPLIT 7

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
    if (op == PT_OP_LINK) {                // slots of tables the host allocated: links, wipes
        pt[c[1] + k] = c[2];
        return;
    }
    if (op == PT_OP_HUGE) {                // 2 MiB leaf k of a run, 512 frames further on
        hmm_u64* pmd = hmm_pt_pmd(pt, c[1] + (k << 9));
        if (pmd) *pmd = c[2] + (k << (9 + HMM_PAGE_SHIFT));
        return;
    }
    if (op == PT_OP_SPLIT) {               // entry k of the new leaf table c[2]
        hmm_u64* pmd = hmm_pt_pmd(pt, c[1]);
        hmm_u64 e = pmd ? *pmd : 0ULL;
        if (e & HMM_PTE_HUGE) pt[c[2] * HMM_PT_ENTRIES + k] = (e & ~HMM_PTE_HUGE) + (k << HMM_PAGE_SHIFT);
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
    out[i] = slot ? hmm_pte_of_page(*slot, vpns[i]) : 0ULL;
}
