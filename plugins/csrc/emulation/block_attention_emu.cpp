// libtrimode_attention_emu.so: the C API of block_attention.h implemented by running the CUDA kernels of
// block_attention_kernels.cuh on the CPU under cuda_emulation.h. Same split plan, same grids, same kernel
// source as libtrimode_attention.so; only the launch is emulated (blocks run one after another). Host pointers.
//
// The SM count that drives the split plan is settable (trimode_emu_set_sm_count) so that tests can force the
// flash-decoding path (several splits + the combine kernel) or the direct path on small shapes.
#include "cuda_emulation.h"  // must precede the kernels: it defines the CUDA keywords they use

#include "block_attention.h"
#include "block_attention_common.h"
#include "block_attention_kernels.cuh"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace trimode {

// Dynamic shared memory of the block being emulated (blocks run one at a time).
constexpr size_t kEmuSharedBytes = 228 * 1024;
__attribute__((aligned(128))) unsigned char smem[kEmuSharedBytes];

namespace {

int g_sm_count = 8;

struct Grid {
    unsigned x, y, z;
};

void run_grid(Grid grid, int threads, size_t shared_bytes, const std::function<void()>& kernel) {
    if (shared_bytes > kEmuSharedBytes) trimode_emu::fail("kernel asks for more shared memory than an H100 has");
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
#if defined(__SANITIZE_ADDRESS__)  // under ASan, shared memory past what the launch asked for is out of bounds
                ASAN_UNPOISON_MEMORY_REGION(smem, kEmuSharedBytes);
#endif
                std::memset(smem, 0xff, kEmuSharedBytes);  // NaN in fp32, bf16 and fp16: uninitialized reads show
#if defined(__SANITIZE_ADDRESS__)
                ASAN_POISON_MEMORY_REGION(smem + shared_bytes, kEmuSharedBytes - shared_bytes);
#endif
                blockIdx = EmuDim3{x, y, z};
                trimode_emu::run_block(threads, kernel);
            }
}

template <typename T, int D>
int launch(const TrimodeAttentionParams* p, const SplitPlan& plan) {
    const KernelArgs a = make_kernel_args(p, plan);
    std::memset(p->out, 0, static_cast<size_t>(p->num_tokens) * p->num_heads * D * sizeof(T));  // cudaMemsetAsync
    const Grid grid{static_cast<unsigned>(plan.q_tiles), static_cast<unsigned>(p->num_rows * p->num_kv_heads),
                    static_cast<unsigned>(plan.splits)};
    run_grid(grid, kThreads, SmemLayout<T, D>::total, [&a] { attention_kernel<T, D>(a); });
    if (plan.splits > 1) {
        const Grid combine{static_cast<unsigned>(p->max_chunk) * p->num_heads, static_cast<unsigned>(p->num_rows), 1};
        run_grid(combine, D, 0, [&a] { combine_kernel<T, D>(a); });
    }
    return TRIMODE_OK;
}

template <typename T>
int launch_dim(const TrimodeAttentionParams* p, const SplitPlan& plan) {
    return p->head_dim == 64 ? launch<T, 64>(p, plan) : launch<T, 128>(p, plan);
}

}  // namespace
}  // namespace trimode

extern "C" {

TRIMODE_API int trimode_block_attention(const TrimodeAttentionParams* p, void* /*stream*/) {
    const int status = trimode::validate_params(p);
    if (status != TRIMODE_OK) return status;
    const size_t limit = p->workspace ? p->workspace_size : 0;
    const trimode::SplitPlan plan = trimode::plan_splits(p, trimode::g_sm_count, limit);
    switch (p->dtype) {
        case TRIMODE_DTYPE_FLOAT16: return trimode::launch_dim<__half>(p, plan);
        case TRIMODE_DTYPE_BFLOAT16: return trimode::launch_dim<__nv_bfloat16>(p, plan);
        default: return trimode::launch_dim<float>(p, plan);
    }
}

TRIMODE_API int trimode_block_attention_workspace_size(const TrimodeAttentionParams* p, size_t* bytes) {
    if (bytes == nullptr) return TRIMODE_ERR_NULL_POINTER;
    *bytes = 0;
    const int status = trimode::validate_shapes(p);
    if (status != TRIMODE_OK) return status;
    *bytes = trimode::plan_splits(p, trimode::g_sm_count, static_cast<size_t>(-1)).workspace;
    return TRIMODE_OK;
}

TRIMODE_API const char* trimode_error_string(int status) { return trimode::error_string(status); }

TRIMODE_API const char* trimode_backend_name(void) { return "emu"; }

TRIMODE_API int trimode_abi_version(void) { return TRIMODE_ATTENTION_ABI_VERSION; }

// Emulation only: the SM count the split plan assumes (default 8); returns the previous value.
TRIMODE_API int trimode_emu_set_sm_count(int count) {
    const int previous = trimode::g_sm_count;
    trimode::g_sm_count = count;
    return previous;
}

}  // extern "C"
