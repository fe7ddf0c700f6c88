"""A real tritonserver serving a tiny engine: parity with `trimode generate`, streaming, concurrency, errors.

One server for the whole session (started once, killed at the end even when a test fails), reached with
tritonclient over HTTP and gRPC streams and with plain HTTP on Triton's generate endpoints - loopback only.
Expected tokens come from `trimode generate --json` and from `generate()` on the same engine, one prompt at a
time, so a request batched with others on the server must still give exactly its solo result.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from trimode.runtime.backends.engine_loader import open_engine
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig
from trimode.runtime.serving.triton.repo import write_triton_repo
from trimode.runtime.serving.triton.server import TritonServer, TritonUnavailable, find_tritonserver, free_port

from .conftest import build_checkpoint

pytestmark = pytest.mark.integration

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "trimode"
SYNC = "trimode_sync"
BLOCK = 8
DTYPES = {"text_input": np.object_, "input_ids": np.int32, "max_tokens": np.int32, "mode": np.object_,
          "block_length": np.int32, "threshold": np.float32, "temperature": np.float32, "seed": np.int64,
          "stream": np.bool_, "priority": np.int32}
TRITON_TYPES = {np.object_: "BYTES", np.int32: "INT32", np.int64: "INT64", np.float32: "FP32", np.bool_: "BOOL",
                np.float64: "FP64"}


def _triton_install_or_skip():
    try:
        return find_tritonserver()
    except TritonUnavailable as exc:
        pytest.skip(f"no tritonserver: {exc}")


@dataclass
class Served:
    server: TritonServer
    engine_dir: Path
    engine: object
    log: Path


def trimode_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimode", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    install = _triton_install_or_skip()
    root = tmp_path_factory.mktemp("triton")
    checkpoint = build_checkpoint(root / "ckpt")
    engine_dir = root / "engine"
    built = trimode_cli("build", str(checkpoint), "-o", str(engine_dir), "--backend", "torch")
    # The server must serve a built engine: a failed build is a failure, never a reason to serve the checkpoint.
    assert built.returncode == 0, f"trimode build failed (status {built.returncode}):\n{built.stderr}"
    assert (engine_dir / "manifest.json").is_file(), "trimode build succeeded but wrote no manifest.json"
    write_triton_repo(engine_dir, root / "repo", sync_model=True, max_step_tokens=256)
    server = TritonServer(root / "repo", log_path=root / "tritonserver.log", install=install)
    try:
        server.start(timeout_s=180)
        yield Served(server, engine_dir, open_engine(engine_dir), root / "tritonserver.log")
    finally:
        server.stop()


# -- clients ------------------------------------------------------------------------------------------------


def make_inputs(module, **values) -> list:
    """tritonclient InferInputs; a value may be (array) to force a dtype/shape, else it is converted."""
    inputs = []
    for name, value in values.items():
        if isinstance(value, np.ndarray):
            array = value
        elif name in ("text_input", "mode"):
            array = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
        elif name == "input_ids":
            array = np.asarray(value, dtype=np.int32)
        else:
            array = np.asarray([value], dtype=DTYPES[name])
        infer_input = module.InferInput(name, list(array.shape), TRITON_TYPES[array.dtype.type])
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


@dataclass
class Reply:
    ids: list[int]
    text: str | None
    forwards: int | None
    finish_reason: str | None
    final: bool
    cached_tokens: int | None = None
    parameters: dict | None = None


def _reply(result) -> Reply:
    ids = result.as_numpy("output_ids")
    text = result.as_numpy("text_output")
    forwards = result.as_numpy("forwards")
    reason = result.as_numpy("finish_reason")
    cached = result.as_numpy("cached_tokens")
    response = result.get_response()
    final = False
    parameters = {}
    if hasattr(response, "parameters"):
        if "triton_final_response" in response.parameters:
            final = response.parameters["triton_final_response"].bool_param
        parameters = {k: v.int64_param for k, v in response.parameters.items() if k != "triton_final_response"}
    return Reply([int(t) for t in ids] if ids is not None else [],
                 text[0].decode() if text is not None and text.size else None,
                 int(forwards[0]) if forwards is not None else None,
                 reason[0].decode() if reason is not None else None, final,
                 int(cached[0]) if cached is not None else None, parameters)


def grpc_stream(url: str, timeout: float = 60, **values) -> list[Reply]:
    """One request over a gRPC stream; every response until the FINAL one (an error raises)."""
    client = grpcclient.InferenceServerClient(url)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        client.async_stream_infer(MODEL, make_inputs(grpcclient, **values), enable_empty_final_response=True)
        out = []
        deadline = time.monotonic() + timeout
        while True:
            result, error = replies.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                raise error
            out.append(_reply(result))
            if out[-1].final:
                return out
    finally:
        client.stop_stream()
        client.close()


def http_infer(url: str, **values) -> Reply:
    """tritonclient HTTP `infer` on the non-decoupled twin (Triton refuses HTTP infer on decoupled models)."""
    client = httpclient.InferenceServerClient(url)
    try:
        result = client.infer(SYNC, make_inputs(httpclient, **values))
    finally:
        client.close()
    return Reply([int(t) for t in result.as_numpy("output_ids")], result.as_numpy("text_output")[0].decode(),
                 int(result.as_numpy("forwards")[0]), result.as_numpy("finish_reason")[0].decode(), True)


def http_generate(url: str, body: dict, sse: bool = False) -> list[dict]:
    """Triton's HTTP generate / generate_stream (server-sent events) endpoints on the decoupled model."""
    endpoint = "generate_stream" if sse else "generate"
    request = urllib.request.Request(f"http://{url}/v2/models/{MODEL}/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            payload = reply.read().decode()
    except urllib.error.HTTPError as exc:
        return [{"http_status": exc.code, **json.loads(exc.read().decode() or "{}")}]
    if not sse:
        return [json.loads(payload)]
    return [json.loads(line[len("data: "):]) for line in payload.splitlines() if line.startswith("data: ")]


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


def expected(served: Served, prompt: list[int], **kw):
    kw.setdefault("block_length", BLOCK)
    return generate(served.engine, [prompt], GenerationConfig(**kw))[0]


# -- tests --------------------------------------------------------------------------------------------------


def test_server_ready_and_models_configured(served):
    client = httpclient.InferenceServerClient(served.server.http_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL) and client.is_model_ready(SYNC)
        config = client.get_model_config(MODEL)
        assert config["model_transaction_policy"]["decoupled"] is True
        assert client.get_model_config(SYNC)["model_transaction_policy"].get("decoupled", False) is False
        names = {i["name"] for i in client.get_model_metadata(MODEL)["inputs"]}
        assert {"text_input", "input_ids", "max_tokens", "mode", "stream"} <= names
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_each_mode_equals_trimode_generate(served, mode):
    prompt = [1, 5, 6, 7]
    cli = trimode_cli("generate", "--model", str(served.engine_dir), "--mode", mode, "--prompt-ids",
                      ",".join(map(str, prompt)), "--max-new-tokens", "16", "--block-length", str(BLOCK), "--json")
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)["outputs"][0]
    request = {"input_ids": prompt, "max_tokens": 16, "mode": mode, "block_length": BLOCK}

    (grpc_reply,) = grpc_stream(served.server.grpc_url, **request)
    http_reply = http_infer(served.server.http_url, **request)
    (generated,) = http_generate(served.server.http_url, request)
    for reply in (grpc_reply, http_reply):
        assert reply.ids == want["tokens"]
        assert reply.forwards == want["forwards"]
        assert reply.text == want["text"]
        assert reply.finish_reason == want["finish_reason"]
        assert reply.final
    assert _ids(generated["output_ids"]) == want["tokens"] and generated["forwards"] == want["forwards"]
    assert generated["text_output"] == want["text"]


def test_a_cached_prefix_is_reported_and_the_output_unchanged(served):
    """`cached_tokens` (an output and a response parameter): a second request sharing a 40-token prefix reads
    its two full pages, and gets what it gets alone; a priority is accepted."""
    prefix = list(range(20, 60))
    (first,) = grpc_stream(served.server.grpc_url, input_ids=prefix + [3], max_tokens=8, mode="ar")
    replies = grpc_stream(served.server.grpc_url, input_ids=prefix + [4, 5], max_tokens=8, mode="spec",
                          block_length=BLOCK, priority=-1, stream=True)
    final = replies[-1]
    assert first.cached_tokens == 0 and final.cached_tokens == 32
    if final.parameters:  # a Python backend with response parameters (not the 2.51 bundled with pytriton)
        assert final.parameters.get("cached_tokens") == 32 and final.parameters.get("block_length") == BLOCK
    assert sum((r.ids for r in replies), []) == expected(served, prefix + [4, 5], mode="spec",
                                                         max_new_tokens=8).tokens


def test_text_input_is_tokenized_like_the_cli(served):
    cli = trimode_cli("generate", "--model", str(served.engine_dir), "--mode", "spec", "--prompt", "hello",
                      "--max-new-tokens", "12", "--block-length", str(BLOCK), "--json")
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)["outputs"][0]
    (reply,) = grpc_stream(served.server.grpc_url, text_input="hello", max_tokens=12, mode="spec",
                           block_length=BLOCK)
    assert reply.ids == want["tokens"] and reply.text == want["text"]


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_stream_concatenates_to_the_full_result(served, mode):
    request = {"input_ids": [1, 9, 3, 4, 2], "max_tokens": 24, "mode": mode, "block_length": BLOCK}
    (whole,) = grpc_stream(served.server.grpc_url, **request)
    parts = grpc_stream(served.server.grpc_url, stream=True, **request)
    assert parts[-1].final and not any(p.final for p in parts[:-1])
    assert sum((p.ids for p in parts), []) == whole.ids
    assert "".join(p.text or "" for p in parts) == whole.text
    assert parts[-1].forwards == whole.forwards and parts[-1].finish_reason == whole.finish_reason
    chunks = [len(p.ids) for p in parts[:-1]]
    assert len(chunks) > 1 and all(chunks)
    if mode == "ar":
        assert set(chunks) == {1}
    if mode == "diffusion":  # each block's settled leading run as soon as it is committed, the seed first
        assert len(chunks) > 24 // BLOCK and chunks[0] == 1

    events = http_generate(served.server.http_url, {**request, "stream": True}, sse=True)
    assert sum((_ids(e["output_ids"]) for e in events), []) == whole.ids
    assert events[-1]["forwards"] == whole.forwards


def test_sixteen_concurrent_clients_get_their_own_results(served):
    modes = ["ar", "diffusion", "spec"]
    jobs = [{"input_ids": [1, 20 + i, 3 * i % 256, 7], "max_tokens": 16, "mode": modes[i % 3],
             "block_length": BLOCK, "stream": i % 2 == 0} for i in range(16)]
    wants = [expected(served, job["input_ids"], mode=job["mode"], max_new_tokens=16) for job in jobs]

    def run(job: dict) -> list[int]:
        replies = grpc_stream(served.server.grpc_url, timeout=120, **job)
        return sum((r.ids for r in replies), [])

    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(run, jobs, timeout=180))
    for job, want, tokens in zip(jobs, wants, got, strict=True):
        assert tokens == want.tokens, job
    assert served.server.is_ready()
    log = served.log.read_text()
    sizes = [int(n) for n in re.findall(r"(\d+) requests in one forward", log)]
    assert max(sizes) > 1, "no two requests ever shared a forward"
    mixes = re.findall(r"requests in one forward \(([^;]*);", log)
    assert any("," in mix for mix in mixes), "requests of different modes never shared a forward"
    (after,) = grpc_stream(served.server.grpc_url, input_ids=[1, 2], max_tokens=4, mode="ar")
    assert after.ids == expected(served, [1, 2], mode="ar", max_new_tokens=4).tokens


BAD_REQUESTS = [
    ("unknown mode", {"input_ids": [1, 2], "mode": "beam"}, "unknown mode 'beam'"),
    ("missing prompt", {"max_tokens": 4}, "missing input: give text_input"),
    ("both prompts", {"input_ids": [1, 2], "text_input": "hi"}, "not both"),
    ("int64 ids", {"input_ids": np.array([1, 2], dtype=np.int64)}, "INT32"),
    ("2-D ids", {"input_ids": np.array([[1, 2]], dtype=np.int32)}, "input_ids"),
    ("two max_tokens", {"input_ids": [1, 2], "max_tokens": np.array([4, 5], dtype=np.int32)}, "max_tokens"),
    ("float max_tokens", {"input_ids": [1, 2], "max_tokens": np.array([4.0], dtype=np.float32)}, "max_tokens"),
    ("id outside vocab", {"input_ids": [1, 256]}, "outside the vocabulary"),
    ("negative id", {"input_ids": [1, -3]}, "outside the vocabulary"),
    ("prompt too long", {"input_ids": [1] * 4090, "max_tokens": 64, "mode": "ar"}, "maximum sequence length"),
    ("zero max_tokens", {"input_ids": [1, 2], "max_tokens": 0}, "max_tokens must be positive"),
    ("negative max_tokens", {"input_ids": [1, 2], "max_tokens": -5}, "max_tokens must be positive"),
    ("diffusion blocks", {"input_ids": [1, 2], "mode": "diffusion", "max_tokens": 10, "block_length": 4},
     "multiple of block_length"),
    ("threshold", {"input_ids": [1, 2], "threshold": 1.5}, "threshold must be within [0, 1]"),
]


@pytest.mark.parametrize("name,request_values,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_an_error_and_the_server_keeps_serving(served, name, request_values, message):
    with pytest.raises(InferenceServerException, match=re.escape(message)):
        grpc_stream(served.server.grpc_url, **request_values)
    with pytest.raises(InferenceServerException, match=re.escape(message)):
        http_infer(served.server.http_url, **request_values)
    (good,) = grpc_stream(served.server.grpc_url, input_ids=[1, 2, 3], max_tokens=8, mode="spec",
                          block_length=BLOCK)
    assert good.ids == expected(served, [1, 2, 3], mode="spec", max_new_tokens=8).tokens


def test_streaming_on_the_sync_model_is_refused(served):
    with pytest.raises(InferenceServerException, match="needs the decoupled model"):
        http_infer(served.server.http_url, input_ids=[1, 2], stream=True)


def test_http_generate_endpoint_reports_errors(served):
    (reply,) = http_generate(served.server.http_url, {"input_ids": [1, 999], "max_tokens": 4})
    assert reply["http_status"] == 400 and "outside the vocabulary" in reply["error"]


def _long_prompt(served: Served, tokens: int) -> list[int]:
    """A prompt whose greedy AR output does not reach EOS within `tokens` (so only cancelling stops it)."""
    for start in range(2, 40):
        prompt = [1, start, start + 3]
        if expected(served, prompt, mode="ar", max_new_tokens=64).finish_reason != "length":
            continue  # cheap screen first
        if expected(served, prompt, mode="ar", max_new_tokens=tokens).finish_reason == "length":
            return prompt
    pytest.skip("every candidate prompt reaches EOS on this random checkpoint")


def test_cancelling_a_stream_stops_generation(served):
    max_tokens = 2000
    prompt = _long_prompt(served, max_tokens)
    log_before = served.log.read_text().count("request cancelled after")
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    client.async_stream_infer(MODEL, make_inputs(grpcclient, input_ids=prompt, max_tokens=max_tokens, mode="ar",
                                                 stream=True))
    for _ in range(5):
        result, error = replies.get(timeout=30)
        assert error is None and len(result.as_numpy("output_ids")) == 1
    client.stop_stream(cancel_requests=True)
    client.close()

    deadline = time.monotonic() + 30
    stopped_at = None
    while time.monotonic() < deadline and stopped_at is None:
        found = re.findall(r"request cancelled after (\d+) tokens", served.log.read_text())
        if len(found) > log_before:
            stopped_at = int(found[-1])
        time.sleep(0.1)
    assert stopped_at is not None, "the server never noticed the cancellation"
    assert stopped_at < max_tokens
    (after,) = grpc_stream(served.server.grpc_url, input_ids=[1, 2], max_tokens=4, mode="ar", timeout=30)
    assert after.ids == expected(served, [1, 2], mode="ar", max_new_tokens=4).tokens


def start_serve(engine_dir: Path, folder: Path, *options: str) -> tuple[subprocess.Popen, list[str], Path, Path]:
    """`trimode serve ENGINE` on three free ports (http, grpc, metrics) with its stdout and stderr in `folder`,
    returned once tritonserver is ready; if it never gets ready the process is stopped and the test fails."""
    ports = [str(free_port()) for _ in range(3)]
    out, err = folder / "stdout", folder / "stderr"
    with open(out, "w") as out_file, open(err, "w") as err_file:
        process = subprocess.Popen([sys.executable, "-m", "trimode", "serve", str(engine_dir), "--http-port",
                                    ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], *options],
                                   stdout=out_file, stderr=err_file, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and "Ctrl-C" not in out.read_text():
        time.sleep(0.2)
    if "tritonserver ready" not in out.read_text():
        stop_serve(process)
        pytest.fail(f"trimode serve did not get ready (exit {process.poll()}): {err.read_text()}")
    return process, ports, out, err


def stop_serve(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """Stop a still-running `trimode serve` through its own shutdown, and kill its group if that hangs."""
    if process.poll() is None:
        os.kill(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_serve_command_starts_and_stops_on_ctrl_c(served, tmp_path):
    log = tmp_path / "serve.log"
    process, ports, _, err_path = start_serve(served.engine_dir, tmp_path, "--log-file", str(log), "--repo",
                                              str(tmp_path / "repo"))
    try:
        url = f"127.0.0.1:{ports[0]}"
        probe = TritonServer(tmp_path, http_port=int(ports[0]))
        assert probe.is_ready()
        (reply,) = http_generate(url, {"input_ids": [1, 2, 3], "max_tokens": 8, "mode": "ar"})
        assert _ids(reply["output_ids"]) == expected(served, [1, 2, 3], mode="ar", max_new_tokens=8).tokens
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(60) == 0, err_path.read_text()
        assert "tritonserver stopped (status 0)" in err_path.read_text()
        assert not probe.is_ready()
        assert (tmp_path / "repo" / MODEL / "config.pbtxt").is_file()
    finally:  # a failed test: still stop the server through trimode, then kill
        stop_serve(process, signal.SIGINT, 30)
