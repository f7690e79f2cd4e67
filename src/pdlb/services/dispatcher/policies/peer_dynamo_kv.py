"""`peer_dynamo_kv` (baseline): Dynamo's KV router cost, as its router documentation states it
(docs.nvidia.com/dynamo, components/router, "Cost Function"): for each worker
    cost = overlap_score_weight * prefill_blocks + decode_blocks
where prefill_blocks are the request's blocks that worker would have to compute (its blocks less
the prefix the worker already caches) and decode_blocks the worker's active KV blocks; with the
default weight 1.0 and temperature 0.0 the lowest cost wins. Dynamo learns the overlap from its
workers' KV events (or, in its approximation mode, from its own routing decisions): here the
approximate index of what this dispatcher sent where stands in. Active blocks are the reported KV
in use (less the evictable prefix cache) plus the tokens in flight. Benchmarks only.

Re-implementation with no real counterpart here: Dynamo (PyPI ai-dynamo) routes only to workers
registered in its own runtime (its discovery and KV event plane), not to a URL per DP rank as
pdlb's ranks are served; wiring it in was not tried. vllm-router's `kv_aware` needs the workers'
KV events too.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import PrefixIndexPolicy, RouteContext

OVERLAP_SCORE_WEIGHT = 1.0


class PeerDynamoKV(PrefixIndexPolicy):
    name = "peer_dynamo_kv"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        block = self.index.block_size
        names = ctx.blocks(self.index)
        request_blocks = -(-ctx.num_tokens // block)
        overlap = self.matches(names)

        def cost(entry: WorkerEntry) -> float:
            prefill = request_blocks - overlap.get(entry.worker.worker_id, 0)
            decode = max(entry.kv_used, 0) / block
            return OVERLAP_SCORE_WEIGHT * prefill + decode

        return self._least(candidates, cost)
