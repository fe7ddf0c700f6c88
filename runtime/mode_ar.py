"""AR mode: causal prefill, then one token per forward for every unfinished sequence."""

from __future__ import annotations

from .engine import StepEngine
from .kv_cache import KVCache
from .sampling import pick_tokens
from .sequence import CancelCheck, Sequence, TokenCallback, active, drop_cancelled


def run_ar(engine: StepEngine, cache: KVCache, sequences: list[Sequence], temperature: float,
           on_tokens: TokenCallback | None, is_cancelled: CancelCheck | None) -> None:
    logits = engine.prefill(cache, [s.slot for s in sequences], [s.prompt for s in sequences])
    for row, seq in enumerate(sequences):
        seq.forwards += 1
        seq.emit([int(pick_tokens(logits[row], temperature, seq.generator))], on_tokens)
    while True:
        drop_cancelled(sequences, is_cancelled)
        running = active(sequences)
        if not running:
            return
        logits = engine.decode(cache, [s.slot for s in running], [s.tokens[-1] for s in running])
        for row, seq in enumerate(running):
            seq.forwards += 1
            seq.emit([int(pick_tokens(logits[row], temperature, seq.generator))], on_tokens)
