"""Infill (fill-in-the-middle): the prefix in the cache, one chunk `[MASK x n][suffix]` denoised bidirectionally.

The prompt (prefix) is prefilled causally. The chunk sits right after it; inside it every token sees every
other, so the masked slots condition on the clean suffix that follows them - what an AR model cannot do.
Nothing of the chunk is ever written (the cache only holds the prefix). Slots are committed by confidence
as diffusion does (runtime/modes/diffusion.py `Denoiser`): with a threshold, the best slot plus every slot
at or above it; without one, one slot per pass (the hole's n masks over n passes). Every pass is bounded:
at most n passes. The output is the n middle tokens (cut after an EOS, like every mode); the hole's leading
run of committed slots is emitted as soon as it is committed.
The chunk is one block however long n + suffix is: measured on the demo model, a single chunk in which the
masks see the whole suffix infills better than splitting it (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from ..sampler import ARGMAX, Decided, Pick
from .base import ModeState, RowPlan
from .diffusion import Denoiser
from .sequence import Sequence


class InfillMode(ModeState):
    prefill_pick = Pick(ARGMAX)

    def __init__(self, hole: int, suffix: list[int], mask_id: int, threshold: float | None) -> None:
        self.denoiser = Denoiser([mask_id] * hole + list(suffix), hole, mask_id, None, threshold, hole)

    def extend_last_prefill(self, seq: Sequence, row) -> RowPlan:
        row.logit_offsets = []  # the prefix's logits are not needed: the hole is denoised from masks
        return RowPlan(row, Pick(ARGMAX), is_prefill=True)

    def consume_prefill(self, seq: Sequence, plan: RowPlan, decided: Decided) -> None:
        pass

    def plan_decode(self, seq: Sequence) -> RowPlan | None:
        return None if seq.done else self.denoiser.row(seq)

    def consume_decode(self, seq: Sequence, plan: RowPlan, decided: Decided) -> None:
        self.denoiser.consume(decided)
        tokens, entries = self.denoiser.take_settled()
        seq.emit(tokens, truncate_on_force=False, logprobs=entries)  # the hole's leading committed run
        if self.denoiser.finished and not seq.done:
            seq.finish_reason = "length"
