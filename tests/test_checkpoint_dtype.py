"""The checkpoint's dtype is read as transformers reads it: `dtype`, then `torch_dtype`, then the stored tensors.

transformers 4.56 and later write `"dtype"` in config.json (not `"torch_dtype"`); the config here is written by
transformers' own `save_pretrained`, so the test follows whatever key the installed version writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trimode.builder.checkpoint import load_checkpoint
from trimode.builder.engine_build import BuildOptions, build_engine
from trimode.runtime.backends.engine_loader import open_engine
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig

from .conftest import build_checkpoint

transformers = pytest.importorskip("transformers", minversion="5.0")

PROMPTS = [[1, 5, 9, 14, 3, 30], [1, 40, 41, 2]]


def rewrite_config_with_transformers(checkpoint: Path, dtype: torch.dtype | None) -> dict:
    """config.json as transformers' save_pretrained writes it (model_type and every field kept)."""
    data = json.loads((checkpoint / "config.json").read_text())
    for key in ("torch_dtype", "dtype", "model_type"):
        data.pop(key, None)

    class NemotronLabsDiffusionConfig(transformers.PretrainedConfig):
        model_type = "nemotron_labs_diffusion"

    transformers.utils.logging.set_verbosity_error()
    NemotronLabsDiffusionConfig(**data, dtype=dtype).save_pretrained(checkpoint)
    return json.loads((checkpoint / "config.json").read_text())


@pytest.fixture(scope="module")
def fp32_saved_by_transformers(tmp_path_factory) -> Path:
    root = build_checkpoint(tmp_path_factory.mktemp("hf_fp32") / "ckpt", dtype="fp32", seed=3)
    written = rewrite_config_with_transformers(root, torch.float32)
    assert written.get("dtype") == "float32" and "torch_dtype" not in written, written  # the case of the issue
    return root


def test_a_transformers_fp32_config_serves_fp32_everywhere(fp32_saved_by_transformers, tmp_path):
    checkpoint = load_checkpoint(fp32_saved_by_transformers)
    assert checkpoint.default_dtype == "fp32" and checkpoint.dtype_source == "config.json"
    assert open_engine(fp32_saved_by_transformers).dtype == torch.float32  # generate, serve, the Python API
    engine_dir = tmp_path / "engine"
    build_engine(fp32_saved_by_transformers, engine_dir, BuildOptions(backend="torch"))
    assert json.loads((engine_dir / "manifest.json").read_text())["build"]["dtype"] == "fp32"
    from trimode.cli_checkpoint import checkpoint_summary

    assert checkpoint_summary(fp32_saved_by_transformers)["dtype"] == "fp32"


def test_default_options_give_transformers_greedy_tokens_in_every_mode(fp32_saved_by_transformers):
    from trimode.runtime.bench.peers import HFGenerate

    hf = HFGenerate(fp32_saved_by_transformers, torch.float32)
    engine = open_engine(fp32_saved_by_transformers)  # dtype "auto"
    for prompt in PROMPTS:
        expected = hf(prompt, 12)
        for mode, block in (("ar", 4), ("spec", 4), ("quad", 3)):
            got = generate(engine, [prompt], GenerationConfig(mode=mode, max_new_tokens=12, block_length=block))
            assert got[0].tokens == expected[: len(got[0].tokens)], (mode, prompt)


@pytest.mark.parametrize("stored", ["bf16", "fp32"])
def test_without_a_declared_dtype_the_stored_tensors_decide(tmp_path, stored):
    root = build_checkpoint(tmp_path / "ckpt", dtype=stored)
    written = rewrite_config_with_transformers(root, None)
    assert "dtype" not in written and "torch_dtype" not in written
    checkpoint = load_checkpoint(root)
    assert checkpoint.default_dtype == stored and checkpoint.dtype_source == "stored tensors"
    expected = torch.bfloat16 if stored == "bf16" else torch.float32
    assert open_engine(root).dtype == expected


def test_dtype_wins_over_torch_dtype(tmp_path):
    root = build_checkpoint(tmp_path / "ckpt", dtype="fp32")
    data = json.loads((root / "config.json").read_text())
    data.update(dtype="float32", torch_dtype="bfloat16")
    (root / "config.json").write_text(json.dumps(data))
    assert load_checkpoint(root).default_dtype == "fp32"


def test_an_unknown_declared_dtype_is_a_clear_error(tmp_path):
    from trimode.builder.errors import CheckpointError

    root = build_checkpoint(tmp_path / "ckpt", dtype="fp32")
    data = json.loads((root / "config.json").read_text())
    data["dtype"] = "int7"
    (root / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="config field 'dtype'"):
        load_checkpoint(root)
