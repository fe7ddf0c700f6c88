"""Weight conversion: checkpoint tensors -> the runtime's layout, cast once to the serving dtype.

The runtime wants one matmul where the checkpoint has several: q/k/v projections are fused into `qkv` and
gate/up into `gate_up`. The LoRA adapter, if used, is kept as two small matrices per layer plus its scale
(applied only in draft passes, so it cannot be merged into `o`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .checkpoint import Checkpoint, LoraAdapter
from .config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}' (choose fp32, bf16 or fp16)")
    return DTYPES[name]


def converted_names(config: ModelConfig, with_lora: bool) -> list[str]:
    """Names of the converted tensors, in a fixed order (the engine files list them in this order)."""
    names = ["embed", "norm", "head"]
    for i in range(config.num_hidden_layers):
        names += [f"layers.{i}.{part}" for part in ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")]
        if with_lora:
            names += [f"layers.{i}.lora_a", f"layers.{i}.lora_b"]
    return names


def iter_converted(checkpoint: Checkpoint, dtype: torch.dtype, lora: LoraAdapter | None = None
                   ) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Yield (name, make) pairs; `make()` builds one converted tensor, so callers can stream to disk."""
    w = checkpoint.weights
    config = checkpoint.config

    def cast(*names: str) -> Callable[[], torch.Tensor]:
        return lambda: torch.cat([w[n].to(dtype) for n in names]) if len(names) > 1 else w[names[0]].to(dtype)

    yield "embed", cast("encoder.embed_tokens.weight")
    yield "norm", cast("encoder.norm.weight")
    yield "head", cast("diffusion_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"encoder.layers.{i}."
        yield f"layers.{i}.attn_norm", cast(p + "input_layernorm.weight")
        yield f"layers.{i}.qkv", cast(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                      p + "self_attn.v_proj.weight")
        yield f"layers.{i}.o", cast(p + "self_attn.o_proj.weight")
        yield f"layers.{i}.mlp_norm", cast(p + "post_attention_layernorm.weight")
        yield f"layers.{i}.gate_up", cast(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        yield f"layers.{i}.down", cast(p + "mlp.down_proj.weight")
        if lora is not None:
            yield f"layers.{i}.lora_a", (lambda t=lora.a[i]: t.to(dtype))
            yield f"layers.{i}.lora_b", (lambda t=lora.b[i]: t.to(dtype))


def convert_checkpoint(checkpoint: Checkpoint, dtype: str | torch.dtype, use_lora: bool = True
                       ) -> dict[str, torch.Tensor]:
    """All converted tensors in memory (the in-memory build used when a checkpoint is served directly)."""
    lora = checkpoint.lora if use_lora else None
    return {name: make().contiguous() for name, make in iter_converted(checkpoint, resolve_dtype(dtype), lora)}
