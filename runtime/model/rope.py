"""Rotary position embedding: YaRN inverse frequencies and the Llama-4 query position scale.

The numbers follow Hugging Face transformers' `rope_type: yarn` exactly (inverse frequencies in float32,
cos/sin computed in float32 and cast to the working dtype), since the checkpoints were trained with it.
"""

from __future__ import annotations

import math

import torch

from ...builder.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim / 2] in float32."""
    rope, dim = config.rope, config.head_dim
    pos_freqs = rope.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if rope.rope_type != "yarn":
        return 1.0 / pos_freqs
    base, factor = rope.rope_theta, rope.factor
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


class Rotary:
    """Computes cos/sin for arbitrary positions and applies RoPE plus the query position scale."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inverse_frequencies(config).to(device)
        self.attention_factor = config.attention_factor
        self.beta = config.rope.llama_4_scaling_beta
        self.original = config.rope.original_max_position_embeddings or 1

    def to(self, device: torch.device | str) -> Rotary:
        self.inv_freq = self.inv_freq.to(device)
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [*positions.shape, head_dim], in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)

    def query_scale(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Llama-4 scale 1 + beta * log(1 + floor(pos / original)), shaped [*positions.shape, 1, 1]."""
        scale = 1 + self.beta * torch.log(1 + torch.floor(positions.float() / self.original))
        return scale[..., None, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
