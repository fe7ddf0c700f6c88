"""Decoding loops for the demo recipe, written against the network's layers only (not the runtime's modes).

The recipe needs to decode while it trains (on-policy targets) and to measure linear self-speculation end to
end; these loops do that with a small KV cache of their own, so they keep working while the runtime's engine
API changes. They follow DESIGN.md section 3 exactly:

* AR: causal prefill, then one causal token per step (greedy).
* linear self-speculation: block [t, MASK x (L-1)] after the cache, one bidirectional draft pass (reads the
  cache, never writes it), every mask takes its argmax; one causal verify pass over the block writes K/V;
  accept c = longest run with verified[i] == block[i + 1]; emit verified[0..c]; cache length -> old + c + 1.
* infill: prefix in the cache; chunk [MASK x n][suffix] bidirectional; each pass commits the most confident
  masked slot(s) (threshold, or the even split of `n` over `n` passes = one per pass); output the n slots.

Every function is checked against `Transformer.forward_masked` with dense masks built from the definitions
(tests/test_train_demo.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class Cache:
    """K/V per layer, [B, kv_heads, max_len, head_dim]; all rows share one length (`self.length`)."""

    def __init__(self, model, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> None:
        c = model.config
        shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(c.num_hidden_layers)]
        self.length = 0


@torch.no_grad()
def step(model, cache: Cache, tokens: torch.Tensor, causal: bool, write: bool,
         at: int | None = None) -> torch.Tensor:
    """Logits [B, T, V] of a chunk at positions at..at+T-1 (default: the cache length), attending the first
    `at` cached positions and the chunk (causally or bidirectionally). With `write` the chunk's K/V are
    stored and the cache length becomes at + T."""
    c = model.config
    at = cache.length if at is None else at
    batch, length = tokens.shape
    group = c.num_attention_heads // c.num_key_value_heads
    positions = (at + torch.arange(length)).expand(batch, length)
    allowed = torch.ones(length, at + length, dtype=torch.bool)
    if causal:
        allowed[:, at:] = torch.ones(length, length, dtype=torch.bool).tril()
    h = F.embedding(tokens, model.w["embed"])
    for i in range(c.num_hidden_layers):
        q, k, v = model._qkv(i, h, positions)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        keys = torch.cat([cache.k[i][:, :, :at].to(k.dtype), k], dim=2)
        values = torch.cat([cache.v[i][:, :, :at].to(v.dtype), v], dim=2)
        if write:
            cache.k[i][:, :, at : at + length] = k
            cache.v[i][:, :, at : at + length] = v
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * model.scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values).transpose(1, 2)
        h = model._attn_out(i, h, attn, False)
        h = model._mlp(i, h)
    if write:
        cache.length = at + length
    return model._logits(h)


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy AR continuation [B, new_tokens] of equal-length prompts [B, P] (batched)."""
    cache = Cache(model, prompts.shape[0], prompts.shape[1] + new_tokens)
    logits = step(model, cache, prompts, causal=True, write=True)[:, -1]
    out = []
    for k in range(new_tokens):
        out.append(logits.argmax(-1))
        if k + 1 < new_tokens:
            logits = step(model, cache, out[-1][:, None], causal=True, write=True)[:, -1]
    return torch.stack(out, dim=1)


@dataclass
class SpecResult:
    tokens: list[int]
    accepted: list[int] = field(default_factory=list)  # drafts accepted per round
    forwards: int = 0  # after the prefill

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(self.forwards, 1)


@torch.no_grad()
def spec_generate(model, prompt: list[int], max_new: int, block: int, mask_id: int,
                  eos_id: int | None = None) -> SpecResult:
    """Linear self-speculation, greedy, batch 1 (DESIGN.md section 3); output equals AR greedy."""
    cache = Cache(model, 1, len(prompt) + max_new + block + 1)
    logits = step(model, cache, torch.tensor([prompt]), causal=True, write=True)[0, -1]
    result = SpecResult([int(logits.argmax())])
    while len(result.tokens) < max_new and result.tokens[-1] != eos_id:
        chunk = torch.full((1, block), mask_id, dtype=torch.long)
        chunk[0, 0] = result.tokens[-1]
        drafts = step(model, cache, chunk, causal=False, write=False)[0].argmax(-1)
        chunk[0, 1:] = drafts[1:]
        old = cache.length
        verified = step(model, cache, chunk, causal=True, write=True)[0].argmax(-1)
        result.forwards += 2
        agree = (verified[:-1] == chunk[0, 1:]).int()
        accepted = int(agree.cumprod(0).sum())
        result.accepted.append(accepted)
        emit = verified[: accepted + 1].tolist()
        if eos_id is not None and eos_id in emit:
            emit = emit[: emit.index(eos_id) + 1]
        result.tokens.extend(emit[: max_new - len(result.tokens)])
        cache.length = old + accepted + 1
    return result


@torch.no_grad()
def ar_generate(model, prompt: list[int], max_new: int, eos_id: int | None = None) -> list[int]:
    """Greedy AR, batch 1, through the same cache code (the speed baseline for spec_generate)."""
    cache = Cache(model, 1, len(prompt) + max_new + 1)
    logits = step(model, cache, torch.tensor([prompt]), causal=True, write=True)[0, -1]
    tokens = [int(logits.argmax())]
    while len(tokens) < max_new and tokens[-1] != eos_id:
        logits = step(model, cache, torch.tensor([[tokens[-1]]]), causal=True, write=True)[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens


@torch.no_grad()
def draft_run_lengths(model, prompt: list[int], continuation: list[int], block: int, mask_id: int
                      ) -> list[int]:
    """c(p) for every state p of a greedy trajectory: drafts accepted if a round started at p.

    State p: the cache holds prompt + continuation[:p], t = continuation[p]; the drafts are compared with
    continuation[p+1 : p+block] (the greedy tokens the verifier would produce). Positions whose block runs
    past the known continuation are left out.
    """
    seq = torch.tensor([prompt + continuation])
    cache = Cache(model, 1, seq.shape[1])
    step(model, cache, seq, causal=True, write=True)
    runs = []
    for p in range(len(continuation) - block + 1):
        chunk = torch.full((1, block), mask_id, dtype=torch.long)
        chunk[0, 0] = continuation[p]
        drafts = step(model, cache, chunk, causal=False, write=False, at=len(prompt) + p)[0].argmax(-1)
        agree = (drafts[1:] == torch.tensor(continuation[p + 1 : p + block])).int()
        runs.append(int(agree.cumprod(0).sum()))
    return runs


@torch.no_grad()
def infill(model, prefix: list[int], suffix: list[int], n: int, mask_id: int,
           threshold: float | None = None) -> list[int]:
    """Fill n tokens between prefix (causal, cached) and suffix: chunk [MASK x n][suffix], bidirectional.

    Each pass commits the most confident masked slot, plus (with a threshold) every other masked slot at or
    above it; at most n passes (the runtime's infill mode: one slot per pass without a threshold). As there,
    a slot given the mask id itself stays masked (and scores as wrong if it never fills).
    """
    cache = Cache(model, 1, len(prefix) + n + len(suffix))
    step(model, cache, torch.tensor([prefix]), causal=True, write=True)
    chunk = torch.tensor([[mask_id] * n + suffix])
    for _ in range(n):
        masked = chunk[0, :n] == mask_id
        if not bool(masked.any()):
            break
        logits = step(model, cache, chunk, causal=False, write=False)[0, :n].float()
        confidence, x0 = torch.softmax(logits, dim=-1).max(-1)
        confidence = torch.where(masked, confidence, torch.tensor(-1.0))
        select = torch.zeros(n, dtype=torch.bool)
        select[int(confidence.argmax())] = True
        if threshold is not None:
            select |= masked & (confidence >= threshold)
        chunk[0, :n][select] = x0[select]
    return chunk[0, :n].tolist()
