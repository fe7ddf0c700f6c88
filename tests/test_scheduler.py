"""The iteration-level scheduler: any mix of requests in one forward per step, each getting its solo result."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.step import ChunkRow
from trimode.runtime.generate import generate
from trimode.runtime.modes.quad import quad_layout
from trimode.runtime.request import GenerationConfig, RequestError, new_request
from trimode.runtime.scheduler.scheduler import Scheduler, shared_scheduler

from .step_helpers import Seqs


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
    return generate(engine, [prompt], config, scheduler=Scheduler(engine, max_batch_size=1))[0]


def submit(scheduler, prompt, config, **kw):
    return scheduler.submit(new_request(scheduler.engine, prompt, config), **kw)


def test_mixed_requests_arriving_at_different_steps_equal_their_solo_runs(engine):
    scheduler = Scheduler(engine, max_batch_size=4, max_step_tokens=24)  # fewer rows than requests: some wait
    arrivals = [0, 0, 1, 1, 3, 4, 4, 6, 9]
    pending = list(zip(arrivals, MIX, strict=True))
    sequences = []
    while pending or scheduler.has_work:
        while pending and pending[0][0] <= scheduler.steps:
            _, (prompt, config) = pending.pop(0)
            sequences.append(submit(scheduler, prompt, config))
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
        scheduler = Scheduler(engine, max_batch_size=5)
        configs = [GenerationConfig(mode="ar", max_new_tokens=10)] * 2 + \
            [GenerationConfig(mode="spec", max_new_tokens=10, block_length=4)] * 2 + \
            [GenerationConfig(mode="diffusion", max_new_tokens=8, block_length=4)]
        for i, config in enumerate(configs):
            submit(scheduler, rand_tokens(6 + i, 20 + i), config)
        scheduler.run()
    finally:
        del engine.step
    assert len(calls) == scheduler.steps
    assert any(kinds == [CAUSAL, BIDIRECTIONAL] for kinds in calls)  # decode, verify and draft rows together


def test_a_late_request_gets_its_first_token_within_a_bounded_number_of_steps(engine):
    scheduler = Scheduler(engine, max_batch_size=3, max_step_tokens=16)
    submit(scheduler, rand_tokens(60, 30), GenerationConfig(mode="ar", max_new_tokens=200))
    submit(scheduler, rand_tokens(10, 31), GenerationConfig(mode="spec", max_new_tokens=200, block_length=8))
    for _ in range(5):
        scheduler.step()
    late = submit(scheduler, rand_tokens(40, 32), GenerationConfig(mode="ar", max_new_tokens=4))
    while not late.done:
        scheduler.step()
    # the running rows use 1 + 8 tokens, so the late prompt gets >= 7 tokens per step: 40 tokens in <= 6 steps
    first = late.result().first_token_step
    assert 1 <= first <= 6
    assert late.result().steps_waited == 0


def test_finished_requests_give_their_pages_back_and_waiting_ones_are_admitted(engine):
    scheduler = Scheduler(engine, max_batch_size=2, cache=engine.allocate_cache(64, prefix_caching=False))
    free = scheduler.pages.available
    cancel = {"now": False}
    short = submit(scheduler, rand_tokens(5, 40), GenerationConfig(mode="ar", max_new_tokens=2))
    doomed = submit(scheduler, rand_tokens(5, 41), GenerationConfig(mode="ar", max_new_tokens=500),
                    is_cancelled=lambda _i: cancel["now"])
    third = submit(scheduler, rand_tokens(5, 42), GenerationConfig(mode="ar", max_new_tokens=3))
    fourth = submit(scheduler, rand_tokens(5, 43), GenerationConfig(mode="ar", max_new_tokens=3))
    scheduler.step()
    assert third.admitted_step == -1 and fourth.admitted_step == -1  # both wait: two rows per step only
    assert scheduler.pages.available == free - len(short.pages) - len(doomed.pages)
    while not short.done:
        scheduler.step()
    assert short.pages == [] and not third.pages  # the finished request's pages went back at once
    scheduler.step()
    assert third.pages and third.admitted_step >= 0  # the next step admits a waiting request
    cancel["now"] = True
    scheduler.step()
    assert doomed.finish_reason == "cancelled" and doomed.pages == [] and fourth.admitted_step >= 0
    scheduler.run()
    assert scheduler.pages.available == free  # everything given back
    assert third.result().tokens == solo(engine, rand_tokens(5, 42), third.config).tokens


def test_the_cache_is_allocated_once(engine):
    scheduler = shared_scheduler(engine)
    address = scheduler.cache.k.data_ptr()
    for seed in range(4):
        generate(engine, [rand_tokens(7, seed), rand_tokens(3, seed + 9)],
                 GenerationConfig(mode="spec", max_new_tokens=6, block_length=4))
    assert shared_scheduler(engine) is scheduler and scheduler.cache is engine.cache
    assert engine.cache.k.data_ptr() == address


def test_a_request_that_can_never_fit_is_refused_at_submission(engine):
    scheduler = Scheduler(engine, max_batch_size=1)
    with pytest.raises(RequestError, match="maximum sequence length"):
        new_request(engine, [3] * 10, GenerationConfig(mode="ar", max_new_tokens=engine.limits.max_seq_len))
    small = Scheduler(engine, cache=engine.allocate_cache(4))  # 4 pages of 16 positions
    with pytest.raises(RequestError, match="more than the whole cache holds"):
        submit(small, [3] * 10, GenerationConfig(mode="ar", max_new_tokens=60))
    narrow = Scheduler(engine, max_step_tokens=64)
    with pytest.raises(RequestError, match="more than one step may hold"):
        submit(narrow, [3] * 10, GenerationConfig(mode="quad", max_new_tokens=8, block_length=8))
    assert not scheduler.has_work and not small.has_work and not narrow.has_work


def test_a_mixed_forward_gives_each_row_its_solo_logits(engine):
    prompts = [rand_tokens(n, 50 + n) for n in (9, 4, 13, 6, 7)]

    def prefilled(ids):
        seqs = Seqs(engine, 5, shuffle=len(ids))  # scattered pages: tables are not contiguous
        seqs.step(list(ids), [ChunkRow(prompts[s], write=True) for s in ids])
        return seqs

    quad_tokens, quad_positions = quad_layout(len(prompts[3]), rand_tokens(3, 60), 100)
    rows = [ChunkRow([7], CAUSAL, write=True, logit_offsets=[0]),
            ChunkRow(rand_tokens(5, 61), BIDIRECTIONAL, lora=True, logit_offsets=list(range(5))),
            ChunkRow(rand_tokens(6, 62), CAUSAL, write=True, logit_offsets=list(range(6))),
            ChunkRow(quad_tokens, QUAD, mask_param=3, write=True, logit_offsets=list(range(12)),
                     positions=quad_positions),
            ChunkRow(rand_tokens(4, 63) + [100] * 3, PREFIX_BLOCK, mask_param=3, write=True,
                     logit_offsets=list(range(7)))]
    seqs = prefilled(range(5))
    draft_before = seqs.keys(1)[0].clone()
    pool_before = seqs.cache.k.clone()
    mixed = seqs.step(list(range(5)), rows)
    assert torch.equal(seqs.keys(1)[0], draft_before)  # the bidirectional row wrote nothing
    touched = {page for s in range(5) if s != 1 for page in seqs.tables[s]}
    untouched = [p for p in range(seqs.cache.num_pages) if p not in touched]
    assert torch.equal(seqs.cache.k[:, untouched], pool_before[:, untouched])  # no other page changed
    start = 0
    for index, row in enumerate(rows):
        alone = prefilled([index])
        got_alone = alone.step([index], [row])
        got = mixed[start : start + len(row.logit_offsets)]
        start += len(row.logit_offsets)
        assert float((got - got_alone).abs().max()) < 1e-5
        n = alone.lengths[index]
        assert seqs.lengths[index] == n and torch.allclose(seqs.keys(index)[0], alone.keys(index)[0], atol=1e-6)


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
    scheduler = Scheduler(engine, max_batch_size=batch)
    requests = [new_request(engine, rand_tokens(5 + i, 70 + i), config) for i in range(batch)]
    for request in requests:
        scheduler.submit(request)
    per_step = []
    while scheduler.has_work:
        before = reads.count + transfers["count"]
        with reads:
            ran = scheduler.step()
        if ran:
            per_step.append(reads.count + transfers["count"] - before)
    monkeypatch.undo()
    assert per_step and max(per_step) <= 1, per_step


def test_prefill_first_changes_timing_only(engine):
    """The prefill-first policy: a step with prompts to prefill carries them alone (a short step), the next is an
    ordinary one, so decode-like rows wait at most every other step; every output is unchanged."""
    from trimode.runtime.scheduler.scheduler import PREFILL_FIRST

    scheduler = Scheduler(engine, max_batch_size=4, policy=PREFILL_FIRST)
    arrivals = {0: MIX[0], 2: MIX[1], 3: MIX[3], 5: MIX[5], 6: MIX[2]}
    sequences, prefill_only = [], []
    while arrivals or scheduler.has_work:
        if scheduler.steps in arrivals:
            prompt, config = arrivals.pop(scheduler.steps)
            sequences.append((submit(scheduler, prompt, config), prompt, config))
        decoding = [s for s, _, _ in sequences if not s.done and not s.first_prefill]
        forwards = [s.forwards for s in decoding]
        if scheduler.step():
            prefill_only.append(scheduler._prefill_only)
            if scheduler._prefill_only:  # only first prefills ran: the decoding requests did not move
                assert [s.forwards for s in decoding] == forwards
    assert any(prefill_only) and not all(prefill_only)
    assert not any(a and b for a, b in zip(prefill_only, prefill_only[1:], strict=False))  # never twice running
    for seq, prompt, config in sequences:
        assert seq.tokens == solo(engine, prompt, config).tokens, config
    with pytest.raises(ValueError, match="scheduling policy"):
        Scheduler(engine, policy="fastest")
