"""Bootstrap: the room table as pure logic (fake clock), and the service as a real process."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdlb.services.bootstrap.room_table import Room, RoomConflict, RoomTable, TableFull
from pdlb.v1 import bootstrap_pb2 as pb
from pdlb.v1 import bootstrap_pb2_grpc
from tests.helpers import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def room(n: int, rank: int = 0) -> Room:
    return Room(n, rank, f"p{rank}", f"127.0.0.1:{7000 + rank}", 0.0)


def test_record_once_idempotent_and_conflict():
    table = RoomTable(10, 60)
    assert table.register(room(1, 2))[1] is True
    assert table.register(room(1, 2))[1] is False
    with pytest.raises(RoomConflict, match="rank 2"):
        table.register(room(1, 3))


def test_expiry_and_bound_with_expired_first_eviction():
    clock = Clock()
    table = RoomTable(2, ttl_s=10, clock=clock)
    table.register(room(1))
    clock.now = 5
    table.register(room(2))
    with pytest.raises(TableFull, match="--max-rooms"):
        table.register(room(3))
    clock.now = 11  # room 1 expired: its place is reused
    table.register(room(3))
    assert table.get(1) is None and table.get(2) is not None and len(table) == 2
    clock.now = 16
    assert table.get(2) is None and table.expired_total == 2


async def test_many_waiters_on_one_room_all_wake():
    table = RoomTable(10, 60)
    waiters = [asyncio.create_task(table.lookup(7, wait_s=5)) for _ in range(20)]
    await wait_until(lambda: table.waiting == 20, what="20 waiters")
    table.register(room(7, 1))
    found = await asyncio.gather(*waiters)
    assert all(r is not None and r.prefill_dp_rank == 1 for r in found)
    assert table.waiting == 0 and not table._waiters


async def test_waiter_bound_and_timeout():
    table = RoomTable(10, 60, max_waiters=1)
    first = asyncio.create_task(table.lookup(1, wait_s=0.2))
    await wait_until(lambda: table.waiting == 1, what="the first waiter")
    with pytest.raises(TableFull):
        await table.lookup(2, wait_s=1)
    assert await first is None and not table._waiters


async def test_service_statuses(start_service):
    proc = start_service("bootstrap", "--max-rooms", "2", "--room-ttl", "1")
    async with grpc.aio.insecure_channel(proc.address) as channel:
        stub = bootstrap_pb2_grpc.BootstrapStub(channel)

        def rec(n, rank=0):
            return pb.RegisterRoomRequest(
                record=pb.RoomRecord(
                    bootstrap_room=n, prefill_dp_rank=rank, prefill_worker_id="w", prefill_address="h:1"
                )
            )

        waiter = asyncio.ensure_future(stub.LookupRoom(pb.LookupRoomRequest(bootstrap_room=5, wait_ms=5000)))
        assert (await stub.RegisterRoom(rec(5))).created
        assert (await waiter).record.bootstrap_room == 5
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RegisterRoom(rec(5, rank=1))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        await stub.RegisterRoom(rec(6))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RegisterRoom(rec(7))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for bad in (pb.RegisterRoomRequest(), rec(8, rank=-1)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterRoom(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LookupRoom(pb.LookupRoomRequest(bootstrap_room=1, wait_ms=10**9))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A lookup bounded by its own deadline: NOT_FOUND, not a hang.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LookupRoom(pb.LookupRoomRequest(bootstrap_room=99, wait_ms=300))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "after waiting" in err.value.details()

        async def expired():
            try:
                await stub.LookupRoom(pb.LookupRoomRequest(bootstrap_room=5))
            except grpc.aio.AioRpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND
            return False

        await wait_until(expired, timeout=5, what="room 5 to expire after its 1 s TTL")
        await stub.RegisterRoom(rec(7))  # expired rooms made place again
