"""The step kinds of the torch engine against independent whole-sequence computations."""

from __future__ import annotations

import pytest
import torch

from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint

from . import step_helpers as steps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rand_tokens(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, dtype="fp32")


def full_causal(engine, tokens: list[int]) -> torch.Tensor:
    n = len(tokens)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        return engine.model.forward_masked(torch.tensor([tokens]), torch.arange(n)[None], allowed)[0]


def test_cached_decoding_equals_recomputing(engine):
    tokens = rand_tokens(40, 0)
    expected = full_causal(engine, tokens)
    cache = steps.Seqs(engine, 1, shuffle=1)
    got = [steps.prefill(engine, cache, [0], [tokens[:10]])[0]]
    for t in tokens[10:]:
        got.append(steps.decode(engine, cache, [0], [t])[0])
    got = torch.stack(got)
    assert rel(got, expected[9:]) < 1e-4
    assert cache.lengths[0] == 40


def test_verify_equals_prefill_then_decode(engine):
    prefix, block = rand_tokens(20, 1), rand_tokens(8, 2)
    expected = full_causal(engine, prefix + block)[20:]
    cache = steps.Seqs(engine, 1, shuffle=1)
    steps.prefill(engine, cache, [0], [prefix])
    got = steps.verify(engine, cache, [0], torch.tensor([block]))[0]
    assert rel(got, expected) < 1e-4
    assert cache.lengths[0] == 28


@pytest.mark.parametrize("lora", [False, True])
def test_draft_equals_full_bidirectional_block_pass(engine, lora):
    prefix, block = rand_tokens(25, 3), rand_tokens(8, 4)
    n, p = 33, 25
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[p:, p:] = True  # the block sees itself bidirectionally, the prefix stays causal
    with torch.no_grad():
        expected = engine.model.forward_masked(torch.tensor([prefix + block]), torch.arange(n)[None],
                                               allowed[None], lora=torch.arange(n)[None] >= p if lora
                                               else False)[0, p:]
    cache = steps.Seqs(engine, 1, shuffle=1)
    steps.prefill(engine, cache, [0], [prefix])
    got = steps.draft(engine, cache, [0], torch.tensor([block]), lora=lora)[0]
    assert rel(got, expected) < 1e-4


def test_lora_changes_draft_logits(engine):
    cache = steps.Seqs(engine, 1, shuffle=1)
    steps.prefill(engine, cache, [0], [rand_tokens(10, 5)])
    block = torch.tensor([rand_tokens(8, 6)])
    assert rel(steps.draft(engine, cache, [0], block, lora=True), steps.draft(engine, cache, [0], block)) > 1e-3


def test_draft_leaves_cache_bit_for_bit_unchanged(engine):
    cache = steps.Seqs(engine, 2, shuffle=2)
    steps.prefill(engine, cache, [0, 1], [rand_tokens(12, 7), rand_tokens(5, 8)])
    before_k, before_v, before_lens = cache.cache.k.clone(), cache.cache.v.clone(), list(cache.lengths)
    steps.draft(engine, cache, [0, 1], torch.tensor([rand_tokens(8, 9), rand_tokens(8, 10)]), lora=True)
    assert torch.equal(cache.cache.k, before_k) and torch.equal(cache.cache.v, before_v)
    assert cache.lengths == before_lens


def test_batch_at_different_lengths_equals_alone(engine):
    prompts = [rand_tokens(n, 20 + n) for n in (3, 17, 9)]
    blocks = torch.tensor([rand_tokens(8, 40 + i) for i in range(3)])
    alone = []
    for i, prompt in enumerate(prompts):
        cache = steps.Seqs(engine, 1, shuffle=1)
        first = steps.prefill(engine, cache, [0], [prompt])[0]
        dec = steps.decode(engine, cache, [0], [5])[0]
        drf = steps.draft(engine, cache, [0], blocks[i : i + 1], lora=True)[0]
        ver = steps.verify(engine, cache, [0], blocks[i : i + 1])[0]
        alone.append((first, dec, drf, ver))
    cache = steps.Seqs(engine, 3, shuffle=3)
    slots = [2, 0, 1]  # sequences need not follow batch order
    first = steps.prefill(engine, cache, slots, prompts)
    dec = steps.decode(engine, cache, slots, [5, 5, 5])
    drf = steps.draft(engine, cache, slots, blocks, lora=True)
    ver = steps.verify(engine, cache, slots, blocks)
    for i in range(3):
        for got, want in zip((first[i], dec[i], drf[i], ver[i]), alone[i], strict=True):
            assert rel(got, want) < 1e-5


def test_rollback_then_rewrite_matches_fresh(engine):
    prefix, block, other = rand_tokens(10, 11), rand_tokens(8, 12), rand_tokens(8, 13)
    cache = steps.Seqs(engine, 1, shuffle=1)
    steps.prefill(engine, cache, [0], [prefix])
    steps.verify(engine, cache, [0], torch.tensor([block]))
    cache.rollback(0, 13)  # keep 3 of the block
    got = steps.verify(engine, cache, [0], torch.tensor([other]))[0]
    expected = full_causal(engine, prefix + block[:3] + other)[13:]
    assert rel(got, expected) < 1e-4
    with pytest.raises(AssertionError):
        cache.rollback(0, 100)


def test_bf16_engine_runs_and_tracks_fp32(tiny_checkpoint_bf16):
    e32 = engine_from_checkpoint(tiny_checkpoint_bf16, dtype="fp32")
    e16 = engine_from_checkpoint(tiny_checkpoint_bf16, dtype="bf16")
    assert e16.model.dtype == torch.bfloat16
    tokens = rand_tokens(30, 14)
    c32, c16 = steps.Seqs(e32, 1), steps.Seqs(e16, 1)
    a = steps.verify(e32, c32, [0], torch.tensor([tokens]))
    b = steps.verify(e16, c16, [0], torch.tensor([tokens]))
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert rel(b, a) < 0.05  # bf16 rounding, not a different computation


def test_capacity_errors(tiny_checkpoint):
    from trimode.runtime.errors import CapacityError

    engine = engine_from_checkpoint(tiny_checkpoint, max_batch_size=2, max_seq_len=16)
    with pytest.raises(CapacityError, match="maximum batch size"):
        steps.prefill(engine, steps.Seqs(engine, 3, cache=engine.allocate_cache(8)), [0, 1, 2], [[1], [2], [3]])
    cache = steps.Seqs(engine, 1, shuffle=1)
    with pytest.raises(CapacityError, match="maximum sequence length 16"):
        steps.prefill(engine, cache, [0], [rand_tokens(17, 15)])
