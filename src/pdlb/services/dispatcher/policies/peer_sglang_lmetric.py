"""`peer_sglang_lmetric` (baseline): the SGLang model gateway's `lmetric` policy as this project's
issue states it from the gateway's documentation: score = new prefill tokens after the prefix
match x (worker load + 1), lowest wins. New prefill tokens are the prompt less the prefix the
worker is believed to cache (the approximate index of what this dispatcher sent where); load is the
worker's running + waiting requests plus this dispatcher's requests in flight. Benchmarks only.

Re-implementation with no real counterpart here: smg 0.3.2 (the version on PyPI) offers `random`,
`round_robin`, `cache_aware`, `power_of_two`, `manual` and, for prefill, `bucket`; no `lmetric`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import PrefixIndexPolicy, RouteContext


class PeerSGLangLMetric(PrefixIndexPolicy):
    name = "peer_sglang_lmetric"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        names = ctx.blocks(self.index)
        overlap = self.matches(names)
        block = self.index.block_size

        def score(entry: WorkerEntry) -> float:
            new_tokens = max(1, ctx.num_tokens - overlap.get(entry.worker.worker_id, 0) * block)
            return new_tokens * (entry.total_requests + 1)

        return self._least(candidates, score)
