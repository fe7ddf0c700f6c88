"""The portable backend: the reference `Transformer` stepping packed batches on CPU (or CUDA with the plugin)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.kv_cache import KVCache
from ..model.network import Transformer
from .limits import EngineLimits
from .step import StepBatch


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
        self.limits.check_step(batch, cache)
        logits = self.model.forward_step(cache, batch)
        batch.commit_lengths(cache)
        return logits
