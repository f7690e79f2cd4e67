"""The dispatchers a gateway sends to, per role: found in etcd (and kept current) or given as flags."""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from pdlb.common.membership import Change, PrefixWatch, dispatchers_prefix
from pdlb.common.security import open_channel
from pdlb.v1 import dispatch_pb2_grpc

log = logging.getLogger(__name__)
ROLES = ("mixed", "prefill", "decode")


class Upstreams:
    """Addresses of the dispatchers of each role, a channel per address, round robin among replicas."""

    def __init__(self, static: dict[str, list[str]]) -> None:
        self.static = {role: list(static.get(role, [])) for role in ROLES}
        self.found: dict[str, dict[str, str]] = {role: {} for role in ROLES}  # role -> etcd key -> address
        self.models: dict[str, str] = {}  # dispatcher address -> model id it routes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._turn = itertools.count()
        self._watch: PrefixWatch | None = None

    def watch(self, etcd: str, prefix: str) -> PrefixWatch:
        self._watch = PrefixWatch(etcd, dispatchers_prefix(prefix), self._on_change)
        self._watch.start()
        return self._watch

    def _on_change(self, change: Change) -> None:
        role = change.key.rstrip("/").split("/")[-2]
        if role not in ROLES:
            return
        if change.value is None:
            address = self.found[role].pop(change.key, None)
            log.info("%s dispatcher left: %s", role, address)
            if address and not any(address in self.addresses(r) for r in ROLES):
                channel = self._channels.pop(address, None)
                if channel is not None:  # bounded: no channel outlives its dispatcher
                    asyncio.get_running_loop().create_task(channel.close())
            return
        address = str(change.value.get("address", ""))
        if address:
            self.found[role][change.key] = address
            self.models[address] = str(change.value.get("model", ""))
            log.info("%s dispatcher found: %s", role, address)

    def addresses(self, role: str) -> list[str]:
        return sorted({*self.static[role], *self.found[role].values()})

    def mode(self) -> str | None:
        """mixed when a mixed dispatcher is known, else pd when both halves are, else None."""
        if self.addresses("mixed"):
            return "mixed"
        if self.addresses("prefill") and self.addresses("decode"):
            return "pd"
        return None

    def stub(self, role: str) -> tuple[str, dispatch_pb2_grpc.DispatchStub] | None:
        """A dispatcher of the role (round robin over its replicas)."""
        addresses = self.addresses(role)
        if not addresses:
            return None
        address = addresses[next(self._turn) % len(addresses)]
        return address, dispatch_pb2_grpc.DispatchStub(self.channel(address))

    def channel(self, address: str) -> grpc.aio.Channel:
        """The one channel to a dispatcher (requests and the dashboard's WatchLoad share it)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address)
        return channel

    async def close(self) -> None:
        if self._watch:
            await self._watch.close()
        for channel in self._channels.values():
            await channel.close()
