"""`trimode generate` end to end: the JSON it prints and its errors (exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.generate import GenerationConfig, generate


def trimode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimode", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
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


@pytest.mark.parametrize("args,message", [
    (["--mode", "diffusion", "--max-new-tokens", "10", "--block-length", "4"], "must be a multiple of block_length"),
    (["--threshold", "2"], "threshold must be within [0, 1]"),
    (["--prompt-ids", "1,999"], "outside the vocabulary"),
    (["--prompt-ids", "1,x"], "is not a comma-separated list"),
    (["--max-new-tokens", "5000"], "beyond the engine's maximum sequence length"),
])
def test_generate_bad_arguments_exit_2(tiny_checkpoint, args, message):
    base = ["generate", "--model", str(tiny_checkpoint)]
    if "--prompt-ids" not in args:
        base += ["--prompt-ids", "1,2"]
    proc = trimode(*base, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
