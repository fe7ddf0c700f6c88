"""`trimode build`: compile a checkpoint into an engine directory, atomically and reproducibly.

Atomic: everything is written into a hidden staging folder next to the output (`.NAME.building-*`), the
manifest last, and the folder is renamed into place only when complete. Any failure, Ctrl-C included,
removes the staging folder, so an interrupted build leaves nothing that looks like an engine, and an
existing engine is only replaced (with --force) by a complete one.

Reproducible: file contents depend only on the checkpoint, the options and the tool versions - weights are
written in sorted/fixed order by deterministic writers, JSON has sorted keys, and nothing records a time,
a host or an absolute path - so building twice gives byte-identical files (a test checks this).
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import __version__
from .checkpoint import Checkpoint, LoraAdapter, load_checkpoint, load_lora
from .convert import resolve_dtype
from .engine_weights import converted_nbytes, converted_shapes, stored_weights, stream_safetensors
from .manifest import BACKENDS, ENGINE_DTYPES, FileEntry, HashingWriter, LoraInfo, Manifest
from .quantization import SCHEMES, Quantization

WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_EXTRAS = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json")
LORA_AUTO = "auto"
DEFAULT_MAX_SEQ_LEN = 4096  # capped by the model's max_position_embeddings


class BuildError(ValueError):
    """The build options or the output location are not usable (shown as one line, exit status 2)."""


@dataclass(frozen=True)
class BuildOptions:
    """What to build. `dtype` None = the checkpoint's (fp32 for onnx); `max_seq_len` None =
    min(4096, the model's max_position_embeddings); `block_lengths` empty = block_size; `lora` "auto" = the
    checkpoint's linear_spec_lora/ if present, None = no adapter, else an adapter dir; `page_size` is the
    KV page size a tensorrt plan is built for (torch and onnx engines choose theirs when opened); `quantize`
    stores the projections (and the LM head unless `quantize_head` is False) as int8, int4 (`group_size`,
    default 128) or fp8 (runtime/model/quant.py)."""

    backend: str = "torch"
    dtype: str | None = None
    max_batch_size: int = 8
    max_seq_len: int | None = None
    block_lengths: tuple[int, ...] = ()
    lora: str | Path | None = LORA_AUTO
    plugin_library: Path | None = None
    page_size: int = 16
    quantize: str | None = None
    group_size: int | None = None
    quantize_head: bool = True


@dataclass(frozen=True)
class BuildPlan:
    """Options resolved against the checkpoint: every field concrete and validated."""

    backend: str
    dtype: str
    max_batch_size: int
    max_seq_len: int
    block_lengths: tuple[int, ...]
    page_size: int = 16
    quantization: Quantization | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)


@dataclass
class BackendOutput:
    """What a backend writer put into the staging folder."""

    files: dict[str, FileEntry]
    artifacts: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)


Progress = Callable[[int], None]


def resolve_plan(options: BuildOptions, checkpoint: Checkpoint) -> BuildPlan:
    """Check the options against the model; every problem is one BuildError naming the option."""
    config = checkpoint.config
    if options.backend not in BACKENDS:
        raise BuildError(f"unknown backend '{options.backend}' (choose {', '.join(BACKENDS)})")
    default = "fp32" if options.backend == "onnx" else checkpoint.default_dtype
    dtype = options.dtype or default
    if dtype not in ENGINE_DTYPES:
        raise BuildError(f"unknown dtype '{dtype}' (choose {', '.join(ENGINE_DTYPES)})")
    if options.backend == "onnx" and dtype != "fp32":
        raise BuildError(f"the onnx backend runs on onnxruntime's CPU kernels, which serve fp32 only; build it "
                         f"with --dtype fp32 ({dtype} is for --backend tensorrt or torch)")
    if options.max_batch_size < 1:
        raise BuildError(f"--max-batch-size must be at least 1, got {options.max_batch_size}")
    max_seq_len = options.max_seq_len
    if max_seq_len is None:
        max_seq_len = min(DEFAULT_MAX_SEQ_LEN, config.max_position_embeddings)
    if not 1 <= max_seq_len <= config.max_position_embeddings:
        raise BuildError(f"--max-seq-len must be within [1, {config.max_position_embeddings}] (the model's "
                         f"max_position_embeddings), got {max_seq_len}")
    blocks = tuple(sorted(set(options.block_lengths or (config.block_size,))))
    for length in blocks:
        if not 1 <= length <= max_seq_len:
            raise BuildError(f"--block-length {length} must be within [1, --max-seq-len {max_seq_len}]")
    if options.page_size < 1:
        raise BuildError(f"--page-size must be at least 1, got {options.page_size}")
    quant = resolve_quantization(options, checkpoint)
    return BuildPlan(options.backend, dtype, options.max_batch_size, max_seq_len, blocks, options.page_size, quant)


QUANTIZE_BACKENDS = {"torch": SCHEMES, "onnx": SCHEMES, "tensorrt": ("fp8",)}


def resolve_quantization(options: BuildOptions, checkpoint: Checkpoint) -> Quantization | None:
    """The --quantize choice, checked against the backend and every matrix it would quantize."""
    if options.quantize is None:
        if options.group_size is not None:
            raise BuildError("--group-size needs --quantize int4")
        return None
    try:
        quant = Quantization.parse(options.quantize, options.group_size, options.quantize_head)
    except ValueError as exc:
        raise BuildError(f"--quantize: {exc}") from None
    supported = QUANTIZE_BACKENDS[options.backend]
    if quant.scheme not in supported:
        can = f"only --quantize {' or '.join(supported)}" if supported else "no --quantize"
        raise BuildError(f"the {options.backend} backend takes {can} (asked for {quant.scheme}); "
                         f"{', '.join(SCHEMES)} build with --backend torch")
    for name, shape in converted_shapes(checkpoint.config, None).items():
        if quant.quantizes(name) and (reason := quant.check_shape(name, shape)) is not None:
            raise BuildError(f"--quantize {quant.scheme}: {reason}")
    return quant


def resolve_lora(checkpoint: Checkpoint, choice: str | Path | None) -> LoraAdapter | None:
    """The adapter to bake in: the checkpoint's (auto), none, or one from a directory."""
    if choice is None:
        return None
    if isinstance(choice, str) and choice == LORA_AUTO:
        return checkpoint.lora
    return load_lora(Path(choice), checkpoint.config)


def check_output(out: Path, checkpoint_dir: Path, force: bool) -> None:
    """Refuse to write over a non-empty folder without --force, and never over the checkpoint itself."""
    target, source = out.resolve(), checkpoint_dir.resolve()
    if target == source or target in source.parents or source in target.parents:
        raise BuildError(f"output {out} overlaps the checkpoint directory {checkpoint_dir}; choose another -o")
    if out.exists() and not out.is_dir():
        raise BuildError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BuildError(f"output {out} exists and is not empty (use --force to replace it)")


def _bar(total: int, desc: str, show: bool | None) -> tqdm:
    """A byte progress bar on stderr; `show` None = only on a terminal (quiet in pipes and tests)."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if show is None else not show,
                leave=False)


def write_torch_weights(staging: Path, checkpoint: Checkpoint, plan: BuildPlan, lora: LoraAdapter | None,
                        show: bool | None) -> BackendOutput:
    """The torch backend's artifact: converted weights in one safetensors file, memory-mapped at load."""
    specs, makers = stored_weights(checkpoint, plan.torch_dtype, lora, plan.quantization)
    what = "reading and converting weights" if plan.quantization is None else \
        f"reading, converting and quantizing ({plan.quantization.scheme}) weights"
    with _bar(converted_nbytes(specs), what, show) as bar:
        entry = stream_safetensors(staging / WEIGHTS_FILE, specs, makers, {"format": "pt"}, bar.update)
    return BackendOutput({WEIGHTS_FILE: entry}, {"weights": WEIGHTS_FILE})


def write_onnx(staging: Path, checkpoint: Checkpoint, plan: BuildPlan, lora: LoraAdapter | None,
               show: bool | None) -> BackendOutput:
    """The onnx backend's artifacts: the step graph and its external weights, checked by onnx's checker."""
    import onnx
    import onnxruntime

    from .onnx_export import DATA_FILE, MODEL_FILE, ORT_DOMAIN, check_export, export_onnx, onnx_opset

    dtype = plan.torch_dtype
    shapes = converted_shapes(checkpoint.config, lora.rank if lora else None)
    total = converted_nbytes({name: (dtype, shape) for name, shape in shapes.items()})
    with _bar(total, "reading, converting and writing ONNX weights", show) as bar:
        files = export_onnx(staging, checkpoint, dtype, lora, progress=bar.update, quant=plan.quantization)
    check_export(staging)
    return BackendOutput(files, {"onnx": MODEL_FILE, "onnx_data": DATA_FILE},
                         {"opset": onnx_opset(plan.quantization), "attention_domain": ORT_DOMAIN},
                         {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__})


def write_tensorrt(staging: Path, checkpoint: Checkpoint, plan: BuildPlan, lora: LoraAdapter | None,
                   show: bool | None, plugin_library: Path | None) -> BackendOutput:
    """The tensorrt backend's artifacts: a serialized plan plus the plugin library it needs (GPU only).

    The TensorRT build lives with the rest of TensorRT in runtime/backends/tensorrt_backend.py (the only module
    importing tensorrt); it is imported here, lazily, and it never imports this module (it takes the plan as
    plain fields and raises its own TensorRTBuildError), so the two never form an import cycle."""
    from ..runtime.backends.tensorrt_backend import TensorRTBuildError, TensorRTBuildSpec, build_tensorrt

    spec = TensorRTBuildSpec(plan.torch_dtype, plan.max_batch_size, plan.max_seq_len, plan.block_lengths,
                             page_size=plan.page_size, quantization=plan.quantization)
    try:
        files, artifacts, options, tools = build_tensorrt(staging, checkpoint, spec, lora, plugin_library, show)
    except TensorRTBuildError as exc:
        raise BuildError(str(exc)) from None
    return BackendOutput(files, artifacts, options, tools)


def tensorrt_unavailable_reason() -> str | None:
    """Why `--backend tensorrt` cannot build here, or None (checked before any work is done)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"`import tensorrt` fails here ({exc}); TensorRT 10 and an NVIDIA GPU are needed"
    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA device is visible"
    return None


def copy_tokenizer(checkpoint: Checkpoint, staging: Path) -> dict[str, FileEntry]:
    if checkpoint.tokenizer_path is None:
        return {}
    files = {}
    with HashingWriter(staging / TOKENIZER_FILE) as out:
        out.write(checkpoint.tokenizer_path.read_bytes())
        files[TOKENIZER_FILE] = out.close()
    for name in TOKENIZER_EXTRAS:  # the chat template (served by /v1/chat/completions and `generate --chat`)
        source = checkpoint.tokenizer_path.parent / name
        if source.is_file():
            with HashingWriter(staging / name) as out:
                out.write(source.read_bytes())
                files[name] = out.close()
    return files


def make_manifest(checkpoint: Checkpoint, plan: BuildPlan, lora: LoraAdapter | None, output: BackendOutput,
                  tokenizer: dict[str, FileEntry]) -> Manifest:
    artifacts = dict(output.artifacts)
    if tokenizer:
        artifacts["tokenizer"] = TOKENIZER_FILE
    if TOKENIZER_EXTRAS[0] in tokenizer:
        artifacts["tokenizer_config"] = TOKENIZER_EXTRAS[0]
    tools = {"trimode": __version__, "torch": torch.__version__.split("+")[0], "python": platform.python_version(),
             **output.tools}
    return Manifest(
        backend=plan.backend, dtype=plan.dtype, model_config=checkpoint.config.to_hf_dict(),
        max_batch_size=plan.max_batch_size, max_seq_len=plan.max_seq_len, block_lengths=plan.block_lengths,
        lora=None if lora is None else LoraInfo(lora.rank, lora.alpha, lora.scale),
        artifacts=artifacts, files={**output.files, **tokenizer}, tools=tools, backend_options=output.options,
        quantization=plan.quantization)


def _sync_tree(root: Path) -> None:
    """fsync every file before the rename, so a crash never publishes an engine with unwritten data."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder to `out`, replacing what is there (the caller checked --force)."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp made it private; an engine is as readable as any other output
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
        else:
            out.rmdir()
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_engine(checkpoint_dir: str | Path, out_dir: str | Path, options: BuildOptions = BuildOptions(), *,
                 force: bool = False, show_progress: bool | None = None) -> Manifest:
    """Validate, convert and compile `checkpoint_dir` into the engine directory `out_dir`; returns its manifest."""
    source, out = Path(checkpoint_dir), Path(out_dir)
    check_output(out, source, force)
    auto = isinstance(options.lora, str) and options.lora == LORA_AUTO
    checkpoint = load_checkpoint(source, with_lora=auto)
    lora = resolve_lora(checkpoint, options.lora)
    plan = resolve_plan(options, checkpoint)
    if plan.backend == "tensorrt" and (reason := tensorrt_unavailable_reason()) is not None:
        raise BuildError(f"cannot build a tensorrt engine: {reason}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        if plan.backend == "torch":
            output = write_torch_weights(staging, checkpoint, plan, lora, show_progress)
        elif plan.backend == "onnx":
            output = write_onnx(staging, checkpoint, plan, lora, show_progress)
        else:
            output = write_tensorrt(staging, checkpoint, plan, lora, show_progress, options.plugin_library)
        tokenizer = copy_tokenizer(checkpoint, staging)
        manifest = make_manifest(checkpoint, plan, lora, output, tokenizer)
        manifest.write(staging)
        _sync_tree(staging)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
