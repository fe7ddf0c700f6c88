"""Log probabilities in OpenAI's shapes, from the engine's `TokenLogprob`s (runtime/modes/sequence.py).

Completions (`logprobs: k`): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one entry per token;
`tokens` are single tokens decoded on their own, `top_logprobs` maps the decoded k most likely tokens to their
logprobs plus the chosen token (so up to k + 1 entries, as OpenAI and vLLM), `text_offset` is the offset of each
token's text in the choice's text (the sum of the decoded lengths before it). With `echo`, the prompt's tokens
come first, the first one with a null logprob and null top_logprobs (nothing predicts it).

Chat (`logprobs: true, top_logprobs: k`): `{"content": [{"token", "logprob", "bytes", "top_logprobs": [k of
{"token", "logprob", "bytes"}]}]}`; `bytes` are the token's own UTF-8 bytes (a byte-level token that holds part
of a character has its real bytes, while its `token` text shows U+FFFD).

The numbers are log_softmax of the raw model logits (vLLM's default), the same in every mode; -inf (a token the
model rules out entirely) is written as -9999.0, as vLLM does, since JSON has no infinity.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

FLOOR = -9999.0


def _value(logprob: float) -> float:
    value = float(logprob)
    return FLOOR if math.isnan(value) or value < FLOOR else value


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenStrings:
    """The text and the bytes of single tokens, cached (a server asks for the same ones over and over)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._byte_level = False
        self._added: set[int] = set()
        if tokenizer is not None:
            decoder = getattr(tokenizer, "decoder", None)
            self._byte_level = type(decoder).__name__ == "ByteLevel"
            try:
                self._added = set(tokenizer.get_added_tokens_decoder())
            except AttributeError:
                self._added = set()
        self._table = _byte_decoder() if self._byte_level else {}

    def text(self, token: int) -> str:
        cached = self._text.get(token)
        if cached is None:
            if self.tokenizer is None:
                cached = f"token_id:{token}"
            else:
                cached = self.tokenizer.decode([int(token)], skip_special_tokens=False)
            with self._lock:
                self._text[token] = cached
        return cached

    def bytes(self, token: int) -> list[int]:
        cached = self._bytes.get(token)
        if cached is None:
            cached = None
            if self._byte_level and token not in self._added:
                piece = self.tokenizer.id_to_token(int(token))
                if piece is not None and all(ch in self._table for ch in piece):
                    cached = [self._table[ch] for ch in piece]
            if cached is None:
                cached = list(self.text(token).encode("utf-8", errors="replace"))
            with self._lock:
                self._bytes[token] = cached
        return cached


class CompletionLogprobs:
    """Builds completions' logprobs objects for one choice, chunk by chunk (offsets continue across chunks)."""

    def __init__(self, strings: TokenStrings, top: int) -> None:
        self.strings = strings
        self.top = top
        self.offset = 0

    def build(self, entries: Sequence[Any], tokens: Sequence[int] | None = None) -> dict:
        """`entries`: TokenLogprob, or None for a token nothing predicts (the prompt's first), whose id is then
        `tokens[i]`."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, entry in enumerate(entries):
            token = entry.token if entry is not None else int(tokens[i])  # type: ignore[index]
            text = self.strings.text(token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_value(entry.logprob))
            top: dict[str, float] = {}
            for candidate, logprob in entry.top[: self.top]:
                top.setdefault(self.strings.text(candidate), _value(logprob))
            top.setdefault(text, _value(entry.logprob))  # the chosen token always (OpenAI: up to k + 1)
            out["top_logprobs"].append(top)
        return out


def join_completion(parts: Sequence[dict | None]) -> dict | None:
    """Several completions logprobs objects of one choice as one (what a stream's chunks add up to)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    return {key: [v for p in present for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                    "text_offset")}


def chat_content(strings: TokenStrings, entries: Sequence[Any], top: int) -> list[dict]:
    """Chat's `logprobs.content` entries for these tokens."""
    content = []
    for entry in entries:
        content.append({"token": strings.text(entry.token), "logprob": _value(entry.logprob),
                        "bytes": strings.bytes(entry.token),
                        "top_logprobs": [{"token": strings.text(t), "logprob": _value(lp), "bytes": strings.bytes(t)}
                                         for t, lp in entry.top[:top]]})
    return content
