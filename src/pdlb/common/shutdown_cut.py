"""Streamed calls that a shutdown may cut once its grace runs out, failing each with a reason a
person can act on (the shutdown and the grace), shared by the gateway and the dispatcher.

The cut lands where a call's stream would give its next chunk: at once while the call awaits its
upstream (that await is cancelled), else as soon as its consumer asks for more. It never lands as a
cancellation inside the server's own write of a chunk, where gRPC would end the call with its own
"Cancelling all calls" and an HTTP stream would stop with no error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Cut(Exception):
    """The shutdown cut this call; str(): why, naming the shutdown and the grace."""


class ShutdownCut:
    """The tasks serving streamed calls (bounded by the caller's own limit on calls in flight).
    Not thread-safe: one asyncio loop owns it.

    `shutting_down`: how the service names its shutdown, e.g. "the gateway is shutting down".
    """

    def __init__(self, shutting_down: str) -> None:
        self.shutting_down = shutting_down
        self.running: set[asyncio.Task] = set()
        self.upstream_waits: set[asyncio.Task] = set()  # running tasks awaiting their next chunk
        self.cut: set[asyncio.Task] = set()  # those cut, failed where they next ask for a chunk
        self.why = ""  # set when the grace ran out: the cut calls' failure

    async def stream(self, chunks: AsyncGenerator[T, None]) -> AsyncIterator[T]:
        """`chunks`, for the current task, counted as running; raises Cut once the shutdown cut it.
        Closes `chunks` when it ends (at once, not when collected: that ends upstream calls); wrap
        the iteration in `contextlib.aclosing` so that happens when the consumer stops early too."""
        task = asyncio.current_task()
        assert task is not None
        self.running.add(task)
        try:
            while task not in self.cut:
                self.upstream_waits.add(task)
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if task not in self.cut:
                        raise  # the client went away
                    task.uncancel()  # the shutdown's cut: failed, not cancelled
                    break
                finally:
                    self.upstream_waits.discard(task)
                yield chunk
            raise Cut(self.why)
        finally:
            self.running.discard(task)
            self.cut.discard(task)
            await chunks.aclose()

    async def end(self, grace_s: float, settle_s: float) -> None:
        """Shutting down: wait up to `grace_s` seconds for the running calls to finish, then cut
        those still running and wait up to `settle_s` seconds for them to send their failure."""
        deadline = time.monotonic() + grace_s
        while self.running and time.monotonic() < deadline:
            await asyncio.wait(set(self.running), timeout=deadline - time.monotonic())
        if not self.running:
            return
        self.why = (
            f"{self.shutting_down} and its --shutdown-grace ({grace_s:g} s) ran out while the request ran; "
            "send it again elsewhere"
        )
        log.warning("shutdown grace ran out: cutting %d request(s) still running", len(self.running))
        tasks = set(self.running)
        self.cut |= tasks
        for task in tasks & self.upstream_waits:
            task.cancel()
        await asyncio.wait(tasks, timeout=settle_s)
