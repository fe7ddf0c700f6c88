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
    const int32_t* cu_seqlens;  // [B+1]
    const int32_t* page_table;  // [B, T]
    const int32_t* cache_lens;  // [B]
    const int32_t* mask_kind;   // [B]
    const int32_t* mask_param;  // [B]
    const int32_t* write;       // [B] or NULL (no row writes)
    void* out;
    float* part_o;    // [splits][N*Hq][D]
    float* part_lse;  // [splits][N*Hq], log2 domain
    int num_rows, num_tokens, num_heads, num_kv_heads, group, max_chunk;
    int num_pages, page_size, pages_per_row, row_positions;  // P, S, T and T * S
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
    a.cu_seqlens = p->cu_seqlens;
    a.page_table = p->page_table;
    a.cache_lens = p->cache_lens;
    a.mask_kind = p->mask_kind;
    a.mask_param = p->mask_param;
    a.write = p->write;
    a.out = p->out;
    a.num_rows = p->num_rows;
    a.num_tokens = p->num_tokens;
    a.num_heads = p->num_heads;
    a.num_kv_heads = p->num_kv_heads;
    a.group = p->num_heads / p->num_kv_heads;
    a.num_pages = p->num_pages;
    a.page_size = p->page_size;
    a.pages_per_row = p->pages_per_row;
    a.row_positions = row_positions(p);
    a.max_chunk = p->max_chunk;
    a.scale_log2 = p->scale * 1.4426950408889634f;
    a.splits = plan.splits;
    a.split_keys = plan.split_keys;
    if (plan.splits > 1) {
        const size_t rows = static_cast<size_t>(p->num_tokens) * p->num_heads;
        a.part_o = static_cast<float*>(p->workspace);
        a.part_lse = a.part_o + static_cast<size_t>(plan.splits) * rows * p->head_dim;
    }
    return a;
}

// One row's view of the device data. Device data cannot be validated without a host sync, so a row the
// contract does not define (see block_attention.h) is made EMPTY (n = 0: zero output, no cache write) in the
// attention and combine kernels alike; p_b is clamped to [0, T*S]. Page ids are not checked here: a bad one
// only hides the cached key it would hold (page_source) or drops the write that would land in it.
struct Row {
    int start, n, past, kind, param;
    bool write;
    const int32_t* pages;  // the row's page-table row: T entries
};

__device__ __forceinline__ Row load_row(const KernelArgs& a, int b) {
    Row r;
    const int begin = a.cu_seqlens[b];
    const int end = a.cu_seqlens[b + 1];
    r.kind = a.mask_kind[b];
    r.param = a.mask_param[b];
    r.write = a.write != nullptr && a.write[b] != 0;
    r.pages = a.page_table + static_cast<long long>(b) * a.pages_per_row;
    r.past = min(max(a.cache_lens[b], 0), a.row_positions);
    const bool range_ok = begin >= 0 && begin <= end && end <= a.num_tokens && end - begin <= a.max_chunk;
    const bool ok = range_ok && row_status(r.kind, r.param, end - begin, r.write) == TRIMODE_OK;
    r.start = ok ? begin : 0;
    r.n = ok ? end - begin : 0;
    r.write = ok && r.write;  // an empty row writes nothing (quad's written count does not depend on n)
    return r;
}

// Row of the page pool (page * S + offset, < P * S <= 2^31 - 1) holding cache position `pos` (0 <= pos) of a
// row, or -1 when the position is past the row's page table (pos / S >= T) or its page id is outside [0, P):
// such a key is not visible and such a write is dropped. One integer division and one page-table read per call.
__device__ __forceinline__ int page_source(const KernelArgs& a, const Row& r, int pos) {
    const int entry = pos / a.page_size;
    if (entry >= a.pages_per_row) return -1;
    const int page = r.pages[entry];
    if (page < 0 || page >= a.num_pages) return -1;
    return page * a.page_size + (pos - entry * a.page_size);
}

// The chunk mask of a row, in the form the softmax loop evaluates per (query t, key s): for quad rows the
// sub-block index and draft/mask role of both sides are computed once per query row and once per key column.
struct ChunkMask {
    int kind, width, prefix;  // width = L + 1 (quad), prefix = n - m (prefix_block)

    __device__ __forceinline__ explicit ChunkMask(const Row& r)
        : kind(r.kind), width(r.kind == TRIMODE_MASK_QUAD ? r.param + 1 : 1),
          prefix(r.kind == TRIMODE_MASK_PREFIX_BLOCK ? r.n - r.param : r.n) {}

    // One past the last chunk key that chunk query t_last (or any query before it) may see: bounds the keys
    // a tile of queries ending at t_last visits.
    __device__ __forceinline__ int visible_end(int t_last, int n) const {
        switch (kind) {
            case TRIMODE_MASK_CAUSAL: return t_last + 1;
            case TRIMODE_MASK_QUAD: return min(n, (t_last / width + 1) * width);  // end of t_last's sub-block
            case TRIMODE_MASK_PREFIX_BLOCK: return t_last >= prefix ? n : t_last + 1;
            default: return n;  // bidirectional
        }
    }
};

// One side (query or key) of a chunk-mask test, as one int: negative for a cached key (visible), kHiddenKey for
// a key that is no key (past the tile's range, or a cached position whose page is bad); else the chunk
// position, except for quad rows, where it is 2 * sub-block + (1 for a mask token, 0 for the draft). One
// register per side keeps the mask inside the softmax loop from costing registers (and spills).
constexpr int kHiddenKey = -2147483647 - 1;  // below every cached key's code (-p_b >= -2^30)

__device__ __forceinline__ int mask_side(const ChunkMask& m, int pos) {
    if (pos < 0 || m.kind != TRIMODE_MASK_QUAD) return pos;
    const int sub = pos / m.width;
    return 2 * sub + (pos - sub * m.width != 0 ? 1 : 0);
}

// Chunk query t may see chunk key s (reference.chunk_mask), both given as mask_side values.
__device__ __forceinline__ bool mask_allows(const ChunkMask& m, int t, int s) {
    if (s < 0) return s != kHiddenKey;
    switch (m.kind) {
        case TRIMODE_MASK_CAUSAL: return s <= t;
        // A draft key of this or an earlier sub-block, or (for a mask query) any key of its own sub-block.
        case TRIMODE_MASK_QUAD: return ((s & 1) == 0 && (s >> 1) <= (t >> 1)) || ((t & 1) != 0 && (s >> 1) == (t >> 1));
        case TRIMODE_MASK_PREFIX_BLOCK: return s <= t || t >= m.prefix;
        default: return true;  // bidirectional
    }
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

// Copies one K/V tile (kTileKeys keys) into shared memory: key r comes from row `source[r]` of k_cache /
// v_cache (a cached key, j0 + r < past) or of k_new / v_new (a chunk key), or is zero-filled when source[r] < 0
// (no key). A thread copies the same 16-byte column of kTileKeys / kRowsPerPass keys. It reads all its keys'
// sources from shared memory BEFORE its first store to shared memory: a shared-memory read after a shared store
// may alias it, which would make the compiler issue the global loads one at a time; read first, every global
// load of the tile can be in flight at once (global loads never alias the shared stores).
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(T* ks, T* vs, int ld, const int* source, int j0, int past, int kv_heads,
                                             int h, const T* k_cache, const T* v_cache, const T* k_new,
                                             const T* v_new) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kVecsPerRow = D / kVec;
    static_assert(kThreads % kVecsPerRow == 0 && kTileKeys % (kThreads / kVecsPerRow) == 0, "whole rows per pass");
    constexpr int kRowsPerPass = kThreads / kVecsPerRow;
    constexpr int kPasses = kTileKeys / kRowsPerPass;
    const int r0 = threadIdx.x / kVecsPerRow;
    const int c = (threadIdx.x % kVecsPerRow) * kVec;
    int rows[kPasses];
#pragma unroll
    for (int i = 0; i < kPasses; ++i) rows[i] = source[r0 + i * kRowsPerPass];
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
        const int r = r0 + i * kRowsPerPass;
        uint4 k = make_uint4(0u, 0u, 0u, 0u);
        uint4 v = k;
        if (rows[i] >= 0) {
            const long long off = (static_cast<long long>(rows[i]) * kv_heads + h) * D + c;
            const bool cached = j0 + r < past;
            k = *reinterpret_cast<const uint4*>((cached ? k_cache : k_new) + off);
            v = *reinterpret_cast<const uint4*>((cached ? v_cache : v_new) + off);
        }
        *reinterpret_cast<uint4*>(ks + r * ld + c) = k;
        *reinterpret_cast<uint4*>(vs + r * ld + c) = v;
    }
}

// The written tokens of a valid writing row, kv head h: token written_offset(i) of the chunk goes to cache
// position p_b + i through the page table (a position past T*S or in a page outside [0, P) is dropped).
// Disjoint from every cache position any block reads, as long as a written page is used once in the call.
// (Writes are a small part of the work: the page is looked up per 16-byte vector here; a loop over whole
// tokens per thread made ptxas spill registers in the attention kernel that inlines this.)
template <typename T, int D>
__device__ void write_row_kv(const KernelArgs& a, int h, const Row& r) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kVecsPerRow = D / kVec;
    const T* k_new = static_cast<const T*>(a.k_new);
    const T* v_new = static_cast<const T*>(a.v_new);
    T* k_cache = static_cast<T*>(a.k_cache);
    T* v_cache = static_cast<T*>(a.v_cache);
    const int count = written_count(r.kind, r.param, r.n);
    for (int i = threadIdx.x; i < count * kVecsPerRow; i += kThreads) {
        const int w = i / kVecsPerRow;
        const int c = (i % kVecsPerRow) * kVec;
        const int flat = page_source(a, r, r.past + w);
        if (flat < 0) continue;
        const int token = r.start + written_offset(r.kind, r.param, w);
        const long long src = (static_cast<long long>(token) * a.num_kv_heads + h) * D + c;
        const long long dst = (static_cast<long long>(flat) * a.num_kv_heads + h) * D + c;
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
    int* key_src = reinterpret_cast<int*>(smem + L::src_off);  // 2 x kTileKeys, see below

    const int tile = blockIdx.x;
    const int b = blockIdx.y / a.num_kv_heads;
    const int h = blockIdx.y % a.num_kv_heads;
    const int split = blockIdx.z;
    const int G = a.group;
    const Row row = load_row(a, b);
    const int row0 = tile * kTileRows;
    const int rows_valid = max(0, min(kTileRows, row.n * G - row0));  // packed rows of this tile inside the row

    if (row.write && tile == 0 && split == 0) write_row_kv<T, D>(a, h, row);
    // A tile past the row's tokens (or an empty row) has nothing to do: `out` was zeroed before the launch.
    if (rows_valid == 0) return;

    auto out_row = [&](int r) -> long long {  // element offset of packed row r in out (and q)
        const int R = row0 + r;
        return (static_cast<long long>(row.start + R / G) * a.num_heads + h * G + R % G) * D;
    };
    // Keys this tile can see: the mask bounds the chunk keys of the tile's last query token.
    const ChunkMask mask(row);
    const int t_last = (row0 + rows_valid - 1) / G;
    const int kv_total = row.past + mask.visible_end(t_last, row.n);
    const int kv_begin = split * a.split_keys;
    const int kv_end = split == a.splits - 1 ? kv_total : min(kv_total, kv_begin + a.split_keys);

    // Where each key of a tile comes from, looked up once per key (one page-table read and one division, not
    // per vector of the key) by the first 64 threads, and shared through shared memory by the K and V loads and
    // the mask: the key's row in the page pool (page * S + offset: a cached key, through the page table) or in
    // k_new (a chunk key), or -1 when it is no key (past kv_end, or its page id is outside [0, P)). Two buffers:
    // the sources of tile i + 1 are looked up while tile i is being processed, so the page-table reads are off
    // the critical path and need no barrier of their own.
    auto look_up_sources = [&](int j0, int* dst) {
        if (threadIdx.x < kTileKeys) {
            const int j = j0 + static_cast<int>(threadIdx.x);
            int row_index = -1;
            if (j < kv_end) row_index = j < row.past ? page_source(a, row, j) : row.start + (j - row.past);
            dst[threadIdx.x] = row_index;
        }
    };
    look_up_sources(kv_begin, key_src);

    const T* q = static_cast<const T*>(a.q);
    load_rows<T, D>(qs, L::ld_qkv, kTileRows,
                    [&](int r) -> const T* { return r < rows_valid ? q + out_row(r) : nullptr; });
    for (int r = threadIdx.x; r < kTileRows; r += kThreads) {
        m_s[r] = -INFINITY;
        l_s[r] = 0.0f;
    }
    Math::prepare(ss);
    __syncthreads();  // publishes Q, the statistics, the math scratch and the first tile's sources
    Math math;
    math.begin(qs, ss, rows_valid);

    const T* k_cache = static_cast<const T*>(a.k_cache);
    const T* v_cache = static_cast<const T*>(a.v_cache);
    const T* k_new = static_cast<const T*>(a.k_new);
    const T* v_new = static_cast<const T*>(a.v_new);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;

    int buffer = 0;
    for (int j0 = kv_begin; j0 < kv_end; j0 += kTileKeys, buffer ^= 1) {
        // This tile's sources were published by the previous barrier; the other buffer was last read before the
        // barrier that ended the previous iteration, so the next tile's sources can be written into it now.
        const int* source = key_src + buffer * kTileKeys;
        load_kv_tile<T, D>(ks, vs, L::ld_qkv, source, j0, row.past, a.num_kv_heads, h, k_cache, v_cache, k_new,
                           v_new);
        if (j0 + kTileKeys < kv_end) look_up_sources(j0 + kTileKeys, key_src + (buffer ^ 1) * kTileKeys);
        __syncthreads();
        math.scores(ks, ss);
        __syncthreads();
        // This lane's two key columns, as chunk-mask sides (negative position: a cached key; kHiddenKey: past
        // kv_end or a bad page).
        int key[2];
#pragma unroll
        for (int c = 0; c < 2; ++c)
            key[c] = source[lane + 32 * c] < 0 ? kHiddenKey : mask_side(mask, j0 + lane + 32 * c - row.past);
        // Masked online softmax: warp w owns rows 16w..16w+15, each lane two key columns.
        for (int i = 0; i < kWarpRows; ++i) {
            const int r = warp * kWarpRows + i;
            const int query = mask_side(mask, (row0 + r) / G);
            float s[2];
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int col = lane + 32 * c;
                const bool visible = r < rows_valid && mask_allows(mask, query, key[c]);
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
    T* out = static_cast<T*>(a.out);
    if (a.splits == 1) {
        for (int i = threadIdx.x; i < rows_valid * D; i += kThreads) {
            const int r = i / D;
            const float l = l_s[r];
            out[out_row(r) + i % D] = from_float<T>(l > 0.0f ? os[r * L::ld_o + i % D] / l : 0.0f);
        }
    } else {
        const long long rows = static_cast<long long>(a.num_tokens) * a.num_heads;
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

// Merges the split partial results of one output row: blockIdx.y = row b, blockIdx.x = t * Hq + hq for chunk
// token t < max_chunk, one thread per dim. Tokens past the row's n_b (and every token of an empty row) return:
// `out` was zeroed before the launch.
template <typename T, int D>
__global__ void __launch_bounds__(D) combine_kernel(KernelArgs a) {
    const int t = static_cast<int>(blockIdx.x) / a.num_heads;
    const int hq = static_cast<int>(blockIdx.x) % a.num_heads;
    const Row row = load_row(a, static_cast<int>(blockIdx.y));
    if (t >= row.n) return;
    const long long rows = static_cast<long long>(a.num_tokens) * a.num_heads;
    const long long out_row = static_cast<long long>(row.start + t) * a.num_heads + hq;
    float m = -INFINITY;
    for (int s = 0; s < a.splits; ++s) m = fmaxf(m, a.part_lse[s * rows + out_row]);
    float value = 0.0f;
    if (m != -INFINITY) {
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < a.splits; ++s) {
            const float w = exp2f(a.part_lse[s * rows + out_row] - m);
            den += w;
            num += w * a.part_o[(s * rows + out_row) * D + threadIdx.x];
        }
        value = num / den;
    }
    static_cast<T*>(a.out)[out_row * D + threadIdx.x] = from_float<T>(value);
}

}  // namespace trimode

#endif  // TRIMODE_BLOCK_ATTENTION_KERNELS_CUH
