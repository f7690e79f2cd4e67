"""Bootstrap gRPC servicer over a RoomTable and a bounded prefill-endpoint registry."""

from __future__ import annotations

import time

import grpc

from pdlb.common.membership import Change
from pdlb.services.bootstrap.room_table import Room, RoomConflict, RoomTable, TableFull
from pdlb.v1 import bootstrap_pb2 as pb
from pdlb.v1 import bootstrap_pb2_grpc as pb_grpc

MAX_WAIT_MS = 60_000
MAX_ID_LEN = 256
MAX_ENDPOINTS = 4096


class BootstrapServicer(pb_grpc.BootstrapServicer):
    def __init__(self, table: RoomTable) -> None:
        self.table = table
        self.endpoints: dict[str, pb.PrefillEndpoint] = {}
        self._worker_of_key: dict[str, str] = {}  # prefill membership key -> worker id (bounded by etcd's keys)

    def on_prefill_member(self, change: Change) -> None:
        """Keep the endpoint list true to prefill membership (with etcd): a worker that leaves is
        dropped, one that (re)joins is listed from its membership value, so a flap does not lose it
        and a worker that is gone for good does not linger."""
        if change.value is None:
            worker_id = self._worker_of_key.pop(change.key, None)
            if worker_id is not None:
                self.endpoints.pop(worker_id, None)
            return
        try:
            worker_id, rank, address = (
                str(change.value["worker_id"]),
                int(change.value["dp_rank"]),
                str(change.value["address"]),
            )
        except (KeyError, TypeError, ValueError):
            return  # malformed or foreign: the dispatchers refuse it too
        if not worker_id or len(worker_id) > MAX_ID_LEN or rank < 0 or not address:
            return
        if worker_id not in self.endpoints and len(self.endpoints) >= MAX_ENDPOINTS:
            return
        self._worker_of_key[change.key] = worker_id
        self.endpoints[worker_id] = pb.PrefillEndpoint(worker_id=worker_id, dp_rank=rank, address=address)

    def _to_proto(self, room: Room) -> pb.RoomRecord:
        # Table clock is monotonic; convert the expiry to wall-clock ms for clients.
        wall_expiry = time.time() + (room.expires_at - self.table.clock())
        return pb.RoomRecord(
            bootstrap_room=room.room,
            prefill_dp_rank=room.prefill_dp_rank,
            prefill_worker_id=room.prefill_worker_id,
            prefill_address=room.prefill_address,
            expires_at_ms=int(wall_expiry * 1000),
        )

    async def RegisterRoom(self, request: pb.RegisterRoomRequest, context: grpc.aio.ServicerContext):
        rec = request.record
        if not request.HasField("record"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "record is required")
        if rec.prefill_dp_rank < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"prefill_dp_rank must be >= 0, got {rec.prefill_dp_rank}"
            )
        if not rec.prefill_address or len(rec.prefill_address) > MAX_ID_LEN:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "prefill_address (host:port of the prefill worker) is required",
            )
        if len(rec.prefill_worker_id) > MAX_ID_LEN:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prefill_worker_id longer than {MAX_ID_LEN}")
        room = Room(rec.bootstrap_room, rec.prefill_dp_rank, rec.prefill_worker_id, rec.prefill_address, 0.0)
        try:
            stored, created = self.table.register(room)
        except RoomConflict as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except TableFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return pb.RegisterRoomResponse(record=self._to_proto(stored), created=created)

    async def LookupRoom(self, request: pb.LookupRoomRequest, context: grpc.aio.ServicerContext):
        if request.wait_ms > MAX_WAIT_MS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"wait_ms {request.wait_ms} exceeds the maximum {MAX_WAIT_MS}",
            )
        wait_s = request.wait_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, max(remaining - 0.01, 0.0))
        try:
            record = await self.table.lookup(request.bootstrap_room, wait_s)
        except TableFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if record is None:
            waited = f" after waiting {wait_s * 1000:.0f} ms" if wait_s > 0 else ""
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"room {request.bootstrap_room} is not registered{waited} (never registered, or expired)",
            )
        return pb.LookupRoomResponse(record=self._to_proto(record))

    async def RegisterPrefillEndpoint(
        self, request: pb.RegisterPrefillEndpointRequest, context: grpc.aio.ServicerContext
    ):
        ep = request.endpoint
        if not ep.worker_id or len(ep.worker_id) > MAX_ID_LEN or not ep.address or ep.dp_rank < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "endpoint needs worker_id (1..256 chars), address host:port and dp_rank >= 0",
            )
        if ep.worker_id not in self.endpoints and len(self.endpoints) >= MAX_ENDPOINTS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_ENDPOINTS} endpoints registered")
        self.endpoints[ep.worker_id] = pb.PrefillEndpoint(
            worker_id=ep.worker_id, dp_rank=ep.dp_rank, address=ep.address
        )
        return pb.RegisterPrefillEndpointResponse()

    async def ListPrefillEndpoints(self, request: pb.ListPrefillEndpointsRequest, context: grpc.aio.ServicerContext):
        ordered = sorted(self.endpoints.values(), key=lambda e: (e.dp_rank, e.worker_id))
        return pb.ListPrefillEndpointsResponse(endpoints=ordered)
