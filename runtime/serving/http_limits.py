"""Limits every HTTP server of trimode applies before a request reaches the engine (the OpenAI server and the
guard in front of Triton's HTTP endpoint).

- A connection must deliver a request's headers within `header_timeout_s` of being opened (or of its previous
  response) and the request's body within `body_timeout_s` of its headers; otherwise it is closed (with a 408
  when nothing has been answered on it yet). uvicorn itself only times out idle keep-alive connections, and
  any byte restarts that timer, so one slow client could hold a connection (and its memory) forever.
- A body is read in pieces and refused as soon as it passes `max_body_bytes` (413), not after it is whole.
- JSON is parsed off the event loop; nesting beyond what the parser can recurse into, and strings that are
  not Unicode (lone UTF-16 surrogates such as "\\ud800", which json accepts and no tokenizer can encode), are
  a 400 naming the problem.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MiB = 1024 * 1024
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # the only way a surrogate gets into JSON text


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP request may take; see the module docstring."""

    max_body_bytes: int = 16 * MiB
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0


class BodyError(Exception):
    """A body that is refused: `status` 400, 408 or 413, `message` says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def guarded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the header and body deadlines of `limits` (pass as `uvicorn.Config(http=...)`)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._progress()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header()
                self._progress()  # a pipelined request may already be in

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timers()
            super().connection_lost(exc)

        # -- deadlines ------------------------------------------------------------------------------------
        def _arm_header(self) -> None:
            self._cancel_timers()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_expired)

        def _progress(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE:
                return
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            if state is h11.SEND_BODY and self._body_timer is None:
                self._body_timer = self.loop.call_later(limits.body_timeout_s, self._body_expired)
            elif state is not h11.SEND_BODY and self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _cancel_timers(self) -> None:
            for timer in (self._header_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._body_timer = None

        def _header_expired(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE:
                _send_simple(self, 408, b"request headers not received in time\n")
            self.transport.close()

        def _body_expired(self) -> None:
            self._body_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
                if self.conn.our_state is h11.SEND_RESPONSE:  # nothing answered yet
                    _send_simple(self, 408, b"request body not received in time\n")
                self.transport.close()  # the application sees the client disconnect

    return GuardedH11Protocol


def _send_simple(protocol: H11Protocol, status: int, text: bytes) -> None:
    """A complete plain-text response written straight to the transport (no application involved)."""
    try:
        conn = protocol.conn
        headers = [("content-type", "text/plain; charset=utf-8"), ("connection", "close"),
                   ("content-length", str(len(text)))]
        reason = b"Request Timeout" if status == 408 else b""
        protocol.transport.write(conn.send(h11.Response(status_code=status, headers=headers, reason=reason)))
        protocol.transport.write(conn.send(h11.Data(data=text)))
        protocol.transport.write(conn.send(h11.EndOfMessage()))
    except h11.LocalProtocolError:
        pass


async def read_body(receive: Any, headers: Any, limit: int) -> bytes:
    """An ASGI request's body, refused (BodyError 413) as soon as it exceeds `limit` bytes - before reading it
    when Content-Length says so. A client gone mid-body is BodyError 400 ("disconnected")."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyError(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes", 413)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BodyError("the client disconnected before sending its whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyError(f"request body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def load_json(raw: bytes | str) -> Any:
    """Parse JSON text; BodyError (400) for invalid JSON, nesting too deep to parse, or a lone surrogate."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise BodyError(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BodyError(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BodyError("request body is nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):
        where = first_non_unicode(data)
        if where is not None:
            raise BodyError(f"{where or 'the body'} holds a string that is not valid Unicode (a lone UTF-16 "
                            "surrogate escape such as \\ud800)")
    return data


def first_non_unicode(data: Any) -> str | None:
    """The path ("messages.0.content") of the first string (or key) that cannot be encoded as UTF-8; None if
    there is none. Iterative: the depth of `data` is whatever the parser allowed."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _encodes(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if not _encodes(key):
                    return path or "a key"
                stack.append((item, where))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{index}" if path else str(index)) for index, item in enumerate(value)
                         if isinstance(item, str | list | dict))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
