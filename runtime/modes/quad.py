"""Quadratic self-speculation (TiDAR-style): verify the current draft and pre-draft the next, in ONE forward.

First forward: the prompt causally, then L masks that see the whole prompt and each other (a prefix_block
row; only the prompt is written). d_0 = the prompt's last causal logit (AR-exact, emitted at once),
d_i = argmax of mask slot i. Each later forward carries L sub-blocks `[d_j, MASK x L]` at positions
C+j .. C+j+L (a quad row): slot 0 of sub-block j is the causal logit after d_0..d_j, the masks of sub-block j
draft the tokens that would follow if exactly d_0..d_j were accepted. Slot 1's logit is replaced by slot 0's
(it predicts the same position), so pred[j] = [AR token after d_j, next drafts...]. d_k (k >= 1) is
accepted while pred[k-1, 0] == d_k; with a accepted the cache keeps the a accepted d's (the kernel wrote all
L d's at C..C+L-1; the scheduler keeps C+a), the emitted tokens are d_1..d_{a-1} and the new
d_0 = pred[a-1, 0], and the next draft is pred[a-1, 0:] (slot 0 then slots 2..L). Greedy tokens equal AR's;
with temperature > 0 each slot 0 is sampled from the causal distribution with the sequence's generator and
a draft is accepted while it equals the sample (exact AR sampling). `ar_mix_weight` blends slot 0 into slot 1
as the reference does; then d_0 is no longer AR-exact and tokens may differ from AR.
"""

from __future__ import annotations

from ...plugins.masks import PREFIX_BLOCK, QUAD
from ..backends.step import ChunkRow
from ..logits import Context
from ..sampler import ARGMAX, SAMPLE, Decided, Pick
from .base import ModeState, RowPlan
from .sequence import Sequence
from .spec import RoundCallback


def quad_layout(cache_len: int, drafts: list[int], mask_id: int) -> tuple[list[int], list[int]]:
    """Tokens and positions of a quad chunk for drafts d_0..d_{L-1} after `cache_len` cached tokens."""
    length = len(drafts)
    tokens: list[int] = []
    positions: list[int] = []
    for j, d in enumerate(drafts):
        tokens += [d] + [mask_id] * length
        positions += list(range(cache_len + j, cache_len + j + length + 1))
    return tokens, positions


def quad_logit_offsets(length: int, mix: bool) -> list[int]:
    """Per sub-block: slot 0, (slot 1 when blending), slots 2..L."""
    width = length + 1
    slots = [0, 1] + list(range(2, width)) if mix else [0] + list(range(2, width))
    return [j * width + s for j in range(length) for s in slots]


class QuadMode(ModeState):
    def __init__(self, block_length: int, mask_id: int, ar_mix_weight: float | None,
                 on_round: RoundCallback | None = None) -> None:
        self.length = block_length
        self.on_round = on_round
        self.mask_id = mask_id
        self.mix = ar_mix_weight
        self.drafts: list[int] = []

    def extend_last_prefill(self, seq: Sequence, row: ChunkRow) -> RowPlan:
        n = len(row.tokens)
        tokens = row.tokens + [self.mask_id] * self.length
        offsets = [n - 1] + [n + i for i in range(1, self.length)]
        tail = ChunkRow(tokens, PREFIX_BLOCK, mask_param=self.length, write=True, logit_offsets=offsets)
        return RowPlan(tail, Pick(SAMPLE, kinds=[SAMPLE] + [ARGMAX] * (self.length - 1)), is_prefill=True)

    def consume_prefill(self, seq: Sequence, plan: RowPlan, decided: Decided) -> None:
        self.drafts = [int(t) for t in decided.tokens]
        seq.emit(self.drafts[:1], logprobs=[decided.entry(0)])
        if seq.tokens and seq.tokens[-1] != self.drafts[0]:  # a forced end-of-thinking token: redraft after it
            self.drafts = [seq.tokens[-1]] + [self.mask_id] * (self.length - 1)

    def plan_decode(self, seq: Sequence) -> RowPlan:
        tokens, positions = quad_layout(seq.cached, self.drafts, self.mask_id)
        mixing = self.mix is not None
        offsets = quad_logit_offsets(self.length, mixing)
        per_block = len(offsets) // self.length
        kinds = ([SAMPLE] + [ARGMAX] * (per_block - 1)) * self.length
        mix = None
        if mixing:
            mix = (self.mix, [(j * per_block, j * per_block + 1) for j in range(self.length)])
        # slot 0 of sub-block j (and its blend in slot 1) follows the drafts d_1..d_j; mask slots are drafts
        # the mask slots of sub-block j draft the tokens after slot 0's: chained behind its (argmax) pick, so
        # they obey the request's options as AR would after it; they are guesses, slot 0 alone is exact
        done = len(seq.tokens)
        contexts: list[Context | None] = []
        chains: list[list[int]] = []
        for j in range(self.length):
            context = Context(tuple(self.drafts[1 : j + 1]), done + j)
            start = len(contexts)
            contexts += [context] + ([context] if mixing else [])
            contexts += [Context((), done + j + s) for s in range(1, per_block - mixing)]
            chains.append([start] + list(range(start + 1 + mixing, start + per_block)))
        row = ChunkRow(tokens, QUAD, mask_param=self.length, write=True, logit_offsets=offsets, positions=positions)
        return RowPlan(row, Pick(SAMPLE, kinds=kinds, mix=mix, contexts=contexts, chains=chains))

    def consume_decode(self, seq: Sequence, plan: RowPlan, decided: Decided) -> int:
        length = self.length
        per_block = len(decided.tokens) // length
        pred = [[int(t) for t in decided.tokens[j * per_block : (j + 1) * per_block]] for j in range(length)]
        ar = [p[0] for p in pred]  # AR choice after d_0..d_j
        accepted = 1
        while accepted < length and ar[accepted - 1] == self.drafts[accepted]:
            accepted += 1
        if self.on_round is not None:
            self.on_round(length, accepted - 1)
        head = pred[accepted - 1]
        new_first = head[1] if self.mix is not None else head[0]
        offered = self.drafts[1:accepted] + [new_first]
        # d_k was accepted as the pick of slot 0 of sub-block k - 1; the new d_0 is sub-block a - 1's pick
        sources = [(k - 1) * per_block for k in range(1, accepted)]
        sources.append((accepted - 1) * per_block + (1 if self.mix is not None else 0))
        kept = seq.emit(offered, logprobs=[decided.entry(i) for i in sources])
        # all L d's were written at C .. C+L-1; the cache keeps d_0 .. d_{a-1} (or what was kept when cut short)
        if kept == len(offered) and seq.tokens and seq.tokens[-1] == new_first:
            self.drafts = [new_first] + head[-(length - 1):] if length > 1 else [new_first]
            return accepted
        # cut short (EOS, length, a forced end-of-thinking token): restart drafting after what was kept
        self.drafts = [seq.tokens[-1]] + [self.mask_id] * (length - 1)
        return kept
