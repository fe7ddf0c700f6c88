// A CPU emulation of exactly the CUDA features the block attention kernels use, so that their source
// (block_attention_kernels.cuh) can be compiled by g++ and executed on a machine without a GPU.
//
// Each CUDA thread of a block is a cooperative fiber on ONE OS thread (x86-64 context switch below); a fiber
// runs until it reaches __syncthreads / a warp shuffle / a WMMA mma, where it yields until every thread of
// the block (or warp) has arrived, as on the GPU. Emulated:
//   threadIdx, blockIdx, __syncthreads, __shfl_xor_sync, dynamic shared memory (filled with NaN bytes before
//   every block, so a read of memory the kernel never wrote shows up as NaN in the output), __half and
//   __nv_bfloat16 (bit-exact round-to-nearest-even), and nvcuda::wmma 16x16x16 fragments with a deliberately
//   scrambled element-to-lane mapping (so code that assumes a mapping fails), alignment checks (32 bytes)
//   and ldm checks on every load/store, products of the 16-bit inputs accumulated in fp32.
// A divergent barrier (some threads never arrive) aborts with a message instead of hanging.
// What it cannot show: performance, the memory model between blocks, real tensor-core rounding order.
#ifndef TRIMODE_CUDA_EMULATION_H
#define TRIMODE_CUDA_EMULATION_H

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "float16_convert.h"

#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint4 {
    unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

struct EmuDim3 {
    unsigned int x = 0, y = 0, z = 0;
};
inline EmuDim3 threadIdx;
inline EmuDim3 blockIdx;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) { return trimode::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{trimode::float_to_half(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return trimode::bf16_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{trimode::float_to_bf16(f)}; }

namespace trimode_emu {

inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "trimode CUDA emulation: %s\n", what);
    std::abort();
}

// ---- fibers -------------------------------------------------------------------------------------------------
extern "C" void trimode_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl trimode_emu_switch
    .hidden trimode_emu_switch
    .type trimode_emu_switch,@function
trimode_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size trimode_emu_switch, .-trimode_emu_switch
)");

struct Barrier {
    int expected = 0;
    int count = 0;
    unsigned generation = 0;
};

struct WarpState {
    Barrier barrier;
    float shuffle[2][32] = {};
    int shuffle_phase[32] = {};
    float mma[2][3][256] = {};  // A, B, C of one mma, double-buffered like the shuffles
    int mma_phase[32] = {};
};

struct Scheduler {
    static constexpr size_t kStackBytes = 256 * 1024;
    std::vector<std::vector<unsigned char>> stacks;
    std::vector<void*> sp;
    std::vector<char> done;
    std::vector<WarpState> warps;
    Barrier block_barrier;
    void* scheduler_sp = nullptr;
    int current = 0;
    int threads = 0;
    long long idle_yields = 0;  // yields since the last barrier release / thread exit: deadlock detection
    const std::function<void()>* body = nullptr;
};
inline Scheduler g_sched;

inline void yield() {
    Scheduler& s = g_sched;
    if (++s.idle_yields > 64LL * s.threads + 1024) fail("deadlock: a barrier is never reached by every thread");
    trimode_emu_switch(&s.sp[s.current], s.scheduler_sp);
}

inline void barrier_wait(Barrier& b) {
    const unsigned generation = b.generation;
    if (++b.count == b.expected) {
        b.count = 0;
        ++b.generation;
        g_sched.idle_yields = 0;
        return;
    }
    while (b.generation == generation) yield();
}

inline void fiber_main() {
    Scheduler& s = g_sched;
    (*s.body)();
    s.done[s.current] = 1;
    s.idle_yields = 0;
    trimode_emu_switch(&s.sp[s.current], s.scheduler_sp);
    fail("a finished fiber was resumed");
}

// Runs `body` as `threads` cooperative CUDA threads of the block blockIdx (set by the caller).
inline void run_block(int threads, const std::function<void()>& body) {
    Scheduler& s = g_sched;
    if (threads % 32 != 0) fail("block size must be a multiple of 32");
    s.threads = threads;
    s.body = &body;
    s.stacks.resize(threads);
    s.sp.assign(threads, nullptr);
    s.done.assign(threads, 0);
    s.warps.assign(threads / 32, WarpState{});
    for (WarpState& w : s.warps) w.barrier.expected = 32;
    s.block_barrier = Barrier{threads, 0, 0};
    for (int t = 0; t < threads; ++t) {
        std::vector<unsigned char>& stack = s.stacks[t];
        stack.resize(Scheduler::kStackBytes);
        uintptr_t top = (reinterpret_cast<uintptr_t>(stack.data()) + stack.size()) & ~uintptr_t(15);
        auto* slot = reinterpret_cast<uint64_t*>(top);
        slot[-1] = 0;                                               // fake return address of fiber_main
        slot[-2] = reinterpret_cast<uint64_t>(&fiber_main);         // popped by `ret`
        for (int r = 3; r <= 8; ++r) slot[-r] = 0;                  // rbp rbx r12 r13 r14 r15
        slot[-9] = 0x1F80u | (static_cast<uint64_t>(0x037Fu) << 32);  // mxcsr, x87 control word
        s.sp[t] = &slot[-9];
    }
    int remaining = threads;
    s.idle_yields = 0;
    while (remaining > 0) {
        for (int t = 0; t < threads; ++t) {
            if (s.done[t]) continue;
            s.current = t;
            threadIdx = EmuDim3{static_cast<unsigned>(t), 0, 0};
            trimode_emu_switch(&s.scheduler_sp, s.sp[t]);
            if (s.done[t]) --remaining;
        }
    }
}

inline WarpState& my_warp() { return g_sched.warps[threadIdx.x / 32]; }

}  // namespace trimode_emu

inline void __syncthreads() { trimode_emu::barrier_wait(trimode_emu::g_sched.block_barrier); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
    if (mask != 0xffffffffu) trimode_emu::fail("only full-warp shuffles are emulated");
    trimode_emu::WarpState& w = trimode_emu::my_warp();
    const int lane = threadIdx.x % 32;
    const int phase = w.shuffle_phase[lane];
    w.shuffle_phase[lane] ^= 1;
    w.shuffle[phase][lane] = value;
    trimode_emu::barrier_wait(w.barrier);
    return w.shuffle[phase][lane ^ lane_mask];
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Element i of lane l holds logical entry ((i * 32 + l) * 37) % 256 of the 16x16 tile (row-major index):
// a bijection that is neither row- nor column-ordered, so only layout-agnostic code passes.
inline int element_index(int i) { return ((i * 32 + static_cast<int>(threadIdx.x % 32)) * 37) % 256; }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 fragments are emulated");
    static constexpr int num_elements = 8;
    T x[num_elements];
};

inline void check_pointer(const void* p, unsigned ldm, size_t elem) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) trimode_emu::fail("WMMA pointer not 32-byte aligned");
    if ((ldm * elem) % 16 != 0) trimode_emu::fail("WMMA ldm is not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    check_pointer(p, ldm, sizeof(T));
    constexpr bool row = std::is_same<Layout, row_major>::value;
    for (int i = 0; i < 8; ++i) {
        const int idx = element_index(i), r = idx / 16, c = idx % 16;
        f.x[i] = row ? p[r * ldm + c] : p[c * ldm + r];
    }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
    check_pointer(p, ldm, sizeof(float));
    for (int i = 0; i < 8; ++i) {
        const int idx = element_index(i), r = idx / 16, c = idx % 16;
        f.x[i] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
    }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
    check_pointer(p, ldm, sizeof(float));
    for (int i = 0; i < 8; ++i) {
        const int idx = element_index(i), r = idx / 16, c = idx % 16;
        (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[i];
    }
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
    for (int i = 0; i < 8; ++i) f.x[i] = value;
}

// D = A B + C over the warp: every lane publishes its elements, then computes its own elements of D.
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    trimode_emu::WarpState& w = trimode_emu::my_warp();
    const int lane = threadIdx.x % 32;
    const int phase = w.mma_phase[lane];
    w.mma_phase[lane] ^= 1;
    float(&m)[3][256] = w.mma[phase];
    for (int i = 0; i < 8; ++i) {
        const int idx = element_index(i);
        m[0][idx] = trimode_emu::to_f(a.x[i]);
        m[1][idx] = trimode_emu::to_f(b.x[i]);
        m[2][idx] = c.x[i];
    }
    trimode_emu::barrier_wait(w.barrier);
    for (int i = 0; i < 8; ++i) {
        const int idx = element_index(i), r = idx / 16, col = idx % 16;
        float acc = m[2][idx];
        for (int k = 0; k < 16; ++k) acc += m[0][r * 16 + k] * m[1][k * 16 + col];
        d.x[i] = acc;
    }
}

}  // namespace wmma
}  // namespace nvcuda

#endif  // TRIMODE_CUDA_EMULATION_H
