"""Linear self-speculation: draft a block bidirectionally, verify it causally, keep the agreeing prefix + 1.

Greedy output is AR's exactly: every emitted token is the causal model's choice given the tokens before it,
because a draft token is only kept while it equals that choice. With temperature > 0 the verify pass samples
each position from the causal distribution (top-k / top-p filtered alike) and a draft is kept while it
equals the sample, which is again exactly AR sampling. Rolling back is keeping fewer of the verify row's
written positions (the scheduler moves the sequence's length and frees the pages past it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ...plugins.masks import BIDIRECTIONAL, CAUSAL
from ..backends.step import ChunkRow
from ..logits import Context
from ..sampler import ARGMAX, Decided, Pick
from .base import ModeState, RowPlan
from .sequence import Sequence

RoundCallback = Callable[[int, int], None]  # (block length, drafts accepted) after each verified round


def fill_draft(block: list[int], x0: np.ndarray, confidence: np.ndarray, mask_id: int,
               threshold: float | None) -> None:
    """One draft pass: every mask takes its argmax (no threshold), or only confident ones (at least one).

    Position 0 is the verified token and is never a draft slot, even when that token is the mask id itself.
    """
    masked = [i for i in range(1, len(block)) if block[i] == mask_id]
    if not threshold:
        chosen = masked
    else:
        chosen = [i for i in masked if confidence[i] >= threshold]
        if not chosen:
            chosen = [max(masked, key=lambda i: (confidence[i], -i))]
    for i in chosen:
        block[i] = int(x0[i])


def accepted_length(block: list[int], verified: np.ndarray) -> int:
    """c = length of the longest run with verified[i] == block[i + 1]."""
    count = 0
    while count + 1 < len(block) and int(verified[count]) == block[count + 1]:
        count += 1
    return count


class SpecMode(ModeState):
    def __init__(self, block_length: int, mask_id: int, threshold: float | None, lora: bool,
                 on_round: RoundCallback | None = None) -> None:
        self.length = block_length
        self.on_round = on_round
        self.mask_id = mask_id
        self.threshold = threshold
        self.lora = lora
        self.block: list[int] | None = None
        self.passes = 0

    def _drafting(self) -> bool:
        return self.block is not None and self.mask_id in self.block[1:] and self.passes < self.length

    def plan_decode(self, seq: Sequence) -> RowPlan:
        if self.block is None:
            self.block = [seq.tokens[-1]] + [self.mask_id] * (self.length - 1)
            self.passes = 0
        offsets = list(range(self.length))
        done = len(seq.tokens)
        if self._drafting():
            # a masked slot i guesses block[i]: processed with the slots before it. A one-pass draft (every slot
            # masked) chains them: slot i follows the picks of slots 1..i-1, so its draft obeys the grammar and
            # the penalties as AR would after them. Multi-pass drafts (a threshold) see the slots committed so
            # far; behind a slot still masked a grammar allows anything. Drafts are only guesses either way.
            contexts = [Context(tuple(self.block[1:i]), done - 1 + i) if token == self.mask_id and i else None
                        for i, token in enumerate(self.block)]
            chains = [list(range(1, self.length))] if self.passes == 0 and not self.threshold else None
            row = ChunkRow(list(self.block), BIDIRECTIONAL, lora=self.lora, logit_offsets=offsets)
            return RowPlan(row, Pick(ARGMAX, confidence=bool(self.threshold), contexts=contexts, chains=chains))
        # verify position i follows the drafts block[1..i]: the context logits processing sees there
        contexts = [Context(tuple(self.block[1 : i + 1]), done + i) for i in range(self.length)]
        return RowPlan(ChunkRow(list(self.block), CAUSAL, write=True, logit_offsets=offsets), Pick(contexts=contexts))

    def consume_decode(self, seq: Sequence, plan: RowPlan, decided: Decided) -> int | None:
        if plan.row.mask_kind == BIDIRECTIONAL:
            fill_draft(self.block, decided.tokens, decided.confidence, self.mask_id, self.threshold)
            self.passes += 1
            return None
        accepted = accepted_length(self.block, decided.tokens)
        if self.on_round is not None:
            self.on_round(self.length, accepted)
        kept = seq.emit([int(t) for t in decided.tokens[: accepted + 1]],
                        logprobs=[decided.entry(i) for i in range(accepted + 1)])
        self.block = None
        return kept  # the verified block's first `kept` positions stay: t and the accepted drafts
