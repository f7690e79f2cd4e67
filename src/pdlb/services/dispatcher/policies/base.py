"""What every load-balancing method shares: the request context it reads, its options, the
interface it implements, and the rotation helpers of methods whose ties rotate over ranks.

A policy sees the routing context of one request and the candidate workers (one per DP rank,
ordered by rank, never empty) and returns one of them. Policies that learn from their own
decisions override `on_dispatch` / `on_report` / `on_worker_removed`; the others ignore them, so a
new method never touches the existing ones. `registry.py` is the only place that lists them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import grpc

from pdlb.services.dispatcher.kv_index import ExactPrefixIndex
from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.prefix_index import PrefixIndex


class RoutingError(Exception):
    """A request that cannot be placed; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class NoLiveWorker(RoutingError):
    """UNAVAILABLE because no live worker can take the request: the role has none at all
    (`rank` None), or the DP rank the request must go to has none (`rank`). During a membership
    flap the workers' keys come back within moments, so the dispatcher may wait (`--worker-wait`)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
        self.rank = rank


@dataclass(frozen=True)
class RouteContext:
    """What a policy may read of a request."""

    request_id: str
    num_tokens: int
    bootstrap_room: int | None = None
    routing_key: str = ""
    input_ids: Sequence[int] = field(default_factory=tuple)
    _chains: dict = field(default_factory=dict, compare=False, repr=False)

    def blocks(self, index: PrefixIndex) -> list[int]:
        """The prompt's block names for `index`'s block size, hashed once per request whichever
        policies (and hooks) ask."""
        key = (index.block_size, index.max_prompt_blocks)
        names = self._chains.get(key)
        if names is None:
            names = self._chains[key] = index.chain(self.input_ids)
        return names


@dataclass(frozen=True)
class PolicyOptions:
    """Cluster facts and tuning some policies need."""

    dp_size: int = 0  # 0: derived from the highest known rank + 1
    cache_block_size: int = 16  # prefix-index methods: tokens per block of the index
    cache_index_blocks: int = 16384  # prefix-index methods: most blocks remembered per worker
    # cache_aware: weight of a queued token against one expected cache-hit token. Below 1 because
    # requests queued on a rank often share the very prefix that makes it attractive.
    cache_load_weight: float = 0.5
    balance_abs_threshold: int = 16  # overload guard: requests above the least-loaded rank ...
    balance_rel_threshold: float = 1.5  # ... and this many times its requests
    max_routing_keys: int = 100_000  # cache_aware: sessions remembered (LRU)


class Policy(ABC):
    name: str = ""

    def __init__(self, options: PolicyOptions) -> None:
        self.options = options

    @abstractmethod
    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        """Pick one of `candidates` (non-empty, ordered by dp_rank)."""

    def on_dispatch(self, ctx: RouteContext, chosen: WorkerEntry) -> None:  # noqa: B027 - optional hook
        """Called after a decision is recorded."""

    def cached_by_rank(self, ctx: RouteContext, remember: bool = False) -> dict[str, int]:
        """Worker id -> prompt tokens of the request it is believed to cache, for the workers that
        cache some (flow control's room test and gather window read it). Without a prefix index: none.
        `remember`: the decision on `ctx` follows at once and may reuse the lookup."""
        return {}

    def cached_tokens(self, ctx: RouteContext) -> int:
        """Prompt tokens of the longest prefix of the request some rank is believed to cache."""
        return max(self.cached_by_rank(ctx).values(), default=0)

    def on_worker_removed(self, worker_id: str) -> None:  # noqa: B027 - optional hook
        """Called when a worker leaves the cluster."""

    def on_report(self, entry: WorkerEntry) -> None:  # noqa: B027 - optional hook
        """Called after a worker's load report was applied to its entry."""


def rank_of(entry: WorkerEntry) -> int:
    return entry.worker.dp_rank


class RotatingPolicy(Policy):
    """Base for methods whose ties rotate over ranks, so equal loads are shared fairly.

    Candidates are ordered by rank, so the rotation point is a binary search and the least-loaded
    scan runs over a precomputed attribute: a decision costs a few C-level passes, not Python loops.
    """

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self._last_rank = -1

    def _start(self, candidates: Sequence[WorkerEntry]) -> int:
        """Index of the first candidate after the last chosen rank (cyclically)."""
        index = bisect_right(candidates, self._last_rank, key=rank_of)
        return index if index < len(candidates) else 0

    def _rotate(self, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        pick = candidates[self._start(candidates)]
        self._last_rank = pick.worker.dp_rank
        return pick

    def _least(self, candidates: Sequence[WorkerEntry], key: Callable[[WorkerEntry], float]) -> WorkerEntry:
        values = list(map(key, candidates))
        best = min(values)
        start = self._start(candidates)
        try:
            index = values.index(best, start)  # the first tie at or after the rotation point
        except ValueError:
            index = values.index(best)
        pick = candidates[index]
        self._last_rank = pick.worker.dp_rank
        return pick


class PrefixIndexPolicy(RotatingPolicy):
    """Base for methods that need to know which ranks cache a prompt's prefix: the exact index
    (from the workers' block events, shared by the dispatcher) for workers that send events, and
    an approximate index of what this policy sent where for those that do not. Requests sent to a
    synced worker are not recorded in the approximate index (half of a decision's time at 64
    ranks went there), so while a worker's events are in a gap it is guessed from what it was
    sent before it synced, or not at all, until its snapshot arrives."""

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self.index = PrefixIndex(options.cache_block_size, options.cache_index_blocks)
        self.exact: ExactPrefixIndex | None = None  # set by the dispatcher
        # cached_by_rank's lookup, for the decision on the same request that follows it at once
        self._matched: tuple[RouteContext, dict[str, int]] | None = None

    def matches(self, names: Sequence[int]) -> dict[str, int]:
        """Worker -> cached prefix length in blocks: exact where known, else approximate."""
        if not names:
            return {}
        guessed = self.index.match(names)
        if self.exact is None or not self.exact.next_seq:
            return guessed
        if not guessed:  # every worker this policy sent to is synced: the exact index alone
            return self.exact.match(names)
        known = {w: depth for w, depth in guessed.items() if not self.exact.synced(w)}
        known.update(self.exact.match(names))
        return known

    def matches_of(self, ctx: RouteContext) -> dict[str, int]:
        """`matches` of the request's prompt blocks; the lookup `cached_by_rank(ctx, remember=True)`
        just made is taken instead (flow control's room test asks right before the decision, with
        nothing run in between that could change an index)."""
        memo, self._matched = self._matched, None
        if memo is not None and memo[0] is ctx:
            return memo[1]
        return self.matches(ctx.blocks(self.index))

    def cached_by_rank(self, ctx: RouteContext, remember: bool = False) -> dict[str, int]:
        """From the exact index where synced, else from what this policy sent where; at most the
        prompt less its last token, which is always computed."""
        block, cap = self.index.block_size, max(ctx.num_tokens - 1, 0)
        matched = self.matches(ctx.blocks(self.index))
        self._matched = (ctx, matched) if remember else None
        return {w: min(depth * block, cap) for w, depth in matched.items()}

    def on_dispatch(self, ctx: RouteContext, chosen: WorkerEntry) -> None:
        self._matched = None  # the index changes from here on
        worker_id = chosen.worker.worker_id
        if self.exact is not None and self.exact.synced(worker_id):
            return  # its own block events say what it caches: guessing would only cost time
        self.index.insert(worker_id, ctx.blocks(self.index))

    def on_report(self, entry: WorkerEntry) -> None:
        if entry.reported.kv_tokens_capacity > 0:
            self.index.set_capacity(entry.worker.worker_id, entry.reported.kv_tokens_capacity)

    def on_worker_removed(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)


TOTAL_REQUESTS = attrgetter("total_requests")
TOTAL_TOKENS = attrgetter("total_tokens")
KV_RATIO = attrgetter("kv_ratio")
SLOT_EXCESS_THEN_TOKENS = attrgetter("slot_excess", "total_tokens")
