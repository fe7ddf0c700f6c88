"""Quantized engines (`trimode build --quantize`): kernels against the scheme's definition, every row kind,
mode exactness on the quantized model, manifest versioning, build checks and the demo model's loss."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trimode.builder.engine_build import BuildError, BuildOptions, build_engine
from trimode.builder.errors import CheckpointError
from trimode.builder.manifest import MANIFEST_FILE, read_manifest
from trimode.builder.quantization import Quantization
from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD
from trimode.runtime.backends.engine_loader import open_engine
from trimode.runtime.backends.step import ChunkRow
from trimode.runtime.backends.torch_engine import TorchEngine
from trimode.runtime.generate import generate
from trimode.runtime.model import quant
from trimode.runtime.model.network import Transformer
from trimode.runtime.model.quant import QuantizedLinear
from trimode.runtime.request import GenerationConfig

from .step_helpers import Seqs

# relative to the largest |output|: fp32 sums in another order; bf16/fp16 round the output once more
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
SCHEMES = [("int8", None), ("int4", 32), ("fp8", None)]
ROW_TOKENS = {"decode": 1, "batch-8 decode": 8, "verify L16": 16, "quad L4": 20, "prefill": 77}


def layer(scheme: str, group: int | None, dtype: torch.dtype, n: int = 96, k: int = 128, seed: int = 0):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    q = Quantization.parse(scheme, group)
    stored = {name.rsplit(".", 1)[1]: t for name, t in q.quantize("w", weight, dtype).items()}
    return weight, QuantizedLinear(q, stored, dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


# -- kernels ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("rows", ROW_TOKENS.values(), ids=ROW_TOKENS.keys())
def test_every_kernel_equals_dequantize_then_matmul(scheme, group, dtype, rows):
    """Each path a call may take (packed weight-only kernel, tiled dequantize) computes x @ dequantize().T."""
    _, lin = layer(scheme, group, dtype)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).to(dtype)
    ref = x.double() @ lin.dequantize().double().t()
    paths = {"dequantized": lin._dequantized_mm}
    if scheme != "fp8":
        paths["packed"] = lin._packed_mm
    for name, path in paths.items():
        assert relative_error(path(x), ref) < TOLERANCE[dtype], name
    assert relative_error(lin(x[None]).view(rows, -1), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_quantization_error_is_what_the_scheme_allows(scheme, group):
    """Dequantized weights sit within half a step of the originals (int8/int4), fp8 within its 3-bit mantissa."""
    weight, lin = layer(scheme, group, torch.float32)
    error = (lin.dequantize() - weight).abs()
    if scheme == "int8":
        step = weight.abs().amax(dim=1, keepdim=True) / 127
        assert bool((error <= step / 2 + 1e-7).all())
    elif scheme == "int4":
        g = weight.view(weight.shape[0], -1, group)
        step = ((g.amax(dim=2) - g.amin(dim=2)) / 15).repeat_interleave(group, dim=1)
        assert bool((error <= step / 2 + 1e-6).all())
    else:
        assert bool((error <= weight.abs() * 2 ** -4 + weight.abs().amax() * 2 ** -9).all())
    assert float(error.max()) > 0  # it really is quantized


def test_int4_codes_round_trip_through_the_stored_nibbles():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert torch.equal(quant.unpack_int4(packed), codes)


def test_kernel_choice_follows_the_measured_crossover(monkeypatch):
    _, lin = layer("int8", None, torch.bfloat16)
    calls = []
    for path in ("packed", "dequantized"):
        monkeypatch.setattr(lin, f"_{path}_mm",
                            lambda x, path=path: calls.append((path, x.shape[0])) or x.new_zeros(x.shape[0], 96))
    limit = quant.packed_max_tokens("int8", torch.bfloat16)
    lin(torch.zeros(1, limit, 128, dtype=torch.bfloat16))
    lin(torch.zeros(1, limit + 1, 128, dtype=torch.bfloat16))
    assert calls == [("packed", limit), ("dequantized", limit + 1)]


# -- engines ------------------------------------------------------------------------------------------------
def quantized_build(checkpoint: Path, out: Path, scheme: str, group: int | None = None, **kw) -> Path:
    build_engine(checkpoint, out, BuildOptions(quantize=scheme, group_size=group, max_seq_len=512, **kw))
    return out


@pytest.fixture(scope="module", params=SCHEMES, ids=[s for s, _ in SCHEMES])
def quantized_engine_dir(request, tiny_checkpoint, tmp_path_factory) -> Path:
    scheme, group = request.param
    return quantized_build(tiny_checkpoint, tmp_path_factory.mktemp(scheme) / "engine", scheme, group)


def reference_of(engine: TorchEngine) -> TorchEngine:
    """The same model with every quantized matrix replaced by its dequantized weights (the definition)."""
    model = engine.model
    weights = {k: (w.dequantize() if isinstance(w, QuantizedLinear) else w) for k, w in model.w.items()}
    return TorchEngine(Transformer(model.config, weights, model.lora_scale), engine.limits)


def step_rows(seed: int) -> list[tuple[str, ChunkRow]]:
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 256, (n,), generator=gen).tolist()

    return [
        ("prefill", ChunkRow(ids(21), CAUSAL, write=True, logit_offsets=list(range(21)))),
        ("decode", ChunkRow(ids(1), CAUSAL, write=True, logit_offsets=[0])),
        ("draft with LoRA", ChunkRow(ids(8), BIDIRECTIONAL, lora=True, logit_offsets=list(range(8)))),
        ("verify", ChunkRow(ids(8), CAUSAL, write=True, logit_offsets=list(range(8)))),
        ("quad", ChunkRow(ids(20), QUAD, 4, write=True, logit_offsets=list(range(20)))),
        ("denoise", ChunkRow(ids(12), PREFIX_BLOCK, 4, write=True, logit_offsets=list(range(12)))),
    ]


@pytest.mark.parametrize("path", ["packed", "dequantized"])
def test_every_row_kind_matches_the_dequantized_model(quantized_engine_dir, path, monkeypatch):
    """Prefill, decode, a LoRA draft, verify, quad and denoise rows, alone and packed in one step, give the
    logits of the unquantized network holding the dequantized weights, through either kernel."""
    limit = 10_000 if path == "packed" else 0
    monkeypatch.setattr(quant, "PACKED_MAX_TOKENS", {key: limit for key in quant.PACKED_MAX_TOKENS})
    engine = open_engine(quantized_engine_dir)
    scheme = read_manifest(quantized_engine_dir).quantization.scheme
    if path == "packed" and scheme == "fp8":
        pytest.skip("fp8 has no packed CPU kernel (dequantized on the CPU, FP8 tensor cores on a GPU)")
    reference = reference_of(engine)
    rows = step_rows(3)
    prefix = ChunkRow(list(range(5, 30)), CAUSAL, write=True)
    results = []
    for e in (engine, reference):
        seqs = Seqs(e, len(rows))
        seqs.step(list(range(len(rows))), [prefix] * len(rows))
        alone = [seqs.step([i], [r]) for i, (_, r) in enumerate(rows)]
        results.append((alone, seqs))
    (alone_q, _), (alone_ref, _) = results
    for (kind, _), got, want in zip(rows, alone_q, alone_ref, strict=True):
        assert relative_error(got, want.double()) < 1e-4, kind
    packed = []
    for e in (engine, reference):
        seqs = Seqs(e, len(rows))
        seqs.step(list(range(len(rows))), [prefix] * len(rows))
        packed.append(seqs.step(list(range(len(rows))), [r for _, r in rows]))
    assert relative_error(packed[0], packed[1].double()) < 1e-4


def test_quantized_logits_differ_from_the_original_weights(quantized_engine_dir, tiny_checkpoint):
    """The engine really runs quantized weights: its logits move away from the fp32 checkpoint's."""
    engine, original = open_engine(quantized_engine_dir), open_engine(tiny_checkpoint, dtype="fp32")
    row = ChunkRow(list(range(3, 40)), CAUSAL, write=True, logit_offsets=list(range(37)))
    got, want = Seqs(engine, 1).step([0], [row]), Seqs(original, 1).step([0], [row])
    assert relative_error(got, want.double()) > 1e-4


def prompts_for(seed: int, count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(n),), generator=gen).tolist()
            for n in torch.randint(2, 30, (count,), generator=gen)]


@pytest.mark.parametrize("path", ["packed", "dequantized"])
def test_spec_and_quad_equal_ar_on_the_quantized_engine(quantized_engine_dir, path, monkeypatch):
    """Greedy spec (with and without the LoRA drafts) and quad equal AR of the same quantized engine, at batch
    > 1; diffusion and infill run on it. (Sampled spec is AR's distribution whatever the weights:
    test_sampling_exact.py.)"""
    limit = 10_000 if path == "packed" else 0
    monkeypatch.setattr(quant, "PACKED_MAX_TOKENS", {key: limit for key in quant.PACKED_MAX_TOKENS})
    engine = open_engine(quantized_engine_dir)
    prompts = prompts_for(5, 4)
    ar = [r.tokens for r in generate(engine, prompts, GenerationConfig(mode="ar", max_new_tokens=24))]
    for mode, kw in [("spec", {"block_length": 8}), ("spec", {"block_length": 4, "use_lora": False}),
                     ("quad", {"block_length": 4})]:
        out = generate(engine, prompts, GenerationConfig(mode=mode, max_new_tokens=24, **kw))
        assert [r.tokens for r in out] == ar, (mode, kw)
    diffusion = generate(engine, prompts, GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=8))
    infill = generate(engine, prompts, GenerationConfig(mode="infill", max_new_tokens=6, suffix=(7, 8, 9)))
    assert [len(r.tokens) for r in diffusion] == [16] * 4 and [len(r.tokens) for r in infill] == [6] * 4


# -- onnx and tensorrt: the same quantized model behind DequantizeLinear -------------------------------------
@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_onnx_engine_runs_the_same_quantized_model(tiny_checkpoint, tmp_path, scheme, group):
    """onnxruntime's quantized graph gives the torch engine's logits (same engine options) for a step of mixed
    rows, and its greedy spec equals its AR."""
    pytest.importorskip("onnxruntime")
    torch_engine = open_engine(quantized_build(tiny_checkpoint, tmp_path / "torch", scheme, group))
    onnx_dir = quantized_build(tiny_checkpoint, tmp_path / "onnx", scheme, group, backend="onnx")
    onnx_engine = open_engine(onnx_dir)
    rows = [r for _, r in step_rows(9)]
    logits = []
    for engine in (torch_engine, onnx_engine):
        seqs = Seqs(engine, len(rows))
        seqs.step(list(range(len(rows))), [ChunkRow(list(range(5, 30)), CAUSAL, write=True)] * len(rows))
        logits.append(seqs.step(list(range(len(rows))), rows))
    assert relative_error(logits[1], logits[0].double()) < 1e-4
    prompts = prompts_for(2, 3)
    ar = generate(onnx_engine, prompts, GenerationConfig(mode="ar", max_new_tokens=12))
    spec = generate(onnx_engine, prompts, GenerationConfig(mode="spec", max_new_tokens=12, block_length=4))
    assert [r.tokens for r in spec] == [r.tokens for r in ar]
    assert read_manifest(onnx_dir).backend_options["opset"] == {"int8": 17, "fp8": 19, "int4": 21}[scheme]


def test_tensorrt_export_of_fp8_weights_is_a_valid_dequantize_graph(tiny_checkpoint, tmp_path):
    """What a `--backend tensorrt --quantize fp8` build hands TensorRT's parser (the build itself needs TensorRT
    and a GPU): bf16 activations, FP8 E4M3 weight initializers expanded by DequantizeLinear, onnx's checker."""
    import onnx

    from trimode.builder.checkpoint import load_checkpoint
    from trimode.builder.onnx_export import MODEL_FILE, AttentionNode, check_export, export_onnx

    checkpoint = load_checkpoint(tiny_checkpoint)
    export_onnx(tmp_path, checkpoint, torch.bfloat16, None, AttentionNode.for_tensorrt(),
                quant=Quantization.parse("fp8"))
    check_export(tmp_path)
    model = onnx.load(str(tmp_path / MODEL_FILE), load_external_data=False)
    fp8 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    layers = checkpoint.config.num_hidden_layers
    assert len(fp8) == len(dequantize) == 4 * layers + 1  # qkv, o, gate_up, down per layer, and the head
    assert {o.version for o in model.opset_import if o.domain == ""} == {19}
    assert not any(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer
                   if t.name.endswith((".qkv", ".o", ".gate_up", ".down")))


# -- manifest and build -------------------------------------------------------------------------------------
def test_manifest_records_the_scheme_and_a_version_older_runtimes_refuse(quantized_engine_dir):
    data = json.loads((quantized_engine_dir / MANIFEST_FILE).read_text())
    manifest = read_manifest(quantized_engine_dir)
    assert data["format_version"] == 4
    assert data["build"]["quantization"] == manifest.quantization.to_json()
    assert manifest.quantization.head is True


def test_a_runtime_that_predates_quantization_refuses_the_engine(quantized_engine_dir, monkeypatch):
    """Trimode before quantization read exactly version 3: a quantized engine stops at the version check."""
    from trimode.builder import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "READABLE_VERSIONS", (3,))
    with pytest.raises(CheckpointError, match="format version 4 is not supported"):
        open_engine(quantized_engine_dir)


def test_an_unknown_scheme_is_refused_by_name(quantized_engine_dir, tmp_path):
    copy = tmp_path / "engine"
    subprocess.run(["cp", "-r", str(quantized_engine_dir), str(copy)], check=True)
    data = json.loads((copy / MANIFEST_FILE).read_text())
    data["build"]["quantization"]["scheme"] = "nf3"
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="quantized with 'nf3', a scheme this trimode does not know"):
        open_engine(copy)


def test_unquantized_engines_keep_version_3(tiny_checkpoint, tmp_path):
    build_engine(tiny_checkpoint, tmp_path / "plain", BuildOptions(max_seq_len=64))
    data = json.loads((tmp_path / "plain" / MANIFEST_FILE).read_text())
    assert data["format_version"] == 3 and "quantization" not in data["build"]


def test_quantized_builds_are_reproducible_and_smaller(tiny_checkpoint, tmp_path):
    sizes = {}
    for name in ("a", "b"):
        quantized_build(tiny_checkpoint, tmp_path / name, "int4", 64)
    for file in ("weights.safetensors", MANIFEST_FILE):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    build_engine(tiny_checkpoint, tmp_path / "fp32", BuildOptions(max_seq_len=512))
    for name in ("a", "fp32"):
        sizes[name] = (tmp_path / name / "weights.safetensors").stat().st_size
    assert sizes["a"] < 0.5 * sizes["fp32"]


def test_the_head_may_stay_unquantized(tiny_checkpoint, tmp_path):
    engine = open_engine(quantized_build(tiny_checkpoint, tmp_path / "e", "int8", quantize_head=False))
    assert isinstance(engine.model.w["layers.0.qkv"], QuantizedLinear)
    assert isinstance(engine.model.w["head"], torch.Tensor) and engine.model.w["embed"].dtype == torch.float32
    assert isinstance(engine.model.w["layers.0.lora_a"], torch.Tensor)


@pytest.mark.parametrize("options,message", [
    (BuildOptions(quantize="int8", group_size=64), "--group-size applies to int4 only"),
    (BuildOptions(group_size=64), "--group-size needs --quantize int4"),
    (BuildOptions(quantize="int4", group_size=256), "not a multiple of the int4 group size 256"),
    (BuildOptions(quantize="int4", group_size=48), "group size must be one of"),
    (BuildOptions(quantize="int8", backend="tensorrt"), "the tensorrt backend takes only --quantize fp8"),
    (BuildOptions(quantize="int2"), "unknown quantization scheme 'int2'"),
])
def test_bad_quantization_options_are_one_line_errors(tiny_checkpoint, tmp_path, options, message):
    with pytest.raises(BuildError, match=message):
        build_engine(tiny_checkpoint, tmp_path / "e", options)
    assert not (tmp_path / "e").exists()


def test_cli_builds_inspects_and_generates_with_int4(tiny_checkpoint, tmp_path):
    def trimode(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trimode", *args], capture_output=True, text=True)

    out = tmp_path / "engine"
    built = trimode("build", str(tiny_checkpoint), "-o", str(out), "--quantize", "int4", "--group-size", "64",
                    "--max-seq-len", "256")
    assert built.returncode == 0, built.stderr
    assert "int4 weights (group 64, head quantized)" in built.stdout
    shown = trimode("inspect", str(out))
    assert "quantization" in shown.stdout and "int4 weights (group 64, head quantized)" in shown.stdout
    info = json.loads(trimode("inspect", str(out), "--json").stdout)
    assert info["quantization"] == {"scheme": "int4", "group_size": 64, "head": True}
    assert set(info["weight_bytes_per_dtype"]) == {"F32", "U8"}
    ran = trimode("generate", "--model", str(out), "--mode", "spec", "--prompt-ids", "1,2,3",
                  "--max-new-tokens", "8", "--json")
    assert ran.returncode == 0, ran.stderr
    bad = trimode("build", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--quantize", "int4", "--backend",
                  "tensorrt")
    assert bad.returncode == 2 and "the tensorrt backend takes only --quantize fp8" in bad.stderr


# -- the demo model: what quantization costs in loss --------------------------------------------------------
DEMO_LOSS_RISE = {"int8": 0.02, "int4": 0.08}


@pytest.mark.parametrize("scheme", DEMO_LOSS_RISE)
def test_demo_model_held_out_loss_rises_within_bounds(scheme, tmp_path):
    """Held-out AR loss (2 x 4 windows of 256 held-out tokens) of the quantized demo engine, head quantized,
    against the fp32 demo model on the same windows."""
    from trimode.demo import demo_model_path

    demo = demo_model_path()
    if demo is None:
        pytest.skip("this installation carries no demo model")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "train_demo"))
    from data import corpus_files, token_stream
    from tokenizers import Tokenizer
    from train_joint import held_out_ar_loss

    engine = open_engine(quantized_build(demo, tmp_path / "e", scheme))
    original = open_engine(demo, dtype="fp32")
    tokenizer = Tokenizer.from_file(str(demo / "tokenizer.json"))
    _, held = corpus_files()
    stream = token_stream(tokenizer, held, original.config.eos_token_id)
    base = held_out_ar_loss(original.model, stream, batches=2, batch_size=4)
    loss = held_out_ar_loss(engine.model, stream, batches=2, batch_size=4)
    assert math.isfinite(loss) and loss - base < DEMO_LOSS_RISE[scheme], (base, loss)
    assert loss != base


def test_weights_are_realigned_for_the_packed_kernel():
    """safetensors places tensors at 8-byte offsets; torch's packed int8 kernel crashed on such a weight at
    >= 4 rows (SIGSEGV, a 6144 x 3072 bf16 engine), so the layer keeps 64-byte aligned copies."""
    weight = torch.randn(64, 128) * 0.05
    q = Quantization.parse("int8")
    stored = q.quantize("w", weight, torch.bfloat16)
    buffer = torch.empty(64 * 128 + 8, dtype=torch.int8)
    misaligned = buffer[8:].view(64, 128)
    misaligned.copy_(stored["w.qweight"])
    assert misaligned.data_ptr() % 64
    lin = QuantizedLinear(q, {"qweight": misaligned, "scales": stored["w.scales"]}, torch.bfloat16)
    assert lin.qweight.data_ptr() % 64 == 0 and torch.equal(lin.qweight, stored["w.qweight"])
    x = torch.randn(8, 128, dtype=torch.bfloat16)
    assert relative_error(lin._packed_mm(x), x.double() @ lin.dequantize().double().t()) < 1.2e-2


def test_layers_run_inside_and_outside_inference_mode_and_under_autograd():
    """The reused dequantization buffers: a step (inference mode) then an evaluation (no_grad) then a
    differentiable call all work and agree; the differentiable one gets the gradient of x @ W.T."""
    _, lin = layer("int4", 32, torch.float32, n=40_000 // 128 * 16, k=128)  # wider than one tile
    x = torch.randn(5, 128)
    with torch.inference_mode():
        first = lin(x)
    with torch.no_grad():
        second = lin(x)
    x_grad = x.clone().requires_grad_()
    third = lin(x_grad)
    third.sum().backward()
    assert torch.allclose(first, second) and torch.allclose(second, third.detach())
    assert torch.allclose(x_grad.grad, lin.dequantize().sum(dim=0).expand(5, -1), atol=1e-4)


def test_python_api_serves_a_quantized_demo_engine(tmp_path):
    """What `serve` and the Python API run: text in, text out, on an int8 demo engine; spec's text equals AR's."""
    from trimode.api import LLM, SamplingParams
    from trimode.demo import demo_model_path

    demo = demo_model_path()
    if demo is None:
        pytest.skip("this installation carries no demo model")
    engine_dir = quantized_build(demo, tmp_path / "e", "int8")
    with LLM(engine_dir, device="cpu", threads=1) as llm:
        prompts = ["def add(a, b):", "import os\n"]
        spec = llm.generate(prompts, SamplingParams(max_tokens=16, mode="spec"))
        ar = llm.generate(prompts, SamplingParams(max_tokens=16, mode="ar"))
    assert [o.text for o in spec] == [o.text for o in ar] and all(o.text for o in ar)


@pytest.mark.parametrize("rows", [64, 80, 208])
def test_int4_codes_come_back_out_of_torchs_cpu_layout(rows):
    """The CPU keeps only torch's packed int4 layout; the portable codes (what a move to the GPU needs, and
    the wide-row path reads) come back out of it exactly, full blocks and a partial last one alike."""
    stored = Quantization.parse("int4", 32).quantize("w", torch.randn(rows, 128) * 0.05, torch.bfloat16)
    lin = QuantizedLinear(Quantization.parse("int4", 32), {k.rsplit(".", 1)[1]: v for k, v in stored.items()},
                          torch.bfloat16)
    assert lin.qweight is None and lin._packed is not None  # the portable copy was dropped
    codes = lin._int4_codes(slice(None), torch.empty(rows, 128, dtype=torch.uint8))
    assert torch.equal(quant.pack_int4(codes), stored["w.qweight"])
    middle = lin._int4_codes(slice(64, rows), torch.empty(rows - 64, 128, dtype=torch.uint8))
    assert torch.equal(middle, codes[64:])
