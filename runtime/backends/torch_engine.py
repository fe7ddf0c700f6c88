"""The portable backend: the reference `Transformer` stepping packed batches on CPU (or CUDA with the plugin)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.kv_cache import KVCache
from ..model.network import Transformer
from .limits import CapacityError, EngineLimits
from .step import StepBatch


def check_step_fits(batch: StepBatch, cache: KVCache, limits: EngineLimits) -> None:
    """A step may not place a token beyond the engine's positions nor write beyond the cache."""
    limits.check_batch(len(batch.rows))
    limits.check_positions(batch.max_position + 1, "a step")
    for row, past in zip(batch.rows, batch.cache_lens, strict=True):
        if past + row.written > cache.max_len:
            raise CapacityError(f"slot {row.slot} would hold {past + row.written} tokens, beyond the cache's "
                                f"{cache.max_len}")


class TorchEngine:
    """StepEngine over the PyTorch network (see runtime/backends/step.py)."""

    backend = "torch"

    def __init__(self, model: Transformer, limits: EngineLimits, tokenizer_path: Path | None = None) -> None:
        self.model = model
        self.config = model.config
        self.limits = EngineLimits(limits.max_batch_size, min(limits.max_seq_len, model.config.max_position_embeddings),
                                   limits.max_step_tokens, limits.block_lengths)
        self.tokenizer_path = tokenizer_path

    @property
    def has_lora(self) -> bool:
        return self.model.has_lora

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def new_cache(self, num_slots: int) -> KVCache:
        self.limits.check_batch(num_slots)
        return self.model.new_cache(num_slots, self.limits.max_seq_len)

    def step(self, cache: KVCache, batch: StepBatch) -> torch.Tensor:
        check_step_fits(batch, cache, self.limits)
        logits = self.model.forward_step(cache, batch)
        batch.commit_lengths(cache)
        return logits
