"""`peer_sglang_round_robin` (baseline): SGLang's DataParallelController round robin, the next
rank in turn. Benchmarks only."""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import RotatingPolicy, RouteContext


class PeerSGLangRoundRobin(RotatingPolicy):
    name = "peer_sglang_round_robin"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._rotate(candidates)
