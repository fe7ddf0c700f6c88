"""Opening whatever the user points `--model` at: an engine directory or a Hugging Face checkpoint."""

from __future__ import annotations

import hashlib
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
                device: str = "auto", max_batch_size: int | None = None, max_seq_len: int | None = None,
                kv_cache_memory: int | str | None = None, page_size: int | None = None,
                prefix_caching: bool = True) -> StepEngine:
    """An engine ready for the generation modes.

    One dtype rule everywhere: "auto" is the checkpoint's own (`Checkpoint.default_dtype`: config.json's
    `dtype`, else `torch_dtype`, else the stored weights'; what `trimode build` uses by
    default), so a checkpoint and the engine built from it with default options give the same tokens. An
    engine directory (has manifest.json) opens with its own backend, dtype and built limits (a `dtype` other
    than "auto" or the engine's own is a CheckpointError; smaller limits may be asked for, larger ones are a
    CapacityError; `verify` checks every file's SHA-256). A checkpoint directory (has config.json) is
    converted in memory at `dtype`.

    The KV cache is sized here (runtime/cache/sizing.py): `kv_cache_memory` bytes (or "4GiB"), else the
    device's default; pages of `page_size` positions (default 16); `prefix_caching` False turns reuse off.
    """
    engine = _open(Path(path), dtype, use_lora, verify, device, max_batch_size, max_seq_len)
    engine.size_cache(kv_cache_memory, page_size, prefix_caching, engine_identity(Path(path), engine))
    return engine


def engine_identity(root: Path, engine: StepEngine) -> str:
    """What decides an engine's K/V: its files (an engine's manifest hashes; a checkpoint's weight files by path,
    size and time), dtype and backend. Prefix-cache hashes and `auto` statistics are keyed by it."""
    digest = hashlib.blake2b(digest_size=16)
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    else:
        for file in sorted(root.glob("*.safetensors")) + sorted((root / "linear_spec_lora").glob("*")):
            stat = file.stat()
            digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        digest.update((root / "config.json").read_bytes())
    digest.update(f"{engine.backend}|{engine.dtype}|lora={engine.has_lora}".encode())
    return digest.hexdigest()


def _open(root: Path, dtype: str, use_lora: bool, verify: bool, device: str, max_batch_size: int | None,
          max_seq_len: int | None) -> StepEngine:
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
