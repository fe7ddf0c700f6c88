// Shared-memory layout and the two "tile math" back ends of the block attention kernel.
//
// The kernel (block_attention.cu) owns the loop: load a K/V tile, S = Q K^T (tile math), masked online softmax
// (kernel), O = alpha * O + P V (tile math). Only the two products and the O accumulator differ by dtype:
//   * WmmaMath: bf16/fp16 inputs on tensor cores (nvcuda::wmma 16x16x16, fp32 accumulators); each of the 4
//     warps owns 16 of the 64 packed query rows.
//   * SimtMath: fp32 inputs on CUDA cores (exact fp32, the debugging/parity path); a 16x8 thread grid.
#ifndef TRIMODE_BLOCK_ATTENTION_TILE_CUH
#define TRIMODE_BLOCK_ATTENTION_TILE_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "block_attention_common.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "trimode block attention needs sm_80 or newer (bf16 tensor cores); build with CUDA_ARCHS for sm_80/sm_90"
#endif

namespace trimode {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarpRows = 16;  // packed query rows per warp in WmmaMath

// Byte offsets into the dynamic shared memory of one thread block. Row strides are padded by 16 bytes to spread
// tensor-core and SIMT loads over the banks; every region starts on a multiple of 128 bytes (WMMA needs 32).
template <typename T, int D>
struct SmemLayout {
    static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
    static constexpr int ld_qkv = D + kPad;        // Q, K, V rows (elements)
    static constexpr int ld_s = kTileKeys + 4;     // S rows (floats)
    static constexpr int ld_p = kTileKeys + kPad;  // P rows (elements)
    static constexpr int ld_o = D + 4;             // O staging rows (floats), overlaid on K and V at the end
    static constexpr size_t q_bytes = size_t(kTileRows) * ld_qkv * sizeof(T);
    static constexpr size_t kv_bytes = size_t(kTileKeys) * ld_qkv * sizeof(T);
    static constexpr size_t s_bytes = size_t(kTileRows) * ld_s * sizeof(float);
    static constexpr size_t p_bytes = size_t(kTileRows) * ld_p * sizeof(T);
    static constexpr size_t q_off = 0;
    static constexpr size_t k_off = q_off + q_bytes;
    static constexpr size_t v_off = k_off + kv_bytes;
    static constexpr size_t s_off = v_off + kv_bytes;
    static constexpr size_t p_off = s_off + s_bytes;
    static constexpr size_t stat_off = p_off + p_bytes;  // m, l, alpha: kTileRows floats each
    static constexpr size_t src_off = stat_off + 3 * kTileRows * sizeof(float);  // 2 x kTileKeys key sources
    static constexpr size_t total = src_off + 2 * kTileKeys * sizeof(int);
    static_assert(size_t(kTileRows) * ld_o * sizeof(float) <= 2 * kv_bytes, "O staging must fit over K and V");
    static_assert(q_bytes % 128 == 0 && kv_bytes % 128 == 0 && s_bytes % 128 == 0 && p_bytes % 128 == 0 &&
                      src_off % 128 == 0,
                  "regions must stay 128-byte aligned");
};

// bf16/fp16 on tensor cores. O lives in accumulator fragments; to rescale its rows by the softmax correction
// (alpha) we need the row of each fragment element, whose mapping WMMA leaves opaque, so `row_of` is an
// accumulator fragment loaded from a 16x16 matrix whose entry (r, c) is r: same fragment type, same mapping.
template <typename T, int D>
struct WmmaMath {
    using L = SmemLayout<T, D>;
    using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
    using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
    using FragKt = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
    using FragV = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;

    Acc o[D / 16];
    Acc row_of;
    FragA qf[D / 16];
    int warp;
    bool active;  // false when all 16 rows of this warp are padding: skip the math, keep the barriers

    // Before the first barrier: write the row-index matrix into `scratch` (16x16 floats, ld 16).
    __device__ static void prepare(float* scratch) {
        for (int i = threadIdx.x; i < 256; i += kThreads) scratch[i] = static_cast<float>(i / 16);
    }

    // After the barrier that published Q and `scratch`.
    __device__ void begin(const T* qs, const float* scratch, int rows_valid) {
        warp = threadIdx.x / 32;
        active = warp * kWarpRows < rows_valid;
        nvcuda::wmma::load_matrix_sync(row_of, scratch, 16, nvcuda::wmma::mem_row_major);
#pragma unroll
        for (int f = 0; f < D / 16; ++f) {
            nvcuda::wmma::fill_fragment(o[f], 0.0f);
            nvcuda::wmma::load_matrix_sync(qf[f], qs + warp * kWarpRows * L::ld_qkv + f * 16, L::ld_qkv);
        }
    }

    // S[rows of this warp][0..kTileKeys) = Q K^T, raw dot products.
    __device__ void scores(const T* ks, float* ss) {
        if (!active) return;
#pragma unroll
        for (int n = 0; n < kTileKeys / 16; ++n) {
            Acc acc;
            nvcuda::wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int k = 0; k < D / 16; ++k) {
                FragKt kf;  // K stored [key][dim] row-major is K^T column-major
                nvcuda::wmma::load_matrix_sync(kf, ks + n * 16 * L::ld_qkv + k * 16, L::ld_qkv);
                nvcuda::wmma::mma_sync(acc, qf[k], kf, acc);
            }
            nvcuda::wmma::store_matrix_sync(ss + warp * kWarpRows * L::ld_s + n * 16, acc, L::ld_s,
                                            nvcuda::wmma::mem_row_major);
        }
    }

    // O = alpha * O + P V for the rows of this warp.
    __device__ void accumulate(const float* alpha, const T* ps, const T* vs) {
        if (!active) return;
        const float* my_alpha = alpha + warp * kWarpRows;
#pragma unroll
        for (int f = 0; f < D / 16; ++f)
#pragma unroll
            for (int i = 0; i < Acc::num_elements; ++i) o[f].x[i] *= my_alpha[static_cast<int>(row_of.x[i])];
        FragA pf[kTileKeys / 16];
#pragma unroll
        for (int k = 0; k < kTileKeys / 16; ++k)
            nvcuda::wmma::load_matrix_sync(pf[k], ps + warp * kWarpRows * L::ld_p + k * 16, L::ld_p);
#pragma unroll
        for (int f = 0; f < D / 16; ++f) {
#pragma unroll
            for (int k = 0; k < kTileKeys / 16; ++k) {
                FragV vf;
                nvcuda::wmma::load_matrix_sync(vf, vs + k * 16 * L::ld_qkv + f * 16, L::ld_qkv);
                nvcuda::wmma::mma_sync(o[f], pf[k], vf, o[f]);
            }
        }
    }

    __device__ void store_o(float* os) const {
        if (!active) return;
#pragma unroll
        for (int f = 0; f < D / 16; ++f)
            nvcuda::wmma::store_matrix_sync(os + warp * kWarpRows * L::ld_o + f * 16, o[f], L::ld_o,
                                            nvcuda::wmma::mem_row_major);
    }
};

// fp32 on CUDA cores: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 8i (i < 8) and columns tx + 16j.
template <int D>
struct SimtMath {
    using L = SmemLayout<float, D>;
    float o[8][D / 16];
    int ty, tx;

    __device__ static void prepare(float*) {}

    __device__ void begin(const float* qs, const float*, int) {
        qs_ = qs;  // Q stays in shared memory: every thread reads eight of its rows
        ty = threadIdx.x / 16;
        tx = threadIdx.x % 16;
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < D / 16; ++j) o[i][j] = 0.0f;
    }

    __device__ void scores(const float* ks, float* ss) const {
        float acc[8][4] = {};
        for (int d = 0; d < D; ++d) {
            float a[8], k[4];
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = qs_[(ty + 8 * i) * L::ld_qkv + d];
#pragma unroll
            for (int j = 0; j < 4; ++j) k[j] = ks[(tx + 16 * j) * L::ld_qkv + d];
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], k[j], acc[i][j]);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) ss[(ty + 8 * i) * L::ld_s + tx + 16 * j] = acc[i][j];
    }

    __device__ void accumulate(const float* alpha, const float* ps, const float* vs) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float a = alpha[ty + 8 * i];
#pragma unroll
            for (int j = 0; j < D / 16; ++j) o[i][j] *= a;
        }
        for (int n = 0; n < kTileKeys; ++n) {
            float p[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) p[i] = ps[(ty + 8 * i) * L::ld_p + n];
#pragma unroll
            for (int j = 0; j < D / 16; ++j) {
                const float v = vs[n * L::ld_qkv + tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 8; ++i) o[i][j] = fmaf(p[i], v, o[i][j]);
            }
        }
    }

    __device__ void store_o(float* os) const {
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < D / 16; ++j) os[(ty + 8 * i) * L::ld_o + tx + 16 * j] = o[i][j];
    }

    const float* qs_;
};

template <typename T, int D>
struct MathFor {
    using type = WmmaMath<T, D>;
};
template <int D>
struct MathFor<float, D> {
    using type = SimtMath<D>;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace trimode

#endif  // TRIMODE_BLOCK_ATTENTION_TILE_CUH
