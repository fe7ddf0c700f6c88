"""Turning a checkpoint directory into a ready `TorchEngine` (the in-memory build)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...builder.checkpoint import load_checkpoint
from ...builder.convert import convert_checkpoint, resolve_dtype
from ..model.network import Transformer
from .limits import EngineLimits
from .torch_engine import TorchEngine


def engine_from_checkpoint(path: str | Path, dtype: str = "auto", use_lora: bool = True,
                           max_batch_size: int = 64, max_seq_len: int = 4096,
                           device: str | torch.device = "cpu") -> TorchEngine:
    """Validate, convert and place a checkpoint's weights; returns the torch engine."""
    checkpoint = load_checkpoint(path, with_lora=use_lora)
    if dtype == "auto":
        dtype = checkpoint.default_dtype
    weights = convert_checkpoint(checkpoint, resolve_dtype(dtype), use_lora=use_lora)
    lora_scale = checkpoint.lora.scale if (use_lora and checkpoint.lora) else 0.0
    model = Transformer(checkpoint.config, weights, lora_scale).to(device)
    limits = EngineLimits(max_batch_size, max_seq_len)
    if model.device.type == "cuda":  # the GPU path: one cache, static buffers, CUDA graphs
        from .cuda_graphs import GraphEngine

        return GraphEngine(model, limits, checkpoint.tokenizer_path)
    return TorchEngine(model, limits, checkpoint.tokenizer_path)
