"""The causal path equals Hugging Face transformers' own Ministral3ForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch

from trimode.builder.checkpoint import load_checkpoint
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint

from . import step_helpers as steps

transformers = pytest.importorskip("transformers", minversion="5.0")


def hf_model(checkpoint_dir):
    """transformers' Ministral3ForCausalLM on the checkpoint's weights (built by the benchmark peer), checked
    to hold every checkpoint tensor and nothing random: only the rotary buffers are its own."""
    from trimode.runtime.bench.peers import transformers_model

    ckpt = load_checkpoint(checkpoint_dir, with_lora=False)
    model = transformers_model(checkpoint_dir, torch.float32)
    state = model.state_dict()
    renamed = {name.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head"): t
               for name, t in ckpt.weights.items()}
    assert set(renamed) <= set(state), set(renamed) - set(state)
    assert all("rotary" in name for name in set(state) - set(renamed)), set(state) - set(renamed)
    for name, tensor in renamed.items():
        assert torch.equal(state[name], tensor.float()), name
    return model, ckpt.config


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_prefill_logits_match_transformers_beyond_yarn_window(tiny_checkpoint):
    model, config = hf_model(tiny_checkpoint)
    # 3x the original window: YaRN frequencies and the Llama-4 query scale (floor(pos/32) up to 2) both matter.
    length = 3 * config.rope.original_max_position_embeddings + 5
    tokens = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits[0].float()
    engine = engine_from_checkpoint(tiny_checkpoint, dtype="fp32")
    cache = steps.Seqs(engine, 1, shuffle=7)
    # one causal written row over the whole sequence, logits at every offset
    got = steps.verify(engine, cache, [0], tokens)[0]
    assert relative_error(got, expected) < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_cached_decode_matches_transformers(tiny_checkpoint):
    model, config = hf_model(tiny_checkpoint)
    length = 2 * config.rope.original_max_position_embeddings + 3
    tokens = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits[0].float()
    engine = engine_from_checkpoint(tiny_checkpoint, dtype="fp32")
    cache = steps.Seqs(engine, 1, shuffle=7)
    split = length - 6
    steps.prefill(engine, cache, [0], [tokens[0, :split].tolist()])
    for pos in range(split, length):
        got = steps.decode(engine, cache, [0], [int(tokens[0, pos])])[0]
        assert relative_error(got, expected[pos]) < 1e-4
