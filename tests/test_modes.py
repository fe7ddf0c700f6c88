"""The three generation modes: AR parity of self-speculation, diffusion schedules, batching, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.generate import GenerationConfig, RequestError, generate, validate_request

from . import scripted_engine as scripted
from .conftest import build_checkpoint


def prompts_for(seed: int, count: int, vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, dtype="fp32")


@pytest.fixture(scope="module")
def engine_no_lora(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, dtype="fp32", use_lora=False)


def run(engine, prompts, **kw):
    return generate(engine, prompts, GenerationConfig(**kw))


# -- self-speculation is AR-exact ---------------------------------------------------------------------------
@pytest.mark.parametrize("block_length", [4, 8, 32])
@pytest.mark.parametrize("lora", [True, False])
def test_spec_greedy_equals_ar_greedy(engine, block_length, lora):
    prompts = prompts_for(block_length, 6)
    ar = run(engine, prompts, mode="ar", max_new_tokens=40)
    spec = run(engine, prompts, mode="spec", max_new_tokens=40, block_length=block_length, use_lora=lora)
    for a, s in zip(ar, spec, strict=True):
        assert s.tokens == a.tokens
        # stops at max_new_tokens exactly (never overshoots) unless EOS came first
        assert len(s.tokens) == 40 or (s.finish_reason == "eos" and s.tokens[-1] == engine.config.eos_token_id)


def test_spec_with_draft_threshold_equals_ar(engine):
    prompts = prompts_for(7, 4)
    ar = run(engine, prompts, mode="ar", max_new_tokens=24)
    spec = run(engine, prompts, mode="spec", max_new_tokens=24, block_length=8, threshold=0.3)
    assert [s.tokens for s in spec] == [a.tokens for a in ar]


def test_lora_changes_drafts_not_outputs(engine, engine_no_lora):
    prompts = prompts_for(11, 3)
    cfg = GenerationConfig(mode="spec", max_new_tokens=24, block_length=8)
    drafts: dict[bool, list] = {True: [], False: []}
    for eng, key in ((engine, True), (engine_no_lora, False)):
        original = eng.draft

        def spy(cache, slots, blocks, lora=False, _original=original, _key=key):
            logits = _original(cache, slots, blocks, lora=lora)
            drafts[_key].append(logits.argmax(-1))
            return logits

        eng.draft = spy
        try:
            out = generate(eng, prompts, cfg)
        finally:
            del eng.draft
        drafts[key].append([o.tokens for o in out])
    assert drafts[True][-1] == drafts[False][-1]
    assert any(not torch.equal(a, b) for a, b in zip(drafts[True][:-1], drafts[False][:-1], strict=False))


def test_spec_sampling_equals_ar_sampling_with_same_seed(engine):
    prompts = prompts_for(12, 3)
    ar = run(engine, prompts, mode="ar", max_new_tokens=20, temperature=0.8, seed=5)
    again = run(engine, prompts, mode="ar", max_new_tokens=20, temperature=0.8, seed=5)
    other = run(engine, prompts, mode="ar", max_new_tokens=20, temperature=0.8, seed=6)
    assert [a.tokens for a in ar] == [a.tokens for a in again]
    assert [a.tokens for a in ar] != [a.tokens for a in other]


# -- forward accounting -------------------------------------------------------------------------------------
def test_ar_forward_count(engine):
    (out,) = run(engine, [[1, 2, 3]], mode="ar", max_new_tokens=10)
    assert out.forwards == 10  # prefill gives the first token, then 9 decodes
    assert out.tokens_per_forward == pytest.approx(10 / 9)


def test_diffusion_without_threshold_makes_l_minus_1_passes_per_block(engine):
    length, blocks = 8, 3
    (out,) = run(engine, [[1, 2, 3, 4]], mode="diffusion", max_new_tokens=length * blocks, block_length=length)
    assert out.finish_reason == "length" and len(out.tokens) == length * blocks
    assert 100 not in out.tokens  # no slot was left masked, so the schedule ran exactly
    # prefill + (L-1) denoising passes per block + one causal re-encode between blocks (none after the last)
    assert out.forwards == 1 + blocks * (length - 1) + (blocks - 1)


def test_diffusion_threshold_one_commits_one_per_step(engine):
    length = 8
    plain = run(engine, [[1, 2, 3, 4]], mode="diffusion", max_new_tokens=16, block_length=length)[0]
    strict = run(engine, [[1, 2, 3, 4]], mode="diffusion", max_new_tokens=16, block_length=length,
                 threshold=1.0)[0]
    assert strict.forwards == plain.forwards  # threshold 1.0: only the single most confident slot per step
    assert strict.tokens == plain.tokens


def test_diffusion_low_threshold_commits_several_per_step(engine):
    out = run(engine, [[1, 2, 3, 4]], mode="diffusion", max_new_tokens=16, block_length=8, threshold=0.0)[0]
    assert out.forwards == 1 + 2 * 1 + 1  # threshold 0 commits every mask in one pass
    assert out.tokens_per_forward == pytest.approx(16 / 3)


# -- EOS on a real checkpoint -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eos_engine(tmp_path_factory):
    """A checkpoint whose eos_token_id is a token the model really emits at generated position 5."""
    root = build_checkpoint(tmp_path_factory.mktemp("eos") / "c", seed=3)
    probe = engine_from_checkpoint(root)
    tokens = run(probe, [[1, 2, 3]], mode="ar", max_new_tokens=12)[0].tokens
    index = next(i for i in range(3, 12) if tokens[i] not in tokens[:i] and tokens[i] != 100)
    config = json.loads((Path(root) / "config.json").read_text())
    config["eos_token_id"] = tokens[index]
    (Path(root) / "config.json").write_text(json.dumps(config))
    return engine_from_checkpoint(root), tokens[: index + 1]


def test_all_modes_cut_after_eos(eos_engine):
    engine, expected = eos_engine
    ar = run(engine, [[1, 2, 3]], mode="ar", max_new_tokens=16)[0]
    spec = run(engine, [[1, 2, 3]], mode="spec", max_new_tokens=16, block_length=4)[0]
    assert ar.tokens == expected and ar.finish_reason == "eos"
    assert spec.tokens == expected and spec.finish_reason == "eos"
    for threshold in (None, 1.0):
        diff = run(engine, [[1, 2, 3]], mode="diffusion", max_new_tokens=32, block_length=8, threshold=threshold)[0]
        if diff.finish_reason == "eos":
            assert diff.tokens[-1] == engine.config.eos_token_id
            assert engine.config.eos_token_id not in diff.tokens[:-1]
        else:
            assert len(diff.tokens) == 32


# -- the speculation loop driven by a scripted model --------------------------------------------------------
@pytest.mark.parametrize("accepted", range(8))
def test_spec_acceptance_and_rollback(accepted):
    length = 8
    truth = list(range(1, 41))
    engine = scripted.ScriptedEngine(truth, accept=[accepted] * 50)
    cache_lengths: list[int] = []
    original_verify = engine.verify

    def verify(cache, slots, blocks):
        before = int(cache.lens[slots[0]])
        out = original_verify(cache, slots, blocks)
        cache_lengths.append(before)
        return out

    engine.verify = verify
    emitted: list[list[int]] = []
    out = generate(engine, [[5, 6, 7]], GenerationConfig(mode="spec", max_new_tokens=30, block_length=length),
                   on_tokens=lambda i, new: emitted.append(new))[0]
    assert out.tokens == truth[:30]
    runs = emitted[1:]  # the first is the prefill's token
    assert all(len(r) == accepted + 1 for r in runs[:-1])  # c accepted drafts plus one bonus token
    # after each rollback the cache holds the prompt and every emitted token but the newest
    for number, before in enumerate(cache_lengths):
        assert before == 3 + 1 + number * (accepted + 1) - 1
    iterations = len(cache_lengths)
    assert out.forwards == 1 + 2 * iterations


def test_spec_batch_with_different_acceptance_per_sequence():
    class PerSlot(scripted.ScriptedEngine):
        def draft(self, cache, slots, blocks, lora=False):
            outs = []
            for slot, block in zip(slots, blocks, strict=True):
                self.accept = [slot * 2 + 1] * 50
                outs.append(super().draft(cache, [slot], block[None])[0])
            return torch.stack(outs)

    truth = list(range(1, 41))
    engine = PerSlot(truth)
    out = generate(engine, [[5], [6, 7], [8, 9, 10]], GenerationConfig(mode="spec", max_new_tokens=25,
                                                                        block_length=8))
    for result in out:
        assert result.tokens == truth[:25]
    assert out[0].forwards > out[1].forwards > out[2].forwards  # 2, 4, 6 tokens per iteration


def test_draft_loop_is_bounded_when_model_predicts_mask():
    engine = scripted.ScriptedEngine(list(range(1, 41)), draft_mask=True)
    out = generate(engine, [[5]], GenerationConfig(mode="spec", max_new_tokens=6, block_length=4, threshold=0.5))[0]
    assert out.tokens == list(range(1, 7))  # verify still makes progress: one token per iteration
    per_iteration = "".join("d" if c == "draft" else "v" for c in engine.calls if c != "prefill")
    assert per_iteration == "ddddv" * 5  # at most L draft passes per block


def test_diffusion_eos_inside_block_stops_denoising():
    truth = list(range(1, 40))
    engine = scripted.ScriptedEngine(truth, denoise={3: scripted.EOS})
    out = generate(engine, [[5]], GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=8,
                                                   threshold=0.5))[0]
    assert out.tokens == truth[:3] + [scripted.EOS]
    assert out.finish_reason == "eos"
    assert engine.calls == ["prefill", "draft"]  # one pass fills the block; no re-encode after EOS


def test_diffusion_mask_prediction_is_bounded():
    engine = scripted.ScriptedEngine(list(range(1, 40)), draft_mask=True)
    out = generate(engine, [[5]], GenerationConfig(mode="diffusion", max_new_tokens=8, block_length=4,
                                                   threshold=0.9))[0]
    assert engine.calls.count("draft") == 2 * 4  # L passes per block, never more
    assert out.tokens[0] == 1 and out.tokens[1:4] == [scripted.MASK] * 3


# -- batches equal single runs ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,kw", [("ar", {}), ("diffusion", {"block_length": 8}),
                                     ("diffusion", {"block_length": 8, "threshold": 0.2}),
                                     ("spec", {"block_length": 8}), ("spec", {"block_length": 4, "threshold": 0.4})])
def test_batch_equals_alone(engine, mode, kw):
    prompts = prompts_for(21, 5)
    batch = run(engine, prompts, mode=mode, max_new_tokens=24, **kw)
    for prompt, together in zip(prompts, batch, strict=True):
        alone = run(engine, [prompt], mode=mode, max_new_tokens=24, **kw)[0]
        assert together.tokens == alone.tokens
        assert together.forwards == alone.forwards


def test_sampling_batch_equals_alone_and_is_reproducible(engine):
    prompts = prompts_for(22, 3)
    for mode in ("ar", "diffusion", "spec"):
        kw = {"mode": mode, "max_new_tokens": 16, "block_length": 8, "temperature": 1.0, "seed": 3}
        batch = run(engine, prompts, **kw)
        assert [b.tokens for b in batch] == [b.tokens for b in run(engine, prompts, **kw)]
        assert batch[1].tokens == run(engine, [prompts[1]], **kw)[0].tokens


def test_cancelled_sequences_leave_the_batch(engine):
    out = generate(engine, prompts_for(23, 3), GenerationConfig(mode="ar", max_new_tokens=20),
                   is_cancelled=lambda i: i == 1)
    assert out[1].finish_reason == "cancelled" and len(out[1].tokens) == 1
    assert len(out[0].tokens) == 20 and len(out[2].tokens) == 20


# -- bad requests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,prompts,message", [
    ({"mode": "diffusion", "max_new_tokens": 10, "block_length": 4}, [[1]], "must be a multiple of block_length"),
    ({"threshold": 1.5}, [[1]], "threshold must be within [0, 1]"),
    ({"threshold": -0.1}, [[1]], "threshold must be within [0, 1]"),
    ({}, [[1, 256]], "token id 256 outside the vocabulary"),
    ({}, [[1, -1]], "token id -1 outside the vocabulary"),
    ({"max_new_tokens": 0}, [[1]], "max_new_tokens must be positive"),
    ({"mode": "beam"}, [[1]], "unknown mode 'beam'"),
    ({}, [[]], "prompt 0 is empty"),
    ({"max_new_tokens": 4000}, [[1] * 200], "beyond the engine's maximum sequence length"),
])
def test_bad_requests(engine, kw, prompts, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_request(engine, prompts, GenerationConfig(**kw))
