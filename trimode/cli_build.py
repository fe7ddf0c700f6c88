"""`trimode build`: compile a checkpoint into an engine ahead of time."""

from __future__ import annotations

COMMANDS: list = []
