"""The thinking budget in every mode, and the top-k / top-p filter, on the Markov-scripted model."""

from __future__ import annotations

import pytest
import torch

from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig, RequestError, new_request
from trimode.runtime.sampler import filter_probs

from .markov_engine import MarkovEngine, f

END_THINK = 42  # an id the chain never produces by itself


def expected(prompt_last: int, budget: int, total: int) -> list[int]:
    out, t = [], prompt_last
    while len(out) < total:
        t = END_THINK if len(out) == budget else f(t)
        out.append(t)
    return out


@pytest.mark.parametrize("mode,block", [("ar", 4), ("spec", 4), ("quad", 4), ("quad", 3), ("diffusion", 4)])
@pytest.mark.parametrize("budget", [0, 3, 5])
def test_end_of_thinking_is_forced_at_exactly_the_budget(mode, block, budget):
    engine = MarkovEngine()
    config = GenerationConfig(mode=mode, max_new_tokens=12, block_length=block, max_thinking_tokens=budget,
                              end_think_token_id=END_THINK)
    (result,) = generate(engine, [[3, 4]], config)
    assert result.tokens[budget] == END_THINK and END_THINK not in result.tokens[:budget]
    if mode != "diffusion":  # the speculative modes continue from the forced token, as AR does
        assert result.tokens == expected(4, budget, 12)
    else:  # a diffusion block keeps its other (parallel) tokens; the next block continues causally
        assert len(result.tokens) == 12


def test_no_forcing_once_the_model_ended_thinking_itself():
    engine = MarkovEngine()
    chain = expected(4, 10**6, 6)
    config = GenerationConfig(mode="spec", max_new_tokens=12, block_length=4, max_thinking_tokens=4,
                              end_think_token_id=chain[1])
    (result,) = generate(engine, [[3, 4]], config)
    assert result.tokens == expected(4, 10**6, 12)


def test_filter_keeps_top_k_and_the_nucleus():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    assert torch.allclose(filter_probs(probs, 2, 1.0), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top-p 0.8: tokens whose preceding mass is < 0.8 stay (0.5, 0.2, 0.15); 0.1 starts at 0.85
    kept = filter_probs(probs, 0, 0.8)
    assert torch.equal(kept > 0, torch.tensor([[True, True, True, False, False]]))
    assert torch.allclose(kept.sum(-1), torch.tensor([1.0]))


def test_top_k_one_is_greedy_in_every_sampling_mode():
    engine = MarkovEngine()
    greedy = generate(engine, [[3, 4]], GenerationConfig(mode="ar", max_new_tokens=8))[0].tokens
    for mode in ("ar", "spec", "quad"):
        config = GenerationConfig(mode=mode, max_new_tokens=8, block_length=4, temperature=1.5, top_k=1, seed=9)
        assert generate(engine, [[3, 4]], config)[0].tokens == greedy


@pytest.mark.parametrize("bad,message", [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                         ({"top_k": -1}, "top_k"), ({"max_thinking_tokens": -2}, "thinking"),
                                         ({"mode": "infill"}, "suffix"), ({"suffix": (1, 2)}, "infill"),
                                         ({"mode": "diffusion", "block_length": "auto"}, "auto"),
                                         ({"mode": "spec", "ar_mix_weight": 0.5}, "ar_mix_weight")])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(RequestError, match=message):
        new_request(MarkovEngine(), [1, 2], GenerationConfig(**{"max_new_tokens": 8, **bad}))


def test_top_k_one_is_greedy_in_diffusion_too():
    engine = MarkovEngine()
    greedy = generate(engine, [[3, 4]], GenerationConfig(mode="diffusion", max_new_tokens=8, block_length=4))
    sampled = generate(engine, [[3, 4]], GenerationConfig(mode="diffusion", max_new_tokens=8, block_length=4,
                                                          temperature=1.5, top_k=1, seed=9))
    assert sampled[0].tokens == greedy[0].tokens


@pytest.mark.parametrize("mode", ["ar", "spec", "quad"])
@pytest.mark.parametrize("budget", [0, 2, 5])
def test_the_cache_holds_exactly_the_emitted_tokens_after_a_forced_end_of_thinking(mode, budget):
    """The Markov engine ignores the cache, so a wrong rollback would not change a token: assert the length
    after every step instead. In these modes the cache holds the prompt and every emitted token but the last
    (the next row starts with it), whatever was forced."""
    from trimode.runtime.scheduler.scheduler import Scheduler

    engine = MarkovEngine(wrong_after=[4, 1, 4, 0, 4])
    config = GenerationConfig(mode=mode, max_new_tokens=16, block_length=4, max_thinking_tokens=budget,
                              end_think_token_id=END_THINK)
    scheduler = Scheduler(engine)
    seq = scheduler.submit(new_request(engine, [3, 4], config))
    while not seq.done:
        scheduler.step()
        if not seq.done:
            assert seq.cached == 2 + len(seq.tokens) - 1, (seq.cached, len(seq.tokens))
    assert seq.tokens[budget] == END_THINK
