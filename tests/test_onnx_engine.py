"""The ONNX engine (one exported packed step graph on onnxruntime) vs the torch engine, and the graph contract."""

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
from trimode.plugins.masks import BIDIRECTIONAL, PREFIX_BLOCK, QUAD
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.engine_loader import open_engine
from trimode.runtime.backends.onnx_engine import OnnxEngine
from trimode.runtime.errors import CapacityError
from trimode.runtime.generate import generate

# 40 tokens: positions cross the test config's YaRN window (32), so the graph's query scale is exercised.
from trimode.runtime.request import GenerationConfig

from .step_helpers import Seqs, row

PROMPTS = [list(range(1, 41)), [1, 9, 3]]
MASK = 100


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def onnx_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "engine"
    build_engine(tiny_checkpoint, out, BuildOptions(backend="onnx", dtype="fp32", max_batch_size=8, max_seq_len=128,
                                                    block_lengths=(8,)))
    return out


@pytest.fixture(scope="module")
def engines(onnx_dir, tiny_checkpoint):
    return open_engine(onnx_dir), engine_from_checkpoint(tiny_checkpoint, max_batch_size=8, max_seq_len=128)


def step(engine, cache: Seqs, rows) -> torch.Tensor:
    return cache.run(rows)


def prompts_step(num: int) -> list:
    """Prefill rows of different lengths (the first crosses the YaRN window), last-token logits."""
    rows = []
    for slot in range(num):
        tokens = PROMPTS[0] if slot == 0 else [(7 * slot + i) % 90 + 1 for i in range(3 + 4 * slot)]
        rows.append(row(slot, tokens, write=True, logit_offsets=[len(tokens) - 1]))
    return rows


def mixed_step(cache, lora: bool) -> list:
    """One step with a fresh prefill row, a decode row, a draft row (LoRA), a quad row and a prefix_block row."""
    length = 2
    past = cache.lengths[3]
    quad_positions = [past + j + o for j in range(length) for o in range(length + 1)]
    return [
        row(5, [11, 12, 13, 14, 15], write=True, logit_offsets=[4]),
        row(1, [40], write=True, logit_offsets=[0]),
        row(2, [3] + [MASK] * 7, mask_kind=BIDIRECTIONAL, lora=lora, logit_offsets=list(range(8))),
        row(3, [5, MASK, MASK, 6, MASK, MASK], mask_kind=QUAD, mask_param=length, write=True,
                 logit_offsets=list(range(6)), positions=quad_positions),
        row(4, [9, 8, 7, MASK, MASK, MASK], mask_kind=PREFIX_BLOCK, mask_param=3, write=True,
                 logit_offsets=list(range(6))),
        row(0, [41, 42, 43], write=True, logit_offsets=[0, 1, 2]),  # a verify-like causal block
    ]


def test_opens_as_onnx_engine(engines, onnx_dir):
    engine, _ = engines
    assert isinstance(engine, OnnxEngine)
    limits = engine.limits
    assert (limits.max_batch_size, limits.max_seq_len, limits.block_lengths, engine.has_lora) == (8, 128, (), True)
    assert engine.tokenizer_path == onnx_dir / "tokenizer.json"


@pytest.mark.parametrize("lora", [False, True])
def test_mixed_rows_match_torch(engines, lora):
    """Every mask kind in one step, against the torch engine: logits, written K/V and lengths."""
    caches = [Seqs(e, 6, shuffle=6) for e in engines]
    results: list[list[torch.Tensor]] = [[], []]
    for engine, cache, out in zip(engines, caches, results, strict=True):
        out.append(step(engine, cache, prompts_step(5)))
        out.append(step(engine, cache, mixed_step(cache, lora)))
        out.append(step(engine, cache, [row(s, [50 + s], write=True, logit_offsets=[0]) for s in (4, 3, 5)]))
    for name, got, want in zip(["prefill", "mixed", "decode after mixed"], *results, strict=True):
        assert got.shape == want.shape, name
        assert rel(got, want) < 1e-4, name
    assert caches[0].lengths == caches[1].lengths == [43, 8, 11, 18, 23, 6]
    for seq in range(6):
        for got, want in zip(caches[0].keys(seq), caches[1].keys(seq), strict=True):
            assert rel(got, want) < 1e-5


def test_bidirectional_rows_never_write(engines):
    engine, _ = engines
    cache = Seqs(engine, 2, shuffle=2)
    step(engine, cache, prompts_step(2))
    k, v, lengths = cache.cache.k.clone(), cache.cache.v.clone(), list(cache.lengths)
    step(engine, cache, [row(0, [1] + [MASK] * 7, mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=[0]),
                         row(1, [2] + [MASK] * 3, mask_kind=BIDIRECTIONAL, logit_offsets=[3])])
    assert torch.equal(cache.cache.k, k) and torch.equal(cache.cache.v, v) and cache.lengths == lengths


def test_quad_row_writes_only_its_drafts(engines):
    """The graph returns every token's K/V; only the d_j go into the cache, at p + j."""
    engine, reference = engines
    caches = [Seqs(e, 1, shuffle=1) for e in engines]
    for e, cache in zip(engines, caches, strict=True):
        step(e, cache, [row(0, PROMPTS[1], write=True, logit_offsets=[2])])
        step(e, cache, [row(0, [4, MASK, MASK, MASK, 5, MASK, MASK, MASK, 6, MASK, MASK, MASK], mask_kind=QUAD,
                                 mask_param=3, write=True, logit_offsets=[0],
                                 positions=[3 + j + o for j in range(3) for o in range(4)])])
    assert caches[0].lengths == caches[1].lengths == [6]
    assert rel(caches[0].keys(0)[0], caches[1].keys(0)[0]) < 1e-5
    # the drafts' K/V equal a causal pass over them (quad d_j sees the cache and d_0..d_j)
    causal = Seqs(reference, 1, shuffle=1)
    step(reference, causal, [row(0, PROMPTS[1] + [4, 5, 6], write=True, logit_offsets=[5])])
    assert rel(caches[0].keys(0)[0], causal.keys(0)[0]) < 1e-5


def test_lora_changes_the_draft(engines):
    engine, _ = engines
    cache = Seqs(engine, 1, shuffle=1)
    step(engine, cache, [row(0, PROMPTS[1], write=True, logit_offsets=[2])])
    rows = [row(0, [4] + [MASK] * 7, mask_kind=BIDIRECTIONAL, logit_offsets=list(range(8)))]
    plain = step(engine, cache, rows)
    rows[0][1].lora = True
    assert rel(step(engine, cache, rows), plain) > 1e-3


def test_opened_without_lora(onnx_dir):
    engine = open_engine(onnx_dir, use_lora=False)
    assert not engine.has_lora
    cache = Seqs(engine, 1, shuffle=1)
    step(engine, cache, [row(0, [1, 2, 3], write=True, logit_offsets=[2])])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        step(engine, cache, [row(0, [4, MASK], mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=[0])])


def test_capacity(engines):
    engine, _ = engines
    with pytest.raises(CapacityError, match="maximum batch size"):
        step(engine, Seqs(engine, 9), [row(s, [1], write=True) for s in range(9)])
    cache = Seqs(engine, 1, shuffle=1)
    with pytest.raises(CapacityError, match="maximum sequence length 128"):
        step(engine, cache, [row(0, [1] * 129, write=True, logit_offsets=[0])])
    assert cache.lengths == [0]


MODES = [("ar", {}), ("diffusion", {}), ("diffusion", {"threshold": 0.3}), ("spec", {}), ("spec", {"use_lora": False}),
         ("spec", {"threshold": 0.5}), ("quad", {"block_length": 4}), ("infill", {"suffix": (7, 8, 9)})]


@pytest.mark.parametrize("mode,extra", MODES)
def test_generation_matches_torch(engines, mode, extra):
    config = GenerationConfig(**{"mode": mode, "max_new_tokens": 16, "block_length": 8, **extra})
    got, want = (generate(engine, PROMPTS, config) for engine in engines)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [r.forwards for r in got] == [r.forwards for r in want]


def test_mixed_modes_in_one_generate(engines):
    """Requests of every mode share the scheduler's steps (rows of all kinds in one graph run)."""
    configs = [GenerationConfig(mode=m, max_new_tokens=8, block_length=4, **kw) for m, kw in
               [("ar", {}), ("spec", {}), ("quad", {}), ("diffusion", {}), ("infill", {"suffix": (5, 6)})]]
    prompts = [PROMPTS[0], PROMPTS[1], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
    got, want = (generate(engine, prompts, configs) for engine in engines)
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_graph_contract(onnx_dir, tiny_checkpoint):
    """One graph, one BlockAttention node per layer with the 10 inputs and 4 attributes the plugin expects."""
    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    config = load_checkpoint(tiny_checkpoint).config
    nodes = [n for n in model.graph.node if n.op_type == ATTENTION_OP]
    assert len(nodes) == config.num_hidden_layers
    for layer, node in enumerate(nodes):
        assert node.domain == ORT_DOMAIN
        assert list(node.input)[3:] == [f"k_cache.{layer}", f"v_cache.{layer}", "cu_seqlens", "page_table",
                                        "cache_lens", "mask_kind", "mask_param"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "scale": 0.25}
        assert len(node.output) == 1
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs)[:9] == ["tokens", "positions", "cu_seqlens", "page_table", "cache_lens", "mask_kind",
                                "mask_param", "lora", "logit_index"]
    dims = {name: [d.dim_param or d.dim_value for d in t.shape.dim] for name, t in inputs.items()}
    assert dims["tokens"] == dims["positions"] == dims["lora"] == ["tokens"]
    assert dims["cu_seqlens"] == ["rows_plus_one"] and dims["mask_kind"] == ["rows"]
    assert dims["logit_index"] == ["logits"] and dims["k_cache.0"] == ["cache_pages", "page_size", 2, 16]
    assert dims["page_table"] == ["rows", "table_pages"]
    for name in ("cu_seqlens", "page_table", "cache_lens", "mask_kind", "mask_param"):
        assert inputs[name].elem_type == onnx.TensorProto.INT32, name
    assert inputs["tokens"].elem_type == inputs["positions"].elem_type == onnx.TensorProto.INT64
    assert inputs["lora"].elem_type == onnx.TensorProto.BOOL
    outputs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert list(outputs) == ["logits", "new_k", "new_v"] and outputs["logits"].elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in outputs["logits"].shape.dim] == ["logits", config.vocab_size]
    assert [d.dim_param or d.dim_value for d in outputs["new_k"].shape.dim] == [config.num_hidden_layers, "tokens",
                                                                                2, 16]
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
    assert len(node.input) == 10
    assert "lora" not in {i.name for i in model.graph.input}
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
