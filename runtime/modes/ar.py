"""AR mode: causal prefill, then one token per forward for every unfinished sequence."""

from __future__ import annotations

from ..backends.torch_engine import StepEngine
from ..model.kv_cache import KVCache
from .sampling import pick_tokens
from .sequence import CancelCheck, Sequence, TokenCallback, prefill_all, still_running


def prefill_first_tokens(engine: StepEngine, cache: KVCache, sequences: list[Sequence], temperature: float,
                         on_tokens: TokenCallback | None) -> None:
    """Causal prefill; its last logit gives each sequence's first token (AR and self-speculation alike)."""
    logits = prefill_all(engine, cache, sequences)
    for row, seq in enumerate(sequences):
        seq.emit([int(pick_tokens(logits[row], temperature, seq.generator))], on_tokens)


def run_ar(engine: StepEngine, cache: KVCache, sequences: list[Sequence], temperature: float,
           on_tokens: TokenCallback | None, is_cancelled: CancelCheck | None) -> None:
    prefill_first_tokens(engine, cache, sequences, temperature, on_tokens)
    while True:
        running = still_running(sequences, is_cancelled)
        if not running:
            return
        logits = engine.decode(cache, [s.slot for s in running], [s.tokens[-1] for s in running])
        for row, seq in enumerate(running):
            seq.forwards += 1
            seq.emit([int(pick_tokens(logits[row], temperature, seq.generator))], on_tokens)
