"""The OpenAI-compatible HTTP server: FastAPI on uvicorn, every request on the one scheduler loop.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events ending in `data: [DONE]`), `GET /health`, `GET /metrics` (Prometheus). Bodies are read and
checked by openai_protocol (unknown fields, wrong types and out-of-range values are a 400 with OpenAI's error
object) and then by the engine's own rules (a request beyond its limits is a 400 with the reason). A client
that disconnects - mid-stream or while waiting for a whole answer - has its jobs cancelled, so the scheduler
frees their slots at the next step. SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight requests
finish for up to `shutdown_timeout_s`, cancels what is left, stops the loop and returns (the CLI exits 0).
"""

from __future__ import annotations

import asyncio
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
from ..frontend import Completion, Frontend, Prepared, Settings, TextSink
from ..http_limits import BodyError, HttpLimits, guarded_protocol, read_body
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    check_chat,
    check_completion,
    parse_body,
    prompt_list,
)

LOG = logging.getLogger("trimode.openai")
DISCONNECT_POLL_S = 0.25


def _settings(sampling: Sampling, suffix: str | None = None) -> Settings:
    return Settings(max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                    top_k=sampling.top_k, seed=sampling.seed, stop=sampling.stop, mode=sampling.mode,
                    block_length=sampling.block_length, threshold=sampling.threshold,
                    max_thinking_tokens=sampling.max_thinking_tokens, suffix=suffix,
                    extra={} if sampling.priority is None else {"priority": sampling.priority})


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

        def error_response(exc: APIError, endpoint: str) -> JSONResponse:
            self.metrics.http(endpoint, exc.status)
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return error_response(APIError(str(exc.detail), exc.status_code, kind=kind), request.url.path)

        @app.exception_handler(RequestValidationError)
        async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
            return error_response(APIError(f"invalid request: {exc.errors()[0].get('msg')}"), request.url.path)

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=self.metrics.content_type)

        @app.get("/v1/models")
        async def models() -> dict:
            self.metrics.http("/v1/models", 200)
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str) -> Any:
            if name != self.model_name:
                return error_response(self._no_model(name), "/v1/models")
            return self._model_card()

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            endpoint = "/v1/completions"
            try:
                body = await self._body(request, CompletionRequest)
                sampling = check_completion(body)
                self._check_model(body.model)
                prepared, prompt_texts = await asyncio.to_thread(self._prepare_completion, body, sampling)
            except APIError as exc:
                return error_response(exc, endpoint)
            except RequestError as exc:
                return error_response(APIError(str(exc)), endpoint)
            return await self._respond(request, endpoint, prepared, sampling.n, body.stream,
                                       body.stream_options, chat=False, echo=prompt_texts if body.echo else None)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            endpoint = "/v1/chat/completions"
            try:
                body = await self._body(request, ChatRequest)
                sampling = check_chat(body)
                self._check_model(body.model)
                prepared = await asyncio.to_thread(self._prepare_chat, body, sampling)
            except APIError as exc:
                return error_response(exc, endpoint)
            except RequestError as exc:
                return error_response(APIError(str(exc)), endpoint)
            return await self._respond(request, endpoint, prepared, sampling.n, body.stream,
                                       body.stream_options, chat=True)

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

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "trimode",
                "max_model_len": int(self.frontend.engine.limits.max_seq_len)}

    def _no_model(self, name: str) -> APIError:
        return APIError(f"The model '{name}' does not exist (this server serves '{self.model_name}')", 404,
                        param="model", kind="not_found_error", code="model_not_found")

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise self._no_model(name)

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

    def _prepare_chat(self, body: ChatRequest, sampling: Sampling) -> list[Prepared]:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        prompt = self.frontend.encode_chat(messages, body.enable_thinking)
        return self.frontend.prepare([prompt], _settings(sampling), sampling.n)

    # -- responding -------------------------------------------------------------------------------------------

    async def _respond(self, request: Any, endpoint: str, prepared: list[Prepared], n: int, stream: bool,
                       stream_options: Any, chat: bool, echo: list[str] | None = None) -> Any:
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        try:
            choices = Choices(self.frontend, prepared)
        except RequestError as exc:
            return self._error(endpoint, APIError(str(exc)))
        except OverloadedError as exc:
            status = 503 if isinstance(exc, ShuttingDownError) else 429
            self.metrics.http(endpoint, status)
            return JSONResponse(APIError(str(exc), status, kind="server_error", code="overloaded").body(),
                                status_code=status, headers={"Retry-After": "1"})
        prompt_tokens = sum(len(prepared[i].prompt) for i in range(0, len(prepared), n))  # each prompt once
        if stream:
            include_usage = bool(stream_options is not None and stream_options.include_usage)
            self.metrics.http(endpoint, 200)
            return StreamingResponse(self._stream(choices, ident, created, chat, include_usage, prompt_tokens, n),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results: dict[int, Completion] = {}
        errors: list[str] = []
        try:
            while len(results) + len(errors) < len(prepared):
                try:
                    index, kind, value = await asyncio.wait_for(choices.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        choices.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "done":
                    results[index] = value
                elif kind == "error":
                    errors.append(value)
        except asyncio.CancelledError:
            choices.cancel()
            raise
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
                out.append({"index": index, "message": {"role": "assistant", "content": result.text},
                            "logprobs": None, "finish_reason": result.finish_reason})
            else:
                text = (echo[index // n] + result.text) if echo is not None else result.text
                out.append({"index": index, "text": text, "logprobs": None, "finish_reason": result.finish_reason})
        self.metrics.http(endpoint, 200)
        body = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.model_name, "choices": out,
                "usage": _usage(prompt_tokens, completion_tokens, cached_tokens),
                "trimode": [{"forwards": r.forwards, "tokens_per_forward": round(r.tokens_per_forward, 4),
                             "mode": prepared[i].config.mode, "block_length": r.block_length}
                            for i, r in sorted(results.items())]}
        return JSONResponse(body)

    async def _stream(self, choices: Choices, ident: str, created: int, chat: bool, include_usage: bool,
                      prompt_tokens: int, n: int) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        total = len(choices.sinks)
        finished = 0

        def chunk(index: int, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
            if chat:
                delta: dict = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return body

        completion_tokens = 0
        cached: dict[int, int] = {}
        try:
            if chat:
                for index in range(total):
                    yield _sse(chunk(index, "", None, first=True))
            while finished < total:
                index, event, value = await choices.queue.get()
                if event == "text":
                    yield _sse(chunk(index, value, None))
                elif event == "done":
                    finished += 1
                    completion_tokens += len(value.token_ids)
                    cached[index] = value.cached_tokens
                    yield _sse(chunk(index, None if chat else "", value.finish_reason))
                else:
                    finished += 1
                    yield _sse(APIError(value, 500, kind="server_error").body())
            if include_usage:
                yield _sse({"id": ident, "object": kind, "created": created, "model": self.model_name,
                            "choices": [], "usage": _usage(prompt_tokens, completion_tokens,
                                                           sum(cached.get(i, 0) for i in range(0, total, n)))})
            yield _sse("[DONE]")
        finally:  # the client went away (or we are done): nothing more is wanted from these jobs
            choices.cancel()


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
