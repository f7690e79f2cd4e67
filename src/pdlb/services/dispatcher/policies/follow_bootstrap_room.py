"""`follow_bootstrap_room`: rank = bootstrap_room % dp_size (the legacy PD prefill placement of
SGLang's DP controller, predictable by a router; `auto` for prefill).

A room whose rank is not among the candidates (its worker died, the request failed on it, or flow
control found it without room) goes to candidates[(bootstrap_room // dp_size) % len(candidates)]
instead of failing (the quotient, not the room, so the dead rank's rooms spread over every live
rank): pdlb's decode workers find the prefill rank through Bootstrap, not by recomputing it, so
the request loses nothing, where failing would make every room of a dead rank (1 in dp_size of all
requests, and of the gateway's re-runs with a new room) fail for as long as the rank stays down."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import grpc

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import Policy, RouteContext, RoutingError, rank_of


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
        # the room's rank cannot take it: a live one, still a function of the room and the live ranks
        return candidates[(ctx.bootstrap_room // dp_size) % len(candidates)]
