// Memory-safety check of the CUDA kernels on the CPU: the emulation (block_attention_emu.cpp) compiled with
// AddressSanitizer + UBSan, every tensor, every per-row array and the page table in a buffer of exactly its
// size, and the emulated shared memory past what a launch requested poisoned. Any out-of-bounds global or shared
// access, or undefined behaviour in the kernel source, aborts with a report. Covers all four mask kinds, ragged
// packed rows, split and unsplit plans, page sizes 1, 5, 16 and 24, shuffled and shared pages, writes filling
// the last addressable page and writes past it, bad page data (ids outside [0, P), tables too short for the
// writes), and rows the contract does not define (which the kernel must turn into empty rows without touching
// anything out of bounds). Built and run by `make -C plugins emu-asan-check`.
#include <algorithm>
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
    int kind, param, n, past, write;
    std::vector<int32_t> pages;  // the row's first page-table entries; empty: distinct pages assigned by run()
};

struct Case {
    int dtype, heads, kv_heads, head_dim, num_pages, page_size, pages_per_row, sm_count;
    std::vector<RowSpec> rows;
    int max_chunk = 0;                 // 0: the largest n
    std::vector<int32_t> cu_override;  // non-empty: these cu_seqlens instead of the packed ones (bad data)
    int extra_tokens = 0;              // tokens after the last row (owned by no row)
};

int run(const Case& c) {
    std::mt19937 gen(7);
    trimode_emu_set_sm_count(c.sm_count);
    const int B = static_cast<int>(c.rows.size());
    const int T = c.pages_per_row;
    // Pages for rows without explicit ones: a shuffled pool, each page given to one row only.
    std::vector<int32_t> pool(c.num_pages);
    for (int i = 0; i < c.num_pages; ++i) pool[i] = i;
    std::shuffle(pool.begin(), pool.end(), gen);
    std::vector<int32_t> cu(1, 0), table, lens, kinds, params, writes;
    int max_n = 1;
    for (const RowSpec& r : c.rows) {
        cu.push_back(cu.back() + (r.n > 0 ? r.n : 0));
        for (int e = 0; e < T; ++e) {
            int32_t page = 0x7fffffff;  // entries past the used ones hold garbage the kernel must ignore
            if (!r.pages.empty()) {
                if (e < static_cast<int>(r.pages.size())) page = r.pages[e];
            } else if (!pool.empty()) {
                page = pool.back();
                pool.pop_back();
            }
            table.push_back(page);
        }
        lens.push_back(r.past), kinds.push_back(r.kind), params.push_back(r.param), writes.push_back(r.write);
        if (r.n > max_n) max_n = r.n;
    }
    const int N = cu.back() + c.extra_tokens;
    if (!c.cu_override.empty()) cu = c.cu_override;
    const size_t elem = c.dtype == TRIMODE_DTYPE_FLOAT32 ? 4 : 2;
    const size_t q_bytes = size_t(N) * c.heads * c.head_dim * elem;
    const size_t kv_bytes = size_t(N) * c.kv_heads * c.head_dim * elem;
    const size_t cache_bytes = size_t(c.num_pages) * c.page_size * c.kv_heads * c.head_dim * elem;
    TrimodeAttentionParams p{};
    p.abi_version = TRIMODE_ATTENTION_ABI_VERSION;
    p.dtype = c.dtype;
    p.num_rows = B, p.num_tokens = N, p.num_heads = c.heads, p.num_kv_heads = c.kv_heads;
    p.head_dim = c.head_dim, p.num_pages = c.num_pages, p.page_size = c.page_size, p.pages_per_row = T;
    p.max_chunk = c.max_chunk > 0 ? c.max_chunk : (max_n < N ? max_n : N), p.scale = 0.1f;
    p.q = random_buffer(q_bytes, c.dtype, gen);
    p.k_new = random_buffer(kv_bytes, c.dtype, gen);
    p.v_new = random_buffer(kv_bytes, c.dtype, gen);
    p.k_cache = random_buffer(cache_bytes, c.dtype, gen);
    p.v_cache = random_buffer(cache_bytes, c.dtype, gen);
    p.out = random_buffer(q_bytes, c.dtype, gen);
    int32_t* arrays[6] = {int_buffer(cu), int_buffer(table), int_buffer(lens), int_buffer(kinds),
                          int_buffer(params), int_buffer(writes)};
    p.cu_seqlens = arrays[0], p.page_table = arrays[1], p.cache_lens = arrays[2], p.mask_kind = arrays[3];
    p.mask_param = arrays[4], p.write = arrays[5];
    size_t workspace = 0;
    trimode_block_attention_workspace_size(&p, &workspace);
    p.workspace = workspace ? random_buffer(workspace, 0, gen) : nullptr;
    p.workspace_size = workspace;
    const int status = trimode_block_attention(&p, nullptr);
    std::printf("dtype %d B%d N%d Hq%d Hkv%d D%d P%d S%d T%d kinds", c.dtype, B, N, c.heads, c.kv_heads,
                c.head_dim, c.num_pages, c.page_size, T);
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
                // every kind in one call (S 16, T 5): causal, bidirectional, quad(2), prefix_block(3), and a quad(1)
                // whose two drafts fill the last addressable positions 78, 79
                {dtype, 8, 2, head_dim, 30, 16, 5, 8,
                 {{0, 0, 5, 0, 1, {}}, {1, 0, 4, 7, 0, {}}, {2, 2, 6, 65, 1, {}}, {3, 3, 7, 20, 1, {}},
                  {2, 1, 2, 78, 1, {}}}},
                // decode rows, split-K (64 SMs) over a long cache in pages of 24; the first two rows share
                // (read only) their first ten pages, the third row writes across a page boundary
                {dtype, 4, 1, head_dim, 40, 24, 13, 64,
                 {{0, 0, 1, 299, 0, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}},
                  {1, 0, 1, 240, 0, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}},
                  {2, 1, 2, 143, 1, {20, 21, 22, 23, 24, 25, 26}}}},
                // one long row over five 64-row tiles with pages of ONE position, tokens after it owned by no row
                {dtype, 4, 1, head_dim, 128, 1, 100, 1, {{3, 12, 70, 30, 1, {}}}, 0, {}, 3},
                // pages of 5: a write past T*S is dropped, clamped cache lengths
                {dtype, 4, 4, head_dim, 5, 5, 2, 64, {{0, 0, 3, 10, 1, {}}, {2, 1, 2, 99, 1, {}}}},
                // bad page data: ids -1, P and INT_MIN among the read pages, a write into page P, a table too
                // short for the write (T*S = 12, p_b + w_b = 14), a written page another row reads
                {dtype, 4, 2, head_dim, 6, 4, 3, 8,
                 {{0, 0, 2, 9, 1, {0, -1, 6}}, {3, 1, 3, 5, 1, {1, 6}}, {0, 0, 4, 10, 1, {2, 3, 4}},
                  {1, 0, 2, 8, 0, {-2147483647 - 1, 5, 5}}, {1, 0, 1, 4, 0, {2}}},
                 0, {}, 1},
                // rows the contract does not define: bad pages, unknown kind, quad length, tail > n,
                // bidirectional write, n > max_chunk, negative cache length
                {dtype, 4, 2, head_dim, 3, 16, 1, 8,
                 {{0, 0, 2, 3, 1, {9}}, {7, 0, 2, 0, 1, {0}}, {2, 2, 5, 0, 1, {1}}, {3, 9, 3, 0, 1, {0}},
                  {1, 0, 2, 0, 1, {1}}, {0, 0, 4, 0, 1, {0}}, {0, 0, 1, -5, 1, {2}}},
                 2},
                // cu_seqlens out of range and decreasing
                {dtype, 4, 2, head_dim, 2, 16, 1, 64,
                 {{0, 0, 2, 3, 1, {0}}, {0, 0, 2, 3, 1, {1}}, {1, 0, 2, 0, 0, {0}}}, 2, {-3, 4, 1, 99}},
            };
            for (const Case& c : cases) failures += run(c) != TRIMODE_OK;
        }
    std::printf("%s: %d failed call(s)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
