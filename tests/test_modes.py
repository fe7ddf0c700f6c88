"""The three generation modes: AR parity of self-speculation, diffusion schedules, batching, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trimode.plugins.masks import BIDIRECTIONAL
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig, RequestError, new_request

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


def test_lora_changes_drafts_not_outputs(engine, engine_no_lora, monkeypatch):
    prompts = prompts_for(11, 3)
    cfg = GenerationConfig(mode="spec", max_new_tokens=24, block_length=8)
    drafts: dict[bool, list[tuple[bool, int]]] = {True: [], False: []}
    outputs: dict[bool, list[list[int]]] = {}
    for eng, key in ((engine, True), (engine_no_lora, False)):
        original = eng.step

        def spy(cache, batch, _original=original, _seen=drafts[key]):
            logits = _original(cache, batch)
            for m, b in enumerate(batch.logit_rows):
                if batch.rows[b].mask_kind == BIDIRECTIONAL:
                    _seen.append((batch.rows[b].lora, int(logits[m].argmax())))
            return logits

        monkeypatch.setattr(eng, "step", spy)
        outputs[key] = [o.tokens for o in generate(eng, prompts, cfg)]
        monkeypatch.undo()
    assert outputs[True] == outputs[False]
    # the adapter is on for every draft row of the engine that has one, off for the other
    assert drafts[True] and all(lora for lora, _ in drafts[True])
    assert drafts[False] and not any(lora for lora, _ in drafts[False])
    assert [t for _, t in drafts[True]] != [t for _, t in drafts[False]]


# Sampling: self-speculation at temperature > 0 is exact AR sampling - a statistical test in
# tests/test_sampling_exact.py (the old test here only checked that AR sampling is reproducible).


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


# -- diffusion commits driven by scripted confidences -------------------------------------------------------
M = scripted.MASK
# generated position -> the softmax probability of the scripted proposal there. Block 1 covers positions 0..7
# (0 is the prefill's seed), block 2 positions 8..15 (8 is the seed from block 1's re-encode).
CONFIDENCE = {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.3, 6: 0.35, 7: 0.25, **{i: 0.9 for i in range(9, 16)}}


def commits_per_pass(engine: scripted.ScriptedEngine, finished: list[list[int]]) -> list[list[int]]:
    """Block offsets each denoising pass committed: read from the next pass's input, or for a block's last
    pass from the finished block (`finished`: the blocks as they came out, in order)."""
    inputs = [r.tokens for r in engine.rows_of(scripted.DRAFT)]
    commits, block = [], 0
    for number, before in enumerate(inputs):
        following = inputs[number + 1] if number + 1 < len(inputs) else None
        if following is None or following[0] != before[0] or M not in before[1:] or \
                any(a != M and a != b for a, b in zip(before, following, strict=True)):
            following = finished[block]  # the next input belongs to another block
            block += 1
        commits.append([i for i, (a, b) in enumerate(zip(before, following, strict=True)) if a == M and b != M])
    return commits


def test_diffusion_threshold_commits_every_confident_slot_at_once():
    truth = list(range(1, 40))
    engine = scripted.ScriptedEngine(truth, confidence=CONFIDENCE)
    out = generate(engine, [[5]], GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=8,
                                                   threshold=0.5))[0]
    assert out.tokens == truth[:16] and out.finish_reason == "length"
    # pass 1 commits every slot at or above 0.5 (offsets 1-4); then none qualifies, so each pass commits the
    # single most confident masked slot: 6 (0.35), 5 (0.3), 7 (0.25). Block 2 is confident everywhere.
    assert [r.tokens for r in engine.rows_of(scripted.DRAFT)] == [
        [1, M, M, M, M, M, M, M],
        [1, 2, 3, 4, 5, M, M, M],
        [1, 2, 3, 4, 5, M, 7, M],
        [1, 2, 3, 4, 5, 6, 7, M],
        [9, M, M, M, M, M, M, M],
    ]
    assert commits_per_pass(engine, [truth[:8], truth[8:16]]) == [[1, 2, 3, 4], [6], [5], [7], list(range(1, 8))]
    assert engine.calls == ["prefill", "draft", "draft", "draft", "draft", "verify", "draft"]
    assert engine.rows_of(scripted.VERIFY)[0].tokens == truth[:8]  # the re-encode of the finished block
    assert out.forwards == 1 + 4 + 1 + 1 == len(engine.steps)


@pytest.mark.parametrize("threshold", [None, 1.0])
def test_diffusion_one_per_pass_commits_the_most_confident_slot(threshold):
    truth = list(range(1, 40))
    engine = scripted.ScriptedEngine(truth, confidence=CONFIDENCE)
    out = generate(engine, [[5]], GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=8,
                                                   threshold=threshold))[0]
    assert out.tokens == truth[:16]
    # 7 masks over 8 steps: one per pass, in order of confidence (not of position); threshold 1.0 alike
    order = [[1], [2], [3], [4], [6], [5], [7]]
    assert commits_per_pass(engine, [truth[:8], truth[8:16]]) == order + [[i] for i in range(1, 8)]
    assert out.forwards == 1 + 7 + 1 + 7 == len(engine.steps)


# -- EOS ----------------------------------------------------------------------------------------------------
EOS_TRUTH = [1, 2, 3, 4, 5, scripted.EOS, *range(7, 40)]
DECREASING = {i: 0.9 - 0.05 * i for i in range(1, 8)}  # every slot >= 0.55, more confident to the left


@pytest.mark.parametrize("mode,kw,calls", [
    ("ar", {}, ["prefill"] + ["decode"] * 5),
    ("spec", {"block_length": 4}, ["prefill", "draft", "verify", "draft", "verify"]),
    # offsets of block 1 at 0.85, 0.8 | 0.75: two passes; block 2 all below 0.78: one slot per pass
    ("spec", {"block_length": 4, "threshold": 0.78}, ["prefill", "draft", "draft", "verify", "draft", "draft",
                                                      "draft", "verify"]),
    ("diffusion", {"block_length": 8}, ["prefill"] + ["draft"] * 5),
    ("diffusion", {"block_length": 8, "threshold": 1.0}, ["prefill"] + ["draft"] * 5),
    ("diffusion", {"block_length": 8, "threshold": 0.5}, ["prefill", "draft"]),
])
def test_every_mode_stops_at_eos_on_a_scripted_model(mode, kw, calls):
    engine = scripted.ScriptedEngine(EOS_TRUTH, confidence=DECREASING)
    out = generate(engine, [[5, 6]], GenerationConfig(mode=mode, max_new_tokens=32, **kw))[0]
    assert out.tokens == EOS_TRUTH[:6] and out.finish_reason == "eos"
    assert engine.calls == calls  # diffusion stops denoising once EOS stands with no mask before it
    assert out.forwards == len(calls) == len(engine.steps)


@pytest.fixture(scope="module")
def eos_engine(tmp_path_factory):
    """A checkpoint whose eos_token_id is a token the model really emits: in AR at a generated position >= 3
    and in diffusion under every schedule tested, so each mode provably meets it. Returns the engine, AR's
    expected tokens and, per threshold, diffusion's (its output without the EOS rule, cut after the EOS)."""
    root = build_checkpoint(tmp_path_factory.mktemp("eos") / "c", seed=3)
    probe = engine_from_checkpoint(root)
    prompt = [1, 2, 3]
    ar = run(probe, [prompt], mode="ar", max_new_tokens=12)[0].tokens
    diffusion = {t: run(probe, [prompt], mode="diffusion", max_new_tokens=32, block_length=8, threshold=t)[0].tokens
                 for t in (None, 1.0)}
    usable = [i for i in range(3, len(ar)) if ar[i] not in ar[:i] and ar[i] != probe.config.mask_token_id
              and all(ar[i] in d for d in diffusion.values())]
    assert usable, f"no token of AR's output {ar} also appears in diffusion's {diffusion}"
    eos = ar[usable[0]]
    config = json.loads((Path(root) / "config.json").read_text())
    config["eos_token_id"] = eos
    (Path(root) / "config.json").write_text(json.dumps(config))
    return engine_from_checkpoint(root), ar[: usable[0] + 1], {t: d[: d.index(eos) + 1] for t, d in diffusion.items()}


def test_all_modes_cut_after_eos(eos_engine):
    engine, expected, diffusion = eos_engine
    ar = run(engine, [[1, 2, 3]], mode="ar", max_new_tokens=16)[0]
    spec = run(engine, [[1, 2, 3]], mode="spec", max_new_tokens=16, block_length=4)[0]
    assert ar.tokens == expected and ar.finish_reason == "eos"
    assert spec.tokens == expected and spec.finish_reason == "eos"
    for threshold, want in diffusion.items():
        diff = run(engine, [[1, 2, 3]], mode="diffusion", max_new_tokens=32, block_length=8, threshold=threshold)[0]
        assert diff.tokens == want and diff.finish_reason == "eos", threshold


# -- the speculation loop driven by a scripted model --------------------------------------------------------
@pytest.mark.parametrize("accepted", range(8))
def test_spec_acceptance_and_rollback(accepted):
    length = 8
    truth = list(range(1, 41))
    engine = scripted.ScriptedEngine(truth, accept=[accepted] * 50)
    emitted: list[list[int]] = []
    out = generate(engine, [[5, 6, 7]], GenerationConfig(mode="spec", max_new_tokens=30, block_length=length),
                   on_tokens=lambda i, new: emitted.append(new))[0]
    assert out.tokens == truth[:30]
    runs = emitted[1:]  # the first is the prefill's token
    assert all(len(r) == accepted + 1 for r in runs[:-1])  # c accepted drafts plus one bonus token
    verifies = engine.rows_of(scripted.VERIFY)
    # after each rollback the cache holds the prompt and every emitted token but the newest, which opens the
    # next block (the scripted causal model answers JUNK to any other cache content)
    for number, row in enumerate(verifies):
        assert row.past == 3 + 1 + number * (accepted + 1) - 1
        assert row.tokens[0] == out.tokens[row.past - 3]
    assert [r.past for r in engine.rows_of(scripted.DRAFT)] == [r.past for r in verifies]
    assert out.forwards == 1 + 2 * len(verifies) == len(engine.steps)


def test_spec_batch_with_different_acceptance_per_sequence():
    class PerPrompt(scripted.ScriptedEngine):
        def accept_for(self, slot, draft_pass, block_length):
            return 2 * len(self.prompts[slot]) - 1  # prompts of 1, 2, 3 tokens: 1, 3, 5 drafts accepted

    truth = list(range(1, 41))
    engine = PerPrompt(truth)
    out = generate(engine, [[5], [6, 7], [8, 9, 10]], GenerationConfig(mode="spec", max_new_tokens=25,
                                                                        block_length=8))
    for result in out:
        assert result.tokens == truth[:25]
    # 1 + 2 * ceil(24 / (c + 1)) forwards with c = 1, 3, 5
    assert [r.forwards for r in out] == [1 + 2 * 12, 1 + 2 * 6, 1 + 2 * 4]
    assert len(engine.steps) == max(r.forwards for r in out)  # every step carries every running sequence
    assert max(len(s) for s in engine.steps) == 3


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_spec_keeps_a_mask_token_the_verifier_chose(threshold):
    # AR's third token is the mask id itself; a round ending on it opens the next block with it
    truth = [1, 2, M, *range(4, 40)]
    ar_engine = scripted.ScriptedEngine(truth)
    ar = generate(ar_engine, [[5]], GenerationConfig(mode="ar", max_new_tokens=8))[0]
    engine = scripted.ScriptedEngine(truth, accept=[0] * 50)
    spec = generate(engine, [[5]], GenerationConfig(mode="spec", max_new_tokens=8, block_length=4,
                                                    threshold=threshold))[0]
    assert ar.tokens == truth[:8]
    assert spec.tokens == ar.tokens
    assert all(row.tokens[0] == truth[row.past - 1] for row in engine.rows_of(scripted.VERIFY))


@pytest.mark.parametrize("has_lora,use_lora", [(True, True), (True, False), (False, True)])
def test_only_spec_drafts_use_the_adapter(has_lora, use_lora):
    rows = {}
    for mode in ("spec", "diffusion", "ar"):
        engine = scripted.ScriptedEngine(list(range(1, 41)), accept=[2] * 50, has_lora=has_lora)
        generate(engine, [[5, 6]], GenerationConfig(mode=mode, max_new_tokens=16, block_length=4, use_lora=use_lora))
        rows[mode] = engine.rows
    drafts = [r for r in rows["spec"] if r.role == scripted.DRAFT]
    assert drafts and all(r.lora == (has_lora and use_lora) for r in drafts)
    assert not any(r.lora for r in rows["spec"] if r.role != scripted.DRAFT)  # verify and prefill: never
    assert not any(r.lora for r in rows["diffusion"] + rows["ar"])


def test_draft_loop_is_bounded_when_model_predicts_mask():
    engine = scripted.ScriptedEngine(list(range(1, 41)), draft_mask=True)
    out = generate(engine, [[5]], GenerationConfig(mode="spec", max_new_tokens=6, block_length=4, threshold=0.5))[0]
    assert out.tokens == list(range(1, 7))  # verify still makes progress: one token per iteration
    per_iteration = "".join("d" if c == "draft" else "v" for c in engine.calls if c != "prefill")
    assert per_iteration == "ddddv" * 5  # at most L draft passes per block
    assert out.forwards == 1 + 5 * 5 == len(engine.steps)


def test_diffusion_eos_inside_block_stops_denoising():
    truth = list(range(1, 40))
    engine = scripted.ScriptedEngine(truth, denoise={3: scripted.EOS})
    out = generate(engine, [[5]], GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=8,
                                                   threshold=0.5))[0]
    assert out.tokens == truth[:3] + [scripted.EOS]
    assert out.finish_reason == "eos"
    assert engine.calls == ["prefill", "draft"]  # one pass fills the block; no re-encode after EOS
    assert out.forwards == 2


def test_diffusion_mask_prediction_is_bounded():
    engine = scripted.ScriptedEngine(list(range(1, 40)), draft_mask=True)
    out = generate(engine, [[5]], GenerationConfig(mode="diffusion", max_new_tokens=8, block_length=4,
                                                   threshold=0.9))[0]
    assert engine.calls == ["prefill"] + ["draft"] * 4 + ["verify"] + ["draft"] * 4  # L passes per block
    assert out.tokens[0] == 1 and out.tokens[1:4] == [M] * 3
    assert out.forwards == 10


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
        batch = [b.tokens for b in run(engine, prompts, **kw)]
        assert batch == [b.tokens for b in run(engine, prompts, **kw)]
        assert batch == [run(engine, [p], **kw)[0].tokens for p in prompts]
        # it really samples: not the greedy output, and another seed gives another output
        greedy = [b.tokens for b in run(engine, prompts, **{**kw, "temperature": 0.0})]
        assert all(s != g for s, g in zip(batch, greedy, strict=True)), mode
        other = [b.tokens for b in run(engine, prompts, **{**kw, "seed": 4})]
        assert all(s != o for s, o in zip(batch, other, strict=True)), mode


def test_sampled_requests_of_different_modes_share_steps_and_equal_alone(engine):
    prompts = prompts_for(24, 3)
    configs = [GenerationConfig(mode=mode, max_new_tokens=16, block_length=8, temperature=1.0, seed=seed)
               for mode, seed in (("ar", 1), ("diffusion", 2), ("spec", 3))]
    together = generate(engine, prompts, configs)
    for prompt, config, result in zip(prompts, configs, together, strict=True):
        alone = generate(engine, [prompt], config)[0]
        assert result.tokens == alone.tokens and result.forwards == alone.forwards, config.mode


def test_cancelled_sequences_leave_the_batch(engine):
    emitted: dict[int, list[int]] = {0: [], 1: [], 2: []}
    out = generate(engine, prompts_for(23, 3), GenerationConfig(mode="ar", max_new_tokens=20),
                   on_tokens=lambda i, new: emitted[i].extend(new),
                   is_cancelled=lambda i: i == 1 and len(emitted[1]) >= 3)
    # cancelled once it had 3 tokens: it stops before the next forward, the others run to the end
    assert out[1].finish_reason == "cancelled" and out[1].tokens == emitted[1] and len(out[1].tokens) == 3
    assert out[1].forwards == 3
    assert len(out[0].tokens) == 20 and len(out[2].tokens) == 20


# -- bad requests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,prompts,message", [
    ({"mode": "diffusion", "max_new_tokens": 10, "block_length": 4}, [[1]], "must be a multiple of block_length"),
    ({"threshold": 1.5}, [[1]], "threshold must be within [0, 1]"),
    ({"threshold": -0.1}, [[1]], "threshold must be within [0, 1]"),
    ({}, [[1, 256]], "token id 256 outside the vocabulary"),
    ({}, [[1, -1]], "token id -1 outside the vocabulary"),
    ({"max_new_tokens": 0}, [[1]], "max_new_tokens must be a positive integer"),
    ({"mode": "beam"}, [[1]], "unknown mode 'beam'"),
    ({}, [[]], "prompt is empty"),
    ({"max_new_tokens": 4000}, [[1] * 200], "beyond the engine's maximum sequence length"),
])
def test_bad_requests(engine, kw, prompts, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        new_request(engine, prompts[0], GenerationConfig(**kw))


def test_a_confidence_equal_to_the_threshold_is_committed():
    """Diffusion's and infill's threshold is "at or above": a slot exactly at it commits with the best one."""
    import numpy as np

    from trimode.runtime.modes.diffusion import commit_step

    mask = 100
    block = [5, mask, mask, mask, mask]
    x0 = np.array([0, 21, 22, 23, 24])
    confidence = np.array([0.0, 0.5, 0.25, 0.9, 0.49999], dtype=np.float32)
    chosen = commit_step(block, x0, confidence, mask, threshold=0.5, count=0)
    assert chosen == [1, 3] and block == [5, 21, mask, 23, mask]


def test_diffusion_streams_each_settled_run_and_the_seed_at_once(engine):
    """A committed slot never changes, so the leading committed run of a block is final when committed: the
    seed is emitted with the prefill (the first token a block earlier than the whole block), and the pieces
    concatenate to exactly the output."""
    config = GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=8)
    pieces: list[list[int]] = []
    (result,) = generate(engine, [[1, 5, 6, 7]], config, on_tokens=lambda _i, ids: pieces.append(list(ids)))
    assert sum(pieces, []) == result.tokens
    assert result.first_token_step == 1 and len(pieces[0]) >= 1  # the prefill's step already emitted
    assert len(pieces) > 2  # more than one piece per block
    infill = GenerationConfig(mode="infill", max_new_tokens=6, suffix=(7, 8))
    pieces.clear()
    (filled,) = generate(engine, [[1, 5, 6, 7]], infill, on_tokens=lambda _i, ids: pieces.append(list(ids)))
    assert sum(pieces, []) == filled.tokens and len(pieces) > 1
