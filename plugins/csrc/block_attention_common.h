// Pieces shared by the CPU and CUDA libraries, the emulation and the TensorRT plugin: argument validation,
// status strings, the per-row validity rule and the flash-decoding split plan. Header-only and free of CUDA
// headers so that g++ and nvcc compile the very same checks (the row rule also runs on the device).
#ifndef TRIMODE_BLOCK_ATTENTION_COMMON_H
#define TRIMODE_BLOCK_ATTENTION_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include "block_attention.h"

#if defined(__CUDACC__)
#define TRIMODE_HD __host__ __device__
#else
#define TRIMODE_HD
#endif

namespace trimode {

// Tile sizes of the CUDA kernel; the split plan (and thus the workspace size) depends on them.
constexpr int kTileRows = 64;  // packed (query token, group head) rows per thread block
constexpr int kTileKeys = 64;  // keys per shared-memory K/V tile

// Most positions one page table can address (T * S): keeps every key index, p_b + n_b and the loop bounds of
// the kernel far inside int32.
constexpr long long kMaxRowPositions = 1LL << 30;

inline const char* error_string(int status) {
    switch (status) {
        case TRIMODE_OK: return "ok";
        case TRIMODE_ERR_NULL_POINTER: return "a required pointer is NULL";
        case TRIMODE_ERR_INVALID_SHAPE:
            return "invalid shape (every size must be positive, T * S <= 2^30, P * S < 2^31, "
                   "1 <= max_chunk <= N, 0 <= max_cache_len <= T * S)";
        case TRIMODE_ERR_HEAD_DIM: return "unsupported head_dim (supported: 64, 128)";
        case TRIMODE_ERR_GQA: return "num_heads is not a multiple of num_kv_heads";
        case TRIMODE_ERR_MASK_KIND:
            return "a row has an unknown mask_kind (0 causal, 1 bidirectional, 2 quad, 3 prefix_block)";
        case TRIMODE_ERR_INVALID_ROW:
            return "a row's mask_param, length or write flag does not fit its kind (quad: n = L(L+1), L >= 1; "
                   "prefix_block: 0 <= m <= n; bidirectional rows cannot write)";
        case TRIMODE_ERR_DTYPE: return "unsupported dtype (0 float32, 1 float16, 2 bfloat16)";
        case TRIMODE_ERR_MISALIGNED: return "a tensor pointer is not 16-byte aligned";
        case TRIMODE_ERR_OUT_OF_RANGE:
            return "per-row data out of range (cu_seqlens non-decreasing within [0, N], n_b <= max_chunk, "
                   "0 <= p_b <= max_cache_len or T * S, used page ids in [0, P), ceil((p_b + written) / S) <= T, "
                   "a written page used by no other row or entry of the call)";
        case TRIMODE_ERR_ABI: return "params.abi_version does not match the library (rebuild the plugin)";
        case TRIMODE_ERR_CUDA: return "a CUDA launch failed (see cudaGetLastError)";
        default: return "unknown trimode status";
    }
}

inline size_t dtype_size(int dtype) {
    switch (dtype) {
        case TRIMODE_DTYPE_FLOAT32: return 4;
        case TRIMODE_DTYPE_FLOAT16: return 2;
        case TRIMODE_DTYPE_BFLOAT16: return 2;
        default: return 0;
    }
}

// The contract's check_row: TRIMODE_OK, or why (kind, param, n, write) is not a row the contract defines.
// Shared by the CPU library (which returns the status) and the kernels (which make such a row empty).
TRIMODE_HD inline int row_status(int kind, int param, int n, bool write) {
    switch (kind) {
        case TRIMODE_MASK_CAUSAL: return TRIMODE_OK;
        case TRIMODE_MASK_BIDIRECTIONAL: return write ? TRIMODE_ERR_INVALID_ROW : TRIMODE_OK;
        case TRIMODE_MASK_QUAD:
            // param <= 46340 keeps L * (L + 1) inside int32.
            return param >= 1 && param <= 46340 && n == param * (param + 1) ? TRIMODE_OK : TRIMODE_ERR_INVALID_ROW;
        case TRIMODE_MASK_PREFIX_BLOCK: return param >= 0 && param <= n ? TRIMODE_OK : TRIMODE_ERR_INVALID_ROW;
        default: return TRIMODE_ERR_MASK_KIND;
    }
}

// How many of a row's chunk tokens a writing row stores (the contract's len(written_offsets)); the i-th goes
// to cache position p_b + i. Only meaningful for a valid row.
TRIMODE_HD inline int written_count(int kind, int param, int n) {
    switch (kind) {
        case TRIMODE_MASK_CAUSAL: return n;
        case TRIMODE_MASK_QUAD: return param;
        case TRIMODE_MASK_PREFIX_BLOCK: return n - param;
        default: return 0;
    }
}

// Chunk offset of the i-th written token (the contract's written_offsets[i]).
TRIMODE_HD inline int written_offset(int kind, int param, int i) {
    return kind == TRIMODE_MASK_QUAD ? i * (param + 1) : i;
}

// Checks the sizes and bounds; needs no tensor pointer (so a workspace can be sized before allocating).
inline int validate_shapes(const TrimodeAttentionParams* p) {
    if (p == nullptr) return TRIMODE_ERR_NULL_POINTER;
    if (p->abi_version != TRIMODE_ATTENTION_ABI_VERSION) return TRIMODE_ERR_ABI;
    if (dtype_size(p->dtype) == 0) return TRIMODE_ERR_DTYPE;
    if (p->num_rows <= 0 || p->num_tokens <= 0 || p->num_heads <= 0 || p->num_kv_heads <= 0 ||
        p->num_pages <= 0 || p->page_size <= 0 || p->pages_per_row <= 0 || p->max_chunk <= 0 ||
        p->max_chunk > p->num_tokens)
        return TRIMODE_ERR_INVALID_SHAPE;
    const long long addressable = static_cast<long long>(p->pages_per_row) * p->page_size;
    if (addressable > kMaxRowPositions || p->max_cache_len < 0 || p->max_cache_len > addressable)
        return TRIMODE_ERR_INVALID_SHAPE;
    // Pool rows (page * S + offset) are int32 in the kernel.
    if (static_cast<long long>(p->num_pages) * p->page_size > 0x7fffffffLL) return TRIMODE_ERR_INVALID_SHAPE;
    if (p->head_dim != 64 && p->head_dim != 128) return TRIMODE_ERR_HEAD_DIM;
    if (p->num_heads % p->num_kv_heads != 0) return TRIMODE_ERR_GQA;
    return TRIMODE_OK;
}

// Positions a page-table row addresses (T * S); only meaningful after validate_shapes.
inline int row_positions(const TrimodeAttentionParams* p) { return p->pages_per_row * p->page_size; }

// The host bound of every p_b: max_cache_len, or T * S when it is 0.
inline int max_past(const TrimodeAttentionParams* p) {
    return p->max_cache_len > 0 ? p->max_cache_len : row_positions(p);
}

// Checks everything that can be checked without reading tensor data (which may live on the device).
inline int validate_params(const TrimodeAttentionParams* p) {
    const int status = validate_shapes(p);
    if (status != TRIMODE_OK) return status;
    if (!p->q || !p->k_new || !p->v_new || !p->k_cache || !p->v_cache || !p->cu_seqlens || !p->page_table ||
        !p->cache_lens || !p->mask_kind || !p->mask_param || !p->out)
        return TRIMODE_ERR_NULL_POINTER;
    const void* tensors[] = {p->q, p->k_new, p->v_new, p->k_cache, p->v_cache, p->out};
    for (const void* t : tensors)
        if (reinterpret_cast<uintptr_t>(t) % 16 != 0) return TRIMODE_ERR_MISALIGNED;
    return TRIMODE_OK;
}

// How a call is split across thread blocks. Fixed by shapes, host bounds and the SM count only (never by
// device data), so the plan, the grid and the workspace are the same on every replay of a captured CUDA graph.
struct SplitPlan {
    int q_tiles;       // thread blocks along the packed query rows of one (row, kv head): max_chunk * G / 64
    int splits;        // partial results per query row; 1 means the kernel writes `out` directly
    int split_keys;    // keys per split (a multiple of kTileKeys); the last split takes the rest
    size_t workspace;  // bytes of partial outputs + log-sum-exps when splits > 1
};

inline size_t split_workspace_bytes(const TrimodeAttentionParams* p, int splits) {
    if (splits <= 1) return 0;
    const size_t rows = static_cast<size_t>(p->num_tokens) * p->num_heads;
    return static_cast<size_t>(splits) * rows * (static_cast<size_t>(p->head_dim) + 1) * sizeof(float);
}

// Splits the key range only when the grid would otherwise leave SMs idle (decode and short chunks): aim at
// two resident blocks per SM, keep at least two key tiles per split. `workspace_limit` caps the splits to
// what fits (SIZE_MAX when sizing the workspace).
inline SplitPlan plan_splits(const TrimodeAttentionParams* p, int num_sms, size_t workspace_limit) {
    SplitPlan plan{};
    const int group = p->num_heads / p->num_kv_heads;
    const long long rows = static_cast<long long>(p->max_chunk) * group;
    plan.q_tiles = static_cast<int>((rows + kTileRows - 1) / kTileRows);
    const long long base = static_cast<long long>(plan.q_tiles) * p->num_rows * p->num_kv_heads;
    const long long max_keys = static_cast<long long>(max_past(p)) + p->max_chunk;
    const long long key_tiles = (max_keys + kTileKeys - 1) / kTileKeys;
    long long splits = 1;
    if (num_sms > 0 && base < num_sms) {
        splits = (2LL * num_sms + base - 1) / base;
        const long long by_keys = (key_tiles + 1) / 2;
        if (splits > by_keys) splits = by_keys;
        if (splits > TRIMODE_MAX_SPLITS) splits = TRIMODE_MAX_SPLITS;
        if (splits < 1) splits = 1;
    }
    while (splits > 1 && split_workspace_bytes(p, static_cast<int>(splits)) > workspace_limit) --splits;
    const long long tiles_per_split = (key_tiles + splits - 1) / splits;
    splits = (key_tiles + tiles_per_split - 1) / tiles_per_split;  // drop splits that would be empty
    plan.splits = static_cast<int>(splits);
    plan.split_keys = static_cast<int>(tiles_per_split * kTileKeys);
    plan.workspace = split_workspace_bytes(p, plan.splits);
    return plan;
}

}  // namespace trimode

#endif  // TRIMODE_BLOCK_ATTENTION_COMMON_H
