"""`trimode bench`: measure the modes side by side."""

from __future__ import annotations

COMMANDS: list = []
