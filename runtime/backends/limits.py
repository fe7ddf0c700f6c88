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
