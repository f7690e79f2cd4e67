"""The dispatcher's channels to its workers: one per worker address (`pdlb.common.channel_pool`), so
a worker that left, or took over a static entry under a new id, keeps serving the streams it has."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from pdlb.common import channel_pool
from pdlb.v1 import scheduler_pb2_grpc


class ChannelPool(channel_pool.ChannelPool):
    @contextlib.asynccontextmanager
    async def scheduler(self, address: str) -> AsyncIterator[scheduler_pb2_grpc.SchedulerStub]:
        """A stub for the worker at `address`; the channel stays open while the block runs."""
        async with self.use(address) as channel:
            yield scheduler_pb2_grpc.SchedulerStub(channel)
