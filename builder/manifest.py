"""The engine manifest: what an engine directory holds, what it serves, and how its files are checked.

`manifest.json` is the one contract between `trimode build` and the runtime. It is written last (so a
directory without it is never mistaken for an engine), with sorted keys and no timestamps or absolute
paths (so the same inputs always give the same bytes), and it is versioned: the runtime refuses a
`format_version` it does not know instead of guessing at a layout that may have changed.

Layout (docs/engine-format.md describes every field):

    {"format": "trimode-engine", "format_version": 3, "backend": "torch" | "onnx" | "tensorrt",
     "model": {"config": {<config.json of the checkpoint>}, "lora": {"rank", "alpha", "scale"} | null},
     "build": {"dtype": "fp32" | "bf16" | "fp16", "backend_options": {...},
               "quantization": {"scheme": "int8" | "int4" | "fp8", "group_size", "head"}   (version 4 only)},
     "serves": {"max_batch_size", "max_seq_len", "block_lengths": [...], "mask_kinds": [...], "lora_draft"},
     "artifacts": {"weights" | "onnx" | "onnx_data" | "plan" | "plugin_library" | "tokenizer": "<file>"},
     "tools": {"trimode": ..., "torch": ..., ...},
     "files": {"<relative path>": {"sha256": "<hex>", "size": <bytes>}}}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .config import ModelConfig, parse_config
from .errors import CheckpointError
from .quantization import SCHEMES, Quantization

FORMAT = "trimode-engine"
# 2: one packed step over rows of any mask kind (the ONNX graph's inputs are a StepBatch's tensors)
# 3: the paged KV cache
FORMAT_VERSION = 3
# 4: version 3 with quantized weights (build.quantization). Only quantized engines carry it, so a runtime that
# predates quantization refuses them by version instead of misreading their weights; others stay at 3.
QUANTIZED_FORMAT_VERSION = 4
READABLE_VERSIONS = (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION)
MANIFEST_FILE = "manifest.json"
BACKENDS = ("torch", "onnx", "tensorrt")
ENGINE_DTYPES = ("fp32", "bf16", "fp16")
MASK_KINDS = ("causal", "bidirectional", "quad", "prefix_block")  # what one step's rows may use
HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    """Size and SHA-256 of one engine file: size is checked on every load, the hash with --verify."""

    sha256: str
    size: int


@dataclass(frozen=True)
class LoraInfo:
    """The draft adapter baked into the engine (its tensors live in the engine's weights)."""

    rank: int
    alpha: float
    scale: float


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about an engine before touching its files."""

    backend: str
    dtype: str
    model_config: dict[str, Any]
    max_batch_size: int
    max_seq_len: int
    block_lengths: tuple[int, ...]
    lora: LoraInfo | None
    artifacts: dict[str, str]
    files: dict[str, FileEntry]
    tools: dict[str, str] = field(default_factory=dict)
    backend_options: dict[str, Any] = field(default_factory=dict)
    quantization: Quantization | None = None

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION if self.quantization is None else QUANTIZED_FORMAT_VERSION

    def config(self, where: str | Path = MANIFEST_FILE) -> ModelConfig:
        """The model configuration, validated exactly like a checkpoint's config.json."""
        return parse_config(dict(self.model_config), Path(where))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "backend": self.backend,
            "model": {"config": self.model_config,
                      "lora": None if self.lora is None else {"rank": self.lora.rank, "alpha": self.lora.alpha,
                                                              "scale": self.lora.scale}},
            "build": {"dtype": self.dtype, "backend_options": self.backend_options,
                      **({} if self.quantization is None else {"quantization": self.quantization.to_json()})},
            "serves": {"max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len,
                       "block_lengths": list(self.block_lengths), "mask_kinds": list(MASK_KINDS),
                       "lora_draft": self.lora is not None},
            "artifacts": dict(self.artifacts),
            "tools": dict(self.tools),
            "files": {name: {"sha256": e.sha256, "size": e.size} for name, e in sorted(self.files.items())},
        }

    def to_json(self) -> str:
        """Sorted keys and a trailing newline: the same manifest always serializes to the same bytes."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def write(self, root: Path) -> Path:
        path = root / MANIFEST_FILE
        path.write_text(self.to_json())
        return path


def _field(data: dict[str, Any], dotted: str, kind: type | tuple[type, ...], path: Path) -> Any:
    """data['a']['b'] for 'a.b', or a one-line error naming the missing or mistyped field."""
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CheckpointError(path, f"missing manifest field '{dotted}'")
        value = value[part]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise CheckpointError(path, f"manifest field '{dotted}' has the wrong type ({type(value).__name__})")
    return value


def read_manifest(root: str | Path) -> Manifest:
    """Parse and validate `root/manifest.json`; the format version is checked before anything else."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(path, "manifest.json not found (not an engine directory)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(path, "not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(path, f"not a trimode engine manifest (expected \"format\": \"{FORMAT}\")")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise CheckpointError(path, f"engine format version {version!r} is not supported (this trimode reads "
                                    f"versions {readable}); rebuild the engine with `trimode build`")
    backend = _field(data, "backend", str, path)
    if backend not in BACKENDS:
        raise CheckpointError(path, f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    dtype = _field(data, "build.dtype", str, path)
    if dtype not in ENGINE_DTYPES:
        raise CheckpointError(path, f"unknown engine dtype '{dtype}'")
    lora_data = _field(data, "model.lora", (dict, type(None)), path)
    lora = None
    if lora_data is not None:
        lora = LoraInfo(int(_field(data, "model.lora.rank", int, path)),
                        float(_field(data, "model.lora.alpha", (int, float), path)),
                        float(_field(data, "model.lora.scale", (int, float), path)))
    files: dict[str, FileEntry] = {}
    for name, entry in _field(data, "files", dict, path).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("size"), int):
            raise CheckpointError(path, f"manifest entry for file '{name}' needs 'sha256' and 'size'")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(path, f"manifest names file '{name}' outside the engine directory")
        files[name] = FileEntry(entry["sha256"], entry["size"])
    artifacts = _field(data, "artifacts", dict, path)
    for role, name in artifacts.items():
        if name not in files:
            raise CheckpointError(path, f"artifact '{role}' names '{name}', which is not in the file list")
    block_lengths = tuple(_field(data, "serves.block_lengths", list, path))
    if not block_lengths or not all(isinstance(n, int) and n > 0 for n in block_lengths):
        raise CheckpointError(path, "manifest field 'serves.block_lengths' must list positive integers")
    quantization = None
    if version == QUANTIZED_FORMAT_VERSION:
        scheme = _field(data, "build.quantization.scheme", str, path)
        try:
            quantization = Quantization.from_json(_field(data, "build.quantization", dict, path))
        except ValueError as exc:
            if scheme not in SCHEMES:
                raise CheckpointError(path, f"the engine's weights are quantized with '{scheme}', a scheme this "
                                            f"trimode does not know (it knows {', '.join(SCHEMES)}); upgrade "
                                            "trimode or rebuild the engine") from None
            raise CheckpointError(path, f"manifest field 'build.quantization': {exc}") from None
    manifest = Manifest(
        backend=backend,
        dtype=dtype,
        model_config=_field(data, "model.config", dict, path),
        max_batch_size=_field(data, "serves.max_batch_size", int, path),
        max_seq_len=_field(data, "serves.max_seq_len", int, path),
        block_lengths=block_lengths,
        lora=lora,
        artifacts=dict(artifacts),
        files=files,
        tools=dict(data.get("tools", {})),
        backend_options=dict(_field(data, "build.backend_options", dict, path)),
        quantization=quantization,
    )
    manifest.config(path)  # a bad model config is reported now, naming the manifest
    return manifest


class HashingWriter:
    """A binary file that hashes and counts what is written, so big files are never read back to hash them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()/__exit__
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._handle.write(data)
        self._hash.update(data)
        self.size += len(data)

    def pad_to(self, alignment: int) -> None:
        """Zero bytes up to the next multiple of `alignment` (memory-mappable tensor offsets)."""
        self.write(b"\0" * (-self.size % alignment))

    def close(self) -> FileEntry:
        self._handle.close()
        return FileEntry(self._hash.hexdigest(), self.size)

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._handle.closed:
            self._handle.close()


def hash_file(path: Path, progress: Any = None) -> FileEntry:
    """SHA-256 and size of a file, read in chunks; `progress(nbytes)` is called as bytes are read."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return FileEntry(digest.hexdigest(), size)
