"""`peer_llmd` (baseline): llm-d's default scheduling profile (the inference scheduler's
documentation: queue scorer weight 2, prefix-cache scorer weight 3, max-score picker). Each scorer
gives a worker a score in [0, 1]:
- queue: (max queue - its queue) / (max queue - min queue) over the candidates (1 for all when
  equal), queue = waiting requests plus this dispatcher's requests in flight;
- prefix cache: the share of the request's blocks the worker is believed to cache, from the
  approximate index of what this dispatcher sent where (llm-d's approximate prefix cache plugin
  works the same way);
and the highest weighted sum wins, ties rotating. Benchmarks only.

Re-implementation with no real counterpart here: llm-d's inference scheduler runs as a Kubernetes
gateway extension (Go), not installable from PyPI.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import PrefixIndexPolicy, RouteContext

QUEUE_WEIGHT, PREFIX_WEIGHT = 2.0, 3.0


class PeerLLMD(PrefixIndexPolicy):
    name = "peer_llmd"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        names = ctx.blocks(self.index)
        overlap = self.matches(names)
        queues = [e.reported.waiting_requests + e.inflight_requests for e in candidates]
        low, high = min(queues), max(queues)

        def negative_score(entry: WorkerEntry, queue: int) -> float:
            queue_score = 1.0 if high == low else (high - queue) / (high - low)
            prefix_score = overlap.get(entry.worker.worker_id, 0) / len(names) if names else 0.0
            return -(QUEUE_WEIGHT * queue_score + PREFIX_WEIGHT * prefix_score)

        scores = {id(e): negative_score(e, q) for e, q in zip(candidates, queues, strict=True)}
        return self._least(candidates, lambda e: scores[id(e)])
