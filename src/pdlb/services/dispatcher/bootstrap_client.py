"""Prefill dispatcher side of Bootstrap: record each room's chosen rank before forwarding."""

from __future__ import annotations

import grpc

from pdlb.common.bootstrap_locator import BootstrapLocator
from pdlb.services.dispatcher.router import Decision
from pdlb.v1 import bootstrap_pb2

REGISTER_TIMEOUT_S = 5.0
LOOKUP_TIMEOUT_S = 2.0


class BootstrapRecorder:
    """Records room -> prefill rank in the bootstrap server (given by flag, or found in etcd)."""

    def __init__(self, address: str, etcd: str, etcd_prefix: str) -> None:
        self.locator = BootstrapLocator(address, etcd, etcd_prefix)

    async def start(self) -> None:
        await self.locator.start()

    async def record(self, room: int, decision: Decision) -> None:
        stub = self.locator.stub()
        if stub is None:
            return  # no bootstrap server: the router must give decode workers the prefill address
        worker = decision.entry.worker
        record = bootstrap_pb2.RoomRecord(
            bootstrap_room=room,
            prefill_dp_rank=worker.dp_rank,
            prefill_worker_id=worker.worker_id,
            prefill_address=worker.address,
        )
        await stub.RegisterRoom(bootstrap_pb2.RegisterRoomRequest(record=record), timeout=REGISTER_TIMEOUT_S)

    async def holder(self, room: int) -> bootstrap_pb2.RoomRecord | None:
        """The record of `room` when another request's prefill already holds it (no waiting), else
        None: unrecorded, or no bootstrap server to ask (then the record at the hand-off decides)."""
        stub = self.locator.stub()
        if stub is None:
            return None
        try:
            lookup = bootstrap_pb2.LookupRoomRequest(bootstrap_room=room)
            reply = await stub.LookupRoom(lookup, timeout=LOOKUP_TIMEOUT_S)
        except grpc.aio.AioRpcError:  # NOT_FOUND: free; bootstrap away: RegisterRoom will say so
            return None
        return reply.record

    async def close(self) -> None:
        await self.locator.close()
