// Memory-safety check of the CUDA kernels on the CPU: the emulation (block_attention_emu.cpp) compiled with
// AddressSanitizer + UBSan, every tensor in a buffer of exactly its size, and the emulated shared memory past
// what a launch requested poisoned. Any out-of-bounds global or shared access, or undefined behaviour in the
// kernel source, aborts with a report. Built and run by `make -C plugins emu-asan-check`.
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

struct Case {
    int dtype, batch, chunk, heads, kv_heads, head_dim, slots_count, capacity;
    std::vector<int> slots, cache_lens, chunk_lens;
    int mask_kind, write_kv, sm_count;
    bool mask_from_memory = false;  // pass mask_kind through mask_kind_device (an exact 4-byte buffer)
};

int run(const Case& c) {
    std::mt19937 gen(7);
    trimode_emu_set_sm_count(c.sm_count);
    const size_t elem = c.dtype == TRIMODE_DTYPE_FLOAT32 ? 4 : 2;
    const size_t q_bytes = size_t(c.batch) * c.chunk * c.heads * c.head_dim * elem;
    const size_t kv_bytes = size_t(c.batch) * c.chunk * c.kv_heads * c.head_dim * elem;
    const size_t cache_bytes = size_t(c.slots_count) * c.capacity * c.kv_heads * c.head_dim * elem;
    TrimodeAttentionParams p{};
    p.abi_version = TRIMODE_ATTENTION_ABI_VERSION;
    p.dtype = c.dtype;
    p.batch = c.batch, p.chunk = c.chunk, p.num_heads = c.heads, p.num_kv_heads = c.kv_heads;
    p.head_dim = c.head_dim, p.cache_slots = c.slots_count, p.cache_capacity = c.capacity;
    p.mask_kind = c.mask_kind, p.write_kv = c.write_kv, p.scale = 0.1f;
    p.q = random_buffer(q_bytes, c.dtype, gen);
    p.k_new = random_buffer(kv_bytes, c.dtype, gen);
    p.v_new = random_buffer(kv_bytes, c.dtype, gen);
    p.k_cache = random_buffer(cache_bytes, c.dtype, gen);
    p.v_cache = random_buffer(cache_bytes, c.dtype, gen);
    p.out = random_buffer(q_bytes, c.dtype, gen);
    auto* index = static_cast<int32_t*>(random_buffer(3 * sizeof(int32_t) * c.batch, 0, gen));
    for (int b = 0; b < c.batch; ++b) {
        index[b] = c.slots[b];
        index[c.batch + b] = c.cache_lens[b];
        index[2 * c.batch + b] = c.chunk_lens[b];
    }
    p.slots = index, p.cache_lens = index + c.batch, p.chunk_lens = index + 2 * c.batch;
    int32_t* mask = nullptr;
    if (c.mask_from_memory) {
        mask = static_cast<int32_t*>(random_buffer(sizeof(int32_t), 0, gen));
        *mask = c.mask_kind;
        p.mask_kind = 99;  // ignored when mask_kind_device is set
        p.mask_kind_device = mask;
    }
    size_t workspace = 0;
    trimode_block_attention_workspace_size(&p, &workspace);
    p.workspace = workspace ? random_buffer(workspace, 0, gen) : nullptr;
    p.workspace_size = workspace;
    const int status = trimode_block_attention(&p, nullptr);
    std::printf("dtype %d B%d T%d Hq%d Hkv%d D%d mask %d%s splits-workspace %zu: status %d\n", c.dtype, c.batch,
                c.chunk, c.heads, c.kv_heads, c.head_dim, c.mask_kind, c.mask_from_memory ? " (memory)" : "",
                workspace, status);
    for (const void* t : {p.q, p.k_new, p.v_new, static_cast<const void*>(p.k_cache),
                          static_cast<const void*>(p.v_cache), static_cast<const void*>(p.out),
                          static_cast<const void*>(index), static_cast<const void*>(p.workspace),
                          static_cast<const void*>(mask)})
        std::free(const_cast<void*>(t));
    return status;
}

}  // namespace

int main() {
    int failures = 0;
    for (int dtype : {TRIMODE_DTYPE_FLOAT32, TRIMODE_DTYPE_FLOAT16, TRIMODE_DTYPE_BFLOAT16})
        for (int head_dim : {64, 128})
            for (int mask : {0, 1}) {
                const Case cases[] = {
                    {dtype, 3, 5, 8, 2, head_dim, 3, 70, {2, 0, 1}, {0, 7, 65}, {5, 2, 5}, mask, 1, 8},
                    {dtype, 2, 1, 4, 1, head_dim, 2, 300, {1, 0}, {299, 0}, {1, 1}, mask, 1, 64},  // split
                    {dtype, 1, 70, 4, 1, head_dim, 1, 100, {0}, {30}, {70}, mask, 1, 1},  // 5 row tiles
                    {dtype, 2, 3, 4, 4, head_dim, 2, 10, {1, 0}, {10, 9}, {3, 3}, mask, 1, 64},  // writes past L
                    {dtype, 2, 4, 4, 2, head_dim, 2, 16, {1, -1}, {99, -5}, {9, -1}, mask, 1, 8},  // clamped data
                };
                for (const Case& c : cases) failures += run(c) != TRIMODE_OK;
            }
    // The mask kind read from memory, valid and not (a bad value must give zeros, never an out-of-bounds access).
    for (int dtype : {TRIMODE_DTYPE_FLOAT32, TRIMODE_DTYPE_BFLOAT16})
        for (int head_dim : {64, 128})
            for (int mask : {0, 1, 2, -1}) {
                Case direct{dtype, 3, 5, 8, 2, head_dim, 3, 70, {2, 0, 1}, {0, 7, 65}, {5, 2, 5}, mask, 1, 8};
                Case split{dtype, 2, 1, 4, 1, head_dim, 2, 300, {1, 0}, {299, 0}, {1, 1}, mask, 1, 64};
                direct.mask_from_memory = split.mask_from_memory = true;
                failures += run(direct) != TRIMODE_OK;
                failures += run(split) != TRIMODE_OK;
            }
    std::printf("%s: %d failed call(s)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
