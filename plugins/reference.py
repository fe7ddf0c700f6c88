"""Plain PyTorch reference of the block attention contract over a paged KV cache (docs/attention.md).

One forward of the engine carries a chunk of new tokens for each of B rows (sequences), packed end to end
without padding, and every row chooses its own mask kind (`plugins/masks.py`), so a decode row, a prefill row,
a draft row and a quad row of different requests share one call. The cache is a pool of pages; each row reads
and writes its positions through its own page table, so rows may share pages (a common prompt prefix) and a
sequence's pages need not be contiguous. Every implementation - this reference, the C++ CPU library, the CUDA
kernel (and its CPU emulation), the torch custom op, the ONNX ``BlockAttention`` node and the TensorRT plugin -
computes exactly this:

    q           [N, Hq, D]        queries of all rows, packed (RoPE and the position scale already applied)
    k_new/v_new [N, Hkv, D]       the rows' new keys (RoPE applied) and values, packed alike
    k_cache     [P, S, Hkv, D]    one layer's page pool: P pages of S = page_size positions (v_cache alike)
    cu_seqlens  [B+1] int         row b owns packed tokens cu_seqlens[b] .. cu_seqlens[b+1]-1 (n_b of them)
    page_table  [B, T] int        cache position p of row b lives in page page_table[b, p // S], offset p % S
    cache_lens  [B] int           p_b: valid cached positions of row b (every row token sees all of them)
    mask_kind   [B] int           the mask inside row b's chunk (masks.chunk_mask)
    mask_param  [B] int           quad: L (n_b == L * (L + 1)); prefix_block: the tail length m (<= n_b)
    write       [B] int           1: store row b's causally computed K/V (masks.written_offsets)

A row uses the first ceil((p_b + w_b) / S) entries of its page table (w_b: the positions it writes); the rest
are ignored. Writes: the i-th written token goes to position p_b + i, through the page table. Chunk keys are
always read from k_new/v_new, never from the positions being written, and a page a row writes must appear
exactly once among the used table entries of the call - not in another row's table, not twice in its own
(the C++ library and the torch op refuse such a call; the CUDA kernel cannot check it) - so the result never
depends on the order rows or blocks are computed in. Softmax in fp32.

The loop over rows is deliberate: each row is computed exactly as if it were alone, so batching never
changes a result, and it is the slow-but-obvious form every fast path is checked against.
"""

from __future__ import annotations

import torch

from .masks import (  # noqa: F401  (re-exported: the reference is also where tests find the vocabulary)
    BIDIRECTIONAL,
    CAUSAL,
    MASK_KINDS,
    PREFIX_BLOCK,
    QUAD,
    check_row,
    chunk_mask,
    written_offsets,
)


def pages_used(past: int, written: int, page_size: int) -> int:
    """Page-table entries a row touches: its cached positions plus the ones it writes."""
    return -(-(past + written) // page_size)


def row_positions(page_table_row: torch.Tensor, start: int, count: int, page_size: int, num_pages: int
                  ) -> torch.Tensor:
    """Flat pool indices (page * S + offset) of positions start .. start+count-1 through one page table row."""
    positions = torch.arange(start, start + count, device=page_table_row.device)
    index = positions // page_size
    if count and int(index.max()) >= page_table_row.shape[0]:
        raise ValueError(f"positions up to {start + count - 1} need {int(index.max()) + 1} page-table entries, "
                         f"the table has {page_table_row.shape[0]}")
    pages = page_table_row.long()[index]
    if count and (int(pages.min()) < 0 or int(pages.max()) >= num_pages):
        raise ValueError(f"a page id outside the pool of {num_pages} pages")
    return pages * page_size + positions % page_size


def block_attention_reference(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    page_table: torch.Tensor,
    cache_lens: torch.Tensor,
    mask_kind: torch.Tensor,
    mask_param: torch.Tensor,
    write: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of every row's chunk over its cached pages plus itself; see the module docstring."""
    n_heads, n_kv = q.shape[1], k_new.shape[1]
    group = n_heads // n_kv
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    flat_k = k_cache.view(num_pages * page_size, *k_cache.shape[2:])
    flat_v = v_cache.view(num_pages * page_size, *v_cache.shape[2:])
    out = torch.zeros_like(q)
    for b in range(cu_seqlens.shape[0] - 1):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        past, n = int(cache_lens[b]), end - start
        kind, param, writes = int(mask_kind[b]), int(mask_param[b]), bool(int(write[b]))
        check_row(kind, param, n, writes)
        if n == 0:
            continue
        cached = row_positions(page_table[b], 0, past, page_size, num_pages)
        keys = torch.cat([flat_k[cached], k_new[start:end]], dim=0)  # [past+n, Hkv, D]
        values = torch.cat([flat_v[cached], v_new[start:end]], dim=0)
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, past+n, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[start:end].transpose(0, 1)  # [Hq, n, D]
        scores = torch.matmul(queries, keys.transpose(1, 2)).float() * scale  # [Hq, n, past+n]
        hidden = ~chunk_mask(kind, param, n, q.device)
        scores[:, :, past:] = scores[:, :, past:].masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out[start:end] = torch.matmul(probs, values).transpose(0, 1)
        if writes:
            offsets = written_offsets(kind, param, n)
            if offsets:
                target = row_positions(page_table[b], past, len(offsets), page_size, num_pages)
                index = torch.as_tensor(offsets, dtype=torch.long, device=q.device) + start
                flat_k[target] = k_new[index]
                flat_v[target] = v_new[index]
    return out


def dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Plain softmax attention with an explicit [n, k] boolean mask: q [n, Hq, D], keys/values [k, Hkv, D].

    The independent oracle of the tests: no chunks, no cache, no pages, no mask kinds, just a mask.
    """
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).transpose(0, 1).float()
    values = values.repeat_interleave(group, dim=1).transpose(0, 1).float()
    scores = torch.matmul(q.transpose(0, 1).float(), keys.transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).transpose(0, 1).to(q.dtype)
