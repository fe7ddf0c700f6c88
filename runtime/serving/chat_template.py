"""Chat templates: a checkpoint's `chat_template`, rendered the way transformers' `apply_chat_template` does.

The template comes from `tokenizer_config.json` (a string, or a list of named templates of which "default" is
used) or from a `chat_template.jinja` file beside it. Rendering uses jinja2's immutable sandbox with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII, the
`raise_exception` and `strftime_now` globals, and as variables `messages`, `add_generation_prompt`, `tools`,
`documents`, the special tokens of the config (`bos_token`, `eos_token`, ...) and extra keywords such as
`enable_thinking`: the same inputs transformers gives a template, so one template renders the same text in
both (tested against transformers).
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


class ChatTemplate:
    """One model's chat template and special tokens."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        _compile(source)  # refuse a broken template at load time, not at the first request

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

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for these messages (like `apply_chat_template(..., tokenize=False)`)."""
        variables = {**self.special_tokens, **{k: v for k, v in kwargs.items() if v is not None}}
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                tools=None, documents=None, **variables)
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
                    enable_thinking: bool | None = None) -> list[int]:
    """The prompt tokens of a conversation: rendered with a generation prompt, then tokenized without adding
    special tokens (the template writes them itself), as transformers' `apply_chat_template(tokenize=True)`."""
    text = template.render(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)
