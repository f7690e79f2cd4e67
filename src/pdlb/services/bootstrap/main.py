"""`pdlb-bootstrap`: the bootstrap server (room -> prefill rank records)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from pdlb.common.config import FlagParser, add_common_flags
from pdlb.common.grpc_server import ServiceHost, advertised, run_service, run_until_signal
from pdlb.common.membership import LeasedRegistration, PrefixWatch, bootstrap_prefix, workers_prefix
from pdlb.services.bootstrap.room_table import RoomTable
from pdlb.services.bootstrap.service import BootstrapServicer
from pdlb.v1 import bootstrap_pb2, bootstrap_pb2_grpc

log = logging.getLogger("pdlb.bootstrap")
SWEEP_INTERVAL_S = 1.0


def build_parser() -> FlagParser:
    parser = FlagParser("bootstrap", "Records the prefill DP rank of each bootstrap room for PD serving.")
    add_common_flags(parser, default_port=50060)
    parser.flag("--max-rooms", default=100_000, type=int, help="most unexpired rooms held; more: RESOURCE_EXHAUSTED")
    parser.flag("--room-ttl", default=120.0, type=float, help="seconds a room record lives")
    parser.flag("--max-waiters", default=10_000, type=int, help="most LookupRoom calls waiting at once")
    return parser


async def serve(args, stop_event: asyncio.Event) -> None:
    table = RoomTable(args.max_rooms, args.room_ttl, args.max_waiters)
    servicer = BootstrapServicer(table)
    host = ServiceHost(args.host, args.port, [bootstrap_pb2.DESCRIPTOR.services_by_name["Bootstrap"].full_name])
    bootstrap_pb2_grpc.add_BootstrapServicer_to_server(servicer, host.server)
    address = advertised(args.host, host.port, args.advertise_address)
    registration = None
    sweeper: asyncio.Task | None = None
    # the prefill endpoint list follows membership (workers that leave are dropped)
    members = (
        PrefixWatch(args.etcd, workers_prefix(args.etcd_prefix, "prefill"), servicer.on_prefill_member)
        if args.etcd
        else None
    )

    async def start() -> None:
        nonlocal registration, sweeper
        await host.start()
        if args.etcd:
            server_id = f"bootstrap-{uuid.uuid4().hex[:8]}"
            registration = LeasedRegistration(
                args.etcd,
                bootstrap_prefix(args.etcd_prefix) + server_id,
                {"address": address},
                args.lease_ttl,
            )
            await registration.start()
        if members is not None:
            members.start()
        sweeper = asyncio.create_task(_sweep(table))
        print(f"pdlb-bootstrap listening on {address}", flush=True)

    async def stop() -> None:
        if members is not None:
            await members.close()
        if registration:
            await registration.close()
        if sweeper:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await host.stop(args.shutdown_grace)

    await run_until_signal(start, stop, stop_event)


async def _sweep(table: RoomTable) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        table.sweep()


def main(argv: list[str] | None = None) -> None:
    run_service(build_parser, serve, argv)


if __name__ == "__main__":
    main()
