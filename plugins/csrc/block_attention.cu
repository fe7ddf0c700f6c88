// CUDA implementation of the C API in block_attention.h (libtrimode_attention.so).
//
// Rows are packed (cu_seqlens) and every row has its own mask kind, parameter and write flag, all read on the
// device, so one launch (and one captured CUDA graph) serves any mix of causal, bidirectional, quad and
// prefix_block rows. The grid is sized from host bounds only: gridDim.x = ceil(max_chunk * G / 64) row tiles,
// gridDim.y = B * Hkv, gridDim.z = the split count; a tile past its row's tokens returns at once.
//
// One thread block computes one tile of 64 "packed" query rows of one (row b, kv head h): packed row R stands
// for chunk token t = R / G and query head h * G + R % G (G = Hq / Hkv), so a K/V tile loaded into shared memory
// once serves every query head of its group (GQA) and every chunk token. Keys are visited in tiles of 64 with
// an online softmax (flash attention); cached keys come from the page pool through the row's page table, chunk
// keys from k_new/v_new. 64 threads look up where the 64 keys of a tile live (one page-table read and one
// division per key, not per element) and publish their source rows in a double-buffered shared-memory table
// (the next tile's lookups overlap the current tile); the K and V loads and the mask read them from there. A
// key whose page id is outside [0, P) gets no source: it is zero-filled and masked out, never read.
// The chunk mask is evaluated per (query, key) element inside the softmax from the row's kind and parameter
// (never materialized); the key range of a tile is bounded by what its last query token may see.
//
// Decode and short chunks give too few tiles to fill the GPU, so the key range is then split across
// gridDim.z blocks (flash decoding): each writes a normalized partial output and its log-sum-exp into the
// workspace, and a combine kernel merges them. The split count depends on shapes, the host bounds and the SM
// count only, never on device data, so a call is safe to capture in a CUDA graph and replays identically.
//
// `out` is zeroed first (cudaMemsetAsync, capturable): tokens of no valid row stay zero. A writing row's
// blocks of tile 0 / split 0 copy its written tokens into the cache at positions [p_b, p_b + count), through its
// page table (a page id outside [0, P) drops the write). Every block reads cache positions < p_b only (chunk keys
// come from k_new), and a written page is used by no other row or entry of the call, so the copy cannot race
// with any read. A row the contract does not define is made empty on the device (zeros, no write; see
// block_attention.h).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>

#include "block_attention.h"
#include "block_attention_common.h"
#include "block_attention_kernels.cuh"

namespace trimode {
namespace {

constexpr int kMaxDevices = 64;

int sm_count() {
    static int cache[kMaxDevices] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return 0;
    if (device < 0 || device >= kMaxDevices) return 0;
    if (cache[device] == 0) {
        int count = 0;
        if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
        cache[device] = count;
    }
    return cache[device];
}

// Opts one kernel into more than 48 KiB of dynamic shared memory; querying the combine kernel's attributes
// makes the runtime load it too (CUDA lazy loading), so neither is first loaded inside a graph capture.
template <typename T, int D>
cudaError_t prepare_kernels() {
    cudaError_t err = cudaFuncSetAttribute(attention_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(SmemLayout<T, D>::total));
    if (err != cudaSuccess) return err;
    cudaFuncAttributes attributes{};
    return cudaFuncGetAttributes(&attributes, combine_kernel<T, D>);
}

// Once per device, every instantiation at once: the first call (typically eager, before any CUDA graph
// capture) prepares all dtypes and head dims. An instantiation that cannot be prepared (e.g. fp32 with
// head_dim 128 wants ~134 KiB of shared memory, more than an sm_86/sm_89 GPU has) is skipped here and fails
// at its own launch, with the launch error, without affecting the others. Idempotent, so a race between
// threads only repeats the work.
cudaError_t prepare_device() {
    static bool done[kMaxDevices] = {};
    int device = 0;
    const cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if (device < 0 || device >= kMaxDevices || done[device]) return cudaSuccess;
    prepare_kernels<float, 64>();
    prepare_kernels<float, 128>();
    prepare_kernels<__half, 64>();
    prepare_kernels<__half, 128>();
    prepare_kernels<__nv_bfloat16, 64>();
    prepare_kernels<__nv_bfloat16, 128>();
    (void)cudaGetLastError();  // a skipped instantiation must not be reported by the next launch check
    done[device] = true;
    return cudaSuccess;
}

thread_local char g_last_error[256] = "";

int cuda_failure(cudaError_t err) {
    snprintf(g_last_error, sizeof g_last_error, "%s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
    return TRIMODE_ERR_CUDA;
}

template <typename T, int D>
int launch(const TrimodeAttentionParams* p, const SplitPlan& plan, cudaStream_t stream) {
    const KernelArgs a = make_kernel_args(p, plan);
    cudaError_t err = prepare_device();
    if (err != cudaSuccess) return cuda_failure(err);
    const size_t out_bytes = static_cast<size_t>(p->num_tokens) * p->num_heads * D * sizeof(T);
    err = cudaMemsetAsync(p->out, 0, out_bytes, stream);
    if (err != cudaSuccess) return cuda_failure(err);
    const dim3 grid(plan.q_tiles, p->num_rows * p->num_kv_heads, plan.splits);
    attention_kernel<T, D><<<grid, kThreads, SmemLayout<T, D>::total, stream>>>(a);
    err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_failure(err);
    if (plan.splits > 1) {
        const dim3 combine_grid(static_cast<unsigned>(p->max_chunk) * p->num_heads, p->num_rows);
        combine_kernel<T, D><<<combine_grid, D, 0, stream>>>(a);
        err = cudaGetLastError();
        if (err != cudaSuccess) return cuda_failure(err);
    }
    return TRIMODE_OK;
}

template <typename T>
int launch_dim(const TrimodeAttentionParams* p, const SplitPlan& plan, cudaStream_t stream) {
    return p->head_dim == 64 ? launch<T, 64>(p, plan, stream) : launch<T, 128>(p, plan, stream);
}

}  // namespace
}  // namespace trimode

extern "C" {

TRIMODE_API int trimode_block_attention(const TrimodeAttentionParams* p, void* stream) {
    int status = trimode::validate_params(p);
    if (status != TRIMODE_OK) return status;
    if (static_cast<long long>(p->num_rows) * p->num_kv_heads > 65535 ||
        static_cast<long long>(p->num_tokens) * p->num_heads > 0x7fffffffLL)
        return TRIMODE_ERR_INVALID_SHAPE;  // grid limits
    const size_t limit = p->workspace ? p->workspace_size : 0;
    const trimode::SplitPlan plan = trimode::plan_splits(p, trimode::sm_count(), limit);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (p->dtype) {
        case TRIMODE_DTYPE_FLOAT16: return trimode::launch_dim<__half>(p, plan, s);
        case TRIMODE_DTYPE_BFLOAT16: return trimode::launch_dim<__nv_bfloat16>(p, plan, s);
        default: return trimode::launch_dim<float>(p, plan, s);
    }
}

TRIMODE_API int trimode_block_attention_workspace_size(const TrimodeAttentionParams* p, size_t* bytes) {
    if (bytes == nullptr) return TRIMODE_ERR_NULL_POINTER;
    *bytes = 0;
    const int status = trimode::validate_shapes(p);
    if (status != TRIMODE_OK) return status;
    *bytes = trimode::plan_splits(p, trimode::sm_count(), static_cast<size_t>(-1)).workspace;
    return TRIMODE_OK;
}

TRIMODE_API const char* trimode_error_string(int status) {
    if (status == TRIMODE_ERR_CUDA && trimode::g_last_error[0] != '\0') return trimode::g_last_error;
    return trimode::error_string(status);
}

TRIMODE_API const char* trimode_backend_name(void) { return "cuda"; }

TRIMODE_API int trimode_abi_version(void) { return TRIMODE_ATTENTION_ABI_VERSION; }

}  // extern "C"
