"""The GPU path's bookkeeping (buckets, static buffers, padding rows, the scratch slot), run eagerly on the CPU.

CUDA graph capture itself needs a GPU (`make device-check`); everything around it is plain tensor code and is
checked here: which bucket a step falls in, the padded layout written into the static buffers, buffers reused
across steps, padding rows that read and write nothing, the engine's single cache, and that the results equal
the plain torch engine's for mixed rows and in every mode.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trimode.plugins.reference import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.cuda_graphs import Bucketing, BucketKey, GraphEngine, StaticStep, batch_buckets, buckets
from trimode.runtime.backends.limits import CapacityError, EngineLimits
from trimode.runtime.backends.step import ChunkRow, StepBatch
from trimode.runtime.generate import GenerationConfig, generate
from trimode.runtime.model.kv_cache import KVCache

MASK = 100


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert buckets(512, 64) == [64, 128, 256, 512]
    assert buckets(40, 64) == [40]


def batch_of(rows: list[ChunkRow], lengths: list[int]) -> StepBatch:
    cache = KVCache(1, len(lengths), 64, 1, 2, torch.float32)
    cache.lengths = list(lengths)
    return StepBatch.from_rows(rows, cache)


def test_bucket_choice():
    bucketing = Bucketing(max_rows=8, max_tokens=64, max_cache_len=512)
    decode = batch_of([ChunkRow(s, [1], write=True, logit_offsets=[0]) for s in range(3)], [5, 70, 9])
    assert bucketing.key(decode) == BucketKey(rows=4, tokens=4, logits=4, lora=False, cache_len=128)
    draft = batch_of([ChunkRow(0, [1] * 8, mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=list(range(8)))], [0])
    assert bucketing.key(draft) == BucketKey(rows=1, tokens=8, logits=8, lora=True, cache_len=64)
    assert bucketing.key(batch_of([ChunkRow(0, [1] * 65, write=True, logit_offsets=[64])], [0])) is None  # eager


def test_padded_layout_and_scratch_rows():
    """Real rows first; the first padding row owns the padding tokens, the others none; all on the scratch slot."""
    rows = [ChunkRow(2, [7, 8, 9], write=True, logit_offsets=[2]),
            ChunkRow(0, [4, MASK, MASK, 5, MASK, MASK], mask_kind=QUAD, mask_param=2, write=True,
                     logit_offsets=[0, 3], positions=[3, 4, 5, 4, 5, 6]),
            ChunkRow(1, [6, MASK], mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=[1])]
    batch = batch_of(rows, [3, 10, 1])
    key = BucketKey(rows=4, tokens=16, logits=8, lora=True, cache_len=64)
    static = StaticStep(key, scratch_slot=9, device="cpu")
    static.fill(batch)
    assert static.tokens.tolist() == [7, 8, 9, 4, MASK, MASK, 5, MASK, MASK, 6, MASK] + [0] * 5
    assert static.positions.tolist() == [1, 2, 3, 3, 4, 5, 4, 5, 6, 10, 11] + [0] * 5
    assert static.lora.tolist() == [False] * 9 + [True, True] + [False] * 5
    assert static.cu_seqlens.tolist() == [0, 3, 9, 11, 16, 16]  # row 3 owns the 5 padding tokens, row 4 none
    assert static.slots.tolist() == [2, 0, 1, 9, 9]
    assert static.cache_lens.tolist() == [1, 3, 10, 0, 0]
    assert static.mask_kind.tolist() == [CAUSAL, QUAD, BIDIRECTIONAL, CAUSAL, CAUSAL]
    assert static.mask_param.tolist() == [0, 2, 0, 0, 0]
    assert static.write.tolist() == [1, 1, 0, 0, 0]
    assert static.logit_index.tolist() == [2, 3, 6, 10, 0, 0, 0, 0]
    exact = static.view(batch, exact=True)
    assert exact.cu == [0, 3, 9, 11, 16, 16] and exact.cache_lens == [1, 3, 10, 0, 0]
    assert [r.slot for r in exact.rows] == [2, 0, 1, 9, 9] and not any(r.write for r in exact.rows[3:])
    assert exact.any_lora and not all(r.lora for r in exact.rows)  # the per-token LoRA mask, never all-rows
    bounds = static.view(batch, exact=False)  # what a capture bakes in: the bucket's bounds only
    assert max(b - a for a, b in zip(bounds.cu, bounds.cu[1:], strict=False)) == 16
    assert max(bounds.cache_lens) == 64
    assert bounds.tokens is static.tokens and bounds.cu_seqlens is static.cu_seqlens  # the static addresses
    with pytest.raises(ValueError, match="does not fit bucket"):
        static.fill(batch_of([ChunkRow(0, [1] * 17, write=True)], [0]))
    names = ("tokens", "positions", "lora", "cu_seqlens", "slots", "cache_lens", "mask_kind", "mask_param", "write",
             "logit_index")
    # each input starts 256 bytes into its buffer (CUDA allocations are 512-byte aligned): TensorRT binds them
    assert all(getattr(static, name).storage_offset() * getattr(static, name).element_size() % 256 == 0
               for name in names)
    assert all(getattr(static, name).is_contiguous() for name in names)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    plain = engine_from_checkpoint(tiny_checkpoint, max_batch_size=8, max_seq_len=512)
    static = GraphEngine(plain.model, EngineLimits(8, 512), use_graphs=False, max_graph_tokens=64)
    return plain, static


def step(engine, cache, rows):
    return engine.step(cache, StepBatch.from_rows(rows, cache))


def test_mixed_rows_equal_the_torch_engine(engines):
    plain, static = engines
    caches = [plain.new_cache(5), static.new_cache(5)]
    results: list[list[torch.Tensor]] = [[], []]
    for engine, cache, out in zip((plain, static), caches, results, strict=True):
        out.append(step(engine, cache, [ChunkRow(s, [(3 * s + i) % 50 + 1 for i in range(4 + 3 * s)], write=True,
                                                 logit_offsets=[3 + 3 * s]) for s in range(4)]))
        p = cache.lengths[2]
        out.append(step(engine, cache, [
            ChunkRow(0, [40], write=True, logit_offsets=[0]),
            ChunkRow(1, [3] + [MASK] * 7, mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=list(range(8))),
            ChunkRow(2, [5, MASK, MASK, 6, MASK, MASK], mask_kind=QUAD, mask_param=2, write=True,
                     logit_offsets=list(range(6)), positions=[p + j + o for j in range(2) for o in range(3)]),
            ChunkRow(3, [9, 8, MASK, MASK], mask_kind=PREFIX_BLOCK, mask_param=2, write=True, logit_offsets=[0, 3]),
            ChunkRow(4, [1, 2, 3], write=True, logit_offsets=[2])]))
        out.append(step(engine, cache, [ChunkRow(s, [60 + s], write=True, logit_offsets=[0]) for s in (4, 0, 2)]))
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape and rel(got, want) < 1e-5
    assert caches[0].lengths == caches[1].lengths[:5]
    for slot, used in enumerate(caches[0].lengths):
        assert rel(caches[1].k[:, slot, :used], caches[0].k[:, slot, :used]) < 1e-5
    assert caches[1].lengths[static.scratch_slot] == 0
    assert not caches[1].k[:, static.scratch_slot].any() and not caches[1].v[:, static.scratch_slot].any()


def test_buffers_are_reused_across_steps(engines):
    _, static = engines
    cache = static.new_cache(3)
    step(static, cache, [ChunkRow(s, [1, 2, 3, 4][: s + 2], write=True, logit_offsets=[0]) for s in range(3)])
    before = dict(static.steps)
    steps = [step(static, cache, [ChunkRow(s, [t + s], write=True, logit_offsets=[0]) for s in range(3)])
             for t in range(5)]
    key = BucketKey(rows=4, tokens=4, logits=4, lora=False, cache_len=64)
    assert key in static.steps and static.steps[key].uses >= 5
    assert len(static.steps) <= len(before) + 1  # five decode steps, one bucket
    assert all(s.shape == (3, 256) for s in steps)
    assert cache.lengths[:3] == [7, 8, 9]


def test_long_steps_run_eagerly_on_the_engine_cache(engines):
    plain, static = engines
    cache = static.new_cache(1)
    eager_before = static.eager_steps
    got = step(static, cache, [ChunkRow(0, list(range(1, 81)), write=True, logit_offsets=[79])])
    assert static.eager_steps == eager_before + 1 and cache.lengths[0] == 80
    reference = plain.new_cache(1)
    assert rel(got, step(plain, reference, [ChunkRow(0, list(range(1, 81)), write=True, logit_offsets=[79])])) < 1e-5


@pytest.mark.parametrize("mode,extra", [("ar", {}), ("diffusion", {}), ("spec", {}), ("spec", {"threshold": 0.5}),
                                        ("quad", {"block_length": 4}), ("infill", {"suffix": (7, 8)})])
def test_every_mode_gives_the_same_tokens(engines, mode, extra):
    plain, static = engines
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]  # 3 sequences -> row bucket 4, padding rows
    config = GenerationConfig(**{"mode": mode, "max_new_tokens": 16, "block_length": 8, **extra})
    want = generate(plain, prompts, config)
    got = generate(static, prompts, config)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.forwards for g in got] == [w.forwards for w in want]
    assert static.cache.lengths[static.scratch_slot] == 0  # padding rows never wrote
    assert not static.cache.k[:, static.scratch_slot].any()


def test_one_cache_and_refusals(engines):
    plain, static = engines
    assert static.new_cache(2) is static.new_cache(8) is static.cache
    assert static.cache.num_slots == 9  # 8 sequences + the scratch slot
    with pytest.raises(CapacityError, match="maximum batch size"):
        static.new_cache(9)
    with pytest.raises(ValueError, match="must use the cache"):
        step(static, plain.new_cache(1), [ChunkRow(0, [1], write=True)])
    with pytest.raises(ValueError, match="scratch slot"):
        step(static, static.cache, [ChunkRow(static.scratch_slot, [1], write=True)])
    with pytest.raises(ValueError, match="need the model on a CUDA device"):
        GraphEngine(plain.model, EngineLimits(2, 64), use_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run `make device-check`)")
def test_graphs_replay_equals_eager_on_gpu(tiny_checkpoint):
    eager = engine_from_checkpoint(tiny_checkpoint, device="cuda", max_batch_size=4, max_seq_len=512)
    graphs = GraphEngine(eager.model, EngineLimits(4, 512))
    prompts = [[1, 2, 3], [4, 5]]
    for mode in ("ar", "diffusion", "spec", "quad"):
        config = GenerationConfig(mode=mode, max_new_tokens=16, block_length=4)
        assert [r.tokens for r in generate(graphs, prompts, config)] == \
            [r.tokens for r in generate(eager, prompts, config)]
    assert any(s.graph is not None for s in graphs.steps.values())


def test_device_check_script_runs_on_the_cpu(tmp_path, monkeypatch):
    """benchmarks/device_check.py (`make device-check`) imports, and its kernel section runs with --dry-run."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "device_check.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "--dry-run" in help_text.stdout
    spec = importlib.util.spec_from_file_location("device_check", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "device_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.main(["--dry-run", "--only", "kernel", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["passed"] and {c["name"].split()[0] for c in report["checks"]} == set(module.KERNEL_CASES)
