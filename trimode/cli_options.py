"""Options and helpers several commands share: device and threads, the KV cache, block lengths, the demo model.

Only click and light modules are imported here, so `trimode --help` never loads torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .runtime.request import AUTO


def default_model() -> Path | None:
    """The shipped demo model, used when no --model is given."""
    try:
        from .demo import demo_model_path
    except ImportError:
        return None
    return demo_model_path()


def apply_threads(threads: int | None) -> None:
    """--threads N: torch's intra-op threads (0/None keeps torch's default; see README "Threads")."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def parse_block_length(value: str | None) -> int | str | None:
    if value is None or value == AUTO:
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not an integer or 'auto'", param_hint="--block-length") from None


def parse_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of token ids", param_hint=option) from None
    if not ids:
        raise click.BadParameter("empty list of token ids", param_hint=option)
    return ids


def _options(function: Any, options: list[Any]) -> Any:
    for option in reversed(options):
        function = option(function)
    return function


def device_options(function: Any) -> Any:
    """--device and --threads, shared by generate, bench and serve."""
    return _options(function, [
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where the engine runs (auto: cuda when a GPU is visible). cuda needs the CUDA plugin "
                          "library (make plugins); a missing one is an error."),
        click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                     help="torch CPU threads (0: torch's default; on a busy machine 1 is often fastest)."),
    ])


def cache_options(function: Any) -> Any:
    """The paged KV cache: --kv-cache-memory, --page-size, --prefix-cache/--no-prefix-cache."""
    return _options(function, [
        click.option("--kv-cache-memory", default=None, metavar="SIZE",
                     help="Memory of the KV cache, e.g. 512MiB, 4GiB, 1.5GB or bytes (default: on CUDA 90% of "
                          "the device less what is used, on the CPU what max-batch-size x max-seq-len needs, at "
                          "most 20% of the RAM the weights leave; see README, KV cache)."),
        click.option("--page-size", type=click.IntRange(min=1), default=None,
                     help="Positions per KV page (default 16; a TensorRT engine keeps the one it was built for)."),
        click.option("--prefix-cache/--no-prefix-cache", "prefix_cache", default=True, show_default=True,
                     help="Keep finished requests' full pages and reuse them for requests with the same prefix."),
    ])


def engine_cache_kwargs(kv_cache_memory: str | None, page_size: int | None, prefix_cache: bool) -> dict[str, Any]:
    """The cache options as open_engine keywords (the size is parsed, so a bad one is a one-line error)."""
    from .runtime.cache.sizing import parse_size

    return {"kv_cache_memory": parse_size(kv_cache_memory) if kv_cache_memory else None,
            "page_size": page_size, "prefix_caching": prefix_cache}
