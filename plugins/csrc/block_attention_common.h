// Host-side pieces shared by the CPU and CUDA libraries and the TensorRT plugin: argument validation, status
// strings and the flash-decoding split plan. Kept header-only and free of CUDA so that g++ and nvcc compile
// the very same checks, and the libraries therefore reject exactly the same calls.
#ifndef TRIMODE_BLOCK_ATTENTION_COMMON_H
#define TRIMODE_BLOCK_ATTENTION_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include "block_attention.h"

namespace trimode {

// Tile sizes of the CUDA kernel; the split plan (and thus the workspace size) depends on them.
constexpr int kTileRows = 64;  // packed (query token, group head) rows per thread block
constexpr int kTileKeys = 64;  // keys per shared-memory K/V tile

inline const char* error_string(int status) {
    switch (status) {
        case TRIMODE_OK: return "ok";
        case TRIMODE_ERR_NULL_POINTER: return "a required pointer is NULL";
        case TRIMODE_ERR_INVALID_SHAPE: return "invalid shape (every size must be positive, chunk_lens <= T)";
        case TRIMODE_ERR_HEAD_DIM: return "unsupported head_dim (supported: 64, 128)";
        case TRIMODE_ERR_GQA: return "num_heads is not a multiple of num_kv_heads";
        case TRIMODE_ERR_MASK_KIND: return "unknown mask_kind (0 causal, 1 bidirectional block)";
        case TRIMODE_ERR_MASK_NOT_IMPLEMENTED: return "mask_kind 2 (structured) is reserved and not implemented";
        case TRIMODE_ERR_DTYPE: return "unsupported dtype (0 float32, 1 float16, 2 bfloat16)";
        case TRIMODE_ERR_MISALIGNED: return "a tensor pointer is not 16-byte aligned";
        case TRIMODE_ERR_OUT_OF_RANGE:
            return "a slot, cache length or chunk length is out of range (slot < S, p_b + n_b <= L, n_b <= T)";
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

// The status of a mask kind value: ok for causal and bidirectional, else why it is rejected.
inline int validate_mask_kind(int32_t mask_kind) {
    if (mask_kind == TRIMODE_MASK_STRUCTURED) return TRIMODE_ERR_MASK_NOT_IMPLEMENTED;
    if (mask_kind != TRIMODE_MASK_CAUSAL && mask_kind != TRIMODE_MASK_BIDIRECTIONAL) return TRIMODE_ERR_MASK_KIND;
    return TRIMODE_OK;
}

// Checks the sizes and flags; needs no tensor pointer (so a workspace can be sized before allocating). With
// mask_kind_device set the host field is ignored: the kind lives in memory that may be the device's.
inline int validate_shapes(const TrimodeAttentionParams* p) {
    if (p == nullptr) return TRIMODE_ERR_NULL_POINTER;
    if (p->abi_version != TRIMODE_ATTENTION_ABI_VERSION) return TRIMODE_ERR_ABI;
    if (p->mask_kind_device == nullptr) {
        const int status = validate_mask_kind(p->mask_kind);
        if (status != TRIMODE_OK) return status;
    }
    if (dtype_size(p->dtype) == 0) return TRIMODE_ERR_DTYPE;
    if (p->batch <= 0 || p->chunk <= 0 || p->num_heads <= 0 || p->num_kv_heads <= 0 || p->cache_slots <= 0 ||
        p->cache_capacity <= 0 || p->max_cache_len < 0 || p->max_cache_len > p->cache_capacity)
        return TRIMODE_ERR_INVALID_SHAPE;
    if (p->head_dim != 64 && p->head_dim != 128) return TRIMODE_ERR_HEAD_DIM;
    if (p->num_heads % p->num_kv_heads != 0) return TRIMODE_ERR_GQA;
    return TRIMODE_OK;
}

// Checks everything that can be checked without reading tensor data (which may live on the device).
inline int validate_params(const TrimodeAttentionParams* p) {
    const int status = validate_shapes(p);
    if (status != TRIMODE_OK) return status;
    if (!p->q || !p->k_new || !p->v_new || !p->k_cache || !p->v_cache || !p->cache_lens || !p->chunk_lens ||
        !p->out)
        return TRIMODE_ERR_NULL_POINTER;
    const void* tensors[] = {p->q, p->k_new, p->v_new, p->k_cache, p->v_cache, p->out};
    for (const void* t : tensors)
        if (reinterpret_cast<uintptr_t>(t) % 16 != 0) return TRIMODE_ERR_MISALIGNED;
    return TRIMODE_OK;
}

// How a call is split across thread blocks. Fixed by shapes and the SM count only (never by device data), so
// the plan, the grid and the workspace are the same on every replay of a captured CUDA graph.
struct SplitPlan {
    int q_tiles;       // thread blocks along the packed query rows of one (sequence, kv head)
    int splits;        // partial results per query row; 1 means the kernel writes `out` directly
    int split_keys;    // keys per split (a multiple of kTileKeys); the last split takes the rest
    size_t workspace;  // bytes of partial outputs + log-sum-exps when splits > 1
};

inline size_t split_workspace_bytes(const TrimodeAttentionParams* p, int splits) {
    if (splits <= 1) return 0;
    const size_t rows = static_cast<size_t>(p->batch) * p->chunk * p->num_heads;
    return static_cast<size_t>(splits) * rows * (static_cast<size_t>(p->head_dim) + 1) * sizeof(float);
}

// Splits the key range only when the grid would otherwise leave SMs idle (decode and short chunks): aim at
// two resident blocks per SM, keep at least two key tiles per split. `workspace_limit` caps the splits to
// what fits (SIZE_MAX when sizing the workspace).
inline SplitPlan plan_splits(const TrimodeAttentionParams* p, int num_sms, size_t workspace_limit) {
    SplitPlan plan{};
    const int group = p->num_heads / p->num_kv_heads;
    const long long rows = static_cast<long long>(p->chunk) * group;
    plan.q_tiles = static_cast<int>((rows + kTileRows - 1) / kTileRows);
    const long long base = static_cast<long long>(plan.q_tiles) * p->batch * p->num_kv_heads;
    const long long max_keys = static_cast<long long>(p->max_cache_len > 0 ? p->max_cache_len : p->cache_capacity) +
                               p->chunk;
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
