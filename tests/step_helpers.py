"""Driving `engine.step` directly in tests: sequences with page tables and lengths (`Seqs`, the runtime's
`DirectSequences`), and the old per-kind steps (prefill, decode, draft, verify) spelled as chunk rows."""

from __future__ import annotations

import torch

from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL
from trimode.runtime.backends.step import ChunkRow
from trimode.runtime.bench.direct import DirectSequences

Seqs = DirectSequences


def row(seq: int, tokens: list[int], *args, **kwargs) -> tuple[int, ChunkRow]:
    """A chunk row for sequence `seq` of a `Seqs` (for `Seqs.run`)."""
    return seq, ChunkRow(list(tokens), *args, **kwargs)


def prefill(engine, seqs: Seqs, ids: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Causal, written; last-token logits [B, V]."""
    rows = [ChunkRow(list(p), CAUSAL, write=True, logit_offsets=[len(p) - 1]) for p in prompts]
    return seqs.step(ids, rows)


def decode(engine, seqs: Seqs, ids: list[int], tokens: list[int]) -> torch.Tensor:
    return prefill(engine, seqs, ids, [[t] for t in tokens])


def _blocks(engine, seqs: Seqs, ids, blocks, kind, write, lora) -> torch.Tensor:
    blocks = [list(map(int, b)) for b in blocks]
    rows = [ChunkRow(b, kind, write=write, lora=lora, logit_offsets=list(range(len(b)))) for b in blocks]
    return seqs.step(ids, rows).view(len(blocks), len(blocks[0]), -1)


def draft(engine, seqs: Seqs, ids: list[int], blocks, lora: bool = False) -> torch.Tensor:
    """Bidirectional, not written; logits [B, T, V]."""
    return _blocks(engine, seqs, ids, blocks, BIDIRECTIONAL, False, lora)


def verify(engine, seqs: Seqs, ids: list[int], blocks) -> torch.Tensor:
    """Causal, written; logits [B, T, V]."""
    return _blocks(engine, seqs, ids, blocks, CAUSAL, True, False)
