"""Measuring the generation modes side by side in one process.

Machines here are shared and noisy, so absolute numbers wander; ratios between modes measured in the same
process, interleaved run by run, are what the reports compare. Each mode gets warm-up runs, then several
measured runs; medians are reported. Step latencies come from timing every engine call (prefill, decode,
draft, verify, quad, mixed: `step_kind`) through a thin proxy, so they cover exactly what a forward costs,
scheduling overhead excluded. Each run starts from an empty prefix cache, so repeated prompts are measured
cold (benchmarks/prefix_cache.py measures reuse on purpose).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from ...plugins.masks import BIDIRECTIONAL, PREFIX_BLOCK, QUAD
from ..backends.step import ChunkRow, StepBatch, StepEngine
from ..generate import generate
from ..request import GenerationConfig


def row_kind(row: ChunkRow, cache_len: int) -> str:
    """What a row is doing, in the old step-kind names (for latency reports)."""
    if row.mask_kind == QUAD:
        return "quad"
    if row.mask_kind == PREFIX_BLOCK:
        return "prefill"
    if row.mask_kind == BIDIRECTIONAL:
        return "draft"
    if not row.logit_offsets or len(row.logit_offsets) == 1 and len(row.tokens) > 1 and cache_len == 0:
        return "prefill"
    return "decode" if len(row.tokens) == 1 else "verify"


def step_kind(batch: StepBatch) -> str:
    """The kind shared by every row of a step, or "mixed"."""
    kinds = {row_kind(r, p) for r, p in zip(batch.rows, batch.cache_lens, strict=True)}
    return kinds.pop() if len(kinds) == 1 else "mixed"


class TimedEngine:
    """Forwards every step to `engine` and records its wall time per step kind."""

    def __init__(self, engine: StepEngine) -> None:
        self._engine = engine
        self.times: dict[str, list[float]] = defaultdict(list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step(self, cache, batch: StepBatch) -> torch.Tensor:
        start = time.perf_counter()
        out = self._engine.step(cache, batch)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.times[step_kind(batch)].append(time.perf_counter() - start)
        return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class ModeRuns:
    """Raw measurements of one mode over the measured runs."""

    tokens_per_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    steps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outputs: list[list[list[int]]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        total_tokens = statistics.median(self.tokens)
        forwards = statistics.median(self.forwards)
        prefill_forwards = len(self.outputs) or 1  # one prefill per sequence
        return {
            "tokens": total_tokens,
            "forwards": forwards,
            "tokens_per_forward": round(total_tokens / max(forwards - prefill_forwards, 1), 3),
            "tokens_per_s": round(statistics.median(self.tokens_per_s), 2),
            "ttft_ms": round(1000 * statistics.median(self.ttft_s), 3),
            "step_latency_ms": {kind: {"median": round(1000 * statistics.median(v), 3),
                                       "p90": round(1000 * percentile(v, 0.9), 3), "count": len(v)}
                                for kind, v in sorted(self.steps.items())},
        }


def run_once(engine: StepEngine, prompts: list[list[int]], config: GenerationConfig,
             batch_size: int | None = None) -> dict[str, Any]:
    """The prompts in groups of `batch_size` (default: all at once), one generate() call per group, with
    their timings summed: elapsed, time to first token (median over groups), step times, outputs."""
    timed = engine if isinstance(engine, TimedEngine) else TimedEngine(engine)
    timed.times.clear()
    timed.cache.pages.clear_cache()  # every run starts cold: no prompt is read from an earlier run's pages
    size = batch_size or len(prompts)
    elapsed, ttfts, results = 0.0, [], []
    for at in range(0, len(prompts), size):
        first: list[float] = []
        start = time.perf_counter()

        def on_tokens(index: int, new: list[int], first=first, start=start) -> None:
            if not first:
                first.append(time.perf_counter() - start)

        results += generate(timed, prompts[at : at + size], config, on_tokens=on_tokens)  # type: ignore[arg-type]
        took = time.perf_counter() - start
        elapsed += took
        ttfts.append(first[0] if first else took)
    return {"elapsed": elapsed, "ttft": statistics.median(ttfts), "steps": timed.times,
            "tokens": sum(len(r.tokens) for r in results),
            "forwards": sum(r.forwards for r in results), "outputs": [r.tokens for r in results]}


def bench_modes(engine: StepEngine, prompts: list[list[int]], configs: dict[str, GenerationConfig],
                runs: int = 3, warmup: int = 1, batch_size: int | None = None) -> dict[str, Any]:
    """Median metrics per named config; runs are interleaved across configs so drift hits all alike."""
    measured = {name: ModeRuns() for name in configs}
    engine = TimedEngine(engine)  # one proxy: its scheduler (and KV cache) is made once and reused
    for iteration in range(warmup + runs):
        for name, config in configs.items():
            once = run_once(engine, prompts, config, batch_size)
            if iteration < warmup:
                continue
            rec = measured[name]
            rec.tokens_per_s.append(once["tokens"] / once["elapsed"])
            rec.ttft_s.append(once["ttft"])
            rec.forwards.append(once["forwards"])
            rec.tokens.append(once["tokens"])
            rec.outputs = once["outputs"]
            for kind, values in once["steps"].items():
                rec.steps[kind].extend(values)
    report: dict[str, Any] = {name: rec.summary() for name, rec in measured.items()}
    if "ar" in measured:
        base = report["ar"]["tokens_per_s"]
        for name in report:
            report[name]["speedup_vs_ar"] = round(report[name]["tokens_per_s"] / base, 3) if base else None
        for name, rec in measured.items():
            if configs[name].mode in ("spec", "quad") and configs[name].temperature == 0:
                report[name]["matches_ar"] = rec.outputs == measured["ar"].outputs
    return report
