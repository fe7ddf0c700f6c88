"""The paged KV cache: the page allocator, sizing by memory, prefix reuse across requests and modes, every write
path's K/V, preemption, the step budget and priorities - each against the request run alone."""

from __future__ import annotations

import math

import pytest
import torch

from trimode.builder.checkpoint import expected_shapes
from trimode.builder.presets import PRESETS
from trimode.builder.random_checkpoint import make_config
from trimode.plugins.masks import CAUSAL
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.cuda_graphs import GraphEngine
from trimode.runtime.backends.limits import EngineLimits
from trimode.runtime.backends.step import ChunkRow
from trimode.runtime.cache import sizing
from trimode.runtime.cache.pages import OutOfPages, PageAllocator, chain_hash, page_hashes
from trimode.runtime.errors import CapacityError
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig, new_request
from trimode.runtime.scheduler import auto_block
from trimode.runtime.scheduler.scheduler import Scheduler

from .step_helpers import Seqs

MODES = {
    "ar": GenerationConfig(mode="ar", max_new_tokens=12),
    "spec": GenerationConfig(mode="spec", max_new_tokens=12, block_length=4),
    "quad": GenerationConfig(mode="quad", max_new_tokens=12, block_length=3),
    "diffusion": GenerationConfig(mode="diffusion", max_new_tokens=12, block_length=4),
    "infill": GenerationConfig(mode="infill", max_new_tokens=5, suffix=(7, 8, 9)),
}


def rand_tokens(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, dtype="fp32", max_batch_size=16, max_seq_len=512)


def solo(engine, prompt, config):
    """The request alone on a fresh pool without a prefix cache: the reference every other run must equal."""
    scheduler = Scheduler(engine, cache=engine.allocate_cache(64, prefix_caching=False))
    return generate(engine, [prompt], config, scheduler=scheduler)[0]


# -- the allocator -----------------------------------------------------------------------------------------
def test_references_free_list_and_all_or_nothing():
    pages = PageAllocator(6, 4)
    a = pages.take(4)
    assert sorted(a) == [0, 1, 2, 3] and pages.available == 2 and pages.in_use == 4
    with pytest.raises(OutOfPages):
        pages.take(3)
    assert pages.available == 2  # nothing taken by the failed call
    pages.release(a[:2])
    assert pages.available == 4
    with pytest.raises(ValueError, match="released more often"):
        pages.release(a[:1])


def test_hash_chain_publish_match_and_lru_eviction():
    pages = PageAllocator(4, 2, root=7)
    tokens = [5, 6, 7, 8, 9, 10]
    hashes = page_hashes(tokens, 2, 7)
    assert hashes[0] == chain_hash(7, [5, 6]) and hashes[1] == chain_hash(hashes[0], [7, 8])
    assert page_hashes([5, 6, 7, 8], 2, 8) != hashes[:2]  # another engine's root: another chain
    assert page_hashes([1, 6, 7, 8], 2, 7)[1] != hashes[1]  # the parent is part of a page's identity
    first = pages.take(3)
    for page, digest in zip(first, hashes, strict=True):
        assert pages.publish(page, digest)
    assert not pages.publish(pages.take(1)[0], hashes[0])  # a duplicate stays private
    assert pages.match(hashes) == first and pages.refs[first[0]] == 2
    pages.release(first)
    pages.release(first)  # the last holder is gone: cached, evictable, still findable
    assert pages.cached == 3 and pages.available == 3 and pages.match(hashes[:1]) == first[:1]
    pages.release(first[:1])
    # evicted oldest-released first: first[1], first[2], then first[0] (released last)
    assert pages.take(1) == [first[1]] and pages.match(hashes[1:2]) == []
    assert pages.stats.evicted_pages == 1
    assert pages.match(hashes) == first[:1]  # the chain now stops at the evicted page
    pages.release(first[:1])
    pages.clear_cache()
    assert pages.cached == 0 and pages.match(hashes) == []


def test_a_shared_page_is_never_written_by_either_holder(engine):
    """Two requests with one 32-token prefix: the second reads the first's two published pages, and neither
    writes them (their bytes are unchanged after both ran on)."""
    prompt = rand_tokens(40, 1)
    scheduler = Scheduler(engine, cache=engine.allocate_cache(64))
    first = scheduler.submit(new_request(engine, prompt, MODES["spec"]))
    while first.cached < 40:
        scheduler.step()
    shared = list(first.pages[:2])
    before = scheduler.cache.k[:, shared].clone()
    second = scheduler.submit(new_request(engine, prompt + [3, 4], MODES["quad"]))
    scheduler.run()
    assert second.cached_tokens == 32
    assert torch.equal(scheduler.cache.k[:, shared], before)
    assert first.tokens == solo(engine, prompt, MODES["spec"]).tokens
    assert second.tokens == solo(engine, prompt + [3, 4], MODES["quad"]).tokens


# -- sizing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [("512MiB", 512 << 20), ("4GiB", 4 << 30), ("1.5GB", 1_500_000_000),
                                           ("2048", 2048), (4096, 4096), ("64 kib", 64 << 10)])
def test_memory_sizes(text, expected):
    assert sizing.parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "4 GiBs", ""])
def test_bad_memory_sizes_are_clear_errors(text):
    with pytest.raises(CapacityError, match="memory size"):
        sizing.parse_size(text)


def test_the_8b_shape_opens_with_defaults_on_a_23_gib_machine():
    """The CPU default for the 8B shape: what 64 x 4096 positions need (36 GiB) is capped at 20% of what the
    16 GB of bf16 weights leave on 23 GiB, so weights + KV stay well inside the machine."""
    config = make_config(PRESETS["8b"], "bf16", {})
    weights = 2 * sum(math.prod(s) for s in expected_shapes(config).values())
    page = sizing.bytes_per_page(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 2, 16)
    need = 64 * -(-4096 // 16) * page
    memory = sizing.MemoryInfo(total=23 << 30, available=22 << 30)
    kv = sizing.default_cpu_kv_bytes(need, weights, memory)
    pages = sizing.plan_pages(kv, page, 16, 4096, "the CPU default")
    assert need > 30 << 30 and kv < need  # the old reservation would not fit
    assert weights + pages * page < 0.8 * (23 << 30)
    assert pages * 16 >= 8192  # still thousands of positions: a 4096-token request fits twice
    small = sizing.default_cpu_kv_bytes(1 << 20, weights, memory)
    assert small == 1 << 20  # never more than the requests can use


def test_a_pool_too_small_for_one_page_is_refused(engine):
    with pytest.raises(CapacityError, match="cannot hold one KV page"):
        sizing.plan_pages(100, 4096, 16, 512, "--kv-cache-memory")


def test_engines_size_their_cache_from_the_flag(tiny_checkpoint):
    from trimode.runtime.backends.engine_loader import open_engine

    engine = open_engine(tiny_checkpoint, kv_cache_memory="1MiB", page_size=8)
    c = engine.config
    page = sizing.bytes_per_page(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 4, 8)
    assert engine.limits.page_size == 8 and engine.limits.kv_pages == (1 << 20) // page
    assert engine.cache.num_pages == engine.limits.kv_pages and engine.cache.page_size == 8
    assert not open_engine(tiny_checkpoint, prefix_caching=False).cache.pages.prefix_caching


# -- prefix reuse ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("second", sorted(MODES))
def test_a_cached_prefix_from_any_mode_gives_every_mode_its_own_output(engine, second):
    """A request of each mode runs first; a request of mode `second` with the same 36-token prefix then reads
    its cached pages (32 positions) and must equal itself run alone without any cache."""
    prefix = rand_tokens(36, 3)
    want = solo(engine, prefix + [9], MODES[second])
    for first in sorted(MODES):
        scheduler = Scheduler(engine, cache=engine.allocate_cache(64))
        generate(engine, [prefix + [5, 6]], MODES[first], scheduler=scheduler)
        got = generate(engine, [prefix + [9]], MODES[second], scheduler=scheduler)[0]
        assert got.cached_tokens == 32, (first, second)
        assert got.tokens == want.tokens and got.forwards == want.forwards, (first, second)


def test_no_prefix_cache_recomputes_everything(engine):
    prompt = rand_tokens(40, 4)
    scheduler = Scheduler(engine, cache=engine.allocate_cache(64, prefix_caching=False))
    generate(engine, [prompt], MODES["ar"], scheduler=scheduler)
    again = generate(engine, [prompt], MODES["ar"], scheduler=scheduler)[0]
    assert again.cached_tokens == 0 and scheduler.pages.cached == 0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_write_path_stores_causal_kv(engine, mode):
    """What makes a page shareable: the K/V a mode's rows wrote at each committed position (spec verify, quad
    drafts, diffusion's re-encode, prefill chunks; infill writes only its prefix) equal a plain causal prefill
    of the same tokens on a fresh pool."""
    prompt = rand_tokens(21, 5)
    config = GenerationConfig(**{**MODES[mode].to_dict(), "max_new_tokens": 40 if mode != "infill" else 5})
    scheduler = Scheduler(engine, max_step_tokens=16, cache=engine.allocate_cache(64))  # the prompt is chunked
    seq = scheduler.submit(new_request(engine, prompt, config))
    while seq.cached < (30 if mode != "infill" else 21) and not seq.done:
        scheduler.step()
    assert not seq.done
    length = seq.cached
    reference = Seqs(engine, 1)
    reference.step([0], [ChunkRow(seq.known[:length], CAUSAL, write=True)])
    size = scheduler.page_size
    index = torch.tensor([seq.pages[p // size] * size + p % size for p in range(length)])
    got_k = scheduler.cache.k.flatten(1, 2)[:, index]
    got_v = scheduler.cache.v.flatten(1, 2)[:, index]
    want_k, want_v = reference.keys(0, length)
    assert float((got_k - want_k).abs().max()) < 1e-5 and float((got_v - want_v).abs().max()) < 1e-5
    full = length // size
    assert seq.hashes == page_hashes(seq.known, size, scheduler.pages.root, full)  # published under their tokens


# -- preemption --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_preemption_keeps_every_output_identical(engine, temperature):
    """A pool too small for all requests at once: some give their pages back and are recomputed, and every
    output (greedy and seeded sampling, every mode) equals the request run alone."""
    prompts = [rand_tokens(10 + 3 * i, 10 + i) for i in range(8)]
    configs = [GenerationConfig(**{**MODES[mode].to_dict(), "temperature": temperature, "seed": i,
                                   "max_new_tokens": 20 if mode != "infill" else 5})
               for i, mode in enumerate(["ar", "spec", "quad", "diffusion", "infill", "spec", "ar", "quad"])]
    scheduler = Scheduler(engine, max_batch_size=8, cache=engine.allocate_cache(9))  # 144 positions in all
    got = generate(engine, prompts, configs, scheduler=scheduler)
    assert scheduler.stats.preemptions > 0 and sum(r.preemptions for r in got) == scheduler.stats.preemptions
    for prompt, config, result in zip(prompts, configs, got, strict=True):
        assert result.tokens == solo(engine, prompt, config).tokens, config
    assert scheduler.pages.in_use == 0


def test_a_request_that_fits_alone_is_never_failed(engine):
    """Requests that each need most of the pool finish one after another (preempting as needed)."""
    scheduler = Scheduler(engine, max_batch_size=4, cache=engine.allocate_cache(6))  # 96 positions
    prompts = [rand_tokens(30, 20 + i) for i in range(4)]
    config = GenerationConfig(mode="ar", max_new_tokens=50)  # 80 positions each
    got = generate(engine, prompts, config, scheduler=scheduler)
    assert scheduler.stats.preemptions > 0
    assert [r.tokens for r in got] == [solo(engine, p, config).tokens for p in prompts]


# -- the step budget and priorities ------------------------------------------------------------------------
def test_no_step_exceeds_the_budget_and_every_request_finishes(engine, monkeypatch):
    """Eight quad requests at L = 16 (272-token rows) under a 600-token budget: two rows fit a step, the rest
    wait their turn; prompts are chunked into what is left. Before, every prefill got at least 16 tokens and
    decode-like rows were not counted, so steps grew past the engine's size."""
    sizes = []
    original = engine.step

    def spy(cache, batch):
        sizes.append(batch.num_tokens)
        return original(cache, batch)

    monkeypatch.setattr(engine, "step", spy)
    scheduler = Scheduler(engine, max_step_tokens=600, cache=engine.allocate_cache(256))
    config = GenerationConfig(mode="quad", max_new_tokens=24, block_length=16)
    prompts = [rand_tokens(50 + i, 30 + i) for i in range(8)]
    got = generate(engine, prompts, config, scheduler=scheduler)
    monkeypatch.undo()
    assert max(sizes) <= 600 and sorted(set(sizes))[-1] > 272  # steps did carry more than one quad row
    assert [r.tokens for r in got] == [solo(engine, p, config).tokens for p in prompts]


def test_priority_decides_admission_and_who_is_preempted(engine):
    scheduler = Scheduler(engine, max_batch_size=4, cache=engine.allocate_cache(4))  # 64 positions
    low = scheduler.submit(new_request(engine, rand_tokens(20, 40), GenerationConfig(mode="ar", max_new_tokens=30,
                                                                                   priority=5)))
    while len(low.pages) < 3:  # it holds 3 of the 4 pages: a 20-token prompt needs 2
        scheduler.step()
    high = scheduler.submit(new_request(engine, rand_tokens(20, 41), GenerationConfig(mode="ar", max_new_tokens=30,
                                                                                    priority=-1)))
    late_low = scheduler.submit(new_request(engine, rand_tokens(5, 42), GenerationConfig(mode="ar", max_new_tokens=4,
                                                                                       priority=9)))
    assert scheduler.waiting == [high, late_low]  # ordered by priority, then arrival
    scheduler.step()
    assert high.admitted_step >= 0 and low.preemptions == 1  # the pool could not hold both: low gave way
    scheduler.run()
    for seq in (low, high, late_low):
        assert seq.tokens == solo(engine, seq.prompt, seq.config).tokens


# -- auto calibration on scratch pages ---------------------------------------------------------------------
@pytest.mark.parametrize("graph", [False, True])
def test_auto_calibration_never_touches_a_running_request(tiny_checkpoint, tmp_path, monkeypatch, graph):
    """`auto` times scratch forwards while an AR request runs: the scratch rows take pages of their own, so the
    running request's tokens are those it has alone (the old GraphEngine handed out its only cache)."""
    monkeypatch.setenv("TRIMODE_CACHE_DIR", str(tmp_path))  # nothing learned elsewhere: calibrate now
    base = engine_from_checkpoint(tiny_checkpoint, dtype="fp32", max_batch_size=4, max_seq_len=512)
    engine = GraphEngine(base.model, EngineLimits(4, 512), use_graphs=False) if graph else base
    prompt, config = rand_tokens(9, 50), GenerationConfig(mode="ar", max_new_tokens=40)
    scheduler = Scheduler(engine)
    running = scheduler.submit(new_request(engine, prompt, config))
    for _ in range(5):
        scheduler.step()
    auto = scheduler.submit(new_request(engine, rand_tokens(5, 51), GenerationConfig(
        mode="spec", max_new_tokens=8, block_length="auto")))
    assert auto_block.stats_for(engine).costs  # it really measured, mid-request
    scheduler.run()
    assert running.tokens == solo(base, prompt, config).tokens
    assert auto.block_length in auto_block.CANDIDATES
    assert scheduler.pages.in_use == 0
