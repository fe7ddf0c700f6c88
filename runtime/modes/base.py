"""What a mode is to the scheduler: a per-sequence state machine that plans a chunk row and consumes its result.

Each step the scheduler asks every running sequence's mode for its next `RowPlan` (the chunk row, plus how
its logits become tokens: a `Pick`), packs all rows into one forward, makes every pick on the device in one
go (runtime/sampler.py) and hands each mode its `Decided` values - small host arrays, fetched in one
transfer. A mode never touches the KV cache: it reads how many positions its sequence has cached
(`seq.cached`) and, after a row that wrote, says how many of the written positions to keep (a speculative
round keeps the accepted run and rolls the rest back); the scheduler, which owns the cache, does the rest.

The prefill is shared by every mode: causal, written, chunked under the step's token budget. Only the last
chunk of a request's first prefill asks for logits, and a mode may extend that chunk (quad appends its
masks). A sequence resumed after preemption prefills its known tokens again (no logits: its mode state was
kept) and carries on where it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...plugins.masks import CAUSAL
from ..backends.step import ChunkRow
from ..sampler import ARGMAX, SAMPLE, Decided, Pick
from .sequence import Sequence


@dataclass
class RowPlan:
    """A row, how its logits become tokens, and `scores`: the prompt tokens its leading logits score (prompt
    logprobs; the scheduler splits those logits off before the mode consumes the rest)."""

    row: ChunkRow
    pick: Pick
    is_prefill: bool = False
    scores: list[int] = field(default_factory=list)

    @property
    def num_logits(self) -> int:
        return len(self.row.logit_offsets)


class ModeState:
    """Base of every mode's state machine; subclasses implement `plan_decode` and `consume_decode`."""

    #: the pick used on the prompt's last logit (the first token or seed)
    prefill_pick = Pick(SAMPLE)

    def plan(self, seq: Sequence, budget: int) -> RowPlan | None:
        """The next row of `seq` (a prefill chunk of at most `budget` tokens), or None if it is done."""
        if seq.prefilling:
            return self.plan_prefill(seq, budget)
        return self.plan_decode(seq)

    def plan_prefill(self, seq: Sequence, budget: int) -> RowPlan:
        target = seq.prefill_target
        start = seq.prefilled
        chunk = target[start : start + max(budget, 1)]
        last = start + len(chunk) == len(target) and seq.first_prefill
        if last:
            row = ChunkRow(chunk, CAUSAL, write=True, logit_offsets=[len(chunk) - 1])
            plan = self.extend_last_prefill(seq, row)
        else:
            plan = RowPlan(ChunkRow(chunk, CAUSAL, write=True), Pick(ARGMAX), is_prefill=True)
        if seq.first_prefill and seq.config.prompt_logprobs is not None:
            # prompt logprobs: position p's logit scores prompt token p + 1 (the prompt's last position gives
            # the first generated token instead, as the mode asks)
            scored = len(chunk) - 1 if last else len(chunk)
            plan.row.logit_offsets = list(range(scored)) + list(plan.row.logit_offsets)
            plan.scores = list(target[start + 1 : start + 1 + scored])
        return plan

    def extend_last_prefill(self, seq: Sequence, row: ChunkRow) -> RowPlan:
        """The prompt's last chunk; its single logit gives the first token (modes may change this)."""
        return RowPlan(row, self.prefill_pick, is_prefill=True)

    def consume(self, seq: Sequence, plan: RowPlan, decided: Decided) -> int:
        """Apply a row's result; returns how many of the positions the row wrote stay in the cache."""
        if plan.scores:  # prompt logprobs of the tokens after this chunk's positions, then the mode's logits
            first = seq.prefilled + 1
            for i, token in enumerate(plan.scores):
                seq.prompt_scores[first + i] = decided.scored(i, token)
            decided = decided.tail(len(plan.scores))
        if plan.is_prefill:
            seq.prefilled += plan.row.written
            if not seq.prefilling:
                seq.forwards += 1  # a whole prefill counts as one forward, however many chunks it took
                if seq.first_prefill:
                    seq.first_prefill = False
                    self.consume_prefill(seq, plan, decided)
            return plan.row.written
        seq.forwards += 1
        kept = self.consume_decode(seq, plan, decided)
        return plan.row.written if kept is None else kept

    def consume_prefill(self, seq: Sequence, plan: RowPlan, decided: Decided) -> None:
        """Default: the prompt's last logit is the first generated token (AR, spec)."""
        seq.emit([int(decided.tokens[0])], logprobs=[decided.entry(0)])

    def plan_decode(self, seq: Sequence) -> RowPlan | None:
        raise NotImplementedError

    def consume_decode(self, seq: Sequence, plan: RowPlan, decided: Decided) -> int | None:
        """Apply a decode-like row; returns the written positions to keep (None: all of them)."""
        raise NotImplementedError
