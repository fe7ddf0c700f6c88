"""The step kinds over an exported step graph (ONNX, TensorRT): one forward per step, cache owned outside.

The exported graph (builder/onnx_export.py) is stateless: it reads the cache it is given and returns the
chunk's new K/V. Everything else a step needs is the same for every graph backend and lives here: the
positions and logit rows a step kind asks for, the capacity checks, and writing causal K/V into the cache
(bidirectional draft passes never write, so the cache only ever holds causally computed K/V).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...builder.config import ModelConfig
from ...plugins.reference import BIDIRECTIONAL, CAUSAL
from ..model.kv_cache import KVCache
from .torch_engine import CapacityError, pad_batch


@dataclass
class StepInputs:
    """One forward's inputs, batch-major, on the CPU; row b belongs to cache slot slots[b]."""

    slots: list[int]
    tokens: torch.Tensor       # [B, T] int64
    positions: torch.Tensor    # [B, T] int64
    cache_lens: torch.Tensor   # [B] int32
    chunk_lens: torch.Tensor   # [B] int32
    logit_index: torch.Tensor  # [B, N] int64
    mask_kind: int
    lora: bool


def check_room(cache: KVCache, slots: list[int], chunk_lens: list[int], limit: int) -> None:
    """A chunk may not run past the engine's maximum sequence length (nor the cache, which may be longer)."""
    limit = min(limit, cache.max_len)
    for slot, extra in zip(slots, chunk_lens, strict=True):
        if cache.length(slot) + extra > limit:
            raise CapacityError(f"sequence would reach {cache.length(slot) + extra} tokens, beyond the "
                                f"engine's maximum sequence length {limit}")


def write_chunk_kv(cache: KVCache, slots: list[int], cache_lens: torch.Tensor, chunk_lens: torch.Tensor,
                   new_k: torch.Tensor, new_v: torch.Tensor) -> None:
    """Store row b's first chunk_lens[b] keys/values at its slot's positions and advance the slot's length."""
    for row, slot in enumerate(slots):
        start, n = int(cache_lens[row]), int(chunk_lens[row])
        cache.k[:, slot, start : start + n] = new_k[:, row, :n].to(cache.k.device, cache.k.dtype)
        cache.v[:, slot, start : start + n] = new_v[:, row, :n].to(cache.v.device, cache.v.dtype)
        cache.lens[slot] = start + n


class GraphStepEngine:
    """StepEngine over a graph backend; subclasses implement `_execute` (one forward of the graph)."""

    backend = "graph"

    def __init__(self, config: ModelConfig, dtype: torch.dtype, max_batch_size: int, max_seq_len: int,
                 has_lora: bool, tokenizer_path: Path | None, block_lengths: tuple[int, ...]) -> None:
        self.config = config
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.has_lora = has_lora
        self.tokenizer_path = tokenizer_path
        self.block_lengths = block_lengths
        self.device = torch.device("cpu")

    def check_batch(self, num_slots: int) -> None:
        if num_slots > self.max_batch_size:
            raise CapacityError(f"batch of {num_slots} sequences exceeds the engine's maximum batch size "
                                f"{self.max_batch_size}")

    def new_cache(self, num_slots: int) -> KVCache:
        self.check_batch(num_slots)
        c = self.config
        return KVCache(c.num_hidden_layers, num_slots, self.max_seq_len, c.num_key_value_heads, c.head_dim,
                       self.dtype, self.device)

    # -- the step kinds (same signatures and results as TorchEngine) ------------------------------------
    def prefill(self, cache: KVCache, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Causal pass over whole prompts (different lengths); writes the cache; last-token logits [B, V]."""
        tokens, lens = pad_batch(prompts)
        return self._step(cache, slots, tokens, lens, CAUSAL, False, last_only=True)

    def decode(self, cache: KVCache, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One token per sequence, causal, writes the cache; logits [B, V]."""
        chunk = torch.as_tensor(tokens, dtype=torch.long)[:, None]
        return self._step(cache, slots, chunk, torch.ones(len(tokens), dtype=torch.int32), CAUSAL, False,
                          last_only=True)

    def draft(self, cache: KVCache, slots: list[int], blocks: torch.Tensor, lora: bool = False) -> torch.Tensor:
        """Bidirectional pass over a block per sequence; reads the cache, never writes it; [B, T, V]."""
        lens = torch.full((blocks.shape[0],), blocks.shape[1], dtype=torch.int32)
        return self._step(cache, slots, blocks, lens, BIDIRECTIONAL, lora, last_only=False)

    def verify(self, cache: KVCache, slots: list[int], blocks: torch.Tensor) -> torch.Tensor:
        """Causal pass over a block per sequence; writes the cache; [B, T, V]."""
        lens = torch.full((blocks.shape[0],), blocks.shape[1], dtype=torch.int32)
        return self._step(cache, slots, blocks, lens, CAUSAL, False, last_only=False)

    # -- shared machinery ----------------------------------------------------------------------------------
    def _step(self, cache: KVCache, slots: list[int], tokens: torch.Tensor, chunk_lens: torch.Tensor,
              mask_kind: int, lora: bool, last_only: bool) -> torch.Tensor:
        if lora and not self.has_lora:
            raise ValueError("this engine has no LoRA adapter")
        self.check_batch(len(slots))
        chunk_lens = chunk_lens.to(torch.int32)
        check_room(cache, slots, [int(n) for n in chunk_lens], self.max_seq_len)
        tokens = tokens.to(torch.long).cpu()
        cache_lens = cache.lens[torch.as_tensor(slots, dtype=torch.long, device=cache.lens.device)].cpu()
        length = tokens.shape[1]
        positions = cache_lens[:, None].long() + torch.arange(length)
        if last_only:
            logit_index = (chunk_lens.long() - 1).clamp(min=0)[:, None]
        else:
            logit_index = torch.arange(length).expand(len(slots), length).contiguous()
        inputs = StepInputs(slots, tokens, positions, cache_lens, chunk_lens, logit_index, mask_kind, lora)
        logits, new_k, new_v = self._execute(cache, inputs)
        if mask_kind == CAUSAL:
            write_chunk_kv(cache, slots, cache_lens, chunk_lens, new_k, new_v)
        return logits[:, 0] if last_only else logits

    def _execute(self, cache: KVCache, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the graph once: logits [B, N, V] fp32, new_k/new_v [layers, B, T, Hkv, D]."""
        raise NotImplementedError
