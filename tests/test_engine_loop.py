"""The serving loop every front end uses: jobs from many threads, any settings, each gets its solo result."""

from __future__ import annotations

import threading
import time

import pytest

from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.generate import generate
from trimode.runtime.modes.sequence import SequenceResult
from trimode.runtime.request import GenerationConfig, new_request
from trimode.runtime.scheduler.loop import EngineLoop, Job


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, max_batch_size=4)


def job(engine, prompt: list[int], config: GenerationConfig, sink) -> Job:
    return Job(new_request(engine, prompt, config), sink)


class ListSink:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.chunks: list[list[int]] = []
        self.result: SequenceResult | None = None
        self.error: str | None = None
        self.cancel_after = cancel_after
        self.done = threading.Event()

    def tokens(self, ids: list[int]) -> None:
        self.chunks.append(ids)

    def finish(self, result: SequenceResult) -> None:
        self.result = result
        self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()

    def cancelled(self) -> bool:
        return self.cancel_after is not None and sum(map(len, self.chunks)) >= self.cancel_after


def test_jobs_with_different_settings_share_steps_and_equal_solo_runs(engine):
    steps = []
    loop = EngineLoop(engine, on_step=steps.append)
    loop.start()
    modes = ["ar", "diffusion", "spec", "quad"]
    jobs = [job(engine, [1, 10 + i, 4], GenerationConfig(mode=modes[i % 4], max_new_tokens=8 + 8 * (i % 2),
                                                         block_length=4 + 4 * (i % 2), seed=i), ListSink())
            for i in range(10)]
    threads = [threading.Thread(target=loop.submit, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for item in jobs:
        assert item.sink.done.wait(120)
    loop.stop()
    for item in jobs:
        solo = generate(engine, [list(item.request.prompt)], item.request.config)[0]
        assert item.sink.result.tokens == solo.tokens and item.sink.result.forwards == solo.forwards
        assert sum(item.sink.chunks, []) == solo.tokens
    assert max(len(s.modes) for s in steps) > 1  # requests of different modes shared forwards
    assert max(s.rows for s in steps) <= engine.limits.max_batch_size


def test_cancellation_and_bad_requests(engine):
    loop = EngineLoop(engine, max_step_tokens=64)
    loop.start()
    config = GenerationConfig(mode="ar", max_new_tokens=64)
    cancelled, normal, bad = ListSink(cancel_after=3), ListSink(), ListSink()
    loop.submit(job(engine, [1, 2, 3], config, cancelled))
    loop.submit(job(engine, [1, 2, 4], config, normal))
    wide = GenerationConfig(mode="quad", max_new_tokens=8, block_length=8)  # 72-token rows, steps of 64
    loop.submit(job(engine, [1, 5], wide, bad))  # refused by the scheduler: the client hears why, the loop goes on
    for sink in (cancelled, normal, bad):
        assert sink.done.wait(60)
    assert cancelled.result.finish_reason == "cancelled" and len(cancelled.result.tokens) < 64
    assert normal.result.tokens == generate(engine, [[1, 2, 4]], config)[0].tokens
    assert "more than one step may hold" in bad.error
    after = ListSink()
    loop.submit(job(engine, [5], config, after))
    assert after.done.wait(60) and after.result is not None
    loop.stop()
    late = ListSink()
    loop.submit(job(engine, [5], config, late))
    assert late.error == "the model is shutting down"


def test_stop_cancels_what_runs(engine):
    loop = EngineLoop(engine)
    loop.start()
    sink = ListSink()
    loop.submit(job(engine, [1, 2, 3], GenerationConfig(mode="ar", max_new_tokens=3000), sink))
    while not sink.chunks:
        time.sleep(0.001)
    loop.stop()
    assert sink.done.wait(30) and sink.result.finish_reason in ("cancelled", "eos")


class FlakyEngine:
    """The tiny engine, except that its step raises while `broken` is set."""

    def __init__(self, engine) -> None:
        self.inner = engine
        self.broken = True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, cache, batch):
        if self.broken:
            raise RuntimeError("boom")
        return self.inner.step(cache, batch)


def test_the_loop_survives_a_failing_step(engine):
    flaky = FlakyEngine(engine)
    loop = EngineLoop(flaky)
    loop.start()
    config = GenerationConfig(mode="spec", max_new_tokens=8, block_length=4)
    sinks = [ListSink(), ListSink()]
    for number, sink in enumerate(sinks):
        loop.submit(job(engine, [1, number + 2], config, sink))
    for sink in sinks:
        assert sink.done.wait(60) and sink.error == "generation failed: RuntimeError: boom"
    flaky.broken = False
    healthy = ListSink()
    loop.submit(job(engine, [1, 2], config, healthy))
    assert healthy.done.wait(60) and healthy.result.tokens == generate(engine, [[1, 2]], config)[0].tokens
    loop.stop()
