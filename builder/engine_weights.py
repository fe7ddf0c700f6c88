"""Streaming the converted weights to disk, one tensor in memory at a time.

`safetensors_io.write_safetensors` needs every tensor at once, which for an 8B model is the whole model in
memory twice (checkpoint pages plus converted copies). The header of a safetensors file only needs names,
dtypes and shapes, which the config determines, so the header is written first and each tensor is
converted, written and dropped in turn. The bytes are identical to `write_safetensors` (same header JSON,
sorted names, same padding), which keeps builds reproducible and lets the ordinary reader open the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import Checkpoint, LoraAdapter
from .config import ModelConfig
from .convert import converted_names, iter_converted
from .errors import CheckpointError
from .manifest import FileEntry, HashingWriter
from .quantization import Quantization
from .safetensors_io import safetensors_header

Progress = Callable[[int], None]


def converted_shapes(config: ModelConfig, lora_rank: int | None) -> dict[str, tuple[int, ...]]:
    """Shape of every converted tensor (builder/convert.py's layout), known without converting anything."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    per_layer = {"attn_norm": (hidden,), "qkv": (q_dim + 2 * kv_dim, hidden), "o": (hidden, q_dim),
                 "mlp_norm": (hidden,), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    if lora_rank:
        per_layer.update({"lora_a": (lora_rank, q_dim), "lora_b": (hidden, lora_rank)})
    shapes: dict[str, tuple[int, ...]] = {}
    for name in converted_names(config, lora_rank is not None):
        if name in ("embed", "head"):
            shapes[name] = (config.vocab_size, hidden)
        elif name == "norm":
            shapes[name] = (hidden,)
        else:
            shapes[name] = per_layer[name.rsplit(".", 1)[1]]
    return shapes


def converted_makers(checkpoint: Checkpoint, dtype: torch.dtype, lora: LoraAdapter | None
                     ) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> function building that converted tensor (nothing is converted until it is called)."""
    return dict(iter_converted(checkpoint, dtype, lora))


TensorSpecs = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def stored_weights(checkpoint: Checkpoint, dtype: torch.dtype, lora: LoraAdapter | None,
                   quant: Quantization | None) -> tuple[TensorSpecs, dict[str, Callable[[], torch.Tensor]]]:
    """What the torch backend stores: every converted tensor at `dtype`, except that with `quant` each matrix
    it quantizes becomes its stored parts (runtime/model/quant.py), quantized from the fp32 conversion."""
    shapes = converted_shapes(checkpoint.config, lora.rank if lora else None)
    makers = converted_makers(checkpoint, dtype, lora)
    if quant is None:
        return {name: (dtype, shape) for name, shape in shapes.items()}, makers
    full = converted_makers(checkpoint, torch.float32, lora)
    specs: TensorSpecs = {}
    stored: dict[str, Callable[[], torch.Tensor]] = {}
    for name, shape in shapes.items():
        if not quant.quantizes(name):
            specs[name], stored[name] = (dtype, shape), makers[name]
            continue
        parts = quant.stored_specs(name, shape, dtype)
        specs.update(parts)
        cached: dict[str, dict[str, torch.Tensor]] = {}

        def part(key: str, name: str = name, cached: dict = cached) -> torch.Tensor:
            # the parts of one matrix are written one after another (sorted names): quantize once, then drop
            if name not in cached:
                cached.clear()
                cached[name] = quant.quantize(name, full[name](), dtype)
            return cached[name].pop(key)

        stored.update({key: (lambda key=key, part=part: part(key)) for key in parts})
    return specs, stored


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (bf16 included, which numpy cannot hold directly)."""
    data = tensor.detach().contiguous().cpu()
    return memoryview(data.reshape(-1).view(torch.uint8).numpy())


def stream_safetensors(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       makers: dict[str, Callable[[], torch.Tensor]], metadata: dict[str, str] | None = None,
                       progress: Progress | None = None) -> FileEntry:
    """Write a safetensors file tensor by tensor; returns its size and SHA-256 (hashed while writing)."""
    with HashingWriter(path) as out:
        out.write(safetensors_header(specs, metadata))
        for name, (dtype, shape) in sorted(specs.items()):
            tensor = makers[name]()
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise CheckpointError(path, f"converted tensor '{name}' is {tensor.dtype} {list(tensor.shape)}, "
                                            f"expected {dtype} {list(shape)}")
            if tensor.numel():
                out.write(tensor_bytes(tensor))
            if progress is not None:
                progress(tensor.numel() * tensor.element_size())
            del tensor
        return out.close()


def converted_nbytes(specs: TensorSpecs) -> int:
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())
