"""The OpenAI API's fields that real clients send (issue 24): logprobs, echo and prompt scoring, penalties and
the other request options, structured-output request fields, continuous usage, /tokenize, /detokenize,
/version, and the hardening (JSON 500s, 400s and 413s in OpenAI's shape, a 5 MB body that does not stall a
small request, non-streamed clients that vanish are cancelled at once).

The server runs in this process (uvicorn on 127.0.0.1 in a thread, with trimode's guarded h11 protocol, as
`trimode serve --api openai` runs it) over a tiny random checkpoint with a tokenizer and a chat template; the
official `openai` client and httpx talk to it. Expected values come from the engine itself in AR mode
(`generate()`), and prompt logprobs from a plain torch forward of the engine's network.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .test_chat_template import thinking_checkpoint

openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
uvicorn = pytest.importorskip("uvicorn")

HOST = "127.0.0.1"
BODY_LIMIT = 6 * 1024 * 1024
EXACT_MODES = ["ar", "spec", "quad"]
BLOCK = 4
TOL = 1e-5


@dataclass
class Live:
    server: object  # OpenAIServer
    port: int
    model: str
    engine: object
    tokenizer: object

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=kw.pop("timeout", 60),
                             **kw)

    def post(self, path: str, body: dict | bytes, timeout: float = 60) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.post(self.base + path, content=body, headers={"content-type": "application/json"},
                              timeout=timeout)
        return httpx.post(self.base + path, json=body, timeout=timeout)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
                    f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return thinking_checkpoint(tmp_path_factory.mktemp("openai_api") / "ckpt")


def start_live(checkpoint: Path, **frontend_kw):
    from trimode.runtime.backends.engine_loader import open_engine
    from trimode.runtime.serving.frontend import Frontend
    from trimode.runtime.serving.http_limits import HttpLimits, guarded_protocol
    from trimode.runtime.serving.openai.metrics import ServerMetrics
    from trimode.runtime.serving.openai.server import OpenAIServer, bind_socket

    engine = open_engine(checkpoint, device="cpu")
    frontend = Frontend(engine, default_mode="ar", metrics=ServerMetrics(), **frontend_kw)
    limits = HttpLimits(max_body_bytes=BODY_LIMIT)
    server = OpenAIServer(frontend, checkpoint.name, shutdown_timeout_s=1.0, http_limits=limits)
    sock = bind_socket(HOST, 0)
    config = uvicorn.Config(server.app, log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=5, http=guarded_protocol(limits))
    userver = uvicorn.Server(config)
    thread = threading.Thread(target=userver.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not userver.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.02)
    live = Live(server, sock.getsockname()[1], checkpoint.name, engine, frontend.tokenizer)

    def stop() -> None:
        userver.should_exit = True
        thread.join(30)
        sock.close()

    return live, stop


@pytest.fixture(scope="module")
def live(checkpoint: Path):
    server, stop = start_live(checkpoint)
    yield server
    stop()


def solo(live: Live, prompt: list[int], **settings):
    from trimode.runtime.generate import generate
    from trimode.runtime.request import GenerationConfig

    return generate(live.engine, [prompt], GenerationConfig(**settings))[0]


def reference_logprobs(live: Live, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the engine's network over `tokens` (causal, no cache, no adapter): row i predicts
    token i + 1."""
    model = live.engine.model
    ids = torch.tensor([tokens], device=model.device)
    positions = torch.arange(len(tokens), device=model.device)[None]
    allowed = torch.ones(len(tokens), len(tokens), dtype=torch.bool, device=model.device).tril()[None]
    with torch.inference_mode():
        logits = model.forward_masked(ids, positions, allowed)
    return torch.log_softmax(logits[0].float(), dim=-1)


PROMPT_IDS = [1, 72, 101, 108, 108, 111, 32, 119, 111, 114]


def mode_extra(mode: str) -> dict:
    return {"mode": mode, "block_length": BLOCK}


def stream_completion(client, **kw) -> tuple[str, dict | None, list]:
    """Streamed text, the chunks' logprobs joined, and the chunks."""
    from trimode.runtime.serving.openai.logprobs import join_completion

    chunks = list(client.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    parts = [c.choices[0].logprobs.model_dump() if c.choices and c.choices[0].logprobs else None for c in chunks]
    return text, join_completion(parts), chunks


# -- logprobs --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ar_completion(live: Live) -> dict:
    reply = live.post("/v1/completions", {"model": live.model, "prompt": PROMPT_IDS, "max_tokens": 12,
                                          "logprobs": 5, **mode_extra("ar")})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]


def test_completion_logprobs_are_the_raw_models_log_softmax(live: Live, ar_completion: dict) -> None:
    result = solo(live, PROMPT_IDS, mode="ar", max_new_tokens=12)
    lp = ar_completion["logprobs"]
    assert len(lp["tokens"]) == len(result.tokens) == 12
    assert lp["tokens"] == [live.tokenizer.decode([t], skip_special_tokens=False) for t in result.tokens]
    table = reference_logprobs(live, PROMPT_IDS + result.tokens)
    for i, token in enumerate(result.tokens):
        row = table[len(PROMPT_IDS) - 1 + i]
        assert lp["token_logprobs"][i] == pytest.approx(row[token].item(), abs=TOL)
        want = {}
        for t in torch.topk(row, 5).indices.tolist():
            want.setdefault(live.tokenizer.decode([t], skip_special_tokens=False), row[t].item())
        want.setdefault(lp["tokens"][i], row[token].item())
        got = lp["top_logprobs"][i]
        assert set(got) == set(want), i
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=TOL)
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_completion_logprobs_of_every_exact_mode_equal_ar_streamed_or_not(live: Live, ar_completion: dict,
                                                                       mode: str) -> None:
    body = dict(model=live.model, prompt=PROMPT_IDS, max_tokens=12, logprobs=5, extra_body=mode_extra(mode))
    client = live.client()
    whole = client.completions.create(**body).choices[0]
    got, want = whole.logprobs.model_dump(), ar_completion["logprobs"]
    assert whole.text == ar_completion["text"]
    assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
    for a, b, ta, tb in zip(got["token_logprobs"], want["token_logprobs"], got["top_logprobs"], want["top_logprobs"],
                            strict=True):
        assert a == pytest.approx(b, abs=TOL)
        assert set(ta) == set(tb)
        assert all(ta[k] == pytest.approx(tb[k], abs=TOL) for k in ta)
    text, joined, chunks = stream_completion(client, **body)
    assert text == whole.text
    assert joined == got  # the chunks' logprobs add up to exactly the whole answer's
    assert sum(1 for c in chunks if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.tokens) >= 2


@pytest.mark.parametrize("mode,extra", [("diffusion", {}), ("infill", {"suffix": " return x"})])
def test_diffusion_and_infill_report_a_logprob_per_token_streamed_or_not(live: Live, mode: str, extra: dict) -> None:
    body = dict(model=live.model, prompt="def f(x):", max_tokens=8, logprobs=3,
                extra_body={**mode_extra(mode), **extra})
    client = live.client()
    whole = client.completions.create(**body).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(v <= 0.0 and math.isfinite(v) for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 4 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    text, joined, _ = stream_completion(client, **body)
    assert text == whole.text and joined == lp.model_dump()


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_chat_logprobs_equal_ar_streamed_or_not(live: Live, mode: str) -> None:
    client = live.client()
    body = dict(model=live.model, messages=[{"role": "user", "content": "hi there"}], max_tokens=10, logprobs=True,
                top_logprobs=3)
    ar = client.chat.completions.create(**body, extra_body=mode_extra("ar")).choices[0]
    got = client.chat.completions.create(**body, extra_body=mode_extra(mode)).choices[0]
    assert got.message.content == ar.message.content
    assert len(got.logprobs.content) == len(ar.logprobs.content) == 10
    for a, b in zip(got.logprobs.content, ar.logprobs.content, strict=True):
        assert a.token == b.token and a.bytes == b.bytes
        assert a.logprob == pytest.approx(b.logprob, abs=TOL)
        assert len(a.top_logprobs) == 3
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
        assert all(x.logprob == pytest.approx(y.logprob, abs=TOL) for x, y in zip(a.top_logprobs, b.top_logprobs,
                                                                                  strict=True))
        assert a.top_logprobs[0].logprob >= a.logprob - TOL  # greedy: the chosen one is the most likely
    # the tokens' bytes are the answer's bytes
    assert bytes(b for entry in got.logprobs.content for b in entry.bytes).decode("utf-8", "replace") == \
        got.message.content
    streamed = []
    text = ""
    for chunk in client.chat.completions.create(**body, stream=True, extra_body=mode_extra(mode)):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                streamed += choice.logprobs.content or []
    assert text == got.message.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in got.logprobs.content]


def test_chat_logprobs_without_top_logprobs_and_refusals(live: Live) -> None:
    body = {"model": live.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    plain = live.post("/v1/chat/completions", body).json()["choices"][0]
    assert plain["logprobs"] is None
    only = live.post("/v1/chat/completions", {**body, "logprobs": True}).json()["choices"][0]
    assert len(only["logprobs"]["content"]) == 3 and all(e["top_logprobs"] == [] for e in only["logprobs"]["content"])
    for extra in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}, {"logprobs": 1}):
        reply = live.post("/v1/chat/completions", {**body, **extra})
        assert reply.status_code == 400, (extra, reply.text)
        assert reply.json()["error"]["param"] in ("top_logprobs", "logprobs")


# -- echo and prompt logprobs (lm-eval's loglikelihood requests) -------------------------------------------------------

@pytest.mark.parametrize("mode", EXACT_MODES)
def test_echo_with_logprobs_scores_the_prompt(live: Live, mode: str) -> None:
    """lm-eval's `local-completions` request: max_tokens=1, logprobs=1, echo=True, temperature 0."""
    text = "The quick brown fox"
    prompt = live.tokenizer.encode(text).ids
    done = live.client().completions.create(model=live.model, prompt=text, max_tokens=1, logprobs=1, echo=True,
                                            temperature=0, extra_body=mode_extra(mode))
    choice = done.choices[0]
    lp = choice.logprobs
    generated = solo(live, prompt, mode="ar", max_new_tokens=1).tokens
    assert choice.text == text + live.tokenizer.decode(generated)
    assert len(lp.tokens) == len(prompt) + 1
    assert lp.tokens[:len(prompt)] == [live.tokenizer.decode([t], skip_special_tokens=False) for t in prompt]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    table = reference_logprobs(live, prompt + generated)
    for i in range(1, len(prompt) + 1):
        token = (prompt + generated)[i]
        assert lp.token_logprobs[i] == pytest.approx(table[i - 1, token].item(), abs=TOL), i
        best = int(table[i - 1].argmax())
        top = lp.top_logprobs[i]
        best_text = live.tokenizer.decode([best], skip_special_tokens=False)
        assert top[best_text] == pytest.approx(table[i - 1, best].item(), abs=TOL)
        assert lp.tokens[i] in top and len(top) <= 2
    assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == 1


def test_max_tokens_zero_with_echo_only_scores(live: Live) -> None:
    prompt = PROMPT_IDS
    reply = live.post("/v1/completions", {"model": live.model, "prompt": prompt, "max_tokens": 0, "echo": True,
                                          "logprobs": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    choice = body["choices"][0]
    assert choice["text"] == live.tokenizer.decode(prompt)
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(prompt)
    table = reference_logprobs(live, prompt)
    want = [None] + [table[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(want[1:], abs=TOL)
    assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])  # k=0: just the prompt's token
    # echo without logprobs: the text only; max_tokens 0 without echo is refused
    plain = live.post("/v1/completions", {"model": live.model, "prompt": prompt, "max_tokens": 0, "echo": True})
    assert plain.status_code == 200 and plain.json()["choices"][0]["logprobs"] is None
    refused = live.post("/v1/completions", {"model": live.model, "prompt": prompt, "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


# -- request options ---------------------------------------------------------------------------------------------------

def completion_tokens(live: Live, mode: str, **fields) -> tuple[list[int], str]:
    body = {"model": live.model, "prompt": PROMPT_IDS, "max_tokens": 24, "logprobs": 0, **mode_extra(mode),
            **fields}
    reply = live.post("/v1/completions", body)
    assert reply.status_code == 200, (fields, reply.text)
    choice = reply.json()["choices"][0]
    return choice["logprobs"]["tokens"], choice["finish_reason"]


OPTIONS = [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 1.0},
    {"repetition_penalty": 1.8},
    {"presence_penalty": -0.5, "frequency_penalty": 0.7, "repetition_penalty": 1.3},
    {"logit_bias": {"72": 8.0, "101": -100}},
]


@pytest.mark.parametrize("fields", OPTIONS, ids=lambda f: ",".join(f))
def test_penalties_and_logit_bias_change_greedy_output_and_every_exact_mode_agrees(live: Live, fields: dict) -> None:
    plain, _ = completion_tokens(live, "ar")
    with_options, _ = completion_tokens(live, "ar", **fields)
    assert with_options != plain, fields
    for mode in ("spec", "quad"):
        assert completion_tokens(live, mode, **fields)[0] == with_options, (mode, fields)


def test_logit_bias_forces_a_token_and_ignore_eos_keeps_going(live: Live) -> None:
    eos = live.engine.config.eos_token_id
    forced = live.tokenizer.token_to_id("A")
    tokens, _ = completion_tokens(live, "ar", logit_bias={str(forced): 100})
    assert tokens == ["A"] * 24
    reply = live.post("/v1/completions", {"model": live.model, "prompt": PROMPT_IDS, "max_tokens": 8,
                                          "logit_bias": {str(eos): 100}})
    assert reply.json()["choices"][0]["finish_reason"] == "stop"
    assert reply.json()["usage"]["completion_tokens"] <= 1
    for mode in EXACT_MODES:
        kept = live.post("/v1/completions", {"model": live.model, "prompt": PROMPT_IDS, "max_tokens": 8,
                                             "logit_bias": {str(eos): 100}, "ignore_eos": True, **mode_extra(mode)})
        assert kept.json()["choices"][0]["finish_reason"] == "length", mode
        assert kept.json()["usage"]["completion_tokens"] == 8


def test_stop_token_ids_and_min_tokens(live: Live) -> None:
    result = solo(live, PROMPT_IDS, mode="ar", max_new_tokens=24)
    position = next(i for i, t in enumerate(result.tokens) if i >= 3 and t not in result.tokens[:i])
    stopper = result.tokens[position]
    for mode in EXACT_MODES:
        body = {"model": live.model, "prompt": PROMPT_IDS, "max_tokens": 24, "stop_token_ids": [stopper],
                **mode_extra(mode)}
        stopped = live.post("/v1/completions", body).json()
        assert stopped["choices"][0]["finish_reason"] == "stop", mode
        assert stopped["usage"]["completion_tokens"] in (position, position + 1), mode
        later = live.post("/v1/completions", {**body, "min_tokens": position + 2}).json()
        assert later["usage"]["completion_tokens"] > position + 1, mode


def test_unset_sampling_fields_are_left_to_the_engine(live: Live, monkeypatch) -> None:
    """A request that does not give temperature, top_p, top_k or repetition_penalty leaves them None (the
    checkpoint's generation_config.json decides); the API's fields reach the Settings by name."""
    from trimode.runtime.serving.openai import server as server_module
    from trimode.runtime.serving.openai.protocol import CompletionRequest, check_completion, parse_body

    request = parse_body(json.dumps({"model": "m", "prompt": "x"}).encode(), CompletionRequest)
    settings = server_module._settings(check_completion(request))
    assert (settings.temperature, settings.top_p, settings.top_k, settings.repetition_penalty) == (None,) * 4
    request = parse_body(json.dumps({
        "model": "m", "prompt": "x", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": -1,
        "presence_penalty": 0.25, "frequency_penalty": -0.5, "repetition_penalty": 1.1, "logit_bias": {"7": -3},
        "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [5, 6], "logprobs": 4, "echo": True}).encode(),
        CompletionRequest)
    settings = server_module._settings(check_completion(request))
    assert (settings.temperature, settings.top_p, settings.top_k) == (0.5, 0.9, 0)
    assert (settings.presence_penalty, settings.frequency_penalty, settings.repetition_penalty) == (0.25, -0.5, 1.1)
    assert settings.logit_bias == {7: -3.0} and settings.min_tokens == 2 and settings.ignore_eos is True
    assert settings.stop_token_ids == (5, 6) and settings.logprobs == 4 and settings.prompt_logprobs == 4


def test_the_checkpoints_generation_config_fills_what_a_request_leaves_out(checkpoint: Path, tmp_path: Path) -> None:
    """generation_config.json's temperature and top_k apply to a request that does not give them (seeded
    sampling equals generate() with them); a request's own value wins; generation_config="none" ignores the
    file (greedy)."""
    import shutil

    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    (copy / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 1.3, "top_k": 7}))
    for setting, sampled in (("auto", True), ("none", False)):
        server, stop = start_live(copy, generation_config=setting)
        try:
            body = {"model": server.model, "prompt": PROMPT_IDS, "max_tokens": 16, "seed": 3}
            got = server.post("/v1/completions", body).json()["choices"][0]["text"]
            greedy = server.tokenizer.decode(solo(server, PROMPT_IDS, mode="ar", max_new_tokens=16).tokens)
            want = server.tokenizer.decode(solo(server, PROMPT_IDS, mode="ar", max_new_tokens=16, temperature=1.3,
                                                top_k=7, seed=3).tokens)
            assert want != greedy
            assert got == (want if sampled else greedy), setting
            explicit = server.post("/v1/completions", {**body, "temperature": 0}).json()["choices"][0]["text"]
            assert explicit == greedy
        finally:
            stop()


# -- structured output: the request side -------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("fields,want", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, ("json_object", "")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     ("json_schema", SCHEMA)),
    ({"guided_json": SCHEMA}, ("json_schema", SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, ("json_schema", SCHEMA)),
    ({"guided_regex": "[ab]+"}, ("regex", "[ab]+")),
    ({"guided_choice": ["yes", "no"]}, ("choice", ["yes", "no"])),
    ({"guided_grammar": "start: \"a\"+"}, ("grammar", "start: \"a\"+")),
    ({"structured_outputs": {"json": SCHEMA}}, ("json_schema", SCHEMA)),
    ({"structured_outputs": {"regex": "x"}}, ("regex", "x")),
    ({"structured_outputs": {"choice": ["a"]}}, ("choice", ["a"])),
    ({"structured_outputs": {"grammar": "start: \"a\""}}, ("grammar", "start: \"a\"")),
    ({"structured_outputs": {"json_object": True}}, ("json_object", "")),
])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_structured_request_fields_map_to_one_constraint(fields: dict, want, endpoint: str) -> None:
    from trimode.runtime.serving.openai.protocol import (
        ChatRequest,
        CompletionRequest,
        check_chat,
        check_completion,
        parse_body,
    )

    if endpoint == "chat":
        raw = {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
        got = check_chat(parse_body(json.dumps(raw).encode(), ChatRequest)).structured
    else:
        got = check_completion(parse_body(json.dumps({"model": "m", "prompt": "x", **fields}).encode(),
                                          CompletionRequest)).structured
    if want is None:
        assert got is None
        return
    kind, spec = got
    assert kind == want[0]
    if kind in ("json_schema", "choice"):
        assert json.loads(spec) == want[1]
    else:
        assert spec == want[1]


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    {"response_format": {"type": "yaml"}},
    {"response_format": {"type": "json_object"}, "guided_regex": "a"},
    {"guided_choice": []},
    {"guided_regex": ""},
    {"guided_json": "{not json"},
    {"guided_json": "[1, 2]"},
    {"structured_outputs": {}},
    {"structured_outputs": {"regex": "a", "choice": ["b"]}},
    {"structured_outputs": {"yaml": "a"}},
])
def test_bad_structured_requests_are_400s(live: Live, fields: dict) -> None:
    reply = live.post("/v1/completions", {"model": live.model, "prompt": "hi", "max_tokens": 4, **fields})
    assert reply.status_code == 400, (fields, reply.text)
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"], error


def test_structured_output_is_refused_in_diffusion_and_infill_by_name(live: Live) -> None:
    for mode, extra in (("diffusion", {"block_length": 4}), ("infill", {"suffix": " end"})):
        reply = live.post("/v1/completions", {"model": live.model, "prompt": "hi", "max_tokens": 8, "mode": mode,
                                              "response_format": {"type": "json_object"}, **extra})
        assert reply.status_code == 400, reply.text
        message = reply.json()["error"]["message"]
        assert all(m in message for m in EXACT_MODES) and reply.json()["error"]["param"] == "response_format"


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_a_guided_choice_answers_one_of_the_choices(live: Live, mode: str) -> None:
    choices = ["apple", "banana pie"]
    reply = live.client().completions.create(model=live.model, prompt="pick one:", max_tokens=16,
                                             extra_body={"guided_choice": choices, **mode_extra(mode)})
    assert reply.choices[0].text in choices
    chat = live.client().chat.completions.create(
        model=live.model, messages=[{"role": "user", "content": "pick"}], max_tokens=16,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": choices}}},
        extra_body=mode_extra(mode))
    assert json.loads(chat.choices[0].message.content) in choices


# -- usage, helpers ----------------------------------------------------------------------------------------------------

def test_continuous_usage_stats_on_every_chunk(live: Live) -> None:
    client = live.client()
    chunks = list(client.completions.create(model=live.model, prompt=PROMPT_IDS, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True},
                                            extra_body=mode_extra("spec")))
    assert all(c.usage is not None for c in chunks)
    with_text = [c for c in chunks if c.choices]
    counts = [c.usage.completion_tokens for c in with_text]
    assert counts == sorted(counts) and counts[-1] == 10 and counts[0] >= 1
    assert all(c.usage.prompt_tokens == len(PROMPT_IDS) for c in chunks)
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # the tokens a chunk's usage counts are the tokens whose text came so far
    text = ""
    for chunk in with_text:
        text += chunk.choices[0].text
        if chunk.choices[0].finish_reason is None:
            produced = solo(live, PROMPT_IDS, mode="ar", max_new_tokens=chunk.usage.completion_tokens).tokens
            assert live.tokenizer.decode(produced).startswith(text)
    # chat, and include_usage alone: usage only at the end (null before), as OpenAI
    chat = list(client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5, stream=True,
                                               stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chat) and chat[0].usage.completion_tokens == 0
    assert chat[-1].usage.completion_tokens == 5
    once = list(client.completions.create(model=live.model, prompt="hi", max_tokens=5, stream=True,
                                          stream_options={"include_usage": True}))
    assert [c.usage is None for c in once] == [True] * (len(once) - 1) + [False]


def test_tokenize_detokenize_and_version(live: Live) -> None:
    text = "def f(x):\n    return x * 2  # ünïcode"
    reply = live.post("/tokenize", {"model": live.model, "prompt": text})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["tokens"] == live.tokenizer.encode(text).ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == live.engine.limits.max_seq_len
    back = live.post("/detokenize", {"model": live.model, "tokens": body["tokens"]})
    assert back.json() == {"prompt": text}
    strs = live.post("/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert strs["token_strs"] == [live.tokenizer.id_to_token(t) for t in body["tokens"]]
    # chat messages: exactly the prompt a chat request runs on
    messages = [{"role": "user", "content": "hi there"}]
    chat = live.post("/tokenize", {"messages": messages}).json()
    usage = live.client().chat.completions.create(model=live.model, messages=messages, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    assert live.server.frontend.encode_chat(messages) == chat["tokens"]
    for bad_path, bad in (("/tokenize", {"prompt": "a", "model": "nope"}), ("/tokenize", {}),
                          ("/tokenize", {"prompt": "a", "messages": messages}), ("/detokenize", {"tokens": [-1]}),
                          ("/detokenize", {"tokens": [10**6]}), ("/detokenize", {"tokens": "abc"})):
        reply = live.post(bad_path, bad)
        assert reply.status_code in (400, 404), (bad, reply.text)
        assert reply.json()["error"]["message"]
    from trimode import __version__

    assert httpx.get(live.base + "/version", timeout=10).json() == {"version": __version__}
    for probe in ("/health", "/metrics"):  # load balancers and benchmark tools probe with HEAD
        assert httpx.head(live.base + probe, timeout=10).status_code == 200, probe


# -- hardening ---------------------------------------------------------------------------------------------------------

def bad_requests(model: str) -> list[tuple[str, str, dict | bytes, str | None]]:
    good = {"model": model, "prompt": "hi", "max_tokens": 4}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    c, ch = "/v1/completions", "/v1/chat/completions"
    return [
        ("negative token id", c, {**good, "prompt": [-1]}, "prompt"),
        ("token id beyond the vocabulary", c, {**good, "prompt": [1, 10**6]}, "prompt"),
        ("token id beyond int64", c, {**good, "prompt": [2**70]}, "prompt"),
        ("logprobs above 20", c, {**good, "logprobs": 21}, "logprobs"),
        ("logprobs negative", c, {**good, "logprobs": -1}, "logprobs"),
        ("logprobs a bool", c, {**good, "logprobs": True}, "logprobs"),
        ("echo with stream", c, {**good, "echo": True, "stream": True}, "echo"),
        ("presence_penalty above 2", c, {**good, "presence_penalty": 2.5}, "presence_penalty"),
        ("frequency_penalty a string", c, {**good, "frequency_penalty": "1"}, "frequency_penalty"),
        ("repetition_penalty zero", c, {**good, "repetition_penalty": 0}, "repetition_penalty"),
        ("logit_bias key not a token id", c, {**good, "logit_bias": {"abc": 1}}, "logit_bias"),
        ("logit_bias token outside the vocabulary", c, {**good, "logit_bias": {"99999": 1}}, "logit_bias"),
        ("logit_bias value above 100", c, {**good, "logit_bias": {"5": 101}}, "logit_bias"),
        ("min_tokens negative", c, {**good, "min_tokens": -1}, "min_tokens"),
        ("min_tokens beyond max_tokens", c, {**good, "min_tokens": 5}, "min_tokens"),
        ("ignore_eos a string", c, {**good, "ignore_eos": "yes"}, "ignore_eos"),
        ("stop_token_ids outside the vocabulary", c, {**good, "stop_token_ids": [99999]}, "stop_token_ids"),
        ("stop_token_ids negative", c, {**good, "stop_token_ids": [-5]}, "stop_token_ids"),
        ("continuous_usage_stats a string", c, {**good, "stream": True,
                                                "stream_options": {"continuous_usage_stats": "yes"}},
         "stream_options.continuous_usage_stats"),
        ("diffusion length not a multiple", c, {**good, "mode": "diffusion", "max_tokens": 5, "block_length": 4},
         "max_tokens"),
        ("chat top_logprobs above 20", ch, {**chat, "logprobs": True, "top_logprobs": 25}, "top_logprobs"),
        ("chat max_completion_tokens in diffusion", ch, {**chat, "max_tokens": None, "max_completion_tokens": 5,
                                                         "mode": "diffusion", "block_length": 4},
         "max_completion_tokens"),
        ("chat huge message", ch, {**chat, "messages": [{"role": "user", "content": "x" * 200_000}]}, "messages"),
        ("huge prompt", c, {**good, "prompt": "y" * 200_000}, "prompt"),
    ]


def test_bad_inputs_are_400s_in_openais_shape_naming_the_apis_fields(live: Live) -> None:
    client = live.client()
    for name, path, body, param in bad_requests(live.model):
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if v is not None}
        reply = live.post(path, body)
        assert reply.status_code == 400, (name, reply.status_code, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], name
        assert error["param"] == param, (name, error)
        assert "max_new_tokens" not in error["message"], (name, error)
        assert client.completions.create(model=live.model, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_response_format_text_is_plain_generation(live: Live) -> None:
    body = {"model": live.model, "prompt": PROMPT_IDS, "max_tokens": 6}
    plain = live.post("/v1/completions", body).json()["choices"][0]["text"]
    for endpoint, extra in (("/v1/completions", {}),):
        reply = live.post(endpoint, {**body, **extra, "response_format": {"type": "text"}})
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == plain


def test_a_body_over_the_limit_is_a_413_at_once(live: Live) -> None:
    big = b'{"model": "x", "prompt": "' + b"a" * (BODY_LIMIT + 10) + b'"}'
    start = time.monotonic()
    reply = live.post("/v1/completions", big)
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["message"].startswith("request body of")
    assert time.monotonic() - start < 10
    # chunked (no Content-Length): refused as soon as it passes the limit
    def pieces():
        yield b'{"model": "x", "prompt": "'
        for _ in range(BODY_LIMIT // 65536 + 4):
            yield b"a" * 65536
        yield b'"}'
    reply = httpx.post(live.base + "/v1/completions", content=pieces(), timeout=60,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "exceeds the limit" in reply.json()["error"]["message"]
    assert live.client().completions.create(model=live.model, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_unexpected_exceptions_are_json_500s_and_counted(live: Live, monkeypatch) -> None:
    before = live.metric("trimode_server_errors_total", endpoint="/v1/completions")

    def broken(*args, **kw):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(live.server.frontend, "prepare", broken)
    reply = live.post("/v1/completions", {"model": live.model, "prompt": "hi", "max_tokens": 2})
    assert reply.status_code == 500 and reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["type"] == "server_error" and "ZeroDivisionError" in error["message"]
    assert live.metric("trimode_server_errors_total", endpoint="/v1/completions") == before + 1
    monkeypatch.undo()
    # a fault while streaming: an error object, then [DONE]
    monkeypatch.setattr(live.server.strings, "text", broken)
    with httpx.stream("POST", live.base + "/v1/completions", timeout=60,
                      json={"model": live.model, "prompt": "hi", "max_tokens": 4, "stream": True,
                            "logprobs": 1}) as response:
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["type"] == "server_error"
    assert live.metric("trimode_server_errors_total", endpoint="/v1/completions") == before + 2
    monkeypatch.undo()
    assert live.client().completions.create(model=live.model, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def timed_small_request(live: Live) -> float:
    start = time.perf_counter()
    reply = httpx.post(live.base + "/v1/completions", timeout=60,
                       json={"model": live.model, "prompt": [1, 2, 3], "max_tokens": 1})
    assert reply.status_code == 200
    return time.perf_counter() - start


def test_a_5mb_body_is_refused_without_tokenizing_while_small_requests_are_served(live: Live) -> None:
    """A 5 MB prompt (under the body limit, far over the model's length) is refused before anything tokenizes
    it - tokenizing it is what held every other request up (the GIL) - and small requests sent meanwhile are
    served. Counted, not timed: benchmarks/http_hardening.py measures the latencies."""
    frontend = live.server.frontend
    tokenized: list[int] = []
    encode, encode_chat = frontend.encode, frontend.encode_chat

    def counting_encode(text, *args, **kw):
        tokenized.append(len(text))
        return encode(text, *args, **kw)

    def counting_chat(messages, *args, **kw):
        tokenized.append(sum(len(m.get("content") or "") for m in messages))
        return encode_chat(messages, *args, **kw)

    frontend.encode, frontend.encode_chat = counting_encode, counting_chat
    try:
        big = json.dumps({"model": live.model, "prompt": "word " * (1024 * 1024), "max_tokens": 4}).encode()
        assert 5_000_000 < len(big) < BODY_LIMIT
        results: dict = {}
        thread = threading.Thread(target=lambda: results.update(big=live.post("/v1/completions", big)))
        thread.start()
        served = 0
        while thread.is_alive() or served < 3:
            timed_small_request(live)
            served += 1
        thread.join(60)
        assert results["big"].status_code == 400 and results["big"].json()["error"]["param"] == "prompt"
        big_chat = json.dumps({"model": live.model, "max_tokens": 4,
                               "messages": [{"role": "user", "content": "word " * (1024 * 1024)}]}).encode()
        assert live.post("/v1/chat/completions", big_chat).status_code == 400
        assert served >= 3 and not [n for n in tokenized if n > 100_000], tokenized
        assert live.post("/v1/completions", {"model": live.model, "prompt": "word " * 100,
                                             "max_tokens": 1}).status_code == 200
        assert 500 in tokenized  # a text that may fit is tokenized as usual
    finally:
        frontend.encode, frontend.encode_chat = encode, encode_chat


def test_huge_token_id_prompts_and_tokenize_bodies_are_refused_early(live: Live) -> None:
    limit = live.engine.limits.max_seq_len
    for path, body in (("/v1/completions", {"model": live.model, "prompt": [5] * 600_000, "max_tokens": 4}),
                       ("/tokenize", {"prompt": "word " * 1_000_000})):
        raw = json.dumps(body).encode()
        start = time.perf_counter()
        reply = live.post(path, raw)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text
        assert "too long" in reply.json()["error"]["message"] and str(limit) in reply.json()["error"]["message"]
        assert time.perf_counter() - start < 5
    fits = live.post("/v1/completions", {"model": live.model, "prompt": [5] * (limit - 8), "max_tokens": 4})
    assert fits.status_code == 200, fits.text


def test_a_prompt_just_beyond_the_length_is_still_refused_by_the_engine(live: Live) -> None:
    """The early refusal only takes text that certainly cannot fit; the rest is the engine's exact check."""
    limit = live.engine.limits.max_seq_len
    prompt = "ab" * (limit // 2)  # about `limit` tokens with this byte-level tokenizer: over with max_tokens
    reply = live.post("/v1/completions", {"model": live.model, "prompt": prompt, "max_tokens": 8})
    assert reply.status_code == 400
    assert "positions" in reply.json()["error"]["message"]


def raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    conn = socket.create_connection((HOST, port), timeout=30)
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return conn


@pytest.fixture
def narrow(checkpoint: Path):
    """A server with 4 slots, so that vanished clients that kept generating would block everyone."""
    server, stop = start_live(checkpoint, max_batch_size=4)
    yield server
    stop()


def test_vanished_non_streaming_clients_are_cancelled_at_once(narrow: Live) -> None:
    long = 3000
    conns = [raw_request(narrow.port, {"model": narrow.model, "prompt": f"vanish {i}", "max_tokens": long,
                                       "mode": "ar", "ignore_eos": True}) for i in range(16)]
    deadline = time.monotonic() + 30
    while narrow.metric("trimode_requests_total") < 16 or narrow.metric("trimode_requests_running") < 4:
        assert time.monotonic() < deadline, "the long requests never started"
        time.sleep(0.05)
    for conn in conns:
        conn.close()
    closed = time.monotonic()
    while narrow.metric("trimode_requests_finished_total", finish_reason="cancelled") < 16:
        assert time.monotonic() - closed < 30, "vanished clients kept their requests running"
        time.sleep(0.02)
    generated = narrow.metric("trimode_generation_tokens_total")
    assert generated < 16 * long / 4  # counted: they were cancelled long before their 3000 tokens
    done = narrow.client().completions.create(model=narrow.model, prompt="hi", max_tokens=4)
    assert done.usage.completion_tokens == 4
    assert narrow.metric("trimode_generation_tokens_total") == generated + 4  # nothing else ran meanwhile
    assert narrow.metric("trimode_http_requests_total", endpoint="/v1/completions", status="499") == 16


def test_concurrent_logprob_requests_get_their_solo_results(live: Live) -> None:
    cases = [(f"prompt {i}", EXACT_MODES[i % 3]) for i in range(6)]

    def run(case):
        prompt, mode = case
        return live.post("/v1/completions", {"model": live.model, "prompt": prompt, "max_tokens": 8, "logprobs": 2,
                                             **mode_extra(mode)}).json()["choices"][0]["logprobs"]

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(run, cases))
    for (prompt, _), lp in zip(cases, got, strict=True):
        ids = live.tokenizer.encode(prompt).ids
        result = solo(live, ids, mode="ar", max_new_tokens=8)
        table = reference_logprobs(live, ids + result.tokens)
        want = [table[len(ids) - 1 + i, t].item() for i, t in enumerate(result.tokens)]
        assert lp["token_logprobs"] == pytest.approx(want, abs=TOL)
        assert all(math.isfinite(v) for v in lp["token_logprobs"])


# -- the real `trimode serve` process ---------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("option", ["--max-request-bytes", "--max-body-size"])
def test_serve_takes_max_request_bytes_and_generation_config(checkpoint: Path, tmp_path: Path, option: str) -> None:
    from .test_openai_server import start_server, stop_server

    server = start_server(checkpoint, tmp_path / "server.log", option, "1MiB", "--generation-config", "none",
                          "--threads", "1")
    try:
        big = b'{"model": "x", "prompt": "' + b"a" * (1024 * 1024) + b'"}'
        reply = httpx.post(server.base + "/v1/completions", content=big, timeout=60,
                           headers={"content-type": "application/json"})
        assert reply.status_code == 413 and "1048576" in reply.json()["error"]["message"]
        client = server.client()
        done = client.completions.create(model=server.model, prompt="hi", max_tokens=3, logprobs=2, echo=True)
        assert done.choices[0].logprobs.token_logprobs[0] is None and len(done.choices[0].logprobs.tokens) == 5
        assert httpx.get(server.base + "/version", timeout=10).json()["version"]
    finally:
        stop_server(server)
