"""Tool calling on the chat endpoint (openai/tools.py), driven with the official `openai` client.

The demo model cannot call tools, so the server runs over a stand-in: `SpellingEngine` writes a chosen text
after any prompt (the script is picked by a key in the user's message) with the demo tokenizer, through the
real scheduler, modes, text assembly and grammar masks. `auto` is tested by scripts that spell tool calls in
the Hermes format; `required` and a named function by scripts that spell prose the grammar must overrule.
The server is the real FastAPI app on uvicorn in a thread on 127.0.0.1. The parser's unit tests (every way of
cutting a text into pieces gives the same answer) and the template tests need no server.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from trimode.demo import DEMO_MODEL_DIR
from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL
from trimode.runtime.backends.limits import EngineLimits
from trimode.runtime.cache.pool import KVCache
from trimode.runtime.serving.chat_template import DEFAULT_TOOLS_PROMPT, ChatTemplate
from trimode.runtime.serving.openai.tools import (
    HERMES,
    NEMOTRON,
    RequiredParser,
    TaggedParser,
    call_schema,
    format_for_template,
)

openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
jsonschema = pytest.importorskip("jsonschema")

HOST = "127.0.0.1"
MODEL = "stand-in"
EOS = 11
MASK = 100

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "London"]},
                          "unit": {"type": "string", "enum": ["c", "f"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}

SCRIPTS = {  # key in the user message -> what the stand-in writes
    "one-call": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
                '\n</tool_call>',
    "two-calls": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London", "unit": "f"}}\n</tool_call>\n'
                 '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
    "no-call": "It is sunny in Paris, no tool needed.",
    "prose": "I would rather talk about the weather than call anything.",
    "two-json": '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]',
}

# A tool-aware template of our own (ChatML with Hermes-style tool blocks): tools, tool_calls, tool results.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "Functions:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{%- if message['role'] == 'tool' %}<|im_start|>user\n"
    "<tool_response id=\"{{ message['tool_call_id'] }}\">{{ message['content'] }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{%- if message['tool_calls'] is defined %}{% for call in message['tool_calls'] %}"
    "<tool_call>{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": "
    "{{ call['function']['arguments'] | tojson }}}</tool_call>{% endfor %}{% endif %}<|im_end|>\n"
    "{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# -- the stand-in model ---------------------------------------------------------------------------------------

class SpellingConfig:
    vocab_size = 4096
    mask_token_id = MASK
    eos_token_id = EOS
    block_size = 4
    num_hidden_layers = 1


class SpellingEngine:
    """After any prompt the causal model predicts `script` token by token, then EOS; the script is the one
    whose key the prompt contains. Draft (bidirectional) slots predict the same tokens, so spec accepts them.
    Every other token has logit 0, so under a grammar mask the lowest allowed id wins where the script's token
    is not allowed. A sequence is known by its first page; `prompts` records every prompt it was given."""

    has_lora = False
    device = torch.device("cpu")

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer_path = model_dir / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        self.config = SpellingConfig()
        self.limits = EngineLimits(8, 4096, page_size=16, kv_pages=4096)
        self.cache = KVCache(1, 4096, 16, 1, 2, torch.float32, prefix_caching=False)
        self.scripts = {key: self.tokenizer.encode(text, add_special_tokens=False).ids
                        for key, text in SCRIPTS.items()}
        self.sequences: dict[int, tuple[int, list[int]]] = {}  # first page -> (prompt length, script)
        self.prompts: list[list[int]] = []

    @property
    def max_batch_size(self) -> int:
        return self.limits.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.limits.max_seq_len

    def _script_for(self, prompt: list[int]) -> list[int]:
        text = self.tokenizer.decode(prompt)
        keys = [key for key in SCRIPTS if f"[{key}]" in text]
        return self.scripts[keys[-1]] if keys else []

    def step(self, cache: KVCache, batch) -> torch.Tensor:
        picks: list[int] = []
        for row, past, table in zip(batch.rows, batch.cache_lens, batch.tables, strict=True):
            if row.mask_kind == CAUSAL and row.write and past == 0:
                assert row.logit_offsets, "a prompt came in chunks (the stand-in expects it whole)"
                self.sequences[table[0]] = (len(row.tokens), self._script_for(list(row.tokens)))
                self.prompts.append(list(row.tokens))
            prompt_len, script = self.sequences[table[0]]
            for offset in row.logit_offsets:
                if row.mask_kind == CAUSAL:
                    generated = past + offset + 1 - prompt_len
                else:
                    assert row.mask_kind == BIDIRECTIONAL, row.mask_kind
                    generated = past + offset - prompt_len
                picks.append(script[generated] if 0 <= generated < len(script) else EOS)
        logits = torch.zeros(len(picks), self.config.vocab_size)
        logits[torch.arange(len(picks)), torch.tensor(picks, dtype=torch.long)] = 10.0
        return logits


def model_dir(root: Path, template: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO_MODEL_DIR / "tokenizer.json", root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": template}))
    return root


class ThreadServer:
    """The OpenAI server over a stand-in engine, on uvicorn in a thread."""

    def __init__(self, engine) -> None:
        import uvicorn

        from trimode.runtime.serving.frontend import Frontend
        from trimode.runtime.serving.openai.server import OpenAIServer

        self.engine = engine
        self.app = OpenAIServer(Frontend(engine, default_mode="ar", default_max_tokens=96), MODEL)
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.port = sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app.app, host=HOST, port=self.port, log_level="warning",
                                                     lifespan="on"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ThreadServer(SpellingEngine(model_dir(tmp_path_factory.mktemp("tools") / "model", TOOL_TEMPLATE)))
    yield srv
    srv.stop()


def ask(key: str) -> list[dict]:
    return [{"role": "user", "content": f"What should I wear? [{key}]"}]


def joined_stream(client, **kw) -> dict:
    """A streamed chat answer put back together the way clients do, checking OpenAI's delta shapes."""
    content, calls, reason, roles = "", {}, None, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            delta = choice.delta
            if delta.role:
                roles.append(delta.role)
            content += delta.content or ""
            for call in delta.tool_calls or ():
                if call.index not in calls:  # the first delta of a call: id, type and name, once
                    assert call.id and call.id.startswith("call_") and call.type == "function", call
                    assert call.function.name, call
                    calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
                else:
                    assert call.id is None and call.function.name is None, "id and name are sent once"
                calls[call.index]["arguments"] += call.function.arguments or ""
            reason = choice.finish_reason or reason
    assert roles == ["assistant"]
    assert sorted(calls) == list(range(len(calls)))
    return {"content": content, "calls": [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)],
            "finish_reason": reason}


def plain(answer) -> dict:
    message = answer.choices[0].message
    return {"content": message.content or "",
            "calls": [(c.function.name, c.function.arguments) for c in message.tool_calls or ()],
            "finish_reason": answer.choices[0].finish_reason}


def check_calls(message) -> None:
    """Each call names one of the tools and its arguments parse and follow that function's schema."""
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)


# -- auto ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_auto_parses_a_tool_call_from_the_output(server: ThreadServer, mode: str) -> None:
    client = server.client()
    body = dict(model=MODEL, messages=ask("one-call"), tools=TOOLS, max_tokens=96, extra_body={"mode": mode})
    answer = client.chat.completions.create(**body)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    check_calls(message)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "c"})]
    assert joined_stream(client, **body) == plain(answer)


def test_auto_parallel_calls_and_parallel_tool_calls_false(server: ThreadServer) -> None:
    client = server.client()
    body = dict(model=MODEL, messages=ask("two-calls"), tools=TOOLS, tool_choice="auto", max_tokens=96)
    answer = client.chat.completions.create(**body)
    assert plain(answer) == {"content": "", "finish_reason": "tool_calls",
                             "calls": [("get_weather", '{"city": "London", "unit": "f"}'),
                                       ("get_time", '{"zone": "UTC"}')]}
    assert answer.choices[0].message.content is None
    check_calls(answer.choices[0].message)
    assert joined_stream(client, **body) == plain(answer)
    single = client.chat.completions.create(**body, parallel_tool_calls=False)
    assert plain(single)["calls"] == [("get_weather", '{"city": "London", "unit": "f"}')]
    assert joined_stream(client, **body, parallel_tool_calls=False) == plain(single)


def test_auto_without_a_call_and_tool_choice_none(server: ThreadServer) -> None:
    client = server.client()
    answer = client.chat.completions.create(model=MODEL, messages=ask("no-call"), tools=TOOLS, max_tokens=96)
    assert plain(answer) == {"content": SCRIPTS["no-call"], "calls": [], "finish_reason": "stop"}
    assert answer.choices[0].message.tool_calls is None
    # none: the tools are in the prompt, the output is not parsed
    body = dict(model=MODEL, messages=ask("one-call"), tools=TOOLS, tool_choice="none", max_tokens=96)
    none = client.chat.completions.create(**body)
    assert plain(none) == {"content": SCRIPTS["one-call"], "calls": [], "finish_reason": "stop"}
    assert joined_stream(client, **body) == plain(none)
    assert "get_weather" in server.engine.tokenizer.decode(server.engine.prompts[-1])


def test_a_length_cut_call_keeps_finish_reason_length(server: ThreadServer) -> None:
    client = server.client()
    body = dict(model=MODEL, messages=ask("one-call"), tools=TOOLS, max_tokens=14)
    answer = client.chat.completions.create(**body)
    got = plain(answer)
    assert got["finish_reason"] == "length"
    assert joined_stream(client, **body) == got


# -- required and named (structured output) ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_named_tool_choice_returns_a_valid_call(server: ThreadServer, mode: str) -> None:
    client = server.client()
    body = dict(model=MODEL, messages=ask("prose"), tools=TOOLS, max_tokens=64, extra_body={"mode": mode},
                tool_choice={"type": "function", "function": {"name": "get_time"}})
    answer = client.chat.completions.create(**body)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [c.function.name for c in message.tool_calls] == ["get_time"]
    check_calls(message)
    assert joined_stream(client, **body) == plain(answer)


def test_required_returns_valid_calls(server: ThreadServer) -> None:
    client = server.client()
    body = dict(model=MODEL, messages=ask("prose"), tools=TOOLS, tool_choice="required", max_tokens=64,
                parallel_tool_calls=False)
    answer = client.chat.completions.create(**body)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.content is None
    assert len(message.tool_calls) == 1
    check_calls(message)
    assert joined_stream(client, **body) == plain(answer)
    # where the model writes the calls itself the grammar lets it, several of them
    body = dict(model=MODEL, messages=ask("two-json"), tools=TOOLS, tool_choice="required", max_tokens=64)
    answer = client.chat.completions.create(**body)
    assert plain(answer)["calls"] == [("get_weather", '{"city": "Paris", "unit": "c"}'),
                                      ("get_time", '{"zone": "CET"}')]
    check_calls(answer.choices[0].message)
    assert joined_stream(client, **body) == plain(answer)


# -- the prompt ---------------------------------------------------------------------------------------------------

def test_the_template_renders_tools_calls_and_results(server: ThreadServer) -> None:
    """The prompt the engine gets is the template's rendering with `tools` and the tool turns, arguments
    parsed into objects (as vLLM gives templates)."""
    client = server.client()
    history = [{"role": "system", "content": "Be brief."}, *ask("no-call"),
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8)
    prompt = server.engine.tokenizer.decode(server.engine.prompts[-1])
    template = ChatTemplate(TOOL_TEMPLATE)
    rendered_history = [*history[:2], {**history[2], "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "unit": "c"}}}]},
        history[3]]
    expected = template.render(rendered_history, tools=TOOLS)
    assert prompt == server.engine.tokenizer.decode(server.engine.tokenizer.encode(expected,
                                                                                   add_special_tokens=False).ids)
    assert json.dumps(TOOLS[0]) in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>' in prompt
    assert '<tool_response id="call_1">21 degrees</tool_response>' in prompt


def test_tool_template_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = model_dir(tmp_path / "model", TOOL_TEMPLATE)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    messages = [*ask("x"), {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    ours = ChatTemplate.from_dir(directory)
    assert ours.supports_tools
    for tools in (TOOLS, None):
        expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert ours.render(messages, tools=tools) == expected


def test_a_template_without_tools_gets_the_default_block() -> None:
    demo = ChatTemplate.from_dir(DEMO_MODEL_DIR)
    assert demo is not None and not demo.supports_tools
    messages = [{"role": "system", "content": "Be brief."}, *ask("x"),
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
                {"role": "tool", "tool_call_id": "c2", "content": "13:00"}]
    text = demo.render(messages, tools=TOOLS)
    block = DEFAULT_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in TOOLS))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n" + block + "<|im_end|>\n")
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>' \
        "<|im_end|>\n" in text
    assert "<|im_start|>user\n<tool_response>\n12:00\n</tool_response>\n<tool_response>\n13:00\n" \
        "</tool_response><|im_end|>\n<|im_start|>assistant\n" in text
    # without a system message the block is one; without tools nothing is added
    assert demo.render(ask("x"), tools=TOOLS).startswith("<|im_start|>system\n" + block)
    assert demo.render(ask("x"), tools=None) == demo.render(ask("x"))
    assert format_for_template(demo.source) is HERMES
    assert format_for_template("{{ '<TOOLCALL>' }}") is NEMOTRON


def test_the_demo_model_serves_tools_through_the_default_block(tmp_path: Path) -> None:
    """A real checkpoint whose template knows no tools: the prompt is the default block's, the answer plain."""
    from tokenizers import Tokenizer

    from trimode.runtime.backends.engine_loader import open_engine
    from trimode.runtime.serving.chat_template import chat_prompt_ids

    srv = ThreadServer(open_engine(DEMO_MODEL_DIR, device="cpu"))
    try:
        messages = [{"role": "system", "content": "Be brief."}, *ask("x")]
        answer = srv.client().chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=4,
                                                      extra_body={"mode": "ar"})
        tokenizer = Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))
        expected = chat_prompt_ids(ChatTemplate.from_dir(DEMO_MODEL_DIR), tokenizer, messages, tools=TOOLS)
        assert "<tools>" in tokenizer.decode(expected)
        assert answer.usage.prompt_tokens == len(expected)
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        srv.stop()


# -- bad requests ---------------------------------------------------------------------------------------------------

def bad_tool_requests() -> list[tuple[str, dict, str | None]]:
    good = {"model": MODEL, "messages": ask("no-call"), "max_tokens": 4}
    function = TOOLS[0]["function"]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    return [
        ("tools not a list", {**good, "tools": TOOLS[0]}, "tools"),
        ("tools empty", {**good, "tools": []}, "tools"),
        ("tool without function", {**good, "tools": [{"type": "function"}]}, "tools"),
        ("tool of another type", {**good, "tools": [{"type": "retrieval", "function": function}]}, "tools"),
        ("unknown field in a function", {**good, "tools": [{"type": "function",
                                                            "function": {**function, "color": "red"}}]}, "tools"),
        ("function name with a space", {**good, "tools": [{"type": "function", "function": {"name": "get weather"}}]},
         "tools"),
        ("function name too long", {**good, "tools": [{"type": "function", "function": {"name": "f" * 65}}]}, "tools"),
        ("function given twice", {**good, "tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ("parameters not an object schema", {**good, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "string"}}}]}, "tools"),
        ("parameters not a JSON schema", {**good, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools"),
        ("parameters a list", {**good, "tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
         "tools"),
        ("tool_choice a word", {**good, "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ("tool_choice an unknown function", {**good, "tools": TOOLS, "tool_choice": {
            "type": "function", "function": {"name": "get_mood"}}}, "tool_choice"),
        ("tool_choice without tools", {**good, "tool_choice": "required"}, "tool_choice"),
        ("parallel_tool_calls without tools", {**good, "parallel_tool_calls": False}, "parallel_tool_calls"),
        ("parallel_tool_calls a string", {**good, "tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ("required in diffusion", {**good, "tools": TOOLS, "tool_choice": "required", "mode": "diffusion"},
         "tool_choice"),
        ("tool message without tool_call_id", {**good, "messages": [
            *ask("x"), {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "1"}]},
         "messages[2].tool_call_id"),
        ("tool message answering nothing", {**good, "messages": [
            *ask("x"), {"role": "tool", "tool_call_id": "call_9", "content": "1"}]}, "messages[1].tool_call_id"),
        ("tool_calls on a user message", {**good, "messages": [{"role": "user", "content": "x",
                                                                "tool_calls": [call]}]}, "messages[0].tool_calls"),
        ("tool_call_id on a user message", {**good, "messages": [{"role": "user", "content": "x",
                                                                  "tool_call_id": "call_1"}]},
         "messages[0].tool_call_id"),
        ("arguments not a string", {**good, "messages": [*ask("x"), {"role": "assistant", "tool_calls": [
            {**call, "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]}]}, None),
        ("a tool call without id", {**good, "messages": [*ask("x"), {"role": "assistant", "tool_calls": [
            {"type": "function", "function": call["function"]}]}]}, None),
    ]


@pytest.mark.parametrize("name,body,param", bad_tool_requests(), ids=[c[0] for c in bad_tool_requests()])
def test_bad_tool_requests_are_400s(server: ThreadServer, name: str, body: dict, param: str | None) -> None:
    response = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, (name, response.text)
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert (error["param"] or "").startswith(param), (name, error)


def test_the_server_serves_after_bad_tool_requests(server: ThreadServer) -> None:
    for _, body, _ in bad_tool_requests()[:5]:
        httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)
    answer = server.client().chat.completions.create(model=MODEL, messages=ask("one-call"), tools=TOOLS,
                                                     max_tokens=96)
    assert answer.choices[0].finish_reason == "tool_calls"


# -- the parser, without a server -----------------------------------------------------------------------------------

PARSER_CASES = [  # (text, content, calls) in the hermes format
    ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": "}]"}]}}\n</tool_call>\n',
     "Let me check.", [("f", '{"a": [1, {"b": "}]"}]}')]),
    ("plain text with <tool and < tags\n  ", "plain text with <tool and < tags\n  ", []),
    ('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>\n<tool_call>{"name": "g"}</tool_call> after',
     "after", [("f", '{"a": 1}'), ("g", "{}")]),
    ('<tool_call>junk <tool_call>{"name":"f","arguments":{}}</tool_call>', "<tool_call>junk", [("f", "{}")]),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("f", '{"a": 1}')]),
    ('x <tool_call>{"foo": 1}</tool_call> y', 'x <tool_call>{"foo": 1}</tool_call> y', []),
    ('x <tool_call>{"name": 5}</tool_call> y <tool_call>{"name": "h", "parameters": {"q": 12}}',
     'x <tool_call>{"name": 5}</tool_call> y', [("h", '{"q": 12}')]),
    ('<tool_call>{"name": "f", "arguments": {"s": "a</tool_call>b', "b", [("f", '{"s": "a')]),
    ('<tool_call>{"name": "f", "arguments": {"a": 1]}</tool_call>z', "z", [("f", '{"a": 1')]),
    ("<tool_call>\n", "<tool_call>\n", []),
]


def parse(factory, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    parser = factory()
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    calls: dict[int, list[str]] = {}
    for event in events:
        if event[0] == "call":
            assert event[1] not in calls and event[1] == len(calls)
            calls[event[1]] = [event[2], ""]
        elif event[0] == "args":
            calls[event[1]][1] += event[2]
    return content, [(name, args) for name, args in calls.values()]


def cuts(text: str, seed: int = 0):
    """The text whole, in two pieces at every place, one character at a time, and in random pieces."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(100):
        points = sorted(rng.sample(range(len(text) + 1), min(len(text), 6)))
        yield [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@pytest.mark.parametrize("case", range(len(PARSER_CASES)))
def test_parser_reads_the_hermes_format_however_the_text_is_cut(case: int) -> None:
    text, content, calls = PARSER_CASES[case]
    for pieces in cuts(text):
        assert parse(lambda: TaggedParser(HERMES), pieces) == (content, calls), pieces


def test_parser_reads_the_nemotron_format_and_required_arrays() -> None:
    text = 'ok <TOOLCALL>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</TOOLCALL>'
    for pieces in cuts(text):
        assert parse(lambda: TaggedParser(NEMOTRON), pieces) == ("ok", [("a", '{"x": 1}'), ("b", "{}")])
    array = SCRIPTS["two-json"]
    for pieces in cuts(array):
        assert parse(RequiredParser, pieces) == ("", [("get_weather", '{"city": "Paris", "unit": "c"}'),
                                                      ("get_time", '{"zone": "CET"}')])
        assert parse(lambda: RequiredParser(parallel=False), pieces)[1] == [
            ("get_weather", '{"city": "Paris", "unit": "c"}')]


def test_the_required_schema_accepts_calls_and_refuses_others() -> None:
    schema = {k: v for k, v in call_schema(TOOLS, parallel=True).items() if k != "x-guidance"}
    jsonschema.validate(json.loads(SCRIPTS["two-json"]), schema)
    for bad in ([], [{"name": "get_mood", "arguments": {}}], [{"name": "get_time", "arguments": {"zone": "X"}}],
                [{"name": "get_time"}], {"name": "get_time", "arguments": {"zone": "UTC"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = {k: v for k, v in call_schema(TOOLS, parallel=False).items() if k != "x-guidance"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(SCRIPTS["two-json"]), single)


def test_the_required_schema_keeps_references_of_nested_parameters() -> None:
    """Parameters with `$defs` (as pydantic writes them) still resolve once nested in the array schema."""
    child = {"anyOf": [{"$ref": "#/$defs/Item"}, {"type": "null"}]}
    item = {"type": "object", "required": ["kind"], "properties": {"kind": {"enum": ["a", "b"]}, "child": child}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
        "$defs": {"Item": item}}}},
        {"type": "function", "function": {"name": "g", "parameters": {
            "type": "object", "properties": {"x": {"$ref": "#/definitions/Item"}}, "required": ["x"],
            "definitions": {"Item": {"type": "string"}}}}}]
    schema = {k: v for k, v in call_schema(tools, parallel=True).items() if k != "x-guidance"}
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate([{"name": "f", "arguments": {"item": {"kind": "a", "child": {"kind": "b"}}}},
                         {"name": "g", "arguments": {"x": "s"}}], schema)
    for bad in ([{"name": "f", "arguments": {"item": {"kind": "a", "child": {"kind": "c"}}}}],
                [{"name": "g", "arguments": {"x": 1}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
