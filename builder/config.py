"""The model configuration: `config.json` of a Nemotron-Labs Diffusion checkpoint, parsed and validated.

Only the fields the network needs are kept, as one frozen dataclass, so every other part of the project
(runtime, builder, exporters) reads sizes from one typed place instead of a loose dict.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MODEL_TYPE = "nemotron_labs_diffusion"

REQUIRED_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rms_norm_eps",
    "rope_parameters",
)
REQUIRED_ROPE_FIELDS = ("rope_type", "rope_theta")
YARN_FIELDS = ("factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters; `rope_type` is `yarn` for the released models, `default` is accepted too."""

    rope_type: str
    rope_theta: float
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    llama_4_scaling_beta: float = 0.0
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and special tokens of one model."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int = 262144
    bos_token_id: int = 1
    eos_token_id: int = 11
    mask_token_id: int = 100
    block_size: int = 32
    dtype: str | None = None  # the declared weight dtype ("dtype", else "torch_dtype"); None: not declared
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V cache one token needs across all layers, at `itemsize` bytes per element."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    @property
    def attention_factor(self) -> float:
        """YaRN's cos/sin scale (1.0 when mscale == mscale_all_dim, as in the released models)."""
        rope = self.rope
        if rope.rope_type != "yarn":
            return 1.0

        def get_mscale(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if rope.mscale and rope.mscale_all_dim:
            return get_mscale(rope.factor, rope.mscale) / get_mscale(rope.factor, rope.mscale_all_dim)
        return get_mscale(rope.factor)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as a Hugging Face `config.json` dict (what `random-checkpoint` writes)."""
        rope = {k: v for k, v in asdict(self.rope).items() if k != "truncate"}
        out: dict[str, Any] = {
            "architectures": ["NemotronLabsDiffusionModel"],
            "model_type": MODEL_TYPE,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
            "dlm_paradigm": "bidirectional",
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
        }
        if self.dtype is not None:
            out["torch_dtype"] = self.dtype  # the key the released checkpoints carry (transformers < 4.56)
        out.update(self.extra)
        return out


def _need(data: dict[str, Any], key: str, path: Path, kind: type, where: str = "") -> Any:
    if key not in data:
        raise CheckpointError(path, f"missing config field '{where}{key}'")
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(path, f"config field '{where}{key}' must be {kind.__name__}, got {value!r}")
    return value


WEIGHT_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def declared_dtype(data: dict[str, Any], path: Path) -> str | None:
    """The weight dtype a config declares, read as transformers reads it: `dtype` (written by transformers
    4.56 and later), else the older `torch_dtype`; None when neither is set (then the stored tensors decide)."""
    for key in ("dtype", "torch_dtype"):
        value = data.get(key)
        if value is None or value == "auto":
            continue
        if not isinstance(value, str) or value.removeprefix("torch.") not in WEIGHT_DTYPE_NAMES:
            raise CheckpointError(path, f"config field '{key}' = {value!r} is not one of "
                                        f"{', '.join(WEIGHT_DTYPE_NAMES)}")
        return value.removeprefix("torch.")
    return None


def parse_config(data: dict[str, Any], path: Path) -> ModelConfig:
    """Validate a `config.json` dict; every problem is a `CheckpointError` naming the field."""
    for key in REQUIRED_FIELDS:
        if key not in data:
            raise CheckpointError(path, f"missing config field '{key}'")
    if data["model_type"] != MODEL_TYPE:
        raise CheckpointError(path, f"unknown model_type '{data['model_type']}' (expected '{MODEL_TYPE}')")
    if data.get("hidden_act", "silu") != "silu":
        raise CheckpointError(path, f"unsupported hidden_act '{data['hidden_act']}' (only silu)")
    if data.get("tie_word_embeddings", False):
        raise CheckpointError(path, "tie_word_embeddings is true; this family has an untied diffusion_head")
    ints = {k: _need(data, k, path, int) for k in REQUIRED_FIELDS if k not in ("model_type", "rms_norm_eps",
                                                                            "rope_parameters")}
    for key, value in ints.items():
        if value <= 0:
            raise CheckpointError(path, f"config field '{key}' must be positive, got {value}")
    heads, kv_heads = ints["num_attention_heads"], ints["num_key_value_heads"]
    if heads % kv_heads:
        raise CheckpointError(path, f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                                    f"{kv_heads}")
    head_dim = data.get("head_dim") or ints["hidden_size"] // heads
    if head_dim % 2:
        raise CheckpointError(path, f"head_dim {head_dim} must be even for RoPE")

    rope_data = _need(data, "rope_parameters", path, dict)
    for key in REQUIRED_ROPE_FIELDS:
        _need(rope_data, key, path, str if key == "rope_type" else float, "rope_parameters.")
    rope_type = rope_data["rope_type"]
    if rope_type not in ("yarn", "default"):
        raise CheckpointError(path, f"unsupported rope_parameters.rope_type '{rope_type}' (yarn or default)")
    if rope_type == "yarn":
        for key in YARN_FIELDS:
            _need(rope_data, key, path, float if key == "factor" else int, "rope_parameters.")
    known = {f for f in RopeConfig.__dataclass_fields__}
    rope = RopeConfig(**{k: v for k, v in rope_data.items() if k in known and v is not None})

    eos = data.get("eos_token_id", 11)
    if isinstance(eos, list):
        eos = eos[0]
    vocab = ints["vocab_size"]
    for key, value in (("eos_token_id", eos), ("mask_token_id", data.get("mask_token_id", 100))):
        if not 0 <= value < vocab:
            raise CheckpointError(path, f"config field '{key}' = {value} is outside the vocabulary ({vocab})")

    core = set(REQUIRED_FIELDS) | {"head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id",
                                   "mask_token_id", "block_size", "dtype", "torch_dtype", "tie_word_embeddings"}
    return ModelConfig(
        hidden_size=ints["hidden_size"],
        num_hidden_layers=ints["num_hidden_layers"],
        intermediate_size=ints["intermediate_size"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim),
        vocab_size=vocab,
        rms_norm_eps=float(_need(data, "rms_norm_eps", path, float)),
        rope=rope,
        max_position_embeddings=int(data.get("max_position_embeddings", 262144)),
        bos_token_id=int(data.get("bos_token_id", 1)),
        eos_token_id=int(eos),
        mask_token_id=int(data.get("mask_token_id", 100)),
        block_size=int(data.get("block_size", 32)),
        dtype=declared_dtype(data, path),
        extra={k: v for k, v in data.items() if k not in core and k not in (
            "architectures", "model_type", "hidden_act", "attention_bias", "mlp_bias", "dlm_paradigm")},
    )


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read and validate `checkpoint_dir/config.json`."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(path, "config.json not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "config.json must hold a JSON object")
    return parse_config(data, path)
