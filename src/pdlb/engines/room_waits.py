"""PullKV calls waiting for a bootstrap room's prefill to finish on this prefill worker.

Both engines hold a room's hand-off (pdlb's KV slots, or a vLLM connector's params) until a decode
side pulls it; a pull that arrives first waits here for the hold, bounded in number and in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc

from pdlb.engines.request import AdmissionError

MAX_ROOM_WAITS = 10_000  # PullKV calls waiting for their rooms at once

Held = TypeVar("Held")


class RoomWaits:
    """One event per room that pulls wait on; `held(room)` wakes them."""

    def __init__(self, limit: int = MAX_ROOM_WAITS) -> None:
        self.limit = limit
        self._events: dict[int, asyncio.Event] = {}

    def held(self, room: int) -> None:
        """The room's hand-off is now held here: wake the pulls waiting for it."""
        event = self._events.pop(room, None)
        if event is not None:
            event.set()

    async def take(
        self,
        room: int,
        timeout: float,
        take_held: Callable[[int], Held | None],
        raise_if_released: Callable[[int], None],
    ) -> Held | None:
        """`take_held(room)` now or once the room is held, waiting up to `timeout` s; None when the
        wait ran out. `raise_if_released` raises (NOT_FOUND) for a room that was held and is gone:
        waiting could never bring it back. RESOURCE_EXHAUSTED past `limit` waiting rooms."""
        held = take_held(room)
        if held is not None:
            return held
        raise_if_released(room)
        if timeout <= 0:
            return None
        if room not in self._events and len(self._events) >= self.limit:
            raise AdmissionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.limit} pulls already wait for their rooms here"
            )
        event = self._events.setdefault(room, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            if self._events.get(room) is event and not event._waiters:  # type: ignore[attr-defined]
                del self._events[room]
        held = take_held(room)
        if held is None:  # another pull of the same room took it first
            raise_if_released(room)
        return held
