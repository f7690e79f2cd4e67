"""The exact prefix index: what each worker caches, from the block events it reports.

Workers number their prefix-cache events and send them netted per report; a snapshot replaces
what is known of a worker. A batch that does not start right after the last one applied (a gap:
a lost report, a restarted stream) is not applied: the worker is marked unsynced, asked for a
snapshot, and policies fall back to the approximate index for it until the snapshot arrives. So
every dispatcher replica converges to each worker's true cache. Bounded: a worker may hold at most
`max_blocks_per_worker` names (its whole KV cache in blocks is far less); beyond that it is dropped
and asked for a snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.prefix_index import nested_depths, unhold
from pdlb.v1 import load_report_pb2


class ExactPrefixIndex:
    def __init__(self, max_blocks_per_worker: int = 1 << 20) -> None:
        self.max_blocks_per_worker = max_blocks_per_worker
        self.blocks: dict[str, set[int]] = {}
        self.holders: dict[int, set[str]] = {}
        self.next_seq: dict[str, int] = {}  # worker -> first sequence number the next batch must have

    def synced(self, worker: str) -> bool:
        return worker in self.next_seq

    def apply(self, worker: str, events: load_report_pb2.KVEvents) -> bool:
        """Apply a batch; returns True when a snapshot is needed (the batch did not follow on)."""
        if events.snapshot:
            self.forget(worker)
            self.blocks[worker] = set()
        elif self.next_seq.get(worker) != events.first_seq:
            self.next_seq.pop(worker, None)  # unsynced until a snapshot
            return True
        mine = self.blocks.setdefault(worker, set())
        for name in events.removed:
            if name in mine:
                mine.discard(name)
                unhold(self.holders, name, worker)
        for name in events.stored:
            if name not in mine:
                mine.add(name)
                self.holders.setdefault(name, set()).add(worker)
        if len(mine) > self.max_blocks_per_worker:
            self.forget(worker)
            return True
        self.next_seq[worker] = events.last_seq + 1
        return False

    def match(self, names: Sequence[int], workers: set[str] | None = None) -> dict[str, int]:
        """Synced workers holding a prefix of `names`, with its length in blocks (a radix cache holds
        every block above a cached one, so the holder sets nest)."""
        depths = nested_depths(self.holders, names)
        return {w: d for w, d in depths.items() if w in self.next_seq and (workers is None or w in workers)}

    def forget(self, worker: str) -> None:
        for name in self.blocks.pop(worker, ()):
            unhold(self.holders, name, worker)
        self.next_seq.pop(worker, None)
