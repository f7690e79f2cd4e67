"""`round_robin`: each live rank in turn (SGLang's and vLLM's default, and pdlb's `auto` for mixed
and decode)."""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import RotatingPolicy, RouteContext


class RoundRobin(RotatingPolicy):
    name = "round_robin"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._rotate(candidates)
