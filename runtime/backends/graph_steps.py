"""The host side of a step on an exported graph (ONNX, TensorRT): inputs in, returned K/V written back.

The exported graph (builder/onnx_export.py) is stateless: it reads the page pools it is given and returns
every token's new K/V. What is the same for every graph backend lives here: the graph's inputs built from a
`StepBatch`, the capacity checks of a step, and storing the writing rows' K/V at the cache positions
`plugins.masks.written_offsets` names (bidirectional rows never write, quad rows write their draft tokens
only, prefix_block rows their causal prefix), through each row's page table, so the cache only ever holds
causally computed K/V.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...builder.config import ModelConfig
from ...builder.onnx_export import (
    CACHE_LENS,
    CU_SEQLENS,
    LOGIT_INDEX,
    LORA,
    MASK_KIND,
    MASK_PARAM,
    PAGE_TABLE,
    POSITIONS,
    TOKENS,
    k_cache_name,
    v_cache_name,
)
from ...plugins.masks import written_offsets
from ..cache.pool import KVCache
from ..errors import CapacityError
from ..model.attention import flat_positions
from .engine_cache import CacheOwner
from .limits import EngineLimits
from .step import StepBatch

DECODE, BLOCK, PREFILL = "decode", "block", "prefill"


def graph_inputs(batch: StepBatch, with_lora: bool, page_table: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """The step graph's non-cache inputs (host tensors, the graph's dtypes); `page_table` replaces the batch's
    when the caller hands the graph other pages than the pool's (e.g. only the pages the step reads)."""
    inputs = {
        TOKENS: batch.tokens.to(torch.long),
        POSITIONS: batch.positions.to(torch.long),
        CU_SEQLENS: batch.cu_seqlens.to(torch.int32),
        PAGE_TABLE: (batch.page_table if page_table is None else page_table).to(torch.int32),
        CACHE_LENS: batch.cache_lens_t.to(torch.int32),
        MASK_KIND: batch.mask_kind.to(torch.int32),
        MASK_PARAM: batch.mask_param.to(torch.int32),
        LOGIT_INDEX: batch.logit_index.to(torch.long),
    }
    if with_lora:
        inputs[LORA] = batch.lora.to(torch.bool)
    return inputs


def optimization_profiles(max_batch_size: int, max_step_tokens: int, block_lengths: tuple[int, ...]
                          ) -> list[dict[str, Any]]:
    """A shape-specialised backend's (TensorRT's) optimization profiles: (min, opt, max) of N packed tokens,
    B rows (the padding row of the bucketed static buffers included: up to max_batch + 1) and M logits.
    One step mixes kinds, so profiles are sizes, not step kinds: decode-like (one token per row), block-like
    (rows of the built block lengths), prefill-like (anything up to max_step_tokens)."""
    batch = max_batch_size
    most = max(batch, max_step_tokens)
    block = min(most, batch * max(block_lengths or (1,)))
    rows = (1, batch + 1, batch + 1)
    return [
        {"name": DECODE, "tokens": (1, batch, batch), "rows": rows, "logits": (1, batch, batch)},
        {"name": BLOCK, "tokens": (1, block, block), "rows": rows, "logits": (1, block, block)},
        {"name": PREFILL, "tokens": (1, min(most, 512), most), "rows": rows, "logits": (1, batch, most)},
    ]


def profile_input_shapes(config: ModelConfig, ranges: dict[str, Any], num_pages: int, page_size: int,
                         max_pages: int) -> dict[str, list[list[int]]]:
    """(min, opt, max) shape of every step-graph input for one profile; the page pools hold 1 .. num_pages
    pages of page_size positions (the engine's pool is sized at open, up to num_pages) and the page table has
    max_pages columns."""
    n, b, m = ranges["tokens"], ranges["rows"], ranges["logits"]
    cache = [[pages, page_size, config.num_key_value_heads, config.head_dim] for pages in (1, num_pages, num_pages)]
    out: dict[str, list[list[int]]] = {
        TOKENS: [[n[k]] for k in range(3)],
        POSITIONS: [[n[k]] for k in range(3)],
        CU_SEQLENS: [[b[k] + 1] for k in range(3)],
        LOGIT_INDEX: [[m[k]] for k in range(3)],
    }
    for name in (CACHE_LENS, MASK_KIND, MASK_PARAM):
        out[name] = [[b[k]] for k in range(3)]
    out[PAGE_TABLE] = [[b[k], max_pages] for k in range(3)]
    out[LORA] = out[TOKENS]
    for layer in range(config.num_hidden_layers):
        for name in (k_cache_name(layer), v_cache_name(layer)):
            out[name] = cache
    return out


def choose_profile(profiles: list[dict[str, Any]], tokens: int, rows: int, logits: int) -> str:
    """The first (smallest) profile whose ranges hold a static step of `tokens`, `rows` (padding row
    included) and `logits`."""
    for spec in profiles:
        if tokens <= spec["tokens"][2] and logits <= spec["logits"][2] and rows <= spec["rows"][2]:
            return spec["name"]
    raise CapacityError(f"a step of {tokens} tokens, {rows} rows and {logits} logits is beyond every "
                        "optimization profile of this engine (rebuild it with larger limits)")


def write_returned_kv(cache: KVCache, batch: StepBatch, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
    """Store the writing rows' K/V (new_k/new_v [layers, N, Hkv, D] from the graph) through their page tables."""
    flat_k = cache.k.view(cache.k.shape[0], -1, *cache.k.shape[3:])  # [layers, P * page_size, Hkv, D]
    flat_v = cache.v.view(cache.v.shape[0], -1, *cache.v.shape[3:])
    start = 0
    for row, past, table in zip(batch.rows, batch.cache_lens, batch.tables, strict=True):
        n = len(row.tokens)
        offsets = written_offsets(row.mask_kind, row.mask_param, n) if row.write else []
        if offsets:
            index = torch.as_tensor([start + o for o in offsets], dtype=torch.long, device=new_k.device)
            target = flat_positions(table, past, len(offsets), cache.page_size)
            flat_k[:, target] = new_k[:, index].to(cache.k.device, cache.k.dtype)
            flat_v[:, target] = new_v[:, index].to(cache.v.device, cache.v.dtype)
        start += n


class GraphStepEngine(CacheOwner):
    """A StepEngine over a stateless step graph; subclasses implement `_execute` (one run of the graph)."""

    backend = "graph"

    def __init__(self, config: ModelConfig, dtype: torch.dtype, limits: EngineLimits, has_lora: bool,
                 tokenizer_path: Path | None) -> None:
        self.config = config
        self.dtype = dtype
        self.limits = limits
        self.has_lora = has_lora
        self.tokenizer_path = tokenizer_path
        self.device = torch.device("cpu")

    def _make_cache(self, num_pages: int, root: int, prefix_caching: bool) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, num_pages, self.limits.page_size, c.num_key_value_heads, c.head_dim,
                       self.dtype, self.device, root, prefix_caching)

    def step(self, cache: KVCache, batch: StepBatch) -> torch.Tensor:
        """One forward: logits [M, V] fp32; the writing rows' K/V go into `cache` through their page tables."""
        if batch.any_lora and not self.has_lora:
            raise ValueError("this engine has no LoRA adapter")
        self.limits.check_step(batch, cache.num_pages)
        logits, new_k, new_v = self._execute(cache, batch)
        write_returned_kv(cache, batch, new_k, new_v)
        return logits

    def _execute(self, cache: KVCache, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the graph once: logits [M, V] fp32, new_k/new_v [layers, N, Hkv, D]."""
        raise NotImplementedError
