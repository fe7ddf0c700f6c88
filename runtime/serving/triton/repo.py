"""Writing a Triton Inference Server model repository that serves an engine (`trimode triton-repo`).

The repository holds one Python-backend model per transaction policy: the decoupled model (default name
`trimode`) streams tokens as they are committed over gRPC streams and the HTTP generate / generate_stream
endpoints; an optional non-decoupled twin (`trimode_sync`) answers plain `infer` calls (HTTP or gRPC), which
Triton refuses for decoupled models. Both serve all three generation modes, chosen per request.

`1/model.py` is a three-line shim: the serving logic is `trimode.runtime.serving.triton.model`, imported from the
installed package, so it is tested and versioned with the engine code instead of being frozen into a copy.
Every setting the model needs (the engine path, dtype, batching window...) travels as a `parameters` entry
of `config.pbtxt`, so the repository can be edited by hand like any other Triton repository.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, fields
from pathlib import Path

from ....builder.errors import CheckpointError

DEFAULT_MODEL_NAME = "trimode"
SYNC_SUFFIX = "_sync"

# (name, Triton type, dims): the LLM-backend conventions where they fit; every input but the prompt is optional.
INPUTS: tuple[tuple[str, str, str], ...] = (
    ("text_input", "TYPE_STRING", "[ 1 ]"),
    ("input_ids", "TYPE_INT32", "[ -1 ]"),
    ("max_tokens", "TYPE_INT32", "[ 1 ]"),
    ("mode", "TYPE_STRING", "[ 1 ]"),
    ("block_length", "TYPE_INT32", "[ 1 ]"),
    ("threshold", "TYPE_FP32", "[ 1 ]"),
    ("temperature", "TYPE_FP32", "[ 1 ]"),
    ("seed", "TYPE_INT64", "[ 1 ]"),
    ("stream", "TYPE_BOOL", "[ 1 ]"),
    ("top_p", "TYPE_FP32", "[ 1 ]"),
    ("top_k", "TYPE_INT32", "[ 1 ]"),
    ("suffix_text", "TYPE_STRING", "[ 1 ]"),
    ("suffix_ids", "TYPE_INT32", "[ -1 ]"),
    ("priority", "TYPE_INT32", "[ 1 ]"),
)
OUTPUTS: tuple[tuple[str, str, str], ...] = (
    ("text_output", "TYPE_STRING", "[ -1 ]"),
    ("output_ids", "TYPE_INT32", "[ -1 ]"),
    ("forwards", "TYPE_INT32", "[ 1 ]"),
    ("finish_reason", "TYPE_STRING", "[ 1 ]"),
    ("cached_tokens", "TYPE_INT32", "[ 1 ]"),
)

SHIM = '''"""Triton Python-backend entry point written by `trimode triton-repo` (trimode {version}).

The serving logic lives in the installed package (trimode.runtime.serving.triton.model), so it is tested and
versioned with the engine; this file only hands Triton's calls to it.
"""

try:
    from trimode.runtime.serving.triton.model import TritonPythonModel  # noqa: F401
except ImportError as exc:  # the stub runs a Python that lacks trimode: say which one
    import sys

    raise ImportError(f"the Triton Python backend runs {{sys.executable}} (Python {{sys.version.split()[0]}}), "
                      f"which cannot import trimode: {{exc}}; install trimode into that Python") from exc
'''


@dataclass(frozen=True)
class ServingSettings:
    """What the Triton model needs to open the engine and schedule requests; stored in config.pbtxt.

    `max_batch_size` / `max_seq_len` / `max_step_tokens` of 0 mean "the engine's own limits";
    `kv_cache_memory` "" and `page_size` 0 the defaults (runtime/cache/sizing.py).
    """

    engine_path: str
    dtype: str = "auto"
    device: str = "cpu"
    use_lora: bool = True
    max_batch_size: int = 0
    max_seq_len: int = 0
    max_step_tokens: int = 0
    default_mode: str = "spec"
    default_max_tokens: int = 64
    torch_threads: int = 0
    kv_cache_memory: str = ""
    page_size: int = 0
    prefix_caching: bool = True
    schedule_policy: str = "prefill-first"
    max_row_tokens: int = 0   # 0: the step size
    max_queued_jobs: int = 0  # 0: no limit
    drain_dir: str = ""       # set by `trimode serve`: where it asks the model to drain (see model.py)
    generation_config: str = "auto"  # auto: generation_config.json's sampling defaults; none: ignore it
    trimode_version: str = ""

    def to_parameters(self) -> dict[str, str]:
        """Every field as a string (Triton parameters are strings)."""
        return {f.name: _format(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> ServingSettings:
        """Inverse of `to_parameters`; unknown keys are ignored, missing ones take the defaults."""
        values = {}
        for f in fields(cls):
            if f.name not in parameters:
                continue
            raw = parameters[f.name]
            kind = type(getattr(cls, f.name, "")) if f.name != "engine_path" else str
            try:
                values[f.name] = _parse(raw, kind)
            except ValueError:
                raise ValueError(f"config.pbtxt parameter {f.name}={raw!r} is not a valid {kind.__name__}") from None
        if "engine_path" not in values:
            raise ValueError("config.pbtxt has no engine_path parameter")
        return cls(**values)


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(raw: str, kind: type) -> object:
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(raw)
        return raw.lower() in ("true", "1")
    return kind(raw)


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_config_text(name: str, settings: ServingSettings, decoupled: bool, instance_count: int) -> str:
    """The config.pbtxt of one model."""
    def tensors(specs: tuple[tuple[str, str, str], ...], optional: bool) -> str:
        extra = " optional: true" if optional else ""
        rows = [f"  {{ name: {_quote(n)} data_type: {t} dims: {d}{extra} }}" for n, t, d in specs]
        return ",\n".join(rows)

    parameters = ",\n".join(f"  {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}"
                            for k, v in settings.to_parameters().items())
    policy = "true" if decoupled else "false"
    return (
        f"# Written by `trimode triton-repo`: one model serving every mode (ar, diffusion, spec, quad, infill), "
        f"chosen per request.\n"
        f"# decoupled: {policy} ({'streams committed tokens' if decoupled else 'one response per request'}).\n"
        f"name: {_quote(name)}\n"
        f'backend: "python"\n'
        f"max_batch_size: 0\n"
        f"model_transaction_policy {{ decoupled: {policy} }}\n"
        f"input [\n{tensors(INPUTS, True)}\n]\n"
        f"output [\n{tensors(OUTPUTS, False)}\n]\n"
        f"instance_group [ {{ count: {instance_count} kind: KIND_CPU }} ]\n"
        f"parameters [\n{parameters}\n]\n"
    )


def _engine_kind(engine_dir: Path) -> str:
    if (engine_dir / "manifest.json").is_file():
        return "engine"
    if (engine_dir / "config.json").is_file():
        return "checkpoint"
    raise CheckpointError(engine_dir, "neither an engine (manifest.json) nor a checkpoint (config.json)")


def write_triton_repo(engine_dir: str | Path, repo_dir: str | Path, *, model_name: str = DEFAULT_MODEL_NAME,
                      sync_model: bool = False, instance_count: int = 1, force: bool = False,
                      **settings: object) -> list[Path]:
    """Write the model repository; returns the model directories written.

    `settings` are `ServingSettings` fields (dtype, device, max_step_tokens, ...). The engine path is stored
    absolute so the repository works from any working directory. An existing model directory of the same
    name is an error unless `force` (other models in the repository are left alone).
    """
    from .... import __version__

    engine_dir = Path(engine_dir).resolve()
    _engine_kind(engine_dir)
    if instance_count < 1:
        raise ValueError(f"instance count must be at least 1, got {instance_count}")
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"'{model_name}' is not a usable model name")
    config = ServingSettings(engine_path=str(engine_dir), trimode_version=__version__, **settings)  # type: ignore[arg-type]
    repo = Path(repo_dir)
    models = [(model_name, True)] + ([(model_name + SYNC_SUFFIX, False)] if sync_model else [])
    written = []
    for name, decoupled in models:
        model_dir = repo / name
        if model_dir.exists():
            if not force:
                raise FileExistsError(f"{model_dir} exists (use --force to replace it)")
            shutil.rmtree(model_dir)
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(model_config_text(name, config, decoupled, instance_count))
        (model_dir / "1" / "model.py").write_text(SHIM.format(version=__version__))
        written.append(model_dir)
    return written
