"""The paged KV cache on the demo model (CPU): prefix reuse, concurrency under a KV budget, and the decode step
against the contiguous slot cache it replaced - ratios measured in one process.

    python benchmarks/paged_cache.py [--threads 1] [--baseline ba2f035] [--repeats 40]

1. prefix: time to first token of an AR request whose 700-token prefix is cached (an earlier request with
   another question read it), over the same request with an empty cache; interleaved, medians.
2. concurrency: 16 requests (about 40-token prompts, 48 new tokens, modes ar/spec/quad/diffusion in turn)
   submitted at once under a KV budget of 4 x 1024 positions: how many run at once (peak), preemptions, and
   every output against the request run alone.
3. decode: one decode step at batch 1 and 8 (256 cached tokens each), this tree's paged engine against the
   slot-cache engine of `--baseline` (a commit of this repository, checked out into a temporary worktree
   and imported as a second package in this process), alternating the two, medians.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trimode.demo import demo_model_path  # noqa: E402
from trimode.plugins.masks import CAUSAL  # noqa: E402
from trimode.runtime.backends.engine_loader import open_engine  # noqa: E402
from trimode.runtime.backends.step import ChunkRow  # noqa: E402
from trimode.runtime.bench.direct import DirectSequences  # noqa: E402
from trimode.runtime.generate import generate  # noqa: E402
from trimode.runtime.request import GenerationConfig  # noqa: E402
from trimode.runtime.scheduler.scheduler import Scheduler  # noqa: E402
from trimode.runtime.serving.text import load_tokenizer  # noqa: E402


def long_prefix(tokenizer, length: int) -> list[int]:
    """`length` tokens of real Python: this repository's own runtime source."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "runtime" / "modes").glob("*.py")))
    ids = tokenizer.encode(text).ids
    assert len(ids) >= length, len(ids)
    return ids[:length]


def first_token_seconds(engine, scheduler, prompt: list[int]) -> float:
    seen: list[float] = []
    start = time.perf_counter()
    generate(engine, [prompt], GenerationConfig(mode="ar", max_new_tokens=1), scheduler=scheduler,
             on_tokens=lambda _i, _t: seen.append(time.perf_counter() - start))
    return seen[0]


def prefix_reuse(engine, tokenizer, repeats: int) -> dict:
    prefix = long_prefix(tokenizer, 700)
    questions = [tokenizer.encode(f"\n# question {i}: what does this do?\n").ids for i in range(2 * repeats + 2)]
    scheduler = Scheduler(engine)
    cold, warm, hits = [], [], []
    first_token_seconds(engine, scheduler, prefix + questions[-1])  # warm-up of both paths
    for r in range(repeats):
        scheduler.pages.clear_cache()
        cold.append(first_token_seconds(engine, scheduler, prefix + questions[2 * r]))  # publishes the prefix
        before = scheduler.pages.stats.hit_tokens
        warm.append(first_token_seconds(engine, scheduler, prefix + questions[2 * r + 1]))
        hits.append(scheduler.pages.stats.hit_tokens - before)
    cold_ms, warm_ms = 1e3 * statistics.median(cold), 1e3 * statistics.median(warm)
    return {"prefix_tokens": len(prefix), "cached_tokens_per_warm_request": statistics.median(hits),
            "ttft_cold_ms": round(cold_ms, 2), "ttft_cached_ms": round(warm_ms, 2),
            "cached_over_cold": round(warm_ms / cold_ms, 3), "target": "<= 0.2"}


def concurrency(engine, tokenizer) -> dict:
    from trimode.runtime.request import new_request

    prompts = json.loads((ROOT / "examples/train_demo/prompts.json").read_text())
    texts = [p["prompt"] if isinstance(p, dict) else p for p in prompts]
    prompts = [tokenizer.encode(t).ids[:40] for t in texts[:16]]
    modes = ["ar", "spec", "quad", "diffusion"]
    configs = [GenerationConfig(mode=modes[i % 4], max_new_tokens=48, block_length=4 if modes[i % 4] == "quad"
                                else 16) for i in range(16)]
    budget = engine.allocate_cache(4 * 1024 // engine.limits.page_size)  # 4 x 1024 positions
    scheduler = Scheduler(engine, max_batch_size=16, cache=budget)
    sequences = [scheduler.submit(new_request(engine, p, c)) for p, c in zip(prompts, configs, strict=True)]
    start = time.perf_counter()
    scheduler.run()
    elapsed = time.perf_counter() - start
    solo = []
    for prompt, config in zip(prompts, configs, strict=True):
        alone = Scheduler(engine, cache=engine.allocate_cache(128, prefix_caching=False))
        solo.append(generate(engine, [prompt], config, scheduler=alone)[0].tokens)
    return {"requests": 16, "kv_positions": 4096, "peak_running": scheduler.stats.peak_running,
            "preemptions": scheduler.stats.preemptions, "steps": scheduler.stats.steps,
            "seconds": round(elapsed, 3), "all_equal_solo": [s.tokens for s in sequences] == solo,
            "target": "peak_running >= 12, all equal solo"}


def import_baseline(commit: str, folder: Path):
    """The package of `commit`, importable as `trimode_old` (its imports are relative to its own root)."""
    tree = folder / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)
    package = folder / "pkg" / "trimode_old"
    shutil.copytree(tree / "trimode", package)
    for room in ("runtime", "builder", "plugins"):
        (package / room).symlink_to(tree / room)
    sys.path.insert(0, str(folder / "pkg"))
    return tree, importlib.import_module("trimode_old.runtime.backends.checkpoint_engine"), \
        importlib.import_module("trimode_old.runtime.backends.step")


def decode_steps(engine, old_loader, old_step, model: Path, repeats: int, context: int = 256) -> dict:
    old_engine = old_loader.engine_from_checkpoint(model, dtype="fp32", max_batch_size=8, max_seq_len=1024)
    results = {}
    for batch in (1, 8):
        seqs = DirectSequences(engine, batch)
        seqs.step(list(range(batch)), [ChunkRow([3 + s] * context, CAUSAL, write=True) for s in range(batch)])
        old_cache = old_engine.new_cache(batch)
        old_engine.step(old_cache, old_step.StepBatch.from_rows(
            [old_step.ChunkRow(s, [3 + s] * context, write=True) for s in range(batch)], old_cache))
        new_times, old_times = [], []
        for _ in range(repeats + 3):
            rows = [ChunkRow([5], CAUSAL, write=True, logit_offsets=[0]) for _ in range(batch)]
            new_batch = seqs.batch(list(range(batch)), rows)
            start = time.perf_counter()
            engine.step(seqs.cache, new_batch)
            new_times.append(time.perf_counter() - start)
            old_rows = [old_step.ChunkRow(s, [5], write=True, logit_offsets=[0]) for s in range(batch)]
            old_batch = old_step.StepBatch.from_rows(old_rows, old_cache)
            start = time.perf_counter()
            old_engine.step(old_cache, old_batch)
            old_times.append(time.perf_counter() - start)
            for s in range(batch):
                old_cache.rollback(s, context)
        new_ms, old_ms = 1e3 * statistics.median(new_times[3:]), 1e3 * statistics.median(old_times[3:])
        results[f"batch_{batch}"] = {"paged_ms": round(new_ms, 3), "contiguous_ms": round(old_ms, 3),
                                     "paged_over_contiguous": round(new_ms / old_ms, 3)}
    results["target"] = "<= 1.1"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--baseline", default="ba2f035", help="the commit with the slot cache (before paging)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Path(demo_model_path())
    engine = open_engine(model, dtype="fp32", max_seq_len=1024, max_batch_size=16)
    tokenizer = load_tokenizer(engine.tokenizer_path)
    report = {"benchmark": "paged_cache", "date": date.today().isoformat(), "machine": platform.machine(),
              "threads": args.threads, "page_size": engine.limits.page_size,
              "command": " ".join(["python", "benchmarks/paged_cache.py"] + sys.argv[1:])}
    report["prefix"] = prefix_reuse(engine, tokenizer, max(3, args.repeats // 8))
    report["concurrency"] = concurrency(engine, tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        tree = None
        try:
            tree, old_loader, old_step = import_baseline(args.baseline, Path(folder))
            report["decode"] = decode_steps(engine, old_loader, old_step, model, args.repeats)
        finally:
            if tree is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
