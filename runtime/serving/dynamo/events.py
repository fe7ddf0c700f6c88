"""The prefix cache's published pages as Dynamo KV events.

Dynamo's KV router keeps, per worker, a tree of the KV blocks that worker holds, built from the worker's
events: `stored` (blocks with their token ids, their hashes and the hash of the block before the first one)
and `removed` (block hashes). A trimode page is a Dynamo block (block size = page size) and its chain hash is
the block hash, so the router's view is the prefix cache's: a page published by the scheduler is `stored`
with its parent page's hash (None for a first page), an evicted page is `removed`.

The router drops a `stored` event whose parent it does not know (it logs ParentBlockNotFound and routes that
prefix blind). In the allocator that happens when a request publishes a page whose parent's hash was
published by another page (a duplicate computed at the same time) that has since been evicted. The relay
keeps the tree of hashes it announced and never sends such a page (nor, then, its children): the router
knows a little less than the cache, never something it cannot place.

The allocator evicts the least recently released page first, and a request releases its pages in order, so a
parent page is usually evicted while its children are still cached (unreachable through the prefix cache
without it). Dynamo's indexers drop a removed block's descendants with it (the worker's local indexer then
logs "Failed to find block to remove" for each later removal of a child), so the relay removes a page's
announced descendants first, deepest first, in the same event, and forgets them; removals of pages it never
announced, or already removed that way, are not sent.

One worker process serves each mode as its own Dynamo model, each with its own KV publisher; the cache is
shared by all modes (the K/V at a position depend only on the tokens up to it), so every event goes to every
publisher, and a publisher that attaches late first gets what is cached (parents first).

`KvEventRelay` is the allocator's `PageListener`: it runs on the engine loop thread, never raises, and does
not block (Dynamo's publisher queues the event).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

LOG = logging.getLogger("trimode.dynamo")

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def signed64(digest: int) -> int:
    """A 64-bit page hash as the signed 64-bit integer Dynamo's event API takes."""
    digest %= _U64
    return digest - _U64 if digest > _I64_MAX else digest


class KvEventRelay:
    """Publishes the allocator's page events to every attached Dynamo `KvEventPublisher`."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._lock = threading.Lock()
        self._publishers: list[Any] = []
        # announced pages: digest -> (parent digest or None, tokens), in the order they were announced
        self._announced: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        self._children: dict[int, set[int]] = {}  # announced parent -> its announced children
        self.stored_events = 0
        self.removed_events = 0
        self.skipped_orphans = 0  # pages not announced because their parent was not (see the module docstring)
        self.closed = False

    # -- publishers ---------------------------------------------------------------------------------------
    def attach(self, publisher: Any) -> None:
        """Add a publisher; it first hears every page announced so far, parents before children."""
        with self._lock:
            if self.closed:
                return
            sent: set[int] = set()
            pending = list(self._announced.items())
            while pending:
                left = []
                for digest, (parent, tokens) in pending:
                    if parent is None or parent in sent:
                        self._send_stored(publisher, digest, parent, tokens)
                        sent.add(digest)
                    else:
                        left.append((digest, (parent, tokens)))
                if len(left) == len(pending):  # these hang under evicted pages: the router could not place them
                    break
                pending = left
            self._publishers.append(publisher)

    def close(self) -> None:
        """No more events (cleanup): later allocator calls are ignored."""
        with self._lock:
            self.closed = True
            self._publishers.clear()

    # -- the allocator's PageListener -------------------------------------------------------------------------
    def stored(self, digest: int, parent: int | None, tokens: Sequence[int]) -> None:
        try:
            with self._lock:
                if self.closed or digest in self._announced:
                    return
                if parent is not None and parent not in self._announced:
                    self.skipped_orphans += 1
                    return
                page = (parent, tuple(int(t) for t in tokens))
                if len(page[1]) != self.page_size:
                    LOG.warning("a published page has %d tokens, not %d: not announced", len(page[1]),
                                self.page_size)
                    return
                self._announced[digest] = page
                if parent is not None:
                    self._children.setdefault(parent, set()).add(digest)
                self.stored_events += 1
                for publisher in self._publishers:
                    self._send_stored(publisher, digest, *page)
        except Exception:  # the router's view is best effort; serving goes on
            LOG.exception("publishing a KV stored event failed")

    def removed(self, digests: Sequence[int]) -> None:
        try:
            with self._lock:
                if self.closed:
                    return
                gone: list[int] = []
                for digest in digests:
                    if digest in self._announced:
                        self._forget(digest, gone)
                if not gone:
                    return
                self.removed_events += len(gone)
                for publisher in self._publishers:
                    try:
                        publisher.publish_removed([signed64(d) for d in gone])
                    except Exception:
                        LOG.exception("publishing a KV removed event failed")
        except Exception:
            LOG.exception("publishing a KV removed event failed")

    # -- helpers ------------------------------------------------------------------------------------------
    def _forget(self, digest: int, gone: list[int]) -> None:
        """Drop an announced page and its announced descendants, appending them to `gone` deepest first."""
        stack = [(digest, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                parent, _ = self._announced.pop(node)
                if parent is not None and parent in self._children:
                    self._children[parent].discard(node)
                    if not self._children[parent]:
                        del self._children[parent]
                gone.append(node)
                continue
            stack.append((node, True))
            for child in self._children.get(node, ()):
                if child in self._announced:
                    stack.append((child, False))

    @property
    def announced(self) -> int:
        """Pages the router has been told about and not told gone."""
        return len(self._announced)

    def _send_stored(self, publisher: Any, digest: int, parent: int | None, tokens: tuple[int, ...]) -> None:
        try:
            publisher.publish_stored(token_ids=list(tokens), num_block_tokens=[len(tokens)],
                                     block_hashes=[signed64(digest)],
                                     parent_hash=None if parent is None else signed64(parent))
        except Exception:
            LOG.exception("publishing a KV stored event failed")
