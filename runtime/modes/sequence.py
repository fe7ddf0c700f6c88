"""One request's state while the scheduler runs it: its tokens, counters, cache pages and mode state machine.

`emit` is the only way tokens are committed: it cuts after EOS and at max_new_tokens, forces the
end-of-thinking token once the thinking budget is spent, and reports new tokens to the request's callback.
It returns how many of the offered tokens it kept, so a speculative mode can roll its cache back to match.
Forwards are counted per sequence (only passes the sequence took part in), the prompt prefill as one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..request import GenerationConfig
    from .base import ModeState

@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the raw model logits at the position that produced it, and the `top`
    most likely (token, logprob) pairs there, most likely first (as many as the request asked for)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


TokenCallback = Callable[[int, list[int]], None]  # (caller's index, tokens just committed); see Sequence.logprobs
CancelCheck = Callable[[int], bool]


def tokens_per_forward(generated: int, forwards: int) -> float:
    """TPF: generated tokens / forwards after the prompt prefill (the prefill is one forward, however many
    chunks it took). With no forward after the prefill, the generated count itself."""
    after_prefill = forwards - 1
    return generated / after_prefill if after_prefill > 0 else float(generated)


@dataclass
class SequenceResult:
    """What one prompt produced."""

    tokens: list[int]
    forwards: int
    finish_reason: str  # "eos" | "length" | "cancelled" | "stop" | "error"
    prompt_length: int = 0
    steps_waited: int = 0      # scheduler steps between submission and admission
    first_token_step: int = -1  # scheduler steps between submission and the first committed token
    cached_tokens: int = 0     # prompt tokens found in the prefix cache at admission (not recomputed)
    preemptions: int = 0       # times the request gave its pages back and was recomputed
    block_length: int = 0      # the block length it ran with (`auto` resolved)
    logprobs: list[TokenLogprob] | None = None  # one per token (when the request asked for them)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, the first None

    @property
    def tokens_per_forward(self) -> float:
        return tokens_per_forward(len(self.tokens), self.forwards)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "forwards": self.forwards,
                "tokens_per_forward": round(self.tokens_per_forward, 4), "finish_reason": self.finish_reason,
                "block_length": self.block_length, "cached_tokens": self.cached_tokens}


@dataclass(eq=False)  # identity: a sequence is a key of the step's plans
class Sequence:
    """A request in the scheduler. `index` is the caller's id for callbacks.

    The scheduler owns the cache fields: `pages` (the sequence's page table), `cached` (how many positions of
    prompt + tokens are in the cache; always a prefix of them) and `hashes` (the chain hashes of its leading
    full pages that are shared or published). `prefill_target` is what must be cached before the mode's own
    rows run: the prompt, or after a preemption the tokens that were cached.
    """

    index: int
    prompt: list[int]
    config: GenerationConfig
    eos: int
    generator: torch.Generator
    mode: ModeState
    on_tokens: TokenCallback | None = None
    is_cancelled: CancelCheck | None = None
    tokens: list[int] = field(default_factory=list)
    forwards: int = 0
    pages: list[int] = field(default_factory=list)
    cached: int = 0
    hashes: list[int] = field(default_factory=list)
    prefill_target: list[int] = field(default_factory=list)
    prefilled: int = 0  # tokens of prefill_target in the cache
    first_prefill: bool = True  # the prompt's prefill has not given its logits yet
    finish_reason: str | None = None
    error: str | None = None
    arrival: int = 0
    submitted_step: int = 0
    admitted_step: int = -1
    first_token_step: int = -1
    cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission (-1: not admitted)
    preemptions: int = 0
    block_length: int = 0  # the block length the mode runs with ("auto" resolved)
    constraint: Any = None  # structured output's grammar state (runtime/structured.py), following `tokens`
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them
    prompt_scores: dict[int, TokenLogprob] = field(default_factory=dict)  # prompt index -> its logprob

    def __post_init__(self) -> None:
        if not self.prefill_target:
            self.prefill_target = list(self.prompt)
        if self.config.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prefill_target)

    @property
    def priority(self) -> int:
        return self.config.priority

    @property
    def known(self) -> list[int]:
        """Prompt and generated tokens: what the cache holds a prefix of."""
        return self.prompt + self.tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    def _forced(self) -> int | None:
        """The end-of-thinking token when the budget is spent at this position and it has not appeared."""
        budget, end = self.config.max_thinking_tokens, self.config.end_think_token_id
        if budget is None or end is None or len(self.tokens) != budget or end in self.tokens:
            return None
        return end

    def emit(self, new: list[int], truncate_on_force: bool = True,
             logprobs: list[TokenLogprob | None] | None = None) -> int:
        """Commit tokens in order; returns how many were kept.

        Stops after EOS (unless ignore_eos), after a stop token id, or at max_new_tokens (a request of 0 new
        tokens - scoring its prompt - keeps none). When the thinking budget runs out, the end-of-thinking
        token replaces the token at that position; with `truncate_on_force` the rest of `new` is dropped (it
        was conditioned on the replaced token), otherwise it is kept (a diffusion block is committed whole).
        `logprobs` (one per offered token) are recorded when the request asked for them.
        """
        if self.max_new_tokens == 0:
            self.finish_reason = self.finish_reason or "length"
            return 0
        kept: list[int] = []
        config = self.config
        for offered, token in enumerate(new):
            if self.done:
                break
            forced = self._forced()
            if forced is not None:
                token = forced
            kept.append(token)
            self.tokens.append(token)
            if self.logprobs is not None:
                entry = logprobs[offered] if logprobs is not None else None
                if entry is None or entry.token != token:  # forced by a rule: probability 1
                    entry = TokenLogprob(token, 0.0, entry.top if entry is not None else ())
                self.logprobs.append(entry)
            if token == self.eos and not config.ignore_eos:
                self.finish_reason = "eos"
            elif token in config.stop_token_ids:
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
            if forced is not None and forced != new[offered] and truncate_on_force:
                break
        if kept and self.constraint is not None:
            self.constraint.commit(kept)
        if kept and self.on_tokens is not None:
            self.on_tokens(self.index, kept)
        return len(kept)

    def cancel_requested(self) -> bool:
        return self.is_cancelled is not None and bool(self.is_cancelled(self.index))

    def result(self) -> SequenceResult:
        waited = max(self.admitted_step - self.submitted_step, 0)
        first = self.first_token_step - self.submitted_step if self.first_token_step >= 0 else -1
        prompt_logprobs = None
        if self.config.prompt_logprobs is not None:
            prompt_logprobs = [None] + [self.prompt_scores.get(i) for i in range(1, len(self.prompt))]
        return SequenceResult(self.tokens, self.forwards, self.finish_reason or "length", len(self.prompt),
                              waited, first, max(self.cached_tokens, 0), self.preemptions, self.block_length,
                              self.logprobs, prompt_logprobs)
