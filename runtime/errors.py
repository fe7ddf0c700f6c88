"""The errors that mean "this input cannot be served as asked" - shown to users as one line, never a traceback.

Kept in a module with no heavy imports, so the CLI can name them (and print `--help`) without loading torch.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A generation request that cannot be served as asked (bad argument, too long, too large)."""


class CapacityError(ValueError):
    """A request or a step does not fit the shapes the engine serves (sequence length, batch, tokens, memory)."""


class DeviceError(ValueError):
    """The asked-for device cannot be used here (no GPU, or no CUDA plugin library)."""


class OverloadedError(RuntimeError):
    """The server's queue is full (`--max-queued-jobs`): retry later. HTTP 429, Triton UNAVAILABLE."""


class ShuttingDownError(OverloadedError):
    """The server is draining for shutdown and takes no new work. HTTP 503, Triton UNAVAILABLE."""
