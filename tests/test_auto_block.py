"""`--block-length auto`: the acceptance model, the cache file that keeps what was learned, the choice (AR
included), and L = 1 being exactly AR."""

from __future__ import annotations

import json

import pytest

from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig
from trimode.runtime.scheduler import auto_block
from trimode.runtime.scheduler.auto_block import Acceptance, EngineStats, choose_block_length, stats_for

from .markov_engine import MarkovEngine, truth


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMODE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_survival_per_position_with_the_prior():
    acceptance = Acceptance()
    assert acceptance.expected_tokens(4, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)  # the prior alone
    for _ in range(40):
        acceptance.record(8, 7)  # every draft of L = 8 accepted
    for _ in range(40):
        acceptance.record(8, 2)  # drafts 1, 2 accepted, 3 rejected
    # reached: positions 1..3 by all 80 rounds, 4..7 by 40; accepted: 1..2 by 80, 3..7 by 40
    s = acceptance.survival(9, prior=0.5)
    w = auto_block.PRIOR_WEIGHT
    assert s[0] == pytest.approx((80 + 0.5 * w) / (80 + w)) and s[2] == pytest.approx((40 + 0.5 * w) / (80 + w))
    assert s[3] == pytest.approx((40 + 0.5 * w) / (40 + w)) and s[8] == s[6]  # unreached: the last estimate
    assert acceptance.expected_tokens(2, 0.5) < acceptance.expected_tokens(4, 0.5) < 8


def test_what_is_learned_is_kept_in_the_cache_file(cache_dir):
    stats = EngineStats("engine-a", "cpu|threads=1")
    stats.costs["spec:4"] = 0.01
    stats.accept("spec", sampled=False).record(4, 3)
    stats.save()
    data = json.loads((cache_dir / "auto_block.json").read_text())
    assert data["engines"]["engine-a"]["costs"]["cpu|threads=1"] == {"spec:4": 0.01}
    again = EngineStats("engine-a", "cpu|threads=1")
    again.load()
    assert again.costs == {"spec:4": 0.01} and again.accept("spec", False).reached == [1.0, 1.0, 1.0]
    other = EngineStats("engine-a", "cuda|threads=1")  # costs are per device and thread count ...
    other.load()
    assert other.costs == {} and other.accept("spec", False).accepted == [1.0, 1.0, 1.0]  # ... acceptance is not


def test_the_choice_follows_costs_and_acceptance(tiny_checkpoint):
    engine = engine_from_checkpoint(tiny_checkpoint, dtype="fp32")
    stats = stats_for(engine)
    for length in auto_block.CANDIDATES:  # a device where a round costs the same whatever its length
        stats.costs[f"spec:{length}" if length > 1 else "ar:1"] = 0.01
    assert choose_block_length(engine, "spec", engine.cache, sampled=False) == 16  # long blocks win
    for length in auto_block.CANDIDATES:  # a CPU-like device: a forward's overhead plus its tokens; spec: two
        forward = 0.001 + 0.0001 * length
        stats.costs[f"spec:{length}" if length > 1 else "ar:1"] = forward if length == 1 else 2 * forward
    for _ in range(200):
        stats.accept("spec", sampled=True).record(8, 0)  # sampled drafts are never accepted
    assert choose_block_length(engine, "spec", engine.cache, sampled=True) == 1  # plain AR
    for _ in range(400):
        stats.accept("spec", sampled=False).record(16, 15)
    assert choose_block_length(engine, "spec", engine.cache, sampled=False) > 1


def test_spec_at_block_length_one_is_ar():
    """What `auto` picks when drafts are rarely accepted: spec at L = 1 has no draft slot, so each round is
    one causal token - AR's tokens in AR's forwards."""
    from trimode.runtime.modes.spec import SpecMode
    from trimode.runtime.scheduler.scheduler import Scheduler

    engine = MarkovEngine(wrong_after=[0] * 50)
    prompt = [5, 6]
    ar = generate(engine, [prompt], GenerationConfig(mode="ar", max_new_tokens=10))[0]
    scheduler = Scheduler(engine)
    from trimode.runtime.request import new_request

    seq = scheduler.submit(new_request(engine, prompt, GenerationConfig(mode="spec", max_new_tokens=10,
                                                                        block_length=2)))
    seq.mode = SpecMode(1, engine.config.mask_token_id, None, False)
    seq.block_length = 1
    scheduler.run()
    assert seq.tokens == ar.tokens == truth(prompt, 10, engine) and seq.forwards == ar.forwards
    assert all(len(step) == 1 and step[0][1] == 1 for step in engine.steps[-9:])  # one token per forward
