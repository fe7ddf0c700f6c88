// CPU reference of the C API in block_attention.h: the slow, obvious form of the contract, compiled with g++
// into libtrimode_attention_cpu.so. It exists so that the C API itself (argument layout, validation, status
// codes, cache writes) is tested on machines without a GPU against plugins/reference.py, and so that the CUDA
// kernel has a second, independent implementation to be compared with.
//
// Every element is converted to fp32, the softmax and both products accumulate in fp32 (double for the sums
// would hide nothing the kernel does), and the output is rounded once to the tensor dtype.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "block_attention.h"
#include "block_attention_common.h"
#include "float16_convert.h"

namespace {

using trimode::bf16_to_float;
using trimode::float_to_bf16;
using trimode::float_to_half;
using trimode::half_to_float;

float load(const void* base, size_t index, int dtype) {
    switch (dtype) {
        case TRIMODE_DTYPE_FLOAT16: return half_to_float(static_cast<const uint16_t*>(base)[index]);
        case TRIMODE_DTYPE_BFLOAT16: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
        default: return static_cast<const float*>(base)[index];
    }
}

void store(void* base, size_t index, int dtype, float value) {
    switch (dtype) {
        case TRIMODE_DTYPE_FLOAT16: static_cast<uint16_t*>(base)[index] = float_to_half(value); break;
        case TRIMODE_DTYPE_BFLOAT16: static_cast<uint16_t*>(base)[index] = float_to_bf16(value); break;
        default: static_cast<float*>(base)[index] = value; break;
    }
}

// Host data is readable here, so (unlike the CUDA library, which must not synchronize) every per-sequence
// index is checked before anything is written.
int validate_lengths(const TrimodeAttentionParams* p) {
    for (int b = 0; b < p->batch; ++b) {
        const int slot = p->slots ? p->slots[b] : b;
        const int past = p->cache_lens[b];
        const int n = p->chunk_lens[b];
        if (slot < 0 || slot >= p->cache_slots || past < 0 || past > p->cache_capacity || n < 0 || n > p->chunk)
            return TRIMODE_ERR_OUT_OF_RANGE;
        if (p->write_kv && past + n > p->cache_capacity) return TRIMODE_ERR_OUT_OF_RANGE;
    }
    return TRIMODE_OK;
}

// The mask kind of the call: the host field, or the int32 at mask_kind_device (a host pointer here, so unlike
// the CUDA kernel, which zeros the output for a bad value, this library can reject it with the field's status).
int read_mask_kind(const TrimodeAttentionParams* p, int32_t* mask_kind) {
    *mask_kind = p->mask_kind_device ? *p->mask_kind_device : p->mask_kind;
    return trimode::validate_mask_kind(*mask_kind);
}

// One sequence: out[b, t, hq, :] for every t < n, exactly the loop of block_attention_reference.
void attend_sequence(const TrimodeAttentionParams* p, int32_t mask_kind, int b) {
    const int T = p->chunk, Hq = p->num_heads, Hkv = p->num_kv_heads, D = p->head_dim;
    const int group = Hq / Hkv;
    const int slot = p->slots ? p->slots[b] : b;
    const int past = p->cache_lens[b];
    const int n = p->chunk_lens[b];
    const size_t cache_base = static_cast<size_t>(slot) * p->cache_capacity;
    std::vector<float> scores(static_cast<size_t>(past) + n);
    std::vector<float> acc(D);
    for (int t = 0; t < n; ++t) {
        const int visible_new = mask_kind == TRIMODE_MASK_CAUSAL ? t + 1 : n;
        const int keys = past + visible_new;
        for (int hq = 0; hq < Hq; ++hq) {
            const int h = hq / group;
            const size_t q_row = ((static_cast<size_t>(b) * T + t) * Hq + hq) * D;
            float max_score = -std::numeric_limits<float>::infinity();
            for (int j = 0; j < keys; ++j) {
                const void* kbase = j < past ? p->k_cache : p->k_new;
                const size_t k_row = j < past ? ((cache_base + j) * Hkv + h) * D
                                              : ((static_cast<size_t>(b) * T + (j - past)) * Hkv + h) * D;
                float dot = 0.0f;
                for (int d = 0; d < D; ++d)
                    dot += load(p->q, q_row + d, p->dtype) * load(kbase, k_row + d, p->dtype);
                scores[j] = dot * p->scale;
                if (scores[j] > max_score) max_score = scores[j];
            }
            float denom = 0.0f;
            for (int j = 0; j < keys; ++j) {
                scores[j] = std::exp(scores[j] - max_score);
                denom += scores[j];
            }
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int j = 0; j < keys; ++j) {
                const void* vbase = j < past ? p->v_cache : p->v_new;
                const size_t v_row = j < past ? ((cache_base + j) * Hkv + h) * D
                                              : ((static_cast<size_t>(b) * T + (j - past)) * Hkv + h) * D;
                const float w = scores[j] / denom;
                for (int d = 0; d < D; ++d) acc[d] += w * load(vbase, v_row + d, p->dtype);
            }
            for (int d = 0; d < D; ++d) store(p->out, q_row + d, p->dtype, acc[d]);
        }
    }
}

void write_sequence_kv(const TrimodeAttentionParams* p, int b) {
    const int T = p->chunk, Hkv = p->num_kv_heads, D = p->head_dim;
    const size_t elem = trimode::dtype_size(p->dtype);
    const int slot = p->slots ? p->slots[b] : b;
    const int past = p->cache_lens[b];
    const size_t row_bytes = static_cast<size_t>(Hkv) * D * elem;  // one position, all kv heads
    for (int t = 0; t < p->chunk_lens[b]; ++t) {
        const size_t src = (static_cast<size_t>(b) * T + t) * row_bytes;
        const size_t dst = (static_cast<size_t>(slot) * p->cache_capacity + past + t) * row_bytes;
        std::memcpy(static_cast<char*>(p->k_cache) + dst, static_cast<const char*>(p->k_new) + src, row_bytes);
        std::memcpy(static_cast<char*>(p->v_cache) + dst, static_cast<const char*>(p->v_new) + src, row_bytes);
    }
}

}  // namespace

extern "C" {

TRIMODE_API int trimode_block_attention(const TrimodeAttentionParams* p, void* /*stream*/) {
    int status = trimode::validate_params(p);
    if (status != TRIMODE_OK) return status;
    int32_t mask_kind = 0;
    status = read_mask_kind(p, &mask_kind);
    if (status != TRIMODE_OK) return status;
    status = validate_lengths(p);
    if (status != TRIMODE_OK) return status;
    const size_t elem = trimode::dtype_size(p->dtype);
    const size_t out_bytes = static_cast<size_t>(p->batch) * p->chunk * p->num_heads * p->head_dim * elem;
    std::memset(p->out, 0, out_bytes);  // rows t >= n_b stay zero
    // Sequence by sequence, attention before the write, as in the reference: batching never changes a result.
    for (int b = 0; b < p->batch; ++b) {
        attend_sequence(p, mask_kind, b);
        if (p->write_kv) write_sequence_kv(p, b);
    }
    return TRIMODE_OK;
}

TRIMODE_API int trimode_block_attention_workspace_size(const TrimodeAttentionParams* p, size_t* bytes) {
    if (bytes == nullptr) return TRIMODE_ERR_NULL_POINTER;
    *bytes = 0;
    return trimode::validate_shapes(p);
}

TRIMODE_API const char* trimode_error_string(int status) { return trimode::error_string(status); }

TRIMODE_API const char* trimode_backend_name(void) { return "cpu"; }

TRIMODE_API int trimode_abi_version(void) { return TRIMODE_ATTENTION_ABI_VERSION; }

}  // extern "C"
