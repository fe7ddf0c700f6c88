"""Quadratic self-speculation: AR-exact tokens, exact forwards and acceptance, and its two forwards checked
against a whole-sequence recomputation with an explicit dense mask."""

from __future__ import annotations

import pytest
import torch

from trimode.plugins.masks import PREFIX_BLOCK, QUAD
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.step import ChunkRow
from trimode.runtime.generate import generate
from trimode.runtime.modes.quad import quad_layout
from trimode.runtime.request import GenerationConfig, new_request
from trimode.runtime.scheduler.scheduler import Scheduler

from .markov_engine import EOS, MASK, MarkovEngine, truth
from .step_helpers import Seqs


def rand_tokens(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, dtype="fp32")


PROMPTS = [rand_tokens(n, seed) for seed, n in enumerate([3, 11, 1, 26, 7, 40])]


@pytest.mark.parametrize("block_length", [2, 4, 8, 16])
def test_quad_greedy_equals_ar_alone_and_ragged(engine, block_length):
    ar = generate(engine, PROMPTS, GenerationConfig(mode="ar", max_new_tokens=20))
    quad = generate(engine, PROMPTS, GenerationConfig(mode="quad", max_new_tokens=20, block_length=block_length))
    assert [r.tokens for r in quad] == [r.tokens for r in ar]
    alone = [generate(engine, [p], GenerationConfig(mode="quad", max_new_tokens=20,
                                                    block_length=block_length))[0] for p in PROMPTS[:3]]
    assert [r.tokens for r in alone] == [r.tokens for r in quad[:3]]
    assert [r.forwards for r in alone] == [r.forwards for r in quad[:3]]


@pytest.mark.parametrize("pattern", [[1, 1, 1], [2, 3, 4], [4, 4, 4, 4], [3, 1, 4, 2]])
def test_scripted_acceptance_forwards_and_cache(pattern):
    length = 4
    engine = MarkovEngine(wrong_after=pattern)
    scheduler = Scheduler(engine, max_batch_size=1)
    prompt = [5, 6, 7]
    seq = scheduler.submit(new_request(engine, prompt, GenerationConfig(mode="quad", max_new_tokens=12,
                                                                        block_length=length)))
    lengths, emitted = [], []
    while not seq.done:
        scheduler.step()
        lengths.append(seq.cached)
        emitted.append(len(seq.tokens))
    assert seq.tokens == truth(prompt, 12, engine)
    # d's accepted per round (d_0 and the agreeing drafts); past the script every draft agrees
    expected = [max(1, min(g, length)) for g in pattern] + [length] * 12
    rounds = [b - a for a, b in zip(emitted, emitted[1:], strict=False)]  # a round emits as many as it accepts
    assert emitted[0] == 1 and rounds[:-1] == expected[: len(rounds) - 1]  # the last round is cut at 12 tokens
    assert seq.forwards == 1 + len(rounds)  # the first forward (prefill + masks) and one per round
    # after the first forward the cache holds the prompt; after round r, prompt + accepted d's so far
    assert lengths[0] == len(prompt)
    for r, accepted_so_far in enumerate(torch.tensor(expected).cumsum(0).tolist()[: len(rounds) - 1]):
        assert lengths[r + 1] == len(prompt) + accepted_so_far
    assert engine.cache_lens[1:] == [[n] for n in lengths[:-1]]  # each round's row saw the previous length
    kinds = [step[0][0] for step in engine.steps]
    assert kinds[0] == PREFIX_BLOCK and set(kinds[1:]) == {QUAD}


def test_scripted_eos_inside_an_accepted_run():
    engine = MarkovEngine(wrong_after=[4, 4, 4], eos_after=None)
    prompt = [5]
    chain = truth(prompt, 12, engine)
    engine.eos_after = chain[5]  # EOS is the 7th generated token, inside a run of 4 accepted drafts
    result = generate(engine, [prompt], GenerationConfig(mode="quad", max_new_tokens=30, block_length=4))[0]
    assert result.tokens == truth(prompt, 30, engine) and result.tokens[-1] == EOS
    assert result.finish_reason == "eos" and len(result.tokens) == 7


def test_scripted_max_new_tokens_inside_an_accepted_run():
    engine = MarkovEngine(wrong_after=[4, 4, 4, 4])
    result = generate(engine, [[9]], GenerationConfig(mode="quad", max_new_tokens=6, block_length=4))[0]
    assert result.tokens == truth([9], 6, engine) and result.finish_reason == "length"
    assert result.forwards == 3  # d_0 at once, then 4 per round: 1 + 4 = 5 < 6 <= 9


def dense_masked_logits(engine, tokens, positions, allowed):
    with torch.no_grad():
        return engine.model.forward_masked(torch.tensor([tokens]), torch.tensor([positions]), allowed[None])[0]


def test_first_and_second_forward_against_a_dense_mask_recomputation(engine):
    L, prompt = 3, rand_tokens(9, 77)
    P = len(prompt)
    seqs = Seqs(engine, 1, shuffle=5)
    first = ChunkRow(prompt + [MASK_ID] * L, PREFIX_BLOCK, mask_param=L, write=True,
                     logit_offsets=list(range(P + L)))
    got1 = seqs.step([0], [first])
    n = P + L
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        for s in range(n):
            allowed[t, s] = s <= t if t < P else True  # masks see the prompt and each other
    want1 = dense_masked_logits(engine, prompt + [MASK_ID] * L, list(range(n)), allowed)
    assert float((got1 - want1).norm() / want1.norm()) < 1e-4
    assert seqs.lengths[0] == P

    drafts = rand_tokens(L, 78)
    tokens, positions = quad_layout(P, drafts, MASK_ID)
    second = ChunkRow(tokens, QUAD, mask_param=L, write=True, logit_offsets=list(range(len(tokens))),
                      positions=positions)
    got2 = seqs.step([0], [second])
    assert seqs.lengths[0] == P + L
    # the whole sequence without a cache: prompt causal, then the chunk with the structured mask spelled out
    m = len(tokens)
    full = prompt + tokens
    allowed = torch.zeros(P + m, P + m, dtype=torch.bool)
    allowed[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
    allowed[P:, :P] = True
    for t in range(m):
        for s in range(m):
            j, o = divmod(t, L + 1)
            k, o2 = divmod(s, L + 1)
            allowed[P + t, P + s] = (o2 == 0 and k <= j) or (o > 0 and k == j)
    want2 = dense_masked_logits(engine, full, list(range(P)) + positions, allowed)[P:]
    assert float((got2 - want2).norm() / want2.norm()) < 1e-4
    # the cache now holds exactly the drafts' causal K/V: decoding after them equals a causal recomputation
    ar_after = seqs.step([0], [ChunkRow([5], write=True, logit_offsets=[0])])
    causal = torch.ones(P + L + 1, P + L + 1, dtype=torch.bool).tril()
    want3 = dense_masked_logits(engine, prompt + drafts + [5], list(range(P + L + 1)), causal)[-1:]
    assert float((ar_after - want3).norm() / want3.norm()) < 1e-4


MASK_ID = 100  # the tiny preset's mask_token_id


def test_sampling_is_reproducible_and_batch_independent(engine):
    config = GenerationConfig(mode="quad", max_new_tokens=12, block_length=4, temperature=0.9, seed=3)
    batch = generate(engine, PROMPTS[:3], config)
    alone = [generate(engine, [p], config)[0].tokens for p in PROMPTS[:3]]
    assert [r.tokens for r in batch] == alone
    assert MASK not in (0, EOS)


def test_quad_layout_places_each_sub_block_one_position_later():
    """Sub-block j = [d_j, MASK x L] at positions C+j .. C+j+L: the masks of sub-block j sit where the tokens
    after d_j would (AR-exact outputs cannot see a shifted position, so the layout is checked here)."""
    tokens, positions = quad_layout(10, [7, 8, 9], 100)
    assert tokens == [7, 100, 100, 100, 8, 100, 100, 100, 9, 100, 100, 100]
    assert positions == [10, 11, 12, 13, 11, 12, 13, 14, 12, 13, 14, 15]
    from trimode.runtime.modes.quad import quad_logit_offsets

    assert quad_logit_offsets(3, False) == [0, 2, 3, 4, 6, 7, 8, 10, 11]
    assert quad_logit_offsets(3, True) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_ar_mix_weight_blends_slot_zero_into_slot_one():
    """w * slot0 + (1 - w) * slot1 exactly; w = 1 makes quad's picks those of no blending at all."""
    from trimode.runtime.sampler import Pick, _mixed

    class Plan:
        def __init__(self, mix):
            self.pick = Pick(mix=mix)
            self.scores: list[int] = []

    logits = torch.tensor([[1.0, 5.0], [3.0, -1.0], [0.5, 0.5]])
    mixed = _mixed(logits, [Plan((0.25, [(0, 1)]))], [(0, 3)])
    assert torch.equal(mixed[1], 0.25 * logits[0] + 0.75 * logits[1])
    assert torch.equal(mixed[[0, 2]], logits[[0, 2]]) and torch.equal(logits[1], torch.tensor([3.0, -1.0]))


def test_ar_mix_weight_one_equals_no_mix(engine):
    plain = generate(engine, PROMPTS[:3], GenerationConfig(mode="quad", max_new_tokens=16, block_length=3))
    mixed = generate(engine, PROMPTS[:3], GenerationConfig(mode="quad", max_new_tokens=16, block_length=3,
                                                           ar_mix_weight=1.0))
    assert [r.tokens for r in mixed] == [r.tokens for r in plain]
    half = generate(engine, PROMPTS[:3], GenerationConfig(mode="quad", max_new_tokens=16, block_length=3,
                                                          ar_mix_weight=0.0))
    assert [r.tokens for r in half] != [r.tokens for r in plain]  # the weight does act (w = 0: slot 1 alone)
