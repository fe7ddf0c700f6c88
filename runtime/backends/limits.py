"""What an engine can serve, and the one place where a request or a step is checked against it."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CapacityError


@dataclass(frozen=True)
class EngineLimits:
    """max_batch_size: rows one step carries (and requests running at once); max_seq_len: positions per
    sequence; max_step_tokens: tokens one forward may carry (prompts are prefilled in chunks, and no single
    row may be wider); block_lengths: the block lengths a shape-specialised backend was built for (empty:
    any); page_size / kv_pages: the paged KV cache (kv_pages 0: not sized yet)."""

    max_batch_size: int
    max_seq_len: int
    max_step_tokens: int = 2048
    block_lengths: tuple[int, ...] = ()
    page_size: int = 16
    kv_pages: int = 0

    @property
    def max_pages_per_sequence(self) -> int:
        return -(-self.max_seq_len // self.page_size)

    def check_batch(self, num_sequences: int) -> None:
        if num_sequences > self.max_batch_size:
            raise CapacityError(f"batch of {num_sequences} sequences exceeds the engine's maximum batch size "
                                f"{self.max_batch_size}")

    def check_positions(self, needed: int, what: str = "sequence") -> None:
        if needed > self.max_seq_len:
            raise CapacityError(f"{what} needs {needed} positions, beyond the engine's maximum sequence length "
                                f"{self.max_seq_len}")
        if self.kv_pages and -(-needed // self.page_size) > self.kv_pages:
            raise CapacityError(f"{what} needs {needed} positions of KV cache, more than the whole cache holds "
                                f"({self.kv_pages} pages of {self.page_size}; raise --kv-cache-memory)")

    def check_row_tokens(self, tokens: int, what: str = "a row") -> None:
        if tokens > self.max_step_tokens:
            raise CapacityError(f"{what} carries {tokens} tokens, more than one step may hold "
                                f"({self.max_step_tokens}; raise --max-step-tokens or use a shorter block)")

    def check_block_length(self, block_length: int) -> None:
        if self.block_lengths and block_length not in self.block_lengths:
            raise CapacityError(f"block length {block_length} is not one this engine was built for "
                                f"({', '.join(map(str, self.block_lengths))}); rebuild with --block-length "
                                f"{block_length}")

    def check_step(self, batch, num_pages: int) -> None:
        """CapacityError unless a step fits: its rows, its tokens, every token's position, and page ids inside
        the pool of `num_pages` pages."""
        if batch.num_tokens > self.max_step_tokens:
            raise CapacityError(f"a step of {batch.num_tokens} tokens exceeds the engine's maximum of "
                                f"{self.max_step_tokens} tokens per step")
        self.check_batch(len(batch.rows))
        self.check_positions(batch.max_position + 1, "a step")
        for table in batch.tables:
            if table and not (0 <= min(table) and max(table) < num_pages):
                raise ValueError(f"a page table {table} names pages outside the cache's {num_pages}")
