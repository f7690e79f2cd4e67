"""Dispatch and LoadReport servicers."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import grpc

from pdlb.common.requests import (
    BOUND_KEY,
    RETRY_AFTER_KEY,
    InvalidRequest,
    check_request_off_loop,
    prompt_chars_limit,
)
from pdlb.common.roles import role_from_proto, role_to_proto
from pdlb.common.shutdown_cut import Cut, ShutdownCut
from pdlb.common.slots import Slots
from pdlb.common.tokenizer import ByteTokenizer, StreamDecoder, Tokenizer, visible_tokens
from pdlb.services.dispatcher.channels import ChannelPool
from pdlb.services.dispatcher.flow_control import FlowControl, FlowOptions, Shed
from pdlb.services.dispatcher.kv_index import ExactPrefixIndex
from pdlb.services.dispatcher.load_table import (
    LoadTable,
    MemberState,
    ReportedLoad,
    Role,
    Worker,
    WorkerEntry,
)
from pdlb.services.dispatcher.members import Members, NotAMember
from pdlb.services.dispatcher.metrics import DispatcherMetrics, wall_ms
from pdlb.services.dispatcher.policies import NoLiveWorker, RouteContext, RoutingError
from pdlb.services.dispatcher.policies.base import PrefixIndexPolicy
from pdlb.services.dispatcher.router import Decision, Router
from pdlb.services.dispatcher.stream_watch import HungStreamWatch
from pdlb.services.dispatcher.waves import WaveCoordinator
from pdlb.v1 import bootstrap_pb2, common_pb2, dispatch_pb2, dispatch_pb2_grpc, load_report_pb2, load_report_pb2_grpc
from pdlb.v1 import scheduler_pb2 as sched_pb

log = logging.getLogger(__name__)
NO_REDISPATCH_KEY = "pdlb-no-redispatch"  # trailing metadata set by schedulers (scheduler/service.py)

MIN_WATCH_INTERVAL_MS = 50
# How long a request waits for a worker of the role when none is live (--worker-wait): a membership
# flap (etcd paused past the lease) empties the table for the moment the workers take to register again.
WORKER_WAIT_S = 5.0
HUNG_STREAM_TIMEOUT_S = 10.0
SHUTTING_DOWN = "the dispatcher is shutting down"
REPORT_OUTBOX = 16  # messages queued to one reporting worker (StartWave is rare: one per wave)
MAX_WATCH_INTERVAL_MS = 60_000
# Worker statuses that mean "this worker could not take the request": safe to try another rank.
RETRYABLE_BEFORE_FIRST_TOKEN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION}
# Worker statuses that describe the request itself: passed to the client unchanged.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
_STATE = {
    MemberState.LIVE: dispatch_pb2.MEMBER_STATE_LIVE,
    MemberState.STALE: dispatch_pb2.MEMBER_STATE_STALE,
    MemberState.GONE: dispatch_pb2.MEMBER_STATE_GONE,
}

# Called after a prefill decision with (room, decision); records the room in Bootstrap.
RoomRecorder = Callable[[int, Decision], Awaitable[None]]
RoomHolder = Callable[[int], Awaitable[bootstrap_pb2.RoomRecord | None]]


@functools.lru_cache(maxsize=4096)
def worker_info(worker: Worker) -> common_pb2.WorkerInfo:
    """The worker as a message (cached: workers are immutable and answered on every Route; callers
    copy it into their response, never mutate it)."""
    return common_pb2.WorkerInfo(
        worker_id=worker.worker_id,
        role=role_to_proto(worker.role.value),
        dp_rank=worker.dp_rank,
        address=worker.address,
        model=worker.model,
    )


def load_from_proto(load: common_pb2.WorkerLoad) -> ReportedLoad:
    return ReportedLoad(
        running_requests=load.running_requests,
        waiting_requests=load.waiting_requests,
        running_tokens=load.running_tokens,
        waiting_tokens=load.waiting_tokens,
        kv_tokens_used=load.kv_tokens_used,
        kv_tokens_capacity=load.kv_tokens_capacity,
        cache_hit_tokens=load.cache_hit_tokens,
        prompt_tokens_total=load.prompt_tokens_total,
        max_running_requests=load.max_running_requests,
        kv_tokens_evictable=min(load.kv_tokens_evictable, load.kv_tokens_used),
        prefill_tokens_per_s=_finite(load.prefill_tokens_per_s),
        step_ms=_finite(load.step_ms),
        mean_output_tokens=_finite(load.mean_output_tokens),
        prefill_pending_tokens=load.prefill_pending_tokens,
        step_base_ms=_finite(load.step_base_ms),
        prefill_tokens_per_step=load.prefill_tokens_per_step,
        max_prompt_tokens=load.max_prompt_tokens,
        max_context_tokens=load.max_context_tokens,
    )


def _finite(value: float) -> float:
    """A reported rate, or 0 (unknown) when a worker sends nonsense."""
    return value if math.isfinite(value) and value > 0 else 0.0


def load_to_proto(load: ReportedLoad) -> common_pb2.WorkerLoad:
    return common_pb2.WorkerLoad(**load.__dict__)


async def acquire(slots: Slots, context) -> None:
    """Take a slot, or answer RESOURCE_EXHAUSTED at once."""
    if not slots.try_acquire():
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"dispatcher has {slots.refusal()}; retry later or add dispatchers"
        )


class DispatchCore:
    """What both servicers share: the table, the router, membership, channels and metrics."""

    def __init__(
        self,
        dispatcher_id: str,
        router: Router,
        members: Members,
        metrics: DispatcherMetrics,
        request_timeout_s: float,
        max_prompt_tokens: int,
        report_interval_ms: int,
        max_concurrent_requests: int = 10_000,
        max_watchers: int = 64,
        tokenizer: Tokenizer | None = None,
        flow: FlowOptions | None = None,
        max_prompt_chars: int = 0,
        worker_wait_s: float = WORKER_WAIT_S,
        hung_stream_timeout_s: float = HUNG_STREAM_TIMEOUT_S,
    ) -> None:
        self.dispatcher_id = dispatcher_id
        self.worker_wait_s = worker_wait_s
        self.max_prompt_chars = prompt_chars_limit(max_prompt_tokens, max_prompt_chars)
        self.tokenizer = tokenizer or ByteTokenizer()  # text is tokenised here, before the decision
        self.active_requests = Slots("requests in flight", max_concurrent_requests, "--max-concurrent-requests")
        self.watchers = Slots("WatchLoad streams", max_watchers, "--max-watchers")
        self.router = router
        self.table: LoadTable = router.table
        self.members = members
        self.metrics = metrics
        self.channels = ChannelPool(self.table.addresses)
        # Streams on a worker that left membership and went silent are cut (stream_watch.py).
        self.hung = HungStreamWatch(hung_stream_timeout_s, lambda worker_id: worker_id in self.table.entries)
        self.request_timeout_s = request_timeout_s
        self.max_prompt_tokens = max_prompt_tokens
        self.report_interval_ms = report_interval_ms
        self.room_recorder: RoomRecorder | None = None
        self.room_holder: RoomHolder | None = None  # prefill: who holds a room already (Bootstrap)
        self.draining = False
        self._drained = asyncio.Event()  # set by drain(): requests waiting for a worker stop waiting
        # Request ids and bootstrap rooms of the Generate calls in flight (bounded by active_requests).
        self.in_flight_ids: set[str] = set()
        self.in_flight_rooms: set[int] = set()
        # The tasks of the Generate calls in flight, so that a shutdown whose grace runs out can fail
        # them with a status naming it (gRPC's own cut says only "Cancelling all calls").
        self.calls = ShutdownCut(SHUTTING_DOWN)
        # Lockstep groups: each worker's report stream carries StartWave back to it.
        self.report_outboxes: dict[str, asyncio.Queue[load_report_pb2.ReportResponse]] = {}
        self.waves = WaveCoordinator(self._send_start_wave)
        # What each worker caches, from its block events (prefix-aware policies read it).
        self.kv_index = ExactPrefixIndex()
        if isinstance(router.policy, PrefixIndexPolicy):
            router.policy.exact = self.kv_index
        # Late binding: requests wait here until a rank has room (flow_control.py).
        self.flow = FlowControl(
            router, flow or FlowOptions(enabled=False), on_shed=metrics.count_shed, on_wait=metrics.queue_wait.observe
        )
        queue, shares = self.flow.queue, self.flow.shares
        metrics.watch_queue(lambda: (len(queue), queue.tokens, queue.tenants, shares.held_total, shares.lent_total))

    def drain(self) -> None:
        """Shutting down: refuse new requests, and fail now (UNAVAILABLE, naming the shutdown) every
        request that waits here, queued for room or for a worker to join; requests already sent to
        a worker run on (the gRPC server's grace bounds them)."""
        self.draining = True
        self._drained.set()
        self.flow.fail_all(SHUTTING_DOWN)

    async def end_running(self, grace_s: float) -> None:
        """Shutting down, after drain(): wait up to `grace_s` seconds for the Generate calls in flight
        to finish, then fail those still running, UNAVAILABLE, naming the shutdown and the grace."""
        await self.calls.end(grace_s, settle_s=5)  # each one sends its status; bounded, in case one does not

    async def wait_join(self, timeout: float) -> None:
        """Until a worker joins, the dispatcher drains, or `timeout` seconds pass."""
        drained = asyncio.ensure_future(self._drained.wait())
        joined = asyncio.ensure_future(self.members.wait_join(timeout))
        try:
            await asyncio.wait({drained, joined}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            joined.cancel()

    def _send_start_wave(self, worker_id: str, start: load_report_pb2.StartWave) -> bool:
        outbox = self.report_outboxes.get(worker_id)
        if outbox is None or outbox.full():
            return False  # retried on the group's next report
        outbox.put_nowait(load_report_pb2.ReportResponse(start_wave=start))
        self.metrics.start_waves.inc()
        return True


class DispatchServicer(dispatch_pb2_grpc.DispatchServicer):
    def __init__(self, core: DispatchCore) -> None:
        self.core = core

    async def _context_of(self, request: common_pb2.InferenceRequest) -> tuple[RouteContext, int | None]:
        core = self.core
        checked = await check_request_off_loop(request, core.max_prompt_tokens, core.tokenizer, core.max_prompt_chars)
        if not request.input_ids:
            # Tokenised once, here: the worker computes exactly the ids the method counted.
            request.input_ids.extend(checked.input_ids)
            request.ClearField("text")
            request.ClearField("messages")
        ctx = RouteContext(
            request_id=checked.request_id,
            num_tokens=len(checked.input_ids),
            bootstrap_room=request.bootstrap_room if request.HasField("bootstrap_room") else None,
            routing_key=request.routing_key,
            input_ids=checked.input_ids,
        )
        external = self.core.router.external_rank(
            request.prefill_dp_rank if request.HasField("prefill_dp_rank") else None,
            request.decode_dp_rank if request.HasField("decode_dp_rank") else None,
        )
        return ctx, external

    async def _when_workers(self, decide: Callable[[], Awaitable[Decision]], due: float) -> Decision:
        """`decide()`, tried again as workers join while no worker can take the request
        (NoLiveWorker): the role has none live, or the rank it must go to lost its worker within the
        last `worker_wait_s` seconds (a membership flap: the workers register again one by one).
        Waits up to `worker_wait_s` seconds and never past `due` (monotonic); then NoLiveWorker stands.
        A rank without a worker for longer fails at once."""
        core = self.core
        began = time.monotonic()
        until = min(began + core.worker_wait_s, due)
        retried, waited = False, False
        try:
            while True:
                try:
                    return await decide()
                except NoLiveWorker as exc:
                    left = until - time.monotonic()
                    if core.draining:
                        raise RoutingError(grpc.StatusCode.UNAVAILABLE, f"{exc}, and {SHUTTING_DOWN}") from None
                    if left <= 0 or not self._in_flap(exc):
                        raise
                    if not self._missing(exc):
                        if retried:  # the worker is there yet did not take it (no room): not a flap
                            raise
                        retried = True  # it joined meanwhile: decide again now, once
                        continue
                    retried, waited = False, True
                    core.metrics.worker_waiting.inc()
                    try:
                        await core.wait_join(left)
                    finally:
                        core.metrics.worker_waiting.dec()
        finally:
            if waited:
                core.metrics.worker_wait.observe(time.monotonic() - began)

    def _in_flap(self, exc: NoLiveWorker) -> bool:
        """Whether the missing worker may be about to register again: the role has none at all, or
        the rank lost its worker within the last `worker_wait_s` seconds."""
        return exc.rank is None or self.core.members.left_lately(exc.rank, self.core.worker_wait_s)

    def _missing(self, exc: NoLiveWorker) -> bool:
        """Whether the table still lacks what `exc` missed (no worker at all, or none of the rank)."""
        table = self.core.table
        return not table.candidates() if exc.rank is None else table.for_rank(exc.rank) is None

    async def _decide(
        self, ctx: RouteContext, external: int | None, exclude: set[str], context, due: float
    ) -> Decision:
        async def decide() -> Decision:
            return self.core.router.decide(ctx, external, exclude)

        try:
            decision = await self._when_workers(decide, due)
        except RoutingError as exc:
            self.core.metrics.failures.labels(exc.code.name).inc()
            await context.abort(exc.code, str(exc))
        self.core.metrics.count_dispatch(decision.method, decision.entry.dp_rank)
        return decision

    async def _admit(
        self, request: common_pb2.InferenceRequest, ctx: RouteContext, deadline: float, context
    ) -> Decision:
        """The first decision of a Generate: through the admission queue (late binding)."""
        ttft_due = time.monotonic() + request.ttft_deadline_ms / 1000 if request.ttft_deadline_ms else math.inf
        due = min(deadline, ttft_due)
        tenant = request.tenant or request.routing_key
        try:
            decision = await self._when_workers(
                lambda: self.core.flow.decide(
                    ctx, priority=request.priority, tenant=tenant, deadline_at=ttft_due, expires_by=deadline
                ),
                due,
            )
        except RoutingError as exc:
            self.core.metrics.failures.labels(exc.code.name).inc()
            await context.abort(exc.code, str(exc))
        except Shed as exc:
            self.core.metrics.failures.labels("RESOURCE_EXHAUSTED").inc()
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_s)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        self.core.metrics.count_dispatch(decision.method, decision.entry.dp_rank)
        return decision

    async def _record_room(self, ctx: RouteContext, decision: Decision, context) -> None:
        """Prefill: tell Bootstrap which rank took the room, so the decode worker can find the KV."""
        if self.core.router.role is not Role.PREFILL or ctx.bootstrap_room is None or not self.core.room_recorder:
            return
        try:
            await self.core.room_recorder(ctx.bootstrap_room, decision)
        except grpc.aio.AioRpcError as err:
            self.core.table.cancel_dispatch(decision.entry.worker.worker_id, decision.seq)
            code = err.code() if err.code() in CLIENT_ERRORS else grpc.StatusCode.UNAVAILABLE
            self.core.metrics.failures.labels(code.name).inc()
            await context.abort(code, f"request {ctx.request_id}: bootstrap: {err.details()}")

    async def Route(self, request: dispatch_pb2.RouteRequest, context) -> dispatch_pb2.RouteResponse:
        ctx, external = await self._checked(request.request, context)
        due = time.monotonic() + (context.time_remaining() or self.core.request_timeout_s)
        decision = await self._decide(ctx, external, set(), context, due)
        await self._record_room(ctx, decision, context)
        return dispatch_pb2.RouteResponse(
            request_id=ctx.request_id,
            dp_rank=decision.entry.dp_rank,
            worker=worker_info(decision.entry.worker),
            method=decision.method,
            dispatch_seq=decision.seq,
            dispatcher_id=self.core.dispatcher_id,
            dp_wave=self.core.waves.on_dispatch(decision.entry.worker.worker_id),
            predicted_ms=(decision.predicted_s or 0.0) * 1000,
        )

    async def _checked(self, request: common_pb2.InferenceRequest, context) -> tuple[RouteContext, int | None]:
        if self.core.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{SHUTTING_DOWN}; send the request to another one")
        try:
            return await self._context_of(request)
        except InvalidRequest as exc:
            self.core.metrics.failures.labels("INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Generate(
        self, request: dispatch_pb2.GenerateRequest, context
    ) -> AsyncIterator[dispatch_pb2.GenerateResponse]:
        ctx, external = await self._checked(request.request, context)
        await acquire(self.core.active_requests, context)
        try:
            await self._claim(ctx, context)
            holder = self._room_holder(ctx)
            try:
                # A shutdown's cut lands where this call awaits its worker or asks for its next chunk
                # (shutdown_cut.py), never inside gRPC's own write of a chunk.
                async with aclosing(
                    self.core.calls.stream(self._generate(request, ctx, external, context, holder))
                ) as chunks:
                    async for response in chunks:
                        yield response
            except Cut as cut:
                self.core.metrics.failures.labels("UNAVAILABLE").inc()
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"request {ctx.request_id}: {cut}")
            finally:
                if holder is not None:
                    holder.cancel()
                self.core.flow.release(ctx.request_id)  # its tenant's share frees (kicked below)
                self.core.in_flight_ids.discard(ctx.request_id)
                if ctx.bootstrap_room is not None:
                    self.core.in_flight_rooms.discard(ctx.bootstrap_room)
        finally:
            self.core.active_requests.release()
            self.core.flow.kick()  # a finished, failed or cancelled request may have freed room

    async def _claim(self, ctx: RouteContext, context) -> None:
        """Refuse a request whose id or bootstrap room is in flight here (ALREADY_EXISTS): on two
        ranks both would run, and one room's KV would be held twice."""
        core, rid, room = self.core, ctx.request_id, ctx.bootstrap_room
        if rid in core.in_flight_ids:
            core.metrics.failures.labels("ALREADY_EXISTS").inc()
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request {rid} is already in flight here; request ids must be unique"
            )
        if room is not None and room in core.in_flight_rooms:
            core.metrics.failures.labels("ALREADY_EXISTS").inc()
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request {rid}: bootstrap room {room} is taken by another request in flight here; give every "
                "request a room of its own",
            )
        core.in_flight_ids.add(rid)
        if room is not None:
            core.in_flight_rooms.add(room)

    def _room_holder(self, ctx: RouteContext) -> asyncio.Future | None:
        """Prefill: Bootstrap's record of the request's room, looked up while the rank is chosen
        (None when not a prefill request with a room, or nothing to ask)."""
        core, room = self.core, ctx.bootstrap_room
        if core.router.role is not Role.PREFILL or room is None or core.room_holder is None:
            return None
        return asyncio.ensure_future(core.room_holder(room))

    async def _refuse_held_room(
        self, ctx: RouteContext, decision: Decision, holder: asyncio.Future | None, context
    ) -> None:
        """Refuse at once (ALREADY_EXISTS) a room that Bootstrap records for another worker's prefill,
        before the chosen rank computes it: unchecked, the clash would show only at the hand-off, after
        that prefill ran. A room recorded for the chosen worker goes on: the worker itself refuses it
        while it holds that room's KV, and takes it again once the KV was pulled (as before)."""
        record = await holder if holder is not None else None
        worker = decision.entry.worker
        if record is None or record.prefill_worker_id == worker.worker_id:
            return
        self.core.table.cancel_dispatch(worker.worker_id, decision.seq)
        self.core.flow.kick()
        self.core.metrics.failures.labels("ALREADY_EXISTS").inc()
        await context.abort(
            grpc.StatusCode.ALREADY_EXISTS,
            f"request {ctx.request_id}: bootstrap room {ctx.bootstrap_room} is already held by prefill rank "
            f"{record.prefill_dp_rank} (worker {record.prefill_worker_id}) for another request; give every "
            "request a room of its own",
        )

    async def _generate(
        self,
        request: dispatch_pb2.GenerateRequest,
        ctx: RouteContext,
        external: int | None,
        context,
        holder: asyncio.Future | None = None,
    ) -> AsyncIterator[dispatch_pb2.GenerateResponse]:
        deadline = time.monotonic() + min(
            context.time_remaining() or self.core.request_timeout_s, self.core.request_timeout_s
        )
        excluded: set[str] = set()
        while True:
            if external is None and not excluded:
                decision = await self._admit(request.request, ctx, deadline, context)
            else:  # pinned by a router, or re-dispatched after a failure: never held
                decision = await self._decide(ctx, external, excluded, context, deadline)
            await self._refuse_held_room(ctx, decision, holder, context)
            if not excluded:  # bound: a PD gateway waits for this before it sends the prefill half
                await context.send_initial_metadata(((BOUND_KEY, str(decision.entry.dp_rank)),))
            worker = decision.entry.worker
            sent_any = False
            try:
                async for response in self._forward(request, ctx, decision, deadline, context):
                    if not sent_any:
                        sent_any = True
                        self.core.flow.prefilled(ctx.request_id)  # its prompt no longer counts as prefill work
                    yield response
                self.core.table.record_finish(worker.worker_id, decision.seq)  # its slot is free now
                return
            except (asyncio.CancelledError, GeneratorExit):
                # The client went away: the worker drops the request now. Before its first token
                # too: a decode worker acknowledges a request only once its KV has arrived, so one
                # cancelled during the pull stayed counted in flight until --inflight-timeout.
                self.core.table.record_finish(worker.worker_id, decision.seq)
                raise
            except grpc.aio.AioRpcError as err:
                if not sent_any:
                    # Whether or not the worker took it, the request is not running there now.
                    self.core.table.cancel_dispatch(worker.worker_id, decision.seq)
                    self.core.waves.may_resend(worker.worker_id)
                    self.core.flow.kick()
                code = err.code()
                retry = (
                    not sent_any
                    and code in RETRYABLE_BEFORE_FIRST_TOKEN
                    and external is None
                    and not excluded
                    and not _no_redispatch(err)
                )
                if retry:
                    log.warning(
                        "request %s: worker %s failed before its first token (%s); re-dispatching",
                        ctx.request_id,
                        worker.worker_id,
                        code.name,
                    )
                    self.core.metrics.redispatches.inc()
                    excluded.add(worker.worker_id)
                    continue
                await self._fail(context, ctx.request_id, worker, err, sent_any)

    async def _forward(
        self, request: dispatch_pb2.GenerateRequest, ctx: RouteContext, decision: Decision, deadline: float, context
    ) -> AsyncIterator[dispatch_pb2.GenerateResponse]:
        """One attempt on the decided worker; its failures surface as AioRpcError."""
        worker = decision.entry.worker
        forwarded = sched_pb.SchedulerGenerateRequest(
            request=request.request,
            dispatch_seq=decision.seq,
            dispatcher_id=self.core.dispatcher_id,
            dp_wave=self.core.waves.on_dispatch(worker.worker_id),
        )
        decoder = StreamDecoder(self.core.tokenizer, not request.request.sampling.keep_special_tokens)
        async with self.core.channels.scheduler(worker.address) as stub:
            call = stub.Generate(forwarded, timeout=max(deadline - time.monotonic(), 0.001))
            with self.core.hung.watching(worker.worker_id, call.cancel) as stream:
                try:
                    async for chunk in call:
                        stream.touch()
                        if chunk.finish_reason == common_pb2.FINISH_REASON_PREFILL_DONE:
                            # Recorded once the KV is held, so a re-dispatch never conflicts with it.
                            await self._record_room(ctx, decision, context)
                        text = decoder.push(visible_tokens(list(chunk.token_ids), chunk.finish_reason))
                        if chunk.finish_reason:
                            text += decoder.flush()
                        yield dispatch_pb2.GenerateResponse(
                            request_id=ctx.request_id,
                            token_ids=chunk.token_ids,
                            text=text,
                            finish_reason=chunk.finish_reason,
                            dp_rank=worker.dp_rank,
                            worker_id=worker.worker_id,
                            prompt_tokens=chunk.prompt_tokens,
                            cached_tokens=chunk.cached_tokens,
                            predicted_ms=(decision.predicted_s or 0.0) * 1000,
                            logprobs=chunk.logprobs,
                        )
                except asyncio.CancelledError:
                    if _client_cancelled(context):
                        raise
                    # The call was cancelled under us (its channel closed, or the worker hung): the
                    # client must still get a status, never a stream left open until its deadline.
                    why = (
                        f"left membership and sent nothing for {stream.hung_for_s:.1f}s (hung)"
                        if stream.hung_for_s
                        else "was cancelled locally"
                    )
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.aio.Metadata(),
                        grpc.aio.Metadata(),
                        details=f"the call to worker {worker.worker_id} at {worker.address} {why}",
                    ) from None
                finally:
                    call.cancel()

    async def _fail(self, context, request_id: str, worker: Worker, err: grpc.aio.AioRpcError, sent_any: bool) -> None:
        code = err.code()
        if code not in CLIENT_ERRORS:
            code = grpc.StatusCode.UNAVAILABLE
        stage = "after streaming started" if sent_any else "before the first token"
        self.core.metrics.failures.labels(code.name).inc()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            # The request itself is at fault (a length limit, a value the engine refuses): the client
            # gets the worker's own words, which name the request; which worker said so is for the log.
            log.info("request %s refused by worker %s: %s", request_id, worker.worker_id, err.details())
            await context.abort(code, err.details())
        await context.abort(
            code,
            f"request {request_id}: worker {worker.worker_id} (rank {worker.dp_rank}) failed {stage}: "
            f"{err.code().name}: {err.details()}",
        )

    async def WatchLoad(
        self, request: dispatch_pb2.WatchLoadRequest, context
    ) -> AsyncIterator[dispatch_pb2.WatchLoadResponse]:
        interval_ms = min(max(request.interval_ms, MIN_WATCH_INTERVAL_MS), MAX_WATCH_INTERVAL_MS)
        await acquire(self.core.watchers, context)
        try:
            while not self.core.draining:
                yield self.snapshot()
                await asyncio.sleep(interval_ms / 1000)  # pacing the stream, not waiting for an event
        finally:
            self.core.watchers.release()

    def snapshot(self) -> dispatch_pb2.WatchLoadResponse:
        table = self.core.table
        table.refresh_states()
        now = table.clock()
        groups, known = self.core.waves.reported, self.core.kv_index.blocks
        rows = [
            _entry_row(entry, now, groups.get(entry.worker.worker_id), len(known.get(entry.worker.worker_id, ())))
            for entry in table.ordered()
        ]
        flow = self.core.flow
        p50, p99 = flow.wait_percentiles_ms()
        return dispatch_pb2.WatchLoadResponse(
            timestamp_ms=wall_ms(),
            role=role_to_proto(self.core.router.role.value),
            method=self.core.router.policy.name,
            workers=rows,
            flow=dispatch_pb2.FlowControlState(
                enabled=flow.options.enabled,
                queued_requests=len(flow.queue),
                queued_tokens=flow.queue.tokens,
                tenants=flow.queue.tenants,
                admitted_total=flow.admitted_total,
                shed_total=flow.shed_total,
                wait_p50_ms=p50,
                wait_p99_ms=p99,
                shed_by_reason={reason: n for reason, n in flow.shed_by_reason.items() if n},
            ),
        )

    async def ListWorkers(self, request: dispatch_pb2.ListWorkersRequest, context) -> dispatch_pb2.ListWorkersResponse:
        self.core.table.refresh_states()
        return dispatch_pb2.ListWorkersResponse(
            workers=[worker_info(e.worker) for e in self.core.table.ordered() if e.state is not MemberState.GONE]
        )


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536 and len(address) <= 255)


def _client_cancelled(context) -> bool:
    """Whether a CancelledError is this handler's own cancellation (the client went away)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else context.cancelled()


def _no_redispatch(err: grpc.aio.AioRpcError) -> bool:
    """The worker said another rank could not serve this request either (its KV hand-off failed)."""
    return any(key == NO_REDISPATCH_KEY for key, _ in (err.trailing_metadata() or ()))


def _entry_row(
    entry: WorkerEntry, now: float, group: common_pb2.DPGroupState | None = None, kv_blocks: int = 0
) -> dispatch_pb2.WorkerLoadEntry:
    age = -1 if entry.last_report_at is None else int((now - entry.last_report_at) * 1000)
    return dispatch_pb2.WorkerLoadEntry(
        worker=worker_info(entry.worker),
        reported=load_to_proto(entry.reported),
        inflight_requests=entry.inflight_requests,
        inflight_tokens=entry.inflight_tokens,
        report_age_ms=age,
        state=_STATE[entry.state],
        dispatched_total=entry.dispatched_total,
        dp_group=group,
        kv_index_blocks=kv_blocks,
    )


class LoadReportServicer(load_report_pb2_grpc.LoadReportServicer):
    def __init__(self, core: DispatchCore) -> None:
        self.core = core

    async def Report(self, request_iterator, context) -> AsyncIterator[load_report_pb2.ReportResponse]:
        yield load_report_pb2.ReportResponse(
            dispatcher_id=self.core.dispatcher_id, report_interval_ms=self.core.report_interval_ms
        )
        # Reports are read by a task while this generator writes what the dispatcher has to say
        # to the worker (StartWave), so neither direction waits for the other.
        outbox: asyncio.Queue[load_report_pb2.ReportResponse] = asyncio.Queue(maxsize=REPORT_OUTBOX)
        worker_ids: set[str] = set()
        reader = asyncio.create_task(self._read(request_iterator, outbox, worker_ids))
        try:
            while True:
                getter = asyncio.ensure_future(outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                refused = reader.result()
                if refused is not None:
                    await context.abort(*refused)
                return
        finally:
            reader.cancel()
            for worker_id in worker_ids:
                if self.core.report_outboxes.get(worker_id) is outbox:
                    del self.core.report_outboxes[worker_id]
                self.core.waves.may_resend(worker_id)

    async def _read(
        self, request_iterator, outbox: asyncio.Queue, worker_ids: set[str]
    ) -> tuple[grpc.StatusCode, str] | None:
        """Apply the stream's reports; returns why the stream is refused, or None at its end."""
        async for report in request_iterator:
            worker = self._worker_of(report)
            if isinstance(worker, tuple):
                return worker
            try:
                applied = self.core.members.on_report(
                    worker, load_from_proto(report.load), report.acked_dispatch_seq, report.incarnation
                )
            except NotAMember as exc:
                return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
            if worker.worker_id not in worker_ids:
                worker_ids.add(worker.worker_id)
                self.core.report_outboxes[worker.worker_id] = outbox
            if applied is False:
                self.core.metrics.stale_reports.inc()
            elif applied:
                self.core.router.policy.on_report(self.core.table.get(worker.worker_id))
                self.core.flow.kick()  # the report may show room that frees queued requests
                self.core.waves.on_report(
                    worker.worker_id, report.dp_group if report.HasField("dp_group") else None, report.incarnation
                )
            if report.HasField("kv_events") and applied is not False:
                if self.core.kv_index.apply(worker.worker_id, report.kv_events) and not outbox.full():
                    outbox.put_nowait(load_report_pb2.ReportResponse(want_kv_snapshot=True))
        return None

    def _worker_of(self, report: load_report_pb2.ReportRequest) -> Worker | tuple[grpc.StatusCode, str]:
        """The reporting worker, or the status refusing its report."""
        info = report.worker
        role = role_from_proto(info.role)
        if not info.worker_id or role is None or info.dp_rank < 0 or not _is_host_port(info.address):
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                "report needs worker.worker_id, worker.role, worker.dp_rank >= 0 and worker.address host:port",
            )
        if role != self.core.router.role.value:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this dispatcher routes {self.core.router.role.value} workers; worker {info.worker_id} is {role}",
            )
        return Worker(info.worker_id, Role(role), info.dp_rank, info.address, info.model)
