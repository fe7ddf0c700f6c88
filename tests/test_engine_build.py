"""`trimode build` and engine loading: equality with the checkpoint, atomicity, reproducibility, refusals."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trimode.builder import engine_build
from trimode.builder.checkpoint import load_checkpoint
from trimode.builder.convert import convert_checkpoint
from trimode.builder.engine_build import BuildError, BuildOptions, build_engine
from trimode.builder.errors import CheckpointError
from trimode.builder.manifest import MANIFEST_FILE, hash_file, read_manifest
from trimode.builder.safetensors_io import write_safetensors
from trimode.plugins.masks import BIDIRECTIONAL, PREFIX_BLOCK
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.engine_files import serving_limits
from trimode.runtime.backends.engine_loader import open_engine
from trimode.runtime.errors import CapacityError
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig, RequestError

from .conftest import build_checkpoint
from .step_helpers import Seqs, row

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
            32, 33, 34, 35, 36, 37], [1, 9, 3]]


def trimode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimode", *args], capture_output=True, text=True, timeout=120)


def skip_if_tensorrt_installed() -> None:
    """The refusal tests need a machine where `import tensorrt` fails."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return
    pytest.skip("TensorRT is installed here; this test checks the refusal where it is not")


def small(**changes) -> BuildOptions:
    """Engines in these tests serve 128 positions, batch 4, blocks of 4 and 8."""
    return BuildOptions(**{"max_batch_size": 4, "max_seq_len": 128, "block_lengths": (4, 8), **changes})


@pytest.fixture(scope="module")
def torch_engine_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "torch"
    build_engine(tiny_checkpoint, out, small())
    return out


@pytest.fixture
def fresh_engine(tiny_checkpoint, tmp_path) -> Path:
    """An engine a test may damage."""
    out = tmp_path / "engine"
    build_engine(tiny_checkpoint, out, small(lora=None))
    return out


def step(engine, cache: Seqs, rows) -> torch.Tensor:
    return cache.run(rows)


def all_steps(engine, lora: bool) -> list[torch.Tensor]:
    """Logits of prefill rows (2 lengths), then one step of decode, draft (bidirectional), verify and
    prefix_block rows on one cache, then the cache itself."""
    cache = Seqs(engine, 4, shuffle=4)
    out = [step(engine, cache, [row(s, p, write=True, logit_offsets=[len(p) - 1])
                                for s, p in enumerate(PROMPTS + PROMPTS[::-1])])]
    block = [3, 100, 100, 100, 100, 100, 100, 100]
    out.append(step(engine, cache, [
        row(1, [40], write=True, logit_offsets=[0]),
        row(0, block, mask_kind=BIDIRECTIONAL, lora=lora, logit_offsets=list(range(8))),
        row(2, block, write=True, logit_offsets=list(range(8))),
        row(3, [7, 100, 100], mask_kind=PREFIX_BLOCK, mask_param=2, write=True, logit_offsets=[0, 1, 2])]))
    out.append(torch.cat([cache.keys(seq)[0] for seq in range(4)], dim=1))
    return out


# -- the engine serves what the checkpoint serves -----------------------------------------------------------
def test_torch_engine_equals_checkpoint(tiny_checkpoint, torch_engine_dir):
    engine = open_engine(torch_engine_dir)
    reference = engine_from_checkpoint(tiny_checkpoint)
    assert engine.config == reference.config
    assert (engine.limits.max_batch_size, engine.limits.max_seq_len, engine.has_lora) == (4, 128, True)
    assert engine.tokenizer_path == torch_engine_dir / "tokenizer.json"
    for lora in (False, True):
        for got, want in zip(all_steps(engine, lora), all_steps(reference, lora), strict=True):
            assert torch.equal(got, want)
    for mode in ("ar", "diffusion", "spec"):
        config = GenerationConfig(mode=mode, max_new_tokens=16, block_length=8)
        got = generate(engine, PROMPTS, config)
        want = generate(reference, PROMPTS, config)
        assert [r.tokens for r in got] == [r.tokens for r in want]
        assert [r.forwards for r in got] == [r.forwards for r in want]


def test_bf16_engine_equals_bf16_checkpoint(tiny_checkpoint_bf16, tmp_path):
    manifest = build_engine(tiny_checkpoint_bf16, tmp_path / "e", small())  # dtype defaults to the checkpoint's
    assert manifest.dtype == "bf16"
    engine = open_engine(tmp_path / "e")
    assert engine.model.dtype == torch.bfloat16
    for got, want in zip(all_steps(engine, True), all_steps(engine_from_checkpoint(tiny_checkpoint_bf16,
                                                                                  dtype="bf16"), True),
                         strict=True):
        assert torch.equal(got, want)


def test_no_lora_engine_has_no_adapter(tiny_checkpoint, fresh_engine):
    manifest = read_manifest(fresh_engine)
    assert manifest.lora is None
    engine = open_engine(fresh_engine)
    assert not engine.has_lora and not any(".lora_" in name for name in engine.model.w)
    cache = Seqs(engine, 1)
    step(engine, cache, [row(0, [1, 2, 3], write=True, logit_offsets=[2])])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        step(engine, cache, [row(0, [4, 100], mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=[0])])


def test_engine_opened_without_lora(torch_engine_dir):
    engine = open_engine(torch_engine_dir, use_lora=False)
    assert not engine.has_lora and not any(".lora_" in name for name in engine.model.w)


def test_streamed_weights_equal_write_safetensors(tiny_checkpoint_bf16, tmp_path):
    """The streaming writer produces exactly the bytes of the in-memory writer (bf16 included)."""
    build_engine(tiny_checkpoint_bf16, tmp_path / "e", small())
    tensors = convert_checkpoint(load_checkpoint(tiny_checkpoint_bf16), "bf16")
    write_safetensors(tmp_path / "reference.safetensors", tensors, {"format": "pt"})
    assert (tmp_path / "e" / "weights.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_explicit_adapter_directory(tiny_checkpoint, tmp_path):
    manifest = build_engine(tiny_checkpoint, tmp_path / "e", small(lora=tiny_checkpoint / "linear_spec_lora"))
    assert manifest.lora is not None and manifest.lora.rank == 8 and manifest.lora.scale == 4.0


# -- the engine directory -------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_its_hash(torch_engine_dir):
    manifest = read_manifest(torch_engine_dir)
    on_disk = {p.name for p in torch_engine_dir.iterdir()}
    assert on_disk == set(manifest.files) | {MANIFEST_FILE}
    for name, entry in manifest.files.items():
        assert hash_file(torch_engine_dir / name) == entry
    data = json.loads((torch_engine_dir / MANIFEST_FILE).read_text())
    assert data["format_version"] == 3 and data["backend"] == "torch"
    assert data["serves"] == {"max_batch_size": 4, "max_seq_len": 128, "block_lengths": [4, 8],
                              "mask_kinds": ["causal", "bidirectional", "quad", "prefix_block"], "lora_draft": True}
    assert data["tools"]["trimode"] and data["tools"]["torch"]
    assert (torch_engine_dir / MANIFEST_FILE).read_text() == json.dumps(data, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_building_twice_gives_identical_files(tiny_checkpoint, tmp_path, backend):
    for name in ("a", "b"):
        build_engine(tiny_checkpoint, tmp_path / name, small(backend=backend, dtype="fp32"))
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# -- atomic builds --------------------------------------------------------------------------------------------
def test_interrupted_build_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    seen: list[Path] = []

    def interrupted(checkpoint, staging):
        seen.extend(staging.iterdir())  # the weights are already written when Ctrl-C arrives
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_build, "copy_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_engine(tiny_checkpoint, tmp_path / "engine", small())
    assert [p.name for p in seen] == ["weights.safetensors"] and seen[0].parent.name.startswith(".engine.building-")
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_old_engine(tiny_checkpoint, fresh_engine, monkeypatch):
    before = (fresh_engine / MANIFEST_FILE).read_bytes()

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(engine_build, "make_manifest", failing)
    with pytest.raises(OSError, match="disk full"):
        build_engine(tiny_checkpoint, fresh_engine, small(), force=True)
    assert (fresh_engine / MANIFEST_FILE).read_bytes() == before
    assert sorted(p.name for p in fresh_engine.parent.iterdir()) == ["engine"]
    open_engine(fresh_engine, verify=True)


def test_non_empty_output_needs_force(tiny_checkpoint, fresh_engine):
    with pytest.raises(BuildError, match="exists and is not empty"):
        build_engine(tiny_checkpoint, fresh_engine, small())
    manifest = build_engine(tiny_checkpoint, fresh_engine, small(max_seq_len=64), force=True)
    assert read_manifest(fresh_engine) == manifest and manifest.max_seq_len == 64
    assert sorted(p.name for p in fresh_engine.parent.iterdir()) == ["engine"]


def test_output_may_not_overlap_the_checkpoint(tiny_checkpoint):
    with pytest.raises(BuildError, match="overlaps the checkpoint"):
        build_engine(tiny_checkpoint, tiny_checkpoint / "engine", small(), force=True)


@pytest.mark.parametrize("options,message", [
    (small(backend="onnx", dtype="bf16"), "serve fp32 only"),
    (small(max_seq_len=10**6), "--max-seq-len must be within"),
    (small(block_lengths=(256,)), "--block-length 256 must be within"),
])
def test_bad_options_are_refused(tiny_checkpoint, tmp_path, options, message):
    with pytest.raises(BuildError, match=message):
        build_engine(tiny_checkpoint, tmp_path / "e", options)
    assert not (tmp_path / "e").exists()


# -- refusing broken engines and oversized requests --------------------------------------------------------
def test_changed_file_is_refused_with_verify(fresh_engine):
    path = fresh_engine / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    open_engine(fresh_engine)  # sizes match: only --verify reads every byte
    with pytest.raises(CheckpointError, match="weights.safetensors: SHA-256 differs"):
        open_engine(fresh_engine, verify=True)


def test_truncated_file_is_refused(fresh_engine):
    path = fresh_engine / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match=r"weights.safetensors: size \d+ bytes differs from the manifest"):
        open_engine(fresh_engine)


def test_missing_file_is_refused(fresh_engine):
    (fresh_engine / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: file listed in manifest.json is missing"):
        open_engine(fresh_engine)


def edit_manifest(root: Path, edit) -> None:
    path = root / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_unknown_manifest_version_is_refused(fresh_engine):
    edit_manifest(fresh_engine, lambda d: d.update(format_version=99))
    with pytest.raises(CheckpointError, match="engine format version 99 is not supported"):
        open_engine(fresh_engine)


def test_tensorrt_engine_is_refused_without_tensorrt(fresh_engine):
    skip_if_tensorrt_installed()
    edit_manifest(fresh_engine, lambda d: d.update(backend="tensorrt"))
    with pytest.raises(CheckpointError, match="`import tensorrt` fails here"):
        open_engine(fresh_engine)


def test_requests_beyond_built_shapes_are_refused(torch_engine_dir):
    with pytest.raises(CapacityError, match="sequence length 4096 exceeds the engine's built maximum 128"):
        open_engine(torch_engine_dir, max_seq_len=4096)
    with pytest.raises(CapacityError, match="batch size 16 exceeds the engine's built maximum 4"):
        open_engine(torch_engine_dir, max_batch_size=16)
    engine = open_engine(torch_engine_dir, max_seq_len=64)  # smaller limits are fine
    cache = Seqs(engine, 1)
    with pytest.raises(CapacityError, match="beyond the engine's maximum sequence length 64"):
        step(engine, cache, [row(0, [1] * 65, write=True, logit_offsets=[0])])
    with pytest.raises(CapacityError, match="exceeds the engine's maximum batch size 4"):
        step(engine, Seqs(engine, 5), [row(s, [1], write=True) for s in range(5)])
    with pytest.raises(RequestError, match="beyond the engine's maximum sequence length 64"):
        generate(engine, [[1, 2, 3]], GenerationConfig(mode="ar", max_new_tokens=62))


# -- defaults and block lengths -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint whose max_position_embeddings (768) is below the default --max-seq-len 4096."""
    return build_checkpoint(tmp_path_factory.mktemp("short") / "ckpt", max_position_embeddings=768)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_default_options_fit_a_short_model(short_checkpoint, tmp_path, backend):
    manifest = build_engine(short_checkpoint, tmp_path / "e", BuildOptions(backend=backend))
    assert manifest.max_seq_len == 768 and manifest.max_batch_size == 8 and manifest.block_lengths == (8,)
    assert open_engine(tmp_path / "e").limits.max_seq_len == 768


def test_default_max_seq_len_is_4096_when_the_model_allows(tiny_checkpoint, tmp_path):
    assert build_engine(tiny_checkpoint, tmp_path / "e", BuildOptions()).max_seq_len == 4096


def test_cli_default_options_fit_a_short_model(short_checkpoint, tmp_path):
    from trimode.cli_build import build_command

    default = next(p.default for p in build_command.params if p.name == "max_seq_len")
    assert default is None, "an explicit CLI default would override min(4096, max_position_embeddings)"
    proc = trimode("build", str(short_checkpoint), "-o", str(tmp_path / "e"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(tmp_path / "e").max_seq_len == 768


def test_torch_and_onnx_engines_serve_any_block_length(torch_engine_dir):
    """Built for blocks 4 and 8, a torch engine still serves 16 (only TensorRT is shape-specialised)."""
    engine = open_engine(torch_engine_dir)
    assert engine.limits.block_lengths == ()
    engine.limits.check_block_length(16)
    got = generate(engine, [[1, 2, 3]], GenerationConfig(mode="spec", max_new_tokens=16, block_length=16))
    assert len(got[0].tokens) == 16


def test_tensorrt_engines_refuse_unbuilt_block_lengths(torch_engine_dir):
    """The limits a tensorrt manifest gives: only the built block lengths (checked without TensorRT)."""
    manifest = dataclasses.replace(read_manifest(torch_engine_dir), backend="tensorrt")
    limits = serving_limits(manifest, None, None)
    assert limits.block_lengths == (4, 8)
    limits.check_block_length(8)
    with pytest.raises(CapacityError, match="block length 16 is not one this engine was built for"):
        limits.check_block_length(16)
    assert serving_limits(read_manifest(torch_engine_dir), None, None).block_lengths == ()


def test_builder_and_tensorrt_backend_do_not_import_each_other():
    """engine_build imports the TensorRT backend lazily, inside the build; the backend never imports the
    builder's engine_build (checked on the source: tensorrt is not importable here)."""
    source = Path(engine_build.__file__).parent.parent / "runtime" / "backends" / "tensorrt_backend.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(name.endswith("engine_build") for name in imported), imported
    top_level = [n for n in ast.parse(Path(engine_build.__file__).read_text()).body
                 if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("runtime" in (getattr(n, "module", "") or "") for n in top_level)


# -- the command line ------------------------------------------------------------------------------------------
def test_cli_build_then_generate(tiny_checkpoint, tmp_path):
    out = tmp_path / "engine"
    proc = trimode("build", str(tiny_checkpoint), "-o", str(out), "--max-seq-len", "128", "--block-length", "8",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "built torch engine" in proc.stdout and (out / MANIFEST_FILE).is_file()
    proc = trimode("generate", "--model", str(out), "--mode", "spec", "--prompt-ids", "1,5,6,7", "--max-new-tokens",
                   "16", "--block-length", "8", "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    want = generate(engine_from_checkpoint(tiny_checkpoint), [[1, 5, 6, 7]],
                    GenerationConfig(mode="spec", max_new_tokens=16, block_length=8))
    assert json.loads(proc.stdout)["outputs"][0]["tokens"] == want[0].tokens
    proc = trimode("build", str(tiny_checkpoint), "-o", str(out))
    assert proc.returncode == 2 and "exists and is not empty (use --force" in proc.stderr


def test_cli_refuses_tensorrt_where_it_is_missing(tiny_checkpoint, tmp_path):
    skip_if_tensorrt_installed()
    proc = trimode("build", str(tiny_checkpoint), "-o", str(tmp_path / "trt"), "--backend", "tensorrt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot build a tensorrt engine: `import tensorrt` fails here" in proc.stderr
    assert list(tmp_path.iterdir()) == []
