"""The static-buffer / bucketed-batch machinery of the GPU path, run eagerly on CPU.

CUDA graph capture itself needs a GPU (see `make device-check`); what is checked here is everything around
it: padding a batch to its bucket with scratch-slot rows that read and write nothing, the engine's single
cache, and that the results equal the plain torch engine's.
"""

from __future__ import annotations

import pytest
import torch

from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.cuda_graphs import GraphEngine, batch_buckets
from trimode.runtime.generate import GenerationConfig, generate


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    plain = engine_from_checkpoint(tiny_checkpoint)
    static = GraphEngine(plain.model, max_batch_size=8, max_seq_len=512, use_graphs=False)
    return plain, static


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_padded_buckets_give_the_same_tokens(engines, mode):
    plain, static = engines
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]  # 3 sequences -> bucket 4, one padding row
    config = GenerationConfig(mode=mode, max_new_tokens=16, block_length=8)
    want = generate(plain, prompts, config)
    got = generate(static, prompts, config)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.forwards for g in got] == [w.forwards for w in want]
    assert static.cache.length(static.scratch_slot) == 0  # padding rows never wrote
    assert any(key[4] == 4 for key in static.steps)


def test_padding_rows_do_not_touch_the_cache(engines):
    _, static = engines
    cache = static.new_cache(3)
    static.prefill(cache, [0, 1, 2], [[1, 2], [3], [4, 5, 6]])
    before = cache.k.clone()
    static.decode(cache, [0, 1, 2], [7, 8, 9])
    changed = (cache.k != before).any(dim=(0, 3, 4))  # [slots, positions]
    assert changed[static.scratch_slot].sum() == 0
    assert changed[:3].sum() == 3 * 1  # exactly one new position per real sequence
    assert cache.lens[:3].tolist() == [3, 2, 4]


def test_foreign_cache_is_refused(engines):
    plain, static = engines
    with pytest.raises(ValueError, match="must use the cache"):
        static.decode(plain.new_cache(1), [0], [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run `make device-check`)")
def test_graphs_replay_equals_eager_on_gpu(tiny_checkpoint):
    eager = engine_from_checkpoint(tiny_checkpoint, device="cuda")
    graphs = GraphEngine(eager.model, max_batch_size=4, max_seq_len=512)
    prompts = [[1, 2, 3], [4, 5]]
    for mode in ("ar", "spec"):
        config = GenerationConfig(mode=mode, max_new_tokens=16, block_length=8)
        assert [r.tokens for r in generate(graphs, prompts, config)] == \
            [r.tokens for r in generate(eager, prompts, config)]
