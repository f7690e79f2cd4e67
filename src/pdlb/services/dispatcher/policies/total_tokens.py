"""`total_tokens`: fewest running + waiting + in-flight tokens; ties rotate."""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import TOTAL_TOKENS, RotatingPolicy, RouteContext


class TotalTokens(RotatingPolicy):
    name = "total_tokens"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._least(candidates, TOTAL_TOKENS)
