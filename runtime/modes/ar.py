"""AR mode: causal prefill, then one token per forward."""

from __future__ import annotations

from ...plugins.reference import CAUSAL
from ..backends.step import ChunkRow
from ..model.kv_cache import KVCache
from .base import Decided, ModeState, Pick, RowPlan
from .sequence import Sequence


class ARMode(ModeState):
    def plan_decode(self, seq: Sequence, cache: KVCache) -> RowPlan:
        return RowPlan(ChunkRow(seq.slot, [seq.tokens[-1]], CAUSAL, write=True, logit_offsets=[0]), Pick())

    def consume_decode(self, seq: Sequence, plan: RowPlan, decided: Decided, cache: KVCache) -> None:
        seq.emit([int(decided.tokens[0])])
