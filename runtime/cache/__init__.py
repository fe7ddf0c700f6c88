"""The KV cache: a pool of pages (pool.py), the allocator that hands them out and keeps finished prefixes for
reuse (pages.py), and how many pages a memory budget buys (sizing.py)."""
