"""A preallocated KV cache: fixed slots of fixed length, one length per slot kept on the host.

Allocation happens once, when the scheduler opens the engine, so no step ever allocates (a requirement for
CUDA graphs) and no request ever zero-fills memory. The lengths are host integers: the scheduler decides
every length (a prefill adds the prompt, a verify adds a block, a rollback moves back), so knowing them
never needs a device round trip. Rolling back a rejected speculation is moving a length back; stale entries
beyond it are overwritten by the next causal pass. Only causally computed K/V are ever written.
"""

from __future__ import annotations

import torch


class KVCache:
    """K and V of shape [layers, slots, max_len, kv_heads, head_dim] plus per-slot host lengths."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, num_slots, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_slots
        self.max_len = max_len

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def reset(self, slots: list[int] | None = None) -> None:
        """Forget the contents of some slots (all by default); the memory stays allocated."""
        for slot in range(self.num_slots) if slots is None else slots:
            self.lengths[slot] = 0

    def rollback(self, slot: int, length: int) -> None:
        """Shorten a slot to `length` (never lengthen: that would expose stale entries)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"rollback of slot {slot} to {length} from {self.lengths[slot]}: can only shorten")
        self.lengths[slot] = length

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
