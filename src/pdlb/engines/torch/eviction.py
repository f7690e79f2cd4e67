"""Eviction orders of the ranks' prefix cache: which unlocked leaf block goes first when KV is short.

The cache (prefix_cache.py) keeps its evictable leaves in one least-recently-used queue per
*segment*; an order says which segment a block belongs to and which segment gives up its least
recently used leaf first. Orders are registered in `EVICTIONS` (the scheduler's
`--prefix-eviction` flag names one).

- `lru`: one segment, least recently used first (what vLLM and SGLang ranks do).
- `slru`: segmented LRU (Karedla et al., 1994; the idea of 2Q and S3-FIFO). A block that a later
  request reused (a continued conversation, a shared system prompt) is *protected*; a block only
  its own request used is *probationary* and goes first, so a stream of one-off prompts cannot
  flush the reused prefixes. Protected blocks give way, least recently used first, only while they
  hold more than `protected_share` of the cached tokens, so a conversation's first turn still has
  the rest of the cache to wait in for its second.
- `slru-random`: `slru` whose probationary blocks go in random order (leaves only, so each
  eviction trims the tail of a random prompt). A conversation's first turn is indistinguishable
  from a one-off prompt when it is cached; when turns come back after more new prompt tokens than
  the cache holds (the Mooncake trace at 16k tokens of KV a rank: 15-25 s, 19-25k tokens), LRU
  drops every first turn before its second arrives, while a random order keeps some whole and
  trims others, so fewer second turns lose a long prefix when each returns to its prefix's rank.
  Behind a dispatcher that weighs cache hits against load it measured worse than LRU: a trimmed
  prefix draws fewer conversations back to their rank (docs/BENCHMARKS.md). Seeded: a rank's
  order is reproducible.
"""

from __future__ import annotations

import random
from typing import Protocol


class Block(Protocol):
    hits: int  # times a request other than the one that computed it used the block
    last_used: int  # the cache's clock when a request last released it


class Cache(Protocol):
    cached_tokens: int

    def segment_tokens(self, segment: int) -> int: ...


class EvictionOrder(Protocol):
    name: str
    segments: int  # how many LRU queues the cache keeps

    def segment(self, block: Block) -> int:
        """The queue the block waits in while evictable (0 <= segment < segments)."""
        ...

    def first(self, cache: Cache) -> tuple[int, ...]:
        """The segments to evict from, in order (the next is used while the first is empty)."""
        ...

    def key(self, block: Block, segment: int) -> float:
        """The block's place in its segment's queue when it becomes evictable: lowest goes first."""
        ...


class LRU:
    name, segments = "lru", 1

    def segment(self, block: Block) -> int:
        return 0

    def key(self, block: Block, segment: int) -> float:
        return block.last_used

    def first(self, cache: Cache) -> tuple[int, ...]:
        return (0,)


PROBATION, PROTECTED = 0, 1


class SLRU:
    name, segments = "slru", 2

    def __init__(self, protected_share: float = 0.8) -> None:
        if not 0.0 <= protected_share <= 1.0:
            raise ValueError(f"protected_share must be in [0, 1], got {protected_share}")
        self.protected_share = protected_share

    def segment(self, block: Block) -> int:
        return PROTECTED if block.hits else PROBATION

    def key(self, block: Block, segment: int) -> float:
        return block.last_used

    def first(self, cache: Cache) -> tuple[int, ...]:
        if cache.segment_tokens(PROTECTED) > self.protected_share * cache.cached_tokens:
            return (PROTECTED, PROBATION)
        return (PROBATION, PROTECTED)


class SLRURandom(SLRU):
    name = "slru-random"

    def __init__(self, protected_share: float = 0.8, seed: int = 0) -> None:
        super().__init__(protected_share)
        self._random = random.Random(seed)

    def key(self, block: Block, segment: int) -> float:
        return self._random.random() if segment == PROBATION else block.last_used


EVICTIONS: dict[str, type[LRU] | type[SLRU]] = {"lru": LRU, "slru": SLRU, "slru-random": SLRURandom}
DEFAULT_EVICTION = "lru"


def eviction_order(name: str, seed: int = 0) -> EvictionOrder:
    """The registered order called `name` (`lru`, `slru`, `slru-random`; `slru:0.7` sets the
    protected share); a random order draws from a generator seeded with `seed`.

    Raises ValueError naming the known orders."""
    base, _, arg = name.partition(":")
    cls = EVICTIONS.get(base)
    if cls is None:
        raise ValueError(f"unknown prefix-cache eviction {name!r}; known: {', '.join(EVICTIONS)}")
    if arg and not issubclass(cls, SLRU):
        raise ValueError(f"prefix-cache eviction {base!r} takes no argument (got {name!r})")
    share = 0.8
    if arg:
        try:
            share = float(arg)
        except ValueError:
            message = f"prefix-cache eviction {name!r}: the protected share must be a number in [0, 1]"
            raise ValueError(message) from None
    if cls is SLRURandom:
        return SLRURandom(share, seed)
    return cls(share) if cls is SLRU else cls()
