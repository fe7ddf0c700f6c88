"""AR mode: causal prefill, then one token per forward."""

from __future__ import annotations

from ...plugins.masks import CAUSAL
from ..backends.step import ChunkRow
from ..sampler import Decided, Pick
from .base import ModeState, RowPlan
from .sequence import Sequence


class ARMode(ModeState):
    def plan_decode(self, seq: Sequence) -> RowPlan:
        return RowPlan(ChunkRow([seq.tokens[-1]], CAUSAL, write=True, logit_offsets=[0]), Pick())

    def consume_decode(self, seq: Sequence, plan: RowPlan, decided: Decided) -> None:
        seq.emit([int(decided.tokens[0])], logprobs=[decided.entry(0)])
