"""One request never hurts another: faults fail their own request, limits are enforced at submission.

The faults are real where the engine can produce them: a checkpoint whose embedding row for one token is NaN
gives non-finite logits to every request that contains that token (and leaves NaN keys and values in the
pages it used, which later requests reuse). Where no real input makes a component fail (a mode's state, the
batched forward), the failure is injected into that one request or row; what is tested is the scheduler's
isolation of it, never the injected component.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.errors import OverloadedError, ShuttingDownError
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig, RequestError, new_request
from trimode.runtime.sampler import SAMPLE, Pick, decide, make_generator
from trimode.runtime.scheduler.auto_block import candidates
from trimode.runtime.scheduler.loop import EngineLoop, Job
from trimode.runtime.scheduler.scheduler import Scheduler
from trimode.runtime.serving.frontend import Frontend, ServingLimits, Settings

from .conftest import build_checkpoint
from .test_engine_loop import ListSink

POISON = 200  # the token whose embedding is NaN in the poisoned checkpoint

INNOCENT = [
    ([3, 4, 5, 6, 7], GenerationConfig(mode="ar", max_new_tokens=12)),
    ([9, 8, 7, 6, 5, 4, 3, 2, 21, 22, 23], GenerationConfig(mode="spec", max_new_tokens=14, block_length=4)),
    ([30, 31, 32], GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=8)),
    ([40, 41, 42, 43], GenerationConfig(mode="quad", max_new_tokens=11, block_length=3)),
    ([50, 51, 52, 53, 54], GenerationConfig(mode="infill", max_new_tokens=5, suffix=(60, 61, 62))),
    ([70, 71, 72], GenerationConfig(mode="ar", max_new_tokens=10, temperature=0.8, seed=3, top_k=20)),
    ([80, 81, 82, 83], GenerationConfig(mode="spec", max_new_tokens=10, block_length=4, temperature=1.0, seed=5)),
]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """The tiny checkpoint with embedding row POISON set to NaN, as an fp32 torch engine."""
    checkpoint = build_checkpoint(tmp_path_factory.mktemp("poisoned") / "ckpt")
    weights = load_file(checkpoint / "model.safetensors")
    weights["encoder.embed_tokens.weight"][POISON] = float("nan")
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    return engine_from_checkpoint(checkpoint, dtype="fp32")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, dtype="fp32")


def solo(engine, prompt, config):
    return generate(engine, [prompt], config, scheduler=Scheduler(engine, max_batch_size=1))[0]


def submit(scheduler, prompt, config, **kw):
    return scheduler.submit(new_request(scheduler.engine, prompt, config), **kw)


# -- faults -------------------------------------------------------------------------------------------------


def test_non_finite_logits_fail_their_request_alone_and_its_pages_are_reused_cleanly(poisoned):
    expected = [solo(poisoned, p, c).tokens for p, c in INNOCENT]
    cache = poisoned.allocate_cache(12, prefix_caching=False)  # small: every page is reused below
    scheduler = Scheduler(poisoned, max_batch_size=16, cache=cache)
    bad_configs = [GenerationConfig(mode=m, max_new_tokens=8, block_length=4) for m in ("ar", "spec", "quad")]
    bad_configs.append(GenerationConfig(mode="ar", max_new_tokens=8, temperature=0.9, seed=1))
    bad = [submit(scheduler, [3, POISON] + list(range(20, 40)), c) for c in bad_configs]
    good = [submit(scheduler, p, c) for p, c in INNOCENT]
    scheduler.run()
    for seq in bad:
        assert seq.finish_reason == "error" and "not finite" in seq.error, (seq.config.mode, seq.error)
    assert [s.tokens for s in good] == expected
    assert scheduler.pages.in_use == 0
    again = [submit(scheduler, p, c) for p, c in INNOCENT]  # on pages that held NaN keys and values
    scheduler.run()
    assert [s.tokens for s in again] == expected


def test_a_temperature_too_small_to_divide_by_is_greedy(engine):
    for temperature in (1e-40, 1e-300, 5e-324):
        config = GenerationConfig(mode="ar", max_new_tokens=10, temperature=temperature, seed=4)
        assert new_request(engine, [1, 2], config).config.temperature == 0.0
    scheduler = Scheduler(engine, max_batch_size=8)
    tiny = [submit(scheduler, [1, 2 + i], GenerationConfig(mode=m, max_new_tokens=12, block_length=4,
                                                           temperature=1e-40, seed=i))
            for i, m in enumerate(("ar", "spec", "quad", "diffusion"))]
    good = [submit(scheduler, p, c) for p, c in INNOCENT]
    scheduler.run()
    for seq, mode in zip(tiny, ("ar", "spec", "quad", "diffusion"), strict=True):
        config = GenerationConfig(mode=mode, max_new_tokens=12, block_length=4)
        assert seq.finish_reason != "error" and seq.tokens == solo(engine, seq.prompt, config).tokens
    assert [s.tokens for s in good] == [solo(engine, p, c).tokens for p, c in INNOCENT]


class _Row:
    def __init__(self, n: int) -> None:
        self.pick = Pick(SAMPLE)
        self.num_logits = n
        self.scores: list[int] = []


class _Seq:
    def __init__(self, temperature: float, seed: int) -> None:
        self.config = GenerationConfig(temperature=temperature, top_k=0, top_p=1.0, seed=seed)
        self.generator = make_generator(seed)
        self.tokens: list[int] = []


def test_decide_flags_a_bad_row_and_decides_the_others_as_alone():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    logits[2, 7] = float("nan")  # row 1 (logits 2-3) is broken
    plans, seqs = [_Row(2), _Row(2), _Row(2)], [_Seq(0.7, 1), _Seq(0.7, 2), _Seq(0.0, 3)]
    decided = decide(logits, plans, seqs)
    assert decided[1].error is not None and "not finite" in decided[1].error
    assert decided[0].error is None and decided[2].error is None
    for index, (a, b) in ((0, (0, 2)), (2, (4, 6))):
        alone = decide(logits[a:b], [plans[index]], [_Seq(seqs[index].config.temperature, index + 1)])[0]
        assert np.array_equal(alone.tokens, decided[index].tokens)


def test_a_distribution_that_overflows_is_flagged_not_raised():
    logits = torch.zeros(2, 10)
    logits[1, 3] = 3e38  # finite, but / 0.5 overflows to inf: softmax is NaN
    decided = decide(logits, [_Row(1), _Row(1)], [_Seq(0.5, 1), _Seq(0.5, 2)])
    assert decided[0].error is None and decided[1].error is not None


def test_a_mode_that_raises_fails_its_request_alone(engine):
    scheduler = Scheduler(engine, max_batch_size=16)
    broken = submit(scheduler, [1, 2, 3], GenerationConfig(mode="spec", max_new_tokens=12, block_length=4))
    consume = broken.mode.consume

    def failing(seq, plan, picks):
        if seq.forwards >= 2:
            raise IndexError("a broken mode state")
        return consume(seq, plan, picks)

    broken.mode.consume = failing
    good = [submit(scheduler, p, c) for p, c in INNOCENT]
    scheduler.run()
    assert broken.finish_reason == "error" and broken.error == "generation failed: IndexError: a broken mode state"
    assert [s.tokens for s in good] == [solo(engine, p, c).tokens for p, c in INNOCENT]
    assert scheduler.pages.in_use == 0


class RowFailingEngine:
    """The tiny engine, except that a forward whose batch holds a row containing `bad_token` raises."""

    def __init__(self, engine, bad_token: int) -> None:
        self.inner = engine
        self.bad_token = bad_token
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, cache, batch):
        self.calls.append(len(batch.rows))
        if any(self.bad_token in row.tokens for row in batch.rows):
            raise MemoryError("one row too many")
        return self.inner.step(cache, batch)


def test_a_failing_batched_forward_is_retried_row_by_row(engine):
    expected = [solo(engine, p, c).tokens for p, c in INNOCENT]
    used = {t for tokens in expected for t in tokens} | {t for p, c in INNOCENT for t in (*p, *c.suffix)}
    used.add(engine.config.mask_token_id)
    bad_token = next(t for t in range(2, engine.config.vocab_size) if t not in used)
    failing = RowFailingEngine(engine, bad_token)
    scheduler = Scheduler(failing, max_batch_size=16, cache=engine.allocate_cache(64))
    good = [submit(scheduler, p, c) for p, c in INNOCENT]
    bad = submit(scheduler, [5, bad_token, 7], GenerationConfig(mode="ar", max_new_tokens=3))
    scheduler.run()
    assert bad.finish_reason == "error" and bad.error == "generation failed: MemoryError: one row too many"
    assert [s.tokens for s in good] == expected
    rows = len(INNOCENT) + 1
    assert failing.calls[: 1 + rows] == [rows] + [1] * rows  # the batch, then each row alone, once
    assert failing.calls[1 + rows] == len(INNOCENT)  # then the step goes on without the failed request
    assert scheduler.pages.in_use == 0


# -- limits -------------------------------------------------------------------------------------------------


def test_rows_wider_than_the_row_limit_are_refused_at_submission(engine):
    scheduler = Scheduler(engine, max_row_tokens=100)
    quad = new_request(engine, [1, 2], GenerationConfig(mode="quad", max_new_tokens=8, block_length=10))
    with pytest.raises(RequestError, match=r"quad row at block length 10 carries 110 tokens.*\(100, --max-row"):
        scheduler.check(quad)
    with pytest.raises(RequestError, match="--max-row-tokens"):
        scheduler.submit(quad)
    infill = new_request(engine, [1, 2], GenerationConfig(mode="infill", max_new_tokens=98, suffix=(3, 4, 5)))
    with pytest.raises(RequestError, match=r"a hole of 98 \+ a suffix of 3 tokens\) carries 101"):
        scheduler.check(infill)
    fits = new_request(engine, [1, 2], GenerationConfig(mode="quad", max_new_tokens=8, block_length=9))
    scheduler.check(fits)
    assert not scheduler.has_work


def test_auto_only_picks_block_lengths_whose_rows_fit(engine):
    assert candidates(engine.limits, "quad", 100) == [1, 2, 3, 4, 6, 8]
    assert candidates(engine.limits, "spec", 100) == [1, 2, 3, 4, 6, 8, 12, 16]
    scheduler = Scheduler(engine, max_row_tokens=20)
    seq = submit(scheduler, [1, 2, 3], GenerationConfig(mode="quad", max_new_tokens=6, block_length="auto"))
    assert seq.block_length * (seq.block_length + 1) <= 20
    scheduler.run()
    assert seq.finish_reason in ("eos", "length")


def _jobs(engine, count: int, max_new_tokens: int = 4) -> list[Job]:
    config = GenerationConfig(mode="ar", max_new_tokens=max_new_tokens)
    return [Job(new_request(engine, [1, 2 + i], config), ListSink()) for i in range(count)]


def test_the_queue_is_bounded_and_a_request_is_queued_whole_or_not_at_all(engine):
    loop = EngineLoop(engine, max_queued_jobs=4)  # not started: nothing leaves the queue
    loop.submit_all(_jobs(engine, 3))
    with pytest.raises(OverloadedError, match="3 jobs wait for admission and this request brings 2"):
        loop.submit_all(_jobs(engine, 2))
    assert loop.queue_length() == 3
    with pytest.raises(RequestError, match="more than may ever wait"):
        loop.submit_all(_jobs(engine, 5))
    single = _jobs(engine, 2)
    loop.submit(single[0])
    loop.submit(single[1])  # the one-job form reports a full queue through its sink
    assert single[0].sink.error is None and "the server is busy" in single[1].sink.error
    loop.start()
    loop.stop()


def test_drain_refuses_new_jobs_and_gives_every_running_one_a_final_response(engine):
    loop = EngineLoop(engine)
    loop.start()
    jobs = _jobs(engine, 3, max_new_tokens=2000)
    loop.submit_all(jobs)
    while not all(job.sink.chunks for job in jobs):
        time.sleep(0.01)
    loop.drain(0.2)
    with pytest.raises(ShuttingDownError):
        loop.submit_all(_jobs(engine, 1))
    deadline = time.monotonic() + 60
    while not loop.idle and time.monotonic() < deadline:
        time.sleep(0.02)
    assert loop.idle
    for job in jobs:
        assert job.sink.done.is_set() and job.sink.result.finish_reason in ("cancelled", "eos")
        assert job.sink.result.tokens == [t for chunk in job.sink.chunks for t in chunk]
    loop.stop()


def test_a_request_asking_for_too_many_generations_is_refused(engine):
    frontend = Frontend(engine, limits=ServingLimits(max_jobs_per_request=5))
    frontend.prepare([[1, 2]] * 5, Settings(max_tokens=2), n=1)
    with pytest.raises(RequestError, match=r"6 generations \(3 prompts x n=2\); at most 5"):
        frontend.prepare([[1, 2]] * 3, Settings(max_tokens=2), n=2)


def test_a_decoding_failure_fails_its_request(engine):
    frontend = Frontend(engine)
    events: list = []
    done = threading.Event()
    item = frontend.prepare([[1, 2]], Settings(max_tokens=6, mode="ar"))[0]

    def broken_decode(ids):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken tokenizer")

    frontend.decode = broken_decode  # the text assembly of this front end's sinks calls it
    frontend.submit(item, lambda event: (events.append(event), event[0] != "text" and done.set()))
    assert done.wait(60)
    assert events[-1][0] == "error" and "decoding the output failed" in events[-1][1]
    frontend.stop()


@pytest.mark.parametrize("policy, most", [("decode-first", 0), ("prefill-first", 1)])
def test_a_running_request_never_waits_more_than_the_stated_steps(engine, policy, most):
    """Counted, not timed: with long prompts prefilling in chunks and the widest rows the limits allow arriving,
    a request past its prefill goes at most `most` consecutive steps without a row."""
    scheduler = Scheduler(engine, max_step_tokens=128, max_row_tokens=60, policy=policy)
    ordinary = [submit(scheduler, [1, 20 + i, 3], GenerationConfig(mode=m, max_new_tokens=24, block_length=4))
                for i, m in enumerate(("ar", "spec", "quad", "diffusion"))]
    scheduler.step()
    scheduler.step()
    heavy = [submit(scheduler, [2 + t % 250 for t in range(600)], GenerationConfig(mode="ar", max_new_tokens=4)),
             submit(scheduler, [5 + t % 240 for t in range(400)], GenerationConfig(mode="spec", max_new_tokens=4,
                                                                                 block_length=4)),
             submit(scheduler, [1, 2], GenerationConfig(mode="quad", max_new_tokens=20, block_length=6)),
             submit(scheduler, [1, 2], GenerationConfig(mode="infill", max_new_tokens=50, suffix=(4, 5, 6)))]
    skipped, worst = [0] * 4, [0] * 4
    while scheduler.has_work:
        before = [s.forwards for s in ordinary]
        scheduler.step()
        for k, seq in enumerate(ordinary):
            if not seq.done and not seq.prefilling:
                skipped[k] = 0 if seq.forwards > before[k] else skipped[k] + 1
                worst[k] = max(worst[k], skipped[k])
    assert max(worst) == most, worst
    assert all(s.finish_reason in ("eos", "length") for s in heavy)
    for seq in ordinary:
        assert seq.tokens == solo(engine, seq.prompt, seq.config).tokens


def test_admission_keeps_the_running_rows_within_one_step(engine):
    scheduler = Scheduler(engine, max_step_tokens=100)
    config = GenerationConfig(mode="quad", max_new_tokens=12, block_length=6)  # rows of 42 tokens
    seqs = [submit(scheduler, [1, 2 + i], config) for i in range(4)]
    peak = 0
    while scheduler.has_work:
        scheduler.step()
        peak = max(peak, len(scheduler.running))
    assert peak == 2  # 3 x 42 > 100
    for seq in seqs:
        assert seq.tokens == solo(engine, seq.prompt, config).tokens
