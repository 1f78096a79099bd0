// hmm.cuh: the device side of hmmgpu's emulated GPU MMU, for built-in and user jobs.
//
// A job is a kernel over many lanes.  Every access a lane makes goes through the device page
// table (hmmgpu/device/pagetable.py documents the encoding): a 4-level radix tree in device
// memory, root at node 0, whose level-2 entries may be 2 MiB leaves (PTE_HUGE).  A miss, a store to a read-only page or an atomic on a page without
// PTE_ATOMIC appends a record to the fault buffer, marks the lane FAULTED and makes the lane's
// later accesses no-ops (loads return 0), so the lane stops without touching memory.  The host
// services the faults and replays only the FAULTED lanes.
//
// Writing a user job:
//
//     #include "hmm.cuh"            // hmmgpu adds this include itself
//     __device__ void scale_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* args) {
//         hmm_u64 x = args[0], y = args[1];
//         float a = hmm_arg_f32(args[2]);
//         float v = hmm_load<float>(L, x + 4 * lane);
//         hmm_store<float>(L, y + 4 * lane, a * v);
//     }
//     HMM_DEFINE_JOB(scale, scale_lane)
//
// HMM_DEFINE_JOB runs each lane twice (the probe/commit contract of hmmgpu.device.UserJob):
// a probe pass -- loads happen, stores and atomics only translate, and `args` points at a copy
// of the job's scratch arrays, so scratch writes are dropped -- and, when the probe raised no
// fault, the commit pass, on the real scratch.  So a lane that faults leaves nothing behind,
// in memory or in scratch, a lane is never half-done when it is replayed, and `out[lane] += v`
// on scratch adds v exactly once.  Accesses must be naturally aligned (an access never crosses
// a page): a misaligned one is not executed (on a GPU it would be a sticky error that kills the
// context) but recorded as a fatal fault, which cancels the job with EFAULT naming the address.
// So is an access whose page-table entry points outside system RAM, this device's memory and
// the memory of the peers it enabled (EmulatedDevice.enable_peer_access).
// Inside a lane, check `L.faulted` before looping on loaded values: after a fault every load
// returns 0.
#pragma once

typedef unsigned long long hmm_u64;
typedef long long hmm_i64;
typedef unsigned int hmm_u32;
typedef unsigned char hmm_u8;

#define HMM_PAGE_SHIFT 12
#define HMM_PAGE_SIZE 4096ULL
#define HMM_PAGE_MASK 4095ULL
#define HMM_PT_ENTRIES 512ULL
#define HMM_VPN_BITS 36

#define HMM_PTE_VALID 0x1ULL
#define HMM_PTE_WRITE 0x2ULL
#define HMM_PTE_DIRTY 0x4ULL
#define HMM_PTE_ACCESSED 0x8ULL
#define HMM_PTE_ATOMIC 0x10ULL
#define HMM_PTE_HUGE 0x80ULL

#define HMM_ACCESS_READ 0
#define HMM_ACCESS_WRITE 1
#define HMM_ACCESS_ATOMIC 2

// A fault record's access word: the access in bits 0..7; a fatal fault, which no driver can
// service, adds its reason in bits 8..15 and the access size in bytes in bits 16..23.
#define HMM_FATAL_SHIFT 8
#define HMM_FATAL_MISALIGNED 1     // the address is not a multiple of the access size
#define HMM_FATAL_BAD_PFN 2        // the entry points outside every memory the device can address
#define HMM_SIZE_SHIFT 16

#define HMM_LANE_PENDING 0
#define HMM_LANE_DONE 1
#define HMM_LANE_FAULTED 2

#define HMM_MAX_PEERS 7            // hmmgpu.device.hw.MAX_PEERS

// Where a job's lanes find memory and report faults (one per launch, kept in registers).
struct hmm_job_params {
    hmm_u8* dev_frames;      // this device's arena: pfns [dev_pfn_base, dev_pfn_base + dev_nframes)
    hmm_u64 dev_pfn_base;
    hmm_u64 dev_nframes;
    hmm_u8* host_frames;     // system RAM, pinned and mapped: pfns [0, nr_ram), read over PCIe
    hmm_u64 nr_ram;
    hmm_u64* fault_buf;      // [fault_cap][4]: vaddr, lane, access, job id (mapped host memory)
    hmm_u64* fault_put;      // records written so far (keeps counting past fault_cap: overflow)
    hmm_u64 fault_cap;
    hmm_u8* lane_state;      // per lane: HMM_LANE_*
    hmm_u64 job_id;
    // the enabled peers' memory, [HMM_MAX_PEERS][3]: first pfn, frames (0: unused row), the
    // address of frame 0 (device memory of this GPU, or of another one reached through UVA after
    // cudaDeviceEnablePeerAccess); nullptr when the device has no peer
    const hmm_u64* peers;
};

// Every job kernel takes the same parameters, so that one launcher serves all of them.
#define HMM_JOB_PARAMS                                                                           \
    hmm_u64 p_dev_frames, hmm_u64 p_dev_pfn_base, hmm_u64 p_dev_nframes, hmm_u64 p_host_frames, \
        hmm_u64 p_nr_ram, hmm_u64 p_fault_buf, hmm_u64 p_fault_put, hmm_u64 p_fault_cap,        \
        hmm_u64 p_lane_state, hmm_u64 p_job_id, hmm_u64 *pt, const hmm_u64 *lanes,              \
        hmm_u64 lane_base, hmm_u64 nlanes, const hmm_u64 *args, const hmm_u64 *probe_args,      \
        hmm_u64 p_peers

#define HMM_JOB_PARAMS_INIT(P)                                                                  \
    hmm_job_params P;                                                                           \
    P.dev_frames = (hmm_u8*)p_dev_frames; P.dev_pfn_base = p_dev_pfn_base;                      \
    P.dev_nframes = p_dev_nframes; P.host_frames = (hmm_u8*)p_host_frames; P.nr_ram = p_nr_ram; \
    P.fault_buf = (hmm_u64*)p_fault_buf; P.fault_put = (hmm_u64*)p_fault_put;                   \
    P.fault_cap = p_fault_cap; P.lane_state = (hmm_u8*)p_lane_state; P.job_id = p_job_id;      \
    P.peers = (const hmm_u64*)p_peers

// The level-2 slot of vpn (a link to its leaf table, or a 2 MiB leaf), or nullptr when a
// directory on the way is missing.
__device__ __forceinline__ hmm_u64* hmm_pt_pmd(hmm_u64* pt, hmm_u64 vpn) {
    if (vpn >> HMM_VPN_BITS) return nullptr;
    hmm_u64 e = pt[(vpn >> 27) & 511];
    if (!(e & HMM_PTE_VALID)) return nullptr;
    e = pt[(e >> HMM_PAGE_SHIFT) * HMM_PT_ENTRIES + ((vpn >> 18) & 511)];
    if (!(e & HMM_PTE_VALID)) return nullptr;
    return pt + (e >> HMM_PAGE_SHIFT) * HMM_PT_ENTRIES + ((vpn >> 9) & 511);
}

// The walker: the slot of the entry that translates vpn -- its 4 KiB leaf, or the 2 MiB leaf at
// level 2 -- or nullptr when a table on the way is missing.
__device__ __forceinline__ hmm_u64* hmm_pt_walk(hmm_u64* pt, hmm_u64 vpn) {
    hmm_u64* pmd = hmm_pt_pmd(pt, vpn);
    if (!pmd) return nullptr;
    hmm_u64 e = *pmd;
    if (e & HMM_PTE_HUGE) return pmd;
    if (!(e & HMM_PTE_VALID)) return nullptr;
    return pt + (e >> HMM_PAGE_SHIFT) * HMM_PT_ENTRIES + (vpn & 511);
}

// The entry read at vpn's slot as the page's own: a 2 MiB leaf's pfn is its first frame.
__device__ __forceinline__ hmm_u64 hmm_pte_of_page(hmm_u64 e, hmm_u64 vpn) {
    return (e & HMM_PTE_HUGE) ? e + ((vpn & (HMM_PT_ENTRIES - 1)) << HMM_PAGE_SHIFT) : e;
}

__device__ __forceinline__ bool hmm_pte_allows(hmm_u64 e, int access) {
    if (!(e & HMM_PTE_VALID)) return false;
    if (access == HMM_ACCESS_READ) return true;
    if (!(e & HMM_PTE_WRITE)) return false;
    return access == HMM_ACCESS_WRITE || (e & HMM_PTE_ATOMIC);
}

// Translate one page.  Like x86's walker, a successful translation sets ACCESSED (and DIRTY for
// a write or atomic) in the leaf -- for a 2 MiB leaf the one entry, for all its pages -- and the
// atomic is skipped when the bits are already there.  *pte is the page's own entry.
__device__ __forceinline__ bool hmm_translate(hmm_u64* pt, hmm_u64 vpn, int access, hmm_u64* pte) {
    hmm_u64* slot = hmm_pt_walk(pt, vpn);
    hmm_u64 e = slot ? *slot : 0ULL;
    if (!hmm_pte_allows(e, access)) return false;
    hmm_u64 want = HMM_PTE_ACCESSED | (access != HMM_ACCESS_READ ? HMM_PTE_DIRTY : 0ULL);
    if ((e & want) != want) atomicOr(slot, want);
    *pte = hmm_pte_of_page(e, vpn);
    return true;
}


__device__ __forceinline__ hmm_u64 hmm_fatal(int access, int reason, hmm_u64 size) {
    return (hmm_u64)access | ((hmm_u64)reason << HMM_FATAL_SHIFT) | (size << HMM_SIZE_SHIFT);
}

// A pfn in an enabled peer's memory: its frame, or nullptr.  Reached only after the two
// compares for the device's own frames and RAM fail; inlined all the same, since a call (even
// one never taken) costs the bulk kernels ten registers (ptxas, sm_90).
__device__ __forceinline__ hmm_u8* hmm_peer_frame(const hmm_u64* peers, hmm_u64 pfn) {
    if (!peers) return nullptr;
    for (int i = 0; i < HMM_MAX_PEERS; i++) {
        hmm_u64 d = pfn - peers[3 * i];        // wraps below the peer's first pfn
        if (d < peers[3 * i + 1]) return (hmm_u8*)peers[3 * i + 2] + (d << HMM_PAGE_SHIFT);
    }
    return nullptr;
}

// The frame a leaf points at -- this device's memory, system RAM reached over PCIe, or an
// enabled peer's memory -- or nullptr when the pfn is none of them (a fatal fault).
__device__ __forceinline__ hmm_u8* hmm_frame(const hmm_job_params& P, hmm_u64 pte) {
    hmm_u64 pfn = pte >> HMM_PAGE_SHIFT;
    hmm_u64 d = pfn - P.dev_pfn_base;          // wraps for RAM pfns below the base
    if (d < P.dev_nframes) return P.dev_frames + (d << HMM_PAGE_SHIFT);
    if (pfn < P.nr_ram) return P.host_frames + (pfn << HMM_PAGE_SHIFT);
    return hmm_peer_frame(P.peers, pfn);
}

__device__ __forceinline__ void hmm_fault_record(const hmm_job_params& P, hmm_u64 vaddr, hmm_u64 access,
                                                 hmm_u64 lane) {
    hmm_u64 i = atomicAdd((unsigned long long*)P.fault_put, 1ULL);
    if (i < P.fault_cap) {        // past the end: dropped; the lane re-faults on replay
        hmm_u64* r = P.fault_buf + 4 * i;
        r[0] = vaddr;
        r[1] = lane;
        r[2] = access;
        r[3] = P.job_id;
    }
}

// A lane's view of the MMU, with a one-entry translation cache (a per-lane micro-TLB: the last
// page, the strongest access it was checked for, and its frame).  It lives for one slice only, so an
// invalidation between slices can never be missed.
struct hmm_lane {
    hmm_job_params P;
    hmm_u64* pt;
    hmm_u64 lane;
    hmm_u64 tlb_vpn;
    hmm_u8* tlb_frame;
    int tlb_access;
    bool faulted;
    bool probe;
};

__device__ __forceinline__ void hmm_lane_init(hmm_lane& L, const hmm_job_params& P, hmm_u64* pt,
                                              hmm_u64 lane) {
    L.P = P;
    L.pt = pt;
    L.lane = lane;
    L.tlb_vpn = ~0ULL;
    L.tlb_frame = nullptr;
    L.tlb_access = -1;
    L.faulted = false;
    L.probe = false;
}

__device__ __forceinline__ hmm_u8* hmm_stop(hmm_lane& L, hmm_u64 vaddr, hmm_u64 access_word) {
    hmm_fault_record(L.P, vaddr, access_word, L.lane);
    L.faulted = true;
    return nullptr;
}

// Translate vaddr for an access of `size` bytes; nullptr (and the lane stops) on a fault.
__device__ __forceinline__ hmm_u8* hmm_xlate(hmm_lane& L, hmm_u64 vaddr, int access, hmm_u64 size) {
    if (L.faulted) return nullptr;
    if (vaddr & (size - 1)) return hmm_stop(L, vaddr, hmm_fatal(access, HMM_FATAL_MISALIGNED, size));
    hmm_u64 vpn = vaddr >> HMM_PAGE_SHIFT;
    if (vpn != L.tlb_vpn || access > L.tlb_access) {
        hmm_u64 e;
        if (!hmm_translate(L.pt, vpn, access, &e)) return hmm_stop(L, vaddr, (hmm_u64)access);
        hmm_u8* frame = hmm_frame(L.P, e);
        if (!frame) return hmm_stop(L, vaddr, hmm_fatal(access, HMM_FATAL_BAD_PFN, size));
        L.tlb_vpn = vpn;
        L.tlb_frame = frame;
        L.tlb_access = access;
    }
    return L.tlb_frame + (vaddr & HMM_PAGE_MASK);
}

// Translate only (no data access): reserve a store's page before the lane commits anything.
__device__ __forceinline__ bool hmm_probe(hmm_lane& L, hmm_u64 vaddr, int access) {
    return hmm_xlate(L, vaddr, access, 1) != nullptr;
}

template <typename T>
__device__ __forceinline__ T hmm_load(hmm_lane& L, hmm_u64 vaddr) {
    const hmm_u8* p = hmm_xlate(L, vaddr, HMM_ACCESS_READ, sizeof(T));
    return p ? *(const T*)p : T(0);
}

template <typename T>
__device__ __forceinline__ void hmm_store(hmm_lane& L, hmm_u64 vaddr, T v) {
    hmm_u8* p = hmm_xlate(L, vaddr, HMM_ACCESS_WRITE, sizeof(T));
    if (p && !L.probe) *(T*)p = v;
}

// atomicAdd through the MMU: needs PTE_WRITE and PTE_ATOMIC.  Returns the old value (0 in the
// probe pass and after a fault).  T: int, unsigned int, unsigned long long, float, double.
template <typename T>
__device__ __forceinline__ T hmm_atomic_add(hmm_lane& L, hmm_u64 vaddr, T v) {
    hmm_u8* p = hmm_xlate(L, vaddr, HMM_ACCESS_ATOMIC, sizeof(T));
    if (!p || L.probe) return T(0);
    return atomicAdd((T*)p, v);
}

__device__ __forceinline__ float hmm_arg_f32(hmm_u64 a) { return __uint_as_float((hmm_u32)a); }
__device__ __forceinline__ double hmm_arg_f64(hmm_u64 a) { return __longlong_as_double((hmm_i64)a); }

__device__ __forceinline__ hmm_u64 hmm_lane_index(const hmm_u64* lanes, hmm_u64 lane_base, hmm_u64 i) {
    return lanes ? lanes[i] : lane_base + i;
}

// One thread per lane; LaneFn(hmm_lane&, lane, args).  two_phase: probe first, on probe_args
// (the arguments with every scratch pointer aimed at a copy; see the top).
template <void (*LaneFn)(hmm_lane&, hmm_u64, const hmm_u64*), bool TwoPhase>
__device__ __forceinline__ void hmm_run_lanes(const hmm_job_params& P, hmm_u64* pt, const hmm_u64* lanes,
                                              hmm_u64 lane_base, hmm_u64 nlanes, const hmm_u64* args,
                                              const hmm_u64* probe_args) {
    hmm_u64 i = (hmm_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nlanes) return;
    hmm_lane L;
    hmm_lane_init(L, P, pt, hmm_lane_index(lanes, lane_base, i));
    if (TwoPhase) {
        L.probe = true;
        LaneFn(L, L.lane, probe_args);
        if (L.faulted) {
            P.lane_state[L.lane] = HMM_LANE_FAULTED;
            return;
        }
        L.probe = false;
    }
    LaneFn(L, L.lane, args);
    P.lane_state[L.lane] = L.faulted ? HMM_LANE_FAULTED : HMM_LANE_DONE;
}

#define HMM_DEFINE_JOB(name, lane_fn)                                                  \
    extern "C" __global__ void name(HMM_JOB_PARAMS) {                                  \
        HMM_JOB_PARAMS_INIT(P);                                                        \
        hmm_run_lanes<lane_fn, true>(P, pt, lanes, lane_base, nlanes, args, probe_args); \
    }
