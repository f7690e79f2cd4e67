"""`peer_vllm_dp` (baseline): vLLM's DP load balancing (DPAsyncMPClient with the DPCoordinator):
score = waiting * 4 + running from stats the coordinator publishes every 100 ms; between
publications the front-end adds each of its own dispatches to the chosen engine's waiting count.
Benchmarks only.

Re-implementation with no real counterpart compared here: the real one is the DP coordinator
inside a vLLM server with `--data-parallel-size`, not vllm-router; `bench/vllm_bench.py` can run it
(`vllm_internal`), but no comparison finished on the 2-core CPU machine (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import PolicyOptions, RotatingPolicy, RouteContext

VLLM_STATS_INTERVAL_S = 0.1


class PeerVLLMDP(RotatingPolicy):
    name = "peer_vllm_dp"
    fields = ("waiting_requests", "running_requests")

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self.latest: dict[str, tuple[int, int]] = {}  # worker -> (waiting, running) as last reported
        self.published: dict[str, list[int]] = {}  # what the front-end sees, plus its local increments
        self._published_at = float("-inf")

    def on_report(self, entry: WorkerEntry) -> None:
        r = entry.reported
        waiting, running = (getattr(r, f) for f in self.fields)
        self.latest[entry.worker.worker_id] = (waiting, running)
        now = time.monotonic()
        if now - self._published_at >= VLLM_STATS_INTERVAL_S:
            # The coordinator's periodic publication replaces the front-end's counts wholesale.
            self._published_at = now
            self.published = {worker: list(counts) for worker, counts in self.latest.items()}

    def _score(self, entry: WorkerEntry) -> int:
        waiting, running = self.published.get(entry.worker.worker_id, (0, 0))
        return waiting * 4 + running

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._least(candidates, self._score)

    def on_dispatch(self, ctx: RouteContext, chosen: WorkerEntry) -> None:
        counts = self.published.setdefault(chosen.worker.worker_id, [0, 0])
        counts[0] += self._increment(ctx)  # local increment until the next publication

    def _increment(self, ctx: RouteContext) -> int:
        return 1

    def on_worker_removed(self, worker_id: str) -> None:
        self.latest.pop(worker_id, None)
        self.published.pop(worker_id, None)
