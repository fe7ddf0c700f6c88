"""The HTTP endpoint `trimode serve` puts in front of tritonserver's own.

tritonserver parses request JSON recursively: a body nested some 50,000 levels deep crashes the whole server
(SIGSEGV, every in-flight request lost), and its HTTP endpoint has no header or body read timeout. So
`trimode serve` binds tritonserver's HTTP endpoint to a loopback port and serves the public one itself: every
request is read under the limits of runtime/serving/http_limits.py (size, header and body deadlines), and a
body's JSON part (the whole body, or its first `Inference-Header-Content-Length` bytes with the binary-data
extension) is parsed once here. A 400 in Triton's `{"error": ...}` form answers JSON that is too deep, not
JSON or not Unicode; an integer beyond 64 bits (tritonserver answers it with a 500); and, on the generate
endpoints of trimode's own models, an integer outside the range of the input it is sent to (tritonserver
would silently wrap 2^40 into an INT32). What passes is forwarded unchanged and its response streamed back
as it arrives (generate_stream's server-sent events included). A client that disconnects closes the upstream
request, which Triton reports to the model as a cancellation. gRPC and metrics are served by tritonserver
directly (protobuf bounds nesting).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import httpx

from ..http_limits import BodyError, HttpLimits, load_json, read_body

LOG = logging.getLogger("trimode.triton.guard")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate", "host", "content-length"}
_INFERENCE = ("/infer", "/generate", "/generate_stream")
_GENERATE = re.compile(r"^/v2/models/([^/]+)(?:/versions/\d+)?/generate(?:_stream)?$")
_LONG_NUMBER = re.compile(rb"\d{19,}")  # an integer that may not fit 64 bits
INT_RANGES = {"TYPE_INT32": (-(2**31), 2**31), "TYPE_INT64": (-(2**63), 2**63)}


class TritonHttpGuard:
    """An ASGI application forwarding to tritonserver's HTTP endpoint at `upstream` (see the module docstring).

    `draining` (set by `trimode serve` on shutdown) refuses new inference requests with 503 while the
    responses of those in flight keep streaming."""

    def __init__(self, upstream: str, limits: HttpLimits,
                 integer_inputs: dict[str, dict[str, tuple[int, int]]] | None = None) -> None:
        """`integer_inputs`: per model name, the [low, high) range of each integer input (trimode's models)."""
        self.upstream = upstream.rstrip("/")
        self.limits = limits
        self.integer_inputs = integer_inputs or {}
        self.draining = False
        self.active = 0  # requests being forwarded or answered right now
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def close_upstream(self, timeout_s: float = 5.0) -> None:
        """From another thread, at shutdown: close the pooled connections to tritonserver (it waits for open
        HTTP connections before it exits); later requests are answered 503."""
        self.draining = True
        if self._loop is not None and self._client is not None and not self._loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout_s)
            except Exception as exc:  # the loop is stopping anyway
                LOG.warning("closing the connections to tritonserver failed: %s", exc)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            self.active += 1
            try:
                await self._http(scope, receive, send)
            finally:
                self.active -= 1

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loop = asyncio.get_running_loop()
                self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                                 limits=httpx.Limits(max_connections=None,
                                                                     max_keepalive_connections=64))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None and not self._client.is_closed:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict, receive: Any, send: Any) -> None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        path = scope["raw_path"].decode("latin-1")
        assert self._client is not None, "the lifespan startup did not run"
        if (self.draining and path.endswith(_INFERENCE)) or self._client.is_closed:
            await _answer(send, 503, "the server is shutting down")
            return
        try:
            body = await read_body(receive, headers, self.limits.max_body_bytes)
            if body:
                await asyncio.to_thread(self._check_json, body, headers, scope["path"])
        except BodyError as exc:
            await _answer(send, exc.status, exc.message)
            return
        query = scope["query_string"].decode("latin-1")
        url = self.upstream + path + (f"?{query}" if query else "")
        forward = [(k, v) for k, v in headers.items() if k not in _HOP_BY_HOP]
        request = self._client.build_request(scope["method"], url, headers=forward, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client was closed meanwhile
            LOG.warning("tritonserver did not answer %s %s: %s", scope["method"], path, exc)
            await _answer(send, 502, f"tritonserver did not answer: {type(exc).__name__}")
            return
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
                                    if k.lower() not in _HOP_BY_HOP - {"content-length"}]})
            async for chunk in response.aiter_raw():
                if gone.done():  # the client left: closing the upstream response tells Triton
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:  # tritonserver went away mid-response: end ours
            LOG.warning("tritonserver's response to %s broke off: %s", path, exc)
        finally:
            gone.cancel()
            await response.aclose()


    def _check_json(self, body: bytes, headers: dict[str, str], path: str) -> None:
        """BodyError unless the JSON part of `body` parses and its integers fit (see the module docstring)."""
        size = headers.get("inference-header-content-length")
        if size is not None:
            if not size.isdigit() or int(size) > len(body):
                raise BodyError(f"Inference-Header-Content-Length {size!r} does not fit a body of {len(body)} "
                                "bytes")
            body = body[: int(size)]
        data = load_json(body)
        if _LONG_NUMBER.search(body):
            _check_integers(data, -(2**63), 2**64, "the body")
        match = _GENERATE.match(path)
        ranges = self.integer_inputs.get(match.group(1), {}) if match else {}
        if ranges and isinstance(data, dict):
            for name, (low, high) in ranges.items():
                if name in data:
                    _check_integers(data[name], low, high, f"input '{name}'")


def _check_integers(data: Any, low: int, high: int, what: str) -> None:
    """BodyError when an integer in `data` (iteratively, any depth) lies outside [low, high)."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, int) and not isinstance(value, bool) and not low <= value < high:
            shown = value if abs(value) < 10**30 else f"{str(value)[:12]}..."
            raise BodyError(f"{what} holds the integer {shown}, outside [{low}, {high})")
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())


async def _disconnected(receive: Any) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(send: Any, status: int, message: str) -> None:
    """An error in Triton's own form, `{"error": "..."}`."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
