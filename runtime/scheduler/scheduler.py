"""Iteration-level scheduling over a paged KV cache: every running request, whatever its mode, advances in ONE
forward per step, and the scheduler alone decides who holds which pages.

The scheduler owns the cache for its engine (`engine.cache`: a pool of pages plus the allocator of
runtime/cache/pages.py, shared by every scheduler of the engine). It hands pages out, moves every sequence's
length (modes only say how many written positions to keep), gives pages back on rollback and at the end,
publishes full committed pages to the prefix cache, and reuses them for later requests with the same prefix.

Each `step()`:

1. drops cancelled requests and finishes those that are done, giving their pages back;
2. plans one row per running request: decode-like rows first, then prefill chunks (priority, first tokens
   first, admission); rows count against the step's token budget (`max_step_tokens`) and its row budget
   (`max_batch_size`); a prefill chunk takes what is left and a row that does not fit waits for the next
   step (admission keeps the running requests' widest decode-like rows within one step); a writing row
   takes the pages its new positions need, and when the pool is out of pages the scheduler preempts - the
   lowest-priority, most recently admitted running request gives all its pages back and waits again, its
   emitted tokens, mode state and random generator kept, to be recomputed on readmission (mostly a prefix
   cache hit);
3. admits waiting requests (priority, then arrival) while rows, tokens, pages and the decode-row reservation
   (the running requests' widest decode-like rows plus its own fit one step) allow: each first takes the
   longest prefix of its prompt found in the prefix cache and prefills only the rest; a waiting request of
   higher priority may preempt a running one of lower priority;
4. packs all rows into one `StepBatch`, runs ONE engine forward, makes every pick on the device with one
   transfer to the host (runtime/sampler.py), and lets each mode consume its row's result; then sets each
   sequence's new length, frees pages past it and publishes pages that became full.

A request that fits the pool alone is never failed for lack of pages; one that could not fit even alone, or
whose widest row exceeds the step budget or the row limit (`max_row_tokens`), is refused at submission (a
RequestError). So no step carries more than `max_step_tokens` tokens, and a running request that is past its
prefill gets a row in every step (every other step under prefill-first) whatever else was submitted: that is
the bound on how long one request can hold the others up (benchmarks/isolation.py counts it).

A fault belongs to one request: a row whose planning, picks (non-finite logits or distribution, see
runtime/sampler.py) or consumption raise fails that request alone (finish_reason "error", its message in
`error`); when the batched forward itself raises, each row is run alone once so that only the rows that fail
on their own are failed. The other requests' outputs are exactly what they would have been.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...plugins.masks import CAUSAL
from ..backends.step import ChunkRow, StepBatch, StepEngine
from ..cache.pages import OutOfPages, chain_hash, page_hashes
from ..cache.pool import KVCache
from ..errors import CapacityError, RequestError
from ..modes.base import RowPlan
from ..modes.factory import make_mode
from ..modes.sequence import CancelCheck, Sequence, TokenCallback
from ..request import AUTO, GenerationConfig, Request, extra_positions, widest_row
from ..sampler import decide, make_generator

LOG = logging.getLogger("trimode.scheduler")
FinishCallback = Callable[[Sequence], None]
DECODE_FIRST, PREFILL_FIRST = "decode-first", "prefill-first"
POLICIES = (DECODE_FIRST, PREFILL_FIRST)


@dataclass
class StepRecord:
    """What one step did (for stats, logs, metrics and tests)."""

    number: int
    rows: int
    tokens: int
    modes: dict[str, int]
    running: int = 0
    waiting: int = 0
    pages_in_use: int = 0
    num_pages: int = 0
    preemptions: int = 0  # total so far


@dataclass
class SchedulerStats:
    """Monotonic counters (the cache's own are in `cache.pages.stats`)."""

    steps: int = 0
    preemptions: int = 0
    peak_running: int = 0


class Scheduler:
    """See the module docstring. Not thread-safe: one thread steps it (runtime/scheduler/loop.py)."""

    def __init__(self, engine: StepEngine, max_batch_size: int | None = None, max_step_tokens: int | None = None,
                 on_step: Callable[[StepRecord], None] | None = None, cache: KVCache | None = None,
                 policy: str = DECODE_FIRST, max_row_tokens: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r} (choose {', '.join(POLICIES)})")
        self.policy = policy
        self._prefill_only = False  # the last step carried first prefills alone (prefill-first)
        self.engine = engine
        limits = engine.limits
        self.max_rows = min(max_batch_size or limits.max_batch_size, limits.max_batch_size)
        self.max_step_tokens = min(max_step_tokens or limits.max_step_tokens, limits.max_step_tokens)
        self.max_row_tokens = min(max_row_tokens or self.max_step_tokens, self.max_step_tokens)
        self.cache = engine.cache if cache is None else cache
        self.pages = self.cache.pages
        self.page_size = self.cache.page_size
        self.waiting: list[Sequence] = []  # ordered by (priority, arrival)
        self.running: list[Sequence] = []  # in admission order
        self.on_step = on_step
        self.stats = SchedulerStats()
        self._arrivals = itertools.count()
        self._admissions = itertools.count()
        self._admitted_at: dict[int, int] = {}
        self._on_finish: dict[int, FinishCallback] = {}
        self._budget = 0  # tokens left in the step being planned

    @property
    def steps(self) -> int:
        return self.stats.steps

    # -- requests ---------------------------------------------------------------------------------------
    def submit(self, request: Request, on_tokens: TokenCallback | None = None,
               is_cancelled: CancelCheck | None = None, on_finish: FinishCallback | None = None,
               index: int | None = None) -> Sequence:
        """Queue a validated request; a RequestError if this scheduler can never serve it (pages, step size)."""
        config = request.config
        block = self._block_length(config)
        self._refuse(request, block)
        on_round = None
        if config.mode in ("spec", "quad"):
            from .auto_block import stats_for

            on_round = stats_for(self.engine).recorder(config.mode, config.temperature > 0)
        mode = make_mode(self.engine.config, config, block, self.engine.has_lora, on_round)
        constraint = None
        if config.structured is not None:
            constraint = request_constraint(self.engine, config)
        arrival = next(self._arrivals)
        seq = Sequence(arrival if index is None else index, list(request.prompt), config,
                       self.engine.config.eos_token_id, make_generator(config.seed, self.engine.device), mode,
                       on_tokens, is_cancelled, arrival=arrival, submitted_step=self.steps, block_length=block,
                       constraint=constraint)
        if on_finish is not None:
            self._on_finish[id(seq)] = on_finish
        self._enqueue(seq)
        return seq

    def check(self, request: Request) -> None:
        """The refusals of `submit` that do not depend on the moment (for "auto", the longest block it may
        pick); reads fixed settings only, so a front end may call it from any thread before queuing."""
        config = request.config
        if config.block_length == AUTO:
            from .auto_block import largest_candidate

            block = largest_candidate(self.engine.limits, config.mode, self.max_row_tokens)
        else:
            block = int(config.block_length)
        self._refuse(request, block)

    def _refuse(self, request: Request, block: int) -> None:
        """RequestError when `request` at block length `block` can never be served here."""
        config = request.config
        need = len(request.prompt) + config.max_new_tokens + extra_positions(config, block)
        if self.pages.pages_for(need) > self.pages.num_pages:
            raise RequestError(f"the request needs {need} positions of KV cache ({self.pages.pages_for(need)} pages "
                               f"of {self.page_size}), more than the whole cache holds ({self.pages.num_pages} "
                               "pages; raise --kv-cache-memory)")
        widest = widest_row(config, block)
        if widest > self.max_step_tokens:
            raise RequestError(f"a {config.mode} row at block length {block} carries {widest} tokens, more than "
                               f"one step may hold ({self.max_step_tokens}; raise --max-step-tokens or use a "
                               "shorter block)")
        if widest > self.max_row_tokens:
            what = (f"an infill row (a hole of {config.max_new_tokens} + a suffix of {len(config.suffix)} tokens)"
                    if config.mode == "infill" else f"a {config.mode} row at block length {block}")
            raise RequestError(f"{what} carries {widest} tokens, more than one row may carry on this server "
                               f"({self.max_row_tokens}, --max-row-tokens)")

    def _block_length(self, config) -> int:
        if config.block_length == AUTO:
            from .auto_block import choose_block_length

            return choose_block_length(self.engine, config.mode, self.cache, config.temperature > 0,
                                       self.max_row_tokens)
        return int(config.block_length)

    def _enqueue(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: (s.priority, s.arrival))

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
        plans = self._schedule()
        self._retire()
        if not plans:
            return False
        members = list(plans)
        rows = [plans[s].row for s in members]
        batch = StepBatch.from_rows(rows, [s.pages for s in members], [s.cached for s in members], self.page_size)
        try:
            logits = self.engine.step(self.cache, batch)
        except Exception as exc:
            LOG.exception("a step of %d rows failed; running each row alone", len(members))
            members, logits = self._forward_apart(members, plans, exc)
        decided = decide(logits, [plans[s] for s in members], members) if members else []
        for seq, picks in zip(members, decided, strict=True):
            if picks.error is not None:
                self._fail(seq, f"sampling failed: {picks.error}")
                continue
            had_tokens = len(seq.tokens)
            try:
                kept = seq.mode.consume(seq, plans[seq], picks)
            except Exception as exc:
                LOG.exception("a %s request's step failed", seq.config.mode)
                self._fail(seq, f"generation failed: {type(exc).__name__}: {exc}")
                continue
            self._settle(seq, seq.cached + kept)
            if had_tokens == 0 and seq.tokens:
                seq.first_token_step = self.steps + 1
        self.stats.steps += 1
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))
        if self.on_step is not None:
            modes: dict[str, int] = {}
            for seq in plans:
                modes[seq.config.mode] = modes.get(seq.config.mode, 0) + 1
            self.on_step(StepRecord(self.steps, len(plans), batch.num_tokens, modes, len(self.running),
                                    len(self.waiting), self.pages.in_use, self.pages.num_pages,
                                    self.stats.preemptions))
        self._retire()
        return True

    def _forward_apart(self, members: list[Sequence], plans: dict[Sequence, RowPlan],
                       error: Exception) -> tuple[list[Sequence], torch.Tensor | None]:
        """After a failed batched forward: each row alone (rewriting its own positions is harmless); a row that
        fails alone fails its request. Returns the rows that ran and their logits, in step order."""
        survivors: list[Sequence] = []
        pieces = []
        for seq in members:
            if len(members) == 1:
                failure: Exception | None = error
            else:
                single = StepBatch.from_rows([plans[seq].row], [seq.pages], [seq.cached], self.page_size)
                try:
                    pieces.append(self.engine.step(self.cache, single))
                    survivors.append(seq)
                    continue
                except Exception as exc:
                    failure = exc
            self._fail(seq, f"generation failed: {type(failure).__name__}: {failure}")
        return survivors, (torch.cat(pieces) if pieces else None)

    def _fail(self, seq: Sequence, message: str) -> None:
        """This request alone ends with an error (its pages are given back when it is retired)."""
        if not seq.done:
            seq.finish_reason = "error"
            seq.error = message

    def run(self, max_steps: int | None = None) -> None:
        """Step until nothing is left (or `max_steps` steps ran)."""
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.step() and not self.has_work:
                return

    # -- planning ---------------------------------------------------------------------------------------
    def _schedule(self) -> dict[Sequence, RowPlan]:
        """This step's rows: running requests first (priority, admission), then admissions (see the module
        docstring). Dicts keep insertion order: the batch's row order.

        With the prefill-first policy, a step in which prompts wait to be admitted or are still in their first
        prefill carries those prefills alone - a short step, so their first token comes soon - and the next
        step is an ordinary one again (decode-like rows never wait more than every other step)."""
        if self.policy == PREFILL_FIRST and not self._prefill_only:
            plans = self._plan(first_prefills_only=True)
            if plans:
                self._prefill_only = True
                return plans
        self._prefill_only = False
        return self._plan(first_prefills_only=False)

    def _plan(self, first_prefills_only: bool) -> dict[Sequence, RowPlan]:
        plans: dict[Sequence, RowPlan] = {}
        self._budget = self.max_step_tokens
        for seq in sorted(self.running, key=self._order):
            if first_prefills_only and not (seq.first_prefill and seq.prefilling):
                continue
            if seq not in self.running:  # preempted while planning an earlier row
                continue
            if len(plans) >= self.max_rows or self._budget <= 0:
                break
            plan = self._plan_row(seq)
            if seq.done:
                continue
            if plan is None:
                seq.finish_reason = seq.finish_reason or "length"
                continue
            if len(plan.row.tokens) > self._budget:
                continue  # waits for a step with room
            if not self._reserve(seq, plan, plans):
                continue  # it was preempted itself
            plans[seq] = plan
            self._budget -= len(plan.row.tokens)
        reserved = sum(self._width(s) for s in self.running)
        while self.waiting and len(self.running) < self.max_rows and len(plans) < self.max_rows and self._budget > 0:
            seq = self.waiting[0]
            if reserved + self._width(seq) > self.max_step_tokens:
                break  # its rows could not always join the running ones' in one step
            self._attach_prefix(seq)
            plan = self._plan_row(seq)
            if seq.done:  # its planning failed: it ends, the others go on
                self.waiting.pop(0)
                self._end(seq)
                continue
            if plan is None or len(plan.row.tokens) > self._budget or not self._admit_pages(seq, plan, plans):
                self._detach(seq)
                break
            self.waiting.pop(0)
            self.running.append(seq)
            self._admitted_at[id(seq)] = next(self._admissions)
            if seq.admitted_step < 0:
                seq.admitted_step = self.steps
            plans[seq] = plan
            self._budget -= len(plan.row.tokens)
            reserved += self._width(seq)
        return plans

    def _plan_row(self, seq: Sequence) -> RowPlan | None:
        try:
            return seq.mode.plan(seq, self._budget)
        except Exception as exc:
            LOG.exception("planning a %s request's row failed", seq.config.mode)
            self._fail(seq, f"generation failed: {type(exc).__name__}: {exc}")
            return None

    def _rank(self, seq: Sequence) -> tuple[int, int]:
        """Who loses pages first (the maximum): lowest priority, then most recently admitted."""
        return seq.priority, self._admitted_at.get(id(seq), 0)

    def _order(self, seq: Sequence) -> tuple[bool, int, bool, int]:
        """Who gets the step's budget first: every decode-like row (the running requests' rows always fit one
        step together, see `_width`), then prefill chunks - higher priority, then requests still waiting for
        their first token (time to first token), then the earliest admitted."""
        return seq.prefilling, seq.priority, bool(seq.tokens), self._admitted_at.get(id(seq), 0)

    def _width(self, seq: Sequence) -> int:
        """The widest decode-like row `seq` runs. Admission keeps the running requests' widths within one
        step's budget, so every running request gets its row in every ordinary step, whatever waits."""
        return widest_row(seq.config, seq.block_length)

    def _pages_needed(self, seq: Sequence, plan: RowPlan) -> int:
        return max(0, self.pages.pages_for(seq.cached + plan.row.written) - len(seq.pages))

    def _reserve(self, seq: Sequence, plan: RowPlan, plans: dict[Sequence, RowPlan]) -> bool:
        """Pages for a running request's row, preempting others (or itself) when the pool is short."""
        need = self._pages_needed(seq, plan)
        while need > self.pages.available:
            victim = max(self.running, key=self._rank)  # lowest priority, most recently admitted
            self._preempt(victim, plans)
            if victim is seq:
                return False
        seq.pages += self.pages.take(need)
        return True

    def _admit_pages(self, seq: Sequence, plan: RowPlan, plans: dict[Sequence, RowPlan]) -> bool:
        """Pages for an admission's first row; a running request of lower priority may be preempted for it."""
        need = self._pages_needed(seq, plan)
        while need > self.pages.available:
            lower = [s for s in self.running if s.priority > seq.priority]
            if not lower:
                return False
            self._preempt(max(lower, key=self._rank), plans)
        try:
            seq.pages += self.pages.take(need)
        except OutOfPages:  # cannot happen after the loop above; kept as a guard
            return False
        return True

    # -- pages ------------------------------------------------------------------------------------------
    def _attach_prefix(self, seq: Sequence) -> None:
        """Take the longest cached prefix of what `seq` must prefill (its first prefill keeps at least its
        last token to compute: that one gives the first logits)."""
        if seq.pages:
            return
        target = seq.prefill_target
        limit = len(target) - 1 if seq.first_prefill else len(target)
        found: list[int] = []
        hashes: list[int] = []
        # a prompt whose logprobs are asked for computes every position (cached K/V give no logits)
        scoring = seq.first_prefill and seq.config.prompt_logprobs is not None
        if self.pages.prefix_caching and limit >= self.page_size and not scoring:
            hashes = page_hashes(target, self.page_size, self.pages.root, limit // self.page_size)
            found = self.pages.match(hashes)
        self.pages.stats.queried_tokens += max(limit, 0)
        self.pages.stats.hit_tokens += len(found) * self.page_size
        seq.pages, seq.hashes = found, hashes[: len(found)]
        seq.cached = seq.prefilled = len(found) * self.page_size
        if seq.cached_tokens < 0 and seq.first_prefill:
            seq.cached_tokens = seq.cached

    def _detach(self, seq: Sequence) -> None:
        """A waiting request that was not admitted after all gives back what `_attach_prefix` took."""
        self._release(seq)
        seq.cached = seq.prefilled = 0
        if seq.first_prefill and seq.admitted_step < 0:
            seq.cached_tokens = -1

    def _release(self, seq: Sequence) -> None:
        if seq.pages:
            self.pages.release(seq.pages)
        seq.pages, seq.hashes = [], []

    def _settle(self, seq: Sequence, length: int) -> None:
        """After a step: the sequence's new cache length; pages past it are freed, full ones published."""
        seq.cached = length
        keep = self.pages.pages_for(length)
        if len(seq.pages) > keep:
            self.pages.release(seq.pages[keep:])
            del seq.pages[keep:]
        full = length // self.page_size
        if full > len(seq.hashes) and self.pages.prefix_caching:
            known = seq.known  # the cache holds a prefix of prompt + tokens
            parent = seq.hashes[-1] if seq.hashes else self.pages.root
            for page in range(len(seq.hashes), full):
                tokens = known[page * self.page_size : (page + 1) * self.page_size]
                digest = chain_hash(parent, tokens)
                self.pages.publish(seq.pages[page], digest, parent, tokens)
                seq.hashes.append(digest)
                parent = digest

    def _preempt(self, seq: Sequence, plans: dict[Sequence, RowPlan]) -> None:
        """Give all of a running request's pages back; it waits again and is recomputed on readmission."""
        dropped = plans.pop(seq, None)
        if dropped is not None:
            self._budget += len(dropped.row.tokens)
        if not seq.prefilling and not seq.first_prefill:
            seq.prefill_target = seq.known[: seq.cached]
        self._release(seq)
        seq.cached = seq.prefilled = 0
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.running.remove(seq)
        self._admitted_at.pop(id(seq), None)
        self._enqueue(seq)

    def _retire(self) -> None:
        finished = [s for s in self.running if s.done] + [s for s in self.waiting if s.done]
        if not finished:
            return
        self.running = [s for s in self.running if not s.done]
        self.waiting = [s for s in self.waiting if not s.done]
        for seq in finished:
            self._end(seq)

    def _end(self, seq: Sequence) -> None:
        """A finished request (already out of both queues) gives its pages back and is reported."""
        self._release(seq)
        self._admitted_at.pop(id(seq), None)
        callback = self._on_finish.pop(id(seq), None)
        if callback is not None:
            callback(seq)


def request_constraint(engine: StepEngine, config: GenerationConfig) -> Any:
    """The grammar state of a structured-output request (runtime/structured.py, compiled once per grammar);
    RequestError for a bad spec or an engine without a tokenizer."""
    from ..structured import compile_constraint

    path = getattr(engine, "tokenizer_path", None)
    if path is None:
        raise RequestError("structured output needs the engine's tokenizer (tokenizer.json), and it has none")
    kind, spec = config.structured
    model = engine.config
    return compile_constraint(path, model.vocab_size, model.eos_token_id, kind, spec)


def run_scratch(engine: StepEngine, cache: KVCache, rows: list[ChunkRow], prefix: int) -> float:
    """Run `rows` (one per scratch sequence) after a causal prefix of `prefix` tokens each, on pages taken from
    the allocator for the purpose and given back at once, so no live request's cache is touched (auto
    block-length calibration). Returns the seconds the rows' forward took; a CapacityError if the pool cannot
    spare the pages now."""
    pages = cache.pages
    size = cache.page_size
    tables: list[list[int]] = []
    try:
        for row in rows:
            tables.append(pages.take(pages.pages_for(prefix + max(row.written, 1))))
    except OutOfPages:
        for table in tables:
            pages.release(table)
        raise CapacityError("no KV pages free for a scratch forward") from None
    try:
        if prefix:
            warm = [ChunkRow([1] * prefix, CAUSAL, write=True) for _ in rows]
            engine.step(cache, StepBatch.from_rows(warm, tables, [0] * len(rows), size))
        batch = StepBatch.from_rows(rows, tables, [prefix] * len(rows), size)
        synchronize(engine)
        start = time.perf_counter()
        engine.step(cache, batch)
        synchronize(engine)
        return time.perf_counter() - start
    finally:
        for table in tables:
            pages.release(table)


def synchronize(engine: StepEngine) -> None:
    if engine.device.type == "cuda":
        import torch

        torch.cuda.synchronize(engine.device)


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_scheduler(engine: StepEngine) -> Scheduler:
    """The engine's idle scheduler, made once and reused by later `generate()` calls."""
    current = _SHARED.get(engine)
    if current is None or current.has_work:
        current = Scheduler(engine)
        try:
            _SHARED[engine] = current
        except TypeError:  # an engine that cannot be weakly referenced: no sharing
            pass
    return current
