"""The step kinds every backend offers (DESIGN.md section 4), and the torch backend that implements them.

The generation modes are written once against `StepEngine`: `prefill`, `decode`, `draft` (bidirectional,
reads the cache, never writes it, optional LoRA) and `verify` (causal, writes the cache). Each takes a batch
of sequences, identified by their KV-cache slots, at whatever lengths those sequences have reached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ...builder.config import ModelConfig
from ...plugins.reference import BIDIRECTIONAL, CAUSAL
from ..model.kv_cache import KVCache
from ..model.network import Transformer


class CapacityError(ValueError):
    """A request does not fit the shapes the engine serves (sequence length or batch size)."""


class StepEngine(Protocol):
    """What the generation modes need from a backend."""

    config: ModelConfig
    max_batch_size: int
    max_seq_len: int
    has_lora: bool
    tokenizer_path: Path | None

    def new_cache(self, num_slots: int) -> KVCache: ...
    def prefill(self, cache: KVCache, slots: list[int], prompts: list[list[int]]) -> torch.Tensor: ...
    def decode(self, cache: KVCache, slots: list[int], tokens: list[int]) -> torch.Tensor: ...
    def draft(self, cache: KVCache, slots: list[int], blocks: torch.Tensor, lora: bool = False
              ) -> torch.Tensor: ...
    def verify(self, cache: KVCache, slots: list[int], blocks: torch.Tensor) -> torch.Tensor: ...


def pad_batch(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into [B, T] plus their lengths."""
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    return tokens, torch.as_tensor([len(p) for p in prompts], dtype=torch.int32)


class TorchEngine:
    """The portable backend: the reference `Transformer` on CPU (or CUDA, with the plugin's kernel)."""

    backend = "torch"

    def __init__(self, model: Transformer, max_batch_size: int = 64, max_seq_len: int = 4096,
                 tokenizer_path: Path | None = None) -> None:
        self.model = model
        self.config = model.config
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.tokenizer_path = tokenizer_path

    @property
    def has_lora(self) -> bool:
        return self.model.has_lora

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_cache(self, num_slots: int) -> KVCache:
        if num_slots > self.max_batch_size:
            raise CapacityError(f"batch of {num_slots} sequences exceeds the engine's maximum batch size "
                                f"{self.max_batch_size}")
        return self.model.new_cache(num_slots, self.max_seq_len)

    def _check_room(self, cache: KVCache, slots: list[int], lengths: list[int] | int) -> None:
        lengths = [lengths] * len(slots) if isinstance(lengths, int) else lengths
        for slot, extra in zip(slots, lengths, strict=True):
            if cache.length(slot) + extra > cache.max_len:
                raise CapacityError(f"sequence would reach {cache.length(slot) + extra} tokens, beyond the "
                                    f"engine's maximum sequence length {cache.max_len}")

    def _run(self, cache: KVCache, slots: list[int], tokens: torch.Tensor, chunk_lens: torch.Tensor,
             mask_kind: int, write_kv: bool, lora: bool, last_only: bool) -> torch.Tensor:
        self._check_room(cache, slots, [int(n) for n in chunk_lens])
        return self.model.forward_chunk(tokens, chunk_lens, torch.as_tensor(slots), cache, mask_kind,
                                        write_kv, lora=lora, last_only=last_only)

    def prefill(self, cache: KVCache, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Causal pass over whole prompts (different lengths); writes the cache; last-token logits [B, V]."""
        tokens, lens = pad_batch(prompts)
        return self._run(cache, slots, tokens, lens, CAUSAL, True, False, True)

    def decode(self, cache: KVCache, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One token per sequence, causal, writes the cache; logits [B, V]."""
        chunk = torch.as_tensor(tokens, dtype=torch.long)[:, None]
        return self._run(cache, slots, chunk, torch.ones(len(tokens), dtype=torch.int32), CAUSAL, True,
                         False, True)

    def draft(self, cache: KVCache, slots: list[int], blocks: torch.Tensor, lora: bool = False
              ) -> torch.Tensor:
        """Bidirectional pass over a block per sequence; reads the cache, never writes it; [B, T, V]."""
        lens = torch.full((blocks.shape[0],), blocks.shape[1], dtype=torch.int32)
        return self._run(cache, slots, blocks, lens, BIDIRECTIONAL, False, lora, False)

    def verify(self, cache: KVCache, slots: list[int], blocks: torch.Tensor) -> torch.Tensor:
        """Causal pass over a block per sequence; writes the cache; [B, T, V]."""
        lens = torch.full((blocks.shape[0],), blocks.shape[1], dtype=torch.int32)
        return self._run(cache, slots, blocks, lens, CAUSAL, True, False, False)
