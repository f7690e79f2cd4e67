"""Prefix cache: a radix tree over prompt token ids, one node per block of `page_size` tokens.

A node owns the KV slots of its block. Requests that share a prompt prefix share those slots: a new
request locks the longest cached path and prefill starts after it. Nodes nobody locks stay cached
and are evicted least-recently-used first (leaves only, so a cached path never has a hole) when the
KV pool needs room, in the order an eviction order gives (eviction.py: least recently used, or
segmented so that blocks a later request reused outlive blocks seen once). Token ids are exact
keys, so a hit is never a false positive.

Accounting, for the engine's admission: `locked_tokens` are tokens in nodes that a running request
or held PD hand-off uses; every other cached token is evictable and counts as free.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

from pdlb.engines.kv_events import KVEventLog
from pdlb.engines.torch.eviction import EvictionOrder, eviction_order

Release = Callable[[list[int]], None]


class CacheNode:
    __slots__ = ("alive", "children", "hits", "key", "last_used", "name", "parent", "queued", "refs", "slots")

    def __init__(self, key: tuple[int, ...], slots: list[int], parent: CacheNode | None) -> None:
        self.key, self.slots, self.parent = key, slots, parent
        # the block's name, chained over the blocks before it (as dispatchers name a prompt's blocks)
        self.name = hash((parent.name, key)) if parent is not None else 0
        self.children: dict[tuple[int, ...], CacheNode] = {}
        self.refs = 0
        self.hits = 0  # times a request other than the one that computed it used the block
        self.last_used = 0
        self.queued = 0.0  # its key in its eviction queue when last queued (older entries are stale)
        self.alive = True


class PrefixCache:
    def __init__(
        self,
        page_size: int,
        release: Release,
        events: KVEventLog | None = None,
        eviction: str | EvictionOrder = "lru",
    ) -> None:
        """`eviction`: an order of eviction.py or its registered name. Raises ValueError for a
        page size < 1 or an unknown order."""
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.eviction = eviction_order(eviction) if isinstance(eviction, str) else eviction
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
        # per segment of the eviction order: its evictable leaves as a heap by last use (stale
        # entries skipped lazily), and the tokens of all its cached blocks
        self._lru: list[list[tuple[float, int, CacheNode]]] = [[] for _ in range(self.eviction.segments)]
        self._segment_tokens = [0] * self.eviction.segments

    @property
    def evictable_tokens(self) -> int:
        return self.cached_tokens - self.locked_tokens

    def segment_tokens(self, segment: int) -> int:
        """Cached tokens (locked or not) in blocks of that segment of the eviction order."""
        return self._segment_tokens[segment]

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
    def lock(self, path: Sequence[CacheNode], hit: bool = True) -> None:
        """Lock the blocks of `path` for one request. `hit`: the request reuses blocks cached
        before it (False only for the blocks it computed itself), which the eviction order counts."""
        for node in path:
            if node.refs == 0:
                self.locked_tokens += len(node.slots)
            node.refs += 1
            if hit:
                before = self.eviction.segment(node)
                node.hits += 1
                after = self.eviction.segment(node)
                if after != before:
                    self._segment_tokens[before] -= len(node.slots)
                    self._segment_tokens[after] += len(node.slots)

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
                self._segment_tokens[self.eviction.segment(child)] += page
                if self.events is not None:
                    self.events.stored(child.name)
                self.lock([child], hit=False)
            else:
                duplicates.extend(slots[span])
                slots[span] = child.slots
                self.lock([child])  # another request computed it meanwhile: shared
            path.append(child)
            node = child
        return path, duplicates

    # eviction ------------------------------------------------------------------------------------
    def _maybe_evictable(self, node: CacheNode) -> None:
        if node is not self.root and node.alive and node.refs == 0 and not node.children:
            segment = self.eviction.segment(node)
            node.queued = self.eviction.key(node, segment)
            heapq.heappush(self._lru[segment], (node.queued, next(self._order), node))

    def evict(self, tokens: int) -> int:
        """Free at least `tokens` cached tokens (unlocked leaves, in the eviction order: least
        recently used first within a segment); returns how many (fewer only when nothing unlocked
        is left)."""
        freed = 0
        while freed < tokens:
            node = self._next_victim()
            if node is None:
                break
            freed += self._drop(node)
        if sum(map(len, self._lru)) > 4 * (self.cached_tokens // self.page_size) + 64:
            self._compact()
        return freed

    def _next_victim(self) -> CacheNode | None:
        for segment in self.eviction.first(self):
            queue = self._lru[segment]
            while queue:
                key, _, node = heapq.heappop(queue)
                if (
                    node.alive
                    and not node.refs
                    and not node.children
                    and node.queued == key
                    and self.eviction.segment(node) == segment
                ):
                    return node
                # else: locked, grown, queued again or promoted since this entry was queued
        return None

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
        self._segment_tokens[self.eviction.segment(node)] -= n
        self.evicted_tokens += n
        self._maybe_evictable(parent)
        return n

    def _compact(self) -> None:
        for segment, queue in enumerate(self._lru):
            queue[:] = [
                (key, order, node)
                for key, order, node in queue
                if node.alive
                and not node.refs
                and not node.children
                and node.queued == key
                and self.eviction.segment(node) == segment
            ]
            heapq.heapify(queue)

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
