"""The host side of a step on an exported graph (ONNX, TensorRT): inputs in, returned K/V written back.

The exported graph (builder/onnx_export.py) is stateless: it reads the caches it is given and returns every
token's new K/V. What is the same for every graph backend lives here: the graph's inputs built from a
`StepBatch`, the capacity checks of a step, and storing the writing rows' K/V at the cache positions
`plugins.reference.written_offsets` names (bidirectional rows never write, quad rows write their draft
tokens only, prefix_block rows their causal prefix), so the cache only ever holds causally computed K/V.
"""

from __future__ import annotations

from pathlib import Path

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
)
from ...plugins.reference import written_offsets
from ..model.kv_cache import KVCache
from .limits import CapacityError, EngineLimits
from .step import StepBatch


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


def check_step(limits: EngineLimits, cache: KVCache, batch: StepBatch) -> None:
    """CapacityError unless the step fits: its tokens, its rows, and every writing row's end in the cache."""
    if batch.num_tokens > limits.max_step_tokens:
        raise CapacityError(f"a step of {batch.num_tokens} tokens exceeds the engine's maximum of "
                            f"{limits.max_step_tokens} tokens per step")
    limits.check_batch(len(batch.rows))
    for row, past in zip(batch.rows, batch.cache_lens, strict=True):
        if not 0 <= row.slot < cache.num_slots:
            raise ValueError(f"slot {row.slot} is not one of the cache's {cache.num_slots} slots")
        end = past + row.written
        limits.check_positions(end)
        if end > cache.max_len:
            raise CapacityError(f"sequence needs {end} positions, beyond the cache's {cache.max_len}")


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
        check_step(self.limits, cache, batch)
        logits, new_k, new_v = self._execute(cache, batch)
        write_returned_kv(cache, batch, new_k, new_v)
        return logits

    def _execute(self, cache: KVCache, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the graph once: logits [M, V] fp32, new_k/new_v [layers, N, Hkv, D]."""
        raise NotImplementedError
