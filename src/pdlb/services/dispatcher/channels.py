"""One gRPC channel per worker address, closed when no worker uses the address any more.

Closing a channel cancels every call on it, so a channel whose worker left (or took over a static
entry under a new id) is closed only once its last call has ended: the worker may still be serving
those streams, and cutting them would lose requests that were about to complete."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc

from pdlb.common.security import open_channel
from pdlb.v1 import scheduler_pb2_grpc


class ChannelPool:
    def __init__(self, addresses_in_use: Callable[[], set[str]]) -> None:
        """`addresses_in_use` is asked at prune time (not when a worker left), so a worker that
        replaces another at the same address in the meantime keeps the channel."""
        self._addresses_in_use = addresses_in_use
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def scheduler(self, address: str) -> AsyncIterator[scheduler_pb2_grpc.SchedulerStub]:
        """A stub for the worker at `address`; the channel stays open while the block runs."""
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address)
            self._channels[address] = channel
        self._calls[address] += 1
        try:
            yield scheduler_pb2_grpc.SchedulerStub(channel)
        finally:
            self._calls[address] -= 1
            if not self._calls[address]:
                del self._calls[address]
                if address not in self._addresses_in_use():
                    await self._discard(address)

    async def prune(self) -> None:
        """Close the idle channels of addresses no worker uses any more (workers come and go);
        busy ones are closed when their last call ends."""
        in_use = self._addresses_in_use()
        for address in [a for a in self._channels if a not in in_use and not self._calls[a]]:
            await self._discard(address)

    async def _discard(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace=None)

    async def close(self) -> None:
        for address in list(self._channels):
            await self._discard(address)
