"""`peer_sglang_round_robin` (baseline): SGLang's DataParallelController round robin, the next
rank in turn. Benchmarks only.

Real counterpart: the `round_robin` of smg (sglang-router 0.3.2) and of vllm-router 0.1.17,
run in front of pdlb's ranks; `tests/test_peer_routers.py` checks that both make the same
decisions (each rank once per cycle).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import RotatingPolicy, RouteContext


class PeerSGLangRoundRobin(RotatingPolicy):
    name = "peer_sglang_round_robin"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._rotate(candidates)
