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
    """Keeps one key in etcd under a lease of `ttl` seconds until `close()`.

    A background task refreshes the lease every TTL/3 and watches the key itself, so the key comes
    back whenever it goes while its owner lives: deleted by hand (`etcdctl del`), its lease revoked,
    or the lease expired (etcd paused or away past the TTL). It is put back at once, on the same
    lease while that lives, else on a fresh one. Losses in quick succession, and etcd errors, are
    retried with capped exponential backoff (`Backoff`); each is logged as a warning.
    """

    def __init__(self, endpoint: str, key: str, value: dict, ttl: int) -> None:
        if ttl < 1:
            raise ValueError("lease TTL must be at least 1 second")
        self.endpoint, self.key, self.ttl = endpoint, key.encode(), ttl
        self.value = json.dumps(value, sort_keys=True).encode()
        self.client = connect_client(endpoint)
        self.lease_id: int | None = None
        self.registered = asyncio.Event()
        self.restored_total = 0  # times the key was put back after it went
        self._revision = 0  # etcd revision at which the key was last known to be ours
        self._task: asyncio.Task | None = None

    @property
    def period_s(self) -> float:
        """Seconds between lease refreshes: a third of the TTL, so two may fail before it expires."""
        return max(self.ttl / 3, 0.2)

    async def start(self) -> None:
        """Register once (raising if etcd is unreachable), then keep the key in the background."""
        await self._register(fresh_lease=True)
        self._task = asyncio.create_task(self._keep(), name=f"lease:{self.key.decode()}")

    async def _register(self, fresh_lease: bool) -> None:
        if fresh_lease or self.lease_id is None:
            lease = await self.client.lease(self.ttl)
            self.lease_id = lease.id  # set before the put: close() revokes it even if the put fails
        reply = await self.client.put(self.key, self.value, lease=self.lease_id)
        self._revision = reply.header.revision
        self.registered.set()
        log.info("registered %s (lease %x, ttl %ss)", self.key.decode(), self.lease_id, self.ttl)

    async def _restore(self) -> None:
        """Put the key back unless it is there, with our value, on our lease, which is alive."""
        current = await self.client.get(self.key)
        info = await self.client.get_lease_info(self.lease_id, keys=False) if self.lease_id is not None else None
        alive = info is not None and info.TTL > 0
        if alive and current is not None and current.lease == self.lease_id and current.value == self.value:
            self._revision = current.mod_revision
            return
        await self._register(fresh_lease=not alive)
        self.restored_total += 1
        log.warning(
            "%s put back in etcd (%s)", self.key.decode(), "same lease" if alive else "its lease was gone: new lease"
        )

    async def _keep(self) -> None:
        backoff = Backoff()
        losses = 0  # in a row, each within one refresh period of the last restore
        restore = False  # the first pass follows start(): the key was just put
        while True:
            try:
                if restore:
                    await self._restore()
                restore = True
                held_from = asyncio.get_running_loop().time()
                why = await self._hold()
                if asyncio.get_running_loop().time() - held_from >= self.period_s:
                    losses = 0
                    backoff.reset()
                losses += 1
                log.warning("etcd key %s %s; registering again", self.key.decode(), why)
                if losses > 1:  # someone keeps deleting it: do not spin
                    await asyncio.sleep(backoff.next())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning("etcd keep-alive for %s failed (%s); retry in %.1fs", self.key.decode(), exc, delay)
                await asyncio.sleep(delay)

    async def _hold(self) -> str:
        """Refresh the lease and watch the key until either is lost; returns why. Raises on etcd errors."""
        watch = await self.client.watch(self.key, start_revision=self._revision + 1)
        deleted = asyncio.create_task(_first_deletion(watch), name=f"watch-own:{self.key.decode()}")
        try:
            while True:
                done, _ = await asyncio.wait({deleted}, timeout=self.period_s)
                if done:
                    deleted.result()  # raises when the watch broke (etcd restarted, connection lost)
                    return "was deleted (by hand, or its lease was revoked or expired)"
                reply = await self.client.refresh_lease(self.lease_id)
                if reply.TTL <= 0:
                    return f"lost its lease {self.lease_id:x} (expired: etcd was away too long)"
        finally:
            deleted.cancel()
            with contextlib.suppress(BaseException):
                await deleted
            await _bounded(watch.cancel(), 1.0)

    async def close(self) -> None:
        """Stop the keep-alive and delete the key at once by revoking the lease."""
        if self._task:
            self._task.cancel()
            if not await _settled(self._task, 5.0):
                log.warning("keep-alive of %s did not stop within 5 s; revoking its lease anyway", self.key.decode())
        if self.lease_id is not None:
            try:
                await asyncio.wait_for(self.client.revoke_lease(self.lease_id), timeout=3)
                log.info("deregistered %s", self.key.decode())
            except Exception as exc:  # etcd unreachable: the lease TTL removes the key instead
                log.warning("could not revoke lease of %s: %s", self.key.decode(), exc)
        with contextlib.suppress(Exception):
            await self.client.close()


async def _settled(task: asyncio.Task, timeout: float) -> bool:
    """Wait up to `timeout` s for `task` to end (its result or error retrieved); False if it has not.
    Not asyncio.wait_for: on its timeout that waits again, without a bound, for the task to take its
    cancellation, and a close that hung there held a whole test run for minutes."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if done and not task.cancelled():
        task.exception()  # retrieved: an error of a task being stopped is not news
    return bool(done)


async def _bounded(awaitable, timeout: float) -> None:
    """Run `awaitable` for up to `timeout` s, errors ignored; past it, cancel it and go on without
    waiting for it to stop (see _settled)."""
    task = asyncio.ensure_future(awaitable)
    if not await _settled(task, timeout):
        task.cancel()


async def _first_deletion(watch: aetcd.rtypes.Watch) -> None:
    """Returns at the first DELETE event of the watch; raises if the watch ends without one."""
    async for event in watch:
        if event.kind == aetcd.EventKind.DELETE:
            return
    raise ConnectionError("the etcd watch ended")


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
            if not await _settled(self._task, 5.0):
                log.warning("etcd watch on %s did not stop within 5 s; left to end with its client", self.prefix)


def _decode(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
