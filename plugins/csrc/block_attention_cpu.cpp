// CPU reference of the C API in block_attention.h: the slow, obvious form of the contract, compiled with g++
// into libtrimode_attention_cpu.so. It exists so that the C API itself (argument layout, per-row validation,
// status codes, cache writes) is tested on machines without a GPU against plugins/reference.py, and so that
// the CUDA kernel has a second, independent implementation to be compared with.
//
// Every element is converted to fp32, the softmax and both products accumulate in fp32, and the output is
// rounded once to the tensor dtype. The chunk masks are written out here from their definitions, apart from
// the kernel's tile-level form of them.
#include <algorithm>
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

struct Row {
    int start, n, past, kind, param, written;  // written: w_b, the positions the row stores (0 unless it writes)
    const int32_t* pages;                      // the row's page-table row (T entries)
    bool write;
};

Row row_of(const TrimodeAttentionParams* p, int b) {
    Row r;
    r.start = p->cu_seqlens[b];
    r.n = p->cu_seqlens[b + 1] - p->cu_seqlens[b];
    r.pages = p->page_table + static_cast<size_t>(b) * p->pages_per_row;
    r.past = p->cache_lens[b];
    r.kind = p->mask_kind[b];
    r.param = p->mask_param[b];
    r.write = p->write != nullptr && p->write[b] != 0;
    r.written = r.write ? trimode::written_count(r.kind, r.param, r.n) : 0;
    return r;
}

// Page-table entries a (valid) row uses: ceil((p_b + w_b) / S); none for an empty row, which reads nothing.
long long used_entries(const TrimodeAttentionParams* p, const Row& r) {
    if (r.n == 0) return 0;
    return (static_cast<long long>(r.past) + r.written + p->page_size - 1) / p->page_size;
}

// Host data is readable here, so (unlike the CUDA kernel, which must not synchronize and makes a bad row
// empty or a bad key invisible instead) every row is checked before anything is written.
int validate_rows(const TrimodeAttentionParams* p) {
    if (p->cu_seqlens[0] < 0 || p->cu_seqlens[p->num_rows] > p->num_tokens) return TRIMODE_ERR_OUT_OF_RANGE;
    const int max_past = trimode::max_past(p);
    for (int b = 0; b < p->num_rows; ++b) {
        if (p->cu_seqlens[b + 1] < p->cu_seqlens[b]) return TRIMODE_ERR_OUT_OF_RANGE;
        const Row r = row_of(p, b);
        const int status = trimode::row_status(r.kind, r.param, r.n, r.write);
        if (status != TRIMODE_OK) return status;
        if (r.n > p->max_chunk || r.past < 0 || r.past > max_past) return TRIMODE_ERR_OUT_OF_RANGE;
        const long long used = used_entries(p, r);
        if (used > p->pages_per_row) return TRIMODE_ERR_OUT_OF_RANGE;
        for (long long e = 0; e < used; ++e)
            if (r.pages[e] < 0 || r.pages[e] >= p->num_pages) return TRIMODE_ERR_OUT_OF_RANGE;
    }
    // A written page must be used exactly once in the call (by its writer, at one entry): a page written by one
    // row and read by another, or reached twice through one table, would make the result depend on the order
    // rows (or, on the GPU, thread blocks) run in. Pages only read may be shared freely.
    bool any_write = false;
    for (int b = 0; b < p->num_rows && !any_write; ++b) any_write = row_of(p, b).written > 0;
    if (!any_write) return TRIMODE_OK;
    std::vector<unsigned char> uses(static_cast<size_t>(p->num_pages), 0);
    for (int b = 0; b < p->num_rows; ++b) {
        const Row r = row_of(p, b);
        for (long long e = 0, used = used_entries(p, r); e < used; ++e)
            if (uses[r.pages[e]] < 2) ++uses[r.pages[e]];
    }
    for (int b = 0; b < p->num_rows; ++b) {
        const Row r = row_of(p, b);
        if (r.n == 0 || r.written == 0) continue;
        for (long long e = r.past / p->page_size, used = used_entries(p, r); e < used; ++e)
            if (uses[r.pages[e]] != 1) return TRIMODE_ERR_OUT_OF_RANGE;
    }
    return TRIMODE_OK;
}

// Element offset of cache position `pos` of a row, kv head h (the row's pages were validated).
size_t cache_offset(const TrimodeAttentionParams* p, const Row& r, int pos, int h) {
    const size_t page = static_cast<size_t>(r.pages[pos / p->page_size]);
    const size_t flat = page * p->page_size + pos % p->page_size;
    return (flat * p->num_kv_heads + h) * p->head_dim;
}

// Chunk query t may see chunk key s: the four definitions of reference.py, spelled out.
bool allowed(const Row& r, int t, int s) {
    switch (r.kind) {
        case TRIMODE_MASK_CAUSAL: return s <= t;
        case TRIMODE_MASK_BIDIRECTIONAL: return true;
        case TRIMODE_MASK_QUAD: {
            const int width = r.param + 1;
            const bool s_is_draft = s % width == 0;
            const bool t_is_mask = t % width != 0;
            return (s_is_draft && s / width <= t / width) || (t_is_mask && s / width == t / width);
        }
        case TRIMODE_MASK_PREFIX_BLOCK: return s <= t || t >= r.n - r.param;
        default: return false;
    }
}

// One row: out[start + t, hq, :] for every t < n, exactly the loop of block_attention_reference.
void attend_row(const TrimodeAttentionParams* p, const Row& r) {
    const int Hq = p->num_heads, Hkv = p->num_kv_heads, D = p->head_dim;
    const int group = Hq / Hkv;
    const int keys = r.past + r.n;
    std::vector<float> scores(keys);
    std::vector<char> visible(keys);
    std::vector<float> acc(D);
    for (int t = 0; t < r.n; ++t) {
        for (int j = 0; j < keys; ++j) visible[j] = j < r.past || allowed(r, t, j - r.past);
        for (int hq = 0; hq < Hq; ++hq) {
            const int h = hq / group;
            const size_t q_row = (static_cast<size_t>(r.start + t) * Hq + hq) * D;
            // Key j's element offset in its source: the cache through the page table, or the chunk in k_new.
            auto key_row = [&](int j) -> size_t {
                return j < r.past ? cache_offset(p, r, j, h)
                                  : ((static_cast<size_t>(r.start) + (j - r.past)) * Hkv + h) * D;
            };
            float max_score = -std::numeric_limits<float>::infinity();
            for (int j = 0; j < keys; ++j) {
                if (!visible[j]) continue;
                const void* kbase = j < r.past ? p->k_cache : p->k_new;
                const size_t k_row = key_row(j);
                float dot = 0.0f;
                for (int d = 0; d < D; ++d)
                    dot += load(p->q, q_row + d, p->dtype) * load(kbase, k_row + d, p->dtype);
                scores[j] = dot * p->scale;
                max_score = std::max(max_score, scores[j]);
            }
            float denom = 0.0f;
            for (int j = 0; j < keys; ++j) {
                scores[j] = visible[j] ? std::exp(scores[j] - max_score) : 0.0f;
                denom += scores[j];
            }
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int j = 0; j < keys; ++j) {
                if (!visible[j]) continue;
                const void* vbase = j < r.past ? p->v_cache : p->v_new;
                const size_t v_row = key_row(j);
                const float w = scores[j] / denom;
                for (int d = 0; d < D; ++d) acc[d] += w * load(vbase, v_row + d, p->dtype);
            }
            for (int d = 0; d < D; ++d) store(p->out, q_row + d, p->dtype, acc[d]);
        }
    }
}

// The i-th written token goes to position p_b + i of the row, through its page table; all kv heads at once.
void write_row_kv(const TrimodeAttentionParams* p, const Row& r) {
    const size_t elem = trimode::dtype_size(p->dtype);
    const size_t row_bytes = static_cast<size_t>(p->num_kv_heads) * p->head_dim * elem;
    for (int i = 0; i < r.written; ++i) {
        const size_t src = static_cast<size_t>(r.start + trimode::written_offset(r.kind, r.param, i)) * row_bytes;
        const size_t dst = cache_offset(p, r, r.past + i, 0) * elem;
        std::memcpy(static_cast<char*>(p->k_cache) + dst, static_cast<const char*>(p->k_new) + src, row_bytes);
        std::memcpy(static_cast<char*>(p->v_cache) + dst, static_cast<const char*>(p->v_new) + src, row_bytes);
    }
}

}  // namespace

extern "C" {

TRIMODE_API int trimode_block_attention(const TrimodeAttentionParams* p, void* /*stream*/) {
    int status = trimode::validate_params(p);
    if (status != TRIMODE_OK) return status;
    status = validate_rows(p);
    if (status != TRIMODE_OK) return status;
    const size_t elem = trimode::dtype_size(p->dtype);
    const size_t out_bytes = static_cast<size_t>(p->num_tokens) * p->num_heads * p->head_dim * elem;
    std::memset(p->out, 0, out_bytes);  // tokens of no row stay zero
    // Row by row, attention before the write, as in the reference: batching never changes a result.
    for (int b = 0; b < p->num_rows; ++b) {
        const Row r = row_of(p, b);
        if (r.n == 0) continue;
        attend_row(p, r);
        write_row_kv(p, r);
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
