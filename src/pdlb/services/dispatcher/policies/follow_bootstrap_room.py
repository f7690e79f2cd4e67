"""`follow_bootstrap_room`: rank = bootstrap_room % dp_size (the legacy PD prefill placement,
predictable by a router; `auto` for prefill)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import grpc

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import NoLiveWorker, Policy, RouteContext, RoutingError, rank_of


class FollowBootstrapRoom(Policy):
    name = "follow_bootstrap_room"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        if ctx.bootstrap_room is None:
            raise RoutingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {ctx.request_id}: method follow_bootstrap_room needs bootstrap_room",
            )
        dp_size = self.options.dp_size or (candidates[-1].worker.dp_rank + 1)
        rank = ctx.bootstrap_room % dp_size
        index = bisect_left(candidates, rank, key=rank_of)
        if index < len(candidates) and candidates[index].worker.dp_rank == rank:
            return candidates[index]
        raise NoLiveWorker(
            f"request {ctx.request_id}: room {ctx.bootstrap_room} maps to rank {rank}, which has no live worker", rank
        )
