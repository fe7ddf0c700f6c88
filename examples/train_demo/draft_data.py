"""Training inputs shaped exactly like the inference passes: one clean causal stream plus bidirectional chunks.

A training row is a clean token stream x_0..x_{N-1} at positions 0..N-1 (causal: it plays the KV cache,
which only ever holds causally computed K/V) followed by chunks. A chunk starting at position a holds tokens
at positions a..a+n-1, sees the clean tokens x_0..x_{a-1} and every token of its own chunk
(bidirectionally), and nothing else - exactly the draft / diffusion / infill pass over a cache of length a.
Three chunk kinds:

* draft (self-speculation): [x_a, MASK x (L-1)] - the block the draft pass sees, whose first token t = x_a
  is the last committed token (it is not in the cache). Slot k's target is the model's own greedy next
  token after x_0..x_{a+k-1}, i.e. the argmax of the clean stream's causal logit at position a+k-1, taken
  (detached) from the same forward. When the clean stream is the model's own greedy continuation, these are
  exactly the tokens the verify pass produces, so a draft equal to its target is accepted.
* infill: [hole with some slots masked][suffix, clean] - the masks see the suffix; targets are the hole's
  true tokens at the masked slots.
* diffusion: an infill chunk without a suffix (a block with a random mask ratio), the family's objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Chunk:
    start: int  # position of the first token; the chunk sees clean tokens at positions < start
    tokens: torch.Tensor  # [n] input ids
    targets: torch.Tensor  # [n] target ids, IGNORE where there is none
    target_from: torch.Tensor  # [n] clean index whose causal argmax is the target (-1: use `targets`)
    weights: torch.Tensor  # [n] loss weight per slot
    kind: str


def chunk_positions(start: int, length: int) -> torch.Tensor:
    """Positions of a chunk's tokens: the chunk continues the cache, so they start at the cache length."""
    return start + torch.arange(length)


def chunk_sees_clean(start: int, clean_len: int) -> torch.Tensor:
    """Which clean tokens a chunk at `start` attends: the cache, i.e. positions 0..start-1."""
    return torch.arange(clean_len) < start


def draft_chunk(clean: torch.Tensor, start: int, block: int, mask_id: int, eos_id: int,
                decay: float = 1.0) -> Chunk:
    """[x_start, MASK x (block-1)]; slot k -> argmax of the causal logit at start+k-1 (k = 1..block-1).

    Slots whose target position lies past the clean stream, or whose conditioning text already holds an EOS
    after t, are ignored. Weight of slot k: decay ** (k-1) (the early slots decide acceptance).
    """
    n = len(clean)
    tokens = torch.full((block,), mask_id, dtype=torch.long)
    tokens[0] = clean[start]
    target_from = torch.full((block,), -1, dtype=torch.long)
    weights = torch.zeros(block)
    after_eos = False
    for k in range(1, block):
        src = start + k - 1
        if src > n - 1:
            break
        if k > 1 and int(clean[src]) == eos_id:
            after_eos = True
        if after_eos or int(clean[start]) == eos_id:
            break
        target_from[k] = src
        weights[k] = decay ** (k - 1)
    return Chunk(start, tokens, torch.full((block,), IGNORE, dtype=torch.long), target_from, weights, "draft")


def infill_chunk(clean: torch.Tensor, start: int, hole: int, suffix: int, mask_id: int,
                 generator: torch.Generator, full_mask_prob: float = 0.5) -> Chunk:
    """[x_start..x_start+hole-1 with masks][x_.. suffix tokens clean]; masks predict the true tokens.

    The hole's mask ratio is 1 with probability `full_mask_prob` (the first infill pass), else U(0, 1]
    (later passes, some slots committed); at least one slot is masked.
    """
    middle = clean[start : start + hole].clone()
    after = clean[start + hole : start + hole + suffix]
    if float(torch.rand((), generator=generator)) < full_mask_prob:
        masked = torch.ones(hole, dtype=torch.bool)
    else:
        ratio = float(torch.rand((), generator=generator))
        masked = torch.rand(hole, generator=generator) < ratio
        if not bool(masked.any()):
            masked[int(torch.randint(hole, (), generator=generator))] = True
    targets = torch.where(masked, middle, torch.full_like(middle, IGNORE))
    tokens = torch.cat([torch.where(masked, torch.full_like(middle, mask_id), middle), after])
    n = len(tokens)
    targets = torch.cat([targets, torch.full((len(after),), IGNORE, dtype=torch.long)])
    return Chunk(start, tokens, targets, torch.full((n,), -1, dtype=torch.long), (targets != IGNORE).float(),
                 "infill" if len(after) else "diffusion")


@dataclass
class Packed:
    tokens: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    allowed: torch.Tensor  # [B, T, T]
    ar_targets: torch.Tensor  # [B, T] next-token targets of the clean stream (IGNORE elsewhere)
    targets: torch.Tensor  # [B, T] chunk targets (IGNORE where none or where taken from the causal argmax)
    target_from: torch.Tensor  # [B, T] row index of the causal logit giving the target, -1 if none
    weights: torch.Tensor  # [B, T] chunk loss weights
    kinds: torch.Tensor  # [B, T] 0 clean/pad, 1 draft, 2 infill, 3 diffusion
    chunk_rows: list[list[tuple[int, int]]]  # per row: (offset in the row, length) of every chunk


KIND_IDS = {"draft": 1, "infill": 2, "diffusion": 3}


def pack(rows: list[tuple[torch.Tensor, torch.Tensor, list[Chunk]]], pad_id: int = 0) -> Packed:
    """Rows of (clean tokens, AR loss mask over next-token targets, chunks) -> one padded batch.

    The AR mask says which clean positions j get the loss for predicting x_{j+1} (e.g. only real text, not the
    model's own greedy continuation). Padding tokens attend only to themselves and carry no loss.
    """
    lengths = [len(clean) + sum(len(c.tokens) for c in chunks) for clean, _, chunks in rows]
    total = max(lengths)
    batch = len(rows)
    tokens = torch.full((batch, total), pad_id, dtype=torch.long)
    positions = torch.zeros(batch, total, dtype=torch.long)
    allowed = torch.zeros(batch, total, total, dtype=torch.bool)
    ar_targets = torch.full((batch, total), IGNORE, dtype=torch.long)
    targets = torch.full((batch, total), IGNORE, dtype=torch.long)
    target_from = torch.full((batch, total), -1, dtype=torch.long)
    weights = torch.zeros(batch, total)
    kinds = torch.zeros(batch, total, dtype=torch.long)
    chunk_rows = []
    for b, (clean, ar_mask, chunks) in enumerate(rows):
        n = len(clean)
        tokens[b, :n] = clean
        positions[b, :n] = torch.arange(n)
        allowed[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        next_tokens = torch.where(ar_mask[: n - 1], clean[1:], torch.full_like(clean[1:], IGNORE))
        ar_targets[b, : n - 1] = next_tokens
        offset, spans = n, []
        for c in chunks:
            m = len(c.tokens)
            rows_ = slice(offset, offset + m)
            tokens[b, rows_] = c.tokens
            positions[b, rows_] = chunk_positions(c.start, m)
            allowed[b, rows_, :n] = chunk_sees_clean(c.start, n)
            allowed[b, rows_, rows_] = True
            targets[b, rows_] = c.targets
            target_from[b, rows_] = c.target_from
            weights[b, rows_] = c.weights
            kinds[b, rows_] = KIND_IDS[c.kind]
            spans.append((offset, m))
            offset += m
        for j in range(offset, total):
            allowed[b, j, j] = True
        chunk_rows.append(spans)
    return Packed(tokens, positions, allowed, ar_targets, targets, target_from, weights, kinds, chunk_rows)


def resolve_targets(packed: Packed, logits: torch.Tensor) -> torch.Tensor:
    """Chunk targets with the draft slots filled from the causal argmax of the same forward (detached)."""
    greedy = logits.detach().argmax(-1)
    from_causal = greedy.gather(1, packed.target_from.clamp(min=0))
    return torch.where(packed.target_from >= 0, from_causal, packed.targets)
