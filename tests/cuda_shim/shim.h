// shim.h: the CUDA builtins hmmgpu's kernels use, for g++ (tests/test_device_cuda_cpu.py).
//
// Closer to a GPU than it looks: uint4/float4 carry CUDA's 16-byte alignment and the module is
// built with -fsanitize=alignment, so a misaligned access becomes the launch's error (launch.cpp
// records it like cudaErrorMisalignedAddress); float arithmetic flushes subnormals when the
// module was compiled with -ftz=true, as the GPU does (launch.cpp sets the CPU's FTZ/DAZ bits).
#include <cstdint>
#include <cstring>
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
struct emu_dim3 { unsigned x, y, z; };
extern thread_local emu_dim3 threadIdx, blockIdx;
extern thread_local emu_dim3 blockDim, gridDim;
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class F, class I> inline F emu_fadd(F* p, F v) {
    I old = __atomic_load_n((I*)p, __ATOMIC_SEQ_CST);
    for (;;) { F f; memcpy(&f, &old, sizeof f); volatile F n = f + v; F nn = n; I ni; memcpy(&ni, &nn, sizeof ni);
        if (__atomic_compare_exchange_n((I*)p, &old, ni, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return f; }
}
inline float atomicAdd(float* p, float v) { return emu_fadd<float, unsigned>(p, v); }
inline double atomicAdd(double* p, double v) { return emu_fadd<double, unsigned long long>(p, v); }
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline double __longlong_as_double(long long u) { double f; memcpy(&f, &u, 8); return f; }

// Warp collectives (launch.cpp runs a warp's 32 lanes as coroutines): emu_gather publishes this
// lane's word and returns the 32 words once every lane of the warp has published its own.
const unsigned long long* emu_gather(unsigned long long mine);
inline unsigned __ballot_sync(unsigned, bool p) {
    const unsigned long long* s = emu_gather(p);
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= (s[i] ? 1u : 0u) << i;
    return r;
}
template <class T> inline T emu_shuffle(T v, int src) {
    unsigned long long b = 0; memcpy(&b, &v, sizeof v);
    unsigned long long r = emu_gather(b)[src & 31];
    T out; memcpy(&out, &r, sizeof out); return out;
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu_shuffle(v, src); }
template <class T> inline T __shfl_down_sync(unsigned, T v, int d) {
    int l = threadIdx.x & 31;
    return emu_shuffle(v, l + d < 32 ? l + d : l);
}
