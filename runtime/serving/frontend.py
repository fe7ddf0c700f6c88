"""What the OpenAI server and the Python API share: text in, scheduler jobs out, text and results back.

`Frontend` owns an engine's tokenizer and chat template and the one scheduler loop its requests run on. It
turns checked request settings into `GenerationConfig`s (validated by the engine's own rules, so a request
beyond the engine's limits is refused with the reason), and submits each prompt as a `Job` whose sink is a
`TextSink`: the sink assembles text as tokens arrive (see openai_text.py), marks the job cancelled as soon as
a stop string completes (so the scheduler frees its slot at the next step), records metrics, and hands
events - ("text", piece), ("done", Completion), ("error", message) - to a callback the caller chooses (a
thread-safe hop into asyncio for the server, a queue for the Python API).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OverloadedError, RequestError
from ..modes.sequence import TokenLogprob, tokens_per_forward
from ..request import (
    GenerationConfig,
    Request,
    RequestDefaults,
    engine_generation_defaults,
    make_config,
    new_request,
    with_seed_offset,
)
from ..scheduler.loop import EngineLoop, Job
from ..scheduler.scheduler import request_constraint
from .chat_template import ChatTemplate, ChatTemplateError, chat_prompt_ids, end_think_token_id
from .openai.metrics import ServerMetrics
from .text import TextAssembler, load_tokenizer

LOG = logging.getLogger("trimode.openai")

Event = tuple[str, Any]
EventCallback = Callable[[Event], None]


class TextPiece(str):
    """The text of a ("text", piece) event, and `tokens`: how many tokens the choice had committed when it was
    sent (usage on every chunk: stream_options.continuous_usage_stats)."""

    tokens: int = 0

    def __new__(cls, text: str, tokens: int) -> TextPiece:
        piece = super().__new__(cls, text)
        piece.tokens = tokens
        return piece


@dataclass
class Completion:
    """One finished choice."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    forwards: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    engine_finish_reason: str  # "eos" | "length" | "cancelled"
    stop_string: str | None = None
    cached_tokens: int = 0   # prompt tokens read from the prefix cache
    block_length: int = 0    # the block length the request ran with ("auto" resolved)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids (when asked for)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, the first None
    prompt_token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return tokens_per_forward(len(self.token_ids), self.forwards)


@dataclass(frozen=True)
class ServingLimits:
    """What a deployment lets one request take (None: no limit; `trimode serve` sets defaults).

    max_row_tokens: the most tokens one row may carry (a quad row is L(L+1), an infill row its hole plus its
    suffix, a spec or diffusion row its block), so that no single request makes every step long.
    max_jobs_per_request: prompts x n of one request. max_queued_jobs: jobs waiting for admission in total.
    """

    max_row_tokens: int | None = None
    max_jobs_per_request: int | None = None
    max_queued_jobs: int | None = None


@dataclass(frozen=True)
class Settings:
    """A request's settings in the terms of the engine (what SamplingParams and the OpenAI bodies map to)."""

    max_tokens: int | None = None
    temperature: float | None = None  # None: the checkpoint's default (generation_config.json), else greedy
    top_p: float | None = None        # None: the checkpoint's default, else 1.0
    top_k: int | None = None          # None: the checkpoint's default, else 0 (off)
    seed: int = 0
    stop: tuple[str, ...] = ()
    mode: str | None = None
    block_length: int | str | None = None
    threshold: float | None = None
    max_thinking_tokens: int | None = None
    suffix: str | None = None
    use_lora: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # None: the checkpoint's default, else 1.0 (off)
    logit_bias: dict[int, float] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: tuple[int, ...] | None = None
    structured: tuple[str, str] | None = None  # (kind, spec), kind in runtime/request.py's STRUCTURED_KINDS
    logprobs: int | None = None         # None: none reported; k: each token's logprob and the top k
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and the top k (echo)
    extra: dict = field(default_factory=dict)


class TextSink:
    """The ResponseSink of one job: text assembly, stop strings, cancellation, metrics; never raises."""

    def __init__(self, assembler: TextAssembler, on_event: EventCallback, mode: str, prompt_ids: Sequence[int],
                 metrics: ServerMetrics | None) -> None:
        self.assembler = assembler
        self.on_event = on_event
        self.mode = mode
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.metrics = metrics
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._cancel = threading.Event()
        self._done = False
        self._error: str | None = None  # the output could not be turned into text: the request fails
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """The consumer is gone (client disconnected, iterator closed): free the slot at the next step."""
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        """finish() or fail() has been called."""
        return self._done

    def tokens(self, ids: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        try:
            with self._lock:
                if self._done or self.assembler.finished:
                    return
                now = time.monotonic()
                if self.metrics is not None:
                    if self.first_token_at is None:
                        self.metrics.first_token(self.mode, now - self.submitted)
                    gap = None if self.last_token_at is None else now - self.last_token_at
                    self.metrics.tokens(self.mode, len(ids), gap)
                if self.first_token_at is None:
                    self.first_token_at = now
                self.last_token_at = now
                pieces = []
                for token in ids:
                    pieces.append(self.assembler.add(int(token)))
                    if self.assembler.finished:
                        self._cancel.set()  # a stop string: the scheduler drops the job at its next step
                        break
                piece = TextPiece("".join(pieces), len(self.assembler.ids))
            if logprobs is not None:  # the tokens this call used (none after a stop string), before their text
                self.on_event(("logprobs", list(logprobs[: len(pieces)])))
            if piece:
                self.on_event(("text", piece))
        except Exception as exc:  # a sink must not raise into the scheduler; this request alone fails
            LOG.exception("streaming tokens to a client failed")
            self._error = f"decoding the output failed: {type(exc).__name__}: {exc}"
            self._cancel.set()

    def finish(self, result: Any) -> None:
        if self._error is not None:
            self.fail(self._error)
            return
        try:
            with self._lock:
                if self._done:
                    return
                self._done = True
                stopped = self.assembler.stopped_by is not None
                rest = self.assembler.finish(None if stopped else list(result.tokens))
                stopped = self.assembler.stopped_by is not None
                if stopped:
                    token_ids = self.assembler.ids[:self.assembler.tokens_used]
                    reason = "stop"
                else:
                    token_ids = list(result.tokens)
                    reason = {"eos": "stop", "length": "length"}.get(result.finish_reason, result.finish_reason)
                logprobs = None if result.logprobs is None else list(result.logprobs[: len(token_ids)])
                completion = Completion(self.assembler.final_text, token_ids, self.prompt_tokens,
                                        int(result.forwards), reason, result.finish_reason,
                                        self.assembler.stopped_by, result.cached_tokens, result.block_length,
                                        logprobs, result.prompt_logprobs, list(self.prompt_ids))
                if self.metrics is not None:
                    self.metrics.done(self.mode, self.first_token_at is not None, reason, completion.forwards,
                                      len(token_ids), time.monotonic() - self.submitted)
            if rest:
                self.on_event(("text", TextPiece(rest, len(token_ids))))
            self.on_event(("done", completion))
        except Exception:
            LOG.exception("finishing a response failed")

    def fail(self, message: str) -> None:
        try:
            with self._lock:
                if self._done:
                    return
                self._done = True
                if self.metrics is not None:
                    self.metrics.done(self.mode, self.first_token_at is not None, "error", 0, 0,
                                      time.monotonic() - self.submitted)
            self.on_event(("error", message))
        except Exception:
            LOG.exception("reporting a failure failed")


@dataclass
class Prepared:
    """One choice, validated and ready to submit."""

    request: Request
    stop: tuple[str, ...]

    @property
    def prompt(self) -> list[int]:
        return list(self.request.prompt)

    @property
    def config(self) -> GenerationConfig:
        return self.request.config


class Frontend:
    """An engine's tokenizer, chat template and scheduler loop; see the module docstring."""

    def __init__(self, engine: Any, *, default_mode: str = "spec", default_max_tokens: int = 64,
                 use_lora: bool = True, metrics: ServerMetrics | None = None, max_step_tokens: int | None = None,
                 max_batch_size: int | None = None, policy: str = "decode-first", limits: ServingLimits | None = None,
                 generation_config: str = "auto") -> None:
        """`generation_config`: "auto" takes the sampling defaults of the engine's generation_config.json
        (temperature, top_p, top_k, repetition_penalty) for fields a request leaves out; "none" ignores it."""
        self.engine = engine
        self.limits = limits or ServingLimits()
        tokenizer_path = getattr(engine, "tokenizer_path", None)
        self.defaults = RequestDefaults(default_mode, default_max_tokens, use_lora,
                                        engine_generation_defaults(engine, generation_config))
        self.metrics = metrics
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.template: ChatTemplate | None = None
        if tokenizer_path is not None:
            self.template = ChatTemplate.from_dir(Path(tokenizer_path).parent)
        self.end_think_id = end_think_token_id(self.tokenizer)
        self.loop = EngineLoop(engine, max_batch_size=max_batch_size or None, max_step_tokens=max_step_tokens or None,
                               on_step=metrics.step if metrics is not None else None, policy=policy,
                               max_row_tokens=self.limits.max_row_tokens, max_queued_jobs=self.limits.max_queued_jobs)
        self._started = False
        self._lock = threading.Lock()
        self._live: set[TextSink] = set()  # submitted, not finished (for cancel_all at shutdown)

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if not self._started:
                self.loop.start()
                self._started = True

    def cancel_all(self) -> int:
        """Cancel every request still running (each ends with finish_reason "cancelled"); how many there were."""
        with self._lock:
            live = [sink for sink in self._live if not sink.done]
        for sink in live:
            sink.cancel()
        return len(live)

    def stop(self) -> None:
        with self._lock:
            if self._started:
                self.loop.stop()
                self._started = False

    # -- text -------------------------------------------------------------------------------------------------

    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise RequestError(f"{what} needs a tokenizer, and this engine has no tokenizer.json (send token ids)")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._need_tokenizer("a text prompt").encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def encode_chat(self, messages: list[dict], enable_thinking: bool | None = None,
                    tools: list[dict] | None = None) -> list[int]:
        """A conversation's prompt tokens through the model's chat template (`trimode generate --chat` too);
        `tools`: OpenAI tool objects for the template (see chat_template.py)."""
        tokenizer = self._need_tokenizer("chat")
        if self.template is None:
            raise RequestError("this model has no chat template (no chat_template in tokenizer_config.json); "
                               "use /v1/completions")
        try:
            return chat_prompt_ids(self.template, tokenizer, messages, enable_thinking, tools=tools)
        except ChatTemplateError as exc:
            raise RequestError(f"chat template: {exc}") from None

    # -- requests ---------------------------------------------------------------------------------------------

    def config(self, settings: Settings, choice: int = 0) -> GenerationConfig:
        """The engine's config for one choice (the one mapping of runtime/request.py; text fields encoded)."""
        suffix = None
        if settings.suffix is not None:
            suffix = tuple(self.encode(settings.suffix, add_special_tokens=False))
        end_think = None
        if settings.max_thinking_tokens is not None:
            if self.end_think_id is None:
                raise RequestError("max_thinking_tokens needs a tokenizer with a </think> token, and this model's "
                                   "tokenizer has none")
            end_think = self.end_think_id
        if suffix is not None and settings.mode not in (None, "infill"):
            raise RequestError(f"a suffix needs mode 'infill', got mode '{settings.mode}'")
        try:
            config = make_config(self.engine.config, self.defaults, mode=settings.mode,
                                 max_new_tokens=settings.max_tokens, block_length=settings.block_length,
                                 threshold=settings.threshold, temperature=settings.temperature,
                                 top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed,
                                 use_lora=settings.use_lora, max_thinking_tokens=settings.max_thinking_tokens,
                                 end_think_token_id=end_think, suffix=suffix,
                                 presence_penalty=settings.presence_penalty,
                                 frequency_penalty=settings.frequency_penalty,
                                 repetition_penalty=settings.repetition_penalty, logit_bias=settings.logit_bias,
                                 min_tokens=settings.min_tokens, ignore_eos=settings.ignore_eos,
                                 stop_token_ids=settings.stop_token_ids, structured=settings.structured,
                                 logprobs=settings.logprobs, prompt_logprobs=settings.prompt_logprobs,
                                 **settings.extra)
        except TypeError as exc:
            raise RequestError(f"invalid settings: {exc}") from None
        return with_seed_offset(config, choice)

    def prepare(self, prompts: Sequence[list[int]], settings: Settings, n: int = 1) -> list[Prepared]:
        """Every choice of a request (prompt-major, then n), all validated before anything is submitted."""
        jobs = len(prompts) * n
        if self.limits.max_jobs_per_request is not None and jobs > self.limits.max_jobs_per_request:
            raise RequestError(f"this request asks for {jobs} generations ({len(prompts)} prompts x n={n}); at "
                               f"most {self.limits.max_jobs_per_request} per request on this server "
                               "(--max-jobs-per-request)")
        what = "prompt" if len(prompts) == 1 else "prompt {}"
        prepared = [Prepared(new_request(self.engine, prompt, self.config(settings, choice), what.format(number)),
                             settings.stop)
                    for number, prompt in enumerate(prompts) for choice in range(n)]
        if prepared and prepared[0].config.structured is not None:
            request_constraint(self.engine, prepared[0].config)  # a bad grammar is refused now (compiled once)
        return prepared

    def submit(self, item: Prepared, on_event: EventCallback) -> TextSink:
        """Submit one choice; a full queue is reported through its events (see `submit_all`)."""
        return self.submit_all([item], [on_event], refuse=False)[0]

    def submit_all(self, items: Sequence[Prepared], on_events: Sequence[EventCallback],
                   refuse: bool = True) -> list[TextSink]:
        """Submit a request's choices together: all are queued, or (refuse=True) none and OverloadedError is
        raised when the queue cannot take them all (--max-queued-jobs)."""
        self.start()
        sinks = [self._sink(item, on_event) for item, on_event in zip(items, on_events, strict=True)]
        jobs = [Job(item.request, sink) for item, sink in zip(items, sinks, strict=True)]
        if refuse:
            try:
                self.loop.submit_all(jobs)
            except OverloadedError:
                with self._lock:
                    self._live.difference_update(sinks)
                raise
        else:
            for job in jobs:
                self.loop.submit(job)
        if self.metrics is not None:
            for item in items:
                self.metrics.submitted(item.config.mode, len(item.prompt))
        return sinks

    def _sink(self, item: Prepared, on_event: EventCallback) -> TextSink:
        def forget(event: Event) -> None:
            if event[0] != "text":
                with self._lock:
                    self._live.discard(sink)
            on_event(event)

        sink = TextSink(TextAssembler(self.decode, item.stop), forget, item.config.mode, item.request.prompt,
                        self.metrics)
        with self._lock:
            self._live.add(sink)
        return sink
