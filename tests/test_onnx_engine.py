"""The ONNX engine (one exported step graph on onnxruntime) against the torch engine, and the graph's contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from trimode.builder.checkpoint import load_checkpoint
from trimode.builder.engine_build import BuildOptions, build_engine
from trimode.builder.onnx_export import ATTENTION_OP, ORT_DOMAIN, TRT_DOMAIN, AttentionNode, export_onnx
from trimode.cli import cli
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.engine_loader import open_engine
from trimode.runtime.backends.onnx_engine import OnnxEngine
from trimode.runtime.generate import GenerationConfig, generate

# 40 tokens: positions cross the test config's YaRN window (32), so the graph's query scale is exercised.
PROMPTS = [list(range(1, 41)), [1, 9, 3]]
MASK = 100


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def onnx_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "engine"
    build_engine(tiny_checkpoint, out, BuildOptions(backend="onnx", dtype="fp32", max_batch_size=4, max_seq_len=128,
                                                    block_lengths=(8,)))
    return out


@pytest.fixture(scope="module")
def engines(onnx_dir, tiny_checkpoint):
    return open_engine(onnx_dir), engine_from_checkpoint(tiny_checkpoint)


def test_opens_as_onnx_engine(engines, onnx_dir):
    engine, _ = engines
    assert isinstance(engine, OnnxEngine)
    assert (engine.max_batch_size, engine.max_seq_len, engine.has_lora) == (4, 128, True)
    assert engine.tokenizer_path == onnx_dir / "tokenizer.json"


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
        out.append(engine.decode(cache, [1], [5]))
    for name, got, want in zip(["prefill", "decode", "draft", "verify", "decode after verify"], *results,
                               strict=True):
        assert got.shape == want.shape, name
        assert rel(got, want) < 1e-4, name
    assert torch.equal(caches[0].lens, caches[1].lens)
    used = int(caches[1].lens.max())
    assert rel(caches[0].k[:, :, :used], caches[1].k[:, :, :used]) < 1e-5
    assert rel(caches[0].v[:, :, :used], caches[1].v[:, :, :used]) < 1e-5


def test_lora_changes_the_draft(engines):
    engine, _ = engines
    cache = engine.new_cache(1)
    engine.prefill(cache, [0], [PROMPTS[1]])
    block = torch.tensor([[4] + [MASK] * 7])
    assert rel(engine.draft(cache, [0], block, lora=True), engine.draft(cache, [0], block, lora=False)) > 1e-3


def test_opened_without_lora(onnx_dir):
    engine = open_engine(onnx_dir, use_lora=False)
    assert not engine.has_lora
    cache = engine.new_cache(1)
    engine.prefill(cache, [0], [[1, 2, 3]])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        engine.draft(cache, [0], torch.tensor([[4, MASK]]), lora=True)


def test_draft_never_writes_the_cache(engines):
    engine, _ = engines
    cache = engine.new_cache(1)
    engine.prefill(cache, [0], [PROMPTS[0]])
    k, v, lens = cache.k.clone(), cache.v.clone(), cache.lens.clone()
    engine.draft(cache, [0], torch.tensor([[1] + [MASK] * 7]), lora=True)
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v) and torch.equal(cache.lens, lens)


@pytest.mark.parametrize("mode,extra", [("ar", {}), ("diffusion", {}), ("diffusion", {"threshold": 0.3}),
                                        ("spec", {}), ("spec", {"use_lora": False})])
def test_generation_matches_torch(engines, mode, extra):
    config = GenerationConfig(mode=mode, max_new_tokens=16, block_length=8, **extra)
    got, want = (generate(engine, PROMPTS, config) for engine in engines)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [r.forwards for r in got] == [r.forwards for r in want]


def test_graph_contract(onnx_dir, tiny_checkpoint):
    """One graph, one BlockAttention node per layer with the 8 inputs and 4 attributes the plugin expects."""
    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    config = load_checkpoint(tiny_checkpoint).config
    nodes = [n for n in model.graph.node if n.op_type == ATTENTION_OP]
    assert len(nodes) == config.num_hidden_layers
    for layer, node in enumerate(nodes):
        assert node.domain == ORT_DOMAIN
        assert list(node.input)[3:] == [f"k_cache.{layer}", f"v_cache.{layer}", "cache_lens", "chunk_lens",
                                        "mask_kind"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "scale": 0.25}
        assert len(node.output) == 1
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert inputs["mask_kind"].elem_type == onnx.TensorProto.INT32
    assert [d.dim_value for d in inputs["mask_kind"].shape.dim] == [1]
    assert inputs["cache_lens"].elem_type == inputs["chunk_lens"].elem_type == onnx.TensorProto.INT32
    assert inputs["input_ids"].elem_type == inputs["positions"].elem_type == onnx.TensorProto.INT64
    assert "use_lora" in inputs
    outputs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert list(outputs) == ["logits", "new_k", "new_v"] and outputs["logits"].elem_type == onnx.TensorProto.FLOAT
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if t.name == "embed")


def test_tensorrt_form_of_the_export(tiny_checkpoint, tmp_path):
    """The TensorRT export names the plugin for the ONNX parser's registry lookup; bf16 is a valid export."""
    checkpoint = load_checkpoint(tiny_checkpoint, with_lora=False)
    files = export_onnx(tmp_path, checkpoint, torch.bfloat16, None, AttentionNode.for_tensorrt())
    assert sorted(files) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "model.onnx"))
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == ATTENTION_OP)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == TRT_DOMAIN and attrs["plugin_namespace"] == b"trimode" and attrs["plugin_version"] == b"1"
    assert "use_lora" not in {i.name for i in model.graph.input}
    assert {t.data_type for t in model.graph.initializer if t.name.startswith("layers.")} == {
        onnx.TensorProto.BFLOAT16}


def test_cli_build_and_generate_onnx(tiny_checkpoint, tmp_path):
    out = tmp_path / "engine"
    result = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "-o", str(out), "--backend", "onnx",
                                      "--max-seq-len", "128", "--block-length", "8"])
    assert result.exit_code == 0, result.output
    assert "built onnx engine" in result.output
    proc = subprocess.run([sys.executable, "-m", "trimode", "generate", "--model", str(out), "--mode", "diffusion",
                           "--prompt-ids", "1,5,6,7", "--prompt-ids", "1,9", "--max-new-tokens", "16",
                           "--block-length", "8", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = generate(engine_from_checkpoint(tiny_checkpoint), [[1, 5, 6, 7], [1, 9]],
                    GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=8))
    assert [o["tokens"] for o in json.loads(proc.stdout)["outputs"]] == [r.tokens for r in want]
