"""Structured output: which tokens a request's grammar allows next, for AR, spec and quad alike.

A request's `structured = (kind, spec)` is compiled once per (tokenizer, vocab size, EOS, kind, spec) and cached
(LRU); every request then gets its own `Constraint`, a copy of the compiled grammar's start state that follows
the tokens the request commits. The sampler asks `masks(prefixes)` for the positions it decides: one row per
prefix, the tokens allowed after committed + prefix. A speculative round asks for the verify positions of its
draft, `[[], [d0], [d0, d1], ...]`, so a verify position is masked exactly as AR would mask it once its drafted
prefix is accepted; a prefix the grammar itself forbids gets an all-True row (its draft is rejected at the
first forbidden token anyway, so that row is never used). `masks` walks the prefixes as a trie, consuming each
token once and rolling the parser back afterwards, so the state after it is the committed state again.

Kinds (spec is always a string):
- "json_object": any JSON object (spec ignored; "" is fine);
- "json_schema": spec is the JSON schema itself (OpenAI's `response_format.json_schema.schema`, not the
  wrapper with `name`/`strict`), compiled by llguidance's JSON-schema compiler, which refuses keywords it does
  not implement rather than silently ignoring them;
- "regex": a Rust-`regex`-syntax regular expression the whole output must match;
- "grammar": a context-free grammar in llguidance's Lark dialect (`start: ...`, string literals, `/regex/`
  terminals, `%json {...}` for an embedded JSON schema; https://github.com/guidance-ai/llguidance/blob/main/
  docs/syntax.md) - a GBNF grammar (`root ::= ...`, as llama.cpp and vLLM's xgrammar users write it) is
  converted to Lark first;
- "choice": spec is a JSON list of strings; the output is exactly one of them.
JSON whitespace: at most one space between the tokens of the JSON text (`JSON_WHITESPACE`, outlines' rule),
no newlines: a model cannot loop on whitespace (the failure unbounded whitespace is known for), and a small
model's output stays short. The output is therefore compact or single-spaced JSON, never pretty-printed.

EOS (the engine's `eos_token_id`) is allowed exactly where the grammar may end, and after the grammar ends it
is the only token allowed (`finished()` is then True). Special tokens other than EOS (<unk>, <mask>, reserved
ids) are never allowed - a grammar cannot ask for one - and neither are ids at or beyond the tokenizer's
vocabulary (a model's padded vocab_size): their columns are False. A grammar that needs bytes no token of the
vocabulary spells is refused when no first token exists; if it runs into such a dead end later, that row
allows nothing at all (the caller's -inf row: the request cannot go on).

Engine: llguidance (PyPI `llguidance`, from the guidance-ai project; vLLM's "guidance" structured-output
backend and llama.cpp's optional grammar engine). Chosen over xgrammar because it is one small abi3 wheel with
no dependencies (xgrammar 0.2.9 requires torch, transformers, triton and apache-tvm-ffi), computes masks on
the CPU lazily, with no per-grammar pass over the vocabulary (a JSON schema compiles in 1-3 ms), supports JSON
schema, regex, Lark/GBNF grammars and choices, and rolls back token by token, which spec/quad verification
needs. Its JSON-schema compiler refuses keywords it does not implement (`not`, `if`/`then`, `uniqueItems`,
unknown `format`s) with a message naming them: a RequestError, never a constraint weaker than the schema.

Costs (benchmarks/structured_cost.py --threads 1 on the shared 2-core CPU, medians): on the demo model's
tokenizer (4096 ids) a mask at a new state 35-42 us (about 25-30 us of it llguidance's own), a commit 5 us, a
speculative round of 4 drafts (5 rows) 80-130 us, a cached compile_constraint 29 us, a cold compile 1-5 ms;
on a 131072-id vocabulary a mask 72-78 us and a commit 10-11 us. The first use of a tokenizer costs 12-35 ms
(0.4-0.9 s at 131072 ids; cached per file): warm it with one compile_constraint call at start-up.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import RequestError

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")  # = runtime.request.STRUCTURED_KINDS
JSON_WHITESPACE = r"[\x20]?"  # what may stand between two JSON tokens
COMPILE_CACHE_SIZE = 128
TOKENIZER_CACHE_SIZE = 8
KNOWN_LIMIT = 1024  # masks a constraint keeps for its committed state
MESSAGE_LIMIT = 300  # characters of an llguidance error kept in a RequestError

_lock = threading.Lock()
_tokenizers: OrderedDict[tuple, _Tokenizer] = OrderedDict()
_compiled: OrderedDict[tuple, _Compiled] = OrderedDict()


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - an install without the serve extra
        raise RequestError("structured output needs the llguidance package (pip install 'trimode[serve]')") from exc
    return llguidance


class _Compiled:
    """A compiled grammar: the matcher at its start state (never advanced; copied per request) and its mask."""

    def __init__(self, matcher: Any, tokenizer_vocab: int, vocab_size: int, eos: int, keep: np.ndarray,
                 start_mask: np.ndarray) -> None:
        self.matcher = matcher
        self.keep = keep
        self.tokenizer_vocab = tokenizer_vocab
        self.vocab_size = vocab_size
        self.eos = eos
        self.start_mask = start_mask  # packed bits (little-endian within bytes), read-only
        eos_only = np.zeros_like(start_mask)
        if 0 <= eos < min(vocab_size, tokenizer_vocab):
            eos_only[eos // 8] = 1 << (eos % 8)
        eos_only.setflags(write=False)
        self.eos_only = eos_only


def _tokenizer_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


class _Tokenizer:
    """llguidance's view of a tokenizer.json (its token bytes and special tokens) and the packed mask of the
    ids a grammar may ever allow: every id but the special ones, EOS excepted. (llguidance itself may allow
    the unknown token where the grammar forces bytes that the vocabulary cannot spell.)"""

    def __init__(self, llg: Any, text: str, eos: int) -> None:
        self.ll = llg.LLTokenizer(text, eos_token=eos)
        size = self.ll.vocab_size
        keep = np.array([not self.ll.is_special_token(i) or i == eos for i in range(size)], dtype=bool)
        self.keep = np.packbits(keep, bitorder="little")
        self.keep.setflags(write=False)

    def keep_for(self, mask_bytes: int) -> np.ndarray:
        """`keep` padded to llguidance's mask length (whole 32-bit words, one more than needed at times)."""
        keep = np.zeros(mask_bytes, dtype=np.uint8)
        keep[:len(self.keep)] = self.keep
        keep.setflags(write=False)
        return keep


def _load_tokenizer(path: Path, key: tuple, eos_token_id: int) -> _Tokenizer:
    """The tokenizer of `path` for llguidance, cached per file and EOS."""
    full_key = (*key, eos_token_id)
    with _lock:
        if full_key in _tokenizers:
            _tokenizers.move_to_end(full_key)
            return _tokenizers[full_key]
    llg = _llguidance()
    tokenizer = _Tokenizer(llg, path.read_text(encoding="utf-8"), eos_token_id)
    with _lock:
        _tokenizers[full_key] = tokenizer
        while len(_tokenizers) > TOKENIZER_CACHE_SIZE:
            _tokenizers.popitem(last=False)
    return tokenizer


def _one_line(message: str) -> str:
    """An llguidance error (multi-line, with source frames) as one short line."""
    lines = []
    for line in message.splitlines():
        line = line.strip()
        if not line or set(line) <= {"^", " ", "~"} or re.match(r"^\d+ \|", line):
            continue
        if line.startswith("<state>") or line.startswith("<grammar>"):
            break
        lines.append(line)
    text = " ".join(lines) or "invalid grammar"
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 3] + "..."


def _json_options() -> dict[str, Any]:
    return {"whitespace_flexible": True, "whitespace_pattern": JSON_WHITESPACE}


def _grammar_text(kind: str, spec: str) -> str:
    """The llguidance grammar for (kind, spec); RequestError when the spec is not even well-formed."""
    llg = _llguidance()
    matcher = llg.LLMatcher
    if kind == "json_object":
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=_json_options())
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"json_schema: the schema is not valid JSON ({exc})") from None
        if not isinstance(schema, dict | bool):
            raise RequestError("json_schema: the schema must be a JSON object")
        try:
            return matcher.grammar_from_json_schema(json.dumps(schema), defaults=_json_options())
        except ValueError as exc:
            raise RequestError(f"json_schema: {_one_line(str(exc))}") from None
    if kind == "regex":
        if not isinstance(spec, str) or not spec:
            raise RequestError("regex: the pattern must be a non-empty string")
        return matcher.grammar_from_regex(spec)
    if kind == "grammar":
        if not isinstance(spec, str) or not spec.strip():
            raise RequestError("grammar: the grammar must be a non-empty string")
        try:
            return llg.grammar_from("grammar", spec)
        except ValueError as exc:
            raise RequestError(f"grammar: {_one_line(str(exc))}") from None
    if kind == "choice":
        try:
            choices = json.loads(spec)
        except (TypeError, ValueError):
            choices = None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise RequestError("choice: the spec must be a non-empty JSON list of strings")
        if any(c == "" for c in choices):
            raise RequestError("choice: the choices must be non-empty strings")
        return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in dict.fromkeys(choices)))
    raise RequestError(f"structured output kind must be one of {', '.join(KINDS)}, not {kind!r}")


def _compile(tokenizer: _Tokenizer, vocab_size: int, eos: int, kind: str, spec: str) -> _Compiled:
    llg = _llguidance()
    grammar = _grammar_text(kind, spec)
    matcher = llg.LLMatcher(tokenizer.ll, grammar, log_level=0)
    if matcher.is_error():
        raise RequestError(f"{kind}: {_one_line(matcher.get_error())}")
    start = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    keep = tokenizer.keep_for(len(start))
    start = start & keep
    if matcher.is_error():
        raise RequestError(f"{kind}: {_one_line(matcher.get_error())}")
    if not start.any():
        raise RequestError(f"{kind}: the grammar allows no token of this model's vocabulary at the start")
    start.setflags(write=False)
    return _Compiled(matcher, tokenizer.ll.vocab_size, vocab_size, eos, keep, start)


def compile_constraint(tokenizer_path: str | Path | None, vocab_size: int, eos_token_id: int, kind: str,
                       spec: str) -> Constraint:
    """A fresh `Constraint` for one request; the grammar is compiled once per (tokenizer, vocab_size, EOS,
    kind, spec) and cached. Raises RequestError (one line) for a kind or spec that cannot be compiled."""
    if kind not in KINDS:
        raise RequestError(f"structured output kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not isinstance(spec, str):
        raise RequestError(f"{kind}: the spec must be a string")
    if tokenizer_path is None:
        raise RequestError("structured output needs the engine's tokenizer (this engine has no tokenizer.json)")
    path = Path(tokenizer_path)
    try:
        tok_key = _tokenizer_key(path)
    except OSError as exc:
        raise RequestError(f"structured output: cannot read the tokenizer {path} ({exc.strerror})") from None
    key = (tok_key, int(vocab_size), int(eos_token_id), kind, "" if kind == "json_object" else spec)
    with _lock:
        compiled = _compiled.get(key)
        if compiled is not None:
            _compiled.move_to_end(key)
    if compiled is None:
        tokenizer = _load_tokenizer(path, tok_key, int(eos_token_id))
        compiled = _compile(tokenizer, int(vocab_size), int(eos_token_id), kind, spec)
        with _lock:
            _compiled[key] = compiled
            while len(_compiled) > COMPILE_CACHE_SIZE:
                _compiled.popitem(last=False)
    return Constraint(compiled)


def cache_clear() -> None:
    """Forget every compiled grammar and tokenizer (tests)."""
    with _lock:
        _compiled.clear()
        _tokenizers.clear()


class Constraint:
    """One request's grammar state, following its committed tokens (see the module docstring).

    EOS never reaches llguidance (whose bookkeeping of an EOS consumed at a final state does not roll back
    token for token): the constraint allows it where the parser is accepting, and after it only EOS again."""

    def __init__(self, compiled: _Compiled) -> None:
        self._matcher = compiled.matcher.deep_copy()
        self.vocab_size = compiled.vocab_size
        self.eos = compiled.eos
        self._columns = min(self.vocab_size, compiled.tokenizer_vocab)
        self._eos_only = compiled.eos_only
        self._keep = compiled.keep
        # Packed masks already computed for the committed state, by prefix (None: the grammar rejects it).
        # Kept across commits for the prefixes that extend what was committed; so each is computed once.
        self._known: dict[tuple[int, ...], np.ndarray | None] = {(): compiled.start_mask}
        self.committed = 0  # tokens committed so far
        self.ended = False  # EOS was committed

    # -- state ----------------------------------------------------------------------------------------------

    def commit(self, tokens: list[int]) -> None:
        """Advance over tokens the request emitted, in order. RequestError (state unchanged) when one of them
        is not allowed there - the sampler masked it, so that is a caller bug rather than model output."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        cut = self._grammar_part(tokens) if not self.ended else 0
        done = self._consume(tokens[:cut])
        bad = done if done < cut else None
        if bad is None and cut < len(tokens):
            if not (self.ended or self._matcher.is_accepting()):
                bad = cut
            else:
                bad = next((cut + i for i, t in enumerate(tokens[cut:]) if t != self.eos), None)
        if bad is not None:
            if done:
                self._matcher.rollback(done)
            raise RequestError(f"structured output: token {tokens[bad]} (position {self.committed + bad}) "
                               "is not allowed by the grammar there")
        self.ended = self.ended or cut < len(tokens)
        self.committed += len(tokens)
        n = len(tokens)
        key = tuple(tokens)
        self._known = {k[n:]: v for k, v in self._known.items() if len(k) >= n and k[:n] == key}

    def finished(self) -> bool:
        """The grammar accepts nothing more: only EOS is allowed now (or EOS was committed)."""
        return self.ended or bool(self._matcher.is_stopped())

    # -- masks ----------------------------------------------------------------------------------------------

    def masks(self, prefixes: list[list[int]]) -> torch.Tensor:
        """bool [len(prefixes), vocab_size]: True where the token may follow committed + prefix; an all-True
        row for a prefix the grammar forbids. The state afterwards is the committed state."""
        keys = [tuple(int(t) for t in p) for p in prefixes]
        todo = sorted({k for k in keys if k not in self._known})
        if todo:
            self._compute(todo)
        packed = [self._known[k] for k in keys]
        out = np.zeros((len(keys), self.vocab_size), dtype=np.bool_)
        columns = self._columns
        if packed and all(row is not None for row in packed):
            out[:, :columns] = np.unpackbits(np.stack(packed), axis=1, count=columns, bitorder="little").view(np.bool_)
        else:
            for i, row in enumerate(packed):
                if row is None:
                    out[i] = True
                else:
                    out[i, :columns] = np.unpackbits(row, count=columns, bitorder="little").view(np.bool_)
        if len(self._known) > KNOWN_LIMIT:  # a caller that never commits: keep only this call's prefixes
            self._known = {k: self._known[k] for k in keys}
        return torch.from_numpy(out)

    def _grammar_part(self, tokens: tuple[int, ...] | list[int]) -> int:
        """Where the part that goes to the parser ends: at the first EOS, or at an id outside the tokenizer
        (which the parser must never see; the caller finds it rejected)."""
        for i, t in enumerate(tokens):
            if t == self.eos or not 0 <= t < self._columns:
                return i
        return len(tokens)

    def _consume(self, tokens: tuple[int, ...] | list[int]) -> int:
        return self._matcher.try_consume_tokens(list(tokens)) if tokens else 0

    def _after_eos(self, tokens: tuple[int, ...]) -> np.ndarray | None:
        """The mask after `tokens` (the part from the first EOS on) at an accepting state: EOS only."""
        return self._eos_only if all(t == self.eos for t in tokens) else None

    def _compute(self, keys: list[tuple[int, ...]]) -> None:
        """Masks for the sorted, unknown prefixes: a depth-first walk that consumes each token once."""
        if self.ended:
            for key in keys:
                self._known[key] = self._after_eos(key)
            return
        matcher = self._matcher
        path: list[int] = []  # tokens consumed beyond the committed state; all accepted, no EOS
        try:
            for key in keys:
                common = 0
                limit = min(len(path), len(key))
                while common < limit and path[common] == key[common]:
                    common += 1
                if common < len(path):
                    matcher.rollback(len(path) - common)
                    del path[common:]
                cut = self._grammar_part(key)
                done = self._consume(key[common:cut])
                path.extend(key[common:common + done])
                if common + done < cut:
                    self._known[key] = None
                elif cut < len(key):
                    accepting = matcher.is_accepting() and key[cut] == self.eos
                    self._known[key] = self._after_eos(key[cut:]) if accepting else None
                else:
                    self._known[key] = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8) & self._keep
        finally:
            if path:
                matcher.rollback(len(path))
        if matcher.is_error():  # pragma: no cover - llguidance contract: rejected tokens never enter the state
            raise RequestError(f"structured output: {_one_line(matcher.get_error())}")
