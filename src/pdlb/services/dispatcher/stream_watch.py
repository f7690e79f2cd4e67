"""Streams to workers that left membership and went silent: a hung worker is cut, not waited on.

A worker frozen (SIGSTOP, a stuck GPU driver, a paused VM) loses its etcd lease and leaves the
table within its lease TTL, but its TCP connection stays open, so the streams already running on it
would wait for gRPC keep-alive (tens of seconds) or the request deadline. A worker that left only
because etcd flapped is still streaming tokens, and comes back within moments. So a stream is cut
when both hold: its worker is out of the table, and it sent nothing for `timeout_s` seconds. The
dispatcher then fails it UNAVAILABLE after the first token (the gateway resumes it on another rank)
or re-dispatches it before one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger("pdlb.dispatcher")


@dataclass(eq=False)
class WatchedStream:
    """One forwarded call: when it last produced a chunk (monotonic seconds), and how to cut it."""

    cancel: Callable[[], object]
    last_chunk_at: float = field(default_factory=time.monotonic)
    hung_for_s: float = 0.0  # > 0 once cut as hung: how long it had been silent

    def touch(self) -> None:
        self.last_chunk_at = time.monotonic()


class HungStreamWatch:
    """Open streams per worker id; cuts the silent ones of workers that left.

    `timeout_s` 0 disables the watch. `present(worker_id)` says whether the worker is (back) in the
    membership table; a worker that rejoins before its streams go silent for `timeout_s` keeps them.
    The registry is bounded by the dispatcher's concurrent-request limit (one entry per call).
    """

    def __init__(self, timeout_s: float, present: Callable[[str], bool]) -> None:
        self.timeout_s, self.present = timeout_s, present
        self.streams: dict[str, set[WatchedStream]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @contextlib.contextmanager
    def watching(self, worker_id: str, cancel: Callable[[], object]) -> Iterator[WatchedStream]:
        """Register a call for the duration of the block."""
        stream = WatchedStream(cancel)
        self.streams.setdefault(worker_id, set()).add(stream)
        try:
            yield stream
        finally:
            open_ones = self.streams.get(worker_id)
            if open_ones is not None:
                open_ones.discard(stream)
                if not open_ones:
                    del self.streams[worker_id]

    def on_worker_left(self, worker_id: str) -> None:
        """Start checking the worker's streams (called from membership, on the event loop)."""
        if self.timeout_s <= 0 or worker_id not in self.streams or worker_id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._check(worker_id))
        self._tasks[worker_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(worker_id, None))

    async def _check(self, worker_id: str) -> None:
        # Check a few times per timeout, so a stream is cut at most timeout_s * 1.25 after its last chunk.
        while self.streams.get(worker_id) and not self.present(worker_id):
            now = time.monotonic()
            for stream in list(self.streams.get(worker_id, ())):
                silent_s = now - stream.last_chunk_at
                if silent_s >= self.timeout_s and not stream.hung_for_s:
                    stream.hung_for_s = silent_s
                    log.warning(
                        "worker %s left membership and its stream sent nothing for %.1fs: cutting it",
                        worker_id,
                        silent_s,
                    )
                    stream.cancel()
            await asyncio.sleep(self.timeout_s / 4)  # polling the streams' clocks, not waiting for an event
