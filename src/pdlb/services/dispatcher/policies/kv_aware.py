"""`kv_aware`: lowest KV utilisation (used + in-flight over capacity); a rank without room for the
request's tokens gets nothing while another rank has room. Meant for KV-starved decode."""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import WorkerEntry
from pdlb.services.dispatcher.policies.base import KV_RATIO, RotatingPolicy, RouteContext


class KVAware(RotatingPolicy):
    name = "kv_aware"

    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        fitting = [e for e in candidates if e.kv_free >= ctx.num_tokens]
        return self._least(fitting or candidates, KV_RATIO)
