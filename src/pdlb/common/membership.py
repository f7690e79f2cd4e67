"""Cluster membership in etcd: leased registrations with keep-alive, and prefix watches.

Key layout under the cluster prefix (default /pdlb):
    {prefix}/workers/{role}/{worker_id}        -> JSON WorkerInfo (scheduler Scheduler API)
    {prefix}/dispatchers/{role}/{dispatcher_id} -> JSON {"dispatcher_id", "role", "address"}
    {prefix}/bootstrap/{server_id}              -> JSON {"address"}
Each key is attached to its owner's lease, so a crashed owner disappears after the lease TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aetcd

from pdlb.common.security import SecureEtcdClient, etcd_security

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with a clear error for a malformed endpoint."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return host or "127.0.0.1", int(port)


def connect_client(endpoint: str) -> aetcd.Client:
    host, port = split_endpoint(endpoint)
    return SecureEtcdClient(etcd_security(), host=host, port=port, timeout=5)


def workers_prefix(prefix: str, role: str | None = None) -> str:
    base = f"{prefix.rstrip('/')}/workers/"
    return f"{base}{role}/" if role else base


def dispatchers_prefix(prefix: str, role: str | None = None) -> str:
    base = f"{prefix.rstrip('/')}/dispatchers/"
    return f"{base}{role}/" if role else base


def bootstrap_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/bootstrap/"


class Backoff:
    """Exponential retry delays, capped, reset after a success."""

    def __init__(self, first: float = RETRY_MIN_S, cap: float = RETRY_MAX_S) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        current, self.delay = self.delay, min(self.delay * 2, self.cap)
        return current

    def reset(self) -> None:
        self.delay = self.first


class LeasedRegistration:
    """Keeps one key alive under a lease until `close()`; re-registers if the lease is lost."""

    def __init__(self, endpoint: str, key: str, value: dict, ttl: int) -> None:
        if ttl < 1:
            raise ValueError("lease TTL must be at least 1 second")
        self.endpoint, self.key, self.ttl = endpoint, key.encode(), ttl
        self.value = json.dumps(value, sort_keys=True).encode()
        self.client = connect_client(endpoint)
        self.lease_id: int | None = None
        self.registered = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Register once (raising if etcd is unreachable), then keep the lease alive in the background."""
        await self._register()
        self._task = asyncio.create_task(self._keepalive(), name=f"lease:{self.key.decode()}")

    async def _register(self) -> None:
        lease = await self.client.lease(self.ttl)
        await self.client.put(self.key, self.value, lease=lease)
        self.lease_id = lease.id
        self.registered.set()
        log.info("registered %s (lease %x, ttl %ss)", self.key.decode(), lease.id, self.ttl)

    async def _keepalive(self) -> None:
        backoff = Backoff()
        while True:
            await asyncio.sleep(max(self.ttl / 3, 0.2))
            try:
                reply = await self.client.refresh_lease(self.lease_id)
                if reply.TTL <= 0:  # the lease expired (etcd was away too long): register anew
                    log.warning("lease of %s expired; registering again", self.key.decode())
                    await self._register()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning("etcd keep-alive for %s failed (%s); retry in %.1fs", self.key.decode(), exc, delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Stop the keep-alive and delete the key at once by revoking the lease."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.lease_id is not None:
            try:
                await asyncio.wait_for(self.client.revoke_lease(self.lease_id), timeout=3)
                log.info("deregistered %s", self.key.decode())
            except Exception as exc:  # etcd unreachable: the lease TTL removes the key instead
                log.warning("could not revoke lease of %s: %s", self.key.decode(), exc)
        with contextlib.suppress(Exception):
            await self.client.close()


@dataclass(frozen=True)
class Change:
    """One membership change: `value` is None for a deletion."""

    key: str
    value: dict | None


class PrefixWatch:
    """Mirrors all keys under a prefix and calls `on_change` for every put and delete.

    On (re)connection it lists the prefix, reports the difference with what it knew, then watches
    from the listed revision, so no change is missed across etcd restarts.
    """

    def __init__(self, endpoint: str, prefix: str, on_change: Callable[[Change], None]) -> None:
        self.endpoint, self.prefix, self.on_change = endpoint, prefix, on_change
        self.known: dict[str, dict] = {}
        self.synced = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client: aetcd.Client | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch:{self.prefix}")

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            self._client = connect_client(self.endpoint)
            try:
                await self._sync_and_watch(backoff)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning("etcd watch on %s failed (%s); resync in %.1fs", self.prefix, exc, delay)
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await self._client.close()

    async def _sync_and_watch(self, backoff: Backoff) -> None:
        listing = await self._client.get_prefix(self.prefix.encode())
        current = {kv.key.decode(): _decode(kv.value) for kv in listing}
        for key in [k for k in self.known if k not in current]:
            self._apply(key, None)
        for key, value in current.items():
            if self.known.get(key) != value:
                self._apply(key, value)
        self.synced.set()
        watch = await self._client.watch_prefix(self.prefix.encode(), start_revision=listing.header.revision + 1)
        backoff.reset()
        async for event in watch:
            key = event.kv.key.decode()
            if event.kind == aetcd.EventKind.DELETE:
                self._apply(key, None)
            else:
                self._apply(key, _decode(event.kv.value))

    def _apply(self, key: str, value: dict | None) -> None:
        if value is None:
            if self.known.pop(key, None) is None:
                return
        else:
            self.known[key] = value
        try:
            self.on_change(Change(key, value))
        except Exception:
            log.exception("membership handler failed for %s", key)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _decode(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
