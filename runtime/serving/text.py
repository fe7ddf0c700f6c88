"""Tokens -> text as they are committed, with stop strings cut exactly and never streamed past.

`TextAssembler` takes a request's tokens one at a time (the order the engine commits them) and says what text
may be sent now. Two things are held back: a trailing U+FFFD (a UTF-8 character whose bytes are split over
tokens decodes as a replacement character until its last byte arrives), and a tail that is a prefix of a stop
string (it may become one). When a stop string completes, the text is cut right before it, the tokens up to
and including the one that completed it are counted, and the request is done. Which stop wins: the one whose
end comes first in the text (ties: the earlier start), i.e. the first one the engine actually produced.

The finished text without a stop string is `tokenizer.decode(all tokens)`, exactly what `trimode generate`
prints, and the streamed pieces always concatenate to the finished text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LOG = logging.getLogger("trimode.openai")

REPLACEMENT = "\ufffd"
WINDOW = 6  # tokens decoded again in front of the new ones, so that decoders see their context


def load_tokenizer(path: str | Path | None) -> Any:
    """An engine's tokenizer.json as a `tokenizers.Tokenizer` (None when it has none): the one place that
    loads it, for the CLI, the Python API and both servers."""
    if path is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


class TextAssembler:
    """Incremental detokenization and stop strings for one request; see the module docstring."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # decoded text of ids[:self._clean] plus the pending tail
        self._clean = 0  # ids[:clean] decode to self._clean_text with no trailing replacement character
        self._clean_text = ""
        self.sent = 0  # characters of self.text already handed out
        self.stopped_by: str | None = None
        self.tokens_used = 0  # tokens that count towards usage (all of them, or up to the stop)
        self.finished = False
        self._searched = 0  # text[:searched] holds no stop string

    # -- feeding ----------------------------------------------------------------------------------------------

    def _decode_tail(self) -> str:
        """Text of ids[clean:], decoded with a few tokens of context in front and that context removed."""
        start = max(0, self._clean - WINDOW)
        context = self.decode(self.ids[start:self._clean]) if start < self._clean else ""
        both = self.decode(self.ids[start:])
        if both.startswith(context):
            return both[len(context):]
        full = self.decode(self.ids)  # a decoder that rewrites its context: fall back to decoding everything
        return full[len(self._clean_text):] if full.startswith(self._clean_text) else full

    def add(self, token: int) -> str:
        """Feed one token; return the text that may be sent now ("" when nothing new is safe)."""
        if self.finished:
            return ""
        self.ids.append(token)
        self.tokens_used = len(self.ids)
        tail = self._decode_tail()
        old_length = len(self.text)
        self.text = self._clean_text + tail
        if not tail.endswith(REPLACEMENT):
            self._clean, self._clean_text = len(self.ids), self.text
        if self.stop:
            cut = self._find_stop(old_length, self._stable_length())
            if cut is not None:
                self.text = self.text[:cut]
                self.finished = True
                return self._take(len(self.text))
        return self._take(self._safe_length())

    def add_many(self, tokens: Sequence[int]) -> str:
        return "".join(self.add(t) for t in tokens)

    def _stable_length(self) -> int:
        """The text without a trailing run of replacement characters that later bytes may still resolve."""
        stable = len(self.text)
        while stable > len(self._clean_text) and self.text[stable - 1] == REPLACEMENT:
            stable -= 1
        return stable

    def _find_stop(self, old_length: int, end: int) -> int | None:
        """Position to cut at if a stop string ends within text[:end] after what was searched before."""
        begin = max(0, min(old_length, self._searched) - self.longest_stop + 1)
        self._searched = end
        best: tuple[int, int, str] | None = None
        for stop in self.stop:
            at = self.text.find(stop, begin, end)
            if at >= 0:
                key = (at + len(stop), at, stop)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        self.stopped_by = best[2]
        return best[1]

    def _safe_length(self) -> int:
        """How much of the text can be sent without sending a possible stop string or a split character."""
        safe = self._stable_length()
        hold = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, safe), hold, -1):
                if self.text.endswith(stop[:k], 0, safe):
                    hold = k
                    break
        return max(safe - hold, self.sent)

    def _take(self, upto: int) -> str:
        piece = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return piece

    # -- the end ----------------------------------------------------------------------------------------------

    def finish(self, final_tokens: Sequence[int] | None = None) -> str:
        """The request ended: return whatever is still held back. `final_tokens` is the engine's result."""
        if self.stopped_by is None:
            if final_tokens is not None and list(final_tokens) != self.ids:
                # tokens the sink never saw (an engine that does not stream): take them now
                extra = list(final_tokens)[len(self.ids):] if list(final_tokens[:len(self.ids)]) == self.ids \
                    else None
                if extra is None:
                    LOG.warning("streamed tokens differ from the final result; using the final result")
                    self.ids = []
                    self._clean, self._clean_text, self.text = 0, "", ""
                    extra = list(final_tokens)
                piece = self.add_many(extra)
                if self.stopped_by is not None:
                    return piece + self._flush_stop()
                return piece + self._flush()
            return self._flush()
        return self._flush_stop()

    def _flush(self) -> str:
        self.finished = True
        full = self.decode(self.ids)
        if full.startswith(self.text[:self.sent]):
            self.text = full
        else:  # cannot happen with byte-level decoders; keep what was promised
            LOG.warning("decoded text changed behind the stream; keeping the streamed text")
        self.tokens_used = len(self.ids)
        if self.stop:  # the characters held back as possibly split are final now
            cut = self._find_stop(self._searched, len(self.text))
            if cut is not None:
                self.text = self.text[:max(cut, self.sent)]
        return self._take(len(self.text))

    def _flush_stop(self) -> str:
        self.finished = True
        return self._take(len(self.text))

    @property
    def final_text(self) -> str:
        return self.text
