"""A leased registration against a real etcd: its key comes back after every way of losing it while
its owner lives (deleted by hand, lease revoked, etcd paused past the lease), and stays gone after
close()."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from pdlb.common.etcd_process import EtcdProcess
from pdlb.common.membership import Change, LeasedRegistration, PrefixWatch
from tests.helpers import wait_until


class Seen:
    """What a prefix watch reports: the keys present now, and an event per put of `key`."""

    def __init__(self, key: str) -> None:
        self.key, self.present, self.puts = key, set(), 0
        self.put = asyncio.Event()

    def __call__(self, change: Change) -> None:
        if change.value is None:
            self.present.discard(change.key)
            return
        self.present.add(change.key)
        if change.key == self.key:
            self.puts += 1
            self.put.set()

    async def next_put(self, after: int, timeout: float) -> None:
        while self.puts <= after:
            self.put.clear()
            await asyncio.wait_for(self.put.wait(), timeout)


async def registered(etcd: EtcdProcess, prefix: str, ttl: int = 2):
    key = f"{prefix}/workers/mixed/w0"
    seen = Seen(key)
    watch = PrefixWatch(etcd.endpoint, f"{prefix}/", seen)
    watch.start()
    await asyncio.wait_for(watch.synced.wait(), 10)
    registration = LeasedRegistration(etcd.endpoint, key, {"worker_id": "w0"}, ttl)
    await registration.start()
    await seen.next_put(0, 10)
    return registration, watch, seen


def lease_of(etcd: EtcdProcess, key: str) -> str:
    """The lease id (hex) etcd has the key on, '' when the key is absent."""
    out = json.loads(etcd.etcdctl("get", key, "-w", "json"))
    kvs = out.get("kvs") or []
    return format(kvs[0]["lease"], "x") if kvs else ""


@pytest.mark.parametrize("loss", ["delete", "revoke"])
async def test_key_deleted_or_lease_revoked_comes_back(etcd, prefix, loss):
    registration, watch, seen = await registered(etcd, prefix, ttl=30)
    try:
        first_lease = lease_of(etcd, registration.key.decode())
        assert first_lease == format(registration.lease_id, "x")
        for round_ in range(3):  # repeatedly: each loss is repaired, none is ignored
            puts = seen.puts
            if loss == "delete":
                etcd.etcdctl("del", registration.key.decode())
            else:
                etcd.etcdctl("lease", "revoke", lease_of(etcd, registration.key.decode()))
            await seen.next_put(puts, timeout=15)
            assert registration.key.decode() in seen.present
            lease = lease_of(etcd, registration.key.decode())
            # a deleted key goes back on its live lease; a revoked lease is replaced by a fresh one
            assert (lease == first_lease) == (loss == "delete"), (round_, lease, first_lease)
        await wait_until(lambda: registration.restored_total == 3, timeout=5, what="3 restores counted")
    finally:
        await registration.close()
        await watch.close()


async def test_close_removes_the_key_for_good(etcd, prefix):
    registration, watch, seen = await registered(etcd, prefix)
    try:
        key = registration.key.decode()
        await registration.close()
        await wait_until(lambda: key not in seen.present, timeout=10, what="the key to go at close")
        await asyncio.sleep(registration.ttl)  # nothing to await: no put may follow a close
        assert lease_of(etcd, key) == "" and registration.restored_total == 0
    finally:
        await watch.close()


async def test_etcd_paused_past_the_lease_registers_again(prefix, tmp_path):
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd"))  # its own: it is paused
    etcd.start()
    try:
        registration, watch, seen = await registered(etcd, prefix, ttl=2)
        try:
            first_lease = registration.lease_id
            os.kill(etcd.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(3.5)  # the pause itself: past the 2 s lease, nothing to await
            os.kill(etcd.proc.pid, signal.SIGCONT)
            await wait_until(
                lambda: lease_of(etcd, registration.key.decode()) not in ("", format(first_lease, "x")),
                timeout=15,
                what="the key back on a fresh lease",
            )
            await wait_until(lambda: registration.key.decode() in seen.present, timeout=10, what="watchers to see it")
            assert registration.restored_total >= 1
        finally:
            await registration.close()
            await watch.close()
    finally:
        if etcd.proc is not None:
            os.kill(etcd.proc.pid, signal.SIGCONT)
        etcd.close()
