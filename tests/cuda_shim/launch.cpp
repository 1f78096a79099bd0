// launch.cpp: how the emulated GPU runs a grid (appended to every module the shim builds).
//
// Threads and warps run in a seeded random order, as a GPU schedules them in no order a kernel
// may rely on.  Thread-per-lane kernels run their threads one after another in a shuffled
// order.  Warp kernels (the ones using warp collectives) run warp after warp, the warps in a
// shuffled order, each warp as 32 coroutines on one OS thread: a lane runs until it reaches a
// collective, and the collective completes when all 32 lanes have reached it (a lane that
// returns while others wait there is a divergent collective: the launch fails).  The coroutines
// switch with a few instructions of x86-64 assembly (emu_swap), not swapcontext, which makes
// two system calls per switch.  A misaligned
// access (-fsanitize=alignment) is recorded and returned, like the sticky
// cudaErrorMisalignedAddress; with EMU_FTZ the float unit flushes subnormals while kernels run.
#include <algorithm>
#include <random>
#include <vector>
#include <xmmintrin.h>
thread_local emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
typedef unsigned long long u64;
#define EMU_MAX_ARGS 20               // cupy/__init__.py's RawKernel passes this many words
typedef void (*K)(u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64,
                  u64);

// emu_swap(&save, to): push the callee-saved registers, store the stack pointer in save, switch
// to the stack `to` and pop its registers: a coroutine switch under the System V x86-64 ABI.
extern "C" void emu_swap(void** save, void* to);
asm(R"(
    .text
    .globl emu_swap
    .type emu_swap, @function
emu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_swap, .-emu_swap
)");

struct emu_warp {
    void* sched;                 // the scheduler's saved stack pointer
    void* lane_sp[32];           // each suspended lane's
    std::vector<char> stacks;
    u64 slots[2][32];            // double-buffered: collective k uses slots[k & 1]
    unsigned gen = 0;            // collectives completed by this warp
    int waiting[32], done[32];
    int current = -1;
    emu_dim3 tid[32];
    void* f;
    const u64* args;
};
static thread_local emu_warp* emu_me;

const u64* emu_gather(u64 mine) {
    emu_warp* w = emu_me;
    if (!w) __builtin_trap();         // a warp collective in a kernel launched thread-per-lane
    int l = w->current;
    unsigned g = w->gen;
    w->slots[g & 1][l] = mine;
    w->waiting[l] = 1;
    emu_swap(&w->lane_sp[l], w->sched);
    return w->slots[g & 1];
}

static void emu_lane_main() {              // a lane's first frame; it never returns
    emu_warp* w = emu_me;
    int l = w->current;
    const u64* a = w->args;
    ((K)w->f)(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15],
              a[16], a[17], a[18], a[19]);
    w->done[l] = 1;
    void* dead;
    emu_swap(&dead, w->sched);
    __builtin_trap();
}

struct emu_error {                         // a launch's first failure
    int bad = 0;                           // 1 misaligned access, 2 divergent collective
    u64 addr = 0;
};
static thread_local emu_error* emu_err;
extern "C" void __ubsan_handle_type_mismatch_v1(void*, uintptr_t p) {
    if (emu_err && !emu_err->bad) emu_err->bad = 1, emu_err->addr = p;
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(void* d, uintptr_t p) { __ubsan_handle_type_mismatch_v1(d, p); }

struct emu_fp_mode {                       // the float unit as the module was compiled
    unsigned saved;
    emu_fp_mode() : saved(_mm_getcsr()) { _mm_setcsr(EMU_FTZ ? (saved | 0x8040) : (saved & ~0x8040u)); }
    ~emu_fp_mode() { _mm_setcsr(saved); }
};

static void emu_run_warp(emu_warp& w, emu_error& err) {
    const size_t STACK = 256 << 10;
    for (int l = 0; l < 32; l++) {
        w.waiting[l] = w.done[l] = 0;
        // a fresh stack as emu_swap leaves one: six saved registers, then the return address
        u64* top = (u64*)(((uintptr_t)(w.stacks.data() + (l + 1) * STACK)) & ~(uintptr_t)15);
        u64* sp = top - 2;
        sp[0] = (u64)(void*)emu_lane_main;
        sp[1] = 0;
        sp -= 6;
        for (int r = 0; r < 6; r++) sp[r] = 0;
        w.lane_sp[l] = sp;
    }
    for (;;) {
        int ndone = 0, nwait = 0;
        for (int l = 0; l < 32; l++) {
            if (!w.done[l] && !w.waiting[l]) {
                w.current = l;
                threadIdx = w.tid[l];
                emu_swap(&w.sched, w.lane_sp[l]);
            }
            ndone += w.done[l];
            nwait += w.waiting[l];
        }
        if (ndone == 32) return;
        if (ndone + nwait == 32 && ndone) {    // some lanes left while others wait in a collective
            if (!err.bad) err.bad = 2;
            return;
        }
        w.gen++;                               // every lane reached the collective: complete it
        for (int l = 0; l < 32; l++) w.waiting[l] = 0;
    }
}

// Returns 0, 1 (misaligned access, *bad = its address) or 2 (divergent warp collective).
extern "C" int emu_launch(void* f, const u64* args, unsigned grid, unsigned block, int warp_mode, u64 seed,
                          u64* bad) {
    emu_error err;
    emu_fp_mode fp;
    emu_err = &err;
    std::mt19937_64 rng(seed);
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    if (!warp_mode) {
        std::vector<unsigned> order((size_t)grid * block);
        for (size_t i = 0; i < order.size(); i++) order[i] = (unsigned)i;
        std::shuffle(order.begin(), order.end(), rng);
        for (unsigned t : order) {
            blockIdx = {t / block, 0, 0};
            threadIdx = {t % block, 0, 0};
            ((K)f)(args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7], args[8], args[9],
                   args[10], args[11], args[12], args[13], args[14], args[15], args[16], args[17], args[18],
                   args[19]);
        }
    } else {
        unsigned wpb = block / 32;
        std::vector<unsigned> order((size_t)grid * wpb);
        for (size_t i = 0; i < order.size(); i++) order[i] = (unsigned)i;
        std::shuffle(order.begin(), order.end(), rng);
        emu_warp* w = new emu_warp;
        w->stacks.resize(32 * (256 << 10));
        w->f = f;
        w->args = args;
        emu_me = w;
        for (unsigned g : order) {
            blockIdx = {g / wpb, 0, 0};
            for (int l = 0; l < 32; l++) w->tid[l] = {(g % wpb) * 32 + l, 0, 0};
            emu_run_warp(*w, err);
            if (err.bad == 2) break;
        }
        emu_me = nullptr;
        delete w;
    }
    emu_err = nullptr;
    *bad = err.addr;
    return err.bad;
}
