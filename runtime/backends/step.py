"""The one step every backend implements: a packed batch of chunk rows in, the requested logits out.

A row is one sequence's chunk for this forward: its tokens, where they sit, which mask they use inside the
chunk (causal, bidirectional, quad, prefix_block; see `plugins/masks.py`), whether their causal K/V are
written and whether the draft LoRA applies. Rows of any modes share one forward: they are packed end to end
(no padding), so a step costs what its tokens cost. Each row reads its cached positions, and writes its new
ones, through its sequence's page table; the scheduler, which owns the cache, supplies the tables and the
cached lengths and moves the lengths after the step. Everything here is built on the host from host-known
numbers, so building a step never waits for the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ...builder.config import ModelConfig
from ...plugins.masks import CAUSAL, check_row, written_count
from ..cache.pool import KVCache
from .limits import EngineLimits


@dataclass
class ChunkRow:
    """One sequence's chunk in one forward."""

    tokens: list[int]
    mask_kind: int = CAUSAL
    mask_param: int = 0
    write: bool = False
    lora: bool = False
    logit_offsets: list[int] = field(default_factory=list)  # chunk offsets whose logits the step returns
    positions: list[int] | None = None  # absolute positions; None: cache length + 0..n-1

    def __post_init__(self) -> None:
        check_row(self.mask_kind, self.mask_param, len(self.tokens), self.write)
        if any(not 0 <= o < len(self.tokens) for o in self.logit_offsets):
            raise ValueError(f"logit offsets {self.logit_offsets} outside a chunk of {len(self.tokens)}")

    @property
    def written(self) -> int:
        """Cache positions this row fills (its sequence's cache length grows by this much)."""
        return written_count(self.mask_kind, self.mask_param, len(self.tokens)) if self.write else 0


@dataclass
class StepBatch:
    """The packed tensors of one forward (on the host), built from its rows and their sequences' pages."""

    rows: list[ChunkRow]
    cache_lens: list[int]      # p_b per row, host copy
    tables: list[list[int]]    # each row's page table (the pages it reads and writes), host copy
    cu: list[int]              # cu_seqlens, host copy
    tokens: torch.Tensor       # [N] int64
    positions: torch.Tensor    # [N] int64
    cu_seqlens: torch.Tensor   # [B+1] int32
    page_table: torch.Tensor   # [B, T] int32, -1 past each row's pages
    cache_lens_t: torch.Tensor  # [B] int32
    mask_kind: torch.Tensor    # [B] int32
    mask_param: torch.Tensor   # [B] int32
    write: torch.Tensor        # [B] int32
    lora: torch.Tensor         # [N] bool: the adapter applies at this token
    logit_index: torch.Tensor  # [M] int64, indices into the N packed tokens
    logit_rows: list[int]      # [M] host copy: which row each returned logit belongs to

    @classmethod
    def from_rows(cls, rows: Sequence[ChunkRow], tables: Sequence[Sequence[int]], cache_lens: Sequence[int],
                  page_size: int) -> StepBatch:
        """Pack rows; `tables[b]` must cover row b's cached and written positions (ValueError otherwise)."""
        if not rows:
            raise ValueError("a step needs at least one row")
        if not len(rows) == len(tables) == len(cache_lens):
            raise ValueError("one page table and one cache length per row")
        tokens: list[int] = []
        positions: list[int] = []
        lora: list[bool] = []
        cu = [0]
        logit_index: list[int] = []
        logit_rows: list[int] = []
        for b, (row, past, table) in enumerate(zip(rows, cache_lens, tables, strict=True)):
            n = len(row.tokens)
            if len(table) * page_size < past + row.written:
                raise ValueError(f"row {b}'s {len(table)} pages cannot hold {past} cached + {row.written} "
                                 "written positions")
            tokens += row.tokens
            positions += row.positions if row.positions is not None else list(range(past, past + n))
            lora += [row.lora] * n
            logit_index += [cu[-1] + o for o in row.logit_offsets]
            logit_rows += [b] * len(row.logit_offsets)
            cu.append(cu[-1] + n)
        if len(positions) != len(tokens):
            raise ValueError("a row's positions must match its tokens")
        width = max(1, max(len(t) for t in tables))
        page_table = torch.full((len(rows), width), -1, dtype=torch.int32)
        for b, table in enumerate(tables):
            page_table[b, : len(table)] = torch.tensor(list(table), dtype=torch.int32)

        def i32(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32)

        return cls(list(rows), list(cache_lens), [list(t) for t in tables], cu,
                   torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long), i32(cu),
                   page_table, i32(list(cache_lens)), i32([r.mask_kind for r in rows]),
                   i32([r.mask_param for r in rows]), i32([int(r.write) for r in rows]),
                   torch.tensor(lora, dtype=torch.bool), torch.tensor(logit_index, dtype=torch.long), logit_rows)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_logits(self) -> int:
        return int(self.logit_index.shape[0])

    @property
    def max_position(self) -> int:
        return max(max(r.positions) if r.positions is not None else p + len(r.tokens) - 1
                   for r, p in zip(self.rows, self.cache_lens, strict=True))

    @property
    def any_lora(self) -> bool:
        return any(r.lora for r in self.rows)


class StepEngine(Protocol):
    """What the scheduler needs from a backend."""

    config: ModelConfig
    limits: EngineLimits
    has_lora: bool
    tokenizer_path: Path | None
    device: torch.device

    @property
    def cache(self) -> KVCache:
        """The engine's own paged KV cache (made once, on first use; shared by every scheduler of the engine)."""

    def step(self, cache: KVCache, batch: StepBatch) -> torch.Tensor:
        """One forward: logits [M, V] fp32 on the engine's device for batch.logit_index; writes the writing
        rows' K/V into `cache` through their page tables. Lengths are the caller's (the scheduler's)."""
