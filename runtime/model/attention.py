"""Attention dispatch: the plugin's CUDA kernel on GPU tensors, a fast PyTorch path on the CPU.

This is the single place where the runtime chooses an attention implementation. Every implementation
computes the packed per-row contract of `plugins/reference.py` over the paged KV pool; the reference itself (a
slow, obvious loop) is the oracle the tests compare the fast path with.

The CPU fast path turns each row's page table into flat pool indices once per step (`AttentionRows`), shared
by every layer. A row whose pages are consecutive reads its cache as a strided view (no copy); other rows
gather their pages. It scores the queries against the cached keys and the chunk's own keys separately,
applies the chunk mask to the second part only, and takes one softmax over both. GQA is handled by folding
each KV head's query group into the matmul's rows (no repeat_interleave). Prompt rows with nothing cached go
to `scaled_dot_product_attention`; one-token rows (decodes) are batched into one gathered softmax while their
gathered caches stay small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from ...plugins.masks import (
    BIDIRECTIONAL,
    CAUSAL,
    PREFIX_BLOCK,
    chunk_mask,
    written_offsets,
)
from ..errors import DeviceError


class CudaPluginMissing(DeviceError):
    """CUDA tensors but no loadable CUDA attention library: a clear error, never a silent slow fallback."""


Positions = slice | torch.Tensor  # flat pool positions: a range (consecutive pages) or an index tensor


def flat_positions(table: list[int], start: int, count: int, page_size: int) -> Positions:
    """Flat pool indices (page * page_size + offset) of positions start .. start+count-1 through a page table."""
    if count == 0:
        return slice(0, 0)
    first, last = start // page_size, (start + count - 1) // page_size
    pages = table[first : last + 1]
    if len(pages) != last - first + 1:
        raise ValueError(f"positions up to {start + count - 1} need {last + 1} pages, the table has {len(table)}")
    if all(b == a + 1 for a, b in zip(pages, pages[1:], strict=False)):
        begin = pages[0] * page_size + start % page_size
        return slice(begin, begin + count)
    positions = torch.arange(start, start + count)
    return torch.tensor(table, dtype=torch.long)[positions // page_size] * page_size + positions % page_size


@dataclass
class AttentionRows:
    """One step's row layout: host lists for the CPU loop, device int32 tensors for the kernel."""

    cu: list[int]
    tables: list[list[int]]
    cache_lens: list[int]
    kinds: list[int]
    params: list[int]
    writes: list[bool]
    page_size: int
    device_arrays: tuple[torch.Tensor, ...] | None  # cu_seqlens, page_table, cache_lens, mask_kind, mask_param, write
    max_chunk: int
    max_cache_len: int
    _reads: dict[int, Positions] = field(default_factory=dict, repr=False)
    _writes: dict[int, Positions] = field(default_factory=dict, repr=False)

    @classmethod
    def from_batch(cls, batch, device: torch.device, page_size: int) -> AttentionRows:
        cu = batch.cu
        arrays = None
        if device.type == "cuda":
            arrays = tuple(t.to(device, non_blocking=True) for t in (
                batch.cu_seqlens, batch.page_table, batch.cache_lens_t, batch.mask_kind, batch.mask_param,
                batch.write))
        return cls(cu, batch.tables, list(batch.cache_lens), [r.mask_kind for r in batch.rows],
                   [r.mask_param for r in batch.rows], [r.write for r in batch.rows], page_size, arrays,
                   max(b - a for a, b in zip(cu, cu[1:], strict=False)), max(batch.cache_lens))

    def read_positions(self, b: int) -> Positions:
        """Flat pool positions of row b's cached prefix (made once per step, used by every layer)."""
        if b not in self._reads:
            self._reads[b] = flat_positions(self.tables[b], 0, self.cache_lens[b], self.page_size)
        return self._reads[b]

    def write_positions(self, b: int, count: int) -> Positions:
        """Flat pool positions where row b's `count` written tokens go."""
        if b not in self._writes:
            self._writes[b] = flat_positions(self.tables[b], self.cache_lens[b], count, self.page_size)
        return self._writes[b]


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
    """Block attention per the contract in `plugins/reference.py`; q [N, Hq, D] -> [N, Hq, D]; k_cache and
    v_cache are one layer's pages [P, page_size, Hkv, D]."""
    if q.is_cuda:
        cu, table, lens, kinds, params, writes = rows.device_arrays
        return _cuda_op().block_attention(q, k_new, v_new, k_cache, v_cache, cu, table, lens, kinds, params,
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


def _single_token_rows(rows: AttentionRows, flat_k: torch.Tensor) -> list[int]:
    """Rows of one token with a cached prefix (decode-like), if batching them is cheaper than a loop."""
    picked = [b for b in range(len(rows.tables)) if rows.cu[b + 1] - rows.cu[b] == 1 and rows.cache_lens[b] > 0]
    if len(picked) < 2:
        return []
    longest = max(rows.cache_lens[b] for b in picked)
    per_row = longest * flat_k.shape[1] * flat_k.shape[2] * flat_k.element_size() * 2
    return picked if per_row * len(picked) <= GATHER_LIMIT_BYTES else []


def _gather_index(rows: AttentionRows, picked: list[int], longest: int) -> torch.Tensor:
    """[R, longest] flat pool positions of the picked rows' caches; padding repeats a row's first position."""
    index = torch.zeros(len(picked), longest, dtype=torch.long)
    for i, b in enumerate(picked):
        read = rows.read_positions(b)
        past = rows.cache_lens[b]
        index[i, :past] = torch.arange(read.start, read.stop) if isinstance(read, slice) else read
        index[i, past:] = index[i, 0]
    return index


def _attend_single_tokens(q, k_new, v_new, flat_k, flat_v, rows: AttentionRows, picked: list[int], scale: float,
                          out: torch.Tensor) -> None:
    """All one-token rows at once: gather their cached prefixes (padded to the longest), one batched softmax.

    A one-token chunk sees its whole cache and itself under every mask kind, so only the cache padding is
    masked. Writing rows store their token's K/V at position p_b.
    """
    n_kv, head_dim = k_new.shape[1], k_new.shape[2]
    group = q.shape[1] // n_kv
    index = torch.tensor([rows.cu[b] for b in picked])
    pasts = torch.tensor([rows.cache_lens[b] for b in picked])
    longest = int(max(rows.cache_lens[b] for b in picked))
    gather = _gather_index(rows, picked, longest)
    qb = q[index].view(len(picked), n_kv, group, head_dim)  # [R, Hkv, g, D]
    kc = flat_k[gather].permute(0, 2, 3, 1)  # [R, Hkv, D, P]
    vc = flat_v[gather].transpose(1, 2)  # [R, Hkv, P, D]
    kn, vn = k_new[index], v_new[index]  # [R, Hkv, D]
    cached = torch.matmul(qb, kc).float() * scale  # [R, Hkv, g, P]
    padding = torch.arange(longest)[None, :] >= pasts[:, None]  # [R, P]
    cached.masked_fill_(padding[:, None, None, :], float("-inf"))
    own = (qb * kn[:, :, None, :]).sum(-1, keepdim=True).float() * scale  # [R, Hkv, g, 1]
    probs = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1).to(q.dtype)
    mixed = torch.matmul(probs[..., :longest], vc) + probs[..., longest:] * vn[:, :, None, :]
    out[index] = mixed.reshape(len(picked), n_kv * group, head_dim)
    for i, b in enumerate(picked):
        if rows.writes[b]:
            target = rows.write_positions(b, 1)
            flat_k[target] = kn[i : i + 1]
            flat_v[target] = vn[i : i + 1]


def attend_cpu(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, rows: AttentionRows, scale: float) -> torch.Tensor:
    """The CPU fast path (see the module docstring); equal to the reference within fp32 rounding."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv = k_new.shape[1]
    group = n_heads // n_kv
    flat_k = k_cache.view(-1, n_kv, head_dim)  # [P * page_size, Hkv, D]
    flat_v = v_cache.view(-1, n_kv, head_dim)
    out = torch.empty_like(q)
    batched = _single_token_rows(rows, flat_k)
    if batched:
        _attend_single_tokens(q, k_new, v_new, flat_k, flat_v, rows, batched, scale, out)
    skip = set(batched)
    for b in range(len(rows.tables)):
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
                read = rows.read_positions(b)
                kc, vc = flat_k[read], flat_v[read]  # [p, Hkv, D]: a view for consecutive pages
                cached = torch.matmul(qb, kc.permute(1, 2, 0)).float() * scale  # [Hkv, n*g, p]
                probs = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1).to(q.dtype)
                mixed = torch.matmul(probs[..., :past], vc.transpose(0, 1))
                mixed += torch.matmul(probs[..., past:], vn.transpose(0, 1))
            else:
                mixed = torch.matmul(torch.softmax(own, dim=-1).to(q.dtype), vn.transpose(0, 1))
            out[start:end] = mixed.view(n_kv, n, group, head_dim).transpose(0, 1).reshape(n, n_heads, head_dim)
        if rows.writes[b]:
            count = len(written_offsets(kind, param, n)) if kind != CAUSAL else n
            if count:
                target = rows.write_positions(b, count)
                index = slice(0, n) if kind == CAUSAL else _offsets(kind, param, n)
                flat_k[target] = kn[index]
                flat_v[target] = vn[index]
    return out
