// cuda_host.h - run unchanged CUDA C++ kernels on the CPU, for tests.
//
// The kernels of this project (kernels/*.cu) are written for NVRTC/CuPy. With
// this header in front of them, g++ -std=c++20 compiles the same source into
// ordinary C++ functions, and a small runtime executes a launch the way the
// CUDA programming model describes it:
//
//   * blocks run one after another, blockIdx.x fastest (a GPU runs them in
//     any order, concurrently; a correct kernel cannot tell the difference);
//   * each block runs one std::thread per CUDA thread, so every thread has
//     its own registers and stack, and threads really interleave (the
//     std::threads are pooled: thread i of every block runs on worker i);
//   * __syncthreads() is a std::barrier of the block; a thread that has
//     returned from the kernel no longer counts (as on a GPU), and a barrier
//     passed thanks to such a thread is reported as divergent;
//   * warp shuffles exchange values through per-warp slots, guarded by a
//     per-warp barrier (mutex + condition variable) over the lanes of the
//     mask that exist and have not exited;
//   * atomics are GCC __atomic built-ins (what std::atomic_ref compiles to);
//   * __shared__ variables are function-local statics: one object shared by
//     all threads of the block, reused by the next block (which is correct
//     because blocks are sequential). The launcher fills them with 0xFF bytes
//     before every block (NaN for floats, all-ones for integers), because on
//     a GPU shared memory starts undefined and a kernel that reads a slot it
//     never wrote must not pass by luck.
//
// Built with -fsanitize=thread, ThreadSanitizer then sees every access of
// every CUDA thread: a missing __syncthreads() shows up as a data race at the
// kernel's source line (a CPU stand-in for compute-sanitizer racecheck). The
// runtime takes care not to order CUDA threads more than CUDA does, or TSAN
// would miss races (see the thread pool below).
//
// Limitations (what this cannot show):
//   * Races between blocks: blocks are sequential, each happens-after the
//     previous, so e.g. a "last block" protocol is only checked for its
//     logic, not for its memory ordering on a GPU.
//   * A shuffle orders memory between the lanes of its warp here (mutex);
//     CUDA promises no such ordering, so an intra-warp race across a shuffle
//     is not reported. Atomics are acq_rel here, relaxed in CUDA.
//   * Out-of-bounds and misaligned accesses are not checked (they may crash
//     or corrupt the process), nor is anything about performance.
//   * Floating point: no FMA contraction (nvcc contracts by default), rsqrt
//     is (nearly) correctly rounded; results can differ in the last bits.
//   * Dynamic shared memory (extern __shared__) and anything not declared
//     below (cooperative groups, __syncwarp, votes, textures, ...) is
//     missing: the kernel does not compile.

// The file has two parts, compiled into two translation units of one shared
// library (tests/host_cuda/runner.py does the builds):
//
//   1. The CUDA API (always). It includes NO standard header: the kernel
//      translation unit (harness.cpp) sees exactly the CUDA subset below and
//      nothing of std::, like NVRTC without headers. A kernel that uses
//      something not provided here fails to compile - on purpose; add it here
//      when the kernels really need it.
//   2. The runtime (only with -DBNHOST_IMPLEMENTATION; runner.py compiles this
//      header as its own translation unit): threads, barriers, warp exchange,
//      deadlock watchdog, error reporting. It is a separate translation unit
//      so that its <thread>/<barrier>/... includes never leak into the
//      kernels, and so that __syncthreads() is a real (opaque) call: the
//      compiler must then keep shared memory in memory across it.
//
// Entry points used by harness.cpp: bnhost::launch_grid(), set_error(),
// last_error() and shared_bytes(); see the end of part 1.

#ifdef BNHOST_IMPLEMENTATION
// Part 2 needs the standard library. Include it before any of the CUDA
// macros below are defined, so that no standard header ever sees them.
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#endif

// ===========================================================================
// Part 1: the CUDA API seen by the kernels
// ===========================================================================
#ifndef BNHOST_CUDA_API
#define BNHOST_CUDA_API

// --- Execution-space and memory-space qualifiers ----------------------------
// Host code has one execution space, so __global__/__device__/__host__ vanish.
// __restrict__ is a GCC keyword already and is left alone.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One object per block: a function-local static is shared by all threads
// (std::threads) of the running block. Blocks run sequentially, so the next
// block may reuse it. runner.py links the kernel object with a linker script
// that gathers all function-local zero-initialised statics of the kernel
// translation unit (.bss._ZZ*: __shared__ variables cannot have initialisers)
// into one section, which the launcher poisons before each block. Dynamic
// shared memory ("extern __shared__ T x[];") is not supported: it does not
// compile ("extern static").
#define __shared__ static

// --- Built-in vector types ----------------------------------------------------
// Same layout and alignment as CUDA's (vector_types.h), so that
// reinterpret_cast<const float4*>(p)[i] reads the same bytes; the alignment
// also makes a misaligned vector access as undefined here as on the GPU.
struct uint3 { unsigned int x, y, z; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return uint4{x, y, z, w};
}

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz) {}
};

// --- Built-in variables -------------------------------------------------------
namespace bnhost {
// Written by the launcher before it starts the threads of a block (so every
// thread reads them after a happens-before edge: thread creation), constant
// while the block runs. Only threadIdx differs between threads.
inline uint3 block_idx{0, 0, 0};
inline dim3 block_dim;
inline dim3 grid_dim;
}  // namespace bnhost

// Set by the runtime at the start of each CUDA thread (one std::thread each).
inline thread_local uint3 threadIdx{0, 0, 0};
// Read-only views, as on the GPU (a kernel cannot assign to them).
inline const uint3& blockIdx = bnhost::block_idx;
inline const dim3& blockDim = bnhost::block_dim;
inline const dim3& gridDim = bnhost::grid_dim;

// --- Runtime interface (defined in part 2) -----------------------------------
namespace bnhost {
// One kernel argument list: args[i] points to the value of parameter i.
using KernelBody = void (*)(void* const* args);

void syncthreads();
// One warp-exchange round: the calling lane contributes `bits` and receives
// the contribution of lane `src_lane` of its warp, or all-one bits (NaN for
// floating types, -1 for integers) if that lane does not take part (not in
// the mask, past the end of a partial last warp, or exited): undefined on a
// GPU, and a visible poison value here. `what` names the intrinsic.
unsigned long long warp_exchange(unsigned int mask, unsigned long long bits, int src_lane,
                                 const char* what);
int lane_id();
// Records a usage error of the calling kernel thread; the launch returns -2.
void kernel_error(const char* message);

// Runs `body` for every thread of every block. Returns 0, -2 (a kernel
// thread hit a usage error: divergent __syncthreads, bad shuffle mask, ...)
// or -3 (invalid launch configuration). Launches are serialised.
int launch_grid(const char* kernel_name, dim3 grid, dim3 block, KernelBody body,
                void* const* args);
void set_error(const char* message);
const char* last_error();
unsigned long long shared_bytes();  // size of the poisoned __shared__ region
}  // namespace bnhost

// --- Synchronisation and memory fences -----------------------------------------
inline void __syncthreads() { bnhost::syncthreads(); }
// CUDA's fence orders this thread's global writes before its later ones as
// seen by other threads. A sequentially consistent fence is at least that.
// (ThreadSanitizer does not model stand-alone fences; the atomics below are
// acq_rel so that the usual "write, __threadfence, atomicAdd" handshake is
// still a happens-before edge for it.)
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// --- Atomics --------------------------------------------------------------------
// CUDA atomics are relaxed; acq_rel is stronger (never wrong for a correct
// kernel) and lets ThreadSanitizer see the ordering kernels get from
// __threadfence. Return the old value, as CUDA does.
inline unsigned int atomicAdd(unsigned int* address, unsigned int val) {
    return __atomic_fetch_add(address, val, __ATOMIC_ACQ_REL);
}
inline int atomicAdd(int* address, int val) {
    return __atomic_fetch_add(address, val, __ATOMIC_ACQ_REL);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
    return __atomic_fetch_add(address, val, __ATOMIC_ACQ_REL);
}
namespace bnhost {
template <class T>
inline T atomic_add_cas(T* address, T val) {  // floating point: a CAS loop
    T old, desired;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    do {
        desired = old + val;
    } while (!__atomic_compare_exchange(address, &old, &desired, true, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED));
    return old;
}
}  // namespace bnhost
inline float atomicAdd(float* address, float val) { return bnhost::atomic_add_cas(address, val); }
inline double atomicAdd(double* address, double val) { return bnhost::atomic_add_cas(address, val); }

// --- __half and __half2 (cuda_fp16.h subset) -------------------------------------
// IEEE binary16 as raw bits. No implicit conversions (kernels convert with
// the intrinsics), no arithmetic: only what the kernels use.
struct alignas(2) __half { unsigned short __x; };
struct alignas(4) __half2 { __half x, y; };

namespace bnhost {
inline unsigned int float_bits(float f) { unsigned int u; __builtin_memcpy(&u, &f, 4); return u; }
inline float bits_float(unsigned int u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
}  // namespace bnhost

// Exact (every binary16 value is a binary32 value). NaN payloads are kept.
inline float __half2float(const __half h) {
    const unsigned int sign = (unsigned int)(h.__x & 0x8000u) << 16;
    const unsigned int exp = (h.__x >> 10) & 0x1fu;
    const unsigned int mant = h.__x & 0x3ffu;
    if (exp == 0x1f) return bnhost::bits_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN
    if (exp != 0) return bnhost::bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
    // zero or subnormal: mant * 2^-24, exact in float (mant < 2^10, result normal)
    return bnhost::bits_float(sign | bnhost::float_bits((float)mant * 5.9604644775390625e-08f));
}

// Round to nearest, ties to even, in integer arithmetic (no dependence on
// the host FPU's rounding mode or on F16C). NaN -> 0x7fff, CUDA's canonical
// NaN; overflow (|x| >= 65520) -> inf; |x| <= 2^-25 -> signed zero.
inline __half __float2half_rn(const float f) {
    const unsigned int x = bnhost::float_bits(f);
    const unsigned short sign = (unsigned short)((x >> 16) & 0x8000u);
    const unsigned int a = x & 0x7fffffffu;
    unsigned short h;
    if (a > 0x7f800000u) {
        h = 0x7fff;  // NaN
    } else if (a >= 0x477ff000u) {
        h = sign | 0x7c00u;  // rounds to infinity (or is infinity)
    } else if (a >= 0x38800000u) {
        // normal half: re-bias the exponent (127 -> 15), round away 13 bits;
        // a mantissa carry correctly bumps the exponent.
        unsigned int m = a - 0x38000000u;
        m += 0xfffu + ((m >> 13) & 1u);
        h = sign | (unsigned short)(m >> 13);
    } else if (a > 0x33000000u) {
        // subnormal half: value = m * 2^(e-150), in units of 2^-24 that is
        // m >> (126 - e), shift in [14, 24]. Rounding up to 0x400 gives the
        // smallest normal, which is the right bit pattern.
        const unsigned int e = a >> 23;
        const unsigned int m = (a & 0x7fffffu) | 0x800000u;
        const unsigned int shift = 126u - e;
        const unsigned int rem = m & ((1u << shift) - 1u);
        const unsigned int halfway = 1u << (shift - 1u);
        unsigned int q = m >> shift;
        if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
        h = sign | (unsigned short)q;
    } else {
        h = sign;  // |x| <= 2^-25: ties to even rounds 2^-25 itself to zero
    }
    return __half{h};
}
inline __half __float2half(const float f) { return __float2half_rn(f); }

// --- __nv_bfloat16 (cuda_bf16.h subset) -----------------------------------------
// bfloat16 as raw bits: the top half of a binary32. As for __half, no
// implicit conversions and no arithmetic.
struct alignas(2) __nv_bfloat16 { unsigned short __x; };

// Exact: the bits shifted into a binary32 (NaN payloads kept).
inline float __bfloat162float(const __nv_bfloat16 h) {
    return bnhost::bits_float((unsigned int)h.__x << 16);
}

// Round to nearest, ties to even, in integer arithmetic (as cuda_bf16.hpp's
// emulation and sm_80's cvt.rn.bf16.f32): NaN -> 0x7fff, CUDA's canonical
// NaN (NaN stays NaN); overflow rounds to infinity; subnormals round like
// any other value (bfloat16 has binary32's exponent range).
inline __nv_bfloat16 __float2bfloat16_rn(const float f) {
    const unsigned int x = bnhost::float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
    const unsigned int rounded = x + 0x7fffu + ((x >> 16) & 1u);
    return __nv_bfloat16{(unsigned short)(rounded >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(const float f) { return __float2bfloat16_rn(f); }
inline unsigned short __bfloat16_as_ushort(const __nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(const unsigned short u) { return __nv_bfloat16{u}; }

// --- Bit casts (device intrinsics) -----------------------------------------------
inline unsigned int __float_as_uint(const float f) { return bnhost::float_bits(f); }
inline float __uint_as_float(const unsigned int u) { return bnhost::bits_float(u); }

inline __half2 __halves2half2(const __half lo, const __half hi) { return __half2{lo, hi}; }
inline __half __low2half(const __half2 a) { return a.x; }
inline __half __high2half(const __half2 a) { return a.y; }
inline float __low2float(const __half2 a) { return __half2float(a.x); }
inline float __high2float(const __half2 a) { return __half2float(a.y); }

// --- Warp shuffles ----------------------------------------------------------------
// Semantics of the CUDA Programming Guide (width = power of two <= 32,
// default 32, the warp is split into segments of `width` lanes):
//   __shfl_sync:      lane (srcLane mod width) of the caller's segment;
//   __shfl_up_sync:   lane - delta, own value if that leaves the segment;
//   __shfl_down_sync: lane + delta, own value if that leaves the segment;
//   __shfl_xor_sync:  lane ^ laneMask, own value if that is in a later segment.
// The caller must be in `mask`; lanes of the mask that have exited or do not
// exist (partial last warp) do not take part, and reading from them (or
// from a lane not in the mask) yields the poison value (see warp_exchange).
namespace bnhost {
inline bool check_width(int width, const char* what) {
    if (width >= 1 && width <= 32 && (width & (width - 1)) == 0) return true;
    kernel_error(what);
    return false;
}
template <class T>
inline T shuffle(unsigned int mask, T var, int src_lane, const char* what) {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    unsigned long long bits = 0;
    __builtin_memcpy(&bits, &var, sizeof(T));
    bits = warp_exchange(mask, bits, src_lane, what);
    T out;
    __builtin_memcpy(&out, &bits, sizeof(T));
    return out;
}
template <class T>
inline T shfl_idx(unsigned int mask, T var, int src, int width) {
    if (!check_width(width, "__shfl_sync: width must be a power of two <= 32")) width = 32;
    const int lane = lane_id();
    return shuffle(mask, var, (lane & ~(width - 1)) + (src & (width - 1)), "__shfl_sync");
}
template <class T>
inline T shfl_up(unsigned int mask, T var, unsigned int delta, int width) {
    if (!check_width(width, "__shfl_up_sync: width must be a power of two <= 32")) width = 32;
    const int lane = lane_id();
    const int src = (unsigned int)(lane & (width - 1)) >= delta ? lane - (int)delta : lane;
    return shuffle(mask, var, src, "__shfl_up_sync");
}
template <class T>
inline T shfl_down(unsigned int mask, T var, unsigned int delta, int width) {
    if (!check_width(width, "__shfl_down_sync: width must be a power of two <= 32")) width = 32;
    const int lane = lane_id();
    const int src = (lane & (width - 1)) + delta < (unsigned int)width ? lane + (int)delta : lane;
    return shuffle(mask, var, src, "__shfl_down_sync");
}
template <class T>
inline T shfl_xor(unsigned int mask, T var, int lane_mask, int width) {
    if (!check_width(width, "__shfl_xor_sync: width must be a power of two <= 32")) width = 32;
    const int lane = lane_id();
    const int src = lane ^ lane_mask;
    const int segment_end = (lane / width + 1) * width;
    return shuffle(mask, var, (src >= 0 && src < segment_end) ? src : lane, "__shfl_xor_sync");
}
}  // namespace bnhost

// Explicit overloads for CUDA's types (not a template), so that overload
// resolution and promotions behave as with cuda's headers.
#define BNHOST_SHUFFLES(T)                                                                     \
    inline T __shfl_sync(unsigned int mask, T var, int srcLane, int width = 32) {              \
        return bnhost::shfl_idx(mask, var, srcLane, width);                                    \
    }                                                                                          \
    inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {    \
        return bnhost::shfl_up(mask, var, delta, width);                                       \
    }                                                                                          \
    inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {  \
        return bnhost::shfl_down(mask, var, delta, width);                                     \
    }                                                                                          \
    inline T __shfl_xor_sync(unsigned int mask, T var, int laneMask, int width = 32) {         \
        return bnhost::shfl_xor(mask, var, laneMask, width);                                   \
    }
BNHOST_SHUFFLES(int)
BNHOST_SHUFFLES(unsigned int)
BNHOST_SHUFFLES(long)
BNHOST_SHUFFLES(unsigned long)
BNHOST_SHUFFLES(long long)
BNHOST_SHUFFLES(unsigned long long)
BNHOST_SHUFFLES(float)
BNHOST_SHUFFLES(double)
BNHOST_SHUFFLES(__half)
BNHOST_SHUFFLES(__half2)
BNHOST_SHUFFLES(__nv_bfloat16)
#undef BNHOST_SHUFFLES

// --- Math ----------------------------------------------------------------------------
// The C library functions are declared as glibc declares them; the float
// overloads CUDA adds in device code (sqrt(float), fma(float...), rsqrt) are
// inline C++ functions. Not declared in the runtime translation unit, whose
// standard headers declare std:: versions that would clash.
#ifndef BNHOST_IMPLEMENTATION
extern "C" {
double sqrt(double) noexcept;
float sqrtf(float) noexcept;
double fma(double, double, double) noexcept;
float fmaf(float, float, float) noexcept;
float fmaxf(float, float) noexcept;
}
inline float sqrt(float x) { return sqrtf(x); }
inline float fma(float a, float b, float c) { return fmaf(a, b, c); }
// CUDA's rsqrt is approximate (2 ulp for float, 1 ulp for double); here it
// is 1/sqrt computed one precision higher for float (about 0.5 ulp), and
// correctly rounded 1/sqrt for double, which is within CUDA's bound.
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rsqrtf(float x) { return (float)(1.0 / sqrt((double)x)); }
inline float rsqrt(float x) { return rsqrtf(x); }
#endif

#endif  // BNHOST_CUDA_API

// ===========================================================================
// Part 2: the runtime (compiled once, as its own translation unit)
// ===========================================================================
#if defined(BNHOST_IMPLEMENTATION) && !defined(BNHOST_RUNTIME_DEFINED)
#define BNHOST_RUNTIME_DEFINED

// Bounds of the poisoned __shared__ region, defined by runner.py's linker
// script (weak: a library linked without it simply gets no poisoning).
extern "C" char bnhost_shared_begin[] __attribute__((weak));
extern "C" char bnhost_shared_end[] __attribute__((weak));

namespace bnhost {
namespace {

// What a CUDA thread is doing, for the deadlock watchdog's diagnosis.
enum ThreadState : int { kRunning = 0, kAtSyncthreads = 1, kAtShuffle = 2, kExited = 3 };

constexpr unsigned int kWarpSize = 32;
constexpr unsigned long long kPoison = ~0ull;

struct Block;

// Counts completed barrier phases: evidence of progress for the watchdog.
struct PhaseDone {
    Block* block;
    void operator()() noexcept;
};

// Per-warp exchange. One round = one shuffle executed by the lanes of a
// mask: each arriving lane deposits its value in its slot; when every lane
// of (mask & live) has arrived, all of them read their source slot; when
// the last one has read, the round closes and the next may open. A mutex +
// condition variable (rather than a fixed-count std::barrier) because the
// number of participants is not fixed: it depends on the mask, on the size
// of a partial last warp, and shrinks when a lane exits while others wait.
// Lanes arriving with a different mask wait until the current round closes,
// so disjoint groups of one warp (e.g. two half-warps with masks 0x0000ffff
// and 0xffff0000) serialise instead of mixing.
struct Warp {
    std::mutex m;
    std::condition_variable cv;
    unsigned int live = 0;  // lanes that exist and have not exited
    bool open = false;      // a round is in progress
    bool reading = false;   // ... and everybody has arrived
    unsigned int round_mask = 0, arrived = 0, departed = 0;
    unsigned long long slot[kWarpSize] = {};

    bool all_arrived() const { return (round_mask & live & ~arrived) == 0; }
};

struct Block {
    Block(unsigned int n, uint3 idx)
        : nthreads(n),
          index(idx),
          barrier((std::ptrdiff_t)n, PhaseDone{this}),
          warps(new Warp[(n + kWarpSize - 1) / kWarpSize]),
          state(new std::atomic<int>[n]) {
        for (unsigned int t = 0; t < n; ++t) state[t].store(kRunning, std::memory_order_relaxed);
        const unsigned int nwarps = (n + kWarpSize - 1) / kWarpSize;
        for (unsigned int w = 0; w < nwarps; ++w) {
            const unsigned int lanes = n - w * kWarpSize < kWarpSize ? n - w * kWarpSize : kWarpSize;
            warps[w].live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        }
    }

    const unsigned int nthreads;
    const uint3 index;
    std::atomic<unsigned long long> progress{0};  // completed barriers/rounds, exits
    std::barrier<PhaseDone> barrier;
    std::unique_ptr<Warp[]> warps;
    std::unique_ptr<std::atomic<int>[]> state;  // ThreadState per thread
    // Smallest number of __syncthreads() any exited thread had passed: a
    // thread released from its k-th barrier with this < k was let through
    // by an exited thread (divergent barrier).
    std::atomic<unsigned int> min_exit_syncs{~0u};

    std::mutex done_m;
    std::condition_variable done_cv;
    unsigned int done = 0;
};

void PhaseDone::operator()() noexcept { block->progress.fetch_add(1, std::memory_order_relaxed); }

// Per CUDA thread (std::thread) state.
thread_local Block* t_block = nullptr;
thread_local unsigned int t_linear = 0;  // x + y*bx + z*bx*by
thread_local unsigned int t_syncs = 0;   // __syncthreads() calls so far

// Launches are serialised: kernels share their __shared__ statics and the
// built-in variables are global.
std::mutex g_launch_m;
const char* g_kernel = "";

std::mutex g_error_m;
std::string g_first_error;     // first problem of the current launch
unsigned long g_error_count = 0;
std::string g_error_text;      // what last_error() returns

std::string vformat(const char* fmt, va_list ap) {
    char buf[1024];
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    return s;
}

void record(const std::string& message) {
    std::lock_guard<std::mutex> lock(g_error_m);
    if (g_error_count++ == 0) g_first_error = message;
}

std::string where() {
    if (t_block == nullptr) return format("%s (outside a kernel thread)", g_kernel);
    return format("%s, block (%u,%u,%u), thread (%u,%u,%u)", g_kernel, t_block->index.x,
                  t_block->index.y, t_block->index.z, threadIdx.x, threadIdx.y, threadIdx.z);
}

// Ends the process: used when threads are stuck for good. _Exit rather than
// abort(): no core dump of a process with up to 1024 threads, and no
// destructors running under threads that still hold locks. Exit status 134,
// what a shell reports for abort().
[[noreturn]] void fatal(const std::string& message) {
    std::fprintf(stderr, "bnhost: %s\n", message.c_str());
    std::fflush(stderr);
    std::_Exit(134);
}

Block& current_block() {
    if (t_block == nullptr) fatal("a CUDA intrinsic was called outside a kernel launch");
    return *t_block;
}

void fetch_min(std::atomic<unsigned int>& a, unsigned int v) {
    unsigned int cur = a.load(std::memory_order_relaxed);
    while (v < cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
    }
}

void thread_exit(Block& b) {
    b.state[t_linear].store(kExited, std::memory_order_relaxed);
    fetch_min(b.min_exit_syncs, t_syncs);
    {
        // The lane stops taking part in shuffles; a round that was waiting
        // only for it can now be read.
        Warp& w = b.warps[t_linear / kWarpSize];
        std::lock_guard<std::mutex> lock(w.m);
        w.live &= ~(1u << (t_linear % kWarpSize));
        if (w.open && !w.reading && w.all_arrived()) {
            w.reading = true;
            b.progress.fetch_add(1, std::memory_order_relaxed);
            w.cv.notify_all();
        }
    }
    // Like an exited thread on a GPU, it no longer holds up __syncthreads.
    b.barrier.arrive_and_drop();
    b.progress.fetch_add(1, std::memory_order_relaxed);
    // Notify under the lock: once the launcher sees done == nthreads it
    // destroys the Block, so nothing of it may be touched after unlocking.
    std::lock_guard<std::mutex> lock(b.done_m);
    ++b.done;
    b.done_cv.notify_one();
}

void thread_main(Block* b, unsigned int linear, KernelBody body, void* const* args) {
    t_block = b;
    t_linear = linear;
    t_syncs = 0;
    const dim3 bd = block_dim;
    threadIdx = uint3{linear % bd.x, (linear / bd.x) % bd.y, linear / (bd.x * bd.y)};
    body(args);
    thread_exit(*b);
    t_block = nullptr;
}

// The CUDA threads are pooled: worker i runs CUDA thread i of every block.
// Creating threads is cheap (~30 us) but not under ThreadSanitizer (~0.5 ms
// each), where a launch of a few 256-thread blocks would spend most of its
// time there. Workers are created on first need and never destroyed: they
// wait between blocks, are detached, and die with the process (nothing of
// the pool is ever freed, so no destructor can run under them).
//
// Each worker has its own mutex and condition variable. That matters for
// ThreadSanitizer: the hand-over of a block to worker i orders the
// launcher's preparations (and the previous block) before thread i, and
// nothing else. A mutex shared by all workers would also order a thread
// that finished early before every thread that started after it, hiding
// exactly the races (a missing __syncthreads) the TSAN build is for. For
// the same reason the runtime's bookkeeping atomics (state, progress) are
// relaxed: they must not create happens-before edges between CUDA threads.
struct Worker {
    std::mutex m;
    std::condition_variable wake;
    unsigned long long job = 0;  // number of the last block handed over
    Block* block = nullptr;
    KernelBody body = nullptr;
    void* const* args = nullptr;
};

struct Pool {
    std::vector<std::unique_ptr<Worker>> workers;
    unsigned long long jobs = 0;  // blocks handed out so far
};
Pool* g_pool = nullptr;  // created and grown under g_launch_m, never freed

void worker_main(Worker* w, unsigned int index) {
    unsigned long long done = 0;
    for (;;) {
        Block* b;
        KernelBody body;
        void* const* args;
        {
            std::unique_lock<std::mutex> lock(w->m);
            w->wake.wait(lock, [&] { return w->job != done; });
            done = w->job;
            b = w->block;
            body = w->body;
            args = w->args;
        }
        thread_main(b, index, body, args);
    }
}

void grow_pool(unsigned int n) {
    if (g_pool == nullptr) g_pool = new Pool;
    while (g_pool->workers.size() < n) {
        const unsigned int index = (unsigned int)g_pool->workers.size();
        g_pool->workers.push_back(std::make_unique<Worker>());
        try {
            std::thread(worker_main, g_pool->workers.back().get(), index).detach();
        } catch (const std::exception& e) {
            fatal(format("cannot start CUDA thread %u: %s", index, e.what()));
        }
    }
}

double deadlock_seconds() {
    const char* s = std::getenv("BNHOST_DEADLOCK_SECONDS");
    if (s != nullptr) {
        const double v = std::atof(s);
        if (v > 0) return v;
    }
    return 10.0;
}

// Lists the ids of the threads in `state` as ranges, e.g. "0-31, 40".
std::string threads_in(const Block& b, int state) {
    std::string out;
    unsigned int t = 0, count = 0;
    while (t < b.nthreads) {
        if (b.state[t].load(std::memory_order_relaxed) != state) {
            ++t;
            continue;
        }
        unsigned int end = t;
        while (end + 1 < b.nthreads && b.state[end + 1].load(std::memory_order_relaxed) == state) ++end;
        if (count++ < 16) {
            if (!out.empty()) out += ", ";
            out += end == t ? format("%u", t) : format("%u-%u", t, end);
        }
        t = end + 1;
    }
    if (count > 16) out += ", ...";
    return out.empty() ? "none" : out;
}

// Runs one block on the pool and waits for it. A watchdog turns a
// hang (every live thread waiting in __syncthreads or a shuffle, and no
// barrier or shuffle completing for BNHOST_DEADLOCK_SECONDS, default 10 s)
// into a diagnosis on stderr and abort(): a hung test is worse than a
// crashed one. Nothing can be recovered from a deadlocked block anyway.
void run_block(unsigned int nthreads, KernelBody body, void* const* args) {
    // Shared memory starts undefined on a GPU: poison it (see __shared__).
    if (const unsigned long long n = shared_bytes(); n != 0) std::memset(bnhost_shared_begin, 0xff, n);

    Block b(nthreads, block_idx);
    grow_pool(nthreads);
    const unsigned long long job = ++g_pool->jobs;
    for (unsigned int t = 0; t < nthreads; ++t) {
        Worker& w = *g_pool->workers[t];
        {
            std::lock_guard<std::mutex> lock(w.m);
            w.block = &b;
            w.body = body;
            w.args = args;
            w.job = job;
        }
        w.wake.notify_one();
    }

    const auto limit = std::chrono::duration<double>(deadlock_seconds());
    auto stuck_since = std::chrono::steady_clock::now();
    unsigned long long last_progress = ~0ull;
    {
        std::unique_lock<std::mutex> lock(b.done_m);
        while (!b.done_cv.wait_for(lock, std::chrono::milliseconds(200),
                                   [&] { return b.done == nthreads; })) {
            const auto now = std::chrono::steady_clock::now();
            const unsigned long long p = b.progress.load(std::memory_order_relaxed);
            bool all_waiting = true;
            for (unsigned int t = 0; t < nthreads && all_waiting; ++t)
                all_waiting = b.state[t].load(std::memory_order_relaxed) != kRunning;
            if (!all_waiting || p != last_progress) {
                last_progress = p;
                stuck_since = now;
            } else if (now - stuck_since >= limit) {
                fatal(format(
                    "deadlock in %s, block (%u,%u,%u) of %u threads: nothing moved for %.1f s.\n"
                    "  waiting in __syncthreads: %s\n  waiting in a warp shuffle: %s\n"
                    "  exited: %s\n(A __syncthreads or shuffle that not all threads of the "
                    "block / lanes of the mask reach.)",
                    g_kernel, b.index.x, b.index.y, b.index.z, nthreads,
                    std::chrono::duration<double>(now - stuck_since).count(),
                    threads_in(b, kAtSyncthreads).c_str(), threads_in(b, kAtShuffle).c_str(),
                    threads_in(b, kExited).c_str()));
            }
        }
    }
}

}  // namespace

void syncthreads() {
    Block& b = current_block();
    const unsigned int k = ++t_syncs;
    b.state[t_linear].store(kAtSyncthreads, std::memory_order_relaxed);
    b.barrier.arrive_and_wait();
    b.state[t_linear].store(kRunning, std::memory_order_relaxed);
    const unsigned int exited_after = b.min_exit_syncs.load(std::memory_order_relaxed);
    if (exited_after < k)
        record(format("%s: __syncthreads() #%u was passed because a thread of the block had "
                      "exited after only %u __syncthreads() (divergent barrier: on a GPU this "
                      "hangs or misbehaves)",
                      where().c_str(), k, exited_after));
}

int lane_id() { return (int)(t_linear % kWarpSize); }

unsigned long long warp_exchange(unsigned int mask, unsigned long long bits, int src_lane,
                                 const char* what) {
    Block& b = current_block();
    const unsigned int lane = t_linear % kWarpSize;
    const unsigned int bit = 1u << lane;
    if ((mask & bit) == 0) {
        record(format("%s: %s called with mask 0x%08x, which does not contain the calling lane %u",
                      where().c_str(), what, mask, lane));
        mask |= bit;  // take part anyway, so that nobody waits for nothing
    }
    Warp& w = b.warps[t_linear / kWarpSize];
    b.state[t_linear].store(kAtShuffle, std::memory_order_relaxed);
    std::unique_lock<std::mutex> lock(w.m);
    for (;;) {
        if (!w.open) {  // open a new round
            w.open = true;
            w.reading = false;
            w.round_mask = mask;
            w.arrived = w.departed = 0;
            break;
        }
        if (!w.reading && w.round_mask == mask) break;  // join the collecting round
        if (!w.reading && (w.round_mask & bit)) {
            // The open round counts on this lane, but it came with another
            // mask: lanes disagree (undefined in CUDA). Join to avoid a hang.
            record(format("%s: %s with mask 0x%08x while other lanes of the warp use mask 0x%08x",
                          where().c_str(), what, mask, w.round_mask));
            break;
        }
        w.cv.wait(lock);  // another group's round is in progress
    }
    w.slot[lane] = bits;
    w.arrived |= bit;
    if (w.all_arrived()) {
        w.reading = true;
        b.progress.fetch_add(1, std::memory_order_relaxed);
        w.cv.notify_all();
    } else {
        w.cv.wait(lock, [&] { return w.reading; });
    }
    const bool valid = src_lane >= 0 && src_lane < (int)kWarpSize && ((w.arrived >> src_lane) & 1u);
    const unsigned long long out = valid ? w.slot[src_lane] : kPoison;
    w.departed |= bit;
    if (w.departed == w.arrived) {  // last reader closes the round
        w.open = false;
        w.reading = false;
        b.progress.fetch_add(1, std::memory_order_relaxed);
        w.cv.notify_all();
    }
    lock.unlock();
    b.state[t_linear].store(kRunning, std::memory_order_relaxed);
    return out;
}

void kernel_error(const char* message) { record(format("%s: %s", where().c_str(), message)); }

int launch_grid(const char* kernel_name, dim3 grid, dim3 block, KernelBody body,
                void* const* args) {
    std::lock_guard<std::mutex> one_at_a_time(g_launch_m);
    {
        std::lock_guard<std::mutex> lock(g_error_m);
        g_first_error.clear();
        g_error_count = 0;
        g_error_text.clear();
    }
    g_kernel = kernel_name;
    const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    // CUDA's limits (compute capability 7.0 - 12.x).
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 ||
        block.z == 0 || nthreads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535 ||
        grid.x > 2147483647u) {
        set_error(format("%s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)",
                         kernel_name, grid.x, grid.y, grid.z, block.x, block.y, block.z)
                      .c_str());
        return -3;
    }
    grid_dim = grid;
    block_dim = block;
    // blockIdx.x varies fastest, as in the usual linearisation.
    for (unsigned int z = 0; z < grid.z; ++z)
        for (unsigned int y = 0; y < grid.y; ++y)
            for (unsigned int x = 0; x < grid.x; ++x) {
                block_idx = uint3{x, y, z};
                run_block((unsigned int)nthreads, body, args);
            }
    std::lock_guard<std::mutex> lock(g_error_m);
    if (g_error_count == 0) return 0;
    g_error_text = g_first_error;
    if (g_error_count > 1) g_error_text += format(" (and %lu more)", g_error_count - 1);
    return -2;
}

void set_error(const char* message) {
    std::lock_guard<std::mutex> lock(g_error_m);
    g_error_text = message;
}

const char* last_error() {
    std::lock_guard<std::mutex> lock(g_error_m);
    return g_error_text.c_str();
}

unsigned long long shared_bytes() {
    char* begin = bnhost_shared_begin;  // null when linked without the script
    char* end = bnhost_shared_end;
    return begin != nullptr && end > begin ? (unsigned long long)(end - begin) : 0;
}

}  // namespace bnhost

#endif  // BNHOST_IMPLEMENTATION
