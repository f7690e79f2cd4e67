"""One gRPC channel per worker address, closed when the address leaves."""

from __future__ import annotations

import grpc

from pdlb.common.security import open_channel
from pdlb.v1 import scheduler_pb2_grpc


class ChannelPool:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def scheduler(self, address: str) -> scheduler_pb2_grpc.SchedulerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address)
            self._channels[address] = channel
        return scheduler_pb2_grpc.SchedulerStub(channel)

    async def discard(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace=None)

    async def prune(self, in_use: set[str]) -> None:
        """Close the channels of addresses no worker uses any more (workers come and go)."""
        for address in [a for a in self._channels if a not in in_use]:
            await self.discard(address)

    async def close(self) -> None:
        for address in list(self._channels):
            await self.discard(address)
