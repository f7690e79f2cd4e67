"""Re-implementations of the peers' DP balancing policies, as benchmark baselines.

They run inside pdlb's dispatcher on the same load reports, so a benchmark compares policies and
not plumbing. Each keeps the accounting of the system it imitates:

- `peer_sglang_round_robin`: SGLang's DataParallelController round robin: the next rank in turn.
- `peer_sglang_minimum_tokens`: the `minimum_tokens` method of SGLang PR #7379: the worker's
  holding tokens plus the tokens of requests dispatched since its last load update ("on-fly"). The
  on-fly list of a worker is cleared whenever the worker publishes its load, whether or not that
  load already includes them, so a request in flight across a report is forgotten.
- `peer_vllm_dp`: vLLM's DP load balancing (DPAsyncMPClient with the DPCoordinator): score =
  waiting * 4 + running from stats the coordinator publishes every 100 ms; between publications
  the front-end adds each of its own dispatches to the chosen engine's waiting count.
- `peer_vllm_token_score`: the same publication scheme scored in tokens, waiting_tokens * 4 +
  running_tokens; each dispatch adds its prompt tokens to the chosen engine's waiting tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies import POLICIES, PolicyOptions, RotatingPolicy, RouteContext, register

VLLM_STATS_INTERVAL_S = 0.1


class PeerSGLangRoundRobin(RotatingPolicy):
    name = "peer_sglang_round_robin"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        return self._rotate(candidates)


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


class PeerVLLMTokenScore(PeerVLLMDP):
    name = "peer_vllm_token_score"
    fields = ("waiting_tokens", "running_tokens")

    def _increment(self, ctx: RouteContext) -> int:
        return ctx.num_tokens


for _cls in (PeerSGLangRoundRobin, PeerSGLangMinimumTokens, PeerVLLMDP, PeerVLLMTokenScore):
    if _cls.name not in POLICIES:
        register(_cls)
