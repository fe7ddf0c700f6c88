"""A scripted stand-in model for driving the generation loops through chosen situations.

Random weights almost never draft correctly, so acceptance counts, EOS inside a block, confident and
unconfident diffusion slots and the mask-token trap are driven here by a model whose predictions are fixed
per position. The loops under test are the real ones; only the network is replaced. It implements the one
backend method, `step(cache, batch)`, over the real paged `KVCache` and its allocator: instead of K/V it keeps
the TOKEN written at every pool position, read and written through each row's page table exactly as
attention does, so lengths, rollbacks, page tables and the rows' roles are all observable. A sequence is
known by the first page of its table (and numbered in order of first appearance: `RowRecord.slot`).

A row's role is read from its mask kind, write flag and cache length, exactly as the modes map onto rows:

* prefill - causal, writing, at cache length 0 (the sequence's prompt is learned here; a prompt cut into
            chunks continues until the chunk that asks for logits);
* decode  - causal, writing, one token;
* verify  - causal, writing, several tokens (a self-speculation verify or a diffusion re-encode);
* draft   - bidirectional, not writing (a self-speculation draft or a diffusion denoising pass).

The causal model is context-sensitive: at every causal position it predicts `truth[g]` (g = generated
index of the next token) only if everything the sequence holds before it - the tokens at its cached
positions, read through its page table, plus the row's own earlier tokens - equals the prompt
followed by `truth[:g]`; otherwise it predicts `JUNK`. So a stale cache entry after a wrong rollback, a draft
token kept although the verifier rejected it, or a block whose first token was overwritten all show up as
`JUNK` in the output. Bidirectional passes predict per position (see `ScriptedEngine`); at a position that is
not masked in the input - offset 0 always, it is the block's known first token - they predict `JUNK`, since
nothing may use a prediction for a token already known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL
from trimode.runtime.backends.limits import EngineLimits
from trimode.runtime.backends.step import StepBatch
from trimode.runtime.cache.pool import KVCache

VOCAB = 64
MASK = 60
EOS = 61
JUNK = 59  # what the script predicts where it has nothing to say (never part of a truth in the tests)

PREFILL, DECODE, DRAFT, VERIFY = "prefill", "decode", "draft", "verify"


@dataclass
class ScriptedConfig:
    vocab_size: int = VOCAB
    mask_token_id: int = MASK
    eos_token_id: int = EOS
    block_size: int = 8


@dataclass
class RowRecord:
    """One row the engine was given: its role, sequence number (`slot`), cache length before it, tokens, flags."""

    role: str
    slot: int
    past: int
    tokens: list[int]
    lora: bool
    logit_offsets: list[int] = field(default_factory=list)


def scripted_logits(tokens: list[int], probs: list[float | None] | None = None) -> torch.Tensor:
    """Logits [n, V] whose argmax is tokens[i]; with probs[i] = p, softmax gives exactly p to tokens[i] and
    spreads 1 - p evenly over the others (None: a one-hot-like logit of 10, p ~ 0.997)."""
    logits = torch.zeros(len(tokens), VOCAB)
    for i, token in enumerate(tokens):
        p = probs[i] if probs is not None else None
        if p is None:
            logits[i, token] = 10.0
        else:
            if not (1.0 / VOCAB) < p < 1.0:
                raise ValueError(f"a scripted probability must be in (1/V, 1), got {p}")
            logits[i].fill_(math.log((1.0 - p) / (VOCAB - 1)))
            logits[i, token] = math.log(p)
    return logits


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    return scripted_logits(tokens)


class ScriptedEngine:
    """AR truth: after the prompt the causal model continues with `truth` (index = generated position).

    Drafts: in draft pass number n (counted per sequence), masked positions 1..accept[n] of the block are
    drafted correctly and the rest wrongly, so exactly accept[n] drafts are accepted. `draft_mask` makes every
    draft predict the mask token itself (the reference's trap). `denoise` (generated position -> token)
    switches the bidirectional passes to a diffusion script: that token at that position, the truth elsewhere;
    `confidence` (generated position -> probability) gives the bidirectional prediction at that position
    exactly that softmax probability (default: ~0.997).
    """

    def __init__(self, truth: list[int], accept: list[int] | None = None, draft_mask: bool = False,
                 denoise: dict[int, int] | None = None, confidence: dict[int, float] | None = None,
                 has_lora: bool = False, max_batch_size: int = 8, max_seq_len: int = 512, page_size: int = 4,
                 num_pages: int = 1024) -> None:
        self.config = ScriptedConfig()
        self.limits = EngineLimits(max_batch_size=max_batch_size, max_seq_len=max_seq_len, page_size=page_size,
                                   kv_pages=num_pages)
        self.cache = KVCache(1, num_pages, page_size, 1, 2, torch.float32, prefix_caching=False)
        self.store: dict[int, list[int | None]] = {}  # page -> the token written at each of its positions
        self.seq_of_page: dict[int, int] = {}  # a sequence's first page -> its number
        self.sequences = 0
        self.has_lora = has_lora
        self.tokenizer_path = None
        self.device = torch.device("cpu")
        self.truth = truth
        self.accept = accept or []
        self.draft_mask = draft_mask
        self.denoise = denoise or {}
        self.confidence = confidence or {}
        self.prompts: dict[int, list[int]] = {}
        self.prefilling: set[int] = set()  # sequences whose prompt is still arriving in chunks
        self.draft_calls: dict[int, int] = {}
        self.calls: list[str] = []  # the role of every row, in order
        self.steps: list[list[str]] = []  # the roles of the rows of each step
        self.rows: list[RowRecord] = []

    # -- the backend interface ------------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self.limits.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.limits.max_seq_len

    def step(self, cache: KVCache, batch: StepBatch) -> torch.Tensor:
        if cache is not self.cache:
            raise AssertionError("a step on another cache than the engine's")
        self.limits.check_step(batch, cache.num_pages)
        roles = []
        out = []
        for row, past, table in zip(batch.rows, batch.cache_lens, batch.tables, strict=True):
            if row.positions is not None and row.positions != list(range(past, past + len(row.tokens))):
                raise AssertionError(f"row positions {row.positions} are not the cache length onwards ({past})")
            if past == 0 and row.write:  # a new sequence (its first page may be one a finished one used)
                self.seq_of_page[table[0]] = self.sequences
                self.sequences += 1
            seq = self.seq_of_page.get(table[0] if table else -1)
            if seq is None:
                raise AssertionError(f"a row continues at length {past} on pages no prefill wrote")
            role = self._role(row, past, seq)
            roles.append(role)
            self.rows.append(RowRecord(role, seq, past, list(row.tokens), row.lora, list(row.logit_offsets)))
            held = self._read(table, past)
            if role == DRAFT:
                logits = self._draft(seq, past, row.tokens)
            else:
                logits = self._causal(seq, past, held, row.tokens, role, bool(row.logit_offsets))
                self._write(table, past, row.tokens)
            out.append(logits[row.logit_offsets])
        self.calls += roles
        self.steps.append(roles)
        return torch.cat(out).reshape(-1, VOCAB)

    def _read(self, table: list[int], length: int) -> list[int | None]:
        size = self.cache.page_size
        return [self.store.get(table[p // size], [None] * size)[p % size] for p in range(length)]

    def _write(self, table: list[int], start: int, tokens: list[int]) -> None:
        size = self.cache.page_size
        for i, token in enumerate(tokens):
            p = start + i
            self.store.setdefault(table[p // size], [None] * size)[p % size] = token

    # -- helpers for tests ------------------------------------------------------------------------------------
    def rows_of(self, role: str, slot: int | None = None) -> list[RowRecord]:
        return [r for r in self.rows if r.role == role and (slot is None or r.slot == slot)]

    def truth_at(self, generated_index: int) -> int:
        return self.truth[generated_index] if 0 <= generated_index < len(self.truth) else 0

    def accept_for(self, slot: int, draft_pass: int, block_length: int) -> int:
        """How many drafts of this pass are right (override for per-sequence scripts)."""
        return self.accept[draft_pass] if draft_pass < len(self.accept) else block_length - 1

    # -- the script ---------------------------------------------------------------------------------------------
    def _role(self, row, past: int, seq: int) -> str:
        if row.mask_kind == BIDIRECTIONAL and not row.write:
            return DRAFT
        if row.mask_kind != CAUSAL or not row.write:
            raise NotImplementedError(f"the scripted engine has no script for mask kind {row.mask_kind} "
                                      f"with write={row.write}")
        if past == 0 or seq in self.prefilling:
            return PREFILL
        if seq not in self.prompts:
            raise AssertionError(f"sequence {seq} continues at length {past} without a prefill")
        return DECODE if len(row.tokens) == 1 else VERIFY

    def _causal(self, slot: int, past: int, held: list[int | None], tokens: list[int], role: str,
                last_chunk: bool) -> torch.Tensor:
        if role == PREFILL:  # a prompt may come in chunks; the one that asks for logits is its last
            if past == 0:
                self.prompts[slot] = []
                self.draft_calls[slot] = 0
            self.prompts[slot] += tokens
            if last_chunk:
                self.prefilling.discard(slot)
            else:
                self.prefilling.add(slot)
        if None in held:
            raise AssertionError(f"sequence {slot} at length {past} reads positions no row wrote")
        held = list(held) + list(tokens)
        if len(held) > self.limits.max_seq_len:
            raise AssertionError(f"sequence {slot} written past its maximum ({len(held)} positions)")
        prompt_len = len(self.prompts[slot])
        if held[:prompt_len] != self.prompts[slot]:
            raise AssertionError(f"sequence {slot} no longer holds its prompt")
        predicted = []
        for offset in range(len(tokens)):
            end = past + offset + 1  # the context is held[:end]
            generated = end - prompt_len  # index of the token predicted here
            context = held[prompt_len:end]
            right = generated >= 0 and context == [self.truth_at(i) for i in range(generated)]
            predicted.append(self.truth_at(generated) if right else JUNK)
        return scripted_logits(predicted)

    def _draft(self, slot: int, past: int, block: list[int]) -> torch.Tensor:
        if slot not in self.prompts:
            raise AssertionError(f"draft pass on sequence {slot} before its prefill")
        start = past - len(self.prompts[slot])  # generated index of block[0]
        n = self.draft_calls[slot]
        self.draft_calls[slot] = n + 1
        # offset 0 is the block's known first token (the seed, or the token the last verify chose) even when
        # that token is the mask id itself: a prediction there is never used, so it is JUNK
        masked = [i > 0 and t == MASK for i, t in enumerate(block)]
        if self.draft_mask:
            tokens = [MASK] * len(block)
        elif self.denoise:  # diffusion script: position -> token, everything else the truth
            tokens = [self.denoise.get(start + i, self.truth_at(start + i)) for i in range(len(block))]
        else:
            good = self.accept_for(slot, n, len(block))
            tokens = [self.truth_at(start + i) if i <= good else (self.truth_at(start + i) + 1) % 50
                      for i in range(len(block))]
        tokens = [t if m else JUNK for t, m in zip(tokens, masked, strict=True)]
        probs = [self.confidence.get(start + i) if m else None for i, m in enumerate(masked)]
        return scripted_logits(tokens, probs)
