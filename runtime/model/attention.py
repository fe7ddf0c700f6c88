"""Attention dispatch: the plugin's CUDA kernel on GPU tensors, a fast PyTorch path on the CPU.

This is the single place where the runtime chooses an attention implementation. Every implementation
computes the packed per-row contract of `plugins/reference.py`; the reference itself (a slow, obvious loop
that concatenates each row's cache) is the oracle the tests compare the fast path with.

The CPU fast path never copies a row's cached K/V: it scores the queries against a strided view of the
cache and against the chunk's own keys separately, applies the chunk mask to the second part only, and
takes one softmax over both. GQA is handled by folding each KV head's query group into the matmul's rows
(no repeat_interleave). Prompt rows with nothing cached go to `scaled_dot_product_attention`; one-token rows
(decodes) are batched into one gathered softmax while their gathered caches stay small.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ...plugins.reference import (
    BIDIRECTIONAL,
    CAUSAL,
    PREFIX_BLOCK,
    chunk_mask,
    written_offsets,
)
from ..backends.devices import DeviceError


class CudaPluginMissing(DeviceError):
    """CUDA tensors but no loadable CUDA attention library: a clear error, never a silent slow fallback."""


@dataclass
class AttentionRows:
    """One step's row layout: host lists for the CPU loop, device int32 tensors for the kernel."""

    cu: list[int]
    slots: list[int]
    cache_lens: list[int]
    kinds: list[int]
    params: list[int]
    writes: list[bool]
    device_arrays: tuple[torch.Tensor, ...] | None  # cu_seqlens, slots, cache_lens, mask_kind, mask_param, write
    max_chunk: int
    max_cache_len: int

    @classmethod
    def from_batch(cls, batch, device: torch.device) -> AttentionRows:
        cu = batch.cu
        arrays = None
        if device.type == "cuda":
            arrays = tuple(t.to(device, non_blocking=True) for t in (
                batch.cu_seqlens, batch.slots, batch.cache_lens_t, batch.mask_kind, batch.mask_param, batch.write))
        return cls(cu, [r.slot for r in batch.rows], list(batch.cache_lens), [r.mask_kind for r in batch.rows],
                   [r.mask_param for r in batch.rows], [r.write for r in batch.rows], arrays,
                   max(b - a for a, b in zip(cu, cu[1:], strict=False)), max(batch.cache_lens))


def _cuda_op():
    try:
        from ...plugins import torch_op
    except (ImportError, OSError) as exc:
        raise CudaPluginMissing(f"the CUDA attention plugin cannot be imported ({exc}); run `make plugins`") from None
    if not torch_op.cuda_available():
        raise CudaPluginMissing("CUDA tensors but the CUDA attention library (plugins/build/libtrimode_attention.so) "
                                "is not built or cannot be loaded; run `make plugins` on this machine")
    return torch_op


def attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, rows: AttentionRows, scale: float) -> torch.Tensor:
    """Block attention per the contract in `plugins/reference.py`; q [N, Hq, D] -> [N, Hq, D]."""
    if q.is_cuda:
        cu, slots, lens, kinds, params, writes = rows.device_arrays
        return _cuda_op().block_attention(q, k_new, v_new, k_cache, v_cache, cu, slots, lens, kinds, params,
                                          writes, scale, rows.max_chunk, rows.max_cache_len)
    return attend_cpu(q, k_new, v_new, k_cache, v_cache, rows, scale)


@lru_cache(maxsize=256)
def _hidden(kind: int, param: int, n: int, group: int) -> torch.Tensor | None:
    """[n * group, n] bool of the chunk keys a (token, group member) query row may NOT see; None if none."""
    if kind == BIDIRECTIONAL or n == 1 or (kind == PREFIX_BLOCK and param == n):
        return None  # every chunk key is visible (decided from the kind, so no host read of a tensor)
    return (~chunk_mask(kind, param, n)).repeat_interleave(group, dim=0)


@lru_cache(maxsize=256)
def _offsets(kind: int, param: int, n: int) -> torch.Tensor:
    return torch.tensor(written_offsets(kind, param, n), dtype=torch.long)


GATHER_LIMIT_BYTES = 8 << 20  # single-token rows are batched when their gathered cache stays below this


def _single_token_rows(rows: AttentionRows, k_cache: torch.Tensor) -> list[int]:
    """Rows of one token with a cached prefix (decode-like), if batching them is cheaper than a loop."""
    picked = [b for b in range(len(rows.slots)) if rows.cu[b + 1] - rows.cu[b] == 1 and rows.cache_lens[b] > 0]
    if len(picked) < 2:
        return []
    longest = max(rows.cache_lens[b] for b in picked)
    per_row = longest * k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size() * 2
    return picked if per_row * len(picked) <= GATHER_LIMIT_BYTES else []


def _attend_single_tokens(q, k_new, v_new, k_cache, v_cache, rows: AttentionRows, picked: list[int], scale: float,
                          out: torch.Tensor) -> None:
    """All one-token rows at once: gather their cached prefixes (padded to the longest), one batched softmax.

    A one-token chunk sees its whole cache and itself under every mask kind, so only the cache padding is
    masked. Writing rows store their token's K/V at position p_b.
    """
    n_kv, head_dim = k_new.shape[1], k_new.shape[2]
    group = q.shape[1] // n_kv
    index = torch.tensor([rows.cu[b] for b in picked])
    slots = torch.tensor([rows.slots[b] for b in picked])
    pasts = torch.tensor([rows.cache_lens[b] for b in picked])
    longest = int(max(rows.cache_lens[b] for b in picked))
    qb = q[index].view(len(picked), n_kv, group, head_dim)  # [R, Hkv, g, D]
    kc = k_cache[slots, :longest].permute(0, 2, 3, 1)  # [R, Hkv, D, P]
    vc = v_cache[slots, :longest].transpose(1, 2)  # [R, Hkv, P, D]
    kn, vn = k_new[index], v_new[index]  # [R, Hkv, D]
    cached = torch.matmul(qb, kc).float() * scale  # [R, Hkv, g, P]
    padding = torch.arange(longest)[None, :] >= pasts[:, None]  # [R, P]
    cached.masked_fill_(padding[:, None, None, :], float("-inf"))
    own = (qb * kn[:, :, None, :]).sum(-1, keepdim=True).float() * scale  # [R, Hkv, g, 1]
    probs = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1).to(q.dtype)
    mixed = torch.matmul(probs[..., :longest], vc) + probs[..., longest:] * vn[:, :, None, :]
    out[index] = mixed.reshape(len(picked), n_kv * group, head_dim)
    writers = [i for i, b in enumerate(picked) if rows.writes[b]]
    if writers:
        w = torch.tensor(writers)
        k_cache[slots[w], pasts[w]] = kn[w]
        v_cache[slots[w], pasts[w]] = vn[w]


def attend_cpu(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, rows: AttentionRows, scale: float) -> torch.Tensor:
    """The CPU fast path (see the module docstring); equal to the reference within fp32 rounding."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv = k_new.shape[1]
    group = n_heads // n_kv
    out = torch.empty_like(q)
    batched = _single_token_rows(rows, k_cache)
    if batched:
        _attend_single_tokens(q, k_new, v_new, k_cache, v_cache, rows, batched, scale, out)
    skip = set(batched)
    for b, slot in enumerate(rows.slots):
        start, end = rows.cu[b], rows.cu[b + 1]
        n, past, kind, param = end - start, rows.cache_lens[b], rows.kinds[b], rows.params[b]
        if n == 0 or b in skip:
            continue
        kn, vn = k_new[start:end], v_new[start:end]
        if past == 0 and kind in (CAUSAL, BIDIRECTIONAL):
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), kn.transpose(0, 1), vn.transpose(0, 1),
                is_causal=kind == CAUSAL and n > 1, scale=scale, enable_gqa=group > 1).transpose(0, 1)
        else:
            # [Hkv, n * group, D]: query row t * group + i is head h * group + i of token t
            qb = q[start:end].view(n, n_kv, group, head_dim).transpose(0, 1).reshape(n_kv, n * group, head_dim)
            own = torch.matmul(qb, kn.permute(1, 2, 0)).float() * scale  # [Hkv, n*g, n]
            hidden = _hidden(kind, param, n, group)
            if hidden is not None:
                own.masked_fill_(hidden, float("-inf"))
            if past:
                cached = torch.matmul(qb, k_cache[slot, :past].permute(1, 2, 0)).float() * scale  # [Hkv, n*g, p]
                probs = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1).to(q.dtype)
                mixed = torch.matmul(probs[..., :past], v_cache[slot, :past].transpose(0, 1))
                mixed += torch.matmul(probs[..., past:], vn.transpose(0, 1))
            else:
                mixed = torch.matmul(torch.softmax(own, dim=-1).to(q.dtype), vn.transpose(0, 1))
            out[start:end] = mixed.view(n_kv, n, group, head_dim).transpose(0, 1).reshape(n, n_heads, head_dim)
        if rows.writes[b]:
            if kind == CAUSAL:
                k_cache[slot, past : past + n] = kn
                v_cache[slot, past : past + n] = vn
            else:
                index = _offsets(kind, param, n)
                k_cache[slot, past : past + len(index)] = kn[index]
                v_cache[slot, past : past + len(index)] = vn[index]
    return out
