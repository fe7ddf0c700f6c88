/*
 * trimode block attention: the C API shared by the CUDA library (libtrimode_attention.so), the CPU reference
 * library (libtrimode_attention_cpu.so), the emulated CUDA kernel (libtrimode_attention_emu.so), the torch
 * custom op (through ctypes) and the TensorRT plugin. ABI 4: packed rows, one mask kind per row, a paged cache.
 *
 * The contract is the one of plugins/reference.py (block_attention_reference), see docs/attention.md:
 *
 *   q           [N, Hq, D]      queries of every row, packed end to end (RoPE and position scale applied)
 *   k_new/v_new [N, Hkv, D]     the rows' new keys and values, packed alike
 *   k_cache     [P, S, Hkv, D]  one layer's page pool: P pages of S (page_size) positions (v_cache alike)
 *   cu_seqlens  [B+1] int32     row b owns packed tokens cu_seqlens[b] .. cu_seqlens[b+1]-1 (n_b of them)
 *   page_table  [B, T] int32    row-major; cache position p of row b is page page_table[b*T + p/S], offset p%S
 *   cache_lens  [B] int32       p_b: valid cached positions of row b
 *   mask_kind   [B] int32       0 causal, 1 bidirectional, 2 quad(L), 3 prefix_block(m)
 *   mask_param  [B] int32       quad: L (n_b must be L * (L + 1)); prefix_block: the tail m (0 <= m <= n_b)
 *   write       [B] int32       nonzero: store row b's causally computed K/V (may be NULL: no row writes)
 *   out         [N, Hq, D]      tokens owned by no (valid) row are written as zeros
 *
 * Query t of row b attends to cached positions 0..p_b-1 and to the chunk keys s its row's mask allows:
 *   causal s <= t | bidirectional every s | quad(L): sub-block j = tokens j(L+1) .. j(L+1)+L, offset 0 the
 *   draft d_j; every token sees d_k for k <= its sub-block, a mask token also sees its whole sub-block |
 *   prefix_block(m): s <= t, and the last m tokens see the whole chunk.
 * Writes (rows with write != 0; w_b tokens): causal - token t at position p_b + t; quad - d_j at p_b + j;
 * prefix_block - the first n_b - m tokens at p_b + t; bidirectional rows never write (write must be 0).
 * Reads and writes both go through the row's page table. A row uses the first ceil((p_b + w_b) / S) entries of
 * its table (an empty row, n_b = 0, uses none); the other entries are ignored and may hold anything. Pages may
 * be shared between rows (a common prefix read by several rows), but a page a row WRITES must appear exactly
 * once among the used entries of the call (no other row, and no other entry of the same row, uses it). Chunk
 * keys are always READ from k_new/v_new, never from the positions being written, so with that rule a write
 * never races with a read and the result does not depend on the order rows are computed in. Softmax in fp32.
 *
 * Every per-row array (page_table included) lives in the same memory as the tensors: device memory for the
 * CUDA library (so one captured CUDA graph serves any mix of kinds, lengths, pages and write flags: nothing
 * about them is read on the host), host memory for the CPU and emulated libraries. The host only gives bounds
 * that size the grid:
 *   max_chunk      an upper bound of every n_b (1 <= max_chunk <= N)
 *   max_cache_len  an upper bound of every p_b (0: T * S, the most a page table can address)
 *
 * Invalid per-row data: the CPU library reads its host arrays and returns a status (5 unknown kind, 6 a row
 * whose param, length or write flag its kind does not allow, 9 an index out of range: cu_seqlens, n_b, p_b, a
 * used page id outside [0, P), ceil((p_b + w_b) / S) > T, or a written page used twice) before writing anything.
 * The CUDA kernel cannot report device data without a host sync. It makes a row EMPTY (zero output, no cache
 * write - never a crash, never an access out of bounds) when cu_seqlens[b] > cu_seqlens[b+1], either is outside
 * [0, N], n_b > max_chunk, the kind is unknown, a quad row has n_b != L(L+1) (or L < 1), a prefix_block tail is
 * outside [0, n_b], or a bidirectional row has write set. Bad page data does not empty a row: p_b is clamped to
 * [0, T*S], a cached key whose page id is outside [0, P) is not visible (masked out, never read), and a write
 * whose page id is outside [0, P) or whose position is past T*S is dropped. A written page used twice is not
 * detected on the device (the result then depends on the order blocks run in).
 *
 * All tensors are dense and contiguous in the layouts above, with the same element type (dtype), 16-byte
 * aligned. The stream argument is a cudaStream_t passed as void* so that this header does not need the CUDA
 * headers (the CPU libraries ignore it); the CUDA library never synchronizes or allocates, so a call can be
 * captured in a CUDA graph.
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

/* Bumped whenever TrimodeAttentionParams changes layout or meaning; callers set params.abi_version to it. */
#define TRIMODE_ATTENTION_ABI_VERSION 4

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
    TRIMODE_MASK_QUAD = 2,         /* mask_param = L, n_b = L * (L + 1) */
    TRIMODE_MASK_PREFIX_BLOCK = 3  /* mask_param = m, the bidirectional tail */
};

enum TrimodeStatus {
    TRIMODE_OK = 0,
    TRIMODE_ERR_NULL_POINTER = 1,
    TRIMODE_ERR_INVALID_SHAPE = 2,
    TRIMODE_ERR_HEAD_DIM = 3,
    TRIMODE_ERR_GQA = 4,
    TRIMODE_ERR_MASK_KIND = 5,    /* a row's mask_kind is unknown (CPU library) */
    TRIMODE_ERR_INVALID_ROW = 6,  /* a row's mask_param / length / write flag do not fit its kind (CPU) */
    TRIMODE_ERR_DTYPE = 7,
    TRIMODE_ERR_MISALIGNED = 8,
    TRIMODE_ERR_OUT_OF_RANGE = 9, /* row data out of range, a bad page or a shared written page (CPU) */
    TRIMODE_ERR_ABI = 10,
    TRIMODE_ERR_CUDA = 11
};

typedef struct TrimodeAttentionParams {
    int32_t abi_version;    /* TRIMODE_ATTENTION_ABI_VERSION */
    int32_t dtype;          /* TrimodeDtype of q, k_new, v_new, k_cache, v_cache and out */
    int32_t num_rows;       /* B */
    int32_t num_tokens;     /* N: packed tokens of q / k_new / v_new / out */
    int32_t num_heads;      /* Hq, a multiple of num_kv_heads */
    int32_t num_kv_heads;   /* Hkv */
    int32_t head_dim;       /* D: 64 or 128 */
    int32_t num_pages;      /* P: pages in k_cache / v_cache; P * S < 2^31 */
    int32_t page_size;      /* S: positions per page */
    int32_t pages_per_row;  /* T: entries per page-table row (its row stride); T * S <= 2^30 */
    int32_t max_chunk;      /* host bound of every n_b, 1 <= max_chunk <= N: sizes the grid */
    int32_t max_cache_len;  /* host bound of every p_b, 0 <= max_cache_len <= T * S (0: T * S): sizes splits */
    float scale;            /* softmax scale, typically head_dim ** -0.5 */
    const void* q;
    const void* k_new;
    const void* v_new;
    void* k_cache;
    void* v_cache;
    const int32_t* cu_seqlens; /* [B+1] */
    const int32_t* page_table; /* [B, T] row-major: page ids in [0, P) */
    const int32_t* cache_lens; /* [B] */
    const int32_t* mask_kind;  /* [B] */
    const int32_t* mask_param; /* [B] */
    const int32_t* write;      /* [B], or NULL: no row writes (the TensorRT plugin) */
    void* out;
    void* workspace;        /* may be NULL; too small a workspace only means fewer splits */
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
