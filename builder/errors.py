"""The one exception type users see from loading and building.

Loader and builder problems are the user's input being wrong, not a bug: the CLI prints the message on one
line and exits with status 2 instead of showing a traceback from deep inside safetensors or torch.
"""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint, adapter or engine on disk is not usable; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
