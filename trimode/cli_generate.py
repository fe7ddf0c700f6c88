"""`trimode generate`: run the three generation modes."""

from __future__ import annotations

COMMANDS: list = []
