"""`cache_aware`: send a request where its prompt prefix is likely cached, unless that rank is
overloaded.

Score of a rank = expected cache-hit tokens (from the approximate prefix index of what this
dispatcher sent there) - weight x queued tokens (prompt tokens the worker still has to prefill,
and those sent since its report: prompt work ahead of the request). A batch slot comes first:
ranks are compared by how many requests would wait for a slot there (as in least_wait), then by
score, because waiting for a slot costs a whole request's decode time, more than a prefix hit
saves. Among ranks without a hit the least queued one wins, ties
rotating so new prefixes spread.

Overload guard: a rank whose requests exceed the least-loaded rank's by more than
`balance_abs_threshold` and by more than `balance_rel_threshold` times is not eligible, so a hot
prefix or session spills to other ranks instead of queueing behind itself.

Session affinity: a request with a `routing_key` goes to the rank that key last went to while the
guard allows; otherwise it is placed by score and the key follows it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from operator import attrgetter

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import PolicyOptions, PrefixIndexPolicy, RouteContext

_SLOT_EXCESS_THEN_QUEUED = attrgetter("slot_excess", "queued_tokens")
_TOTAL_REQUESTS = attrgetter("total_requests")

# Why each decision went where it did (exported for tests and benchmarks).
SESSION, CACHE_HIT, LOAD, GUARDED = "session", "cache_hit", "load", "guarded"


class CacheAware(PrefixIndexPolicy):
    name = "cache_aware"

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self.sessions: OrderedDict[str, str] = OrderedDict()  # routing_key -> worker id
        self.reasons: Counter[str] = Counter()
        self._ids: tuple[Sequence[WorkerEntry], dict[str, WorkerEntry]] = ((), {})

    # selection ---------------------------------------------------------------------------------
    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        limit = self._overload_limit(candidates)
        by_id = self._by_id(candidates)
        if ctx.routing_key:
            entry = by_id.get(self.sessions.get(ctx.routing_key, ""))
            if entry is not None and entry.total_requests <= limit:
                self.reasons[SESSION] += 1
                return entry
        names = ctx.blocks(self.index)
        eligible = candidates if max(map(_TOTAL_REQUESTS, candidates)) <= limit else self._eligible(candidates, limit)
        best = self._least(eligible, _SLOT_EXCESS_THEN_QUEUED)
        weight, block = self.options.cache_load_weight, self.index.block_size
        # the best so far by (slot excess, weight x queued - hit, -hit), lower is better; kept in
        # locals rather than tuples: this loop runs once per rank holding the prefix
        best_excess, best_score, best_hit, guarded = best.slot_excess, weight * best.queued_tokens, 0, False
        for worker_id, blocks in self.matches(names).items():
            entry = by_id.get(worker_id)
            if entry is None:
                continue
            if entry.total_requests > limit:
                guarded = True
                continue
            excess = entry.slot_excess
            if excess > best_excess:
                continue
            hit = blocks * block
            score = weight * entry.queued_tokens - hit
            if excess < best_excess or score < best_score or (score == best_score and hit > best_hit):
                best, best_excess, best_score, best_hit = entry, excess, score, hit
        self.reasons[CACHE_HIT if best_hit else GUARDED if guarded else LOAD] += 1
        return best

    def _overload_limit(self, candidates: Sequence[WorkerEntry]) -> float:
        """Requests above which a rank counts as overloaded (both thresholds exceeded)."""
        floor = min(map(_TOTAL_REQUESTS, candidates))
        return max(floor + self.options.balance_abs_threshold, floor * self.options.balance_rel_threshold)

    @staticmethod
    def _eligible(candidates: Sequence[WorkerEntry], limit: float) -> list[WorkerEntry]:
        return [e for e in candidates if e.total_requests <= limit]  # never empty: the least loaded is in

    def _by_id(self, candidates: Sequence[WorkerEntry]) -> dict[str, WorkerEntry]:
        # The load table hands out the same list until membership changes: build the map once per
        # list (holding the list, so an identity match can never be a recycled object).
        if self._ids[0] is not candidates:
            self._ids = (candidates, {e.worker.worker_id: e for e in candidates})
        return self._ids[1]

    # learning ----------------------------------------------------------------------------------
    def on_dispatch(self, ctx: RouteContext, chosen: WorkerEntry) -> None:
        super().on_dispatch(ctx, chosen)
        worker_id = chosen.worker.worker_id
        if ctx.routing_key:
            self.sessions[ctx.routing_key] = worker_id
            self.sessions.move_to_end(ctx.routing_key)
            while len(self.sessions) > self.options.max_routing_keys:
                self.sessions.popitem(last=False)
