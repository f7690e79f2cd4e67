"""Routing decisions: an external rank wins, else the policy picks; every decision is counted."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import grpc

from pdlb.services.dispatcher.load_table import LoadTable, Role, WorkerEntry
from pdlb.services.dispatcher.policies import NoLiveWorker, Policy, RouteContext, RoutingError

EXTERNAL = "external"


@dataclass(frozen=True)
class Decision:
    entry: WorkerEntry
    method: str
    seq: int
    predicted_s: float | None = None  # predicted_latency: its prediction for the chosen rank


class Router:
    def __init__(self, role: Role, table: LoadTable, policy: Policy, dp_size: int = 0) -> None:
        self.role, self.table, self.policy, self.dp_size = role, table, policy, dp_size

    def external_rank(self, prefill_rank: int | None, decode_rank: int | None) -> int | None:
        """The rank a router assigned for this dispatcher's role, if any."""
        if self.role is Role.PREFILL:
            return prefill_rank
        if self.role is Role.DECODE:
            return decode_rank
        return decode_rank if decode_rank is not None else prefill_rank

    def decide(
        self,
        ctx: RouteContext,
        external: int | None = None,
        exclude: Collection[str] = (),
        among: Sequence[WorkerEntry] | None = None,
    ) -> Decision:
        """Pick a worker and count the request as in flight on it. `among`: the candidates to
        choose from (flow control passes the ranks with room), instead of every live rank. Raises
        RoutingError; NoLiveWorker when the table has no worker at all (and none is excluded) or
        the rank the request must go to has none."""
        predicted = None
        if external is not None:
            entry, method = self._external(ctx, external), EXTERNAL
        else:
            candidates = self.table.candidates() if among is None else among
            if exclude:  # only on a re-dispatch: the common path stays free of per-rank work
                candidates = [e for e in candidates if e.worker.worker_id not in exclude]
            if not candidates:
                message = f"request {ctx.request_id}: no live {self.role.value} worker"
                if exclude:
                    raise RoutingError(grpc.StatusCode.UNAVAILABLE, message + " other than the one that failed")
                if self.table.candidates():  # an empty `among` while the table has workers
                    raise RoutingError(grpc.StatusCode.UNAVAILABLE, message)
                raise NoLiveWorker(message)
            entry, method = self.policy.select(ctx, candidates), self.policy.name
            predicted = getattr(self.policy, "last_prediction_s", None)
        try:
            seq = self.table.record_dispatch(entry.worker.worker_id, ctx.num_tokens)
        except OverflowError as exc:
            raise RoutingError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request {ctx.request_id}: {exc}") from None
        self.policy.on_dispatch(ctx, entry)
        return Decision(entry, method, seq, predicted)

    def _external(self, ctx: RouteContext, rank: int) -> WorkerEntry:
        if rank < 0 or (self.dp_size and rank >= self.dp_size):
            raise RoutingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {ctx.request_id}: dp rank {rank} is outside 0..{max(self.dp_size - 1, 0)}",
            )
        entry = self.table.for_rank(rank)
        if entry is None:
            live = [e.worker.dp_rank for e in self.table.candidates()]
            # the ranks a client may pin instead (a typo'd or out-of-range pin reads as such)
            shown = ", ".join(map(str, live[:16])) + (f" ... ({len(live)} in all)" if len(live) > 16 else "")
            # None: with no worker at all, whichever joins may be the rank (or let the policy in)
            raise NoLiveWorker(
                f"request {ctx.request_id}: dp rank {rank} has no live worker (live ranks: {shown or 'none'})",
                rank if live else None,
            )
        return entry
