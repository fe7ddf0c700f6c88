"""Opening an engine directory: manifest, file checks, backend, then the engine itself.

Everything that can be wrong with an engine on disk is reported before any weight is used, as one-line
`CheckpointError`s naming the file: an unknown manifest version, a missing file, a file whose size differs
from the manifest (always checked: it is free and catches truncated copies), a file whose SHA-256 differs
(with verify=True: it reads every byte), and a backend this machine cannot run. Requests beyond the shapes
the engine was built for are `CapacityError`s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...builder.errors import CheckpointError
from ...builder.manifest import Manifest, hash_file, read_manifest
from ...builder.safetensors_io import SafetensorsFile
from ..errors import CapacityError
from ..model.network import Transformer
from ..model.quant import QUANTIZED_SUFFIXES, gather_quantized
from .limits import EngineLimits
from .step import StepEngine
from .torch_engine import TorchEngine


def check_files(root: Path, manifest: Manifest, verify: bool) -> None:
    """Every listed file exists with its recorded size; with `verify` its SHA-256 matches too."""
    for name, entry in sorted(manifest.files.items()):
        path = root / name
        if not path.is_file():
            raise CheckpointError(path, "file listed in manifest.json is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise CheckpointError(path, f"size {size} bytes differs from the manifest's {entry.size} (truncated "
                                        "or modified file; rebuild the engine)")
    if verify:
        for name, entry in sorted(manifest.files.items()):
            if hash_file(root / name).sha256 != entry.sha256:
                raise CheckpointError(root / name, "SHA-256 differs from the manifest (corrupted or modified "
                                                   "file; rebuild the engine)")


def backend_unavailable(backend: str, device: str) -> str | None:
    """Why `backend` cannot run here, or None."""
    if backend == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import onnxruntime_extensions  # noqa: F401
        except ImportError as exc:
            return f"the onnx backend needs onnxruntime and onnxruntime-extensions ({exc}); pip install 'trimode[onnx]'"
        if device != "cpu":
            return f"the onnx backend runs on the CPU only (asked for device '{device}')"
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            return (f"the engine was built for TensorRT, but `import tensorrt` fails here ({exc}); run it on a "
                    "machine with TensorRT 10 and an NVIDIA GPU, or build a torch/onnx engine")
        if not torch.cuda.is_available():
            return "the engine was built for TensorRT, but no CUDA device is visible here"
    return None


def serving_limits(manifest: Manifest, max_batch_size: int | None, max_seq_len: int | None) -> EngineLimits:
    """The engine's built limits, or smaller ones on request; larger ones are a CapacityError.

    Block lengths: torch and onnx engines serve any (their limits list none); a tensorrt engine serves only
    those it was built for (`EngineLimits.check_block_length` refuses the others)."""
    batch = manifest.max_batch_size if max_batch_size is None else max_batch_size
    length = manifest.max_seq_len if max_seq_len is None else max_seq_len
    if batch > manifest.max_batch_size:
        raise CapacityError(f"batch size {batch} exceeds the engine's built maximum {manifest.max_batch_size} "
                            "(rebuild with a larger --max-batch-size)")
    if length > manifest.max_seq_len:
        raise CapacityError(f"sequence length {length} exceeds the engine's built maximum {manifest.max_seq_len} "
                            "(rebuild with a larger --max-seq-len)")
    blocks = manifest.block_lengths if manifest.backend == "tensorrt" else ()
    return EngineLimits(max_batch_size=batch, max_seq_len=length, block_lengths=tuple(blocks))


def tokenizer_of(root: Path, manifest: Manifest) -> Path | None:
    name = manifest.artifacts.get("tokenizer")
    return None if name is None else root / name


def load_torch_engine(root: Path, manifest: Manifest, use_lora: bool, device: str, limits: EngineLimits
                      ) -> TorchEngine:
    """Converted weights memory-mapped straight into the reference network (no conversion at load). On a
    CUDA device the engine is the GPU path (`GraphEngine`: one cache, static buffers, CUDA graphs)."""
    weights_file = SafetensorsFile(root / manifest.artifacts["weights"])
    # quantized parts are copied (aligned, and for int4 repacked) by QuantizedLinear: read, not mapped
    copied = () if manifest.quantization is None else QUANTIZED_SUFFIXES
    weights = {name: weights_file.read(name) if name.endswith(copied) else weights_file.get(name)
               for name in weights_file.tensors}
    if not use_lora:
        weights = {name: t for name, t in weights.items() if ".lora_" not in name}
    if manifest.quantization is not None:
        weights = gather_quantized(weights, manifest.quantization, weights["embed"].dtype)
    scale = manifest.lora.scale if (use_lora and manifest.lora) else 0.0
    model = Transformer(manifest.config(root / "manifest.json"), weights, scale).to(device)
    if model.device.type == "cuda":
        from .cuda_graphs import GraphEngine

        return GraphEngine(model, limits, tokenizer_of(root, manifest))
    return TorchEngine(model, limits, tokenizer_of(root, manifest))


def load_onnx_engine(root: Path, manifest: Manifest, use_lora: bool, limits: EngineLimits,
                     threads: int | None = None) -> StepEngine:
    from .onnx_engine import OnnxEngine

    return OnnxEngine(root / manifest.artifacts["onnx"], manifest.config(root / "manifest.json"), torch.float32,
                      limits, manifest.lora is not None, use_lora, tokenizer_of(root, manifest), threads)


def load_engine(path: str | Path, *, use_lora: bool = True, verify: bool = False, device: str = "cpu",
                max_batch_size: int | None = None, max_seq_len: int | None = None, threads: int | None = None
                ) -> StepEngine:
    """Check and open an engine directory with its backend; limits default to (and may not exceed) the built
    ones. `threads` sets the onnx backend's intra-op threads (torch's setting elsewhere)."""
    root = Path(path)
    manifest = read_manifest(root)
    reason = backend_unavailable(manifest.backend, device)
    if reason is not None:
        raise CheckpointError(root, reason)
    check_files(root, manifest, verify)
    limits = serving_limits(manifest, max_batch_size, max_seq_len)
    if manifest.backend == "torch":
        return load_torch_engine(root, manifest, use_lora, device, limits)
    if manifest.backend == "onnx":
        return load_onnx_engine(root, manifest, use_lora, limits, threads)
    from .tensorrt_backend import TensorRTEngine

    return TensorRTEngine(root, manifest, use_lora, limits)
