"""The TensorRT backend. Its profile planning runs everywhere; the engine itself only where TensorRT, a GPU and
the plugin library exist.

The engine tests never run in this project's CPU CI: they skip with the reason. On a GPU machine with TensorRT 10
and `make -C plugins tensorrt` done, they build an fp32 tiny engine and compare a mixed step (every mask kind)
and every mode with the torch engine, and check that a block length the plan was not built for is refused.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

from trimode.builder.checkpoint import load_checkpoint
from trimode.builder.engine_build import BuildOptions, build_engine
from trimode.builder.quantization import Quantization
from trimode.plugins.masks import BIDIRECTIONAL, PREFIX_BLOCK, QUAD
from trimode.runtime.backends.cuda_graphs import Bucketing
from trimode.runtime.backends.graph_steps import (
    BLOCK,
    DECODE,
    PREFILL,
    choose_profile,
    optimization_profiles,
    profile_input_shapes,
)
from trimode.runtime.backends.step import ChunkRow, StepBatch
from trimode.runtime.errors import CapacityError
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig, RequestError

from .step_helpers import Seqs


def tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return (f"TensorRT is not installed ({exc}); the tensorrt backend runs only where TensorRT and an NVIDIA GPU "
                "exist")
    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA device is visible"
    return None


needs_tensorrt = pytest.mark.skipif(tensorrt_missing() is not None, reason=str(tensorrt_missing()))
MASK = 100
PROMPTS = [list(range(1, 41)), [1, 9, 3]]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# -- profile planning (no TensorRT needed) -----------------------------------------------------------------
def test_profiles_are_sizes_not_step_kinds():
    profiles = optimization_profiles(max_batch_size=8, max_step_tokens=2048, block_lengths=(8, 32))
    assert [p["name"] for p in profiles] == [DECODE, BLOCK, PREFILL]
    assert all(p["rows"] == (1, 9, 9) for p in profiles)  # real rows + the padding row
    assert profiles[0]["tokens"] == profiles[0]["logits"] == (1, 8, 8)
    assert profiles[1]["tokens"] == (1, 256, 256)  # 8 rows of the longest block
    assert profiles[2]["tokens"][2] == profiles[2]["logits"][2] == 2048


def test_profile_input_shapes(tiny_checkpoint):
    config = load_checkpoint(tiny_checkpoint).config
    ranges = optimization_profiles(4, 512, (8,))[1]
    shapes = profile_input_shapes(config, ranges, num_pages=32, page_size=16, max_pages=8)
    assert shapes["tokens"] == shapes["positions"] == shapes["lora"] == [[1], [32], [32]]
    assert shapes["cu_seqlens"] == [[2], [6], [6]]
    assert shapes["mask_kind"] == shapes["mask_param"] == shapes["cache_lens"] == [[1], [5], [5]]
    assert shapes["page_table"] == [[1, 8], [5, 8], [5, 8]]  # the padding row included; one column per page
    assert shapes["logit_index"] == [[1], [32], [32]]
    assert shapes["k_cache.0"] == shapes["v_cache.1"] == [[1, 16, 2, 16], [32, 16, 2, 16], [32, 16, 2, 16]]


def test_every_bucket_has_a_profile():
    """Every bucket a step can fall in (rows + padding row, token and logit buckets) fits some profile."""
    profiles = optimization_profiles(max_batch_size=8, max_step_tokens=2048, block_lengths=(32,))
    bucketing = Bucketing(8, 2048, 4096)
    for rows in bucketing.rows:
        for tokens in bucketing.tokens:
            for logits in (b for b in bucketing.tokens if b <= tokens):
                choose_profile(profiles, tokens, rows + 1, logits)
    decode = StepBatch.from_rows([ChunkRow([1], write=True, logit_offsets=[0]) for _ in range(8)],
                                 [[s] for s in range(8)], [0] * 8, 16)
    key = bucketing.key(decode)
    assert choose_profile(profiles, key.tokens, key.rows + 1, key.logits) == DECODE
    block = StepBatch.from_rows([ChunkRow([1] * 32, mask_kind=BIDIRECTIONAL, logit_offsets=list(range(32)))
                                 for _ in range(4)], [[s] for s in range(4)], [3] * 4, 16)
    key = bucketing.key(block)
    assert choose_profile(profiles, key.tokens, key.rows + 1, key.logits) == BLOCK
    with pytest.raises(CapacityError, match="beyond every optimization profile"):
        choose_profile(profiles, 4096, 2, 1)


def test_backend_module_resolves_its_names_against_a_stub(monkeypatch):
    """Without TensorRT the module cannot run, but every name it takes from the rest of trimode must exist:
    import it against a stand-in `tensorrt` module (then forget it again)."""
    if tensorrt_missing() is None:
        pytest.skip("TensorRT is installed: the real engine tests cover the module")
    stub = types.ModuleType("tensorrt")
    stub.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})
    stub.IExecutionContext = object
    stub.__version__ = "stub"
    name = "trimode.runtime.backends.tensorrt_backend"
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        module = importlib.import_module(name)
        spec = module.TensorRTBuildSpec(torch.float32, 4, 128, (8,))
        assert spec.max_step_tokens == module.DEFAULT_MAX_STEP_TOKENS
        assert spec.page_size == 16 and spec.table_pages == 8 and spec.max_kv_pages == 32
        library = Path(module.__file__).resolve().parents[2] / "plugins" / "build" / module.PLUGIN_LIBRARY
        if not library.is_file():
            with pytest.raises(module.TensorRTBuildError, match=str(library)):
                module.find_plugin_library(None)
        assert issubclass(module.TensorRTBuildError, ValueError)
        fp8 = module.TensorRTBuildSpec(torch.bfloat16, 4, 128, (8,), quantization=Quantization.parse("fp8"))
        assert module.onnx_opset(fp8.quantization) == 19 and module.onnx_opset(spec.quantization) == 17
    finally:
        sys.modules.pop(name, None)


# -- the engine (TensorRT and a GPU) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    from trimode.runtime.backends.tensorrt_backend import TensorRTBuildError, find_plugin_library

    try:
        find_plugin_library(None)
    except TensorRTBuildError as exc:
        pytest.skip(f"the BlockAttention plugin library is not built: {exc}")
    out = tmp_path_factory.mktemp("trt") / "engine"
    build_engine(tiny_checkpoint, out, BuildOptions(backend="tensorrt", dtype="fp32", max_batch_size=8,
                                                    max_seq_len=128, block_lengths=(8,)))
    return out


@pytest.fixture(scope="module")
def engines(trt_dir, tiny_checkpoint):
    from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
    from trimode.runtime.backends.engine_loader import open_engine

    return open_engine(trt_dir, device="cuda"), engine_from_checkpoint(tiny_checkpoint, device="cuda",
                                                                       max_batch_size=8, max_seq_len=128)


@needs_tensorrt
@pytest.mark.parametrize("lora", [False, True])
def test_mixed_rows_match_torch(engines, lora):
    groups = [Seqs(e, 5, cache=e.cache, shuffle=3) for e in engines]
    results: list[list[torch.Tensor]] = [[], []]
    for group, out in zip(groups, results, strict=True):
        out.append(group.step(list(range(4)), [ChunkRow(PROMPTS[s % 2] + [s], write=True, logit_offsets=[0])
                                               for s in range(4)]))
        past = group.lengths[2]
        out.append(group.step(list(range(5)), [
            ChunkRow([40], write=True, logit_offsets=[0]),
            ChunkRow([3] + [MASK] * 7, mask_kind=BIDIRECTIONAL, lora=lora, logit_offsets=list(range(8))),
            ChunkRow([5, MASK, MASK, 6, MASK, MASK], mask_kind=QUAD, mask_param=2, write=True,
                     logit_offsets=list(range(6)), positions=[past + j + o for j in range(2) for o in range(3)]),
            ChunkRow([9, 8, 7, MASK, MASK], mask_kind=PREFIX_BLOCK, mask_param=2, write=True, logit_offsets=[4]),
            ChunkRow([1, 2, 3], write=True, logit_offsets=[2])]))
    for got, want in zip(*results, strict=True):
        assert rel(got, want) < 1e-3
    assert groups[0].lengths == groups[1].lengths
    for group in groups:
        for table in group.tables:
            group.cache.pages.release(table)


@needs_tensorrt
@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec", "quad", "infill"])
def test_generation_matches_torch(engines, mode):
    extra = {"suffix": (7, 8)} if mode == "infill" else {}
    config = GenerationConfig(mode=mode, max_new_tokens=16, block_length=8, **extra)
    got, want = (generate(engine, PROMPTS, config) for engine in engines)
    assert [r.tokens for r in got] == [r.tokens for r in want]


@needs_tensorrt
def test_block_length_not_built_is_refused(engines):
    engine, _ = engines
    assert engine.limits.block_lengths == (8,)
    with pytest.raises(CapacityError, match="block length 4 is not one this engine was built for"):
        engine.limits.check_block_length(4)
    with pytest.raises(RequestError, match="block length 4 is not one this engine was built for"):
        generate(engine, PROMPTS, GenerationConfig(mode="spec", max_new_tokens=8, block_length=4))


@needs_tensorrt
def test_fp8_plan_matches_the_torch_fp8_engine(trt_dir, tiny_checkpoint, tmp_path):
    """`--backend tensorrt --quantize fp8` (bf16): TensorRT's plan over FP8 weights behind DequantizeLinear gives
    the logits of the torch engine built with the same scheme, on the same GPU, within bf16 rounding."""
    from trimode.runtime.backends.engine_loader import open_engine

    options = dict(dtype="bf16", max_batch_size=8, max_seq_len=128, block_lengths=(8,), quantize="fp8")
    build_engine(tiny_checkpoint, tmp_path / "trt", BuildOptions(backend="tensorrt", **options))
    build_engine(tiny_checkpoint, tmp_path / "torch", BuildOptions(**options))
    plan, reference = open_engine(tmp_path / "trt", device="cuda"), open_engine(tmp_path / "torch", device="cuda")
    row = ChunkRow(list(range(3, 40)), write=True, logit_offsets=list(range(37)))
    got, want = Seqs(plan, 1).step([0], [row]).float(), Seqs(reference, 1).step([0], [row]).float()
    assert float((got - want).norm() / want.norm()) < 5e-2
