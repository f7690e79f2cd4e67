"""Finds the bootstrap server: a fixed address, or whichever one is registered in etcd.

A membership flap (an etcd pause past the lease, the key deleted and put back) must not cut the
calls that run: the last known address stays in use while no bootstrap is registered (a server
that is really gone fails its calls with UNAVAILABLE), and the channel of a replaced server is
closed with a grace period, so the room look-ups waiting on it still get their answers."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from pdlb.common.membership import Change, PrefixWatch, bootstrap_prefix
from pdlb.common.security import open_channel
from pdlb.v1 import bootstrap_pb2_grpc

DISCOVERY_TIMEOUT_S = 10.0
REPLACED_GRACE_S = 120.0  # calls on a replaced server's channel may finish within this


class BootstrapLocator:
    def __init__(self, address: str, etcd: str, etcd_prefix: str) -> None:
        self.address = address
        self._channel: grpc.aio.Channel | None = None
        self._watch = (
            PrefixWatch(etcd, bootstrap_prefix(etcd_prefix), self._on_change) if etcd and not address else None
        )

    async def start(self) -> None:
        if self._watch:
            self._watch.start()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._watch.synced.wait(), timeout=DISCOVERY_TIMEOUT_S)

    def _on_change(self, change: Change) -> None:
        if change.value is not None and change.value.get("address"):
            self._use(str(change.value["address"]))

    def _use(self, address: str) -> None:
        if address == self.address:
            return
        self.address = address
        if self._channel is not None:
            asyncio.get_running_loop().create_task(self._channel.close(grace=REPLACED_GRACE_S))
        self._channel = None

    def channel(self) -> grpc.aio.Channel | None:
        """The channel to the current bootstrap server, or None when none is known."""
        if not self.address:
            return None
        if self._channel is None:
            self._channel = open_channel(self.address)
        return self._channel

    def stub(self) -> bootstrap_pb2_grpc.BootstrapStub | None:
        """A stub for the current bootstrap server, or None when none is known."""
        channel = self.channel()
        return None if channel is None else bootstrap_pb2_grpc.BootstrapStub(channel)

    async def close(self) -> None:
        if self._watch:
            await self._watch.close()
        if self._channel is not None:
            await self._channel.close()
