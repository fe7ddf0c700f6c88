"""The old per-kind steps (prefill, decode, draft, verify) spelled as chunk rows, for tests of the engine step."""

from __future__ import annotations

import torch

from trimode.plugins.reference import BIDIRECTIONAL, CAUSAL
from trimode.runtime.backends.step import ChunkRow, StepBatch


def run(engine, cache, rows: list[ChunkRow]) -> torch.Tensor:
    return engine.step(cache, StepBatch.from_rows(rows, cache))


def prefill(engine, cache, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Causal, written; last-token logits [B, V]."""
    rows = [ChunkRow(s, list(p), CAUSAL, write=True, logit_offsets=[len(p) - 1]) for s, p in zip(slots, prompts,
                                                                                                 strict=True)]
    return run(engine, cache, rows)


def decode(engine, cache, slots: list[int], tokens: list[int]) -> torch.Tensor:
    return prefill(engine, cache, slots, [[t] for t in tokens])


def _blocks(engine, cache, slots, blocks, kind, write, lora) -> torch.Tensor:
    blocks = [list(map(int, b)) for b in blocks]
    rows = [ChunkRow(s, b, kind, write=write, lora=lora, logit_offsets=list(range(len(b))))
            for s, b in zip(slots, blocks, strict=True)]
    return run(engine, cache, rows).view(len(blocks), len(blocks[0]), -1)


def draft(engine, cache, slots: list[int], blocks, lora: bool = False) -> torch.Tensor:
    """Bidirectional, not written; logits [B, T, V]."""
    return _blocks(engine, cache, slots, blocks, BIDIRECTIONAL, False, lora)


def verify(engine, cache, slots: list[int], blocks) -> torch.Tensor:
    """Causal, written; logits [B, T, V]."""
    return _blocks(engine, cache, slots, blocks, CAUSAL, True, False)
