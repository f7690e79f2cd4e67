"""gRPC server hosting shared by every service: health, reflection, signals and graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from pdlb.common import security
from pdlb.common.config import FlagRefused
from pdlb.common.malformed_requests import MalformedRequests

log = logging.getLogger(__name__)

# Generous bounds: KV hand-off chunks stay well below this; anything larger is a client bug.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Our clients ping every 20 s, also on idle connections and during silent streams (a request
# waiting in a queue). gRPC servers by default allow one such ping per 5 minutes and answer more
# with GOAWAY "too_many_pings", which kills the streams in flight; so accept a ping every 10 s.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Server reflection as grpc.reflection.v1 (what current grpcurl and clients ask first) and
    v1alpha. grpcio-reflection implements v1alpha only; v1 has the same messages under a new
    package name, so the same servicer answers both, its messages read and written as v1alpha's."""
    servicer = reflection.aio.ReflectionServicer([*service_names, reflection.SERVICE_NAME, REFLECTION_V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


class ServiceHost:
    """One grpc.aio server with standard health checking and reflection for the given services."""

    def __init__(self, host: str, port: int, service_names: Iterable[str]) -> None:
        # a request that does not parse: INVALID_ARGUMENT naming why, not UNKNOWN and a traceback
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[MalformedRequests()])
        self.service_names = list(service_names)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection([*self.service_names, health.SERVICE_NAME], self.server)
        self.host = host
        self.tls = security.active()
        if self.tls is None:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            self.port = self.server.add_secure_port(f"{host}:{port}", self.tls.server_credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)
        mode = "plaintext" if self.tls is None else "mutual TLS" if self.tls.mutual else "TLS"
        log.info("serving %s on %s (%s)", ", ".join(self.service_names), self.address, mode)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let running ones finish for up to `grace` seconds, then cancel them."""
        await self.set_serving(False)
        await self.server.stop(grace)


class ShutdownEvent(asyncio.Event):
    """Set on SIGTERM or SIGINT. `serving`: the service finished starting (run_until_signal), so a
    signal drains it; before that, a signal cancels the start (see run_service)."""

    serving = False


def shutdown_event() -> ShutdownEvent:
    """An event set on SIGTERM or SIGINT (installed on the running loop)."""
    event = ShutdownEvent()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


async def run_until_signal(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]], stop_event: asyncio.Event
) -> None:
    """Start a service, wait for the shutdown event, then stop it (drain, deregister, exit)."""
    await start()
    if isinstance(stop_event, ShutdownEvent):
        stop_event.serving = True
    await stop_event.wait()
    log.info("shutdown requested: draining")
    await stop()
    log.info("stopped")


def run_service(
    build_parser: Callable[[], argparse.ArgumentParser],
    serve: Callable[[argparse.Namespace, asyncio.Event], Awaitable[None]],
    argv: list[str] | None = None,
) -> None:
    """A service's console-script entry point: parse flags, log, serve until SIGTERM/SIGINT. A
    signal that arrives while the service is still starting (waiting for a vLLM server, etcd, a
    model) cancels the start and exits at once: nothing is serving yet, so there is nothing to drain
    (a registration made so far expires with its lease).

    A start refused by `serve` is one line on stderr prefixed with the program's name (the parser's
    `prog`, as argparse's own refusals): `FlagRefused` exits with status 2, a `SystemExit` with a
    message with status 1; the raisers write the message alone."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        security.configure(security.tls_from_args(args))
        security.configure_etcd(security.etcd_security_from_args(args))
    except SystemExit as exc:
        refuse(parser.prog, exc)

    async def guarded(event: asyncio.Event) -> SystemExit | None:
        # A flag refused while starting raises SystemExit; raised inside a task it would escape the
        # loop with a "never retrieved" traceback, so it is handed back and raised outside it.
        try:
            await serve(args, event)
        except SystemExit as exc:
            return exc
        return None

    async def run() -> SystemExit | None:
        event = shutdown_event()
        serving = asyncio.ensure_future(guarded(event))
        signalled = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({serving, signalled}, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done() and not event.serving:
                log.info("shutdown requested while starting: stopping without serving")
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
                return None
            return await serving
        finally:
            signalled.cancel()

    refused = asyncio.run(run())
    if refused is not None:
        refuse(parser.prog, refused)


def refuse(prog: str, refused: SystemExit) -> NoReturn:
    """Exit for a start `refused`: its message on stderr after `prog`, then status 2 for a
    FlagRefused, 1 for a SystemExit with a message, else the exit's own code."""
    if isinstance(refused, FlagRefused):
        print(f"{prog}: {refused.message}", file=sys.stderr, flush=True)
    elif isinstance(refused.code, str):
        print(f"{prog}: {refused.code}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    raise refused


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def advertised(host_flag: str, bound_port: int, advertise_flag: str) -> str:
    """The address other components should dial: the explicit flag, else host:bound port."""
    if advertise_flag:
        return advertise_flag
    host = "127.0.0.1" if host_flag in ("0.0.0.0", "::", "") else host_flag
    return f"{host}:{bound_port}"
