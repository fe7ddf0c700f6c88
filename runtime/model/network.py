"""The network of docs/model.md in plain PyTorch: the reference every fast path is checked against.

Ministral-3 decoder blocks (RMSNorm in fp32, GQA attention with YaRN RoPE and the Llama-4 query scale,
SwiGLU MLP), a final RMSNorm and the untied `diffusion_head`. Weights come in the converted layout of
`builder/convert.py` (fused qkv and gate_up). Two entry points:

* `forward_step` - the engine's step: a packed batch of chunk rows against the KV cache, each row with its
  own mask kind (causal, bidirectional, quad, prefix_block), writing its causal K/V or not.
* `forward_masked` - a whole sequence with an arbitrary boolean attention mask and no cache, differentiable;
  used by training and as an independent check of the cached path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ...builder.config import ModelConfig
from ..cache.pool import KVCache
from .attention import AttentionRows, attend
from .quant import QuantizedLinear, linear
from .rope import Rotary, apply_rotary

if TYPE_CHECKING:
    from ..backends.step import StepBatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, cast back before the weight multiplies (as the checkpoints expect)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class Transformer:
    """Holds converted weights on one device and runs forwards; stateless apart from the weights."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor | QuantizedLinear],
                 lora_scale: float = 0.0) -> None:
        self.config = config
        self.w = weights
        self.dtype = weights["embed"].dtype  # the compute dtype (the embedding is never quantized)
        self.device = weights["embed"].device
        self.has_lora = "layers.0.lora_a" in weights
        self.lora_scale = lora_scale
        self.rotary = Rotary(config, self.device)
        self.q_dim = config.num_attention_heads * config.head_dim
        self.kv_dim = config.num_key_value_heads * config.head_dim
        self.scale = config.head_dim ** -0.5

    def to(self, device: torch.device | str) -> Transformer:
        self.w = {k: v.to(device) for k, v in self.w.items()}  # QuantizedLinear.to moves its own tensors
        self.device = torch.device(device)
        self.rotary.to(device)
        return self

    def new_cache(self, num_pages: int, page_size: int, root: int = 0, prefix_caching: bool = True) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, num_pages, page_size, c.num_key_value_heads, c.head_dim,
                       self.dtype, self.device, root, prefix_caching)

    # -- pieces shared by both entry points -------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight as held (quantized matrices at their stored size)."""
        return sum(w.nbytes if isinstance(w, QuantizedLinear) else w.numel() * w.element_size()
                   for w in self.w.values())

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin and the Llama-4 query scale at these positions (the same for every layer: made once)."""
        cos, sin = self.rotary.cos_sin(positions, dtype)
        return cos, sin, self.rotary.query_scale(positions, dtype)

    def _qkv(self, i: int, h: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, ...] | None = None):
        c = self.config
        x = rms_norm(h, self.w[f"layers.{i}.attn_norm"], c.rms_norm_eps)
        q, k, v = linear(x, self.w[f"layers.{i}.qkv"]).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        batch, length = h.shape[:2]
        q = q.view(batch, length, c.num_attention_heads, c.head_dim)
        k = k.view(batch, length, c.num_key_value_heads, c.head_dim)
        v = v.view(batch, length, c.num_key_value_heads, c.head_dim)
        cos, sin, scale = rope if rope is not None else self.rope_tables(positions, h.dtype)
        q = apply_rotary(q, cos, sin) * scale
        k = apply_rotary(k, cos, sin)
        return q, k, v

    def _attn_out(self, i: int, h: torch.Tensor, attn: torch.Tensor, lora: bool | torch.Tensor) -> torch.Tensor:
        """o_proj, plus the LoRA delta where `lora` is True (a bool, or a [B, N] mask of positions)."""
        flat = attn.reshape(*attn.shape[:2], self.q_dim)
        out = linear(flat, self.w[f"layers.{i}.o"])
        if isinstance(lora, torch.Tensor) or lora:
            delta = F.linear(F.linear(flat, self.w[f"layers.{i}.lora_a"]), self.w[f"layers.{i}.lora_b"])
            delta = delta * self.lora_scale
            out = out + (delta * lora[..., None].to(delta.dtype) if isinstance(lora, torch.Tensor) else delta)
        return h + out

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.w[f"layers.{i}.mlp_norm"], self.config.rms_norm_eps)
        gate, up = linear(x, self.w[f"layers.{i}.gate_up"]).chunk(2, dim=-1)
        return h + linear(F.silu(gate) * up, self.w[f"layers.{i}.down"])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.w["norm"], self.config.rms_norm_eps)
        return linear(x, self.w["head"]).float()

    # -- the engine step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_step(self, cache: KVCache, batch: StepBatch) -> torch.Tensor:
        """Logits [M, V] fp32 at batch.logit_index for one packed step of rows (any mix of mask kinds).

        Row b's tokens sit at batch.positions and attend to its cached prefix (through its page table) plus its
        own chunk under its mask kind; writing rows store their causal K/V (plugins/reference.py). The caller
        (the scheduler) moves the sequences' lengths.
        """
        if batch.any_lora and not self.has_lora:
            raise ValueError("this model has no LoRA adapter")
        rows = AttentionRows.from_batch(batch, self.device, cache.page_size)
        positions = batch.positions.to(self.device)[None]
        lora: bool | torch.Tensor = False
        if batch.any_lora:
            lora = True if all(r.lora for r in batch.rows) else batch.lora.to(self.device)[None]
        h = F.embedding(batch.tokens.to(self.device), self.w["embed"])[None]  # [1, N, H]
        rope = self.rope_tables(positions, h.dtype)
        for i in range(self.config.num_hidden_layers):
            q, k, v = self._qkv(i, h, positions, rope)
            attn = attend(q[0], k[0], v[0], cache.k[i], cache.v[i], rows, self.scale)
            h = self._attn_out(i, h, attn[None], lora)
            h = self._mlp(i, h)
        return self._logits(h[0, batch.logit_index.to(self.device)])

    # -- whole sequences, any mask ----------------------------------------------------------------------
    def forward_masked(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                       lora: bool | torch.Tensor = False) -> torch.Tensor:
        """Logits [B, N, V] where query i may attend to key j iff allowed[b, i, j]; no cache, differentiable.

        `lora` may be a [B, N] bool mask: the adapter then applies at those positions only (a draft block
        over a prefix whose K/V were computed without it).
        """
        c = self.config
        group = c.num_attention_heads // c.num_key_value_heads
        h = F.embedding(tokens, self.w["embed"])
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=h.device)
        bias = bias.masked_fill(~allowed, float("-inf"))[:, None]
        for i in range(c.num_hidden_layers):
            q, k, v = self._qkv(i, h, positions)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale + bias
            attn = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).transpose(1, 2)
            h = self._attn_out(i, h, attn, lora)
            h = self._mlp(i, h)
        return self._logits(h)
