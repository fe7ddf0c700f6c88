"""The HTTP limits of both servers (runtime/serving/http_limits.py) and the guard in front of tritonserver
(runtime/serving/triton/http_guard.py), on real uvicorn servers over real sockets.

The guard forwards to an upstream; here that is a small ASGI application on its own uvicorn server (what
is tested is the guard: what it refuses, what it passes through unchanged, streaming, draining). The real
tritonserver behind it is tested in test_triton_guard.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")
import uvicorn  # noqa: E402

from trimode.runtime.serving.http_limits import (  # noqa: E402
    BodyError,
    HttpLimits,
    first_non_unicode,
    guarded_protocol,
    load_json,
    read_body,
)
from trimode.runtime.serving.triton.http_guard import TritonHttpGuard  # noqa: E402

# -- JSON ------------------------------------------------------------------------------------------------------


def test_deep_nesting_is_a_400_not_a_crash():
    with pytest.raises(BodyError, match="nested too deeply") as caught:
        load_json("[" * 100_000 + "]" * 100_000)
    assert caught.value.status == 400
    assert load_json("[" * 50 + "]" * 50) is not None


def test_lone_surrogates_are_refused_and_pairs_accepted():
    assert load_json('{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}  # json.dumps writes emoji so
    for body, where in (('{"prompt": "\\ud800"}', "prompt"), ('{"messages": [{"content": "a\\udfff"}]}',
                                                              "messages.0.content"),
                        ('{"a": {"\\udc00": 1}}', "a"), ('["x", ["\\ud800"]]', "1.0")):
        with pytest.raises(BodyError, match="not valid Unicode") as caught:
            load_json(body)
        assert caught.value.message.startswith(where), caught.value.message
    assert first_non_unicode({"ok": ["fine", 1, 2.5, None]}) is None


def test_bad_utf8_and_bad_json_are_400s():
    with pytest.raises(BodyError, match="not valid UTF-8"):
        load_json(b'{"a": "\xff"}')
    with pytest.raises(BodyError, match="not valid JSON"):
        load_json(b'{"a": ')


def _receiver(chunks: list[bytes]):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}
    return receive


def test_bodies_are_refused_as_soon_as_they_pass_the_limit():
    assert asyncio.run(read_body(_receiver([b"ab", b"cd"]), {}, 4)) == b"abcd"
    with pytest.raises(BodyError) as caught:
        asyncio.run(read_body(_receiver([b"ab", b"cd", b"e"]), {}, 4))
    assert caught.value.status == 413

    async def never():
        raise AssertionError("a body whose Content-Length is too large must not be read")
    with pytest.raises(BodyError, match="10 bytes exceeds the limit of 4") as caught:
        asyncio.run(read_body(never, {"content-length": "10"}, 4))
    assert caught.value.status == 413


# -- servers ---------------------------------------------------------------------------------------------------


@contextmanager
def serving(app, limits: HttpLimits) -> Iterator[int]:
    """`app` on uvicorn with the guarded protocol, on a free loopback port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, log_level="warning", lifespan="auto", http=guarded_protocol(limits),
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


async def echo_app(scope, receive, send):
    """Answers with the request's method, path, body and headers; /stream sends five chunks."""
    if scope["type"] == "lifespan":
        while True:
            if (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for number in range(5):
            await send({"type": "http.response.body", "body": f"data: {number}\n\n".encode(), "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    payload = json.dumps({"method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
                          "body": body.decode(errors="replace"),
                          "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}).encode()
    await send({"type": "http.response.start", "status": 207, "headers": [(b"content-type", b"application/json"),
                                                                          (b"x-upstream", b"yes")]})
    await send({"type": "http.response.body", "body": payload})


def _raw(port: int, payload: bytes) -> bytes:
    """What the server sends on a connection that sends `payload` and then waits."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        if payload:
            conn.sendall(payload)
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        return data


def test_slow_headers_and_slow_bodies_are_timed_out():
    limits = HttpLimits(max_body_bytes=1000, header_timeout_s=0.3, body_timeout_s=0.3)
    with serving(echo_app, limits) as port:
        assert _raw(port, b"").startswith(b"HTTP/1.1 408")  # connected, never sent anything
        assert _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408")  # headers unfinished
        slow_body = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
        assert _raw(port, slow_body).startswith(b"HTTP/1.1 408")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:  # a normal client is unaffected
            for _ in range(3):
                assert client.post("/", content=b"x" * 10).status_code == 207
                time.sleep(0.4)  # longer than the deadlines, idle between requests (keep-alive)


def test_the_guard_refuses_what_would_hurt_tritonserver_and_passes_the_rest():
    limits = HttpLimits(max_body_bytes=200_000, header_timeout_s=5, body_timeout_s=5)
    with serving(echo_app, limits) as upstream:
        guard = TritonHttpGuard(f"http://127.0.0.1:{upstream}", limits, {"m": {"input_ids": (-(2**31), 2**31)}})
        with serving(guard, limits) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            reply = client.post("/v2/models/m/generate?x=1", content=b'{"text_input": "hi"}',
                                headers={"content-type": "application/json", "x-mine": "kept"})
            assert reply.status_code == 207 and reply.headers["x-upstream"] == "yes"
            seen = reply.json()
            assert (seen["method"], seen["path"], seen["query"], seen["body"]) == \
                ("POST", "/v2/models/m/generate", "x=1", '{"text_input": "hi"}')
            assert seen["headers"]["x-mine"] == "kept"
            assert client.get("/v2/health/ready").json()["method"] == "GET"
            # binary-data extension: only the JSON header part is parsed
            blob = b'{"inputs": []}' + b"\xff\x00\xfe"
            assert client.post("/v2/models/m/infer", content=blob,
                               headers={"inference-header-content-length": "14"}).status_code == 207
            assert client.post("/v2/models/m/generate", content=b"[" * 100 + b"]" * 100).status_code == 207
            for body, status, words in ((b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "nested too deeply"),
                                        (b'{"text_input": "\\ud800"}', 400, "not valid Unicode"),
                                        (b"x" * 300_000, 413, "exceeds the limit"),
                                        (b"{", 400, "not valid JSON"),
                                        (b'{"input_ids": [1, 1180591620717411303424]}', 400, "outside"),
                                        (b'{"input_ids": [1, 1099511627776]}', 400, "input 'input_ids' holds")):
                reply = client.post("/v2/models/m/generate", content=body)
                assert reply.status_code == status and words in reply.json()["error"], reply.text
            # an integer input's range is checked only for the models it was given for
            other = client.post("/v2/models/other/generate", content=b'{"input_ids": [1099511627776]}')
            assert other.status_code == 207
            with client.stream("POST", "/stream", content=b"{}") as stream:
                assert [line for line in stream.iter_lines() if line] == [f"data: {n}" for n in range(5)]
            guard.draining = True
            assert client.post("/v2/models/m/generate", content=b"{}").status_code == 503
            assert client.get("/v2/health/ready").status_code == 207  # only inference is refused
