"""The dispatchers a gateway sends to, per role: found in etcd (and kept current) or given as flags.

Replicas of a role take requests in turn (one rotation per role). A replica whose connection broke
under a request is avoided for `SUSPECT_S` while others are healthy, so after a kill -9 new requests
go elsewhere at once instead of failing until the dead replica's lease expires. Channels live in a
`ChannelPool`: a dispatcher that leaves the membership (an etcd pause past the lease, a deleted key)
keeps its channel while calls run on it, so a membership flap never cuts running requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Collection

import grpc

from pdlb.common.channel_pool import ChannelPool
from pdlb.common.grpc_server import CHANNEL_OPTIONS
from pdlb.common.membership import Change, PrefixWatch, dispatchers_prefix
from pdlb.v1 import dispatch_pb2_grpc

log = logging.getLogger(__name__)
ROLES = ("mixed", "prefill", "decode")
SUSPECT_S = 10.0  # how long a replica whose connection broke is passed over (a lease TTL, about)
# wait_reachable re-asks the channels at least this often (besides waking on their state changes)
POLL_MIN_S, POLL_MAX_S = 0.05, 0.5
# gRPC reconnects to a lost peer after 1 s, then backs off up to 120 s (x1.6 a try): a dispatcher back
# after 3 s would be seen only after 5.2 s. Requests wait for it (--dispatcher-wait), so try at least
# every second: one connection attempt a second to a dead local address is cheap.
DISPATCHER_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Upstreams:
    """Addresses of the dispatchers of each role, a channel per address, round robin among replicas."""

    def __init__(self, static: dict[str, list[str]]) -> None:
        self.static = {role: list(static.get(role, [])) for role in ROLES}
        self.found: dict[str, dict[str, str]] = {role: {} for role in ROLES}  # role -> etcd key -> address
        self.models: dict[str, str] = {}  # dispatcher address -> model id it routes
        self._pool = ChannelPool(self._known, DISPATCHER_CHANNEL_OPTIONS)
        self._turns = {role: itertools.count() for role in ROLES}
        self._broken: dict[str, float] = {}  # address -> monotonic time its connection last broke (known ones)
        self._changed = asyncio.Event()
        self._watch: PrefixWatch | None = None

    def watch(self, etcd: str, prefix: str) -> PrefixWatch:
        self._watch = PrefixWatch(etcd, dispatchers_prefix(prefix), self._on_change)
        self._watch.start()
        return self._watch

    def _on_change(self, change: Change) -> None:
        role = change.key.rstrip("/").split("/")[-2]
        if role not in ROLES:
            return
        self._changed.set()
        self._changed = asyncio.Event()
        if change.value is None:
            address = self.found[role].pop(change.key, None)
            log.info("%s dispatcher left: %s", role, address)
            if address and address not in self._known():
                self._broken.pop(address, None)
                # closed only if no call runs on it by then, and it has not come back meanwhile
                asyncio.get_running_loop().create_task(self._pool.prune())
            return
        address = str(change.value.get("address", ""))
        if address:
            self.found[role][change.key] = address
            self.models[address] = str(change.value.get("model", ""))
            log.info("%s dispatcher found: %s", role, address)

    def _known(self) -> set[str]:
        return {address for role in ROLES for address in self.addresses(role)}

    def addresses(self, role: str) -> list[str]:
        return sorted({*self.static[role], *self.found[role].values()})

    def mode(self) -> str | None:
        """mixed when a mixed dispatcher is known, else pd when both halves are, else None."""
        if self.addresses("mixed"):
            return "mixed"
        if self.addresses("prefill") and self.addresses("decode"):
            return "pd"
        return None

    async def wait_mode(self, timeout: float) -> str | None:
        """`mode()`, waiting up to `timeout` seconds for dispatchers to be known (a membership flap:
        every key deleted and put back within moments)."""
        deadline = time.monotonic() + timeout
        while (mode := self.mode()) is None and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return mode

    def pick(self, role: str, avoid: Collection[str] = ()) -> str | None:
        """A dispatcher of the role, in turn over its replicas; replicas in `avoid` (they failed this
        request) and replicas whose connection broke lately are taken only when no other is left."""
        addresses = self.addresses(role)
        if not addresses:
            return None
        start = next(self._turns[role])
        turn = [addresses[(start + i) % len(addresses)] for i in range(len(addresses))]
        now = time.monotonic()
        # min keeps the first of equals: the rotation decides among the healthy ones
        return min(turn, key=lambda a: (now - self._broken.get(a, -SUSPECT_S) < SUSPECT_S, a in avoid))

    @contextlib.asynccontextmanager
    async def dispatcher(self, address: str) -> AsyncIterator[dispatch_pb2_grpc.DispatchStub]:
        """A stub for `address` whose channel stays open while the block runs, even if the dispatcher
        leaves the membership meanwhile."""
        async with self._pool.use(address) as channel:
            yield dispatch_pb2_grpc.DispatchStub(channel)

    def unreachable(self, roles: Collection[str]) -> list[str]:
        """The `roles` none of whose known replicas has a connection up now (the replicas are asked
        to connect): a role with no replica known counts too. [] when every role has one."""
        return [role for role in roles if not any(self._ready(a) for a in self.addresses(role))]

    def _ready(self, address: str) -> bool:
        channel = self._pool.channel(address)
        if channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
            return False
        self._broken.pop(address, None)  # it is back: no longer passed over
        return True

    async def wait_reachable(self, roles: Collection[str], timeout: float) -> list[str]:
        """Wait up to `timeout` seconds until each of `roles` has a replica whose connection is up (a
        dispatcher restarting on its address, or a new one joining); returns `unreachable(roles)` at
        the end: [] when one is up. Wakes on each channel state change and membership change, and
        re-asks at least every POLL_MAX_S (doubling from POLL_MIN_S), so it never waits past `timeout`."""
        deadline = time.monotonic() + timeout
        poll = POLL_MIN_S
        while (down := self.unreachable(roles)) and (left := deadline - time.monotonic()) > 0:
            async with contextlib.AsyncExitStack() as stack:
                waits = [asyncio.ensure_future(self._changed.wait())]
                for role in down:
                    for address in self.addresses(role):
                        channel = await stack.enter_async_context(self._pool.use(address))
                        state = channel.get_state(try_to_connect=True)
                        waits.append(asyncio.ensure_future(channel.wait_for_state_change(state)))
                try:
                    await asyncio.wait(waits, timeout=min(poll, left), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()
                    await asyncio.gather(*waits, return_exceptions=True)
            poll = min(poll * 2, POLL_MAX_S)
        return down

    def check_broken(self, address: str) -> bool:
        """After a failed call: True (and the replica passed over for a while) when the connection to
        the dispatcher itself is down, not merely a request that failed behind a live dispatcher."""
        channel = self._pool.get(address)
        if channel is not None and channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY:
            return False
        if address in self._known():  # bounded: only known dispatchers are tracked
            self._broken[address] = time.monotonic()
        log.warning("dispatcher %s is unreachable; passing it over for %.0fs", address, SUSPECT_S)
        return True

    async def close(self) -> None:
        if self._watch:
            await self._watch.close()
        await self._pool.close()
