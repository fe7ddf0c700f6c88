"""Diffusion mode: blocks of masked tokens denoised in parallel, causal across blocks.

Per block: `[seed, MASK x (L-1)]`; bidirectional passes (reading the cache, never writing it) propose x0 and
commit the most confident masked slots - by threshold, or an even split of the masked count over L steps
with the remainder front-loaded. Then one causal pass over the finished block writes its exact K/V and its
last logit seeds the next block (skipped after the last block: nothing follows it). The same denoising
loop serves infill (runtime/modes/infill.py), whose chunk also carries clean suffix tokens.

A committed slot never changes, so the leading run of committed slots is final as soon as it is committed:
it is emitted then (the seed at once, when its block starts), not when the whole block is done. The tokens
are the same; the first of them arrives one block earlier.
"""

from __future__ import annotations

import numpy as np

from ...plugins.masks import BIDIRECTIONAL, CAUSAL
from ..backends.step import ChunkRow
from ..logits import Context
from ..sampler import DENOISE, Decided, Pick
from .base import ModeState, RowPlan
from .sequence import Sequence, TokenLogprob


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many slots each step commits: `masked` split evenly over `steps`, remainder front-loaded."""
    base, extra = divmod(masked, steps)
    return [base + 1 if i < extra else base for i in range(steps)]


def block_finished(block: list[int], mask_id: int, eos_id: int) -> bool:
    """No mask left, or an EOS placed with no mask before it (later slots would be cut anyway)."""
    if mask_id not in block:
        return True
    return eos_id in block and mask_id not in block[: block.index(eos_id)]


def commit_step(block: list[int], x0: np.ndarray, confidence: np.ndarray, mask_id: int,
                threshold: float | None, count: int) -> list[int]:
    """Write the chosen proposals into the block in place; returns the committed positions.

    Without a threshold the `count` most confident masked slots (ties: lowest position); with one, every
    masked slot at or above it plus always the single most confident. A slot given the mask id stays masked.
    """
    masked = [i for i, t in enumerate(block) if t == mask_id]
    ranked = sorted(masked, key=lambda i: (-float(confidence[i]), i))
    if threshold is None:
        chosen = ranked[: min(count, len(masked))]
    else:
        chosen = sorted({ranked[0], *[i for i in masked if confidence[i] >= threshold]})
    for i in chosen:
        block[i] = int(x0[i])
    return chosen


class Denoiser:
    """The denoising loop over one chunk's masked slots (`span` = the chunk offsets that may be masked)."""

    def __init__(self, chunk: list[int], span: int, mask_id: int, eos_id: int | None, threshold: float | None,
                 steps: int, fixed: int = 0) -> None:
        self.chunk = chunk
        self.span = span
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.threshold = threshold
        self.steps = steps
        self.fixed = fixed  # leading slots that are known, never masked (a diffusion block's seed)
        self.schedule = transfer_schedule(chunk[fixed:span].count(mask_id), steps)
        self.done_steps = 0
        self.taken = 0  # slots handed out by `take_settled`
        self.entries: list[TokenLogprob | None] = [None] * len(chunk)  # logprobs of the committing passes

    @property
    def finished(self) -> bool:
        head = self.chunk[: self.span]
        if self.done_steps >= self.steps or self.mask_id not in head:
            return True
        return self.eos_id is not None and block_finished(head, self.mask_id, self.eos_id)

    def row(self, seq: Sequence) -> RowPlan:
        chunk = ChunkRow(list(self.chunk), BIDIRECTIONAL, logit_offsets=list(range(self.span)))
        return RowPlan(chunk, Pick(DENOISE, confidence=True, contexts=self.contexts(seq)))

    def contexts(self, seq: Sequence) -> list[Context | None]:
        """Logits processing of a pass (runtime/logits.py): every masked slot follows everything committed so
        far - the emitted tokens and this chunk's committed, not yet emitted slots - and slot i decides output
        index (emitted - taken + i)."""
        head = self.chunk[: self.span]
        pending = tuple(t for t in head[self.taken :] if t != self.mask_id)
        base = len(seq.tokens) - self.taken
        return [Context(pending, base + i) if t == self.mask_id else None for i, t in enumerate(head)]

    def take_settled(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The slots that became final since the last call, with their logprobs: the leading run of committed
        slots (all of them once the loop is finished; a slot still holding the mask id then stays as it is)."""
        end = self.fixed
        while end < self.span and self.chunk[end] != self.mask_id:
            end += 1
        if self.finished:
            end = self.span
        out = self.chunk[self.taken : end], self.entries[self.taken : end]
        self.taken = max(self.taken, end)
        return out

    def consume(self, decided: Decided) -> list[int]:
        """One pass: commit slots; returns the positions committed."""
        head = self.chunk[: self.span]
        count = self.schedule[self.done_steps]
        committed = commit_step(head, decided.tokens, decided.confidence, self.mask_id, self.threshold, count)
        self.chunk[: self.span] = head
        for i in committed:
            self.entries[i] = decided.entry(i)
        self.done_steps += 1
        return committed


class DiffusionMode(ModeState):
    prefill_pick = Pick(DENOISE)

    def __init__(self, block_length: int, mask_id: int, eos_id: int, threshold: float | None) -> None:
        self.length = block_length
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.threshold = threshold
        self.denoiser: Denoiser | None = None
        self.blocks_done = 0

    def consume_prefill(self, seq: Sequence, plan: RowPlan, decided: Decided) -> None:
        self._start_block(seq, decided)

    def _start_block(self, seq: Sequence, decided: Decided) -> None:
        """A block `[seed, MASK x (L-1)]`: the seed is final, so it is emitted now."""
        block = [int(decided.tokens[0])] + [self.mask_id] * (self.length - 1)
        self.denoiser = Denoiser(block, self.length, self.mask_id, self.eos_id, self.threshold, self.length, fixed=1)
        self.denoiser.entries[0] = decided.entry(0)
        self._emit_settled(seq)

    def _emit_settled(self, seq: Sequence) -> None:
        tokens, entries = self.denoiser.take_settled()
        seq.emit(tokens, truncate_on_force=False, logprobs=entries)
        if self.denoiser.finished and not seq.done:
            self.blocks_done += 1
            if self.blocks_done * self.length >= seq.max_new_tokens:
                seq.finish_reason = "length"

    def plan_decode(self, seq: Sequence) -> RowPlan | None:
        if seq.done:
            return None
        if not self.denoiser.finished:
            return self.denoiser.row(seq)
        # the block is final and another block follows: one causal pass writes the exact K/V of the block as
        # emitted (a forced end-of-thinking token included), so the cache holds exactly the emitted tokens
        row = ChunkRow(seq.tokens[-self.length :], CAUSAL, write=True, logit_offsets=[self.length - 1])
        return RowPlan(row, Pick(DENOISE))

    def consume_decode(self, seq: Sequence, plan: RowPlan, decided: Decided) -> None:
        if plan.row.mask_kind == CAUSAL:  # the re-encode: its last logit seeds the next block
            self._start_block(seq, decided)
            return
        self.denoiser.consume(decided)
        self._emit_settled(seq)
