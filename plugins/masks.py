"""The mask vocabulary of block attention: what each row kind sees inside its chunk, and what it writes.

One forward carries a chunk of tokens per row (sequence), and every row picks one of four mask kinds. This
module is the one definition of them, used by the runtime (which plans rows), the reference and every kernel
(which compute them) and the tests (which check them):

    0 causal        query t sees chunk keys s <= t
    1 bidirectional every chunk key
    2 quad(L)       sub-block j = tokens j(L+1) .. j(L+1)+L; offset 0 is the draft token d_j, 1..L masks;
                    every token sees d_k for k <= j, and the masks of sub-block j also see all of sub-block j
    3 prefix_block  causal over the first n-m tokens; the last m tokens see the whole chunk

Writes (only causally computed K/V ever enter the cache): causal - all n tokens; quad - the drafts d_j;
prefix_block - the first n-m tokens; bidirectional - nothing (such a row may not write).
"""

from __future__ import annotations

import torch

CAUSAL = 0
BIDIRECTIONAL = 1
QUAD = 2
PREFIX_BLOCK = 3
MASK_KINDS = {"causal": CAUSAL, "bidirectional": BIDIRECTIONAL, "quad": QUAD, "prefix_block": PREFIX_BLOCK}


def check_row(kind: int, param: int, n: int, write: bool) -> None:
    """Raise ValueError unless (kind, param, n, write) is a row the contract defines."""
    if kind not in (CAUSAL, BIDIRECTIONAL, QUAD, PREFIX_BLOCK):
        raise ValueError(f"unknown mask kind {kind}")
    if kind == QUAD and (param < 1 or n != param * (param + 1)):
        raise ValueError(f"a quad row with L={param} must have L*(L+1) tokens, got {n}")
    if kind == PREFIX_BLOCK and not 0 <= param <= n:
        raise ValueError(f"a prefix_block tail of {param} does not fit a chunk of {n}")
    if kind == BIDIRECTIONAL and write:
        raise ValueError("a bidirectional row cannot write the cache (its K/V are not causal)")


def chunk_mask(kind: int, param: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, n] bool: chunk query t may attend to chunk key s."""
    t = torch.arange(n, device=device)[:, None]
    s = torch.arange(n, device=device)[None, :]
    if kind == CAUSAL:
        return s <= t
    if kind == BIDIRECTIONAL:
        return torch.ones(n, n, dtype=torch.bool, device=device)
    if kind == QUAD:
        width = param + 1
        sub_t, off_t = t // width, t % width
        sub_s, off_s = s // width, s % width
        return ((off_s == 0) & (sub_s <= sub_t)) | ((off_t > 0) & (sub_s == sub_t))
    if kind == PREFIX_BLOCK:
        prefix = n - param
        return (s <= t) | (t >= prefix)
    raise ValueError(f"unknown mask kind {kind}")


def written_offsets(kind: int, param: int, n: int) -> list[int]:
    """Chunk offsets whose K/V a writing row stores, in order; the i-th goes to cache position p_b + i."""
    if kind == CAUSAL:
        return list(range(n))
    if kind == QUAD:
        return [j * (param + 1) for j in range(param)]
    if kind == PREFIX_BLOCK:
        return list(range(n - param))
    return []


def written_count(kind: int, param: int, n: int) -> int:
    """How many cache positions a writing row of this kind fills."""
    return len(written_offsets(kind, param, n))
