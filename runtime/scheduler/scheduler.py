"""Iteration-level scheduling: every running request, whatever its mode, advances in ONE forward per step.

The scheduler owns the engine's KV cache for its whole life (allocated once, `num_slots` sequences of
`max_seq_len` positions; a slot is reused by setting its length to 0, never re-allocated or zero-filled).
A submitted request waits in a FIFO queue until a slot is free; a request that could never fit is refused at
submission. Each `step()`:

1. drops cancelled requests (running or waiting) and admits waiting ones into free slots;
2. asks every running sequence's mode for its next row - decode-like rows first, then prompt prefills, which
   are cut into chunks so the step stays within `max_step_tokens` (a long prompt never stalls the others);
3. packs all rows into one `StepBatch`, runs ONE engine forward, makes every pick on the device with one
   transfer to the host (decisions.py), and lets each mode consume its row's result;
4. finishes the requests that are done (EOS, length, cancel) and frees their slots at once.
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..backends.step import StepBatch, StepEngine
from ..modes.base import RowPlan
from ..modes.sequence import CancelCheck, Sequence, TokenCallback
from .decisions import decide

FinishCallback = Callable[[Sequence], None]
MIN_PREFILL_CHUNK = 16  # a waiting prompt always advances by at least this many tokens per step


@dataclass
class StepRecord:
    """What one step did (for stats, logs and tests)."""

    number: int
    rows: int
    tokens: int
    modes: dict[str, int]


class Scheduler:
    """See the module docstring. Not thread-safe: one thread steps it (runtime/scheduler/loop.py)."""

    def __init__(self, engine: StepEngine, num_slots: int | None = None, max_step_tokens: int | None = None,
                 on_step: Callable[[StepRecord], None] | None = None) -> None:
        self.engine = engine
        limits = engine.limits
        self.num_slots = min(num_slots or limits.max_batch_size, limits.max_batch_size)
        self.max_step_tokens = max_step_tokens or limits.max_step_tokens
        self.cache = engine.new_cache(self.num_slots)
        self.free_slots = list(range(self.num_slots - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.on_step = on_step
        self.steps = 0
        self._ids = itertools.count()
        self._on_finish: dict[int, FinishCallback] = {}

    # -- requests ---------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], config, on_tokens: TokenCallback | None = None,
               is_cancelled: CancelCheck | None = None, on_finish: FinishCallback | None = None,
               index: int | None = None) -> Sequence:
        """Queue a request (validated now: a RequestError if it can never be served)."""
        from ..generate import make_sequence, validate_request  # generate.py builds on this module

        validate_request(self.engine, [prompt], config)
        seq = make_sequence(self.engine, prompt, config, next(self._ids) if index is None else index)
        seq.on_tokens, seq.is_cancelled, seq.submitted_step = on_tokens, is_cancelled, self.steps
        if on_finish is not None:
            self._on_finish[id(seq)] = on_finish
        self.waiting.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def cancel_all(self) -> None:
        """Cancel everything (shutdown): every request gets its finish callback."""
        for seq in [*self.running, *self.waiting]:
            if not seq.done:
                seq.finish_reason = "cancelled"
        self._retire()

    # -- the step ---------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one forward for every running request; False when there was nothing to run."""
        for seq in [*self.running, *self.waiting]:
            if not seq.done and seq.cancel_requested():
                seq.finish_reason = "cancelled"
        self._retire()
        self._admit()
        plans, members = self._plan()
        self._retire()
        if not plans:
            return False
        batch = StepBatch.from_rows([p.row for p in plans], self.cache)
        logits = self.engine.step(self.cache, batch)
        for seq, plan, decided in zip(members, plans, decide(logits, plans, members), strict=True):
            had_tokens = len(seq.tokens)
            seq.mode.consume(seq, plan, decided, self.cache)
            if had_tokens == 0 and seq.tokens:
                seq.first_token_step = self.steps + 1
        self.steps += 1
        if self.on_step is not None:
            modes: dict[str, int] = {}
            for seq in members:
                modes[seq.config.mode] = modes.get(seq.config.mode, 0) + 1
            self.on_step(StepRecord(self.steps, len(plans), batch.num_tokens, modes))
        self._retire()
        return True

    def run(self, max_steps: int | None = None) -> None:
        """Step until nothing is left (or `max_steps` steps ran)."""
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.step() and not self.has_work:
                return

    def _admit(self) -> None:
        while self.free_slots and self.waiting:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            seq.admitted_step = self.steps
            self.cache.reset([seq.slot])
            self.running.append(seq)

    def _plan(self) -> tuple[list[RowPlan], list[Sequence]]:
        decoding = [s for s in self.running if s.prefilled >= len(s.prompt)]
        prefilling = [s for s in self.running if s.prefilled < len(s.prompt)]
        plans, members, used = [], [], 0
        for seq in decoding:
            plan = seq.mode.plan(seq, self.cache, 0)
            if plan is None:
                seq.finish_reason = seq.finish_reason or "length"
                continue
            plans.append(plan)
            members.append(seq)
            used += len(plan.row.tokens)
        for seq in prefilling:
            budget = max(self.max_step_tokens - used, MIN_PREFILL_CHUNK)
            plan = seq.mode.plan(seq, self.cache, budget)
            plans.append(plan)
            members.append(seq)
            used += len(plan.row.tokens)
        return plans, members

    def _retire(self) -> None:
        finished = [s for s in self.running if s.done]
        finished += [s for s in self.waiting if s.done]
        if not finished:
            return
        self.running = [s for s in self.running if not s.done]
        self.waiting = deque(s for s in self.waiting if not s.done)
        for seq in finished:
            if seq.slot >= 0:
                self.free_slots.append(seq.slot)
            callback = self._on_finish.pop(id(seq), None)
            if callback is not None:
                callback(seq)


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_scheduler(engine: StepEngine, num_slots: int) -> Scheduler:
    """The engine's idle scheduler with at least `num_slots` slots, made once and reused by later calls, so
    repeated `generate()` calls on one engine never allocate a KV cache again."""
    current = _SHARED.get(engine)
    if current is None or current.num_slots < num_slots or current.has_work:
        current = Scheduler(engine, num_slots=num_slots)
        try:
            _SHARED[engine] = current
        except TypeError:  # an engine that cannot be weakly referenced: no sharing
            pass
    return current
