"""The portable backend: the reference `Transformer` stepping packed batches on CPU (or CUDA with the plugin)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..cache.pool import KVCache
from ..model.network import Transformer
from .engine_cache import CacheOwner
from .limits import EngineLimits
from .step import StepBatch


class TorchEngine(CacheOwner):
    """StepEngine over the PyTorch network (see runtime/backends/step.py)."""

    backend = "torch"

    def __init__(self, model: Transformer, limits: EngineLimits, tokenizer_path: Path | None = None) -> None:
        self.model = model
        self.config = model.config
        self.limits = replace(limits, max_seq_len=min(limits.max_seq_len, model.config.max_position_embeddings))
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

    @property
    def weight_bytes(self) -> int:
        return self.model.weight_bytes

    def _make_cache(self, num_pages: int, root: int, prefix_caching: bool) -> KVCache:
        return self.model.new_cache(num_pages, self.limits.page_size, root, prefix_caching)

    def step(self, cache: KVCache, batch: StepBatch) -> torch.Tensor:
        self.limits.check_step(batch, cache.num_pages)
        return self.model.forward_step(cache, batch)
