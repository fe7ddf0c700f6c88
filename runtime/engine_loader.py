"""Opening whatever the user points `--model` at: an engine directory or a Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..builder.errors import CheckpointError
from .engine import StepEngine
from .loader import engine_from_checkpoint


def open_engine(path: str | Path, *, dtype: str = "fp32", use_lora: bool = True, verify: bool = False,
                device: str = "cpu", max_batch_size: int = 64, max_seq_len: int = 4096) -> StepEngine:
    """An engine ready for the generation modes; a checkpoint directory is built in memory."""
    root = Path(path)
    if (root / "config.json").is_file():
        return engine_from_checkpoint(root, dtype=dtype, use_lora=use_lora, max_batch_size=max_batch_size,
                                      max_seq_len=max_seq_len, device=device)
    raise CheckpointError(root, "neither an engine (manifest.json) nor a checkpoint (config.json)")
