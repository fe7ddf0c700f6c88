"""The OpenAI-compatible HTTP server: FastAPI on uvicorn, every request on the one scheduler loop.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events ending in `data: [DONE]`), vLLM's `POST /tokenize` and `POST /detokenize`, `GET /version`,
`GET /health`, `GET /metrics` (Prometheus). Bodies are read and checked by openai/protocol.py (unknown fields,
wrong types and out-of-range values are a 400 with OpenAI's error object) and then by the engine's own rules
(a request beyond its limits is a 400 with the reason, in the API's field names); text that certainly cannot
fit is refused before it is tokenized, and tokenizing and templating run off the event loop. Logprobs are
written by openai/logprobs.py. Every exception nobody expected is a JSON 500, counted in /metrics. A client
that disconnects - mid-stream or while waiting for a whole answer (the handler waits on the connection's
receive(), which returns at the disconnect) - has its jobs cancelled at once, so the scheduler frees their
slots at the next step. SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight requests
finish for up to `shutdown_timeout_s`, cancels what is left, stops the loop and returns (the CLI exits 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ...errors import OverloadedError, RequestError, ShuttingDownError
from ...request import check_token_ids
from ..chat_template import ChatTemplateError
from ..frontend import Completion, Frontend, Prepared, Settings, TextSink
from ..http_limits import BodyError, HttpLimits, guarded_protocol, read_body
from .logprobs import CompletionLogprobs, TokenStrings, chat_content, join_completion
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Sampling,
    TokenizeRequest,
    api_error,
    check_chat,
    check_completion,
    parse_body,
    prompt_list,
)
from .tools import ToolPlan, ToolStream, chat_message, format_for_template, plan_tools, template_messages
from .tools import finish_reason as tool_finish_reason

LOG = logging.getLogger("trimode.openai")


def _settings(sampling: Sampling, suffix: str | None = None) -> Settings:
    """The one mapping of a checked request onto the Frontend's Settings (None: the engine's default)."""
    return Settings(max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                    top_k=sampling.top_k, seed=sampling.seed, stop=sampling.stop, mode=sampling.mode,
                    block_length=sampling.block_length, threshold=sampling.threshold,
                    max_thinking_tokens=sampling.max_thinking_tokens, suffix=suffix,
                    presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
                    repetition_penalty=sampling.repetition_penalty, logit_bias=sampling.logit_bias,
                    min_tokens=sampling.min_tokens, ignore_eos=sampling.ignore_eos,
                    stop_token_ids=sampling.stop_token_ids, structured=sampling.structured,
                    logprobs=sampling.logprobs, prompt_logprobs=sampling.prompt_logprobs,
                    extra={} if sampling.priority is None else {"priority": sampling.priority})


def _chat_fields(body: ChatRequest) -> dict[str, str]:
    """Engine names that a chat request spells its own way (for api_error)."""
    return {"max_new_tokens": "max_completion_tokens"} if body.max_completion_tokens is not None else {}


async def wait_disconnect(receive: Any) -> None:
    """Returns when the client of an ASGI request whose body has been read disconnects (uvicorn's receive()
    blocks until then, or until the response is complete)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens read from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class Choices:
    """The jobs of one HTTP request and their events, delivered into the event loop."""

    def __init__(self, frontend: Frontend, prepared: list[Prepared]) -> None:
        """Submits every choice, or none (OverloadedError when the queue cannot take them all)."""
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sinks: list[TextSink] = frontend.submit_all(prepared, [self._callback(i) for i in range(len(prepared))])

    def _callback(self, index: int):
        def deliver(event: tuple[str, Any]) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, *event))
            except RuntimeError:  # the event loop is closed: the server is gone, nobody listens
                pass
        return deliver

    def cancel(self) -> None:
        for sink in self.sinks:
            sink.cancel()


class OpenAIServer:
    """Builds the FastAPI app over a Frontend."""

    def __init__(self, frontend: Frontend, model_name: str, shutdown_timeout_s: float = 10.0,
                 http_limits: HttpLimits | None = None) -> None:
        self.frontend = frontend
        self.http_limits = http_limits or HttpLimits()
        self.model_name = model_name
        self.metrics = frontend.metrics or ServerMetrics()
        frontend.metrics = self.metrics
        if hasattr(frontend.loop, "queue_length"):
            self.metrics.bind_queue(frontend.loop.queue_length)
            self.metrics.bind_cache(frontend.loop.scheduler)
        self.shutdown_timeout_s = shutdown_timeout_s
        self.created = int(time.time())
        self.strings = TokenStrings(frontend.tokenizer)
        self._chars_per_token = _longest_token(frontend.tokenizer)
        self.app = self._build()

    # -- app --------------------------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.frontend.start()
            try:
                yield
            finally:
                await asyncio.to_thread(self.frontend.stop)

        app = FastAPI(title="trimode OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None,
                      openapi_url=None)

        def guarded(endpoint: str):
            """Every exception a handler did not expect is OpenAI's error object with a 500 (and counted)."""
            def wrap(handler):
                @functools.wraps(handler)
                async def run(*args: Any, **kw: Any) -> Any:
                    try:
                        return await handler(*args, **kw)
                    except APIError as exc:
                        return self._error(endpoint, exc)
                    except Exception as exc:  # noqa: BLE001 - the point: nothing escapes as a plain-text 500
                        return self._internal_error(endpoint, exc)
                return run
            return wrap

        @app.exception_handler(Exception)
        async def unexpected(request: Request, exc: Exception) -> JSONResponse:
            return self._internal_error(request.url.path, exc)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return self._error(request.url.path, APIError(str(exc.detail), exc.status_code, kind=kind))

        @app.exception_handler(RequestValidationError)
        async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
            return self._error(request.url.path, APIError(f"invalid request: {exc.errors()[0].get('msg')}"))

        @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers and benchmarks probe with HEAD
        async def health() -> dict:
            return {"status": "ok"}

        @app.api_route("/metrics", methods=["GET", "HEAD"])
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=self.metrics.content_type)

        @app.get("/v1/models")
        async def models() -> dict:
            self.metrics.http("/v1/models", 200)
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str) -> Any:
            if name != self.model_name:
                return self._error("/v1/models", self._no_model(name))
            return self._model_card()

        @app.get("/version")
        async def version() -> dict:
            from .... import __version__

            return {"version": __version__}

        @app.get("/tokenizer_info")
        async def tokenizer_info() -> Any:
            """vLLM's: what a client needs to tokenize as the server does (lm-evaluation-harness's remote
            tokenizer reads it, then tokenizes through /tokenize and /detokenize)."""
            self.metrics.http("/tokenizer_info", 200)
            return self._tokenizer_info()

        @app.post("/tokenize")
        @guarded("/tokenize")
        async def tokenize(request: Request) -> Any:
            body = await self._body(request, TokenizeRequest)
            if body.model is not None:
                self._check_model(body.model)
            # beyond the model's length nothing can use the tokens (and a huge text would cost every request)
            self._check_text_size(len(body.prompt) if body.prompt is not None
                                  else sum(len(m.text()) for m in body.messages or []), None, "prompt")
            try:
                tokens = await asyncio.to_thread(self._tokenize, body)
            except RequestError as exc:
                raise api_error(str(exc)) from None
            out = {"count": len(tokens), "max_model_len": int(self.frontend.engine.limits.max_seq_len),
                   "tokens": tokens, "token_strs": None}
            if body.return_token_strs:
                out["token_strs"] = [self.frontend.tokenizer.id_to_token(t) for t in tokens]
            self.metrics.http("/tokenize", 200)
            return out

        @app.post("/detokenize")
        @guarded("/detokenize")
        async def detokenize(request: Request) -> Any:
            body = await self._body(request, DetokenizeRequest)
            if body.model is not None:
                self._check_model(body.model)
            try:
                check_token_ids(body.tokens, self.frontend.engine.config.vocab_size, "tokens")
                self.frontend._need_tokenizer("detokenize")
            except RequestError as exc:
                raise api_error(str(exc)) from None
            text = await asyncio.to_thread(self.frontend.decode, list(body.tokens))
            self.metrics.http("/detokenize", 200)
            return {"prompt": text}

        @app.post("/v1/completions")
        @guarded("/v1/completions")
        async def completions(request: Request) -> Any:
            endpoint = "/v1/completions"
            try:
                body = await self._body(request, CompletionRequest)
                sampling = check_completion(body)
                self._check_model(body.model)
                for prompt in prompt_list(body.prompt):  # what certainly cannot fit is refused before any work
                    if isinstance(prompt, str):
                        self._check_text_size(len(prompt), sampling, "prompt")
                    else:
                        self._check_token_count(len(prompt), sampling, "prompt")
                prepared, prompt_texts = await asyncio.to_thread(self._prepare_completion, body, sampling)
            except APIError as exc:
                return self._error(endpoint, exc)
            except RequestError as exc:
                return self._error(endpoint, api_error(str(exc)))
            return await self._respond(request, endpoint, prepared, sampling.n, body.stream,
                                       body.stream_options, chat=False, echo=prompt_texts if body.echo else None)

        @app.post("/v1/chat/completions")
        @guarded("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            endpoint = "/v1/chat/completions"
            try:
                body = await self._body(request, ChatRequest)
                sampling = check_chat(body)
                self._check_model(body.model)
                self._check_text_size(sum(len(m.text()) for m in body.messages), sampling, "messages")
                prepared, tools = await asyncio.to_thread(self._prepare_chat, body, sampling)
            except APIError as exc:
                return self._error(endpoint, exc)
            except RequestError as exc:
                return self._error(endpoint, api_error(str(exc), fields=_chat_fields(body)))
            return await self._respond(request, endpoint, prepared, sampling.n, body.stream,
                                       body.stream_options, chat=True, tools=tools)

        return app

    async def _body(self, request: Request, model_class: type) -> Any:
        """Read (bounded) and parse (off the event loop) a request body; APIError names what is wrong."""
        try:
            raw = await read_body(request.receive, request.headers, self.http_limits.max_body_bytes)
        except BodyError as exc:
            raise APIError(exc.message, exc.status) from None
        return await asyncio.to_thread(parse_body, raw, model_class)

    def _error(self, endpoint: str, exc: APIError) -> JSONResponse:
        self.metrics.http(endpoint, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    def _tokenizer_info(self) -> dict:
        frontend, model = self.frontend, self.frontend.engine.config
        tokenizer = frontend.tokenizer

        def text(token_id: int | None) -> str | None:
            return tokenizer.id_to_token(token_id) if tokenizer is not None and token_id is not None else None

        template = frontend.template
        specials = template.special_tokens if template is not None else {}
        return {"tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": specials.get("eos_token") or text(model.eos_token_id),
                "bos_token": specials.get("bos_token") or text(getattr(model, "bos_token_id", None)),
                "pad_token": specials.get("pad_token"),
                "chat_template": template.source if template is not None else None,
                "model_max_length": int(frontend.engine.limits.max_seq_len)}

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "trimode",
                "max_model_len": int(self.frontend.engine.limits.max_seq_len)}

    def _no_model(self, name: str) -> APIError:
        return APIError(f"The model '{name}' does not exist (this server serves '{self.model_name}')", 404,
                        param="model", kind="not_found_error", code="model_not_found")

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise self._no_model(name)

    def _internal_error(self, endpoint: str, exc: BaseException) -> JSONResponse:
        """An exception nobody expected: logged, counted (trimode_server_errors_total), a JSON 500."""
        LOG.error("%s failed", endpoint, exc_info=(type(exc), exc, exc.__traceback__))
        self.metrics.server_error(endpoint, type(exc).__name__)
        self.metrics.http(endpoint, 500)
        error = APIError(f"internal server error: {type(exc).__name__}: {exc}", 500, kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    def _check_text_size(self, chars: int, sampling: Sampling | None, param: str) -> None:
        """Refuse, before tokenizing it, text that cannot fit: every token of this tokenizer covers at most
        `_chars_per_token` characters, so `chars` characters are at least chars / that many tokens."""
        if self._chars_per_token is None:
            return
        least = -(-chars // self._chars_per_token)
        room = int(self.frontend.engine.limits.max_seq_len) - ((sampling.max_tokens or 0) if sampling else 0)
        if least > room:
            raise APIError(f"{param} is too long: {chars} characters are at least {least} tokens, and this model "
                           f"serves {self.frontend.engine.limits.max_seq_len} positions in all", param=param)

    def _check_token_count(self, count: int, sampling: Sampling, param: str) -> None:
        room = int(self.frontend.engine.limits.max_seq_len) - (sampling.max_tokens or 0)
        if count > room:
            raise APIError(f"{param} is too long: {count} tokens, and this model serves "
                           f"{self.frontend.engine.limits.max_seq_len} positions in all", param=param)

    def _tokenize(self, body: Any) -> list[int]:
        """/tokenize: a prompt (special tokens added unless add_special_tokens is false) or a conversation
        through the chat template (nothing added unless add_special_tokens is true)."""
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give either prompt or messages", param="prompt")
        if body.prompt is not None:
            return self.frontend.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        tokenizer = self.frontend._need_tokenizer("chat")
        if self.frontend.template is None:
            raise RequestError("this model has no chat template (no chat_template in tokenizer_config.json)")
        try:
            text = self.frontend.template.render(messages, add_generation_prompt=body.add_generation_prompt,
                                                 enable_thinking=body.enable_thinking)
        except ChatTemplateError as exc:
            raise RequestError(f"chat template: {exc}") from None
        return list(tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens)).ids)

    # -- preparing --------------------------------------------------------------------------------------------

    def _prepare_completion(self, body: CompletionRequest, sampling: Sampling) -> tuple[list[Prepared], list[str]]:
        prompts, texts = [], []
        for prompt in prompt_list(body.prompt):
            if isinstance(prompt, str):
                if not prompt:
                    raise APIError("prompt must not be empty", param="prompt")
                prompts.append(self.frontend.encode(prompt))
                texts.append(prompt)
            else:
                check_token_ids(prompt, self.frontend.engine.config.vocab_size)
                prompts.append(list(prompt))
                texts.append(self.frontend.decode(list(prompt)))
        return self.frontend.prepare(prompts, _settings(sampling, body.suffix), sampling.n), texts

    def _prepare_chat(self, body: ChatRequest, sampling: Sampling) -> tuple[list[Prepared], ToolPlan | None]:
        template = self.frontend.template
        tools = plan_tools(body, format_for_template(template.source if template is not None else None),
                           sampling.mode)
        settings = _settings(sampling)
        if tools is not None and tools.structured is not None:  # tool_choice required / named
            if settings.structured is not None:
                raise APIError(f"tool_choice '{tools.named or tools.choice}' is enforced by structured output "
                               "and cannot be combined with response_format or guided decoding",
                               param="tool_choice")
            settings = dataclasses.replace(settings, structured=tools.structured)
        prompt = self.frontend.encode_chat(template_messages(body), body.enable_thinking,
                                           tools=tools.tools if tools is not None else None)
        return self.frontend.prepare([prompt], settings, sampling.n), tools

    # -- responding -------------------------------------------------------------------------------------------

    async def _respond(self, request: Any, endpoint: str, prepared: list[Prepared], n: int, stream: bool,
                       stream_options: Any, chat: bool, echo: list[str] | None = None,
                       tools: ToolPlan | None = None) -> Any:
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        try:
            choices = Choices(self.frontend, prepared)
        except RequestError as exc:
            return self._error(endpoint, api_error(str(exc)))
        except OverloadedError as exc:
            status = 503 if isinstance(exc, ShuttingDownError) else 429
            self.metrics.http(endpoint, status)
            return JSONResponse(APIError(str(exc), status, kind="server_error", code="overloaded").body(),
                                status_code=status, headers={"Retry-After": "1"})
        prompt_tokens = sum(len(prepared[i].prompt) for i in range(0, len(prepared), n))  # each prompt once
        top = prepared[0].config.logprobs  # None: no logprobs; k: the top k with each token
        if stream:
            include_usage = bool(stream_options is not None and stream_options.include_usage)
            continuous = include_usage and bool(stream_options.continuous_usage_stats)  # vLLM: needs include_usage
            self.metrics.http(endpoint, 200)
            return StreamingResponse(self._stream(choices, ident, created, chat, include_usage, prompt_tokens, n,
                                                  tools=tools, endpoint=endpoint, prepared=prepared, top=top,
                                                  continuous=continuous),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results: dict[int, Completion] = {}
        errors: list[str] = []
        # the body has been read, so receive() now returns only when the client disconnects: cancel at once
        watch = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            while len(results) + len(errors) < len(prepared):
                get = asyncio.ensure_future(choices.queue.get())
                await asyncio.wait((get, watch), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    choices.cancel()
                    self.metrics.http(endpoint, 499)
                    return JSONResponse({}, status_code=499)
                index, kind, value = get.result()
                if kind == "done":
                    results[index] = value
                elif kind == "error":
                    errors.append(value)
        except BaseException:  # cancelled (the server stops) or failed: nothing more is wanted from these jobs
            choices.cancel()
            raise
        finally:
            watch.cancel()
        if errors:
            choices.cancel()
            status = 503 if "shutting down" in errors[0] else 500
            self.metrics.http(endpoint, status)
            return JSONResponse(APIError(errors[0], status, kind="server_error").body(), status_code=status)
        completion_tokens = sum(len(r.token_ids) for r in results.values())
        cached_tokens = sum(results[i].cached_tokens for i in range(0, len(prepared), n))  # each prompt once
        out = []
        for index in range(len(prepared)):
            result = results[index]
            if chat:
                message, reason = {"role": "assistant", "content": result.text}, result.finish_reason
                if tools is not None:  # tool calls parsed from the text (openai/tools.py)
                    message, called = chat_message(tools, result.text)
                    reason = tool_finish_reason(called, reason)
                out.append({"index": index, "message": message, "logprobs": self._chat_logprobs(result.logprobs, top),
                            "finish_reason": reason})
            else:
                text = (echo[index // n] + result.text) if echo is not None else result.text
                logprobs = self._completion_logprobs(result, prepared[index], top, echo is not None)
                out.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": result.finish_reason})
        self.metrics.http(endpoint, 200)
        body = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.model_name, "choices": out,
                "usage": _usage(prompt_tokens, completion_tokens, cached_tokens),
                "trimode": [{"forwards": r.forwards, "tokens_per_forward": round(r.tokens_per_forward, 4),
                             "mode": prepared[i].config.mode, "block_length": r.block_length}
                            for i, r in sorted(results.items())]}
        return JSONResponse(body)

    def _chat_logprobs(self, entries: list | None, top: int | None) -> dict | None:
        if top is None:
            return None
        return {"content": chat_content(self.strings, entries or [], top)}

    def _completion_logprobs(self, result: Completion, item: Prepared, top: int | None, echo: bool) -> dict | None:
        """A whole choice's completions logprobs: with echo the prompt's tokens first (the first one null)."""
        if top is None:
            return None
        builder = CompletionLogprobs(self.strings, top)
        parts = []
        if echo:
            prompt = item.prompt
            entries = result.prompt_logprobs if result.prompt_logprobs is not None else [None] * len(prompt)
            parts.append(builder.build(entries, prompt))
        parts.append(builder.build(result.logprobs or []))
        return join_completion(parts)

    async def _stream(self, choices: Choices, ident: str, created: int, chat: bool, include_usage: bool,
                      prompt_tokens: int, n: int, tools: ToolPlan | None = None, endpoint: str = "",
                      prepared: list[Prepared] | None = None, top: int | None = None,
                      continuous: bool = False) -> AsyncIterator[bytes]:
        """The SSE chunks of a streamed request. Logprobs: the ("logprobs", ...) event of some tokens comes
        before their text, so each chunk carries the entries that arrived before it (what is left goes on the
        choice's last chunk); joined, they are the non-streamed logprobs. `continuous`: vLLM's
        continuous_usage_stats, each chunk's usage is its choice's prompt and its tokens so far."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        total = len(choices.sinks)
        finished = 0
        pending: dict[int, list] = {i: [] for i in range(total)}
        reported = dict.fromkeys(range(total), 0)  # logprob entries sent per choice
        builders = {i: CompletionLogprobs(self.strings, top) for i in range(total)} if top is not None else {}
        tokens_so_far = dict.fromkeys(range(total), 0)
        own_prompt = [len(item.prompt) for item in prepared] if prepared is not None else [0] * total

        def take(index: int, done: Completion | None = None) -> dict | None:
            """The logprobs for the next chunk of choice `index`: what arrived (at the end: what is left)."""
            if top is None:
                return None
            entries, pending[index] = pending[index], []
            if done is not None and done.logprobs is not None:  # the finished choice's own list is the truth
                entries = list(done.logprobs[reported[index]:])
            if not entries and done is None:
                return None
            reported[index] += len(entries)
            if chat:
                return {"content": chat_content(self.strings, entries, top)}
            return builders[index].build(entries)

        def chunk(index: int, text: str | None, finish_reason: str | None, first: bool = False,
                  tool_delta: dict | None = None, lp: dict | None = None) -> dict:
            if chat:
                delta: dict = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                if tool_delta is not None:  # a content or tool_calls delta of openai/tools.py
                    delta.update(tool_delta)
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
            body = {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            if include_usage:
                body["usage"] = _usage(own_prompt[index], tokens_so_far[index]) if continuous else None
            return body

        completion_tokens = 0
        cached: dict[int, int] = {}
        try:
            if chat:
                for index in range(total):
                    yield _sse(chunk(index, "", None, first=True))
            streams = [ToolStream(tools) for _ in range(total)] if chat and tools is not None else None
            while finished < total:
                index, event, value = await choices.queue.get()
                if event == "logprobs":
                    pending[index].extend(value)
                    continue
                if event == "text":
                    tokens_so_far[index] = max(tokens_so_far[index], value.tokens)  # a TextPiece
                    value = str(value)
                elif event == "done":
                    tokens_so_far[index] = len(value.token_ids)
                if event == "text" and streams is not None:
                    for tool_delta in streams[index].feed(value):
                        yield _sse(chunk(index, None, None, tool_delta=tool_delta, lp=take(index)))
                elif event == "text":
                    yield _sse(chunk(index, value, None, lp=take(index)))
                elif event == "done" and streams is not None:
                    finished += 1
                    completion_tokens += len(value.token_ids)
                    cached[index] = value.cached_tokens
                    for tool_delta in streams[index].finish():
                        yield _sse(chunk(index, None, None, tool_delta=tool_delta, lp=take(index)))
                    yield _sse(chunk(index, None, tool_finish_reason(streams[index].called, value.finish_reason),
                                     lp=take(index, value)))
                elif event == "done":
                    finished += 1
                    completion_tokens += len(value.token_ids)
                    cached[index] = value.cached_tokens
                    yield _sse(chunk(index, None if chat else "", value.finish_reason, lp=take(index, value)))
                else:
                    finished += 1
                    yield _sse(APIError(value, 500, kind="server_error").body())
            if include_usage:
                yield _sse({"id": ident, "object": kind, "created": created, "model": self.model_name,
                            "choices": [], "usage": _usage(prompt_tokens, completion_tokens,
                                                           sum(cached.get(i, 0) for i in range(0, total, n)))})
            yield _sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - a fault of ours ends the stream with an error object
            self._internal_error(endpoint, exc)
            yield _sse(APIError(f"internal server error: {type(exc).__name__}: {exc}", 500,
                                kind="server_error").body())
            yield _sse("[DONE]")
        finally:  # the client went away (or we are done): nothing more is wanted from these jobs
            choices.cancel()


_SAFE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


def _keeps_text(part: dict | None, safe: set[str]) -> bool:
    """A tokenizer.json normalizer or pre-tokenizer that never removes text (only these kinds are trusted)."""
    if part is None:
        return True
    kind = part.get("type")
    if kind == "Sequence":
        children = part.get("normalizers", part.get("pretokenizers", []))
        return all(_keeps_text(child, safe) for child in children)
    return kind in safe and part.get("behavior") != "Removed"


def _longest_token(tokenizer: Any) -> int | None:
    """The most input characters one token of `tokenizer` can cover, or None when that has no bound (or
    cannot be told): a BPE vocabulary's longest entry (a piece covers at most one input character per piece
    character; an unknown character gets a token of its own unless unknowns fuse), times 4 when a normalizer
    may shrink the text first (NFKC folds a ligature or fullwidth letters). Normalizers and pre-tokenizers
    that may delete text (Strip, Replace, Whitespace, ...) give None. Used to refuse a prompt that cannot
    fit before tokenizing it."""
    if tokenizer is None:
        return None
    try:
        spec = json.loads(tokenizer.to_str())
        model = spec["model"]
        if model.get("type") != "BPE" or model.get("fuse_unk"):
            return None
        if not _keeps_text(spec.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS):
            return None
        if not _keeps_text(spec.get("normalizer"), _SAFE_NORMALIZERS):
            return None
        longest = max(len(piece) for piece in tokenizer.get_vocab(with_added_tokens=True))
    except (AttributeError, KeyError, ValueError, TypeError):
        return None
    return max(1, longest * (4 if spec.get("normalizer") is not None else 1))


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so that a taken port is a clear error before anything loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(server: OpenAIServer, sock: socket.socket, log_level: str = "warning",
               on_ready: Any = None) -> None:
    """Serve on `sock` until SIGTERM or Ctrl-C; returns normally after a graceful shutdown.

    On the signal uvicorn stops accepting connections and waits for the open ones; after
    `shutdown_timeout_s` every request still running is cancelled (its stream ends with finish_reason
    "cancelled" and `data: [DONE]`), and a few seconds later uvicorn drops whatever connection is left.
    """
    import uvicorn

    timer: list[threading.Timer] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if not timer:
                LOG.warning("shutting down: in-flight requests have %.1fs to finish", server.shutdown_timeout_s)
                timer.append(threading.Timer(server.shutdown_timeout_s, server.frontend.cancel_all))
                timer[0].daemon = True
                timer[0].start()

    config = uvicorn.Config(server.app, log_level=log_level, timeout_graceful_shutdown=server.shutdown_timeout_s + 3,
                            access_log=False, lifespan="on", timeout_keep_alive=5,
                            http=guarded_protocol(server.http_limits))
    userver = Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; these handlers take it, so we return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}

    async def main() -> None:
        task = asyncio.create_task(userver.serve(sockets=[sock]))
        if on_ready is not None:
            while not userver.started and not task.done():
                await asyncio.sleep(0.02)
            if userver.started:
                on_ready()
        await task

    try:
        asyncio.run(main())
    finally:
        for handler_timer in timer:
            handler_timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
