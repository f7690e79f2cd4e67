"""`pdlb-dispatcher`: the DP controller of one role."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from pdlb.common.config import FlagParser, FlagRefused, add_common_flags, csv_list
from pdlb.common.grpc_server import ServiceHost, advertised, run_service, run_until_signal
from pdlb.common.membership import LeasedRegistration, PrefixWatch, dispatchers_prefix, workers_prefix
from pdlb.common.modes import role_of_mode
from pdlb.models.catalog import SMOLLM2, resolve
from pdlb.models.config import UnsupportedModel
from pdlb.services.dispatcher.bootstrap_client import BootstrapRecorder
from pdlb.services.dispatcher.flow_control import FLOW_FLAGS, MAX_GATHER_MS, FlowOptions
from pdlb.services.dispatcher.load_table import LoadTable, Role
from pdlb.services.dispatcher.members import Members, parse_static_workers
from pdlb.services.dispatcher.metrics import DispatcherMetrics
from pdlb.services.dispatcher.policies import PolicyOptions, create_policy, method_names
from pdlb.services.dispatcher.router import Router
from pdlb.services.dispatcher.service import (
    HUNG_STREAM_TIMEOUT_S,
    WORKER_WAIT_S,
    DispatchCore,
    DispatchServicer,
    LoadReportServicer,
)
from pdlb.v1 import dispatch_pb2, dispatch_pb2_grpc, load_report_pb2, load_report_pb2_grpc

log = logging.getLogger("pdlb.dispatcher")


def build_parser() -> FlagParser:
    parser = FlagParser("dispatcher", "Chooses the DP rank of each request and forwards it to that worker.")
    add_common_flags(parser, default_port=50051)
    parser.flag(
        "--disaggregation-mode",
        default="null",
        help="null (non-PD, mixed workers), prefill or decode",
        choices=["null", "prefill", "decode"],
    )
    parser.flag(
        "--load-balance-method",
        default="auto",
        help=f"one of {', '.join(method_names())}",
        choices=method_names(),
    )
    parser.flag(
        "--model",
        default=SMOLLM2,
        help="the model this role serves, as the workers' --model: its tokenizer turns text into the ids "
        "methods count, and workers of another model are refused",
    )
    parser.flag("--served-model-name", default="", help="model id the workers advertise (as their --served-model-name)")
    parser.flag("--dp-size", default=0, type=int, help="number of DP ranks (0: highest known rank + 1)")
    parser.flag("--workers", default="", help="static workers, comma separated [rank@]host:port (no etcd needed)")
    parser.flag("--bootstrap", default="", help="prefill: bootstrap server host:port where rooms are recorded")
    parser.flag("--metrics-port", default=0, type=int, help="Prometheus /metrics HTTP port (0: disabled)")
    parser.flag("--request-timeout", default=600.0, type=float, help="longest a forwarded request may run, seconds")
    parser.flag(
        "--inflight-timeout",
        default=60.0,
        type=float,
        help="seconds an unacknowledged dispatch stays counted as in flight",
    )
    parser.flag(
        "--hung-stream-timeout",
        default=HUNG_STREAM_TIMEOUT_S,
        type=float,
        help="seconds a running stream may stay silent once its worker has left membership (a hung or frozen "
        "worker) before it is cut: UNAVAILABLE after the first token (the gateway resumes it elsewhere), "
        "re-dispatched before it (0: wait for gRPC keep-alive or the deadline)",
    )
    parser.flag(
        "--worker-wait",
        default=WORKER_WAIT_S,
        type=float,
        help="seconds a request waits for a worker to join while this role has none live, or while the rank "
        "it must go to (pinned, or its bootstrap room's) lost its worker within as many seconds (a membership "
        "flap: workers register again within moments); never past the request's deadline; then UNAVAILABLE "
        "(0: at once)",
    )
    parser.flag("--stale-after", default=5.0, type=float, help="seconds without a report before a worker is STALE")
    parser.flag("--report-interval-ms", default=100, type=int, help="periodic report interval asked of workers")
    parser.flag("--max-prompt-tokens", default=131_072, type=int, help="longest prompt accepted, in tokens")
    parser.flag(
        "--max-prompt-chars",
        default=0,
        type=int,
        help="longest prompt text accepted, in characters, refused before tokenising (0: 16 per prompt token)",
    )
    parser.flag(
        "--max-concurrent-requests",
        default=10_000,
        type=int,
        help="Generate streams handled at once; more get RESOURCE_EXHAUSTED (back-pressure, not buffering)",
    )
    parser.flag("--max-watchers", default=64, type=int, help="concurrent WatchLoad streams; more: RESOURCE_EXHAUSTED")
    defaults = PolicyOptions()
    parser.flag(
        "--cache-block-size",
        default=defaults.cache_block_size,
        type=int,
        help="cache_aware: tokens per prefix-index block (match the workers' --page-size)",
    )
    parser.flag(
        "--cache-index-blocks",
        default=defaults.cache_index_blocks,
        type=int,
        help="cache_aware: most prefix blocks remembered per worker (also capped by its KV capacity)",
    )
    parser.flag(
        "--cache-load-weight",
        default=defaults.cache_load_weight,
        type=float,
        help="cache_aware: queued tokens that outweigh one expected cache-hit token",
    )
    parser.flag(
        "--balance-abs-threshold",
        default=defaults.balance_abs_threshold,
        type=int,
        help="cache_aware overload guard: a rank with more than this many requests above the least loaded ...",
    )
    parser.flag(
        "--balance-rel-threshold",
        default=defaults.balance_rel_threshold,
        type=float,
        help="... and more than this many times its requests is skipped (balance by load instead)",
    )
    parser.flag(
        "--max-routing-keys",
        default=defaults.max_routing_keys,
        type=int,
        help="cache_aware: sessions (routing_key) remembered, least recently used dropped",
    )
    flow = FlowOptions()
    parser.flag(
        "--flow-control",
        default=flow.enabled,
        type=bool,
        help="late binding: hold a request in the dispatcher's queue while no rank has room (a free batch slot, "
        "enough free KV, a predicted wait under --max-wait-ms) and bind it when room frees. The flags marked "
        "'flow control' act only with it: given on the command line without it they are refused; set through "
        "their environment variables they are ignored with a warning (one environment may serve dispatchers "
        "with and without it)",
    )
    parser.flag("--max-queued-requests", default=flow.max_queued_requests, type=int, help="flow control: queue bound")
    parser.flag(
        "--queue-ttl", default=flow.queue_ttl_s, type=float, help="flow control: longest wait in the queue, seconds"
    )
    parser.flag(
        "--sheddable-queue-ttl",
        default=flow.sheddable_ttl_s,
        type=float,
        help="flow control: longest wait of sheddable requests (priority >= --sheddable-priority), seconds",
    )
    parser.flag(
        "--sheddable-priority",
        default=flow.sheddable_priority,
        type=int,
        help="flow control: requests of this priority or a larger value (served later) are shed first",
    )
    parser.flag(
        "--max-wait-ms",
        default=flow.max_wait_ms,
        type=float,
        help="flow control, mixed and prefill: a rank whose predicted prefill wait exceeds this has no room "
        "(0: batch slots and KV only)",
    )
    parser.flag(
        "--max-prefill-ahead-chunks",
        default=flow.max_prefill_ahead_chunks,
        type=float,
        help="flow control, mixed and prefill, with --max-wait-ms 0: a rank with at least this many prefill chunks "
        "of prompt work queued ahead (its --chunked-prefill-size) has no room, so bound requests start prefill "
        "within about a step (0: batch slots and KV only)",
    )
    parser.flag(
        "--gather-ms",
        default=flow.gather_s * 1000,
        type=float,
        help="flow control: requests arriving within this many ms of a window's first request are decided together "
        "when it closes, the ones with the fewest prompt tokens left to compute on the rank caching most of their "
        f"prompt first (0: each at once, in arrival order; at most {MAX_GATHER_MS:g})",
    )
    parser.flag(
        "--fair-share-quantum",
        default=flow.quantum_tokens,
        type=int,
        help="flow control: prompt tokens of credit a tenant gets per deficit-round-robin visit",
    )
    parser.flag(
        "--tenant-weights",
        default="",
        help="flow control: comma separated tenant=weight (others weigh 1), e.g. gold=4,batch=0.5",
    )
    parser.flag(
        "--max-tenants",
        default=flow.max_tenants,
        type=int,
        help="flow control: tenants with queued requests tracked apart; further ones share one class",
    )
    parser.flag(
        "--tenant-share",
        default=flow.tenant_share_scale,
        type=float,
        help="flow control: while other tenants are active, a tenant holds at most this multiple of its weighted "
        "share of the ranks' batch slots and KV tokens; its excess waits in the queue (0: no cap)",
    )
    parser.flag(
        "--tenant-active-window",
        default=flow.tenant_active_window_s,
        type=float,
        help="flow control: seconds a tenant counts as active after its last request ended (for --tenant-share)",
    )
    parser.flag(
        "--reserved-slots",
        default=flow.reserved_slots,
        type=int,
        help="flow control: batch slots per rank kept free of sheddable requests (priority >= --sheddable-priority) "
        "while other requests arrive (one within --reserve-window), so a request of better priority is bound at "
        "once instead of behind the sheddable ones already running (0: no reserve)",
    )
    parser.flag(
        "--reserve-window",
        default=flow.reserve_window_s,
        type=float,
        help="flow control: seconds the --reserved-slots reserve holds after the last request of non-sheddable "
        "priority arrived",
    )
    parser.flag(
        "--work-conserving",
        default=flow.work_conserving,
        type=bool,
        help="flow control: lend the room --tenant-share and --reserved-slots keep for others while they leave it "
        "unused (a tenant past its share, a sheddable request in the reserve, is still bound if the room left free "
        "covers the others' headroom, --lend-headroom); they get it back as lent requests end. "
        "--no-work-conserving: the share and the reserve are hard, their unused room idles",
    )
    parser.flag(
        "--lend-headroom",
        default=flow.lend_headroom,
        type=int,
        help="flow control, --work-conserving: requests of room kept free beyond each other tenant's (or, for the "
        "reserve, the better classes') recent peak in flight, so their arrivals bind at once; for a tenant's prompt "
        "room, this many ranks' worth of it",
    )
    return parser


def flow_options(args) -> FlowOptions:
    """The flow-control options of the parsed flags. Raises FlagRefused for a flow-control flag given
    on the command line without --flow-control, SystemExit for a value out of range."""
    if not args.flow_control:
        dests = {flag: flag[2:].replace("-", "_") for flag in FLOW_FLAGS}
        given = [flag for flag, dest in dests.items() if dest in getattr(args, "given_flags", ())]
        if given:
            raise FlagRefused(
                f"{given[0]} acts only with --flow-control, which is off: add --flow-control or drop {given[0]}"
            )
        env_flags = getattr(args, "env_flags", {})
        envs = [env_flags[dest] for dest in dests.values() if dest in env_flags]
        if envs:
            log.warning("flow control is off (--flow-control): %s ignored", ", ".join(envs))
    weights = []
    for item in csv_list(args.tenant_weights):
        name, sep, raw = item.rpartition("=")
        try:
            weight = float(raw)
        except ValueError:
            weight = 0.0
        if not sep or not name or not weight > 0:
            raise FlagRefused(f"--tenant-weights: {item!r} is not tenant=weight with a weight > 0")
        weights.append((name, weight))
    if args.max_queued_requests < 1 or args.fair_share_quantum < 1 or args.max_tenants < 1:
        raise FlagRefused("--max-queued-requests, --fair-share-quantum and --max-tenants must be >= 1")
    if not args.queue_ttl > 0 or not args.sheddable_queue_ttl > 0 or args.max_wait_ms < 0:
        raise FlagRefused("--queue-ttl and --sheddable-queue-ttl must be > 0, --max-wait-ms >= 0")
    if not args.tenant_share >= 0 or not args.tenant_active_window >= 0:
        raise FlagRefused("--tenant-share and --tenant-active-window must be >= 0")
    if args.reserved_slots < 0 or not args.reserve_window >= 0 or args.lend_headroom < 0:
        raise FlagRefused("--reserved-slots, --reserve-window and --lend-headroom must be >= 0")
    if not 0 <= args.gather_ms <= MAX_GATHER_MS:
        raise FlagRefused(f"--gather-ms must be within 0..{MAX_GATHER_MS:g} (ms), not {args.gather_ms}")
    if not args.max_prefill_ahead_chunks >= 0:
        raise FlagRefused(f"--max-prefill-ahead-chunks must be >= 0, not {args.max_prefill_ahead_chunks}")
    return FlowOptions(
        enabled=args.flow_control,
        max_queued_requests=args.max_queued_requests,
        queue_ttl_s=args.queue_ttl,
        sheddable_ttl_s=args.sheddable_queue_ttl,
        sheddable_priority=args.sheddable_priority,
        max_wait_ms=args.max_wait_ms,
        max_prefill_ahead_chunks=args.max_prefill_ahead_chunks,
        quantum_tokens=args.fair_share_quantum,
        tenant_weights=tuple(weights),
        max_tenants=args.max_tenants,
        tenant_share_scale=args.tenant_share,
        tenant_active_window_s=args.tenant_active_window,
        reserved_slots=args.reserved_slots,
        reserve_window_s=args.reserve_window,
        work_conserving=args.work_conserving,
        lend_headroom=args.lend_headroom,
        gather_s=args.gather_ms / 1000,
    )


def policy_options(args) -> PolicyOptions:
    if args.cache_block_size < 1 or args.cache_index_blocks < 1 or args.max_routing_keys < 1:
        raise FlagRefused("--cache-block-size, --cache-index-blocks and --max-routing-keys must be >= 1")
    if args.balance_abs_threshold < 0 or args.balance_rel_threshold < 1 or args.cache_load_weight < 0:
        raise FlagRefused(
            "--balance-abs-threshold must be >= 0, --balance-rel-threshold >= 1, --cache-load-weight >= 0"
        )
    return PolicyOptions(
        dp_size=args.dp_size,
        cache_block_size=args.cache_block_size,
        cache_index_blocks=args.cache_index_blocks,
        cache_load_weight=args.cache_load_weight,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        max_routing_keys=args.max_routing_keys,
    )


@dataclass
class Dispatcher:
    """A running dispatcher (also used by tests and the local cluster in-process)."""

    core: DispatchCore
    host: ServiceHost
    address: str
    metrics_port: int = 0


async def serve(args, stop_event: asyncio.Event, ready: asyncio.Future | None = None) -> None:
    flow = flow_options(args)  # refused flags stop the start before anything loads
    role = Role(role_of_mode(args.disaggregation_mode))
    table = LoadTable(inflight_timeout_s=args.inflight_timeout, stale_after_s=args.stale_after)
    policy = create_policy(args.load_balance_method, role, policy_options(args))
    router = Router(role, table, policy, dp_size=args.dp_size)
    dispatcher_id = f"dispatcher-{role.value}-{uuid.uuid4().hex[:8]}"
    metrics = DispatcherMetrics(table)
    static = parse_static_workers(csv_list(args.workers), role)
    if not args.worker_wait >= 0:
        raise FlagRefused(f"--worker-wait must be >= 0 seconds, not {args.worker_wait}")
    if not args.hung_stream_timeout >= 0:
        raise FlagRefused(f"--hung-stream-timeout must be >= 0 seconds, not {args.hung_stream_timeout}")
    try:
        source = resolve(args.model, args.served_model_name)
        tokenizer = source.tokenizer()
    except UnsupportedModel as exc:
        raise SystemExit(f"cannot use --model {args.model}: {exc}") from None

    def worker_removed(worker_id: str) -> None:
        policy.on_worker_removed(worker_id)
        core.waves.forget(worker_id)
        core.kv_index.forget(worker_id)
        asyncio.get_running_loop().create_task(core.channels.prune())
        core.flow.kick()  # with no worker left, queued requests fail UNAVAILABLE now
        core.hung.on_worker_left(worker_id)

    members = Members(table, role, static=not args.etcd, on_removed=worker_removed, model=source.model_id)
    members.add_static(static)
    core = DispatchCore(
        dispatcher_id,
        router,
        members,
        metrics,
        args.request_timeout,
        args.max_prompt_tokens,
        args.report_interval_ms,
        args.max_concurrent_requests,
        args.max_watchers,
        tokenizer=tokenizer,
        flow=flow,
        max_prompt_chars=args.max_prompt_chars,
        worker_wait_s=args.worker_wait,
        hung_stream_timeout_s=args.hung_stream_timeout,
    )
    host = ServiceHost(
        args.host,
        args.port,
        [
            dispatch_pb2.DESCRIPTOR.services_by_name["Dispatch"].full_name,
            load_report_pb2.DESCRIPTOR.services_by_name["LoadReport"].full_name,
        ],
    )
    dispatch_pb2_grpc.add_DispatchServicer_to_server(DispatchServicer(core), host.server)
    load_report_pb2_grpc.add_LoadReportServicer_to_server(LoadReportServicer(core), host.server)
    address = advertised(args.host, host.port, args.advertise_address)
    recorder = BootstrapRecorder(args.bootstrap, args.etcd, args.etcd_prefix) if role is Role.PREFILL else None
    if recorder:
        core.room_recorder = recorder.record
        core.room_holder = recorder.holder
    watch = (
        PrefixWatch(args.etcd, workers_prefix(args.etcd_prefix, role.value), members.on_etcd_change)
        if args.etcd
        else None
    )
    registration = (
        LeasedRegistration(
            args.etcd,
            dispatchers_prefix(args.etcd_prefix, role.value) + dispatcher_id,
            {"dispatcher_id": dispatcher_id, "role": role.value, "address": address, "model": source.model_id},
            args.lease_ttl,
        )
        if args.etcd
        else None
    )
    running = Dispatcher(core, host, address)

    async def start() -> None:
        await host.start()
        if recorder:
            await recorder.start()
        if watch:
            watch.start()
            await asyncio.wait_for(watch.synced.wait(), timeout=30)
        if registration:
            await registration.start()
        if args.metrics_port:
            running.metrics_port = metrics.serve(args.metrics_port, args.host)
        if running.metrics_port:
            print(f"pdlb-dispatcher metrics on :{running.metrics_port}/metrics", flush=True)
        print(
            f"pdlb-dispatcher ({role.value}, {policy.name}, model {source.model_id}) listening on {address}", flush=True
        )
        if ready is not None:
            ready.set_result(running)

    async def stop() -> None:
        core.drain()  # queued requests fail now (UNAVAILABLE); forwarded ones run on within the grace
        if registration:
            await registration.close()  # deregister first: schedulers stop reporting here
        await host.set_serving(False)
        # forwarded requests get the grace; those still running then fail naming it
        await core.end_running(args.shutdown_grace)
        await host.stop(1.0)
        if watch:
            await watch.close()
        if recorder:
            await recorder.close()
        await core.channels.close()

    await run_until_signal(start, stop, stop_event)


def main(argv: list[str] | None = None) -> None:
    run_service(build_parser, serve, argv)


if __name__ == "__main__":
    main()
