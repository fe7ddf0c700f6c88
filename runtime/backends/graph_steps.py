"""The host side of a step on an exported graph (ONNX, TensorRT): inputs in, returned K/V written back.

The exported graph (builder/onnx_export.py) is stateless: it reads the caches it is given and returns every
token's new K/V. What is the same for every graph backend lives here: the graph's inputs built from a
`StepBatch`, the capacity checks of a step, and storing the writing rows' K/V at the cache positions
`plugins.reference.written_offsets` names (bidirectional rows never write, quad rows write their draft
tokens only, prefix_block rows their causal prefix), so the cache only ever holds causally computed K/V.
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
    POSITIONS,
    SLOTS,
    TOKENS,
    k_cache_name,
    v_cache_name,
)
from ...plugins.reference import written_offsets
from ..model.kv_cache import KVCache
from .limits import CapacityError, EngineLimits
from .step import StepBatch

DECODE, BLOCK, PREFILL = "decode", "block", "prefill"


def graph_inputs(batch: StepBatch, with_lora: bool, slots: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The step graph's non-cache inputs (host tensors, the graph's dtypes); `slots` replaces batch.slots
    when the caller hands the graph other cache rows than the batch's slots (e.g. only the rows it uses)."""
    inputs = {
        TOKENS: batch.tokens.to(torch.long),
        POSITIONS: batch.positions.to(torch.long),
        CU_SEQLENS: batch.cu_seqlens.to(torch.int32),
        SLOTS: (batch.slots if slots is None else slots).to(torch.int32),
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


def profile_input_shapes(config: ModelConfig, ranges: dict[str, Any], max_batch_size: int, max_seq_len: int
                         ) -> dict[str, list[list[int]]]:
    """(min, opt, max) shape of every step-graph input for one profile; the caches are fixed at their full
    size (max_batch + 1 slots, the last the scratch slot of padding rows; max_seq_len positions)."""
    n, b, m = ranges["tokens"], ranges["rows"], ranges["logits"]
    cache = [max_batch_size + 1, max_seq_len, config.num_key_value_heads, config.head_dim]
    out: dict[str, list[list[int]]] = {
        TOKENS: [[n[k]] for k in range(3)],
        POSITIONS: [[n[k]] for k in range(3)],
        CU_SEQLENS: [[b[k] + 1] for k in range(3)],
        LOGIT_INDEX: [[m[k]] for k in range(3)],
    }
    for name in (SLOTS, CACHE_LENS, MASK_KIND, MASK_PARAM):
        out[name] = [[b[k]] for k in range(3)]
    out[LORA] = out[TOKENS]
    for layer in range(config.num_hidden_layers):
        for name in (k_cache_name(layer), v_cache_name(layer)):
            out[name] = [cache] * 3
    return out


def choose_profile(profiles: list[dict[str, Any]], tokens: int, rows: int, logits: int) -> str:
    """The first (smallest) profile whose ranges hold a static step of `tokens`, `rows` (padding row
    included) and `logits`."""
    for spec in profiles:
        if tokens <= spec["tokens"][2] and logits <= spec["logits"][2] and rows <= spec["rows"][2]:
            return spec["name"]
    raise CapacityError(f"a step of {tokens} tokens, {rows} rows and {logits} logits is beyond every "
                        "optimization profile of this engine (rebuild it with larger limits)")


def written_tokens(batch: StepBatch) -> list[tuple[int, int, list[int]]]:
    """(slot, first cache position, packed token indices) of every writing row, from host data only."""
    out, start = [], 0
    for row, past in zip(batch.rows, batch.cache_lens, strict=True):
        n = len(row.tokens)
        if row.write:
            offsets = written_offsets(row.mask_kind, row.mask_param, n)
            if offsets:
                out.append((row.slot, past, [start + o for o in offsets]))
        start += n
    return out


def write_returned_kv(cache: KVCache, batch: StepBatch, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
    """Store the writing rows' K/V (new_k/new_v [layers, N, Hkv, D] from the graph) and advance the lengths."""
    for slot, past, index in written_tokens(batch):
        count = len(index)
        if index == list(range(index[0], index[0] + count)):
            keys, values = new_k[:, index[0]: index[0] + count], new_v[:, index[0]: index[0] + count]
        else:
            picked = torch.as_tensor(index, dtype=torch.long, device=new_k.device)
            keys, values = new_k[:, picked], new_v[:, picked]
        cache.k[:, slot, past: past + count] = keys.to(cache.k.device, cache.k.dtype)
        cache.v[:, slot, past: past + count] = values.to(cache.v.device, cache.v.dtype)
    batch.commit_lengths(cache)


class GraphStepEngine:
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

    def new_cache(self, num_slots: int) -> KVCache:
        self.limits.check_batch(num_slots)
        c = self.config
        return KVCache(c.num_hidden_layers, num_slots, self.limits.max_seq_len, c.num_key_value_heads, c.head_dim,
                       self.dtype, self.device)

    def step(self, cache: KVCache, batch: StepBatch) -> torch.Tensor:
        """One forward: logits [M, V] fp32; the writing rows' K/V go into `cache`, their lengths advance."""
        if batch.any_lora and not self.has_lora:
            raise ValueError("this engine has no LoRA adapter")
        self.limits.check_step(batch, cache, limit_tokens=True)
        logits, new_k, new_v = self._execute(cache, batch)
        write_returned_kv(cache, batch, new_k, new_v)
        return logits

    def _execute(self, cache: KVCache, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the graph once: logits [M, V] fp32, new_k/new_v [layers, N, Hkv, D]."""
        raise NotImplementedError
