"""A scripted stand-in model whose AR truth is a first-order Markov chain: the token after t is always f(t).

Because the next token depends only on the current one, the exact AR-correct logit for ANY chunk row is
known from the row's tokens alone - a causal token t predicts f(t), a draft slot i positions after a clean
token t predicts f^i(t) - so every mode (including quad's structured chunks) can be driven through chosen
acceptance patterns while the real scheduler, modes and KV cache run. `wrong_after[r]` makes the drafts of
round r correct only for that many positions (later draft slots predict f^i(t) + 1), which fixes how many
drafts the next verification accepts. A sequence is known by the first page of its table.
"""

from __future__ import annotations

import torch

from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD
from trimode.runtime.backends.limits import EngineLimits
from trimode.runtime.backends.step import StepBatch
from trimode.runtime.cache.pool import KVCache

VOCAB = 50
MASK = 48
EOS = 49


class Config:
    vocab_size = VOCAB
    mask_token_id = MASK
    eos_token_id = EOS
    block_size = 4
    num_hidden_layers = 1


def f(t: int) -> int:
    return (t + 7) % 40  # a cycle through all 40 ids: never MASK or EOS unless `eos_after` says so


class MarkovEngine:
    has_lora = False
    tokenizer_path = None
    device = torch.device("cpu")

    def __init__(self, wrong_after: list[int] | None = None, eos_after: int | None = None,
                 page_size: int = 4, num_pages: int = 1024) -> None:
        self.config = Config()
        self.limits = EngineLimits(8, 512, page_size=page_size, kv_pages=num_pages)
        self.cache = KVCache(1, num_pages, page_size, 1, 2, torch.float32, prefix_caching=False)
        self.wrong_after = wrong_after or []
        self.eos_after = eos_after  # the token after this one is EOS
        self.draft_rounds: dict[int, int] = {}
        self.last_written: dict[int, int] = {}  # per sequence, the last token a causal row wrote (infill's anchor)
        self.steps: list[list[tuple[int, int]]] = []  # per step: (mask kind, tokens) of each row
        self.cache_lens: list[list[int]] = []  # per step: each row's cache length

    def next(self, t: int) -> int:
        return EOS if t == self.eos_after else f(t)

    def ahead(self, t: int, i: int) -> int:
        for _ in range(i):
            t = self.next(t) if t != EOS else EOS
        return t

    def _draft(self, slot: int, t: int, i: int) -> int:
        """What a draft slot i positions after clean token t proposes (right unless the script says not)."""
        rounds = self.draft_rounds.get(slot, 0)
        good = self.wrong_after[rounds] if rounds < len(self.wrong_after) else 10**6
        right = self.ahead(t, i)
        return right if i <= good else (right + 1) % 40

    def step(self, cache: KVCache, batch: StepBatch) -> torch.Tensor:
        self.steps.append([(r.mask_kind, len(r.tokens)) for r in batch.rows])
        self.cache_lens.append(list(batch.cache_lens))
        picks: list[int] = []
        for row, past, table in zip(batch.rows, batch.cache_lens, batch.tables, strict=True):
            toks, n = row.tokens, len(row.tokens)
            seq = table[0]
            if past == 0 and row.write:  # a new sequence on this first page
                self.draft_rounds.pop(seq, None)
            for o in row.logit_offsets:
                if row.mask_kind == CAUSAL:
                    picks.append(self.next(toks[o]))
                elif row.mask_kind == BIDIRECTIONAL:
                    if toks[o] != MASK:  # a clean token: deliberately not itself, so overwriting one shows
                        picks.append((toks[o] + 1) % 40)
                    elif toks[0] != MASK:  # a spec or diffusion block [t, MASK...]
                        picks.append(self._draft(seq, toks[0], o))
                    else:  # an infill chunk [MASK...][suffix]: the hole continues the cached prefix
                        picks.append(self.ahead(self.last_written[seq], o + 1))
                elif row.mask_kind == PREFIX_BLOCK:
                    prefix = n - row.mask_param
                    picks.append(self.next(toks[o]) if o < prefix else
                                 self._draft(seq, toks[prefix - 1], o - prefix + 1))
                else:
                    assert row.mask_kind == QUAD
                    j, off = divmod(o, row.mask_param + 1)
                    d_j = toks[j * (row.mask_param + 1)]
                    picks.append(self.next(d_j) if off == 0 else self._draft(seq, d_j, off))
            if row.write and row.mask_kind == CAUSAL:
                self.last_written[seq] = toks[-1]
            if row.mask_kind in (QUAD, PREFIX_BLOCK, BIDIRECTIONAL):
                self.draft_rounds[seq] = self.draft_rounds.get(seq, 0) + 1
        logits = torch.full((len(picks), VOCAB), -10.0)
        logits[torch.arange(len(picks)), torch.tensor(picks, dtype=torch.long)] = 10.0
        return logits


def truth(prompt: list[int], n: int, engine: MarkovEngine) -> list[int]:
    out, t = [], prompt[-1]
    while len(out) < n:
        t = engine.next(t)
        out.append(t)
        if t == EOS:
            break
    return out
