"""The demo model shipped with the package (trained by examples/train_demo/), the default `--model`."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def demo_model_path() -> Path | None:
    """The demo checkpoint's directory, or None when this installation does not carry it."""
    return DEMO_MODEL_DIR if (DEMO_MODEL_DIR / "config.json").is_file() else None
