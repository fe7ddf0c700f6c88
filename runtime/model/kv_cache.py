"""A preallocated KV cache: fixed slots of fixed length, one length counter per slot.

Allocation happens once, so no step ever allocates (a requirement for CUDA graphs), and rolling back a
rejected speculation is moving a slot's length back: the stale entries beyond it are simply overwritten
by the next causal pass. Only causally computed K/V are ever written (DESIGN.md section 2).
"""

from __future__ import annotations

import torch


class KVCache:
    """K and V of shape [layers, slots, max_len, kv_heads, head_dim] plus per-slot lengths."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, num_slots, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.max_len = max_len

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    def length(self, slot: int) -> int:
        return int(self.lens[slot])

    def reset(self, slots: torch.Tensor | list[int] | None = None) -> None:
        """Forget the contents of some slots (all by default); the memory stays allocated."""
        if slots is None:
            self.lens.zero_()
        else:
            self.lens[torch.as_tensor(slots, device=self.lens.device, dtype=torch.long)] = 0

    def rollback(self, slots: torch.Tensor | list[int], lengths: torch.Tensor | list[int]) -> None:
        """Shorten slots to `lengths` (never lengthen: that would expose stale entries)."""
        index = torch.as_tensor(slots, device=self.lens.device, dtype=torch.long)
        new = torch.as_tensor(lengths, device=self.lens.device, dtype=torch.int32)
        if bool((new > self.lens[index]).any()) or bool((new < 0).any()):
            raise ValueError("rollback can only shorten a sequence")
        self.lens[index] = new

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
