"""`pdlb-gateway`: one front door for a cluster. gRPC (pdlb.v1.Gateway, health, reflection) and an
OpenAI-compatible HTTP API with a live dashboard, on one event loop."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from pdlb.common.bootstrap_locator import BootstrapLocator
from pdlb.common.config import FlagParser, add_common_flags, csv_list
from pdlb.common.grpc_server import ServiceHost, advertised, run_service, run_until_signal
from pdlb.common.membership import LeasedRegistration
from pdlb.common.requests import MAX_NEW_TOKENS_LIMIT, InvalidRequest
from pdlb.common.slots import Slots
from pdlb.models.catalog import SMOLLM2, TINY, resolve
from pdlb.models.config import UnsupportedModel
from pdlb.services.gateway.dashboard import Dashboard
from pdlb.services.gateway.frontend import CUT_SETTLE_S, DISPATCHER_WAIT_S, SHUTTING_DOWN, Frontend, RequestFailed
from pdlb.services.gateway.metrics import API_KEY, RENDER_API, GatewayMetrics
from pdlb.services.gateway.openai_api import ApiError, OpenAIApi, error_response
from pdlb.services.gateway.protocol_log import ProtocolLog
from pdlb.services.gateway.readiness import Readiness
from pdlb.services.gateway.render_api import RenderApi
from pdlb.services.gateway.sglang_api import SGLANG_API, SGLangApi
from pdlb.services.gateway.upstreams import Upstreams
from pdlb.services.gateway.worker_api import WorkerApi
from pdlb.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("pdlb.gateway")

# The outcome of an HTTP request whose client went away before its answer ended (nginx's code).
CLIENT_CLOSED = "499"


def build_parser() -> FlagParser:
    p = FlagParser("gateway", "One front door: PD fan-out over gRPC, an OpenAI-compatible HTTP API and a dashboard.")
    add_common_flags(p, default_port=50080)
    p.flag("--http-port", default=8000, type=int, help="HTTP port of the OpenAI API and the dashboard (0: any)")
    p.flag("--dispatcher", default="", help="mixed dispatcher host:port list (besides those in etcd)")
    p.flag("--prefill-dispatcher", default="", help="prefill dispatcher host:port list (besides those in etcd)")
    p.flag("--decode-dispatcher", default="", help="decode dispatcher host:port list (besides those in etcd)")
    p.flag("--bootstrap", default="", help="bootstrap host:port, checked by /health in PD mode (default: from etcd)")
    p.flag("--model", default=SMOLLM2, help=f"the served model ({SMOLLM2}, {TINY}, a .gguf file or a HF directory)")
    p.flag("--served-model-name", default="", help="model id clients name (default: from --model)")
    p.flag(
        "--max-concurrent-streams",
        default=1024,
        type=int,
        help="requests in flight here; more: 429 / RESOURCE_EXHAUSTED",
    )
    p.flag("--max-body-bytes", default=4 << 20, type=int, help="largest HTTP request body; more: 413")
    p.flag("--max-prompt-tokens", default=32768, type=int, help="longest prompt accepted, in tokens")
    p.flag(
        "--max-prompt-chars",
        default=0,
        type=int,
        help="longest prompt text accepted, in characters, refused before tokenising (0: 16 per prompt token)",
    )
    p.flag("--request-timeout", default=600.0, type=float, help="longest a request may run, seconds")
    p.flag(
        "--dispatcher-wait",
        default=DISPATCHER_WAIT_S,
        type=float,
        help="seconds a request waits, within its deadline, for a dispatcher of its role to come back when none "
        "is reachable (its only one restarting) before failing 503 (0: fail at once)",
    )
    p.flag(
        "--http-header-timeout",
        default=60.0,
        type=float,
        help="seconds an HTTP connection has to send a request's headers, from its opening or its previous "
        "response (slow or idle connections are closed)",
    )
    p.flag("--http-body-timeout", default=30.0, type=float, help="seconds a request body has to arrive; more: 408")
    p.flag("--dashboard-interval-ms", default=200, type=int, help="dashboard refresh interval (pushed to the page)")
    p.flag("--max-dashboards", default=32, type=int, help="dashboard pages connected at once")
    return p


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, frontend: Frontend, streams: Slots, metrics: GatewayMetrics) -> None:
        self.frontend, self.streams, self.metrics = frontend, streams, metrics

    async def Generate(self, request: gateway_pb2.GatewayGenerateRequest, context) -> AsyncIterator:
        if self.frontend.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{SHUTTING_DOWN}; send the request to another one")
        try:
            # max_new_tokens unset: the default is cut to the room the context leaves, not refused
            prepared = await self.frontend.prepare(request.request, not request.request.sampling.max_new_tokens)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self.streams.try_acquire():
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request {prepared.request.request_id}: {self.streams.refusal()} at this gateway; retry later",
            )
        try:
            timer = self.metrics.timer()
            async for chunk in self.frontend.generate(prepared, context.time_remaining()):
                timer.tokens(len(chunk.token_ids))
                last = bool(chunk.finish_reason)  # the usage goes out once, with the finish
                yield gateway_pb2.GatewayGenerateResponse(
                    request_id=prepared.request.request_id,
                    token_ids=chunk.token_ids,
                    text=chunk.text,
                    finish_reason=chunk.finish_reason,
                    decode_dp_rank=chunk.decode_dp_rank,
                    prefill_dp_rank=chunk.prefill_dp_rank,
                    prompt_tokens=chunk.prompt_tokens if last else 0,
                    cached_tokens=chunk.cached_tokens if last else 0,
                    retries=chunk.retries,
                    logprobs=chunk.logprobs,
                )
            self.metrics.done("grpc", "ok")
        except RequestFailed as exc:
            self.metrics.done("grpc", exc.code.name)
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            self.metrics.done("grpc", grpc.StatusCode.CANCELLED.name)  # the client went away
            raise
        finally:
            self.streams.release()


def http_app(
    api: OpenAIApi,
    streams: Slots,
    metrics: GatewayMetrics,
    dashboard: Dashboard,
    max_body: int,
    readiness: Readiness,
    workers: WorkerApi,
):
    def too_large(request: web.Request) -> web.Response:
        """413 for a declared Content-Length past --max-body-bytes, before any of the body is read,
        with `Connection: close`: nothing here reads what the client may still send (aiohttp closes
        the socket once the client stops sending, or after its lingering time)."""
        metrics.done(api_of(request.path), "413")  # its handler, which names its API, never runs
        response = error_response(
            413, f"the request body ({request.content_length} bytes) exceeds {max_body} bytes (--max-body-bytes)"
        )
        response.force_close()
        return response

    @web.middleware
    async def errors(request: web.Request, handler):
        # A declared length past the bound is refused before the handler waits for a body that
        # would be refused anyway (without this, a slow or absent body held the request until
        # --http-body-timeout, then got 408).
        matched = request.match_info.http_exception is None  # an unknown path keeps its 404 / 405
        if matched and request.method in BODY_METHODS and (request.content_length or 0) > max_body:
            return too_large(request)
        try:
            return await handler(request)
        except ApiError as exc:
            metrics.done(request.get(API_KEY, "http"), str(exc.status))
            response = error_response(exc.status, exc.message, exc.param, exc.kind)
            if exc.status == 429:
                response.headers["Retry-After"] = "1"  # a stream slot frees as soon as any request ends
            response.headers.update(exc.headers)
            if exc.close:
                response.force_close()  # the rest of the body is unknown: drop the connection
            return response
        except web.HTTPRequestEntityTooLarge:
            metrics.done(request.get(API_KEY, "http"), "413")
            return error_response(413, f"the request body exceeds {max_body} bytes (--max-body-bytes)")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            allow = exc.headers.get("Allow")  # a 405's: the methods the path takes (RFC 9110 asks for it)
            takes = f" (it takes {allow})" if allow else ""
            response = error_response(exc.status, f"{request.method} {request.path}: {exc.reason}{takes}")
            if allow:
                response.headers["Allow"] = allow
            return response
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away
        except Exception as exc:  # a bug: still an OpenAI error body, never aiohttp's plain text
            log.exception("%s %s failed in the gateway", request.method, request.path)
            metrics.done(request.get(API_KEY, "http"), "500")
            return error_response(500, f"internal error in the gateway: {type(exc).__name__}: {exc}")

    async def bounded(request: web.Request, chat: bool) -> web.StreamResponse:
        if not streams.try_acquire():
            raise ApiError(429, f"{streams.refusal()} at this gateway; retry later", kind="rate_limit_error")
        try:
            response = await (api.chat_completions(request) if chat else api.completions(request))
            metrics.done("http", str(response.status))
            return response
        except (ConnectionError, asyncio.CancelledError):
            metrics.done("http", CLIENT_CLOSED)
            raise
        finally:
            streams.release()

    async def health(request: web.Request) -> web.Response:
        verdict = await readiness.verdict()
        body = {
            "status": "ok" if verdict.ready else "unavailable",
            "mode": verdict.mode,
            "model": api.model_id,
            "roles": verdict.roles,
            "bootstrap": verdict.bootstrap,
            "missing": verdict.missing,
        }
        return web.json_response(body, status=200 if verdict.ready else 503)

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def expect_within_bound(request: web.Request) -> web.Response | None:
        """`Expect: 100-continue` with a Content-Length past --max-body-bytes: 413 at once instead
        of 100 Continue, so the client never sends the body (RFC 9110 10.1.1 lets a server answer
        with a final status); otherwise aiohttp's own answer, 100 Continue or 417. Every route of a
        method with a body gets it (`bound_every_body`), whichever module added the route."""
        expect = request.headers.get("Expect", "").lower()
        if expect == "100-continue" and request.content_length is not None and request.content_length > max_body:
            return too_large(request)
        if expect != "100-continue":
            raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
        return None

    app = web.Application(client_max_size=max_body, middlewares=[errors])
    app.router.add_post("/v1/completions", lambda r: bounded(r, chat=False))
    app.router.add_post("/v1/chat/completions", lambda r: bounded(r, chat=True))
    app.router.add_get("/v1/models", api.list_models)
    app.router.add_get("/v1/models/{model:.+}", api.get_model)  # ids may hold a slash (org/name)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health)  # SGLang's name; routers may probe it
    app.router.add_get("/live", live)
    workers.routes(app)
    RenderApi(api, streams, metrics).routes(app)
    SGLangApi(api, streams, metrics).routes(app)
    app.router.add_get("/metrics", metrics.http)
    dashboard.routes(app)
    bound_every_body(app, expect_within_bound)
    return app


BODY_METHODS = ("POST", "PUT", "PATCH")


def bound_every_body(app: web.Application, expect_handler: Callable[[web.Request], Awaitable[Any]]) -> None:
    """Give every route of `app` whose method carries a body `expect_handler` for `Expect:` headers,
    once all routes are added: one place, so a route added by any module (render, SGLang's
    /generate, the OpenAI ones) gets the body bound before its body is sent, and none is forgotten."""
    for route in app.router.routes():
        if route.method in BODY_METHODS:
            # aiohttp takes an expect handler only as add_route's argument, kept here; no public setter
            route._expect_handler = expect_handler  # type: ignore[attr-defined]


def api_of(path: str) -> str:
    """The API label (metrics) of a request to `path`, as its handler would note it."""
    if path.endswith("/render"):
        return RENDER_API
    return SGLANG_API if path == "/generate" else "http"


async def serve(args, stop_event: asyncio.Event) -> None:
    try:
        source = resolve(args.model, args.served_model_name)
        tokenizer = source.tokenizer()
    except UnsupportedModel as exc:
        raise SystemExit(f"cannot use --model {args.model}: {exc}") from None
    gateway_id = f"gateway-{uuid.uuid4().hex[:8]}"
    upstreams = Upstreams(
        {
            "mixed": csv_list(args.dispatcher),
            "prefill": csv_list(args.prefill_dispatcher),
            "decode": csv_list(args.decode_dispatcher),
        }
    )
    metrics = GatewayMetrics()
    dashboard = Dashboard(upstreams, metrics, args.dashboard_interval_ms, args.max_dashboards)
    metrics.watch_queues(lambda: [(role, address, snap) for address, (role, snap) in list(dashboard.latest.items())])
    workers = WorkerApi(upstreams, dashboard, source.model_id, args.max_prompt_tokens, MAX_NEW_TOKENS_LIMIT)
    frontend = Frontend(
        upstreams,
        tokenizer,
        args.max_prompt_tokens,
        args.request_timeout,
        metrics.retried,
        args.max_prompt_chars,
        workers.limits,  # the workers' limits, checked before dispatch
        args.dispatcher_wait,
    )
    streams = Slots("requests in flight", args.max_concurrent_streams, "--max-concurrent-streams")

    def models() -> list[str]:
        advertised_models = {m for m in upstreams.models.values() if m}
        return sorted({source.model_id, *advertised_models})

    api = OpenAIApi(frontend, source.model_id, models, metrics.observe, args.http_body_timeout, args.max_body_bytes)
    bootstrap = BootstrapLocator(args.bootstrap, args.etcd, args.etcd_prefix)
    readiness = Readiness(upstreams, dashboard, bootstrap)
    app = http_app(api, streams, metrics, dashboard, args.max_body_bytes, readiness, workers)
    # aiohttp closes a connection that has not sent a whole request's headers within its keep-alive
    # timeout (counted from the connection's start, and from each response): the header timeout.
    # On SIGTERM, HTTP requests in flight get --shutdown-grace to finish, as gRPC ones do.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        auto_decompress=False,  # the gateway decodes bodies itself (body_encoding.py): its own refusals, bounded
        access_log=None,
        logger=ProtocolLog(),  # a malformed request: one warning line, not a traceback
        keepalive_timeout=args.http_header_timeout,
        shutdown_timeout=args.shutdown_grace + CUT_SETTLE_S + 1.0,
    )
    host = ServiceHost(args.host, args.port, [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name])
    servicer = GatewayServicer(frontend, streams, metrics)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, host.server)
    address = advertised(args.host, host.port, args.advertise_address)
    http_address = ""
    registration: LeasedRegistration | None = None

    async def start() -> None:
        nonlocal http_address, registration
        if args.etcd:
            watch = upstreams.watch(args.etcd, args.etcd_prefix)
            await asyncio.wait_for(watch.synced.wait(), timeout=30)
        await bootstrap.start()
        await host.start()
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.http_port)
        try:
            await site.start()
        except OSError as exc:  # taken (another gateway, a `pdlb up`), or not an address of this host
            await host.stop(0)
            await runner.cleanup()
            raise SystemExit(
                f"cannot serve HTTP on {args.host}:{args.http_port} (--http-port): {exc.strerror or exc}; stop what "
                "uses it or pick another port (0: any free one)"
            ) from None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        http_address = f"{address.rsplit(':', 1)[0]}:{port}"
        dashboard.start()
        if args.etcd:
            registration = LeasedRegistration(
                args.etcd,
                f"{args.etcd_prefix.rstrip('/')}/gateways/{gateway_id}",
                {"gateway_id": gateway_id, "address": address, "http": http_address, "model": source.model_id},
                args.lease_ttl,
            )
            await registration.start()
        print(f"pdlb-gateway http on http://{http_address} (OpenAI API at /v1, dashboard at /dashboard)", flush=True)
        print(
            f"pdlb-gateway ({upstreams.mode() or 'no dispatchers yet'}, {source.model_id}) listening on {address}",
            flush=True,
        )

    async def stop() -> None:
        # First, before anything can fail a request in flight: refuse new requests and retry none
        # (a supervisor stopping the cluster waits for NOT_SERVING before it stops the dispatchers).
        frontend.drain()
        await host.set_serving(False)
        if registration:
            await registration.close()
        await dashboard.close()

        async def http_drain() -> None:
            await runner.shutdown()
            await runner.cleanup()  # stops listening; streaming responses get the grace to finish

        # gRPC and HTTP requests drain side by side, within one grace; those still running then
        # are cut naming it (end_running), before gRPC and aiohttp would cut them without a word
        # (their own bounds leave the cut requests time to send that failure)
        late = args.shutdown_grace + CUT_SETTLE_S + 1.0
        await asyncio.gather(frontend.end_running(args.shutdown_grace), host.stop(late), http_drain())
        await upstreams.close()
        await bootstrap.close()

    await run_until_signal(start, stop, stop_event)


def main(argv: list[str] | None = None) -> None:
    run_service(build_parser, serve, argv)


if __name__ == "__main__":
    main()
