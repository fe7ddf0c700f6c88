"""Plain PyTorch reference of the block attention contract.

Every attention kind the engine needs (DESIGN.md section 2) is one function with one contract, shared by
this reference, the C++ CPU reference, the CUDA kernel, the torch custom op, the ONNX ``BlockAttention``
node and the TensorRT plugin:

    q           [B, T, Hq, D]    queries of the chunk (RoPE and the position scale already applied)
    k_new/v_new [B, T, Hkv, D]   the chunk's keys (RoPE applied) and values
    k_cache     [S, L, Hkv, D]   one layer's cache: S slots of L positions (v_cache alike)
    slots       [B] int          cache slot of each sequence
    cache_lens  [B] int          p_b: valid cached positions of sequence b
    chunk_lens  [B] int          n_b <= T: valid chunk tokens of sequence b (the rest is padding)
    mask_kind   0 causal | 1 bidirectional block
    write_kv    write k_new[b, :n_b] into k_cache[slots[b], p_b:p_b+n_b] (and v alike)

Query t < n_b of sequence b attends to the cached positions 0..p_b-1 and to chunk tokens j < n_b with
j <= t (causal) or any j (bidirectional). Rows t >= n_b of the output are zero. Softmax in fp32.

The loop over sequences is deliberate: each sequence is computed exactly as if it were alone, so batching
never changes a result, and it is the slow-but-obvious form the fast kernels are checked against.
"""

from __future__ import annotations

import torch

CAUSAL = 0
BIDIRECTIONAL = 1
MASK_KINDS = {"causal": CAUSAL, "bidirectional": BIDIRECTIONAL}


def block_attention_reference(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    cache_lens: torch.Tensor,
    chunk_lens: torch.Tensor,
    mask_kind: int,
    write_kv: bool,
    scale: float,
) -> torch.Tensor:
    """Attention of a chunk over its sequence's cache plus itself; see the module docstring."""
    if mask_kind not in (CAUSAL, BIDIRECTIONAL):
        raise ValueError(f"unknown mask kind {mask_kind}")
    batch, chunk, n_heads, head_dim = q.shape
    n_kv = k_new.shape[2]
    group = n_heads // n_kv
    out = torch.zeros_like(q)
    for b in range(batch):
        slot, past, n = int(slots[b]), int(cache_lens[b]), int(chunk_lens[b])
        if n == 0:
            continue
        keys = torch.cat([k_cache[slot, :past], k_new[b, :n]], dim=0)  # [past+n, Hkv, D]
        values = torch.cat([v_cache[slot, :past], v_new[b, :n]], dim=0)
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, past+n, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[b, :n].transpose(0, 1)  # [Hq, n, D]
        scores = torch.matmul(queries, keys.transpose(1, 2)).float() * scale  # [Hq, n, past+n]
        if mask_kind == CAUSAL and n > 1:
            hidden = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores[:, :, past:] = scores[:, :, past:].masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out[b, :n] = torch.matmul(probs, values).transpose(0, 1)
        if write_kv:
            k_cache[slot, past : past + n] = k_new[b, :n]
            v_cache[slot, past : past + n] = v_new[b, :n]
    return out
