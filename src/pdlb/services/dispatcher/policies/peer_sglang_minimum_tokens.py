"""`peer_sglang_minimum_tokens` (baseline): the `minimum_tokens` method of SGLang PR #7379: the
worker's holding tokens plus the tokens of requests dispatched since its last load update
("on-fly"). The on-fly list of a worker is cleared whenever the worker publishes its load, whether
or not that load already includes them, so a request in flight across a report is forgotten.
Benchmarks only.

Re-implementation with no real counterpart here: `minimum_tokens` is a load-balance method of
SGLang's in-engine DP controller (an SGLang server, not installed here), not a router policy; smg
0.3.2 has none.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import PolicyOptions, RotatingPolicy, RouteContext


class PeerSGLangMinimumTokens(RotatingPolicy):
    name = "peer_sglang_minimum_tokens"

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self.onfly: dict[str, int] = {}

    def _score(self, entry: WorkerEntry) -> int:
        r = entry.reported
        return r.running_tokens + r.waiting_tokens + self.onfly.get(entry.worker.worker_id, 0)

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._least(candidates, self._score)

    def on_dispatch(self, ctx: RouteContext, chosen: WorkerEntry) -> None:
        key = chosen.worker.worker_id
        self.onfly[key] = self.onfly.get(key, 0) + ctx.num_tokens

    def on_report(self, entry: WorkerEntry) -> None:
        self.onfly.pop(entry.worker.worker_id, None)

    def on_worker_removed(self, worker_id: str) -> None:
        self.onfly.pop(worker_id, None)
