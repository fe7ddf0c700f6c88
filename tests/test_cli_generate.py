"""`trimode generate` end to end: the JSON it prints and its errors (exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig


def trimode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimode", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec", "quad"])
def test_generate_json_matches_library(tiny_checkpoint, mode):
    proc = trimode("generate", "--model", str(tiny_checkpoint), "--mode", mode, "--prompt-ids", "1,5,6,7",
                   "--prompt-ids", "1,9", "--max-new-tokens", "16", "--block-length", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["mode"] == mode and data["elapsed_s"] >= 0
    engine = engine_from_checkpoint(tiny_checkpoint)
    expected = generate(engine, [[1, 5, 6, 7], [1, 9]], GenerationConfig(mode=mode, max_new_tokens=16,
                                                                        block_length=8))
    for out, want in zip(data["outputs"], expected, strict=True):
        assert out["tokens"] == want.tokens
        assert out["forwards"] == want.forwards
        assert out["tokens_per_forward"] == pytest.approx(want.tokens_per_forward, abs=1e-4)
        assert isinstance(out["text"], str)


def test_generate_text_prompt_streams(tiny_checkpoint):
    proc = trimode("generate", "--model", str(tiny_checkpoint), "--prompt", "abc", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("abc") and "forwards" in proc.stderr
    # the summary names the block length and says what the forward count and tokens per forward mean
    assert "spec at block length 8:" in proc.stderr and "tok/fwd after the prefill" in proc.stderr


def test_auto_block_length_is_reported(tiny_checkpoint, tmp_path):
    env = {**__import__("os").environ, "TRIMODE_CACHE_DIR": str(tmp_path)}
    args = [sys.executable, "-m", "trimode", "generate", "--model", str(tiny_checkpoint), "--mode", "quad",
            "--prompt-ids", "1,5,6", "--max-new-tokens", "8", "--block-length", "auto"]
    proc = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    chosen = json.loads(proc.stdout)["outputs"][0]["block_length"]
    assert chosen in (1, 2, 3, 4, 6, 8, 12, 16)
    kept = json.loads((tmp_path / "auto_block.json").read_text())  # kept for the next process
    (engine,) = kept["engines"].values()
    assert engine["acceptance"]["quad:greedy"]["reached"] and any("quad:" in k for c in engine["costs"].values()
                                                                for k in c)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    second = int(proc.stderr.split("quad at block length ")[1].split(" (auto):")[0])
    # random weights reject most drafts: what the first process learned makes the second choose no longer
    assert second <= chosen


def test_help_does_not_load_torch():
    """`trimode --help` and `trimode generate --help` import torch only when a command runs (the help took
    1.4 s with torch)."""
    code = ("import sys\nfrom trimode.cli import cli\n"
            "for args in (['--help'], ['generate', '--help'], ['serve', '--help'], ['bench', '--help']):\n"
            "    try:\n        cli.main(args, standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "no torch"
    assert "--kv-cache-memory" in proc.stdout and "--block-length" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--mode", "diffusion", "--max-new-tokens", "10", "--block-length", "4"], "must be a multiple of block_length"),
    (["--threshold", "2"], "threshold must be within [0, 1]"),
    (["--prompt-ids", "1,999"], "outside the vocabulary"),
    (["--prompt-ids", "1,x"], "is not a comma-separated list"),
    (["--max-new-tokens", "5000"], "beyond the engine's maximum sequence length"),
    (["--mode", "spec", "--block-length", "8", "--max-new-tokens", "4090"],
     "(2 prompt + 4090 new tokens + 8 for the mode's last block) needs 4100 positions"),
    (["--kv-cache-memory", "lots"], "is not a memory size"),
    (["--mode", "infill"], "infill mode needs a suffix"),
    (["--mode", "ar", "--suffix-ids", "3,4"], "only used in infill mode"),
    (["--block-length", "many"], "is not an integer or 'auto'"),
    (["--mode", "diffusion", "--block-length", "auto"], "'auto' is for spec and quad"),
    (["--top-p", "0"], "top_p must be within (0, 1]"),
])
def test_generate_bad_arguments_exit_2(tiny_checkpoint, args, message):
    base = ["generate", "--model", str(tiny_checkpoint)]
    if "--prompt-ids" not in args:
        base += ["--prompt-ids", "1,2"]
    proc = trimode(*base, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_infill_through_the_cli_matches_the_library(tiny_checkpoint):
    proc = trimode("generate", "--model", str(tiny_checkpoint), "--mode", "infill", "--prompt-ids", "1,5,6",
                   "--suffix-ids", "7,8,9", "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    want = generate(engine_from_checkpoint(tiny_checkpoint), [[1, 5, 6]],
                    GenerationConfig(mode="infill", max_new_tokens=4, suffix=(7, 8, 9)))[0]
    assert json.loads(proc.stdout)["outputs"][0]["tokens"] == want.tokens and len(want.tokens) == 4


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(tiny_checkpoint):
    for command in (["generate", "--prompt-ids", "1,2"], ["bench", "--runs", "1", "--warmup", "0"]):
        proc = trimode(command[0], "--model", str(tiny_checkpoint), "--device", "cuda", *command[1:])
        assert proc.returncode == 2, proc.stderr
        assert "no CUDA GPU is visible" in proc.stderr and "Traceback" not in proc.stderr


def test_an_engine_dtype_is_fixed(tiny_checkpoint, tmp_path):
    built = trimode("build", str(tiny_checkpoint), "-o", str(tmp_path / "e"), "--dtype", "fp32", "--no-progress")
    assert built.returncode == 0, built.stderr
    proc = trimode("generate", "--model", str(tmp_path / "e"), "--dtype", "bf16", "--prompt-ids", "1,2")
    assert proc.returncode == 2 and "its dtype is fixed" in proc.stderr
