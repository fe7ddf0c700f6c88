"""What every engine does with its KV cache: size it at open, make it once, and say so.

An engine owns exactly one paged KV cache (`engine.cache`), made on first use with `limits.kv_pages` pages
of `limits.page_size` positions, and shared by every scheduler on that engine (its page allocator is part of
it). `engine.allocate_cache(num_pages)` is the other way, named differently: a fresh, separate pool for tests
and measurements, on the engines that can make one (the CUDA-graph and TensorRT engines cannot: their graphs
captured the one cache's addresses). `size_cache` turns `--kv-cache-memory` (or the device's default, see
runtime/cache/sizing.py) into the page count, once, when the engine is opened.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..cache import sizing
from ..cache.pages import root_hash
from ..cache.pool import KVCache
from ..errors import CapacityError
from .limits import EngineLimits


class CacheOwner:
    """Mixin: `cache`, `allocate_cache` and `size_cache` over the engine's `_make_cache(num_pages)`."""

    limits: EngineLimits
    dtype: torch.dtype
    device: torch.device
    prefix_caching: bool = True
    cache_identity: str = ""
    _cache: KVCache | None = None

    def _make_cache(self, num_pages: int, root: int, prefix_caching: bool) -> KVCache:
        raise NotImplementedError

    @property
    def cache(self) -> KVCache:
        """The engine's own cache (made on first use, then the same object for the engine's life)."""
        if self._cache is None:
            if self.limits.kv_pages < 1:  # made without open_engine (tests, tools): the device's default
                self.size_cache()
            self._cache = self._make_cache(self.limits.kv_pages, root_hash(self.cache_identity),
                                           self.prefix_caching)
        return self._cache

    def allocate_cache(self, num_pages: int | None = None, prefix_caching: bool | None = None) -> KVCache:
        """A new, separate cache of `num_pages` pages (default: the engine's size)."""
        if num_pages is None and self.limits.kv_pages < 1:
            self.size_cache()
        return self._make_cache(num_pages or self.limits.kv_pages, root_hash(self.cache_identity),
                                self.prefix_caching if prefix_caching is None else prefix_caching)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights the engine holds (what the CPU default KV size leaves room for)."""
        return 0

    def size_cache(self, kv_cache_memory: int | str | None = None, page_size: int | None = None,
                   prefix_caching: bool = True, identity: str = "") -> None:
        """Fix the page size and the number of pages (before the cache is first used)."""
        if self._cache is not None:
            raise RuntimeError("the KV cache is already made; size it before first use")
        limits = self.limits
        page_size = page_size or limits.page_size or sizing.DEFAULT_PAGE_SIZE
        if page_size < 1:
            raise CapacityError(f"--page-size must be at least 1, got {page_size}")
        c = self.config  # type: ignore[attr-defined]
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        page_bytes = sizing.bytes_per_page(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, itemsize,
                                           page_size)
        need = limits.max_batch_size * -(-limits.max_seq_len // page_size) * page_bytes
        if kv_cache_memory is not None:
            budget, what = sizing.parse_size(kv_cache_memory), "--kv-cache-memory"
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget, what = sizing.default_gpu_kv_bytes(free, total), "the GPU's free memory"
        else:
            budget = sizing.default_cpu_kv_bytes(need, self.weight_bytes, sizing.cpu_memory())
            what = "the CPU default"
        pages = sizing.plan_pages(budget, page_bytes, page_size, limits.max_seq_len, what)
        self.limits = replace(limits, page_size=page_size, kv_pages=pages)
        self.prefix_caching = prefix_caching
        self.cache_identity = identity
