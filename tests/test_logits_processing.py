"""Request options that change the logits (penalties, logit bias, min_tokens, ignore_eos, stop token ids) and
log-probabilities, through the real scheduler in every mode.

The demo model drafts well, so speculative rounds accept long drafted prefixes: a verify position processed
without its drafted prefix (the bug these tests exist for) makes spec or quad differ from AR here. Prompt
logprobs are checked against transformers' own model on the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from trimode.demo import demo_model_path
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.errors import RequestError
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig, RequestDefaults, generation_defaults, make_config
from trimode.runtime.scheduler.scheduler import Scheduler
from trimode.runtime.serving.text import load_tokenizer

from . import step_helpers as steps

PROMPTS = ["    def close(self):\n", "import os\n\ndef read(path):\n", "class Stack:\n    def push(self, x):\n"]
PENALTIES = dict(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1,
                 logit_bias=((11, -3.0), (25, 2.0)), min_tokens=20)


@pytest.fixture(scope="module")
def demo_engine():
    return engine_from_checkpoint(demo_model_path(), dtype="fp32")


@pytest.fixture(scope="module")
def prompts(demo_engine) -> list[list[int]]:
    tokenizer = load_tokenizer(demo_model_path() / "tokenizer.json")
    return [tokenizer.encode(p).ids for p in PROMPTS]


def run(engine, prompts, **options) -> list:
    return generate(engine, prompts, GenerationConfig(**{"max_new_tokens": 40, "block_length": 8, **options}))


@pytest.mark.parametrize("mode,block", [("spec", 8), ("spec", 16), ("quad", 4)])
def test_penalties_in_spec_and_quad_equal_ar(demo_engine, prompts, mode, block):
    ar = run(demo_engine, prompts, mode="ar", **PENALTIES)
    plain = run(demo_engine, prompts, mode="ar")
    fast = run(demo_engine, prompts, mode=mode, block_length=block, **PENALTIES)
    assert [r.tokens for r in fast] == [r.tokens for r in ar]
    assert [r.tokens for r in ar] != [r.tokens for r in plain]  # the options matter on these prompts
    rounds = sum(r.forwards - 1 for r in fast) / (2 if mode == "spec" else 1)  # spec: a draft and a verify
    assert sum(len(r.tokens) for r in fast) / rounds > 1.5  # drafts were accepted: their prefixes mattered


@pytest.mark.parametrize("mode", ["spec", "quad"])
def test_seeded_sampling_with_penalties_equals_ar(demo_engine, prompts, mode):
    options = dict(PENALTIES, temperature=0.7, top_k=40, seed=5)
    ar = run(demo_engine, prompts, mode="ar", **options)
    fast = run(demo_engine, prompts, mode=mode, block_length=4, **options)
    assert [r.tokens for r in fast] == [r.tokens for r in ar]


def test_each_penalty_rule_on_one_ar_step(demo_engine, prompts):
    """One decode step against the rules written out by hand on the raw logits."""
    from trimode.runtime.logits import Context, process_logits

    logits = torch.randn(2, demo_engine.config.vocab_size, generator=torch.Generator().manual_seed(0))

    class Seq:
        prompt = [3, 4, 5]
        tokens = [7, 7, 9]
        eos = demo_engine.config.eos_token_id
        constraint = None

    Seq.config = GenerationConfig(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                                  logit_bias=((12, 1.5),), min_tokens=4)
    got = process_logits(logits, Seq, [Context((), 3), Context((9,), 4)])
    for row, generated in ((0, [7, 7, 9]), (1, [7, 7, 9, 9])):
        want = logits[row].clone()
        for token in set(generated) | {3, 4, 5}:
            want[token] = want[token] / 2.0 if want[token] > 0 else want[token] * 2.0
        for token in set(generated):
            want[token] -= 0.5 * generated.count(token) + 0.25
        want[12] += 1.5
        if row == 0:  # output index 3 < min_tokens: EOS is barred
            want[Seq.eos] = float("-inf")
        assert torch.allclose(got[row], want)


def test_logit_bias_and_min_tokens_in_diffusion_follow_the_documented_rule(demo_engine, prompts):
    eos = demo_engine.config.eos_token_id
    forced = run(demo_engine, prompts[:1], mode="diffusion", block_length=8, logit_bias=((eos, 100.0),))
    assert forced[0].tokens[0] == eos  # the seed is processed: EOS first, and the output ends there
    held = run(demo_engine, prompts[:1], mode="diffusion", block_length=8, logit_bias=((eos, 100.0),),
               min_tokens=16)
    assert eos not in held[0].tokens[:16] and eos in held[0].tokens[16:]  # barred only below min_tokens


def test_ignore_eos_and_stop_token_ids(demo_engine, prompts):
    eos = demo_engine.config.eos_token_id
    options = dict(logit_bias=((eos, 100.0),), max_new_tokens=12)
    stops = run(demo_engine, prompts[:1], mode="ar", **options)
    assert stops[0].tokens == [eos] and stops[0].finish_reason == "eos"
    for mode in ("ar", "spec", "quad"):
        kept = run(demo_engine, prompts[:1], mode=mode, block_length=4, ignore_eos=True, **options)
        assert len(kept[0].tokens) == 12 and kept[0].finish_reason == "length", mode
    plain = run(demo_engine, prompts, mode="ar")
    stop = plain[0].tokens[9]
    for mode in ("ar", "spec", "quad"):
        cut = run(demo_engine, prompts[:1], mode=mode, block_length=4, stop_token_ids=(stop,))
        end = plain[0].tokens.index(stop) + 1
        assert cut[0].tokens == plain[0].tokens[:end] and cut[0].finish_reason == "stop", mode


@pytest.mark.parametrize("mode,block", [("spec", 8), ("quad", 4), ("quad", 8)])
def test_spec_and_quad_logprobs_equal_ar(demo_engine, prompts, mode, block):
    ar = run(demo_engine, prompts, mode="ar", logprobs=5)
    fast = run(demo_engine, prompts, mode=mode, block_length=block, logprobs=5)
    for a, f in zip(ar, fast, strict=True):
        assert f.tokens == a.tokens and len(f.logprobs) == len(a.logprobs) == len(a.tokens)
        for x, y in zip(a.logprobs, f.logprobs, strict=True):
            assert x.token == y.token
            assert abs(x.logprob - y.logprob) < 1e-5
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            # the tail's log-probabilities are larger numbers: the same 1e-5, relative to them
            assert max(abs(p - q) / max(1.0, abs(p)) for (_, p), (_, q) in zip(x.top, y.top, strict=True)) < 1e-5


def test_ar_logprobs_are_the_raw_log_softmax(demo_engine, prompts):
    """AR's first token's logprob is log_softmax of the prompt's last logit, whatever the options."""
    cache = steps.Seqs(demo_engine, 1)
    logits = steps.verify(demo_engine, cache, [0], torch.tensor([prompts[0]]))[0]
    raw = torch.log_softmax(logits[-1].float(), -1)
    for options in ({}, PENALTIES):
        first = run(demo_engine, prompts[:1], mode="ar", logprobs=3, **options)[0].logprobs[0]
        assert abs(first.logprob - float(raw[first.token])) < 1e-5
        top = torch.topk(raw, 3)
        assert [t for t, _ in first.top] == top.indices.tolist()


@pytest.mark.parametrize("mode", ["diffusion", "infill"])
def test_diffusion_logprobs_are_those_of_the_committing_pass(demo_engine, prompts, mode):
    """Greedy commits take each slot's argmax: its logprob is the pass's best, and the top-1 entry."""
    extra = {"suffix": tuple(prompts[1][:6]), "max_new_tokens": 8} if mode == "infill" else {}
    result = run(demo_engine, prompts[:2], mode=mode, logprobs=2, **extra)
    for r in result:
        assert len(r.logprobs) == len(r.tokens) > 0
        for entry in r.logprobs:
            assert entry.top[0][0] == entry.token and entry.logprob == pytest.approx(entry.top[0][1], abs=1e-6)
            assert entry.logprob <= 0 and entry.top[0][1] >= entry.top[1][1]


def test_prompt_logprobs_equal_transformers(tiny_checkpoint):
    from .test_transformers_parity import hf_model

    model, config = hf_model(tiny_checkpoint)
    engine = engine_from_checkpoint(tiny_checkpoint, dtype="fp32")
    prompt = torch.randint(0, config.vocab_size, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    scheduler = Scheduler(engine, max_step_tokens=32)  # the prompt's prefill takes three chunks
    for mode in ("ar", "spec", "quad", "diffusion"):
        config_ = GenerationConfig(mode=mode, max_new_tokens=4 if mode != "diffusion" else 4, block_length=4,
                                   prompt_logprobs=3, logprobs=1)
        seq = scheduler.submit(_request(engine, prompt, config_))
        scheduler.run()
        scores = seq.result().prompt_logprobs
        assert scores[0] is None and len(scores) == len(prompt)
        for i in range(1, len(prompt)):
            assert scores[i].token == prompt[i]
            assert abs(scores[i].logprob - float(want[i - 1, prompt[i]])) < 1e-4, (mode, i)
            assert [t for t, _ in scores[i].top] == torch.topk(want[i - 1], 3).indices.tolist()


def test_scoring_a_prompt_with_no_new_tokens_never_reads_the_prefix_cache(tiny_checkpoint):
    engine = engine_from_checkpoint(tiny_checkpoint, dtype="fp32")
    prompt = list(range(3, 60))
    scheduler = Scheduler(engine)
    scoring = GenerationConfig(mode="ar", max_new_tokens=0, prompt_logprobs=0)
    first = scheduler.submit(_request(engine, prompt, scoring))
    scheduler.run()
    again = scheduler.submit(_request(engine, prompt, scoring))
    scheduler.run()
    assert first.tokens == [] and first.finish_reason == "length"
    assert again.result().cached_tokens == 0
    a, b = first.result().prompt_logprobs, again.result().prompt_logprobs
    assert [e.logprob for e in a[1:]] == [e.logprob for e in b[1:]]
    reuse = scheduler.submit(_request(engine, prompt, GenerationConfig(mode="ar", max_new_tokens=2)))
    scheduler.run()
    assert reuse.result().cached_tokens > 0  # the scored prompt's pages were published for others
    with pytest.raises(RequestError, match="max_new_tokens"):
        _request(engine, prompt, GenerationConfig(mode="ar", max_new_tokens=0))


def _request(engine, prompt, config):
    from trimode.runtime.request import new_request

    return new_request(engine, prompt, config)


@pytest.mark.parametrize("bad,match", [
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logit_bias=((10**6, 1.0),)), "logit_bias"), (dict(logit_bias=((3, 500.0),)), "logit_bias"),
    (dict(min_tokens=100), "min_tokens"), (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(logprobs=21), "logprobs"), (dict(mode="diffusion", structured=("regex", "a+")), "supported in modes"),
])
def test_bad_options_are_refused_by_name(tiny_checkpoint, bad, match):
    engine = engine_from_checkpoint(tiny_checkpoint, dtype="fp32")
    config = dataclasses.replace(GenerationConfig(mode="ar", max_new_tokens=8, block_length=8), **bad)
    with pytest.raises(RequestError, match=match):
        _request(engine, [1, 2, 3], config)


def test_generation_config_written_by_transformers_supplies_defaults(tmp_path, tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    transformers.GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=20,
                                  repetition_penalty=1.15).save_pretrained(tmp_path)
    defaults = dict(generation_defaults(tmp_path))
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.15}
    engine = engine_from_checkpoint(tiny_checkpoint, dtype="fp32")
    made = make_config(engine.config, RequestDefaults(sampling=tuple(defaults.items())), mode="ar",
                       temperature=None, top_k=5)
    assert (made.temperature, made.top_p, made.top_k, made.repetition_penalty) == (0.6, 0.9, 5, 1.15)
    transformers.GenerationConfig(do_sample=False, repetition_penalty=1.2).save_pretrained(tmp_path)
    assert dict(generation_defaults(tmp_path)) == {"repetition_penalty": 1.2}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert generation_defaults(tmp_path) == ()  # greedy asked for: its temperature is not taken
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    assert generation_defaults(tmp_path) == ()
    assert math.isfinite(made.temperature)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "size": {"type": "integer"}, "tags": {"type": "array",
                                           "items": {"enum": ["io", "os", "re"]}, "maxItems": 3}},
          "required": ["name", "size", "tags"], "additionalProperties": False}


@pytest.mark.parametrize("kind,spec", [("json_schema", json.dumps(SCHEMA)), ("regex", r"def [a-z_]{1,12}\(self\):")])
def test_structured_output_in_spec_and_quad_equals_ar_and_follows_the_grammar(demo_engine, prompts, kind, spec):
    tokenizer = load_tokenizer(demo_model_path() / "tokenizer.json")
    results = {mode: run(demo_engine, prompts, mode=mode, block_length=8 if mode == "spec" else 4,
                         max_new_tokens=60, structured=(kind, spec))
               for mode in ("ar", "spec", "quad")}
    assert [r.tokens for r in results["spec"]] == [r.tokens for r in results["ar"]]
    assert [r.tokens for r in results["quad"]] == [r.tokens for r in results["ar"]]
    for r in results["ar"]:
        assert r.finish_reason == "eos", "the grammar ended and only EOS was allowed"
        text = tokenizer.decode(r.tokens[:-1])
        if kind == "json_schema":
            value = json.loads(text)
            assert set(value) == {"name", "size", "tags"} and isinstance(value["size"], int)
            assert len(value["name"]) <= 12 and set(value["tags"]) <= {"io", "os", "re"}
        else:
            import re

            assert re.fullmatch(spec, text), text
    plain = run(demo_engine, prompts, mode="ar", max_new_tokens=60)
    assert [r.tokens for r in plain] != [r.tokens for r in results["ar"]]
    if kind == "json_schema":  # chained drafts follow the grammar, so many are accepted (counted, not timed)
        tpf = {mode: sum(len(r.tokens) for r in rs) / sum(r.forwards - 1 for r in rs) for mode, rs in results.items()}
        assert tpf["spec"] > 1.05 and tpf["quad"] > 1.5, tpf  # unchained drafts: 0.96 and 1.23


def test_structured_output_refuses_a_thinking_budget_and_bad_grammars(demo_engine, prompts):
    from trimode.runtime.request import new_request
    from trimode.runtime.scheduler.scheduler import request_constraint

    with pytest.raises(RequestError, match="thinking"):
        new_request(demo_engine, prompts[0], GenerationConfig(mode="ar", structured=("regex", "a+"),
                                                              max_thinking_tokens=4, end_think_token_id=5))
    with pytest.raises(RequestError, match="regex"):
        request_constraint(demo_engine, GenerationConfig(mode="ar", structured=("regex", "[a-")))
