"""Opening whatever the user points `--model` at: an engine directory or a Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

from ...builder.errors import CheckpointError
from ...builder.manifest import MANIFEST_FILE, read_manifest
from .checkpoint_engine import engine_from_checkpoint
from .devices import resolve_device
from .engine_files import load_engine
from .step import StepEngine

CHECKPOINT_MAX_BATCH = 64
CHECKPOINT_MAX_SEQ = 4096


def open_engine(path: str | Path, *, dtype: str = "auto", use_lora: bool = True, verify: bool = False,
                device: str = "auto", max_batch_size: int | None = None, max_seq_len: int | None = None
                ) -> StepEngine:
    """An engine ready for the generation modes.

    One dtype rule everywhere: "auto" is the checkpoint's `torch_dtype` (what `trimode build` uses by
    default), so a checkpoint and the engine built from it with default options give the same tokens. An
    engine directory (has manifest.json) opens with its own backend, dtype and built limits (a `dtype` other
    than "auto" or the engine's own is a CheckpointError; smaller limits may be asked for, larger ones are a
    CapacityError; `verify` checks every file's SHA-256). A checkpoint directory (has config.json) is
    converted in memory at `dtype`.
    """
    root = Path(path)
    if (root / MANIFEST_FILE).is_file():
        manifest = read_manifest(root)
        built = manifest.dtype
        device = resolve_device(device, manifest.backend)
        if dtype not in ("auto", built):
            raise CheckpointError(root, f"is an engine built for {built}; its dtype is fixed (asked for {dtype}; "
                                        f"rebuild with `trimode build --dtype {dtype}`)")
        return load_engine(root, use_lora=use_lora, verify=verify, device=device, max_batch_size=max_batch_size,
                           max_seq_len=max_seq_len)
    if (root / "config.json").is_file():
        device = resolve_device(device)
        return engine_from_checkpoint(root, dtype=dtype, use_lora=use_lora,
                                      max_batch_size=max_batch_size or CHECKPOINT_MAX_BATCH,
                                      max_seq_len=max_seq_len or CHECKPOINT_MAX_SEQ, device=device)
    raise CheckpointError(root, "neither an engine (manifest.json) nor a checkpoint (config.json)")
