"""`trimode serve` (Triton) as users run it: hostile requests beside innocent ones, and SIGTERM mid-stream.

The server is the real `trimode serve` process: tritonserver behind trimode's HTTP guard. Innocent streams
must get exactly their solo output while bodies that used to crash tritonserver (deep nesting), fail the step
(a temperature of 1e-40) or take the machine (rows beyond --max-row-tokens) arrive; on SIGTERM every stream
in flight - HTTP and gRPC - gets a final response with its finish reason, and the process exits 0.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .test_triton_server import (  # noqa: F401  (served: a fixture)
    MODEL,
    expected,
    grpcclient,
    make_inputs,
    served,
    start_serve,
    stop_serve,
)

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.integration

ROW_LIMIT = 100


@dataclass
class Serving:
    process: subprocess.Popen
    http: str
    grpc: str
    out: Path
    err: Path


@pytest.fixture(scope="module")
def serving(served, tmp_path_factory) -> Iterator[Serving]:  # noqa: F811
    root = tmp_path_factory.mktemp("guarded")
    process, ports, out, err = start_serve(served.engine_dir, root, "--threads", "1", "--max-row-tokens",
                                           str(ROW_LIMIT), "--shutdown-timeout", "2", "--max-step-tokens", "256",
                                           "--header-timeout", "1")
    try:
        yield Serving(process, f"http://127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", out, err)
    finally:
        stop_serve(process)


def generate(serving: Serving, body: dict | bytes, stream: bool = False) -> tuple[int, list[dict]]:
    """POST to the generate (or generate_stream) endpoint through the guard: status and the JSON events."""
    url = f"{serving.http}/v2/models/{MODEL}/{'generate_stream' if stream else 'generate'}"
    kw = {"json": body} if isinstance(body, dict) else {"content": body}
    with httpx.stream("POST", url, timeout=120, headers={"content-type": "application/json"}, **kw) as reply:
        if not stream or reply.status_code != 200:
            return reply.status_code, [json.loads(reply.read() or b"{}")]
        return 200, [json.loads(line[5:]) for line in reply.iter_lines() if line.startswith("data:")]


def _ids(events: list[dict]) -> list[int]:
    return [t for event in events for t in ([event["output_ids"]] if isinstance(event["output_ids"], int)
                                            else event["output_ids"])]


def test_hostile_bodies_beside_innocent_streams(serving, served):  # noqa: F811
    cases = [([1, 3 + i, 7], dict(mode=m, max_new_tokens=24, block_length=4)) for i, m in
             enumerate(["ar", "spec", "quad", "diffusion"])]
    want = [expected(served, prompt, **settings).tokens for prompt, settings in cases]
    hostile = [
        (b'{"input_ids": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "nested too deeply"),
        (b'{"text_input": "\\ud800", "max_tokens": 4}', 400, "not valid Unicode"),
        (b'{"input_ids": [1, 1180591620717411303424], "max_tokens": 4}', 400, "outside"),
        (b'{"input_ids": [1, 1099511627776], "max_tokens": 4}', 400, "outside [-2147483648"),
        ({"input_ids": [1, 2], "max_tokens": 8, "mode": "quad", "block_length": 12}, 400, "--max-row-tokens"),
        ({"input_ids": [1, 2], "max_tokens": ROW_LIMIT, "mode": "infill", "suffix_ids": [5]}, 400,
         "--max-row-tokens"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        running = [pool.submit(generate, serving, {"input_ids": prompt, "max_tokens": s["max_new_tokens"],
                                                   "mode": s["mode"], "block_length": s["block_length"],
                                                   "stream": True}, True)
                   for prompt, s in cases]
        for body, status, words in hostile:
            code, (reply,) = generate(serving, body)
            assert code == status and words in reply["error"], (code, reply)
        code, (reply,) = generate(serving, {"input_ids": [1, 2, 3], "max_tokens": 8, "mode": "spec",
                                            "block_length": 4, "temperature": 1e-40})
        assert code == 200 and _ids([reply]) == expected(served, [1, 2, 3], mode="spec", max_new_tokens=8,
                                                          block_length=4).tokens
        results = [future.result(timeout=240) for future in running]
    for (status, events), tokens in zip(results, want, strict=True):
        assert status == 200 and _ids(events) == tokens and events[-1]["finish_reason"] in ("length", "eos")
    assert serving.process.poll() is None


def test_a_connection_that_never_finishes_its_headers_is_closed(serving):
    host, port = serving.http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v2/models/trimode/generate HTTP/1.1\r\nHost: x\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408")
    code, _ = generate(serving, {"input_ids": [1, 2], "max_tokens": 2})
    assert code == 200


def test_sigterm_gives_every_stream_in_flight_a_final_response(serving, served):  # noqa: F811
    long = {"max_tokens": 3000, "mode": "ar", "stream": True}
    prompts = [[1, 2, 9], [1, 4, 11]]
    replies: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(serving.grpc)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    client.async_stream_infer(MODEL, make_inputs(grpcclient, input_ids=[1, 5, 5], max_tokens=3000, mode="ar",
                                                 stream=True))
    with ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(generate, serving, {"input_ids": p, **long}, True) for p in prompts]
        _, error = replies.get(timeout=60)  # the gRPC stream is producing
        assert error is None
        time.sleep(0.5)
        serving.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        code, (late,) = generate(serving, {"input_ids": [1, 2], "max_tokens": 4})
        assert code == 503 and "shutting down" in late["error"]
        results = [future.result(timeout=120) for future in streams]
    for prompt, (status, events) in zip(prompts, results, strict=True):
        assert status == 200
        final = events[-1]
        assert final["finish_reason"] in ("cancelled", "eos", "length"), final
        tokens = _ids(events)
        assert tokens == expected(served, prompt, mode="ar", max_new_tokens=len(tokens)).tokens  # its solo prefix
    while True:  # the gRPC stream: partial responses, then the final one with its finish reason
        result, error = replies.get(timeout=60)
        assert error is None, error
        if result.as_numpy("finish_reason") is not None:
            assert result.as_numpy("finish_reason")[0].decode() in ("cancelled", "eos", "length")
            break
    client.stop_stream()
    client.close()
    assert serving.process.wait(60) == 0, serving.err.read_text()
    assert "tritonserver stopped (status 0)" in serving.err.read_text()
