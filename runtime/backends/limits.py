"""What an engine can serve, and the one place where a request or a step is checked against it."""

from __future__ import annotations

from dataclasses import dataclass


class CapacityError(ValueError):
    """A request or a step does not fit the shapes the engine serves (sequence length, batch, tokens)."""


@dataclass(frozen=True)
class EngineLimits:
    """max_batch_size: sequences resident at once (cache slots); max_seq_len: positions per sequence;
    max_step_tokens: tokens one forward may carry (longer prompts are prefilled in chunks);
    block_lengths: the block lengths a shape-specialised backend was built for (empty: any)."""

    max_batch_size: int
    max_seq_len: int
    max_step_tokens: int = 2048
    block_lengths: tuple[int, ...] = ()

    def check_batch(self, num_sequences: int) -> None:
        if num_sequences > self.max_batch_size:
            raise CapacityError(f"batch of {num_sequences} sequences exceeds the engine's maximum batch size "
                                f"{self.max_batch_size}")

    def check_positions(self, needed: int, what: str = "sequence") -> None:
        if needed > self.max_seq_len:
            raise CapacityError(f"{what} needs {needed} positions, beyond the engine's maximum sequence length "
                                f"{self.max_seq_len}")

    def check_block_length(self, block_length: int) -> None:
        if self.block_lengths and block_length not in self.block_lengths:
            raise CapacityError(f"block length {block_length} is not one this engine was built for "
                                f"({', '.join(map(str, self.block_lengths))}); rebuild with --block-length "
                                f"{block_length}")

    def check_step(self, batch, cache, limit_tokens: bool = False) -> None:
        """CapacityError unless a step fits: its rows, every token's position, every writing row's end in the
        cache, and (for shape-specialised backends, `limit_tokens`) its token count."""
        if limit_tokens and batch.num_tokens > self.max_step_tokens:
            raise CapacityError(f"a step of {batch.num_tokens} tokens exceeds the engine's maximum of "
                                f"{self.max_step_tokens} tokens per step")
        self.check_batch(len(batch.rows))
        self.check_positions(batch.max_position + 1, "a step")
        for row, past in zip(batch.rows, batch.cache_lens, strict=True):
            if not 0 <= row.slot < cache.num_slots:
                raise ValueError(f"slot {row.slot} is not one of the cache's {cache.num_slots} slots")
            if past + row.written > cache.max_len:
                raise CapacityError(f"slot {row.slot} would hold {past + row.written} tokens, beyond the cache's "
                                    f"{cache.max_len}")
