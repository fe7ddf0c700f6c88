"""The self-speculation / infill recipe's data builder against the inference passes it imitates.

On a tiny random model (fp32), the training forward over a packed row (clean causal stream + chunks) must give
at each chunk exactly the logits of the pass the chunk stands for at inference:

* draft chunk [t, MASK x (L-1)] at position s == the draft pass over a cache holding x_0..x_{s-1} (causally
  computed), block at positions s..s+L-1, bidirectional - checked against (a) `forward_masked` on
  [x_0..x_{s-1} ; block] with a dense mask written from DESIGN.md's definition and (b) the recipe's cached
  decoding loop (spec_lib), which the runtime-independent measurements use;
* infill chunk [MASK x n][suffix] == the infill pass over a cache holding the prefix.

Breaking the builder on purpose (block positions shifted by one, the block seeing its own clean token t in
the context) must make the comparison fail; those tests monkeypatch the builder and assert exactly that, so
the comparison is known to be sensitive. Draft targets taken from the causal argmax must be the AR greedy
tokens, and the recipe's self-speculation loop must reproduce AR greedy output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "train_demo"
sys.path.insert(0, str(RECIPE))

import draft_data  # noqa: E402
from draft_data import IGNORE, draft_chunk, infill_chunk, pack, resolve_targets  # noqa: E402
from spec_lib import Cache, ar_generate, greedy, infill, spec_generate, step  # noqa: E402

from trimode.builder.random_checkpoint import make_config  # noqa: E402
from trimode.runtime.model.network import Transformer  # noqa: E402

MASK, EOS = 100, 11


@pytest.fixture(scope="module")
def model() -> Transformer:
    sys.path.insert(0, str(RECIPE))
    from train import init_weights

    arch = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5, "bos_token_id": 1,
            "eos_token_id": EOS, "mask_token_id": MASK, "max_position_embeddings": 512, "vocab_size": 128,
            "block_size": 8,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                                "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                                "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}}
    config = make_config(arch, "fp32", {})
    weights = init_weights(config, torch.Generator().manual_seed(0))
    # larger than the training init, so that positions and masks move the logits visibly
    weights = {k: (v.detach() * (1.0 if "norm" in k else 20.0)) for k, v in weights.items()}
    return Transformer(config, weights)


def clean_tokens(n: int, seed: int) -> torch.Tensor:
    tokens = torch.randint(12, 99, (n,), generator=torch.Generator().manual_seed(seed))
    return tokens


def definition_logits(model, context: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """forward_masked on [context ; chunk]: the context causal, the chunk sees the context and itself."""
    c, m = len(context), len(chunk)
    allowed = torch.zeros(c + m, c + m, dtype=torch.bool)
    allowed[:c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
    allowed[c:, :] = True
    tokens = torch.cat([context, chunk])[None]
    with torch.no_grad():
        return model.forward_masked(tokens, torch.arange(c + m)[None], allowed[None])[0, c:]


def cached_logits(model, context: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    cache = Cache(model, 1, len(context) + len(chunk))
    step(model, cache, context[None], causal=True, write=True)
    return step(model, cache, chunk[None], causal=False, write=False)[0]


def training_rows(seed: int = 3):
    """Two rows of different lengths, each with a draft chunk, an infill chunk and a diffusion chunk."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, s, block, a, hole, suffix in ((30, 11, 6, 17, 4, 5), (22, 7, 4, 12, 3, 6)):
        clean = clean_tokens(n, seed + n)
        chunks = [draft_chunk(clean, s, block, MASK, EOS),
                  infill_chunk(clean, a, hole, suffix, MASK, gen, full_mask_prob=1.0),
                  infill_chunk(clean, 3, 4, 0, MASK, gen, full_mask_prob=0.0)]
        rows.append((clean, torch.ones(n, dtype=torch.bool), chunks))
    return rows


def chunk_mismatches(model) -> list[float]:
    """Max |training logits - inference logits| for every chunk of the packed batch (both references)."""
    rows = training_rows()
    packed = pack(rows)
    with torch.no_grad():
        logits = model.forward_masked(packed.tokens, packed.positions, packed.allowed)
    errors = []
    for b, (clean, _, chunks) in enumerate(rows):
        for (offset, length), chunk in zip(packed.chunk_rows[b], chunks, strict=True):
            got = logits[b, offset : offset + length]
            context = clean[: chunk.start]
            for want in (definition_logits(model, context, chunk.tokens), cached_logits(model, context, chunk.tokens)):
                errors.append(float((got - want).abs().max()))
    return errors


def test_training_chunks_equal_inference_passes(model):
    errors = chunk_mismatches(model)
    assert len(errors) == 12
    assert max(errors) < 1e-4, errors


def test_clean_stream_equals_causal_prefill(model):
    rows = training_rows()
    packed = pack(rows)
    with torch.no_grad():
        logits = model.forward_masked(packed.tokens, packed.positions, packed.allowed)
    for b, (clean, _, _) in enumerate(rows):
        cache = Cache(model, 1, len(clean))
        want = step(model, cache, clean[None], causal=True, write=True)[0]
        assert float((logits[b, : len(clean)] - want).abs().max()) < 1e-4


def test_draft_layout_is_t_then_masks(model):
    clean = clean_tokens(20, 1)
    chunk = draft_chunk(clean, 9, 5, MASK, EOS)
    assert chunk.tokens.tolist() == [int(clean[9])] + [MASK] * 4
    assert chunk.target_from.tolist() == [-1, 9, 10, 11, 12]  # slot k <- causal logit at s + k - 1
    packed = pack([(clean, torch.ones(20, dtype=torch.bool), [chunk])])
    assert packed.positions[0, 20:].tolist() == [9, 10, 11, 12, 13]
    assert packed.allowed[0, 20:, :20].sum(1).tolist() == [9] * 5  # sees x_0..x_8, not t's clean copy
    assert bool(packed.allowed[0, 20:, 20:].all())


@pytest.mark.parametrize("breakage", ["positions_shifted", "block_sees_t_in_cache"])
def test_comparison_catches_a_broken_builder(model, monkeypatch, breakage):
    """The equality check above is sensitive: a builder broken on purpose fails it."""
    if breakage == "positions_shifted":
        monkeypatch.setattr(draft_data, "chunk_positions", lambda start, length: start + 1 + torch.arange(length))
    else:
        monkeypatch.setattr(draft_data, "chunk_sees_clean", lambda start, n: torch.arange(n) < start + 1)
    errors = chunk_mismatches(model)
    assert max(errors) > 1e-3, errors


def test_draft_targets_are_the_ar_greedy_tokens(model):
    """On a greedy trajectory, the causal-argmax targets of a draft chunk are what the verify pass produces."""
    prompt = clean_tokens(10, 5)
    cont = greedy(model, prompt[None], 12)[0]
    assert cont.tolist() == ar_generate(model, prompt.tolist(), 12)
    clean = torch.cat([prompt, cont])
    s, block = 12, 6
    packed = pack([(clean, torch.zeros(len(clean), dtype=torch.bool), [draft_chunk(clean, s, block, MASK, EOS)])])
    with torch.no_grad():
        logits = model.forward_masked(packed.tokens, packed.positions, packed.allowed)
    targets = resolve_targets(packed, logits)[0, len(clean) :]
    assert targets[0] == IGNORE
    assert targets[1:].tolist() == clean[s + 1 : s + block].tolist()
    assert bool((packed.ar_targets == IGNORE).all())  # no AR loss on the model's own tokens


def test_draft_targets_stop_at_the_stream_end_and_eos():
    clean = clean_tokens(12, 2)
    chunk = draft_chunk(clean, 8, 6, MASK, EOS)
    assert chunk.target_from.tolist() == [-1, 8, 9, 10, 11, -1]
    clean[10] = EOS
    chunk = draft_chunk(clean, 8, 6, MASK, EOS)
    assert chunk.target_from.tolist() == [-1, 8, 9, -1, -1, -1]  # after an EOS the text has ended


def test_infill_chunk_targets_only_masked_hole_slots():
    clean = clean_tokens(30, 4)
    gen = torch.Generator().manual_seed(0)
    chunk = infill_chunk(clean, 10, 5, 7, MASK, gen, full_mask_prob=0.0)
    masked = chunk.tokens[:5] == MASK
    assert masked.any()
    assert chunk.tokens[5:].tolist() == clean[15:22].tolist()
    assert torch.equal(chunk.targets[:5][masked], clean[10:15][masked])
    assert bool((chunk.targets[:5][~masked] == IGNORE).all()) and bool((chunk.targets[5:] == IGNORE).all())


def test_spec_loop_equals_ar_and_counts(model):
    prompt = clean_tokens(9, 6).tolist()
    for block in (2, 4, 8):
        result = spec_generate(model, prompt, 20, block, MASK)
        assert result.tokens == ar_generate(model, prompt, 20)
        assert result.forwards == 2 * len(result.accepted)
        assert all(0 <= a <= block - 1 for a in result.accepted)


def test_infill_first_pass_is_the_infill_chunk(model):
    prefix, suffix = clean_tokens(9, 7), clean_tokens(5, 8)
    chunk = torch.cat([torch.full((4,), MASK), suffix])
    want = definition_logits(model, prefix, chunk)
    assert float((cached_logits(model, prefix, chunk) - want).abs().max()) < 1e-4
    filled = infill(model, prefix.tolist(), suffix.tolist(), 4, MASK)
    assert len(filled) == 4


def engine_draft_logits(model, context: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """The runtime engine's own passes: causal prefill writing the cache, then a bidirectional chunk row."""
    from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL
    from trimode.runtime.backends.limits import EngineLimits
    from trimode.runtime.backends.step import ChunkRow
    from trimode.runtime.backends.torch_engine import TorchEngine

    from .step_helpers import Seqs

    engine = TorchEngine(model, EngineLimits(max_batch_size=1, max_seq_len=128))
    cache = Seqs(engine, 1)
    cache.step([0], [ChunkRow(context.tolist(), CAUSAL, write=True, logit_offsets=[len(context) - 1])])
    assert cache.lengths[0] == len(context)
    row = ChunkRow(chunk.tolist(), BIDIRECTIONAL, write=False, logit_offsets=list(range(len(chunk))))
    before = cache.cache.k.clone()
    logits = cache.step([0], [row])
    assert torch.equal(cache.cache.k, before)  # a draft pass never writes
    return logits


def test_training_chunks_equal_the_engine_draft_pass(model):
    """The same check against the runtime's engine step (prefill row, then a draft / infill row)."""
    rows = training_rows()
    packed = pack(rows)
    with torch.no_grad():
        logits = model.forward_masked(packed.tokens, packed.positions, packed.allowed)
    for b, (clean, _, chunks) in enumerate(rows):
        for (offset, length), chunk in zip(packed.chunk_rows[b], chunks, strict=True):
            want = engine_draft_logits(model, clean[: chunk.start], chunk.tokens)
            assert float((logits[b, offset : offset + length] - want).abs().max()) < 1e-4
