/*
 * trimode block attention: the C API shared by the CUDA library (libtrimode_attention.so), the CPU reference
 * library (libtrimode_attention_cpu.so), the torch custom op (through ctypes) and the TensorRT plugin.
 *
 * The contract is the one of plugins/reference.py (block_attention_reference):
 *
 *   q           [B, T, Hq, D]   queries of the chunk (RoPE and position scale already applied)
 *   k_new/v_new [B, T, Hkv, D]  the chunk's keys and values
 *   k_cache     [S, L, Hkv, D]  one layer's cache (v_cache alike)
 *   slots       [B] int32       cache slot of each sequence; NULL means slot b = b
 *   cache_lens  [B] int32       p_b: valid cached positions of sequence b
 *   chunk_lens  [B] int32       n_b <= T: valid chunk tokens of sequence b
 *   mask kind   0 causal | 1 bidirectional block: the host field mask_kind, or, when mask_kind_device is set,
 *               the int32 it points at (read by the implementation itself, see below)
 *   out         [B, T, Hq, D]   rows t >= n_b are written as zeros
 *
 * Query t < n_b of sequence b attends to cached positions 0..p_b-1 and to chunk tokens j < n_b with j <= t
 * (causal) or any j (bidirectional block). Softmax accumulates in fp32. With write_kv the chunk's K/V are
 * stored at cache[slots[b], p_b + t] for t < n_b; chunk keys are always READ from k_new/v_new, never from the
 * cache positions being written, so the write never races with a read.
 *
 * All tensors are dense and contiguous in the layouts above, with the same element type (dtype), except the
 * int32 index vectors. The stream argument is a cudaStream_t passed as void* so that this header does not need
 * the CUDA headers (the CPU library ignores it). For the CUDA library every pointer is a device pointer and
 * nothing synchronizes the host, so a call can be captured in a CUDA graph; for the CPU library every pointer
 * is a host pointer.
 *
 * Mask kind from memory (mask_kind_device, ABI 2): one captured graph or TensorRT plan then serves causal and
 * bidirectional steps, the kind being whatever the tensor holds at execution time (the ONNX graph's mask_kind
 * input). The CUDA kernel reads it on the device (no host sync, so the call stays capturable); it cannot
 * report a bad value, so a value other than 0 or 1 makes every sequence empty: the output is all zeros and
 * write_kv writes nothing (never a crash, never a silently different mask). The CPU library reads it on the
 * host and returns the status of the host field instead (6 for 2, 5 for any other value). When
 * mask_kind_device is set the host field mask_kind is ignored.
 */
#ifndef TRIMODE_BLOCK_ATTENTION_H
#define TRIMODE_BLOCK_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TRIMODE_API __declspec(dllexport)
#else
#define TRIMODE_API __attribute__((visibility("default")))
#endif

/* Bumped whenever TrimodeAttentionParams changes layout; callers set params.abi_version to it. */
#define TRIMODE_ATTENTION_ABI_VERSION 2

/* Most partial results one query row is split into (flash-decoding). */
#define TRIMODE_MAX_SPLITS 32

enum TrimodeDtype {
    TRIMODE_DTYPE_FLOAT32 = 0,
    TRIMODE_DTYPE_FLOAT16 = 1,
    TRIMODE_DTYPE_BFLOAT16 = 2
};

enum TrimodeMaskKind {
    TRIMODE_MASK_CAUSAL = 0,
    TRIMODE_MASK_BIDIRECTIONAL = 1,
    TRIMODE_MASK_STRUCTURED = 2 /* reserved for quadratic self-speculation; rejected for now */
};

enum TrimodeStatus {
    TRIMODE_OK = 0,
    TRIMODE_ERR_NULL_POINTER = 1,
    TRIMODE_ERR_INVALID_SHAPE = 2,
    TRIMODE_ERR_HEAD_DIM = 3,
    TRIMODE_ERR_GQA = 4,
    TRIMODE_ERR_MASK_KIND = 5,
    TRIMODE_ERR_MASK_NOT_IMPLEMENTED = 6,
    TRIMODE_ERR_DTYPE = 7,
    TRIMODE_ERR_MISALIGNED = 8,
    TRIMODE_ERR_OUT_OF_RANGE = 9,
    TRIMODE_ERR_ABI = 10,
    TRIMODE_ERR_CUDA = 11
};

typedef struct TrimodeAttentionParams {
    int32_t abi_version; /* TRIMODE_ATTENTION_ABI_VERSION */
    int32_t dtype;       /* TrimodeDtype of q, k_new, v_new, k_cache, v_cache and out */
    int32_t batch;       /* B */
    int32_t chunk;       /* T */
    int32_t num_heads;   /* Hq, a multiple of num_kv_heads */
    int32_t num_kv_heads;/* Hkv */
    int32_t head_dim;    /* D: 64 or 128 */
    int32_t cache_slots; /* S */
    int32_t cache_capacity; /* L: positions per slot */
    int32_t max_cache_len;  /* optional host-known upper bound of every p_b (0: use L); only sizes the split */
    int32_t mask_kind;   /* TrimodeMaskKind; ignored when mask_kind_device is set */
    int32_t write_kv;    /* nonzero: store the chunk's K/V into the cache */
    float scale;         /* softmax scale, typically head_dim ** -0.5 */
    const void* q;
    const void* k_new;
    const void* v_new;
    void* k_cache;
    void* v_cache;
    const int32_t* slots; /* may be NULL */
    const int32_t* cache_lens;
    const int32_t* chunk_lens;
    const int32_t* mask_kind_device; /* may be NULL (use mask_kind); else one int32 read inside the call (ABI 2) */
    void* out;
    void* workspace;      /* may be NULL; too small a workspace only means fewer splits */
    size_t workspace_size;
} TrimodeAttentionParams;

/* Computes the attention; returns TRIMODE_OK or a TrimodeStatus. stream: cudaStream_t (CUDA library only). */
TRIMODE_API int trimode_block_attention(const TrimodeAttentionParams* params, void* stream);

/* Bytes of workspace the call would use for these shapes on the current device (0: none needed). */
TRIMODE_API int trimode_block_attention_workspace_size(const TrimodeAttentionParams* params, size_t* bytes);

/* A static, human-readable description of a status code. */
TRIMODE_API const char* trimode_error_string(int status);

/* "cuda", "cpu" or "emu": which implementation this library is. */
TRIMODE_API const char* trimode_backend_name(void);

/* TRIMODE_ATTENTION_ABI_VERSION the library was built with. */
TRIMODE_API int trimode_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* TRIMODE_BLOCK_ATTENTION_H */
