// Memory-safety check of the CUDA kernels on the CPU: the emulation (block_attention_emu.cpp) compiled with
// AddressSanitizer + UBSan, every tensor and every per-row array in a buffer of exactly its size, and the
// emulated shared memory past what a launch requested poisoned. Any out-of-bounds global or shared access, or
// undefined behaviour in the kernel source, aborts with a report. Covers all four mask kinds, ragged packed
// rows, split and unsplit plans, writes near and past L, and rows the contract does not define (which the
// kernel must turn into empty rows without touching anything out of bounds). Built and run by
// `make -C plugins emu-asan-check`.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "block_attention.h"

extern "C" int trimode_emu_set_sm_count(int count);

namespace {

// Exactly `bytes` bytes (16-byte aligned, as the API requires), filled with small random values.
void* random_buffer(size_t bytes, int dtype, std::mt19937& gen) {
    void* p = nullptr;
    if (posix_memalign(&p, 16, bytes == 0 ? 16 : bytes) != 0) std::abort();
    auto* raw = static_cast<unsigned char*>(p);
    if (dtype == TRIMODE_DTYPE_FLOAT32) {
        for (size_t i = 0; i < bytes / 4; ++i) static_cast<float*>(p)[i] = float(gen() % 2001) / 1000.0f - 1.0f;
    } else {
        for (size_t i = 0; i < bytes; ++i) raw[i] = (i % 2) ? 0x3c : static_cast<unsigned char>(gen());  // ~1.x
    }
    return p;
}

// An int32 array in a buffer of exactly its size.
int32_t* int_buffer(const std::vector<int32_t>& values) {
    void* p = nullptr;
    if (posix_memalign(&p, 16, values.empty() ? 16 : values.size() * sizeof(int32_t)) != 0) std::abort();
    auto* out = static_cast<int32_t*>(p);
    for (size_t i = 0; i < values.size(); ++i) out[i] = values[i];
    return out;
}

struct RowSpec {
    int kind, param, n, past, slot, write;
};

struct Case {
    int dtype, heads, kv_heads, head_dim, slots_count, capacity, sm_count;
    std::vector<RowSpec> rows;
    int max_chunk = 0;                 // 0: the largest n
    std::vector<int32_t> cu_override;  // non-empty: these cu_seqlens instead of the packed ones (bad data)
    int extra_tokens = 0;              // tokens after the last row (owned by no row)
};

int run(const Case& c) {
    std::mt19937 gen(7);
    trimode_emu_set_sm_count(c.sm_count);
    const int B = static_cast<int>(c.rows.size());
    std::vector<int32_t> cu(1, 0), slots, lens, kinds, params, writes;
    int max_n = 1;
    for (const RowSpec& r : c.rows) {
        cu.push_back(cu.back() + (r.n > 0 ? r.n : 0));
        slots.push_back(r.slot), lens.push_back(r.past), kinds.push_back(r.kind), params.push_back(r.param);
        writes.push_back(r.write);
        if (r.n > max_n) max_n = r.n;
    }
    const int N = cu.back() + c.extra_tokens;
    if (!c.cu_override.empty()) cu = c.cu_override;
    const size_t elem = c.dtype == TRIMODE_DTYPE_FLOAT32 ? 4 : 2;
    const size_t q_bytes = size_t(N) * c.heads * c.head_dim * elem;
    const size_t kv_bytes = size_t(N) * c.kv_heads * c.head_dim * elem;
    const size_t cache_bytes = size_t(c.slots_count) * c.capacity * c.kv_heads * c.head_dim * elem;
    TrimodeAttentionParams p{};
    p.abi_version = TRIMODE_ATTENTION_ABI_VERSION;
    p.dtype = c.dtype;
    p.num_rows = B, p.num_tokens = N, p.num_heads = c.heads, p.num_kv_heads = c.kv_heads;
    p.head_dim = c.head_dim, p.cache_slots = c.slots_count, p.cache_capacity = c.capacity;
    p.max_chunk = c.max_chunk > 0 ? c.max_chunk : (max_n < N ? max_n : N), p.scale = 0.1f;
    p.q = random_buffer(q_bytes, c.dtype, gen);
    p.k_new = random_buffer(kv_bytes, c.dtype, gen);
    p.v_new = random_buffer(kv_bytes, c.dtype, gen);
    p.k_cache = random_buffer(cache_bytes, c.dtype, gen);
    p.v_cache = random_buffer(cache_bytes, c.dtype, gen);
    p.out = random_buffer(q_bytes, c.dtype, gen);
    int32_t* arrays[6] = {int_buffer(cu), int_buffer(slots), int_buffer(lens), int_buffer(kinds),
                          int_buffer(params), int_buffer(writes)};
    p.cu_seqlens = arrays[0], p.slots = arrays[1], p.cache_lens = arrays[2], p.mask_kind = arrays[3];
    p.mask_param = arrays[4], p.write = arrays[5];
    size_t workspace = 0;
    trimode_block_attention_workspace_size(&p, &workspace);
    p.workspace = workspace ? random_buffer(workspace, 0, gen) : nullptr;
    p.workspace_size = workspace;
    const int status = trimode_block_attention(&p, nullptr);
    std::printf("dtype %d B%d N%d Hq%d Hkv%d D%d kinds", c.dtype, B, N, c.heads, c.kv_heads, c.head_dim);
    for (const RowSpec& r : c.rows) std::printf(" %d", r.kind);
    std::printf(" workspace %zu: status %d\n", workspace, status);
    for (const void* t : {p.q, p.k_new, p.v_new, static_cast<const void*>(p.k_cache),
                          static_cast<const void*>(p.v_cache), static_cast<const void*>(p.out),
                          static_cast<const void*>(p.workspace)})
        std::free(const_cast<void*>(t));
    for (int32_t* a : arrays) std::free(a);
    return status;
}

}  // namespace

int main() {
    int failures = 0;
    for (int dtype : {TRIMODE_DTYPE_FLOAT32, TRIMODE_DTYPE_FLOAT16, TRIMODE_DTYPE_BFLOAT16})
        for (int head_dim : {64, 128}) {
            const Case cases[] = {
                // every kind in one call: causal, bidirectional, quad(2), prefix_block(3), quad(1) at the end of L
                {dtype, 8, 2, head_dim, 6, 70, 8,
                 {{0, 0, 5, 0, 2, 1}, {1, 0, 4, 7, 0, 0}, {2, 2, 6, 65, 1, 1}, {3, 3, 7, 20, 3, 1},
                  {2, 1, 2, 69, 4, 1}}},
                // decode rows, split-K (64 SMs) with a long cache
                {dtype, 4, 1, head_dim, 3, 300, 64, {{0, 0, 1, 299, 1, 1}, {1, 0, 1, 0, 0, 0}, {2, 1, 2, 150, 2, 1}}},
                // one long row over five 64-row tiles, tokens after it owned by no row
                {dtype, 4, 1, head_dim, 1, 100, 1, {{3, 12, 70, 30, 0, 1}}, 0, {}, 3},
                // writes past L are dropped; clamped cache lengths
                {dtype, 4, 4, head_dim, 2, 10, 64, {{0, 0, 3, 10, 1, 1}, {2, 1, 2, 99, 0, 1}}},
                // rows the contract does not define: bad slot, unknown kind, quad length, tail > n, bidirectional
                // write, n > max_chunk, negative cache length
                {dtype, 4, 2, head_dim, 2, 16, 8,
                 {{0, 0, 2, 3, 9, 1}, {7, 0, 2, 0, 0, 1}, {2, 2, 5, 0, 1, 1}, {3, 9, 3, 0, 0, 1},
                  {1, 0, 2, 0, 1, 1}, {0, 0, 4, 0, 0, 1}, {0, 0, 1, -5, 1, 1}},
                 2},
                // cu_seqlens out of range and decreasing
                {dtype, 4, 2, head_dim, 2, 16, 64, {{0, 0, 2, 3, 0, 1}, {0, 0, 2, 3, 1, 1}, {1, 0, 2, 0, 0, 0}}, 2,
                 {-3, 4, 1, 99}},
            };
            for (const Case& c : cases) failures += run(c) != TRIMODE_OK;
        }
    std::printf("%s: %d failed call(s)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
