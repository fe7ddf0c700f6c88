"""Every loader problem is one clear CheckpointError naming the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from trimode.builder.checkpoint import load_checkpoint
from trimode.builder.errors import CheckpointError
from trimode.builder.safetensors_io import SafetensorsFile, write_safetensors

from .conftest import build_checkpoint


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return build_checkpoint(tmp_path / "c", lora_rank=4)


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    from trimode.builder.presets import PRESETS
    from trimode.builder.random_checkpoint import make_config, write_random_checkpoint

    config = make_config(PRESETS["tiny"], "fp32", {})
    return write_random_checkpoint(tmp_path / "s", config, dtype="fp32", shard_bytes=100_000)


def edit_config(root: Path, **changes) -> None:
    path = root / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def rewrite_weights(root: Path, edit) -> None:
    path = root / "model.safetensors"
    f = SafetensorsFile(path)
    tensors = {n: f.get(n).clone() for n in f.tensors}
    del f
    edit(tensors)
    write_safetensors(path, tensors)


def expect(root: Path, file: str, message: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(root)
    assert info.value.path.endswith(file), info.value.path
    assert message in info.value.problem, info.value.problem
    assert "\n" not in str(info.value)


def test_valid_checkpoint_loads(ckpt, sharded):
    assert load_checkpoint(ckpt).lora.rank == 4
    one = load_checkpoint(sharded)
    assert len({t.data_ptr() for t in one.weights.values()}) == len(one.weights)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1


def test_missing_config_field(ckpt):
    edit_config(ckpt, hidden_size=None)
    expect(ckpt, "config.json", "missing config field 'hidden_size'")


def test_missing_rope_field(ckpt):
    data = json.loads((ckpt / "config.json").read_text())
    del data["rope_parameters"]["rope_theta"]
    (ckpt / "config.json").write_text(json.dumps(data))
    expect(ckpt, "config.json", "missing config field 'rope_parameters.rope_theta'")


def test_unknown_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    expect(ckpt, "config.json", "unknown model_type 'llama'")


def test_missing_tensor(ckpt):
    rewrite_weights(ckpt, lambda t: t.pop("encoder.layers.1.mlp.up_proj.weight"))
    expect(ckpt, "model.safetensors", "missing tensor 'encoder.layers.1.mlp.up_proj.weight'")


def test_extra_tensor(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"encoder.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    expect(ckpt, "model.safetensors", "unexpected tensor 'encoder.layers.0.self_attn.q_proj.bias'")


def test_wrong_shape(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"encoder.norm.weight": torch.ones(65)}))
    expect(ckpt, "model.safetensors", "tensor 'encoder.norm.weight' has shape [65], expected [64]")


def test_wrong_dtype(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"encoder.norm.weight": torch.ones(64, dtype=torch.int32)}))
    expect(ckpt, "model.safetensors", "has dtype torch.int32, expected bf16, fp16 or fp32")


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    expect(ckpt, "model.safetensors", "truncated safetensors file")


def test_truncated_header(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    expect(ckpt, "model.safetensors", "truncated or corrupt safetensors file")


def test_absent_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    expect(sharded, victim.name, "shard named by model.safetensors.index.json is missing")


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    expect(ckpt, "c", "no model.safetensors or model.safetensors.index.json found")


def test_lora_wrong_target(ckpt):
    path = ckpt / "linear_spec_lora" / "adapter_config.json"
    data = json.loads(path.read_text())
    data["target_modules"] = ["q_proj"]
    path.write_text(json.dumps(data))
    expect(ckpt, "adapter_config.json", "target_modules must be ['o_proj']")


def test_lora_wrong_shape(ckpt):
    path = ckpt / "linear_spec_lora" / "adapter_model.safetensors"
    f = SafetensorsFile(path)
    tensors = {n: f.get(n).clone() for n in f.tensors}
    tensors["base_model.model.encoder.layers.1.self_attn.o_proj.lora_B.weight"] = torch.zeros(64, 5)
    write_safetensors(path, tensors)
    expect(ckpt, "adapter_model.safetensors", "has shape [64, 5], expected [64, 4]")


def test_lora_missing_layer(ckpt):
    path = ckpt / "linear_spec_lora" / "adapter_model.safetensors"
    f = SafetensorsFile(path)
    tensors = {n: f.get(n).clone() for n in f.tensors if "layers.1." not in n}
    write_safetensors(path, tensors)
    expect(ckpt, "adapter_model.safetensors", "missing adapter tensor for layer 1")


def test_cli_shows_one_line_and_exit_2(ckpt, tmp_path):
    import subprocess
    import sys

    edit_config(ckpt, model_type="llama")
    proc = subprocess.run([sys.executable, "-m", "trimode", "inspect", str(ckpt)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown model_type 'llama'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_memory_mapped_not_copied(ckpt):
    one = load_checkpoint(ckpt)
    infos = SafetensorsFile(ckpt / "model.safetensors").tensors
    a, b = "encoder.embed_tokens.weight", "diffusion_head.weight"
    # views into one map of the file: addresses are exactly as far apart as the tensors' file offsets
    assert one.weights[b].data_ptr() - one.weights[a].data_ptr() == infos[b].start - infos[a].start
    shutil.rmtree(ckpt / "linear_spec_lora")
    assert load_checkpoint(ckpt).lora is None
