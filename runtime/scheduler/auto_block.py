"""`--block-length auto` for spec and quad: the block length with the most tokens per second on THIS device.

Greedy output does not depend on the block length (both modes are AR-exact); only forwards and time do.
The choice weighs two measured things:

* **cost per round** - what a forward carrying n tokens costs on this engine, measured once per engine by
  timing a few scratch forwards at the chunk sizes the candidates need (linear spec: a draft and a verify
  pass of L tokens each; quad: one forward of L * (L + 1) tokens). On a GPU these are nearly flat in n, so
  long blocks win; on a CPU a 272-token quad chunk costs ~10x a decode step, so short ones do;
* **tokens per round** - with a per-draft acceptance probability a (drafts are accepted left to right, so
  round acceptance is about geometric), a round yields 1 + a + a^2 + ... + a^(L-1) tokens. `a` is the
  running estimate over every finished spec/quad round on this engine (accepted drafts / (accepted drafts +
  rejections)), starting from a prior of 0.5.

The chosen L maximises expected tokens per round / cost per round. It is fixed per request, at submission.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

from ...plugins.reference import BIDIRECTIONAL, CAUSAL, QUAD
from ..backends.step import ChunkRow, StepBatch

CANDIDATES = (2, 3, 4, 6, 8, 12, 16)
PRIOR_ACCEPTANCE = 0.5
PRIOR_WEIGHT = 4.0  # the prior counts as this many observed drafts


@dataclass
class EngineStats:
    costs: dict[tuple[str, int], float] = field(default_factory=dict)  # (mode, L) -> seconds per round
    scratch: object | None = None  # a one-slot KV cache for the timing forwards, made once
    accepted: float = PRIOR_ACCEPTANCE * PRIOR_WEIGHT
    rejected: float = (1 - PRIOR_ACCEPTANCE) * PRIOR_WEIGHT

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def record_round(self, block_length: int, accepted_drafts: int) -> None:
        """One verified round: `accepted_drafts` of the block's L - 1 drafts were kept."""
        self.accepted += accepted_drafts
        if accepted_drafts < block_length - 1:
            self.rejected += 1


_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stats_for(engine) -> EngineStats:
    stats = _STATS.get(engine)
    if stats is None:
        stats = EngineStats()
        try:
            _STATS[engine] = stats
        except TypeError:
            pass
    return stats


def _time_rows(engine, rows_for, repeats: int = 3) -> float:
    """Median wall time of a scratch forward (on a scratch cache holding a short prefix)."""
    stats = stats_for(engine)
    if stats.scratch is None:
        stats.scratch = engine.new_cache(1)
    cache = stats.scratch
    cache.reset()
    engine.step(cache, StepBatch.from_rows([ChunkRow(0, [1] * 8, CAUSAL, write=True)], cache))
    times = []
    for _ in range(repeats + 1):
        rows = rows_for()
        start = time.perf_counter()
        logits = engine.step(cache, StepBatch.from_rows(rows, cache))
        if logits.is_cuda:
            import torch

            torch.cuda.synchronize(logits.device)
        times.append(time.perf_counter() - start)
        cache.rollback(0, 8)
    return sorted(times[1:])[len(times[1:]) // 2]


def round_cost(engine, mode: str, length: int) -> float:
    """Seconds per round of `mode` at block length `length` on this engine (measured once, then cached)."""
    stats = stats_for(engine)
    key = (mode, length)
    if key not in stats.costs:
        mask = engine.config.mask_token_id
        offsets = list(range(length))
        if mode == "spec":
            draft = _time_rows(engine, lambda: [ChunkRow(0, [5] + [mask] * (length - 1), BIDIRECTIONAL,
                                                         lora=engine.has_lora, logit_offsets=offsets)])
            verify = _time_rows(engine, lambda: [ChunkRow(0, [5] * length, CAUSAL, write=True,
                                                          logit_offsets=offsets)])
            stats.costs[key] = draft + verify
        else:
            from ..modes.quad import quad_layout, quad_logit_offsets

            def quad_row():
                tokens, positions = quad_layout(8, [5] * length, mask)
                return [ChunkRow(0, tokens, QUAD, mask_param=length, write=True,
                                 logit_offsets=quad_logit_offsets(length, False), positions=positions)]

            stats.costs[key] = _time_rows(engine, quad_row)
    return stats.costs[key]


def expected_tokens(acceptance: float, length: int) -> float:
    return sum(acceptance ** i for i in range(length))


def largest_candidate(engine) -> int:
    """The longest block `auto` may pick (what capacity checks must allow for)."""
    return max(length for length in CANDIDATES if not engine.limits.block_lengths
               or length in engine.limits.block_lengths) if any(
        not engine.limits.block_lengths or c in engine.limits.block_lengths for c in CANDIDATES) \
        else max(engine.limits.block_lengths)


def choose_block_length(engine, mode: str) -> int:
    """The candidate L with the highest expected tokens per second (see the module docstring)."""
    stats = stats_for(engine)
    limit = engine.limits.block_lengths or CANDIDATES
    best, best_rate = None, -1.0
    for length in CANDIDATES:
        if length not in limit:
            continue
        rate = expected_tokens(stats.acceptance, length) / round_cost(engine, mode, length)
        if rate > best_rate:
            best, best_rate = length, rate
    return best or min(limit)
