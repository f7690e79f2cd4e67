"""`total_requests`: fewest running + waiting + in-flight requests (exact in-flight accounting);
ties rotate. The best of pdlb's methods with lockstep DP groups in our benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import TOTAL_REQUESTS, RotatingPolicy, RouteContext


class TotalRequests(RotatingPolicy):
    name = "total_requests"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._least(candidates, TOTAL_REQUESTS)
