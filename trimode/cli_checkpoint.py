"""`trimode inspect` and `trimode random-checkpoint`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from .builder.presets import PRESETS, SIZE_FIELDS


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def checkpoint_summary(path: Path) -> dict:
    from .builder.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    c = ckpt.config
    return {
        "path": str(path),
        "model_type": "nemotron_labs_diffusion",
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rope": {"type": c.rope.rope_type, "theta": c.rope.rope_theta, "factor": c.rope.factor,
                 "original_max_position_embeddings": c.rope.original_max_position_embeddings},
        "special_tokens": {"bos": c.bos_token_id, "eos": c.eos_token_id, "mask": c.mask_token_id},
        "block_size": c.block_size,
        "parameters": ckpt.num_parameters,
        "bytes_per_dtype": ckpt.bytes_per_dtype(),
        "dtype": ckpt.default_dtype,
        "dtype_source": ckpt.dtype_source,
        "kv_bytes_per_token": c.kv_bytes_per_token(4 if ckpt.default_dtype == "fp32" else 2),
        "tokenizer": ckpt.tokenizer_path is not None,
        "lora": None if ckpt.lora is None else {"rank": ckpt.lora.rank, "alpha": ckpt.lora.alpha},
    }


def engine_summary(path: Path) -> dict:
    """An engine directory: backend, dtype, quantization, limits, files (the manifest, checked)."""
    from .builder.manifest import read_manifest
    from .builder.safetensors_io import DTYPE_NAMES, SafetensorsFile

    manifest = read_manifest(path)
    c = manifest.config(path / "manifest.json")
    weights: dict[str, int] = {}
    if "weights" in manifest.artifacts:
        for info in SafetensorsFile(path / manifest.artifacts["weights"]).tensors.values():
            name = DTYPE_NAMES[info.dtype]
            weights[name] = weights.get(name, 0) + info.end - info.start
    q = manifest.quantization
    return {
        "path": str(path), "engine": True, "backend": manifest.backend, "format_version": manifest.format_version,
        "dtype": manifest.dtype, "quantization": None if q is None else q.to_json(),
        "num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
        "max_batch_size": manifest.max_batch_size, "max_seq_len": manifest.max_seq_len,
        "block_lengths": list(manifest.block_lengths),
        "lora": None if manifest.lora is None else {"rank": manifest.lora.rank, "alpha": manifest.lora.alpha},
        "weight_bytes_per_dtype": weights, "files": len(manifest.files),
        "bytes": sum(entry.size for entry in manifest.files.values()), "tools": manifest.tools,
    }


def _print_engine(info: dict) -> None:
    from .builder.quantization import Quantization
    from .cli_build import describe_quantization

    quant = info["quantization"]
    rows = [
        ("engine", info["path"]),
        ("backend / format", f"{info['backend']} / version {info['format_version']}"),
        ("serving dtype", info["dtype"]),
        ("quantization", "none" if quant is None else describe_quantization(Quantization.from_json(quant))),
        ("layers / hidden / vocabulary", f"{info['num_hidden_layers']} / {info['hidden_size']} / "
                                         f"{info['vocab_size']}"),
        ("limits", f"batch <= {info['max_batch_size']}, length <= {info['max_seq_len']}, blocks "
                   f"{','.join(map(str, info['block_lengths']))}"),
        ("LoRA adapter", "none" if info["lora"] is None else f"rank {info['lora']['rank']}"),
        ("weight bytes per dtype", ", ".join(f"{k}: {human_bytes(v)}" for k, v in
                                             info["weight_bytes_per_dtype"].items()) or "n/a"),
        ("files", f"{info['files'] + 1} ({human_bytes(info['bytes'])} besides manifest.json)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def inspect_command(path: Path, as_json: bool) -> None:
    """Validate a checkpoint or an engine and summarize it: a checkpoint's config, parameters, bytes per dtype
    and KV bytes per token; an engine's backend, dtype, quantization, limits and files."""
    engine = (path / "manifest.json").is_file()
    info = engine_summary(path) if engine else checkpoint_summary(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if engine:
        _print_engine(info)
        return
    rows = [
        ("checkpoint", info["path"]),
        ("layers", info["num_hidden_layers"]),
        ("hidden / intermediate", f"{info['hidden_size']} / {info['intermediate_size']}"),
        ("heads / kv heads / head dim",
         f"{info['num_attention_heads']} / {info['num_key_value_heads']} / {info['head_dim']}"),
        ("vocabulary", info["vocab_size"]),
        ("rope", f"{info['rope']['type']} theta={info['rope']['theta']:g} factor={info['rope']['factor']:g} "
                 f"original={info['rope']['original_max_position_embeddings']}"),
        ("bos / eos / mask", "{bos} / {eos} / {mask}".format(**info["special_tokens"])),
        ("block size", info["block_size"]),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)"),
        ("bytes per dtype", ", ".join(f"{k}: {human_bytes(v)}" for k, v in info["bytes_per_dtype"].items())),
        ("serving dtype", f"{info['dtype']} (from {info['dtype_source']}; what build, generate and serve use "
                          "by default)"),
        ("KV cache per token", f"{human_bytes(info['kv_bytes_per_token'])} at {info['dtype']}"),
        ("tokenizer", "tokenizer.json" if info["tokenizer"] else "none"),
        ("LoRA adapter", "none" if info["lora"] is None else
         f"rank {info['lora']['rank']}, alpha {info['lora']['alpha']:g} (o_proj, draft passes only)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _size_options(func):
    for field in reversed(SIZE_FIELDS):
        func = click.option(f"--{field.replace('_', '-')}", field, type=click.IntRange(min=1), default=None,
                            help=f"Override the preset's {field}.")(func)
    return func


@click.command("random-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Model shape: tiny for tests, or a released model's real shape.")
@_size_options
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the weights.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--shard-size-mb", type=click.IntRange(min=1), default=None,
              help="Shard the weights above this size (default 5 GiB).")
@click.option("--with-lora", is_flag=True, help="Also write a random linear_spec_lora/ adapter.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=None,
              help="Adapter rank (default 128 for real presets, 8 for tiny).")
@click.option("--force", is_flag=True, help="Write into OUT even if it is not empty.")
def random_checkpoint_command(out: Path, preset: str, seed: int, dtype: str, shard_size_mb: int | None,
                              with_lora: bool, lora_rank: int | None, force: bool, **sizes) -> None:
    """Write a checkpoint in the real Hugging Face format with random weights (for tests and benchmarks)."""
    from tqdm import tqdm

    from .builder.checkpoint import expected_shapes
    from .builder.random_checkpoint import make_config, write_random_checkpoint

    if out.exists() and any(out.iterdir()) and not force:
        raise click.UsageError(f"{out} exists and is not empty (use --force to write into it)")
    config = make_config(PRESETS[preset], dtype, sizes)
    rank = (lora_rank or (8 if preset == "tiny" else 128)) if with_lora else None
    total = sum(math.prod(s) for s in expected_shapes(config).values())
    itemsize = 4 if dtype == "fp32" else 2
    with tqdm(total=total * itemsize, unit="B", unit_scale=True, desc="writing weights",
              disable=total * itemsize < 64 * 1024**2) as bar:
        write_random_checkpoint(out, config, seed=seed, dtype=dtype,
                                shard_bytes=shard_size_mb * 1024**2 if shard_size_mb else None,
                                lora_rank=rank, progress=bar.update)
    click.echo(f"wrote {preset} checkpoint to {out} ({total:,} parameters, {dtype})")


COMMANDS = [inspect_command, random_checkpoint_command]
