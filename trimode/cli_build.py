"""`trimode build`: compile a checkpoint into an engine ahead of time."""

from __future__ import annotations

from pathlib import Path

import click

from .builder.manifest import BACKENDS, ENGINE_DTYPES


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


@click.command("build")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True,
              help="Engine directory to create (written atomically; must be empty or absent unless --force).")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True,
              help="torch: converted weights for the reference/CUDA engine; onnx: one ONNX step graph run by "
                   "onnxruntime on CPU (fp32); tensorrt: a TensorRT plan (needs TensorRT and a GPU).")
@click.option("--dtype", type=click.Choice(ENGINE_DTYPES), default=None,
              help="Serving dtype (default: the checkpoint's own - config.json's dtype, else torch_dtype, else "
                   "the stored weights'; fp32 for onnx, its only choice).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most sequences one step may carry.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Most positions (prompt + generated + one draft block) a sequence may reach "
                   "(default: min(4096, the model's max_position_embeddings)).")
@click.option("--block-length", "block_lengths", type=click.IntRange(min=1), multiple=True,
              help="A block length the engine must serve (repeatable; default: the model's block_size).")
@click.option("--lora", "lora_dir", type=click.Path(path_type=Path), default=None,
              help="PEFT adapter directory for self-speculation drafts (default: the checkpoint's "
                   "linear_spec_lora/ if present).")
@click.option("--no-lora", is_flag=True, help="Build without any draft adapter.")
@click.option("--page-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="tensorrt: the KV page size the plan is built for (torch and onnx engines choose theirs when "
                   "they are opened: --page-size of generate / serve).")
@click.option("--plugin-library", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="tensorrt: the BlockAttention plugin library (default: plugins/build/libtrimode_trt_plugin.so).")
@click.option("--quantize", type=click.Choice(["int8", "int4", "fp8"]), default=None,
              help="Store the projection weights (and the LM head, see --quantize-head) quantized: int8 per output "
                   "channel, int4 in groups along the input (--group-size), fp8 E4M3 per output channel; "
                   "weight-only on the CPU (torch backend: all three; tensorrt: fp8). Default: not quantized.")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "256"]), default=None,
              help="int4: input features per scale and zero point (default 128).")
@click.option("--quantize-head/--no-quantize-head", default=True, show_default=True,
              help="With --quantize: quantize the LM head too (a third of a small model's decode bytes); the "
                   "embedding and the LoRA draft adapter always stay in the serving dtype.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--progress/--no-progress", default=None,
              help="Show progress bars (default: only when stderr is a terminal).")
def build_command(checkpoint: Path, output: Path, backend: str, dtype: str | None, max_batch_size: int,
                  max_seq_len: int | None, block_lengths: tuple[int, ...], lora_dir: Path | None, no_lora: bool,
                  page_size: int, plugin_library: Path | None, quantize: str | None, group_size: str | None,
                  quantize_head: bool, force: bool, progress: bool | None) -> None:
    """Validate CHECKPOINT, convert its weights and compile an engine directory with a versioned manifest."""
    from .builder.engine_build import LORA_AUTO, BuildError, BuildOptions, build_engine

    if lora_dir is not None and no_lora:
        raise click.UsageError("--lora and --no-lora exclude each other")
    lora: str | Path | None = None if no_lora else (lora_dir or LORA_AUTO)
    options = BuildOptions(backend=backend, dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                           block_lengths=block_lengths, lora=lora, plugin_library=plugin_library,
                           page_size=page_size, quantize=quantize,
                           group_size=None if group_size is None else int(group_size), quantize_head=quantize_head)
    try:
        manifest = build_engine(checkpoint, output, options, force=force, show_progress=progress)
    except BuildError as exc:
        raise click.UsageError(str(exc)) from None
    total = sum(entry.size for entry in manifest.files.values())
    adapter = f"LoRA rank {manifest.lora.rank}" if manifest.lora else "no LoRA"
    quant = "" if manifest.quantization is None else f"{describe_quantization(manifest.quantization)}, "
    click.echo(f"built {manifest.backend} engine {output} ({manifest.dtype}, {quant}{adapter}, batch <= "
               f"{manifest.max_batch_size}, length <= {manifest.max_seq_len}, blocks "
               f"{','.join(map(str, manifest.block_lengths))}; {len(manifest.files) + 1} files, {_human(total)})")


def describe_quantization(quant) -> str:
    """'int4 weights (group 128, head quantized)': one wording for build's summary and inspect."""
    group = f"group {quant.group_size}, " if quant.group_size else ""
    return f"{quant.scheme} weights ({group}head {'quantized' if quant.head else 'kept'})"


COMMANDS = [build_command]
