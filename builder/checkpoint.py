"""Loading a Nemotron-Labs Diffusion checkpoint in the Hugging Face layout, validated up front.

A checkpoint directory holds `config.json`, either `model.safetensors` or shards listed by
`model.safetensors.index.json`, optionally `tokenizer.json` and a `linear_spec_lora/` PEFT adapter. Every
problem (missing field, unknown model type, missing/extra tensor, wrong shape or dtype, absent shard,
truncated file) is a one-line `CheckpointError` naming the file, raised before any weight is used.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, load_config
from .errors import CheckpointError
from .safetensors_io import SafetensorsFile

WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHORT_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
LORA_KEY = re.compile(r"layers\.(\d+)\.self_attn\.o_proj\.lora_([AB])\.weight$")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the checkpoint format with its shape."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.embed_tokens.weight": (config.vocab_size, hidden),
        "encoder.norm.weight": (hidden,),
        "diffusion_head.weight": (config.vocab_size, hidden),
    }
    for i in range(config.num_hidden_layers):
        prefix = f"encoder.layers.{i}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (q_dim, hidden),
            prefix + "self_attn.k_proj.weight": (kv_dim, hidden),
            prefix + "self_attn.v_proj.weight": (kv_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, q_dim),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        })
    return shapes


@dataclass
class LoraAdapter:
    """The self-speculation draft adapter: per layer, o_proj += scale * B @ A (PEFT LoRA)."""

    rank: int
    alpha: float
    scale: float
    a: list[torch.Tensor]  # [rank, q_dim] per layer
    b: list[torch.Tensor]  # [hidden, rank] per layer
    path: Path


@dataclass
class Checkpoint:
    """A validated checkpoint: config, memory-mapped weights by name, optional tokenizer and adapter."""

    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer_path: Path | None
    lora: LoraAdapter | None

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.weights.values())

    @property
    def default_dtype(self) -> str:
        """The serving dtype when none is asked for ("fp32", "bf16" or "fp16"), read as transformers reads it:
        config.json's `dtype`, else its `torch_dtype`, else the dtype the weights are stored in."""
        name = self.config.dtype or str(self.weights["encoder.embed_tokens.weight"].dtype).removeprefix("torch.")
        return SHORT_DTYPE_NAMES[name]

    @property
    def dtype_source(self) -> str:
        """Where `default_dtype` comes from (shown by `trimode inspect`)."""
        return "config.json" if self.config.dtype else "stored tensors"

    def bytes_per_dtype(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for tensor in self.weights.values():
            key = str(tensor.dtype).removeprefix("torch.")
            totals[key] = totals.get(key, 0) + tensor.numel() * tensor.element_size()
        return totals


def _weight_files(root: Path) -> dict[str, SafetensorsFile]:
    """Map every tensor name to the opened file that holds it, following the shard index if present."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(index_path, "not a valid shard index (needs a 'weight_map' object)") from None
        files: dict[str, SafetensorsFile] = {}
        owner: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if shard not in files:
                shard_path = root / shard
                if not shard_path.is_file():
                    raise CheckpointError(shard_path, f"shard named by {INDEX_FILE} is missing")
                files[shard] = SafetensorsFile(shard_path)
            if name not in files[shard].tensors:
                raise CheckpointError(files[shard].path, f"tensor '{name}' listed in {INDEX_FILE} is not in "
                                                         "this shard")
            owner[name] = files[shard]
        for shard_file in files.values():
            for name in shard_file.tensors:
                if name not in owner:
                    raise CheckpointError(shard_file.path, f"unexpected tensor '{name}' (not in {INDEX_FILE})")
        return owner
    single = root / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(root, f"no {SINGLE_FILE} or {INDEX_FILE} found")
    opened = SafetensorsFile(single)
    return {name: opened for name in opened.tensors}


def _check_tensor(path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                  want: tuple[int, ...]) -> None:
    if shape != want:
        raise CheckpointError(path, f"tensor '{name}' has shape {list(shape)}, expected {list(want)}")
    if dtype not in WEIGHT_DTYPES:
        raise CheckpointError(path, f"tensor '{name}' has dtype {dtype}, expected bf16, fp16 or fp32")


def load_lora(adapter_dir: str | Path, config: ModelConfig) -> LoraAdapter:
    """Load and validate a PEFT LoRA adapter that targets `o_proj` of every layer."""
    root = Path(adapter_dir)
    cfg_path = root / "adapter_config.json"
    if not cfg_path.is_file():
        raise CheckpointError(cfg_path, "adapter_config.json not found")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(cfg_path, "not valid JSON") from None
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise CheckpointError(cfg_path, f"missing adapter field '{key}'")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    if targets != ["o_proj"] and not all(t.endswith("o_proj") for t in targets):
        raise CheckpointError(cfg_path, f"target_modules must be ['o_proj'], got {targets}")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(cfg_path, f"adapter bias '{cfg['bias']}' is not supported (only 'none')")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if rank <= 0:
        raise CheckpointError(cfg_path, f"adapter rank r must be positive, got {rank}")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

    weights_path = root / "adapter_model.safetensors"
    tensors = SafetensorsFile(weights_path)
    layers = config.num_hidden_layers
    q_dim = config.num_attention_heads * config.head_dim
    a: list[torch.Tensor | None] = [None] * layers
    b: list[torch.Tensor | None] = [None] * layers
    for name, info in tensors.tensors.items():
        match = LORA_KEY.search(name)
        if not match:
            raise CheckpointError(weights_path, f"unexpected adapter tensor '{name}'")
        layer, which = int(match.group(1)), match.group(2)
        if layer >= layers:
            raise CheckpointError(weights_path, f"adapter tensor '{name}' names layer {layer} of {layers}")
        want = (rank, q_dim) if which == "A" else (config.hidden_size, rank)
        _check_tensor(weights_path, name, info.dtype, info.shape, want)
        (a if which == "A" else b)[layer] = tensors.get(name)
    for layer in range(layers):
        for which, found in (("A", a), ("B", b)):
            if found[layer] is None:
                raise CheckpointError(weights_path, f"missing adapter tensor for layer {layer} "
                                                    f"o_proj.lora_{which}")
    return LoraAdapter(rank, alpha, scale, a, b, root)  # type: ignore[arg-type]


def load_checkpoint(path: str | Path, with_lora: bool = True) -> Checkpoint:
    """Validate and memory-map a checkpoint directory; nothing is copied into memory here."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(root, "checkpoint directory not found")
    config = load_config(root)
    owners = _weight_files(root)
    shapes = expected_shapes(config)
    for name in owners:
        if name not in shapes:
            raise CheckpointError(owners[name].path, f"unexpected tensor '{name}'")
    weights: dict[str, torch.Tensor] = {}
    for name, want in shapes.items():
        if name not in owners:
            where = root / (INDEX_FILE if (root / INDEX_FILE).is_file() else SINGLE_FILE)
            raise CheckpointError(where, f"missing tensor '{name}'")
        info = owners[name].tensors[name]
        _check_tensor(owners[name].path, name, info.dtype, info.shape, want)
        weights[name] = owners[name].get(name)
    tokenizer = root / "tokenizer.json"
    lora = load_lora(root / LORA_DIR, config) if with_lora and (root / LORA_DIR).is_dir() else None
    return Checkpoint(root, config, weights, tokenizer if tokenizer.is_file() else None, lora)
