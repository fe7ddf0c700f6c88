"""The iteration-level scheduler: any mix of requests in one forward per step, each getting its solo result."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trimode.plugins.reference import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.step import ChunkRow, StepBatch
from trimode.runtime.generate import GenerationConfig, RequestError, generate
from trimode.runtime.modes.quad import quad_layout
from trimode.runtime.scheduler.scheduler import Scheduler, shared_scheduler


def rand_tokens(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, dtype="fp32")


MIX = [
    (rand_tokens(5, 1), GenerationConfig(mode="ar", max_new_tokens=9)),
    (rand_tokens(17, 2), GenerationConfig(mode="spec", max_new_tokens=14, block_length=4)),
    (rand_tokens(3, 3), GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=8)),
    (rand_tokens(30, 4), GenerationConfig(mode="quad", max_new_tokens=11, block_length=3)),
    (rand_tokens(8, 5), GenerationConfig(mode="spec", max_new_tokens=7, block_length=8, threshold=0.2)),
    (rand_tokens(12, 6), GenerationConfig(mode="ar", max_new_tokens=12, temperature=0.8, seed=7, top_k=20)),
    (rand_tokens(6, 7), GenerationConfig(mode="diffusion", max_new_tokens=8, block_length=4, threshold=0.5,
                                         temperature=0.7, seed=2)),
    (rand_tokens(9, 8), GenerationConfig(mode="infill", max_new_tokens=5, suffix=tuple(rand_tokens(4, 9)))),
    (rand_tokens(4, 10), GenerationConfig(mode="spec", max_new_tokens=10, block_length=4, temperature=1.0,
                                          seed=5, top_p=0.9)),
]


def solo(engine, prompt, config):
    return generate(engine, [prompt], config, scheduler=Scheduler(engine, num_slots=1))[0]


def test_mixed_requests_arriving_at_different_steps_equal_their_solo_runs(engine):
    scheduler = Scheduler(engine, num_slots=4, max_step_tokens=24)  # fewer slots than requests: some wait
    arrivals = [0, 0, 1, 1, 3, 4, 4, 6, 9]
    pending = list(zip(arrivals, MIX, strict=True))
    sequences = []
    while pending or scheduler.has_work:
        while pending and pending[0][0] <= scheduler.steps:
            _, (prompt, config) = pending.pop(0)
            sequences.append(scheduler.submit(prompt, config))
        scheduler.step()
    for seq, (prompt, config) in zip(sequences, MIX, strict=True):
        alone = solo(engine, prompt, config)
        assert seq.tokens == alone.tokens, config
        assert seq.forwards == alone.forwards, config
    assert max(s.result().steps_waited for s in sequences) > 0  # the queue was really used


def test_one_forward_per_step_for_a_mixed_batch(engine):
    calls = []
    original = engine.step

    def counting(cache, batch):
        calls.append(sorted({r.mask_kind for r in batch.rows}))
        return original(cache, batch)

    engine.step = counting
    try:
        scheduler = Scheduler(engine, num_slots=5)
        configs = [GenerationConfig(mode="ar", max_new_tokens=10)] * 2 + \
            [GenerationConfig(mode="spec", max_new_tokens=10, block_length=4)] * 2 + \
            [GenerationConfig(mode="diffusion", max_new_tokens=8, block_length=4)]
        for i, config in enumerate(configs):
            scheduler.submit(rand_tokens(6 + i, 20 + i), config)
        scheduler.run()
    finally:
        del engine.step
    assert len(calls) == scheduler.steps
    assert any(kinds == [CAUSAL, BIDIRECTIONAL] for kinds in calls)  # decode, verify and draft rows together


def test_a_late_request_gets_its_first_token_within_a_bounded_number_of_steps(engine):
    scheduler = Scheduler(engine, num_slots=3, max_step_tokens=16)
    scheduler.submit(rand_tokens(60, 30), GenerationConfig(mode="ar", max_new_tokens=200))
    scheduler.submit(rand_tokens(10, 31), GenerationConfig(mode="spec", max_new_tokens=200, block_length=8))
    for _ in range(5):
        scheduler.step()
    late = scheduler.submit(rand_tokens(40, 32), GenerationConfig(mode="ar", max_new_tokens=4))
    while not late.done:
        scheduler.step()
    # the running rows use 1 + 8 tokens, so the late prompt gets >= 7 tokens per step: 40 tokens in <= 6 steps
    first = late.result().first_token_step
    assert 1 <= first <= 6
    assert late.result().steps_waited == 0


def test_finished_slots_are_reused_and_cancellation_frees_a_slot(engine):
    scheduler = Scheduler(engine, num_slots=2)
    cancel = {"now": False}
    short = scheduler.submit(rand_tokens(5, 40), GenerationConfig(mode="ar", max_new_tokens=2))
    doomed = scheduler.submit(rand_tokens(5, 41), GenerationConfig(mode="ar", max_new_tokens=500),
                              is_cancelled=lambda _i: cancel["now"])
    third = scheduler.submit(rand_tokens(5, 42), GenerationConfig(mode="ar", max_new_tokens=3))
    fourth = scheduler.submit(rand_tokens(5, 43), GenerationConfig(mode="ar", max_new_tokens=3))
    scheduler.step()
    assert third.slot == -1 and fourth.slot == -1  # both wait: two slots only
    while not short.done:
        scheduler.step()
    scheduler.step()
    assert third.slot == short.slot  # the finished request's slot, reused at the next step
    cancel["now"] = True
    scheduler.step()
    assert doomed.finish_reason == "cancelled" and fourth.slot == doomed.slot
    scheduler.run()
    assert third.result().tokens == solo(engine, rand_tokens(5, 42), third.config).tokens


def test_the_cache_is_allocated_once(engine):
    scheduler = shared_scheduler(engine, 2)
    address = scheduler.cache.k.data_ptr()
    for seed in range(4):
        generate(engine, [rand_tokens(7, seed), rand_tokens(3, seed + 9)],
                 GenerationConfig(mode="spec", max_new_tokens=6, block_length=4))
    assert shared_scheduler(engine, 2) is scheduler and scheduler.cache.k.data_ptr() == address


def test_a_request_that_can_never_fit_is_refused_at_submission(engine):
    scheduler = Scheduler(engine, num_slots=1)
    with pytest.raises(RequestError, match="maximum sequence length"):
        scheduler.submit([3] * 10, GenerationConfig(mode="ar", max_new_tokens=engine.limits.max_seq_len))
    assert not scheduler.has_work


def test_a_mixed_forward_gives_each_row_its_solo_logits(engine):
    prompts = [rand_tokens(n, 50 + n) for n in (9, 4, 13, 6, 7)]

    def prefilled(slots):
        cache = engine.new_cache(5)
        rows = [ChunkRow(s, prompts[s], write=True) for s in slots]
        engine.step(cache, StepBatch.from_rows(rows, cache))
        return cache

    quad_tokens, quad_positions = quad_layout(len(prompts[3]), rand_tokens(3, 60), 100)
    rows = [ChunkRow(0, [7], CAUSAL, write=True, logit_offsets=[0]),
            ChunkRow(1, rand_tokens(5, 61), BIDIRECTIONAL, lora=True, logit_offsets=list(range(5))),
            ChunkRow(2, rand_tokens(6, 62), CAUSAL, write=True, logit_offsets=list(range(6))),
            ChunkRow(3, quad_tokens, QUAD, mask_param=3, write=True, logit_offsets=list(range(12)),
                     positions=quad_positions),
            ChunkRow(4, rand_tokens(4, 63) + [100] * 3, PREFIX_BLOCK, mask_param=3, write=True,
                     logit_offsets=list(range(7)))]
    cache = prefilled(range(5))
    draft_slot_before = cache.k[:, 1].clone()
    mixed = engine.step(cache, StepBatch.from_rows(rows, cache))
    assert torch.equal(cache.k[:, 1], draft_slot_before)  # the bidirectional row wrote nothing
    start = 0
    for row in rows:
        alone_cache = prefilled([row.slot])
        alone = engine.step(alone_cache, StepBatch.from_rows([row], alone_cache))
        got = mixed[start : start + len(row.logit_offsets)]
        start += len(row.logit_offsets)
        assert float((got - alone).abs().max()) < 1e-5
        n = alone_cache.lengths[row.slot]
        assert cache.lengths[row.slot] == n and torch.allclose(cache.k[:, row.slot, :n], alone_cache.k[:, row.slot, :n],
                                                               atol=1e-6)


class HostReads(TorchDispatchMode):
    """Counts what would stall a GPU: reading a tensor's values on the host (item/int/bool/tolist/numpy/cpu)
    and data-dependent ops (nonzero)."""

    SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("config", [GenerationConfig(mode="ar", max_new_tokens=8),
                                    GenerationConfig(mode="diffusion", max_new_tokens=8, block_length=4),
                                    GenerationConfig(mode="spec", max_new_tokens=8, block_length=4),
                                    GenerationConfig(mode="quad", max_new_tokens=8, block_length=3)],
                         ids=lambda c: c.mode)
def test_at_most_one_host_transfer_per_step(engine, monkeypatch, batch, config):
    reads = HostReads()
    transfers = {"count": 0}
    for name in ("tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            transfers["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    scheduler = Scheduler(engine, num_slots=batch)
    for i in range(batch):
        scheduler.submit(rand_tokens(5 + i, 70 + i), config)
    per_step = []
    while scheduler.has_work:
        before = reads.count + transfers["count"]
        with reads:
            ran = scheduler.step()
        if ran:
            per_step.append(reads.count + transfers["count"] - before)
    monkeypatch.undo()
    assert per_step and max(per_step) <= 1, per_step
