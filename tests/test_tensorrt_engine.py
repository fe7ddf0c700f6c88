"""The TensorRT engine against the torch engine. Runs only where TensorRT, a GPU and the plugin library exist.

Never run in this project's CPU CI: it skips with the reason. On a GPU machine with TensorRT 10 and
`make plugins` done, it builds an fp32 tiny engine and compares every step kind and the three modes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorrt", reason="TensorRT is not installed; the tensorrt backend runs only where TensorRT "
                                       "and an NVIDIA GPU exist")
if not torch.cuda.is_available():
    pytest.skip("TensorRT is installed but no CUDA device is visible", allow_module_level=True)

from trimode.builder.engine_build import BuildError, BuildOptions, build_engine  # noqa: E402
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint  # noqa: E402
from trimode.runtime.backends.engine_loader import open_engine  # noqa: E402
from trimode.runtime.backends.tensorrt_backend import find_plugin_library  # noqa: E402
from trimode.runtime.backends.torch_engine import CapacityError  # noqa: E402
from trimode.runtime.generate import GenerationConfig, generate  # noqa: E402

MASK = 100
PROMPTS = [list(range(1, 41)), [1, 9, 3]]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def trt_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    try:
        find_plugin_library(None)
    except BuildError as exc:
        pytest.skip(f"the BlockAttention plugin library is not built: {exc}")
    out = tmp_path_factory.mktemp("trt") / "engine"
    build_engine(tiny_checkpoint, out, BuildOptions(backend="tensorrt", dtype="fp32", max_batch_size=4,
                                                    max_seq_len=128, block_lengths=(8,)))
    return out


@pytest.fixture(scope="module")
def engines(trt_dir, tiny_checkpoint):
    return open_engine(trt_dir, device="cuda"), engine_from_checkpoint(tiny_checkpoint, device="cuda")


@pytest.mark.parametrize("lora", [False, True])
def test_every_step_kind_matches_torch(engines, lora):
    caches = [e.new_cache(2) for e in engines]
    results: list[list[torch.Tensor]] = [[], []]
    block = torch.tensor([[3] + [MASK] * 7, [7, 8] + [MASK] * 6])
    for engine, cache, out in zip(engines, caches, results, strict=True):
        out.append(engine.prefill(cache, [0, 1], PROMPTS))
        out.append(engine.decode(cache, [1, 0], [40, 41]))
        out.append(engine.draft(cache, [0, 1], block, lora=lora))
        out.append(engine.verify(cache, [1, 0], block))
        out.append(engine.decode(cache, [1], [5]))  # a batch smaller than the slots: padding rows
    for got, want in zip(*results, strict=True):
        assert rel(got, want) < 1e-3
    assert torch.equal(caches[0].lens.cpu(), caches[1].lens.cpu())


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_generation_matches_torch(engines, mode):
    config = GenerationConfig(mode=mode, max_new_tokens=16, block_length=8)
    got, want = (generate(engine, PROMPTS, config) for engine in engines)
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_block_length_not_built_is_refused(engines):
    engine, _ = engines
    cache = engine.new_cache(1)
    engine.prefill(cache, [0], [[1, 2, 3]])
    with pytest.raises(CapacityError, match="block length 4 was not built"):
        engine.draft(cache, [0], torch.tensor([[4] + [MASK] * 3]))
