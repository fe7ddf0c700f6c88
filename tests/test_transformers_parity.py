"""The causal path equals Hugging Face transformers' own Ministral3ForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch

from trimode.builder.checkpoint import load_checkpoint
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint

transformers = pytest.importorskip("transformers", minversion="5.0")


def hf_model(checkpoint_dir):
    from transformers import Ministral3Config, Ministral3ForCausalLM

    ckpt = load_checkpoint(checkpoint_dir)
    c = ckpt.config
    config = Ministral3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": c.rope.rope_type, "rope_theta": c.rope.rope_theta, "factor": c.rope.factor,
                         "original_max_position_embeddings": c.rope.original_max_position_embeddings,
                         "beta_fast": c.rope.beta_fast, "beta_slow": c.rope.beta_slow, "mscale": c.rope.mscale,
                         "mscale_all_dim": c.rope.mscale_all_dim,
                         "llama_4_scaling_beta": c.rope.llama_4_scaling_beta},
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=None,
    )
    config._attn_implementation = "eager"
    model = Ministral3ForCausalLM(config).eval()
    renamed = {name.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head"): t.float()
               for name, t in ckpt.weights.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model, c


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
    cache = engine.new_cache(1)
    # verify() returns logits for every position of a causal pass
    got = engine.verify(cache, [0], tokens)[0]
    assert relative_error(got, expected) < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_cached_decode_matches_transformers(tiny_checkpoint):
    model, config = hf_model(tiny_checkpoint)
    length = 2 * config.rope.original_max_position_embeddings + 3
    tokens = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits[0].float()
    engine = engine_from_checkpoint(tiny_checkpoint, dtype="fp32")
    cache = engine.new_cache(1)
    split = length - 6
    engine.prefill(cache, [0], [tokens[0, :split].tolist()])
    for pos in range(split, length):
        got = engine.decode(cache, [0], [int(tokens[0, pos])])[0]
        assert relative_error(got, expected[pos]) < 1e-4
