"""Per-sequence bookkeeping shared by the generation modes.

A batch is a list of `Sequence`s, each owning one KV-cache slot. Modes call `emit` to commit tokens: it cuts
at EOS and at max_new_tokens, counts nothing twice, and reports the new tokens to the streaming callback.
Forwards are counted per sequence (only passes the sequence took part in), prompt prefill included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .sampling import make_generator

TokenCallback = Callable[[int, list[int]], None]
CancelCheck = Callable[[int], bool]


@dataclass
class SequenceResult:
    """What one prompt produced."""

    tokens: list[int]
    forwards: int
    finish_reason: str  # "eos" | "length" | "cancelled"
    prompt_length: int = 0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens / forwards after the prompt prefill (DESIGN.md section 3)."""
        after_prefill = self.forwards - 1
        return len(self.tokens) / after_prefill if after_prefill > 0 else float(len(self.tokens))

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "forwards": self.forwards,
                "tokens_per_forward": round(self.tokens_per_forward, 4), "finish_reason": self.finish_reason}


@dataclass
class Sequence:
    index: int
    slot: int
    prompt: list[int]
    max_new_tokens: int
    eos: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    forwards: int = 0
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(self, new: list[int], on_tokens: TokenCallback | None) -> None:
        """Commit tokens in order, stopping after EOS or at max_new_tokens."""
        kept: list[int] = []
        for token in new:
            if self.done:
                break
            kept.append(token)
            self.tokens.append(token)
            if token == self.eos:
                self.finish_reason = "eos"
            elif len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
        if kept and on_tokens is not None:
            on_tokens(self.index, kept)

    def result(self) -> SequenceResult:
        return SequenceResult(self.tokens, self.forwards, self.finish_reason or "length", len(self.prompt))


def prefill_all(engine, cache, sequences: list[Sequence]) -> torch.Tensor:
    """Causal prefill of every prompt (one forward each); last-token logits [B, V]."""
    logits = engine.prefill(cache, [s.slot for s in sequences], [s.prompt for s in sequences])
    for seq in sequences:
        seq.forwards += 1
    return logits


def make_sequences(prompts: list[list[int]], max_new_tokens: int, eos: int, seed: int) -> list[Sequence]:
    return [Sequence(i, i, list(p), max_new_tokens, eos, make_generator(seed)) for i, p in enumerate(prompts)]


def drop_cancelled(sequences: list[Sequence], is_cancelled: CancelCheck | None) -> None:
    if is_cancelled is None:
        return
    for seq in sequences:
        if not seq.done and is_cancelled(seq.index):
            seq.finish_reason = "cancelled"


def active(sequences: list[Sequence]) -> list[Sequence]:
    return [s for s in sequences if not s.done]


def still_running(sequences: list[Sequence], is_cancelled: CancelCheck | None) -> list[Sequence]:
    """The sequences that go on into the next round: unfinished and not cancelled since the last one."""
    drop_cancelled(sequences, is_cancelled)
    return active(sequences)
