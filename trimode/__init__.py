"""trimode: an ahead-of-time compiled inference engine for Nemotron-Labs Diffusion (tri-mode) models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]

if TYPE_CHECKING:
    from .api import LLM, RequestOutput, SamplingParams


def __getattr__(name: str) -> Any:
    """The Python API (trimode/api.py), imported on first use so that `import trimode` stays light."""
    if name in ("LLM", "SamplingParams", "RequestOutput"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'trimode' has no attribute {name!r}")
