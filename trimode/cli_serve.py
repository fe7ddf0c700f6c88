"""`trimode triton-repo` and `trimode serve`: Triton Inference Server."""

from __future__ import annotations

COMMANDS: list = []
