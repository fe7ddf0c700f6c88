"""The page allocator: who holds which KV page, and which full pages can be reused by a later request.

The cache is `num_pages` pages of `page_size` positions. A sequence holds a list of pages (its page table);
the allocator only counts references - it never looks at K/V. Pages come in two states once released:

* **private** pages (partially filled, provisional, or duplicates) go straight back to the free list;
* **published** pages are full pages of committed positions, keyed by a hash chain over their tokens:
  `hash(parent page's hash, this page's token ids)`, the first page's parent being a root constant per
  engine (weights, dtype and quantization decide K/V, so two engines never share a chain). K/V at a position
  depends only on the tokens up to it (only causal K/V are ever written, and the draft adapter never touches
  written K/V), so any request whose tokens begin with the same pages can read them instead of recomputing.
  A published page whose last holder is gone stays in the cache, evictable, until the pool needs it: the
  least recently released is evicted first (LRU).

A page is published only when it is full and every position in it is committed (the sequence's cache length
has passed its end after the step's rollback), so a published page is never written again: the positions a
sequence writes are always at or beyond its own length.

A `PageListener` (the `listener` attribute; None by default) hears every change to the set of published pages:
`stored` when a page is published (with its parent's hash, None for a first page, and its tokens), `removed`
when a published page is evicted or forgotten. An external router that mirrors the cache (Dynamo's KV router,
runtime/serving/dynamo/) keeps its copy from these calls; they run on the thread that owns the allocator (the
engine loop) and must not raise or block.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class OutOfPages(RuntimeError):
    """Not enough free or evictable pages for an allocation (the scheduler preempts, or waits)."""


def chain_hash(parent: int, tokens: Sequence[int]) -> int:
    """The 64-bit hash of a full page given its parent's hash and its token ids."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(parent.to_bytes(8, "little"))
    for token in tokens:
        digest.update(int(token).to_bytes(4, "little"))
    return int.from_bytes(digest.digest(), "little")


def root_hash(identity: str) -> int:
    """The parent hash of a sequence's first page: a constant per engine identity."""
    return int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "little")


def page_hashes(tokens: Sequence[int], page_size: int, root: int, count: int | None = None) -> list[int]:
    """The hash chain of the first `count` full pages of `tokens` (all full pages when None)."""
    full = len(tokens) // page_size if count is None else min(count, len(tokens) // page_size)
    hashes, parent = [], root
    for page in range(full):
        parent = chain_hash(parent, tokens[page * page_size : (page + 1) * page_size])
        hashes.append(parent)
    return hashes


class PageListener(Protocol):
    """Hears the published pages change (see the module docstring)."""

    def stored(self, digest: int, parent: int | None, tokens: Sequence[int]) -> None:
        """A page was published under `digest`; `parent` is its parent page's hash (None: a first page)."""

    def removed(self, digests: Sequence[int]) -> None:
        """These published pages are gone (evicted, or forgotten by clear_cache)."""


@dataclass
class PageStats:
    """Counters for metrics (monotonic)."""

    queried_tokens: int = 0   # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0       # of those, found cached (not recomputed)
    evicted_pages: int = 0


class PageAllocator:
    """Reference counts, a free list, published pages by hash, and an LRU of evictable published pages."""

    def __init__(self, num_pages: int, page_size: int, root: int = 0, prefix_caching: bool = True) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a KV cache needs at least one page of at least one position, got {num_pages} "
                             f"pages of {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.root = root
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_pages
        self.hash_of: list[int | None] = [None] * num_pages
        self.by_hash: dict[int, int] = {}
        self.free = list(range(num_pages - 1, -1, -1))  # a stack: low page ids first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # published, unreferenced; oldest first
        self.stats = PageStats()
        self.listener: PageListener | None = None

    # -- counts ---------------------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Pages an allocation may take now (free ones plus evictable cached ones)."""
        return len(self.free) + len(self.evictable)

    @property
    def in_use(self) -> int:
        """Pages some sequence holds."""
        return self.num_pages - self.available

    @property
    def cached(self) -> int:
        """Published pages nobody holds (kept for reuse until evicted)."""
        return len(self.evictable)

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    # -- taking and giving back -----------------------------------------------------------------------------
    def take(self, count: int) -> list[int]:
        """`count` pages for one holder; all or none (OutOfPages)."""
        if count > self.available:
            raise OutOfPages(f"{count} pages asked, {self.available} available")
        pages = []
        for _ in range(count):
            if self.free:
                page = self.free.pop()
            else:
                page, _ = self.evictable.popitem(last=False)
                self._unpublish(page)
                self.stats.evicted_pages += 1
            self.refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; a page nobody holds is freed, or kept evictable if published."""
        for page in pages:
            if self.refs[page] <= 0:
                raise ValueError(f"page {page} released more often than it was taken")
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if self.hash_of[page] is not None and self.prefix_caching:
                    self.evictable[page] = None
                else:
                    self._unpublish(page)
                    self.free.append(page)

    def _unpublish(self, page: int) -> None:
        digest = self.hash_of[page]
        if digest is not None:
            del self.by_hash[digest]
            self.hash_of[page] = None
            if self.listener is not None:
                self.listener.removed([digest])

    # -- the prefix cache -----------------------------------------------------------------------------------
    def publish(self, page: int, digest: int, parent: int | None = None, tokens: Sequence[int] = ()) -> bool:
        """Make a full, committed page findable by its chain hash; False if another page already has it.
        `parent` (the parent page's hash; the root or None for a first page) and `tokens` (the page's token ids)
        are only passed on to the listener."""
        if not self.prefix_caching or digest in self.by_hash:
            return False
        if self.hash_of[page] is not None:
            return self.hash_of[page] == digest
        self.by_hash[digest] = page
        self.hash_of[page] = digest
        if self.listener is not None:
            self.listener.stored(digest, None if parent is None or parent == self.root else parent, tokens)
        return True

    def match(self, hashes: Sequence[int]) -> list[int]:
        """The pages of the longest cached prefix of this hash chain, each with a new reference taken."""
        pages = []
        if self.prefix_caching:
            for digest in hashes:
                page = self.by_hash.get(digest)
                if page is None:
                    break
                pages.append(page)
        for page in pages:
            if self.refs[page] == 0:
                del self.evictable[page]
            self.refs[page] += 1
        return pages

    def clear_cache(self) -> None:
        """Forget every evictable published page (they return to the free list)."""
        while self.evictable:
            page, _ = self.evictable.popitem(last=False)
            self._unpublish(page)
            self.free.append(page)
