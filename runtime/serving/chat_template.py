"""Chat templates: a checkpoint's `chat_template`, rendered the way transformers' `apply_chat_template` does.

The template comes from `tokenizer_config.json` (a string, or a list of named templates of which "default" is
used) or from a `chat_template.jinja` file beside it. Rendering uses jinja2's immutable sandbox with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII, the
`raise_exception` and `strftime_now` globals, and as variables `messages`, `add_generation_prompt`, `tools`,
`documents`, the special tokens of the config (`bos_token`, `eos_token`, ...) and extra keywords such as
`enable_thinking`: the same inputs transformers gives a template, so one template renders the same text in
both (tested against transformers).

Tools: `tools` is the list of OpenAI tool objects (`{"type": "function", "function": {...}}`), passed to the
template as transformers passes them, and assistant messages carry `tool_calls` (arguments as objects) and
tool messages `tool_call_id`, for the template to render. A template that never mentions `tools` cannot: then
the tools are written as a default system block (`DEFAULT_TOOLS_PROMPT`: the functions as JSON lines between
`<tools>` tags and the instruction to answer with `<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
the Hermes/Qwen format openai/tools.py parses), appended to the first system message or sent as a new one
before the others; assistant tool calls become `<tool_call>` blocks in the assistant's content and each run of
tool messages one user message of `<tool_response>` blocks. Without tools the messages go to the template as
they are (a template that knows no tool role refuses them).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
END_THINK = "</think>"

DEFAULT_TOOLS_PROMPT = (
    "# Tools\n\n"
    "You can call functions to help with the request. Their signatures, one JSON object per line, are between "
    "<tools> and </tools>:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and its arguments between <tool_call> and "
    "</tool_call>, one block per call:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n</tool_call>")


class ChatTemplateError(ValueError):
    """The template cannot render these messages (raise_exception in the template, or a template error)."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # a serialized AddedToken
        return value["content"]
    return None


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


@lru_cache(maxsize=16)
def _variables(source: str) -> frozenset[str]:
    """The variables a template reads from its context."""
    import jinja2
    from jinja2 import meta
    from jinja2.ext import loopcontrols

    return frozenset(meta.find_undeclared_variables(jinja2.Environment(extensions=[loopcontrols]).parse(source)))


def default_tool_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The messages with the tools and tool turns written as text, for a template without tools support (see
    the module docstring)."""
    out: list[dict] = []
    responses = False  # the last message of out is the user message of a run of tool messages
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if responses:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            responses = True
            continue
        responses = False
        item = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        if message.get("tool_calls"):
            blocks = []
            for call in message["tool_calls"]:
                function = call.get("function", call)
                text = json.dumps({"name": function.get("name"), "arguments": function.get("arguments")},
                                  ensure_ascii=False)
                blocks.append(f"<tool_call>\n{text}\n</tool_call>")
            content = item.get("content") or ""
            item["content"] = (content + "\n" if content else "") + "\n".join(blocks)
        out.append(item)
    if tools:
        lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        block = DEFAULT_TOOLS_PROMPT.format(tools=lines)
        if out and out[0].get("role") in ("system", "developer"):
            content = out[0].get("content") or ""
            out[0] = {**out[0], "content": (content + "\n\n" if content else "") + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


class ChatTemplate:
    """One model's chat template and special tokens."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        _compile(source)  # refuse a broken template at load time, not at the first request
        self.supports_tools = "tools" in _variables(source)

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate | None:
        """The template of a checkpoint or engine directory, or None when it has none."""
        directory = Path(directory)
        config: dict = {}
        config_path = directory / TOKENIZER_CONFIG
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ChatTemplateError(f"{config_path}: not readable JSON ({exc})") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if (directory / TEMPLATE_FILE).is_file():
            source = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
        if not isinstance(source, str) or not source:
            return None
        specials = {key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key))) is not None}
        return cls(source, specials)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **kwargs: Any) -> str:
        """The prompt text for these messages (like `apply_chat_template(..., tokenize=False)`); tools for a
        template that has no tools support: see `default_tool_messages`."""
        variables = {**self.special_tokens, **{k: v for k, v in kwargs.items() if v is not None}}
        if tools and not self.supports_tools:
            messages, tools = default_tool_messages(messages, tools), None
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                tools=tools or None, documents=None, **variables)
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template error, or a Python error inside the template (bad message types)
            raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None


def end_think_token_id(tokenizer: Any) -> int | None:
    """The id of `</think>` when the tokenizer has it as one token, else None."""
    if tokenizer is None:
        return None
    token_id = tokenizer.token_to_id(END_THINK)
    return int(token_id) if token_id is not None else None


def chat_prompt_ids(template: ChatTemplate, tokenizer: Any, messages: list[dict],
                    enable_thinking: bool | None = None, tools: list[dict] | None = None) -> list[int]:
    """The prompt tokens of a conversation: rendered with a generation prompt, then tokenized without adding
    special tokens (the template writes them itself), as transformers' `apply_chat_template(tokenize=True)`."""
    text = template.render(messages, add_generation_prompt=True, tools=tools, enable_thinking=enable_thinking)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)
