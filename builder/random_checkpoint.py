"""Writing checkpoints with random weights in the real Hugging Face format.

Tests and benchmarks at real shapes need checkpoints but may not download any, so they build their own.
Tensors are generated one at a time and written shard by shard, so an 8B checkpoint needs about one shard
of memory, not the whole model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import INDEX_FILE, LORA_DIR, SINGLE_FILE, expected_shapes
from .config import ModelConfig, parse_config
from .convert import resolve_dtype
from .safetensors_io import write_safetensors

DEFAULT_SHARD_BYTES = 5 * 1024**3


def make_config(preset: dict[str, Any], dtype: str, overrides: dict[str, Any]) -> ModelConfig:
    data = {**preset, **{k: v for k, v in overrides.items() if v is not None}}
    data["model_type"] = "nemotron_labs_diffusion"
    data["torch_dtype"] = str(resolve_dtype(dtype)).removeprefix("torch.")
    return parse_config(data, Path("<preset>"))


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Scaled so activations stay O(1) through the layers and logits are far from ties."""
    if name.endswith("norm.weight"):
        values = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif name == "encoder.embed_tokens.weight":
        values = torch.randn(shape, generator=gen)
    else:
        values = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    return values.to(dtype)


def write_tokenizer(path: Path, config: ModelConfig) -> None:
    """A byte-level BPE tokenizer with no merges whose special tokens sit at the config's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = {0: "<unk>", config.bos_token_id: "<s>", config.eos_token_id: "</s>",
                config.mask_token_id: "<mask>"}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: (not ch.isascii(), ch))
    vocab: dict[str, int] = {}
    chars = iter(alphabet)
    for token_id in range(config.vocab_size):
        if token_id in specials:
            vocab[specials[token_id]] = token_id
        else:
            vocab[next(chars, f"<extra_{token_id}>")] = token_id
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials.values()))
    tokenizer.save(str(path))


def write_random_checkpoint(out: str | Path, config: ModelConfig, seed: int = 0, dtype: str = "bf16",
                            shard_bytes: int | None = None, lora_rank: int | None = None,
                            with_tokenizer: bool = True,
                            progress: Callable[[int], None] | None = None) -> Path:
    """Write config.json, weights (sharded above `shard_bytes`), tokenizer and optional LoRA adapter."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    torch_dtype = resolve_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(config)
    limit = shard_bytes or DEFAULT_SHARD_BYTES
    total = sum(math.prod(s) for s in shapes.values()) * torch_dtype.itemsize

    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * torch_dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    sharded = len(groups) > 1
    weight_map: dict[str, str] = {}
    for number, names in enumerate(groups, start=1):
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors" if sharded else SINGLE_FILE
        tensors = {}
        for name in names:
            tensors[name] = _random_tensor(name, shapes[name], gen, torch_dtype)
            weight_map[name] = filename
            if progress:
                progress(tensors[name].numel() * torch_dtype.itemsize)
        write_safetensors(root / filename, tensors, {"format": "pt"})
        del tensors
    if sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    if with_tokenizer:
        write_tokenizer(root / "tokenizer.json", config)
    if lora_rank:
        write_random_lora(root / LORA_DIR, config, lora_rank, seed + 1, torch_dtype)
    return root


def write_random_lora(out: Path, config: ModelConfig, rank: int, seed: int, dtype: torch.dtype) -> None:
    """A PEFT adapter on o_proj; B is random (not PEFT's zero init) so it really changes the drafts."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    q_dim = config.num_attention_heads * config.head_dim
    alpha = 4 * rank
    tensors = {}
    for i in range(config.num_hidden_layers):
        key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, q_dim, generator=gen) / math.sqrt(q_dim)).to(dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(config.hidden_size, rank, generator=gen)
                                           * (0.5 / alpha)).to(dtype)
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["o_proj"],
                      "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "task_type": "CAUSAL_LM",
                      "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
