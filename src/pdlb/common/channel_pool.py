"""One gRPC channel per peer address, closed only once nobody uses the address and no call runs on it.

Closing a channel cancels every call on it. Membership flaps (an etcd pause past the lease, a key
deleted and put back) make a peer leave and come back while it keeps serving, so a channel whose
peer left is closed only once its last call has ended, and a peer that returns at the same address
keeps its channel: running streams are never cut by a membership change."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc

from pdlb.common.security import open_channel


class ChannelPool:
    def __init__(self, addresses_in_use: Callable[[], set[str]], options: list | None = None) -> None:
        """`addresses_in_use` is asked at prune time (not when a peer left), so a peer that comes back
        (or another one at the same address) in the meantime keeps the channel. `options`: gRPC
        channel options (default: `grpc_server.CHANNEL_OPTIONS`)."""
        self._addresses_in_use = addresses_in_use
        self._options = options
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: Counter[str] = Counter()

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to `address` (opened on first use). Calls made on it outside `use()` are not
        counted: `prune()` may close it under them."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self._options)
        return channel

    def get(self, address: str) -> grpc.aio.Channel | None:
        """The open channel to `address`, if any."""
        return self._channels.get(address)

    def calls(self, address: str) -> int:
        """Blocks of `use(address)` running now."""
        return self._calls[address]

    @contextlib.asynccontextmanager
    async def use(self, address: str) -> AsyncIterator[grpc.aio.Channel]:
        """The channel to `address`, kept open while the block runs."""
        channel = self.channel(address)
        self._calls[address] += 1
        try:
            yield channel
        finally:
            self._calls[address] -= 1
            if not self._calls[address]:
                del self._calls[address]
                if address not in self._addresses_in_use():
                    await self._discard(address)

    async def prune(self) -> None:
        """Close the idle channels of addresses nobody uses any more; busy ones are closed when their
        last call ends."""
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
