"""Prefix cache: a radix tree over prompt token ids, one node per block of `page_size` tokens.

A node owns the KV slots of its block. Requests that share a prompt prefix share those slots: a new
request locks the longest cached path and prefill starts after it. Nodes nobody locks stay cached
and are evicted least-recently-used first (leaves only, so a cached path never has a hole) when the
KV pool needs room. Token ids are exact keys, so a hit is never a false positive.

Accounting, for the engine's admission: `locked_tokens` are tokens in nodes that a running request
or held PD hand-off uses; every other cached token is evictable and counts as free.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

from pdlb.engines.kv_events import KVEventLog

Release = Callable[[list[int]], None]


class CacheNode:
    __slots__ = ("alive", "children", "key", "last_used", "name", "parent", "refs", "slots")

    def __init__(self, key: tuple[int, ...], slots: list[int], parent: CacheNode | None) -> None:
        self.key, self.slots, self.parent = key, slots, parent
        # the block's name, chained over the blocks before it (as dispatchers name a prompt's blocks)
        self.name = hash((parent.name, key)) if parent is not None else 0
        self.children: dict[tuple[int, ...], CacheNode] = {}
        self.refs = 0
        self.last_used = 0
        self.alive = True


class PrefixCache:
    def __init__(self, page_size: int, release: Release, events: KVEventLog | None = None) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.page_size = page_size
        self._release = release
        self.events = events  # stored / evicted blocks, for dispatchers' exact indexes
        self.root = CacheNode((), [], None)
        self.root.refs = 1  # never evicted
        self.cached_tokens = 0
        self.locked_tokens = 0
        self.evicted_tokens = 0
        self._clock = itertools.count(1)
        self._order = itertools.count()
        self._lru: list[tuple[int, int, CacheNode]] = []  # evictable leaves; stale entries skipped lazily

    @property
    def evictable_tokens(self) -> int:
        return self.cached_tokens - self.locked_tokens

    def _blocks(self, tokens: Sequence[int], limit: int) -> list[tuple[int, ...]]:
        page = self.page_size
        return [tuple(tokens[i : i + page]) for i in range(0, limit - limit % page, page)]

    # look-up ---------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], max_tokens: int | None = None) -> list[CacheNode]:
        """The cached path of the longest block-aligned prefix of `tokens[:max_tokens]` (not locked)."""
        limit = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
        path, node = [], self.root
        for key in self._blocks(tokens, limit):
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        return path

    def unlocked_tokens(self, path: Sequence[CacheNode]) -> int:
        """Tokens that locking `path` would take from the evictable pool."""
        return sum(len(n.slots) for n in path if n.refs == 0)

    # locking -------------------------------------------------------------------------------------
    def lock(self, path: Sequence[CacheNode]) -> None:
        for node in path:
            if node.refs == 0:
                self.locked_tokens += len(node.slots)
            node.refs += 1

    def unlock(self, path: Sequence[CacheNode]) -> None:
        stamp = next(self._clock)
        for node in reversed(path):
            node.refs -= 1
            node.last_used = stamp
            if node.refs == 0:
                self.locked_tokens -= len(node.slots)
                self._maybe_evictable(node)

    # insertion -----------------------------------------------------------------------------------
    def insert(
        self, tokens: Sequence[int], slots: list[int], path: list[CacheNode]
    ) -> tuple[list[CacheNode], list[int]]:
        """Cache the full blocks of `tokens` whose KV sits in `slots`, below the locked `path`.

        Blocks another request cached meanwhile are shared: `slots` is rewritten to point at the
        cached copy and the duplicate slots are returned for the caller to free. Every node of the
        returned path is locked once for the caller (the given path's locks are kept)."""
        page, duplicates = self.page_size, []
        node = path[-1] if path else self.root
        path = list(path)
        blocks = self._blocks(tokens, len(tokens))
        for index in range(len(path), len(blocks)):
            key, span = blocks[index], slice(index * page, (index + 1) * page)
            child = node.children.get(key)
            if child is None:
                child = CacheNode(key, slots[span], node)
                node.children[key] = child
                self.cached_tokens += page
                if self.events is not None:
                    self.events.stored(child.name)
            else:
                duplicates.extend(slots[span])
                slots[span] = child.slots
            self.lock([child])
            path.append(child)
            node = child
        return path, duplicates

    # eviction ------------------------------------------------------------------------------------
    def _maybe_evictable(self, node: CacheNode) -> None:
        if node is not self.root and node.alive and node.refs == 0 and not node.children:
            heapq.heappush(self._lru, (node.last_used, next(self._order), node))

    def evict(self, tokens: int) -> int:
        """Free at least `tokens` cached tokens (least recently used leaves first); returns how many."""
        freed = 0
        while freed < tokens and self._lru:
            stamp, _, node = heapq.heappop(self._lru)
            if not node.alive or node.refs or node.children or node.last_used != stamp:
                continue  # locked, grown or touched since it was queued
            freed += self._drop(node)
        if len(self._lru) > 4 * (self.cached_tokens // self.page_size) + 64:
            self._compact()
        return freed

    def _drop(self, node: CacheNode) -> int:
        parent = node.parent
        assert parent is not None
        del parent.children[node.key]
        node.alive = False
        if self.events is not None:
            self.events.removed(node.name)
        self._release(node.slots)
        n = len(node.slots)
        self.cached_tokens -= n
        self.evicted_tokens += n
        self._maybe_evictable(parent)
        return n

    def _compact(self) -> None:
        self._lru = [e for e in self._lru if e[2].alive and not e[2].refs and not e[2].children]
        heapq.heapify(self._lru)

    def clear(self) -> int:
        """Evict everything unlocked (shutdown, tests)."""
        return self.evict(self.cached_tokens)

    def node_count(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return count
