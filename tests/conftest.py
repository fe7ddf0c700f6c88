"""Shared fixtures: small random checkpoints in the real format, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trimode.builder.presets import PRESETS
from trimode.builder.random_checkpoint import make_config, write_random_checkpoint

# Smaller than `tiny` in YaRN's original window so short prompts already cross it.
TEST_OVERRIDES = {"rope_parameters": {**PRESETS["tiny"]["rope_parameters"], "original_max_position_embeddings": 32}}


def build_checkpoint(root: Path, dtype: str = "fp32", seed: int = 0, lora_rank: int | None = 8,
                     **overrides) -> Path:
    config = make_config(PRESETS["tiny"], dtype, {**TEST_OVERRIDES, **overrides})
    return write_random_checkpoint(root, config, seed=seed, dtype=dtype, lora_rank=lora_rank)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 tiny checkpoint with a LoRA adapter and a tokenizer."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_checkpoint_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny_bf16") / "ckpt", dtype="bf16", seed=1)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on the project's shared 2-core machines more threads only fight each other
    (a test file went from 789 s to 7 s). Results do not depend on it; timings are never asserted."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
