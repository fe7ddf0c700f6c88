"""Plain PyTorch reference of the block attention contract (docs/attention.md).

One forward of the engine carries a chunk of new tokens for each of B rows (sequences), packed end to end
without padding, and every row chooses its own mask kind, so a decode row, a prefill row, a draft row and a
quad row of different requests share one call. Every implementation - this reference, the C++ CPU library,
the CUDA kernel (and its CPU emulation), the torch custom op, the ONNX ``BlockAttention`` node and the
TensorRT plugin - computes exactly this:

    q           [N, Hq, D]     queries of all rows, packed (RoPE and the position scale already applied)
    k_new/v_new [N, Hkv, D]    the rows' new keys (RoPE applied) and values, packed alike
    k_cache     [S, L, Hkv, D] one layer's cache: S slots of L positions (v_cache alike)
    cu_seqlens  [B+1] int      row b owns packed tokens cu_seqlens[b] .. cu_seqlens[b+1]-1 (n_b of them)
    slots       [B] int        cache slot of row b
    cache_lens  [B] int        p_b: valid cached positions of row b (every row token sees all of them)
    mask_kind   [B] int        the mask inside row b's chunk (see `chunk_mask`)
    mask_param  [B] int        quad: L (n_b == L * (L + 1)); prefix_block: the tail length m (<= n_b)
    write       [B] int        1: store row b's causally computed K/V into the cache (see `written_offsets`)

Chunk-internal masks (query t may see chunk key s):
    0 causal        s <= t
    1 bidirectional every s
    2 quad(L)       sub-block j = tokens j*(L+1) .. j*(L+1)+L, offset 0 is the draft token d_j, 1..L masks;
                    every token sees d_k for k <= j; the masks of sub-block j also see all of sub-block j
    3 prefix_block  causal over the first n-m tokens; the last m tokens see the whole chunk
                    (quad's first forward: a prompt causally, then L masks that see it and each other)

Writes (only causally computed K/V ever enter the cache): causal - all n_b tokens at p_b + t; quad - d_j at
p_b + j; prefix_block - the first n_b - m tokens at p_b + t; bidirectional - nothing (write must be 0).
Chunk keys are always read from k_new/v_new, never from the positions being written. Softmax in fp32.

The loop over rows is deliberate: each row is computed exactly as if it were alone, so batching never
changes a result, and it is the slow-but-obvious form every fast path is checked against.
"""

from __future__ import annotations

import torch

CAUSAL = 0
BIDIRECTIONAL = 1
QUAD = 2
PREFIX_BLOCK = 3
MASK_KINDS = {"causal": CAUSAL, "bidirectional": BIDIRECTIONAL, "quad": QUAD, "prefix_block": PREFIX_BLOCK}


def check_row(kind: int, param: int, n: int, write: bool) -> None:
    """Raise ValueError unless (kind, param, n, write) is a row the contract defines."""
    if kind not in (CAUSAL, BIDIRECTIONAL, QUAD, PREFIX_BLOCK):
        raise ValueError(f"unknown mask kind {kind}")
    if kind == QUAD and (param < 1 or n != param * (param + 1)):
        raise ValueError(f"a quad row with L={param} must have L*(L+1) tokens, got {n}")
    if kind == PREFIX_BLOCK and not 0 <= param <= n:
        raise ValueError(f"a prefix_block tail of {param} does not fit a chunk of {n}")
    if kind == BIDIRECTIONAL and write:
        raise ValueError("a bidirectional row cannot write the cache (its K/V are not causal)")


def chunk_mask(kind: int, param: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, n] bool: chunk query t may attend to chunk key s. The one definition of every mask kind."""
    t = torch.arange(n, device=device)[:, None]
    s = torch.arange(n, device=device)[None, :]
    if kind == CAUSAL:
        return s <= t
    if kind == BIDIRECTIONAL:
        return torch.ones(n, n, dtype=torch.bool, device=device)
    if kind == QUAD:
        width = param + 1
        sub_t, off_t = t // width, t % width
        sub_s, off_s = s // width, s % width
        return ((off_s == 0) & (sub_s <= sub_t)) | ((off_t > 0) & (sub_s == sub_t))
    if kind == PREFIX_BLOCK:
        prefix = n - param
        return (s <= t) | (t >= prefix)
    raise ValueError(f"unknown mask kind {kind}")


def written_offsets(kind: int, param: int, n: int) -> list[int]:
    """Chunk offsets whose K/V a writing row stores, in order; the i-th goes to cache position p_b + i."""
    if kind == CAUSAL:
        return list(range(n))
    if kind == QUAD:
        return [j * (param + 1) for j in range(param)]
    if kind == PREFIX_BLOCK:
        return list(range(n - param))
    return []


def block_attention_reference(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    cache_lens: torch.Tensor,
    mask_kind: torch.Tensor,
    mask_param: torch.Tensor,
    write: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of every row's chunk over its cache plus itself; see the module docstring."""
    n_heads, n_kv = q.shape[1], k_new.shape[1]
    group = n_heads // n_kv
    out = torch.zeros_like(q)
    for b in range(slots.shape[0]):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        slot, past, n = int(slots[b]), int(cache_lens[b]), end - start
        kind, param, writes = int(mask_kind[b]), int(mask_param[b]), bool(int(write[b]))
        check_row(kind, param, n, writes)
        if n == 0:
            continue
        keys = torch.cat([k_cache[slot, :past], k_new[start:end]], dim=0)  # [past+n, Hkv, D]
        values = torch.cat([v_cache[slot, :past], v_new[start:end]], dim=0)
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
            if past + len(offsets) > k_cache.shape[1]:
                raise ValueError(f"row {b} would write past the cache's {k_cache.shape[1]} positions")
            index = torch.as_tensor(offsets, dtype=torch.long, device=q.device) + start
            k_cache[slot, past : past + len(offsets)] = k_new[index]
            v_cache[slot, past : past + len(offsets)] = v_new[index]
    return out


def dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Plain softmax attention with an explicit [n, k] boolean mask: q [n, Hq, D], keys/values [k, Hkv, D].

    The independent oracle of the tests: no chunks, no cache, no mask kinds, just a mask.
    """
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).transpose(0, 1).float()
    values = values.repeat_interleave(group, dim=1).transpose(0, 1).float()
    scores = torch.matmul(q.transpose(0, 1).float(), keys.transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).transpose(0, 1).to(q.dtype)
