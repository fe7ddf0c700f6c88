"""Infill on the Markov-scripted model: the scheduled commits, an untouched suffix, a cache holding the prefix."""

from __future__ import annotations

import pytest

from trimode.plugins.masks import BIDIRECTIONAL
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig, RequestError, new_request
from trimode.runtime.scheduler.scheduler import Scheduler

from .markov_engine import MASK, MarkovEngine


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_infill_commits_the_scheduled_slots_and_never_touches_the_suffix(threshold):
    engine = MarkovEngine()
    seen = []
    original = engine.step

    def recording(cache, batch):
        seen.append([(list(r.tokens), r.mask_kind, r.write, past)
                     for r, past in zip(batch.rows, batch.cache_lens, strict=True)])
        return original(cache, batch)

    engine.step = recording
    prefix, suffix, hole = [3, 4, 5], [20, 21, 22, 23], 5
    scheduler = Scheduler(engine, max_batch_size=1)
    lengths = []
    seq = scheduler.submit(new_request(engine, prefix, GenerationConfig(mode="infill", max_new_tokens=hole,
                                                                        suffix=tuple(suffix), threshold=threshold)))
    while scheduler.has_work:
        scheduler.step()
        lengths.append(seq.cached)
    chunks = [row for step in seen[1:] for row in step]  # after the prefill
    assert all(kind == BIDIRECTIONAL and not write and past == len(prefix) for _, kind, write, past in chunks)
    assert all(tokens[hole:] == suffix for tokens, *_ in chunks)  # the suffix is never changed
    masked = [tokens[:hole].count(MASK) for tokens, *_ in chunks]
    assert masked[0] == hole
    commits = [a - b for a, b in zip(masked, masked[1:] + [0], strict=True)]
    if threshold is None:
        assert commits == [1] * hole  # one slot per pass, n passes
    else:  # one-hot scripted logits are fully confident: every slot at once
        assert commits == [hole]
    assert seq.tokens == [engine.ahead(prefix[-1], i + 1) for i in range(hole)]  # the chain after the prefix
    assert lengths == [len(prefix)] * len(lengths)  # the chunks never wrote: the cache holds the prefix only
    assert scheduler.pages.available == scheduler.pages.num_pages  # and its pages went back at the end


def test_infill_needs_a_suffix_and_a_fitting_request():
    engine = MarkovEngine()
    with pytest.raises(RequestError, match="needs a suffix"):
        generate(engine, [[1, 2]], GenerationConfig(mode="infill", max_new_tokens=3))
    with pytest.raises(RequestError, match="positive"):
        generate(engine, [[1, 2]], GenerationConfig(mode="infill", max_new_tokens=0, suffix=(4,)))
    with pytest.raises(RequestError, match="maximum sequence length"):
        generate(engine, [[1] * 500], GenerationConfig(mode="infill", max_new_tokens=10, suffix=(4,) * 10))
