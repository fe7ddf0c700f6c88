"""`trimode serve --api openai` as a real process, talked to with the official `openai` client.

Expected results come from `trimode generate --json` (one call per mode, a batch of prompts, which equals each
prompt alone) and from `generate()` on the same checkpoint one prompt at a time, so a request that shares the
server's steps with others must still give exactly its solo result. The checkpoint is a tiny random one whose
tokenizer gets `<think>`/`</think>` and a ChatML template, so chat and the thinking budget are served too.
The unit tests of the request checks and the text assembly (no server) are at the end.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .test_chat_template import END_THINK, thinking_checkpoint

openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

HOST = "127.0.0.1"
BLOCK = 8
STARTUP_S = 120.0
PROMPTS = ["hello", "The quick brown fox", "def f(x):"]
MODES = ["ar", "diffusion", "spec", "quad", "infill"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    model: str

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=kw.pop("timeout", 60),
                             **kw)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_server(checkpoint: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "trimode", "serve", str(checkpoint), "--api", "openai", "--host", HOST,
               "--http-port", str(port), "--device", "cpu", "--default-mode", "ar", *extra]
    handle = log.open("w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(process, port, log, checkpoint.name)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with status {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.base + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"the server did not become healthy in {STARTUP_S:.0f}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return thinking_checkpoint(tmp_path_factory.mktemp("openai") / "ckpt")


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(checkpoint, tmp_path_factory.mktemp("logs") / "server.log", "--threads", "1")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def engine(checkpoint: Path):
    from trimode.runtime.backends.engine_loader import open_engine

    return open_engine(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


def mode_args(mode: str) -> list[str]:
    return ["--suffix", " return x"] if mode == "infill" else []


def mode_body(mode: str) -> dict:
    return {"suffix": " return x"} if mode == "infill" else {}


@pytest.fixture(scope="module")
def cli_expected(checkpoint: Path) -> dict[str, list[dict]]:
    """`trimode generate --json` for every prompt, per mode (16 new tokens, block 8, greedy)."""
    out = {}
    for mode in MODES:
        command = [sys.executable, "-m", "trimode", "generate", "--model", str(checkpoint), "--mode", mode,
                   "--max-new-tokens", "16", "--block-length", str(BLOCK), "--device", "cpu", "--json",
                   *mode_args(mode)]
        for prompt in PROMPTS:
            command += ["--prompt", prompt]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        out[mode] = json.loads(done.stdout)["outputs"]
    return out


def solo(engine, tokenizer, prompt: str, **settings) -> tuple[str, list[int], str]:
    """generate() for one prompt alone: text, tokens and finish reason."""
    from trimode.runtime.generate import generate
    from trimode.runtime.request import GenerationConfig

    result = generate(engine, [tokenizer.encode(prompt).ids], GenerationConfig(**settings))[0]
    return tokenizer.decode(result.tokens), result.tokens, result.finish_reason


def stream_completion(client, **kw) -> tuple[str, str | None, int | None]:
    text, reason, usage = "", None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.text
            reason = choice.finish_reason or reason
    return text, reason, usage


# -- parity -------------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_models_and_health(server: Server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    assert httpx.get(server.base + "/health", timeout=10).json() == {"status": "ok"}


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
def test_completions_equal_cli_generate(server: Server, cli_expected: dict, mode: str) -> None:
    client = server.client()
    for prompt, expected in zip(PROMPTS, cli_expected[mode], strict=True):
        body = dict(model=server.model, prompt=prompt, max_tokens=16,
                    extra_body={"mode": mode, "block_length": BLOCK, **mode_body(mode)})
        done = client.completions.create(**body)
        assert done.choices[0].text == expected["text"], (mode, prompt)
        assert done.usage.completion_tokens == len(expected["tokens"])
        assert done.choices[0].finish_reason == ("stop" if expected["finish_reason"] == "eos" else "length")
        text, reason, used = stream_completion(client, **body)
        assert text == expected["text"] and reason == done.choices[0].finish_reason and used == len(expected["tokens"])


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec", "quad"])
def test_chat_equals_cli_generate_chat(server: Server, checkpoint: Path, mode: str) -> None:
    command = [sys.executable, "-m", "trimode", "generate", "--model", str(checkpoint), "--mode", mode, "--chat",
               "--prompt", "hi there", "--max-new-tokens", "16", "--block-length", str(BLOCK), "--device", "cpu",
               "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)["outputs"][0]
    client = server.client()
    body = dict(model=server.model, messages=[{"role": "user", "content": "hi there"}], max_tokens=16,
                extra_body={"mode": mode, "block_length": BLOCK})
    answer = client.chat.completions.create(**body)
    assert answer.choices[0].message.content == expected["text"]
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens == len(expected["tokens"])
    streamed, roles = "", []
    for chunk in client.chat.completions.create(stream=True, **body):
        for choice in chunk.choices:
            streamed += choice.delta.content or ""
            roles += [choice.delta.role] if choice.delta.role else []
    assert streamed == expected["text"] and roles == ["assistant"]


@pytest.mark.integration
def test_sse_wire_format_ends_with_done(server: Server) -> None:
    body = {"model": server.model, "prompt": "hello", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


# -- stop strings, n, sampling ---------------------------------------------------------------------------------------

def pick_stop(text: str) -> str:
    """A printable piece (two characters, else one) from the middle of the text, first found after its start."""
    for size in (2, 1):
        for start in range(len(text) // 3, len(text) - size):
            piece = text[start:start + size]
            if piece.isprintable() and "\ufffd" not in piece and text.find(piece) > 0:
                return piece
    pytest.skip(f"no usable stop string in {text!r}")


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_stop_strings_cut_exactly(server: Server, engine, tokenizer, mode: str) -> None:
    text, tokens, _ = solo(engine, tokenizer, "zzz", mode=mode, max_new_tokens=32, block_length=BLOCK)
    stop = pick_stop(text)
    cut = text.find(stop)
    expected = text[:cut]
    used = next(k for k in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:k]))
    client = server.client()
    body = dict(model=server.model, prompt="zzz", max_tokens=32, stop=[stop, "\x00never"],
                extra_body={"mode": mode, "block_length": BLOCK})
    done = client.completions.create(**body)
    assert done.choices[0].text == expected and stop not in done.choices[0].text
    assert done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == used
    streamed, reason, streamed_used = stream_completion(client, **body)
    assert streamed == expected and reason == "stop" and streamed_used == used
    # chunks never run past the stop string, not even transiently
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **body) if c.choices]
    for k in range(1, len(pieces) + 1):
        assert stop not in "".join(pieces[:k])


@pytest.mark.integration
def test_n_choices_and_seeded_sampling(server: Server, engine, tokenizer) -> None:
    client = server.client()
    greedy = client.completions.create(model=server.model, prompt="hello", max_tokens=12, n=3)
    assert len(greedy.choices) == 3 and len({c.text for c in greedy.choices}) == 1
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert greedy.usage.completion_tokens == 3 * 12
    sampled = client.completions.create(model=server.model, prompt="hello", max_tokens=12, n=2, temperature=1.0,
                                        top_p=0.9, seed=5, extra_body={"top_k": 40})
    for index, choice in enumerate(sampled.choices):
        expected, _, _ = solo(engine, tokenizer, "hello", mode="ar", max_new_tokens=12, temperature=1.0, top_p=0.9,
                              top_k=40, seed=5 + index, block_length=engine.config.block_size)
        assert choice.text == expected


# -- concurrency -----------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_sixteen_concurrent_streams_get_their_solo_results(server: Server, engine, tokenizer) -> None:
    modes = ["ar", "diffusion", "spec", "quad"]
    cases = []
    for i in range(16):
        mode = modes[i % 4]
        settings = dict(mode=mode, max_new_tokens=8 * (1 + i % 3), block_length=BLOCK if i % 2 else 4,
                        temperature=0.0 if i % 4 < 2 else 0.8, seed=i, top_k=0 if i % 3 else 20)
        if mode == "diffusion":
            settings["temperature"] = 0.0
        cases.append((f"prompt number {i}: " + "x" * i, settings))
    expected = [solo(engine, tokenizer, prompt, **settings) for prompt, settings in cases]
    barrier = threading.Barrier(16)

    def run(case):
        prompt, s = case
        client = server.client()
        barrier.wait(30)
        return stream_completion(client, model=server.model, prompt=prompt, max_tokens=s["max_new_tokens"],
                                 temperature=s["temperature"], seed=s["seed"],
                                 extra_body={"mode": s["mode"], "block_length": s["block_length"], "top_k": s["top_k"]})

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, cases, timeout=240))
    for (prompt, settings), (text, reason, used), (want, tokens, finish) in zip(cases, got, expected, strict=True):
        assert text == want, (prompt, settings)
        assert used == len(tokens)
        assert reason == ("stop" if finish == "eos" else "length")


@pytest.mark.integration
def test_hostile_requests_leave_concurrent_requests_their_solo_results(server: Server, engine, tokenizer) -> None:
    """Innocent streams of every mode run while requests that used to fail the step, crash the parser or take
    the machine arrive; every innocent gets exactly its solo output, every hostile one a clear answer."""
    cases = [(f"innocent {i} " + "y" * i, dict(mode=m, max_new_tokens=24, block_length=4, seed=i,
                                                 temperature=0.8 if m == "ar" else 0.0))
             for i, m in enumerate(["ar", "spec", "quad", "diffusion", "ar", "spec"])]
    expected = [solo(engine, tokenizer, prompt, **settings) for prompt, settings in cases]
    tiny = solo(engine, tokenizer, "tiny temperature", mode="spec", max_new_tokens=16, block_length=4)
    barrier = threading.Barrier(len(cases) + 1)

    def innocent(case):
        prompt, s = case
        barrier.wait(30)
        return stream_completion(server.client(), model=server.model, prompt=prompt, max_tokens=s["max_new_tokens"],
                                 temperature=s["temperature"], seed=s["seed"],
                                 extra_body={"mode": s["mode"], "block_length": s["block_length"]})

    with ThreadPoolExecutor(len(cases)) as pool:
        running = [pool.submit(innocent, case) for case in cases]
        barrier.wait(30)
        for temperature in (1e-40, 1e-300):  # once failed the whole step
            reply = server.client().completions.create(model=server.model, prompt="tiny temperature", max_tokens=16,
                                                       temperature=temperature, extra_body={"mode": "spec",
                                                                                            "block_length": 4})
            assert reply.choices[0].text == tiny[0]
        for name, path, body in hostile_requests(server.model):
            kw = {"json": body} if isinstance(body, dict) else {"content": body}
            reply = httpx.post(server.base + path, timeout=60, headers={"content-type": "application/json"}, **kw)
            assert reply.status_code == 400, (name, reply.text)
        got = [future.result(timeout=240) for future in running]
    for (prompt, settings), (text, _, _), (want, _, _) in zip(cases, got, expected, strict=True):
        assert text == want, (prompt, settings)


@pytest.mark.integration
def test_a_body_over_the_size_limit_is_refused_early(server: Server) -> None:
    body = b'{"model": "x", "prompt": "' + b"a" * (17 * 1024 * 1024) + b'"}'
    reply = httpx.post(server.base + "/v1/completions", content=body, timeout=60,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "exceeds the limit" in reply.json()["error"]["message"]


# -- thinking budget -------------------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec", "quad"])
def test_thinking_budget_forces_end_think(server: Server, engine, tokenizer, checkpoint: Path, mode: str) -> None:
    from trimode.runtime.generate import generate
    from trimode.runtime.request import GenerationConfig
    from trimode.runtime.serving.chat_template import ChatTemplate, chat_prompt_ids

    messages = [{"role": "user", "content": "think"}]
    prompt = chat_prompt_ids(ChatTemplate.from_dir(checkpoint), tokenizer, messages)
    config = GenerationConfig(mode=mode, max_new_tokens=16, block_length=BLOCK, max_thinking_tokens=5,
                              end_think_token_id=END_THINK)
    tokens = generate(engine, [prompt], config)[0].tokens
    assert END_THINK in tokens[:5] or tokens[5] == END_THINK  # forced right after the budget
    answer = server.client().chat.completions.create(
        model=server.model, messages=messages, max_tokens=16,
        extra_body={"mode": mode, "block_length": BLOCK, "max_thinking_tokens": 5})
    assert answer.choices[0].message.content == tokenizer.decode(tokens)
    assert "</think>" in answer.choices[0].message.content


# -- bad requests ----------------------------------------------------------------------------------------------------

def bad_requests(model: str) -> list[tuple[str, str, bytes | dict]]:
    good = {"model": model, "prompt": "hi", "max_tokens": 4}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    c, ch = "/v1/completions", "/v1/chat/completions"
    return [
        ("malformed JSON", c, b'{"model": "x", "prompt": '),
        ("invalid UTF-8", c, b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe"}'),
        ("not an object", c, b"[1, 2, 3]"),
        ("missing prompt", c, {"model": model}),
        ("unknown field", c, {**good, "frobnicate": 1}),
        ("max_tokens a string", c, {**good, "max_tokens": "4"}),
        ("negative max_tokens", c, {**good, "max_tokens": -3}),
        ("zero max_tokens", c, {**good, "max_tokens": 0}),
        ("max_tokens a bool", c, {**good, "max_tokens": True}),
        ("unknown mode", c, {**good, "mode": "telepathy"}),
        ("top_p zero", c, {**good, "top_p": 0}),
        ("top_p above one", c, {**good, "top_p": 1.5}),
        ("temperature negative", c, {**good, "temperature": -1}),
        ("temperature a string", c, {**good, "temperature": "hot"}),
        ("top_k negative", c, {**good, "top_k": -7}),
        ("threshold outside [0, 1]", c, {**good, "threshold": 2.0}),
        ("block_length a word", c, {**good, "block_length": "big"}),
        ("diffusion length not a multiple", c, {**good, "mode": "diffusion", "max_tokens": 5, "block_length": 4}),
        ("huge prompt", c, {**good, "prompt": "a" * 20000}),
        ("huge max_tokens", c, {**good, "max_tokens": 10**6}),
        ("token id outside vocabulary", c, {**good, "prompt": [1, 2, 99999]}),
        ("empty prompt", c, {**good, "prompt": ""}),
        ("empty stop string", c, {**good, "stop": [""]}),
        ("stop not strings", c, {**good, "stop": [1, 2]}),
        ("n zero", c, {**good, "n": 0}),
        ("logprobs", c, {**good, "logprobs": 21}),
        ("presence_penalty", c, {**good, "presence_penalty": 2.5}),
        ("suffix outside infill", c, {**good, "mode": "ar", "suffix": "x"}),
        ("seed negative", c, {**good, "seed": -1}),
        ("stream a string", c, {**good, "stream": "yes"}),
        ("chat without messages", ch, {"model": model, "messages": []}),
        ("chat unknown role", ch, {**chat, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("chat content a number", ch, {**chat, "messages": [{"role": "user", "content": 5}]}),
        ("chat tools", ch, {**chat, "tools": [{"type": "function"}]}),  # a function without its name
        ("chat both token limits", ch, {**chat, "max_completion_tokens": 4}),
        ("chat enable_thinking a string", ch, {**chat, "enable_thinking": "yes"}),
        ("chat max_thinking_tokens negative", ch, {**chat, "max_thinking_tokens": -1}),
    ] + hostile_requests(model)


def hostile_requests(model: str) -> list[tuple[str, str, bytes | dict]]:
    """Requests that once hurt the whole server (a 500, or work that stalled everyone): each is a 400 now."""
    good = {"model": model, "prompt": "hi", "max_tokens": 4}
    c, ch = "/v1/completions", "/v1/chat/completions"
    name = model.encode()
    return [
        ("100k levels of nesting", c,
         b'{"model": "' + name + b'", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("lone surrogate in the prompt", c, b'{"model": "' + name + b'", "prompt": "a\\ud800b", "max_tokens": 2}'),
        ("lone surrogate in chat content", ch,
         b'{"model": "' + name + b'", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
        ("lone surrogate in the suffix", c,
         b'{"model": "' + name + b'", "prompt": "a", "suffix": "\\ud800", "mode": "infill", "max_tokens": 2}'),
        ("lone surrogate in the model name", c, b'{"model": "\\ud800", "prompt": "a", "max_tokens": 2}'),
        ("token id beyond int64", c, {**good, "prompt": [1, 2**70]}),
        ("negative token id", c, {**good, "prompt": [-1]}),
        ("a quad row beyond --max-row-tokens", c, {**good, "mode": "quad", "block_length": 64}),
        ("an infill hole beyond --max-row-tokens", c, {**good, "mode": "infill", "suffix": "x", "max_tokens": 2039}),
        ("too many jobs in one request", c, {**good, "prompt": ["a"] * 17, "n": 16}),
    ]


@pytest.mark.integration
def test_bad_requests_get_400_and_server_keeps_serving(server: Server) -> None:
    cases = bad_requests(server.model)
    assert len(cases) >= 20
    client = server.client()
    for name, path, body in cases:
        if isinstance(body, dict):
            response = httpx.post(server.base + path, json=body, timeout=60)
        else:
            response = httpx.post(server.base + path, content=body, headers={"content-type": "application/json"},
                                  timeout=60)
        assert response.status_code == 400, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], name
        done = client.completions.create(model=server.model, prompt="hi", max_tokens=4)
        assert len(done.choices[0].text) > 0 or done.usage.completion_tokens == 4, name
    # the openai client surfaces the error as BadRequestError with the server's message
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=server.model, prompt="hi", max_tokens=4, top_p=7)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    assert server.metric("trimode_http_requests_total", status="400") >= len(cases)


@pytest.mark.integration
def test_metrics_exposes_the_serving_numbers(server: Server) -> None:
    server.client().completions.create(model=server.model, prompt="hello", max_tokens=8, extra_body={"mode": "spec"})
    text = httpx.get(server.base + "/metrics", timeout=10).text
    for name in ("trimode_requests_total", "trimode_prompt_tokens_total", "trimode_generation_tokens_total",
                 "trimode_time_to_first_token_seconds_bucket", "trimode_inter_token_latency_seconds_bucket",
                 "trimode_tokens_per_forward_bucket", "trimode_queue_length", "trimode_requests_running",
                 "trimode_forwards_total"):
        assert name in text, name
    assert re.search(r'trimode_tokens_per_forward_count\{mode="spec"\} [1-9]', text)


@pytest.mark.integration
def test_a_shared_prefix_is_read_from_the_cache_and_reported(server: Server, engine, tokenizer) -> None:
    """usage.prompt_tokens_details.cached_tokens, read by the official client: the second request shares the
    first's long prefix, reads its full pages, and still gets exactly its solo output; the KV metrics move."""
    client = server.client()
    prefix = "def function_number_one(argument):\n    return argument * 2\n" * 6
    first = client.completions.create(model=server.model, prompt=prefix + "# a", max_tokens=8,
                                      extra_body={"mode": "ar"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # nobody sent this prefix before
    second = client.completions.create(model=server.model, prompt=prefix + "# b", max_tokens=8,
                                       extra_body={"mode": "spec", "block_length": BLOCK})
    prompt_ids = tokenizer.encode(prefix + "# b").ids
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 * ((len(tokenizer.encode(prefix).ids) - 16) // 16) and cached < len(prompt_ids)
    text, _, _ = solo(engine, tokenizer, prefix + "# b", mode="spec", max_new_tokens=8, block_length=BLOCK)
    assert second.choices[0].text == text
    streamed = list(client.completions.create(model=server.model, prompt=prefix + "# c", max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}, extra_body={"mode": "ar"}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens >= cached
    metrics = httpx.get(server.base + "/metrics", timeout=10).text
    for name in ("trimode_kv_cache_usage_ratio", "trimode_kv_cache_pages", "trimode_prefix_cache_pages",
                 "trimode_preemptions_total"):
        assert name in metrics, name
    assert server.metric("trimode_prefix_cache_hits_total") >= 2 * cached
    assert server.metric("trimode_prefix_cache_queries_total") > server.metric("trimode_prefix_cache_hits_total")


# -- faults: disconnects and SIGTERM, on a server with one slot ------------------------------------------------------

@pytest.fixture(scope="module")
def one_slot(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(checkpoint, tmp_path_factory.mktemp("logs1") / "server.log", "--max-batch-size", "1",
                       "--shutdown-timeout", "1", "--threads", "1", "--max-queued-jobs", "2", "--header-timeout", "1")
    yield srv
    stop_server(srv)


LONG = 3500


@pytest.mark.integration
def test_disconnect_frees_the_slot(one_slot: Server) -> None:
    body = {"model": one_slot.model, "prompt": "hello", "max_tokens": LONG, "stream": True, "mode": "ar"}
    with httpx.stream("POST", one_slot.base + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(line for line in lines if line)
    # the client is gone; with one slot, the next request runs only once that slot is free
    start = time.monotonic()
    done = one_slot.client(timeout=60).completions.create(model=one_slot.model, prompt="hi", max_tokens=4)
    assert done.usage.completion_tokens == 4
    assert one_slot.metric("trimode_requests_finished_total", finish_reason="cancelled") >= 1
    assert one_slot.metric("trimode_generation_tokens_total") < LONG, "the abandoned request ran to the end"
    assert time.monotonic() - start < 30


@pytest.mark.integration
def test_disconnect_while_waiting_for_a_whole_answer(one_slot: Server) -> None:
    before = one_slot.metric("trimode_requests_finished_total", finish_reason="cancelled")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(one_slot.base + "/v1/completions", timeout=1.0,
                   json={"model": one_slot.model, "prompt": "hello", "max_tokens": LONG, "mode": "ar"})
    deadline = time.monotonic() + 20
    while one_slot.metric("trimode_requests_finished_total", finish_reason="cancelled") <= before:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.2)
    done = one_slot.client(timeout=60).completions.create(model=one_slot.model, prompt="hi", max_tokens=4)
    assert done.usage.completion_tokens == 4


@pytest.mark.integration
def test_a_full_queue_answers_429_and_the_queued_requests_still_finish(one_slot: Server) -> None:
    body = {"model": one_slot.model, "prompt": "hello", "max_tokens": LONG, "stream": True, "mode": "ar"}
    with httpx.stream("POST", one_slot.base + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if line)  # the one slot is taken
        with ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(httpx.post, one_slot.base + "/v1/completions", timeout=120,
                                  json={"model": one_slot.model, "prompt": f"q{i}", "max_tokens": 4})
                      for i in range(2)]
            deadline = time.monotonic() + 30
            while one_slot.metric("trimode_queue_length") < 2:
                assert time.monotonic() < deadline, "the two requests never queued"
                time.sleep(0.05)
            full = httpx.post(one_slot.base + "/v1/completions", timeout=30,
                              json={"model": one_slot.model, "prompt": "one too many", "max_tokens": 4})
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "overloaded"
            response.close()  # the long stream's client leaves: the slot frees, the queue drains
            assert [f.result(timeout=120).status_code for f in queued] == [200, 200]


@pytest.mark.integration
def test_a_connection_that_sends_no_headers_is_closed(one_slot: Server) -> None:
    with socket.create_connection((HOST, one_slot.port), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408")
    assert one_slot.client().completions.create(model=one_slot.model, prompt="hi", max_tokens=2).usage


@pytest.mark.integration
def test_sigterm_finishes_or_cancels_and_exits_zero(one_slot: Server) -> None:
    body = {"model": one_slot.model, "prompt": "hello", "max_tokens": LONG, "stream": True, "mode": "ar"}
    with httpx.stream("POST", one_slot.base + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        events = [next(line for line in lines if line)]
        one_slot.process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        events += [line for line in lines if line]
    # the in-flight stream ends properly: cancelled after --shutdown-timeout (1 s), then [DONE]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])["choices"][0]
    assert last["finish_reason"] == "cancelled"
    assert one_slot.process.wait(30) == 0, one_slot.log_tail()
    assert time.monotonic() - start < 15
    with pytest.raises(httpx.HTTPError):
        httpx.get(one_slot.base + "/health", timeout=2)


# -- unit tests without a server -------------------------------------------------------------------------------------

def test_protocol_refuses_unknown_and_mistyped_fields() -> None:
    from trimode.runtime.serving.openai.protocol import APIError, CompletionRequest, check_completion, parse_body

    with pytest.raises(APIError, match="unrecognized request argument supplied: bogus"):
        parse_body(b'{"model": "m", "prompt": "x", "bogus": 1}', CompletionRequest)
    with pytest.raises(APIError, match="max_tokens"):
        parse_body(b'{"model": "m", "prompt": "x", "max_tokens": 1.5}', CompletionRequest)
    with pytest.raises(APIError, match="not valid JSON"):
        parse_body(b'{"model": ', CompletionRequest)
    request = parse_body(b'{"model": "m", "prompt": [1, 2], "top_k": -1, "stop": "x"}', CompletionRequest)
    sampling = check_completion(request)
    assert sampling.top_k == 0 and sampling.stop == ("x",) and sampling.temperature is None


def test_text_assembler_holds_back_stop_prefixes_and_split_characters() -> None:
    from trimode.runtime.serving.text import TextAssembler

    pieces = ["ab", "c", "\xe2", "\x82", "\xac", "END", "more"]
    as_bytes = [p.encode("latin-1") for p in pieces]

    def decode(ids: list[int]) -> str:
        return b"".join(as_bytes[i] for i in ids).decode("utf-8", errors="replace")

    assembler = TextAssembler(decode, stop=["EN", "c\u20ac!"])
    out = [assembler.add(i) for i in range(len(pieces))]
    assert out[0] == "ab"
    assert out[1] == ""  # "c" may start "c€!"
    assert out[2] == out[3] == ""  # a euro sign split over three tokens
    assert out[4] == ""  # "c€" may still become "c€!"
    assert out[5] == "c\u20ac" and out[6] == ""  # "END" completes "EN": cut before it, nothing after
    assert assembler.finished and assembler.stopped_by == "EN"
    assert "".join(out) + assembler.finish() == "abc\u20ac"
    assert assembler.tokens_used == 6
