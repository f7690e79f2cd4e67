"""Prefill dispatcher side of Bootstrap: record each room's chosen rank before forwarding."""

from __future__ import annotations

from pdlb.common.bootstrap_locator import BootstrapLocator
from pdlb.services.dispatcher.router import Decision
from pdlb.v1 import bootstrap_pb2

REGISTER_TIMEOUT_S = 5.0


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

    async def close(self) -> None:
        await self.locator.close()
