"""Room records: record-once, waitable, expiring and bounded.

Bound policy: when `max_rooms` records are held, expired records are dropped first; if none has
expired the registration fails with `TableFull` (RESOURCE_EXHAUSTED), because evicting a live
record would strand the decode side of a request that is still in progress.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Room:
    room: int
    prefill_dp_rank: int
    prefill_worker_id: str
    prefill_address: str
    expires_at: float  # table clock (monotonic) seconds

    def same_owner(self, other: Room) -> bool:
        return (self.prefill_dp_rank, self.prefill_worker_id, self.prefill_address) == (
            other.prefill_dp_rank,
            other.prefill_worker_id,
            other.prefill_address,
        )


class RoomConflict(Exception):
    """The room is already recorded with a different rank or worker."""

    def __init__(self, existing: Room) -> None:
        super().__init__(
            f"room {existing.room} is already recorded for prefill rank {existing.prefill_dp_rank} "
            f"(worker {existing.prefill_worker_id!r})"
        )
        self.existing = existing


class TableFull(Exception):
    """No place for one more record (or one more waiter)."""


class RoomTable:
    def __init__(
        self,
        max_rooms: int,
        ttl_s: float,
        max_waiters: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rooms < 1 or ttl_s <= 0:
            raise ValueError("max_rooms must be >= 1 and ttl_s > 0")
        self.max_rooms, self.ttl_s, self.max_waiters, self.clock = max_rooms, ttl_s, max_waiters, clock
        self._rooms: OrderedDict[int, Room] = OrderedDict()  # insertion order == expiry order
        self._waiters: dict[int, asyncio.Event] = {}
        self._waiting = 0
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self._rooms)

    def register(self, room: Room) -> tuple[Room, bool]:
        """Store `room` (expiry set from the TTL). Returns (stored record, created)."""
        self.sweep()
        existing = self._rooms.get(room.room)
        if existing is not None:
            if existing.same_owner(room):
                return existing, False
            raise RoomConflict(existing)
        if len(self._rooms) >= self.max_rooms:
            raise TableFull(
                f"bootstrap table holds {self.max_rooms} unexpired rooms (--max-rooms); retry later or raise the limit"
            )
        stored = replace(room, expires_at=self.clock() + self.ttl_s)
        self._rooms[room.room] = stored
        event = self._waiters.pop(room.room, None)
        if event is not None:
            event.set()  # wakes every waiter of this room
        return stored, True

    def get(self, room: int) -> Room | None:
        record = self._rooms.get(room)
        if record is not None and record.expires_at <= self.clock():
            self.sweep()
            return None
        return record

    async def lookup(self, room: int, wait_s: float) -> Room | None:
        """The record, waiting up to `wait_s` for it to be registered."""
        record = self.get(room)
        if record is not None or wait_s <= 0:
            return record
        if self._waiting >= self.max_waiters:
            raise TableFull(f"{self.max_waiters} look-ups are already waiting; retry later")
        event = self._waiters.setdefault(room, asyncio.Event())
        self._waiting += 1
        try:
            await asyncio.wait_for(event.wait(), timeout=wait_s)
        except asyncio.TimeoutError:
            return None
        finally:
            self._waiting -= 1
            if self._waiters.get(room) is event and not event.is_set() and self._no_other_waiter(event):
                del self._waiters[room]
        return self.get(room)

    @staticmethod
    def _no_other_waiter(event: asyncio.Event) -> bool:
        return not event._waiters  # type: ignore[attr-defined]  # asyncio keeps its waiters here

    def sweep(self) -> int:
        """Drop expired records; returns how many."""
        now, dropped = self.clock(), 0
        while self._rooms:
            first = next(iter(self._rooms.values()))
            if first.expires_at > now:
                break
            self._rooms.popitem(last=False)
            dropped += 1
        self.expired_total += dropped
        return dropped

    @property
    def waiting(self) -> int:
        return self._waiting
