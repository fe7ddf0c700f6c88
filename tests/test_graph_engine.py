"""The GPU path's bookkeeping (buckets, static buffers, padding rows, page tables), run eagerly on the CPU.

CUDA graph capture itself needs a GPU (`make device-check`); everything around it is plain tensor code and is
checked here: which bucket a step falls in, the padded layout written into the static buffers (page tables
included), buffers reused across steps, padding rows that read and write nothing, the engine's single cache,
and that the results equal the plain torch engine's for mixed rows and in every mode.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.cuda_graphs import Bucketing, BucketKey, GraphEngine, StaticStep, buckets
from trimode.runtime.backends.limits import EngineLimits
from trimode.runtime.backends.step import ChunkRow, StepBatch
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig

from .step_helpers import Seqs

MASK = 100


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(512, 64) == [64, 128, 256, 512]
    assert buckets(40, 64) == [40]


def batch_of(rows: list[ChunkRow], lengths: list[int], page_size: int = 16) -> StepBatch:
    tables = [list(range(10 * b, 10 * b + -(-(past + row.written) // page_size)))
              for b, (row, past) in enumerate(zip(rows, lengths, strict=True))]
    return StepBatch.from_rows(rows, tables, lengths, page_size)


def test_bucket_choice():
    bucketing = Bucketing(max_rows=8, max_tokens=64, max_cache_len=512)
    decode = batch_of([ChunkRow([1], write=True, logit_offsets=[0]) for _ in range(3)], [5, 70, 9])
    assert bucketing.key(decode) == BucketKey(rows=4, tokens=4, logits=4, lora=False, cache_len=128)
    draft = batch_of([ChunkRow([1] * 8, mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=list(range(8)))], [3])
    assert bucketing.key(draft) == BucketKey(rows=1, tokens=8, logits=8, lora=True, cache_len=64)
    assert bucketing.key(batch_of([ChunkRow([1] * 65, write=True, logit_offsets=[64])], [0])) is None  # eager


def test_padded_layout_and_padding_rows():
    """Real rows first; the first padding row owns the padding tokens, the others none; no padding row has a
    page or a cached position."""
    rows = [ChunkRow([7, 8, 9], write=True, logit_offsets=[2]),
            ChunkRow([4, MASK, MASK, 5, MASK, MASK], mask_kind=QUAD, mask_param=2, write=True,
                     logit_offsets=[0, 3], positions=[3, 4, 5, 4, 5, 6]),
            ChunkRow([6, MASK], mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=[1])]
    batch = StepBatch.from_rows(rows, [[5], [2, 9], [4]], [1, 3, 10], page_size=16)
    key = BucketKey(rows=4, tokens=16, logits=8, lora=True, cache_len=64)
    static = StaticStep(key, max_pages=3, device="cpu")
    static.fill(batch)
    assert static.tokens.tolist() == [7, 8, 9, 4, MASK, MASK, 5, MASK, MASK, 6, MASK] + [0] * 5
    assert static.positions.tolist() == [1, 2, 3, 3, 4, 5, 4, 5, 6, 10, 11] + [0] * 5
    assert static.lora.tolist() == [False] * 9 + [True, True] + [False] * 5
    assert static.cu_seqlens.tolist() == [0, 3, 9, 11, 16, 16]  # row 3 owns the 5 padding tokens, row 4 none
    assert static.page_table.tolist() == [[5, -1, -1], [2, 9, -1], [4, -1, -1], [-1] * 3, [-1] * 3]
    assert static.cache_lens.tolist() == [1, 3, 10, 0, 0]
    assert static.mask_kind.tolist() == [CAUSAL, QUAD, BIDIRECTIONAL, CAUSAL, CAUSAL]
    assert static.mask_param.tolist() == [0, 2, 0, 0, 0]
    assert static.write.tolist() == [1, 1, 0, 0, 0]
    assert static.logit_index.tolist() == [2, 3, 6, 10, 0, 0, 0, 0]
    exact = static.view(batch, exact=True)
    assert exact.cu == [0, 3, 9, 11, 16, 16] and exact.cache_lens == [1, 3, 10, 0, 0]
    assert exact.tables == [[5], [2, 9], [4], [], []] and not any(r.write for r in exact.rows[3:])
    assert exact.any_lora and not all(r.lora for r in exact.rows)  # the per-token LoRA mask, never all-rows
    bounds = static.view(batch, exact=False)  # what a capture bakes in: the bucket's bounds only
    assert max(b - a for a, b in zip(bounds.cu, bounds.cu[1:], strict=False)) == 16
    assert max(bounds.cache_lens) == 64
    assert bounds.tokens is static.tokens and bounds.page_table is static.page_table  # the static addresses
    with pytest.raises(ValueError, match="does not fit bucket"):
        static.fill(batch_of([ChunkRow([1] * 17, write=True)], [0]))
    with pytest.raises(ValueError, match="wider than"):
        static.fill(StepBatch.from_rows([ChunkRow([1], write=True)], [[0, 1, 2, 3]], [60], page_size=16))
    names = ("tokens", "positions", "lora", "cu_seqlens", "page_table", "cache_lens", "mask_kind", "mask_param",
             "write", "logit_index")
    # each input starts 256 bytes into its buffer (CUDA allocations are 512-byte aligned): TensorRT binds them
    assert all(getattr(static, name).storage_offset() * getattr(static, name).element_size() % 256 == 0
               for name in names)
    assert all(getattr(static, name).is_contiguous() for name in names)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    plain = engine_from_checkpoint(tiny_checkpoint, max_batch_size=8, max_seq_len=512)
    static = GraphEngine(plain.model, EngineLimits(8, 512), use_graphs=False, max_graph_tokens=64)
    return plain, static


def test_mixed_rows_equal_the_torch_engine(engines):
    plain, static = engines
    seqs = [Seqs(plain, 5, shuffle=1), Seqs(static, 5, cache=static.cache, shuffle=1)]
    results: list[list[torch.Tensor]] = [[], []]
    for group, out in zip(seqs, results, strict=True):
        out.append(group.step(list(range(4)), [ChunkRow([(3 * s + i) % 50 + 1 for i in range(4 + 3 * s)],
                                                       write=True, logit_offsets=[3 + 3 * s]) for s in range(4)]))
        p = group.lengths[2]
        out.append(group.step(list(range(5)), [
            ChunkRow([40], write=True, logit_offsets=[0]),
            ChunkRow([3] + [MASK] * 7, mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=list(range(8))),
            ChunkRow([5, MASK, MASK, 6, MASK, MASK], mask_kind=QUAD, mask_param=2, write=True,
                     logit_offsets=list(range(6)), positions=[p + j + o for j in range(2) for o in range(3)]),
            ChunkRow([9, 8, MASK, MASK], mask_kind=PREFIX_BLOCK, mask_param=2, write=True, logit_offsets=[0, 3]),
            ChunkRow([1, 2, 3], write=True, logit_offsets=[2])]))
        out.append(group.step([4, 0, 2], [ChunkRow([60 + s], write=True, logit_offsets=[0]) for s in (4, 0, 2)]))
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape and rel(got, want) < 1e-5
    assert seqs[0].lengths == seqs[1].lengths
    for seq in range(5):
        assert rel(seqs[1].keys(seq)[0], seqs[0].keys(seq)[0]) < 1e-5
    for group in seqs:
        for table in group.tables:
            group.cache.pages.release(table)


def test_buffers_are_reused_across_steps(engines):
    _, static = engines
    seqs = Seqs(static, 3, cache=static.cache)
    seqs.step([0, 1, 2], [ChunkRow([1, 2, 3, 4][: s + 2], write=True, logit_offsets=[0]) for s in range(3)])
    before = dict(static.steps)
    steps = [seqs.step([0, 1, 2], [ChunkRow([t + s], write=True, logit_offsets=[0]) for s in range(3)])
             for t in range(5)]
    key = BucketKey(rows=4, tokens=4, logits=4, lora=False, cache_len=64)
    assert key in static.steps and static.steps[key].uses >= 5
    assert len(static.steps) <= len(before) + 1  # five decode steps, one bucket
    assert all(s.shape == (3, 256) for s in steps)
    assert seqs.lengths == [7, 8, 9]
    for table in seqs.tables:
        static.cache.pages.release(table)


def test_long_steps_run_eagerly_on_the_engine_cache(engines):
    plain, static = engines
    seqs = Seqs(static, 1, cache=static.cache)
    eager_before = static.eager_steps
    got = seqs.step([0], [ChunkRow(list(range(1, 81)), write=True, logit_offsets=[79])])
    assert static.eager_steps == eager_before + 1 and seqs.lengths[0] == 80
    reference = Seqs(plain, 1)
    assert rel(got, reference.step([0], [ChunkRow(list(range(1, 81)), write=True, logit_offsets=[79])])) < 1e-5
    static.cache.pages.release(seqs.tables[0])


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
    assert static.cache.pages.in_use == 0  # every page went back


def test_one_cache_and_refusals(engines):
    plain, static = engines
    assert static.cache is static.cache and static.cache.num_pages == static.limits.kv_pages
    with pytest.raises(ValueError, match="serves only its own cache"):
        static.allocate_cache(4)
    with pytest.raises(ValueError, match="engine's own cache"):
        Seqs(static, 1, cache=plain.allocate_cache(4)).step([0], [ChunkRow([1], write=True)])
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
    """benchmarks/device_check.py (`make device-check`) imports, and its kernel and quant sections run with
    --dry-run."""
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
    assert module.main(["--dry-run", "--only", "quant", "--out", str(tmp_path)]) == 0  # fp8 engine, CPU path
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["passed"] and report["sections"]["quant"]["greedy_equals_ar_bf16"]
