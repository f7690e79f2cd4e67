"""Load-balancing methods: small classes behind one interface, registered by name.

A policy sees the routing context of one request and the candidate workers (one per DP rank,
ordered by rank, never empty) and returns one of them. Policies that learn from their own
decisions (a cache-aware method, say) override `on_dispatch` / `on_worker_removed`; the others
ignore them, so a new method never touches the existing ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import grpc

from pdlb.services.dispatcher.load_table import Role, WorkerEntry


class RoutingError(Exception):
    """A request that cannot be placed; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RouteContext:
    """What a policy may read of a request."""

    request_id: str
    num_tokens: int
    bootstrap_room: int | None = None
    routing_key: str = ""
    input_ids: Sequence[int] = field(default_factory=tuple)


@dataclass(frozen=True)
class PolicyOptions:
    """Cluster facts and tuning some policies need."""

    dp_size: int = 0  # 0: derived from the highest known rank + 1
    cache_block_size: int = 16  # cache_aware: tokens per block of the prefix index
    cache_index_blocks: int = 16384  # cache_aware: most blocks remembered per worker
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

    def on_worker_removed(self, worker_id: str) -> None:  # noqa: B027 - optional hook
        """Called when a worker leaves the cluster."""

    def on_report(self, entry: WorkerEntry) -> None:  # noqa: B027 - optional hook
        """Called after a worker's load report was applied to its entry."""


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    if not cls.name or cls.name in POLICIES:
        raise ValueError(f"policy name {cls.name!r} missing or taken")
    POLICIES[cls.name] = cls
    return cls


def _rank(entry: WorkerEntry) -> int:
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
        index = bisect_right(candidates, self._last_rank, key=_rank)
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


@register
class RoundRobin(RotatingPolicy):
    """Each rank in turn, skipping ranks with no live worker."""

    name = "round_robin"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._rotate(candidates)


@register
class TotalRequests(RotatingPolicy):
    """Fewest running + waiting + in-flight requests."""

    name = "total_requests"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._least(candidates, _TOTAL_REQUESTS)


@register
class TotalTokens(RotatingPolicy):
    """Fewest running + waiting + in-flight tokens."""

    name = "total_tokens"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._least(candidates, _TOTAL_TOKENS)


@register
class FollowBootstrapRoom(Policy):
    """Rank = bootstrap_room % dp_size (the legacy PD prefill placement, router-predictable)."""

    name = "follow_bootstrap_room"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        if ctx.bootstrap_room is None:
            raise RoutingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {ctx.request_id}: method follow_bootstrap_room needs bootstrap_room",
            )
        dp_size = self.options.dp_size or (candidates[-1].worker.dp_rank + 1)
        rank = ctx.bootstrap_room % dp_size
        index = bisect_left(candidates, rank, key=_rank)
        if index < len(candidates) and candidates[index].worker.dp_rank == rank:
            return candidates[index]
        raise RoutingError(
            grpc.StatusCode.UNAVAILABLE,
            f"request {ctx.request_id}: room {ctx.bootstrap_room} maps to rank {rank}, which has no live worker",
        )


@register
class KVAware(RotatingPolicy):
    """Lowest KV utilisation (used + in-flight over capacity); a rank without room for the
    request's tokens gets nothing while another rank has room."""

    name = "kv_aware"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        fitting = [e for e in candidates if e.kv_free >= ctx.num_tokens]
        return self._least(fitting or candidates, _KV_RATIO)


@register
class LeastWait(RotatingPolicy):
    """Fewest requests that would queue for a batch slot (waiting + in flight + this one, beyond the
    worker's free slots), then fewest tokens. Time to first token is spent mostly waiting for a
    slot, so this orders ranks by expected queueing; among ranks with a free slot, tokens decide."""

    name = "least_wait"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._least(candidates, _SLOT_EXCESS_THEN_TOKENS)


_SLOT_EXCESS_THEN_TOKENS = attrgetter("slot_excess", "total_tokens")
_TOTAL_REQUESTS = attrgetter("total_requests")
_TOTAL_TOKENS = attrgetter("total_tokens")
_KV_RATIO = attrgetter("kv_ratio")


AUTO_BY_ROLE = {Role.MIXED: "round_robin", Role.PREFILL: "follow_bootstrap_room", Role.DECODE: "round_robin"}


def method_names() -> list[str]:
    _load_plugins()
    return ["auto", *sorted(POLICIES)]


def resolve_method(method: str, role: Role) -> str:
    """`auto` becomes the role's default; other names are checked."""
    _load_plugins()
    name = AUTO_BY_ROLE[role] if method == "auto" else method
    if name not in POLICIES:
        raise ValueError(f"unknown load-balance method {method!r}; choose from {', '.join(method_names())}")
    return name


def create_policy(method: str, role: Role, options: PolicyOptions) -> Policy:
    return POLICIES[resolve_method(method, role)](options)


def _load_plugins() -> None:
    """Register the methods of their own modules (cache_aware, the peers' baselines) on first use."""
    from pdlb.services.dispatcher import baselines, cache_aware  # noqa: F401 - register on import
