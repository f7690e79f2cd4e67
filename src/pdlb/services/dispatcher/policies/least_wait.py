"""`least_wait`: fewest requests that would queue for a batch slot (waiting + in flight + this one,
beyond the worker's free slots), then fewest tokens. Time to first token is spent mostly waiting
for a slot, so this orders ranks by expected queueing; among ranks with a free slot, tokens decide."""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import SLOT_EXCESS_THEN_TOKENS, RotatingPolicy, RouteContext


class LeastWait(RotatingPolicy):
    name = "least_wait"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._least(candidates, SLOT_EXCESS_THEN_TOKENS)
