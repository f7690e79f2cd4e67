"""The worker's prefix-cache events for dispatchers: each cached block stored or evicted, numbered,
so every dispatcher (every replica) can keep an exact index of what this worker caches.

Events go out on each dispatcher's report stream, netted per report (a block stored and evicted
between two reports is in neither list). A stream starts with a snapshot (every block cached now),
and gets one again when the dispatcher asks (it saw a gap) or when it fell further behind than the
log keeps. Memory is bounded: the log keeps `max_events`, the live set is the cache's own size.
"""

from __future__ import annotations

from collections import deque

from pdlb.v1 import load_report_pb2

STORED, REMOVED = True, False


class KVEventLog:
    def __init__(self, max_events: int = 65_536) -> None:
        self.seq = 0
        self.live: set[int] = set()
        self._log: deque[tuple[int, bool, int]] = deque(maxlen=max_events)

    def stored(self, name: int) -> None:
        self.seq += 1
        self.live.add(name)
        self._log.append((self.seq, STORED, name))

    def removed(self, name: int) -> None:
        self.seq += 1
        self.live.discard(name)
        self._log.append((self.seq, REMOVED, name))

    def since(self, cursor: int | None) -> load_report_pb2.KVEvents:
        """Events after `cursor` (None: the stream is new, or asked for a snapshot). With nothing
        new the batch is empty but still numbered, so a dispatcher that lost track notices and
        asks for a snapshot."""
        oldest = self._log[0][0] if self._log else self.seq + 1
        if cursor is None or cursor + 1 < oldest:
            return load_report_pb2.KVEvents(
                first_seq=self.seq, last_seq=self.seq, snapshot=True, stored=sorted(self.live)
            )
        if cursor >= self.seq:
            return load_report_pb2.KVEvents(first_seq=self.seq + 1, last_seq=self.seq)
        net: dict[int, bool] = {}
        start = cursor + 1
        for seq, kind, name in reversed(self._log):  # newest first: the last event of a name wins
            if seq < start:
                break
            net.setdefault(name, kind)
        return load_report_pb2.KVEvents(
            first_seq=start,
            last_seq=self.seq,
            stored=[n for n, kind in net.items() if kind is STORED],
            removed=[n for n, kind in net.items() if kind is REMOVED],
        )
