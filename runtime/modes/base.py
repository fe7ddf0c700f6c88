"""What a mode is to the scheduler: a per-sequence state machine that plans a chunk row and consumes its result.

Each step the scheduler asks every running sequence's mode for its next `RowPlan` (the chunk row, plus how
its logits become tokens: a `Pick`), packs all rows into one forward, makes every pick on the device in one
go (runtime/scheduler/decisions.py) and hands each mode its `Decided` values - small host arrays, fetched in
one transfer. The prompt prefill is shared by every mode: causal, written, chunked under the step's token
budget; only the last chunk asks for logits, and a mode may extend that last chunk (quad appends its masks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...plugins.reference import CAUSAL
from ..backends.step import ChunkRow
from ..model.kv_cache import KVCache
from .sequence import Sequence

RoundCallback = Callable[[int, int], None]  # (block length, drafts accepted) after each verified round

SAMPLE = "sample"    # AR sampling at the request's temperature / top-k / top-p (argmax when greedy)
ARGMAX = "argmax"    # always greedy (drafts)
DENOISE = "denoise"  # diffusion proposals (Gumbel-max at the temperature)


@dataclass
class Pick:
    """How a row's logits become tokens. `kinds` gives one kind per logit (None: `kind` for all);
    `confidence` also returns softmax(logits)[token]; `mix` = (w, [(slot0, slot1), ...]) replaces each slot1
    logit (row-local logit indices) by w * slot0 + (1 - w) * slot1 before picking (quad's ar_mix_weight)."""

    kind: str = SAMPLE
    kinds: list[str] | None = None
    confidence: bool = False
    mix: tuple[float, list[tuple[int, int]]] | None = None


@dataclass
class RowPlan:
    row: ChunkRow
    pick: Pick
    is_prefill: bool = False


@dataclass
class Decided:
    """A row's picks on the host, one entry per requested logit."""

    tokens: np.ndarray      # int64
    confidence: np.ndarray  # float32 (zeros where not asked for)


class ModeState:
    """Base of every mode's state machine; subclasses implement `plan_decode` and `consume_decode`."""

    #: the pick used on the prompt's last logit (the first token or seed)
    prefill_pick = Pick(SAMPLE)

    def plan(self, seq: Sequence, cache: KVCache, budget: int) -> RowPlan | None:
        """The next row of `seq`, or None if it has nothing to run (done)."""
        if seq.prefilled < len(seq.prompt):
            return self.plan_prefill(seq, budget)
        return self.plan_decode(seq, cache)

    def plan_prefill(self, seq: Sequence, budget: int) -> RowPlan:
        chunk = seq.prompt[seq.prefilled : seq.prefilled + max(budget, 1)]
        last = seq.prefilled + len(chunk) == len(seq.prompt)
        row = ChunkRow(seq.slot, chunk, CAUSAL, write=True, logit_offsets=[len(chunk) - 1] if last else [])
        return self.extend_last_prefill(seq, row) if last else RowPlan(row, Pick(ARGMAX), is_prefill=True)

    def extend_last_prefill(self, seq: Sequence, row: ChunkRow) -> RowPlan:
        """The prompt's last chunk; its single logit gives the first token (modes may change this)."""
        return RowPlan(row, self.prefill_pick, is_prefill=True)

    def consume(self, seq: Sequence, plan: RowPlan, decided: Decided, cache: KVCache) -> None:
        if plan.is_prefill:
            seq.prefilled += plan.row.written
            if seq.prefilled >= len(seq.prompt):
                seq.forwards += 1  # the whole prefill counts as one forward, however many chunks it took
                self.consume_prefill(seq, plan, decided, cache)
            return
        seq.forwards += 1
        self.consume_decode(seq, plan, decided, cache)

    def consume_prefill(self, seq: Sequence, plan: RowPlan, decided: Decided, cache: KVCache) -> None:
        """Default: the prompt's last logit is the first generated token (AR, spec)."""
        seq.emit([int(decided.tokens[0])])

    def plan_decode(self, seq: Sequence, cache: KVCache) -> RowPlan | None:
        raise NotImplementedError

    def consume_decode(self, seq: Sequence, plan: RowPlan, decided: Decided, cache: KVCache) -> None:
        raise NotImplementedError
