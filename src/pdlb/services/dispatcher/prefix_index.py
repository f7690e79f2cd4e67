"""An approximate per-worker prefix index, kept from what the dispatcher sent where.

A prompt is cut into blocks of `block_size` tokens; block i is named by a hash chained over blocks
0..i, so equal names mean equal prefixes (up to hash collisions, which only cost a wrong guess).
Each worker keeps an LRU of the block names it was sent, capped at what its KV cache could hold
(reported capacity / block size) and at `max_blocks_per_worker`, which models the worker's own LRU
eviction and bounds memory at workers x cap entries whatever clients send.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    def __init__(self, block_size: int = 16, max_blocks_per_worker: int = 16384, max_prompt_blocks: int = 512) -> None:
        if block_size < 1 or max_blocks_per_worker < 1 or max_prompt_blocks < 1:
            raise ValueError("block_size, max_blocks_per_worker and max_prompt_blocks must be >= 1")
        self.block_size = block_size
        self.max_blocks_per_worker = max_blocks_per_worker
        self.max_prompt_blocks = max_prompt_blocks
        self._holders: dict[int, set[str]] = {}  # block name -> workers that were sent it
        self._lru: dict[str, OrderedDict[int, None]] = {}  # worker -> its block names, oldest first
        self._caps: dict[str, int] = {}

    def chain(self, tokens: Sequence[int]) -> list[int]:
        """Block names of the prompt's full blocks (at most max_prompt_blocks)."""
        size = self.block_size
        count = min(len(tokens) // size, self.max_prompt_blocks)
        names, previous = [], 0
        whole = tuple(tokens[: count * size])  # one copy; each block is then a tuple slice (C speed)
        for start in range(0, count * size, size):
            previous = hash((previous, whole[start : start + size]))
            names.append(previous)
        return names

    def match(self, names: Sequence[int]) -> dict[str, int]:
        """Workers holding a prefix of `names`, with the number of leading blocks each holds (deeper
        blocks are evicted before shallower ones, see `insert`, so holders nest: see nested_depths)."""
        return nested_depths(self._holders, names)

    def insert(self, worker: str, names: Sequence[int]) -> None:
        """Record that `worker` was sent a prompt with these blocks (most recent use). Blocks are
        touched deepest first, so the LRU evicts a prompt's tail before its shared head."""
        lru = self._lru.get(worker)
        if lru is None:
            lru = self._lru[worker] = OrderedDict()
        for name in reversed(names):
            if name in lru:
                lru.move_to_end(name)
            else:
                lru[name] = None
                self._holders.setdefault(name, set()).add(worker)
        self._trim(worker, lru)

    def set_capacity(self, worker: str, kv_tokens: int) -> None:
        """Cap the worker's entries at what its KV cache can hold (from its load reports)."""
        cap = min(self.max_blocks_per_worker, max(1, kv_tokens // self.block_size))
        if self._caps.get(worker) != cap:
            self._caps[worker] = cap
            lru = self._lru.get(worker)
            if lru is not None:
                self._trim(worker, lru)

    def _trim(self, worker: str, lru: OrderedDict[int, None]) -> None:
        cap = self._caps.get(worker, self.max_blocks_per_worker)
        while len(lru) > cap:
            name, _ = lru.popitem(last=False)
            self._forget(name, worker)

    def _forget(self, name: int, worker: str) -> None:
        unhold(self._holders, name, worker)

    def remove_worker(self, worker: str) -> None:
        for name in self._lru.pop(worker, ()):
            self._forget(name, worker)
        self._caps.pop(worker, None)

    def size(self) -> int:
        """Entries held (worker, block) pairs: the index's memory is proportional to this."""
        return sum(len(lru) for lru in self._lru.values())

    def block_names(self) -> int:
        return len(self._holders)


def unhold(holders: dict[int, set[str]], name: int, worker: str) -> None:
    """`worker` no longer holds block `name`; a block nobody holds leaves the map (bounded)."""
    held_by = holders.get(name)
    if held_by is not None:
        held_by.discard(worker)
        if not held_by:
            del holders[name]


def nested_depths(holders: dict[int, set[str]], names: Sequence[int]) -> dict[str, int]:
    """Worker -> how many leading blocks of `names` it holds, where the holders of block i+1 are a
    subset of those of block i (a worker holding a block holds every block above it). One walk down
    the chain: a worker's depth is the level where it drops out of the holder sets, and since sets
    only shrink, a level whose set has the same size as the one above changes nothing."""
    current = holders.get(names[0]) if names else None
    if not current:
        return {}
    depths: dict[str, int] = {}
    depth, size, get = 1, len(current), holders.get
    for name in names[1:]:
        below = get(name)
        if not below:
            break
        if len(below) != size:
            for worker in current - below:
                depths[worker] = depth
            current, size = below, len(below)
        depth += 1
    for worker in current:
        depths[worker] = depth
    return depths
