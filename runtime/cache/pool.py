"""The KV memory itself: K and V of every layer as one pool of pages, plus the allocator that hands them out.

`k` and `v` have shape [layers, num_pages, page_size, kv_heads, head_dim]. Attention reads and writes them
through per-row page tables (plugins/reference.py), so a sequence's pages need not be contiguous and a page
of a common prefix can be read by several sequences at once. The pool is allocated once, when an engine's
scheduler first needs it, and never re-allocated or zero-filled per request (CUDA graphs capture its
addresses). The allocator (pages.py) is part of the cache, so every scheduler on one engine shares it.
"""

from __future__ import annotations

import torch

from .pages import PageAllocator


class KVCache:
    """A paged KV pool of one engine; see the module docstring."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", root: int = 0,
                 prefix_caching: bool = True) -> None:
        shape = (num_layers, num_pages, page_size, kv_heads, head_dim)
        # zeros, not empty: a page's positions beyond a sequence's length may be touched (never weighted) by
        # batched kernels, and uninitialised memory could hold NaNs that survive a zero weight
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pages = PageAllocator(num_pages, page_size, root, prefix_caching)

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's pages, [num_pages, page_size, kv_heads, head_dim] each (views, no copy)."""
        return self.k[index], self.v[index]
