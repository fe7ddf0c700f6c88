// Device code of the block attention kernels (see block_attention.cu for the design). Kept apart from the
// host-side launch code so that the very same kernel source can also be compiled for the CPU against the CUDA
// emulation in emulation/cuda_emulation.h, which is how the kernel logic is tested on machines without a GPU.
#ifndef TRIMODE_BLOCK_ATTENTION_KERNELS_CUH
#define TRIMODE_BLOCK_ATTENTION_KERNELS_CUH

#include "block_attention.h"
#include "block_attention_common.h"
#include "block_attention_tile.cuh"

namespace trimode {

struct KernelArgs {
    const void* q;
    const void* k_new;
    const void* v_new;
    void* k_cache;
    void* v_cache;
    const int32_t* slots;
    const int32_t* cache_lens;
    const int32_t* chunk_lens;
    const int32_t* mask_kind_device;  // NULL: mask_kind below; else read by every block (see load_sequence)
    void* out;
    float* part_o;    // [splits][B*T*Hq][D]
    float* part_lse;  // [splits][B*T*Hq], log2 domain
    int batch, chunk, num_heads, num_kv_heads, group, cache_slots, cache_capacity;
    int mask_kind, write_kv;
    float scale_log2;  // scale * log2(e): the softmax runs on exp2
    int splits, split_keys;
};

// Host side: the kernel arguments of one call; shared by the CUDA launcher and the CPU emulation.
inline KernelArgs make_kernel_args(const TrimodeAttentionParams* p, const SplitPlan& plan) {
    KernelArgs a{};
    a.q = p->q;
    a.k_new = p->k_new;
    a.v_new = p->v_new;
    a.k_cache = p->k_cache;
    a.v_cache = p->v_cache;
    a.slots = p->slots;
    a.cache_lens = p->cache_lens;
    a.chunk_lens = p->chunk_lens;
    a.mask_kind_device = p->mask_kind_device;
    a.out = p->out;
    a.batch = p->batch;
    a.chunk = p->chunk;
    a.num_heads = p->num_heads;
    a.num_kv_heads = p->num_kv_heads;
    a.group = p->num_heads / p->num_kv_heads;
    a.cache_slots = p->cache_slots;
    a.cache_capacity = p->cache_capacity;
    a.mask_kind = p->mask_kind;
    a.write_kv = p->write_kv != 0;
    a.scale_log2 = p->scale * 1.4426950408889634f;
    a.splits = plan.splits;
    a.split_keys = plan.split_keys;
    if (plan.splits > 1) {
        const size_t rows = static_cast<size_t>(p->batch) * p->chunk * p->num_heads;
        a.part_o = static_cast<float*>(p->workspace);
        a.part_lse = a.part_o + static_cast<size_t>(plan.splits) * rows * p->head_dim;
    }
    return a;
}

struct Sequence {
    int slot, past, n;
    bool causal;
};

// The per-sequence view of the device data, clamped (device data cannot be validated without a host sync).
// The mask kind comes from memory when mask_kind_device is set: a value other than causal/bidirectional makes
// the sequence empty, like a bad slot (zero output, no cache write), in the attention and combine kernels alike.
__device__ __forceinline__ Sequence load_sequence(const KernelArgs& a, int b) {
    Sequence s;
    const int mask_kind = a.mask_kind_device ? a.mask_kind_device[0] : a.mask_kind;
    s.causal = mask_kind == TRIMODE_MASK_CAUSAL;
    s.slot = a.slots ? a.slots[b] : b;
    s.past = min(max(a.cache_lens[b], 0), a.cache_capacity);
    s.n = min(max(a.chunk_lens[b], 0), a.chunk);
    if (s.slot < 0 || s.slot >= a.cache_slots) s.n = 0;
    if (mask_kind != TRIMODE_MASK_CAUSAL && mask_kind != TRIMODE_MASK_BIDIRECTIONAL) s.n = 0;
    return s;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Copies `rows` rows of D elements into shared memory (row stride ld) with 16-byte vectors; a row whose source
// is null is zero-filled, so masked keys never bring NaN/Inf garbage into P V.
template <typename T, int D, typename RowSource>
__device__ __forceinline__ void load_rows(T* dst, int ld, int rows, RowSource source) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kVecsPerRow = D / kVec;
    for (int i = threadIdx.x; i < rows * kVecsPerRow; i += kThreads) {
        const int r = i / kVecsPerRow;
        const int c = (i % kVecsPerRow) * kVec;
        const T* src = source(r);
        const uint4 value = src ? *reinterpret_cast<const uint4*>(src + c) : make_uint4(0u, 0u, 0u, 0u);
        *reinterpret_cast<uint4*>(dst + r * ld + c) = value;
    }
}

template <typename T, int D>
__device__ void write_chunk_kv(const KernelArgs& a, int b, int h, const Sequence& s) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kVecsPerRow = D / kVec;
    const T* k_new = static_cast<const T*>(a.k_new);
    const T* v_new = static_cast<const T*>(a.v_new);
    T* k_cache = static_cast<T*>(a.k_cache);
    T* v_cache = static_cast<T*>(a.v_cache);
    for (int i = threadIdx.x; i < s.n * kVecsPerRow; i += kThreads) {
        const int t = i / kVecsPerRow;
        const int c = (i % kVecsPerRow) * kVec;
        const int pos = s.past + t;
        if (pos >= a.cache_capacity) continue;
        const long long src = ((static_cast<long long>(b) * a.chunk + t) * a.num_kv_heads + h) * D + c;
        const long long dst =
            ((static_cast<long long>(s.slot) * a.cache_capacity + pos) * a.num_kv_heads + h) * D + c;
        *reinterpret_cast<uint4*>(k_cache + dst) = *reinterpret_cast<const uint4*>(k_new + src);
        *reinterpret_cast<uint4*>(v_cache + dst) = *reinterpret_cast<const uint4*>(v_new + src);
    }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_kernel(KernelArgs a) {
    using L = SmemLayout<T, D>;
    using Math = typename MathFor<T, D>::type;
    extern __shared__ __align__(128) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem + L::q_off);
    T* ks = reinterpret_cast<T*>(smem + L::k_off);
    T* vs = reinterpret_cast<T*>(smem + L::v_off);
    float* ss = reinterpret_cast<float*>(smem + L::s_off);
    T* ps = reinterpret_cast<T*>(smem + L::p_off);
    float* m_s = reinterpret_cast<float*>(smem + L::stat_off);
    float* l_s = m_s + kTileRows;
    float* alpha_s = l_s + kTileRows;
    float* os = reinterpret_cast<float*>(smem + L::k_off);  // epilogue only, after the last K/V use

    const int tile = blockIdx.x;
    const int b = blockIdx.y / a.num_kv_heads;
    const int h = blockIdx.y % a.num_kv_heads;
    const int split = blockIdx.z;
    const int G = a.group;
    const Sequence seq = load_sequence(a, b);
    const int row0 = tile * kTileRows;
    const int rows_total = min(kTileRows, a.chunk * G - row0);       // rows of this tile inside [0, T*G)
    const int rows_valid = max(0, min(rows_total, seq.n * G - row0));  // rows with t < n_b

    if (a.write_kv && tile == 0 && split == 0) write_chunk_kv<T, D>(a, b, h, seq);

    T* out = static_cast<T*>(a.out);
    auto out_row = [&](int r) -> long long {  // element offset of packed row r in out (and q)
        const int R = row0 + r;
        return ((static_cast<long long>(b) * a.chunk + R / G) * a.num_heads + h * G + R % G) * D;
    };
    if (rows_valid == 0) {  // padding only: the output rows are zeros (the combine kernel zeros them when split)
        if (a.splits == 1)
            for (int i = threadIdx.x; i < rows_total * D; i += kThreads)
                out[out_row(i / D) + i % D] = from_float<T>(0.0f);
        return;
    }

    const T* q = static_cast<const T*>(a.q);
    load_rows<T, D>(qs, L::ld_qkv, kTileRows,
                    [&](int r) -> const T* { return r < rows_valid ? q + out_row(r) : nullptr; });
    for (int r = threadIdx.x; r < kTileRows; r += kThreads) {
        m_s[r] = -INFINITY;
        l_s[r] = 0.0f;
    }
    Math::prepare(ss);
    __syncthreads();
    Math math;
    math.begin(qs, ss, rows_valid);

    // Keys this tile can see: causal rows stop at their own chunk token, so the last valid row bounds the range.
    const int t_last = (row0 + rows_valid - 1) / G;
    const int kv_total = seq.causal ? seq.past + t_last + 1 : seq.past + seq.n;
    const int kv_begin = split * a.split_keys;
    const int kv_end = split == a.splits - 1 ? kv_total : min(kv_total, kv_begin + a.split_keys);

    const T* k_cache = static_cast<const T*>(a.k_cache);
    const T* v_cache = static_cast<const T*>(a.v_cache);
    const T* k_new = static_cast<const T*>(a.k_new);
    const T* v_new = static_cast<const T*>(a.v_new);
    const long long cache_row0 = static_cast<long long>(seq.slot) * a.cache_capacity;
    const long long new_row0 = static_cast<long long>(b) * a.chunk;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;

    for (int j0 = kv_begin; j0 < kv_end; j0 += kTileKeys) {
        auto key_row = [&](int r) -> long long {  // element offset of key j0 + r in its source, -1 if masked
            const int j = j0 + r;
            if (j >= kv_end) return -1;
            const long long row = j < seq.past ? cache_row0 + j : new_row0 + (j - seq.past);
            return (row * a.num_kv_heads + h) * D;
        };
        load_rows<T, D>(ks, L::ld_qkv, kTileKeys, [&](int r) -> const T* {
            const long long off = key_row(r);
            return off < 0 ? nullptr : (j0 + r < seq.past ? k_cache : k_new) + off;
        });
        load_rows<T, D>(vs, L::ld_qkv, kTileKeys, [&](int r) -> const T* {
            const long long off = key_row(r);
            return off < 0 ? nullptr : (j0 + r < seq.past ? v_cache : v_new) + off;
        });
        __syncthreads();
        math.scores(ks, ss);
        __syncthreads();
        // Masked online softmax: warp w owns rows 16w..16w+15, each lane two key columns.
        for (int i = 0; i < kWarpRows; ++i) {
            const int r = warp * kWarpRows + i;
            const int t = (row0 + r) / G;
            float s[2];
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int col = lane + 32 * c;
                const int j = j0 + col;
                const bool visible = r < rows_valid && j < kv_end &&
                                     (!seq.causal || j - seq.past <= t);
                s[c] = visible ? ss[r * L::ld_s + col] * a.scale_log2 : -INFINITY;
            }
            const float m_old = m_s[r];
            const float m_new = fmaxf(m_old, warp_max(fmaxf(s[0], s[1])));
            float sum = 0.0f;
            float alpha = 1.0f;
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                // Sum the probabilities as rounded for P V, so that O / l stays a convex combination.
                const T p = from_float<T>(m_new == -INFINITY ? 0.0f : exp2f(s[c] - m_new));
                ps[r * L::ld_p + lane + 32 * c] = p;
                sum += to_float(p);
            }
            if (m_new != -INFINITY) alpha = exp2f(m_old - m_new);
            sum = warp_sum(sum);
            if (lane == 0) {
                m_s[r] = m_new;
                l_s[r] = l_s[r] * alpha + sum;
                alpha_s[r] = alpha;
            }
        }
        __syncthreads();
        math.accumulate(alpha_s, ps, vs);
        __syncthreads();
    }

    math.store_o(os);
    __syncthreads();
    if (a.splits == 1) {
        for (int i = threadIdx.x; i < rows_total * D; i += kThreads) {
            const int r = i / D;
            const float l = l_s[r];
            const float value = r < rows_valid && l > 0.0f ? os[r * L::ld_o + i % D] / l : 0.0f;
            out[out_row(r) + i % D] = from_float<T>(value);
        }
    } else {
        const long long rows = static_cast<long long>(a.batch) * a.chunk * a.num_heads;
        float* part_o = a.part_o + split * rows * D;
        for (int i = threadIdx.x; i < rows_valid * D; i += kThreads) {
            const int r = i / D;
            const float l = l_s[r];
            part_o[out_row(r) + i % D] = l > 0.0f ? os[r * L::ld_o + i % D] / l : 0.0f;
        }
        for (int r = threadIdx.x; r < rows_valid; r += kThreads) {
            const float l = l_s[r];
            a.part_lse[split * rows + out_row(r) / D] = l > 0.0f ? m_s[r] + log2f(l) : -INFINITY;
        }
    }
}

// Merges the split partial results of one output row (blockIdx.x = (b * T + t) * Hq + hq), one thread per dim.
template <typename T, int D>
__global__ void __launch_bounds__(D) combine_kernel(KernelArgs a) {
    const long long rows = static_cast<long long>(a.batch) * a.chunk * a.num_heads;
    const long long row = blockIdx.x;
    const int t = static_cast<int>((row / a.num_heads) % a.chunk);
    const int b = static_cast<int>(row / (static_cast<long long>(a.num_heads) * a.chunk));
    const Sequence seq = load_sequence(a, b);
    T* out = static_cast<T*>(a.out) + row * D;
    float value = 0.0f;
    if (t < seq.n) {
        float m = -INFINITY;
        for (int s = 0; s < a.splits; ++s) m = fmaxf(m, a.part_lse[s * rows + row]);
        if (m != -INFINITY) {
            float num = 0.0f, den = 0.0f;
            for (int s = 0; s < a.splits; ++s) {
                const float w = exp2f(a.part_lse[s * rows + row] - m);
                den += w;
                num += w * a.part_o[(s * rows + row) * D + threadIdx.x];
            }
            value = num / den;
        }
    }
    out[threadIdx.x] = from_float<T>(value);
}

}  // namespace trimode

#endif  // TRIMODE_BLOCK_ATTENTION_KERNELS_CUH
