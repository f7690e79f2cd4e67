"""Late binding: requests wait in the dispatcher, not in a rank's queue, until some rank has room.

A request that arrives while every rank would make it queue (no free batch slot, not enough free
KV for its prompt, more prompt work ahead of it than the rank prefills in one step plus what the
rank caches of its prompt, or, with a wait
threshold, a predicted prefill wait above it) is held in the
`AdmissionQueue`. Whenever room may have freed (a load report, a finished or failed request, a
cancellation, a worker joining), `kick()` binds queued requests in queue order, choosing the rank
at that moment with the role's method, until the head does not fit anywhere.

While other tenants are active, a tenant holds at most its weighted share of the cluster's batch
slots and of its prompt-token room (prefill work awaiting a first token; decode: KV) (`TenantShares`,
tenant_share.py); a request of a tenant past its share waits in the queue even when a rank has
room, and requests of other tenants behind it are bound first.

With a slot reserve (`reserved_slots`), while requests of non-sheddable priority keep arriving, a
sheddable request has room on a rank only if that many of its batch slots stay free after it; the
others are bound into the reserve. The queue's order puts sheddable requests last, so one held by
the reserve holds only sheddable ones behind it.

Work-conserving (`work_conserving`, lending.py): the room a share or the reserve keeps is lent
while its owners leave it unused. A tenant past its share is bound once no request within its
share can be, if the room left free still covers the other tenants' headroom (their recent peak
plus `lend_headroom`); a sheddable request may take reserved slots if the free slots left over
all ranks still cover the better classes' headroom (their recent peak in flight plus
`lend_headroom`, at most the whole reserve). Nothing is preempted: owners get lent room back as
lent requests end.

A held request waits at most its TTL (`queue_ttl_s`; `sheddable_ttl_s` for sheddable priorities)
and never past its TTFT deadline; then, or when a request of better priority displaces it from a
full queue, or one of equal priority from a tenant under its fair share of the queue while its own
tenant is over it (the newest of the tenant most over its share goes), it fails with
RESOURCE_EXHAUSTED and a retry hint (`retry-after` trailing metadata, seconds; the gateway turns it
into HTTP 429 + `Retry-After`).

Replicas: each dispatcher holds its own queue and knows nothing of the others' queues; the others'
dispatches reach its table through the workers' reports (within one report interval), so a
replica may bind a request to a rank another replica filled a moment ago. Pinned requests
(`prefill_dp_rank` / `decode_dp_rank`) and re-dispatches after a worker failure are not held.
"""

from __future__ import annotations

import asyncio
import math
import operator
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from pdlb.common.requests import SHED_REASONS
from pdlb.services.dispatcher.admission_queue import AdmissionQueue, QueueFull, Waiter
from pdlb.services.dispatcher.lending import RecentPeak, headroom
from pdlb.services.dispatcher.load_table import Role, WorkerEntry
from pdlb.services.dispatcher.policies import RouteContext, RoutingError
from pdlb.services.dispatcher.router import Decision, Router
from pdlb.services.dispatcher.tenant_share import DEFAULT_ACTIVE_WINDOW_S, Room, TenantShares, Verdict

RECENT_WAITS = 512  # queue waits kept for the percentiles WatchLoad shows
MAX_GATHER_MS = 1000.0  # the longest gather window --gather-ms takes: it adds to every first token
RECENT_LEFT = 64  # queue waits (bound or shed at the TTL) the retry hint is the median of: recent ones only
# The dispatcher flags that act only with --flow-control (pdlb-dispatcher refuses them without it).
FLOW_FLAGS = (
    "--max-queued-requests",
    "--queue-ttl",
    "--sheddable-queue-ttl",
    "--sheddable-priority",
    "--max-wait-ms",
    "--max-prefill-ahead-chunks",
    "--fair-share-quantum",
    "--tenant-weights",
    "--max-tenants",
    "--tenant-share",
    "--tenant-active-window",
    "--reserved-slots",
    "--reserve-window",
    "--work-conserving",
    "--lend-headroom",
    "--gather-ms",
)


@dataclass(frozen=True)
class FlowOptions:
    """Flow-control settings (dispatcher flags of the same names)."""

    enabled: bool = False  # off by default: its gain on the trace is within the noise (docs/BENCHMARKS.md)
    max_queued_requests: int = 1024
    queue_ttl_s: float = 30.0
    sheddable_ttl_s: float = 5.0
    sheddable_priority: int = 1  # priorities >= this are sheddable (vLLM: larger is later)
    max_wait_ms: float = 0.0  # > 0: a rank whose predicted prefill wait exceeds this has no room
    # > 0: a mixed or prefill rank with more prompt work queued ahead (reported + sent since) than
    # this many of its prefill chunks has no room, so a bound request starts prefill within a step
    # or so instead of waiting in the rank's batch queue behind other prompts.
    max_prefill_ahead_chunks: float = 1.0
    quantum_tokens: int = 2048
    tenant_weights: tuple[tuple[str, float], ...] = ()
    max_tenants: int = 1024
    # While other tenants are active, a tenant holds at most this multiple of its weighted share of
    # the cluster's batch slots and KV tokens (0: no cap; tenant_share.py).
    tenant_share_scale: float = 1.0
    tenant_active_window_s: float = DEFAULT_ACTIVE_WINDOW_S
    # Batch slots per rank that sheddable requests leave free while requests of better priority
    # arrive (one within reserve_window_s): the engine has no priorities, so a slot taken by a
    # sheddable request is lost to them until it ends.
    reserved_slots: int = 0
    reserve_window_s: float = 5.0
    # Lend the room the tenant share and the slot reserve keep while their owners leave it unused,
    # keeping each owner's recent peak plus lend_headroom requests (lending.py). Off by default: on
    # the trace's tenant flood it served 0.98x the unshared throughput, but the steady tenant's TTFT
    # p99 rose 1.3-1.5x, past the 1.2x goal the hard share meets (docs/BENCHMARKS.md).
    work_conserving: bool = False
    lend_headroom: int = 1
    # > 0: requests arriving within this many seconds of a window's first are decided together, the
    # ones with the least prompt work left on the rank caching most of it first (FlowControl._gather).
    gather_s: float = 0.0


class Shed(Exception):
    """A request the queue gave up on: answer RESOURCE_EXHAUSTED with `retry_after_s`."""

    def __init__(self, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s


@dataclass
class _Held:
    ctx: RouteContext
    future: asyncio.Future[Decision]
    tenant: str  # as the client named it: the share keys it itself (the queue's key may be its overflow class)
    sheddable: bool = False  # kept out of the slot reserve
    past_share: bool = False  # held at least once because its tenant was past its share


class FlowControl:
    """Holds requests while no rank has room and binds them as room frees (see the module doc)."""

    def __init__(
        self,
        router: Router,
        options: FlowOptions,
        on_shed: Callable[[str], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router, self.options, self.clock = router, options, clock
        self.queue = AdmissionQueue(
            capacity=options.max_queued_requests,
            quantum_tokens=options.quantum_tokens,
            weights=dict(options.tenant_weights),
            max_tenants=options.max_tenants,
        )
        self.shares = TenantShares(
            weights=dict(options.tenant_weights),
            scale=options.tenant_share_scale,
            active_window_s=options.tenant_active_window_s,
            max_tenants=options.max_tenants,
            clock=clock,
            lend=options.work_conserving,
            lend_headroom=options.lend_headroom,
        )
        self.on_shed = on_shed or (lambda reason: None)
        self.on_wait = on_wait or (lambda seconds: None)
        self.admitted_total = 0  # requests bound after waiting in the queue
        self.shed_total = 0
        self.shed_by_reason: dict[str, int] = dict.fromkeys(SHED_REASONS, 0)  # sums to shed_total
        self.recent_waits: deque[float] = deque(maxlen=RECENT_WAITS)  # seconds, of bound requests
        self._left_waits: deque[float] = deque(maxlen=RECENT_LEFT)  # seconds, of bound and TTL-shed ones
        self._kicking = False
        self._better_seen_at = -math.inf  # when a request of non-sheddable priority last arrived
        self._last_roomy: list[WorkerEntry] = []  # roomy()'s last partial answer, handed out again while it holds
        self._room_of: list[WorkerEntry] | None = None  # _room()'s ranks, capacity version and answer
        self._room_version = -1
        self._room_cached = Room(requests=0, tokens=0, ranks=0)
        self._better_in_flight: set[str] = set()  # ids of requests of non-sheddable priority bound here
        self._better_peak = RecentPeak()  # their recent peak, the reserve's lending headroom
        # requests in the current gather window: (order key, future released when their turn comes)
        self._gathered: list[tuple[tuple[int, int, int], asyncio.Future[None]]] = []
        self._gather_timer: asyncio.TimerHandle | None = None
        self._gather_seq = 0

    # admission -------------------------------------------------------------------------------
    async def decide(
        self,
        ctx: RouteContext,
        priority: int = 0,
        tenant: str = "",
        deadline_at: float = math.inf,
        expires_by: float = math.inf,
    ) -> Decision:
        """The decision for `ctx`: at once when the queue is empty and a rank has room, else when
        the request reaches the head and a rank has room. Raises Shed (held too long, displaced,
        queue full) or RoutingError (no live worker).

        deadline_at: the request's TTFT due time (monotonic s; inf: none): it orders the queue
        within a priority and bounds the wait. expires_by: a further bound on the wait only (the
        call's deadline): it never reorders, because clients' call deadlines say nothing of
        urgency and reach the server rounded (gRPC's timeout header keeps 3 significant digits:
        100 ms at 60 s), which would reorder requests of one client sent close together."""
        if not self.options.enabled:
            return self.router.decide(ctx)
        if self.options.gather_s > 0 and min(deadline_at, expires_by) > self.clock() + self.options.gather_s:
            await self._gather(ctx, priority)  # (a request due within the window is decided at once)
        sheddable = priority >= self.options.sheddable_priority
        if not sheddable:
            self._better_seen_at = self.clock()
        if not self.queue.size:
            roomy = self.roomy(ctx, sheddable)
            verdict = self._verdict(tenant, ctx) if roomy else Verdict.WITHIN
            past_share = verdict is Verdict.HELD
            if roomy is None or (roomy and not past_share):
                decision = self.router.decide(ctx, among=roomy)
                self._acquire(ctx, tenant, max(ctx.num_tokens, 1), sheddable, verdict)
                return decision
        else:
            past_share = False
        now = self.clock()
        ttl = self.options.sheddable_ttl_s if priority >= self.options.sheddable_priority else self.options.queue_ttl_s
        held = _Held(ctx, asyncio.get_running_loop().create_future(), tenant, sheddable, past_share)
        self.shares.held_total += past_share
        waiter = Waiter(
            request_id=ctx.request_id,
            priority=priority,
            tenant=tenant,
            tokens=max(ctx.num_tokens, 1),
            enqueued_at=now,
            deadline_at=deadline_at,
            expires_at=min(now + ttl, deadline_at, expires_by),
            payload=held,
        )
        try:
            displaced = self.queue.push(waiter)
        except QueueFull as exc:
            raise self._shed("full", f"request {ctx.request_id}: dispatcher queue full: {exc}") from None
        if displaced is not None:
            self._fail(
                displaced,
                "displaced",
                "displaced from the full queue by a request of better priority"
                if displaced.priority > priority
                else f"displaced from the full queue: tenant {displaced.tenant!r} holds more than its fair share "
                "of it and another tenant's request arrived",
            )
        self.kick()
        try:
            if not held.future.done():
                await asyncio.wait({held.future}, timeout=max(waiter.expires_at - self.clock(), 0.0))
        except asyncio.CancelledError:
            # The client went away while queued, or just as its request was bound: undo the binding.
            if held.future.done() and not held.future.cancelled() and held.future.exception() is None:
                decision = held.future.result()
                self.router.table.cancel_dispatch(decision.entry.worker.worker_id, decision.seq)
                self.release(ctx.request_id)
            raise
        finally:
            if self.queue.remove(waiter):  # still queued: cancelled or expired
                self.kick()  # it may have been the head blocking requests behind it
        if held.future.done():
            return held.future.result()  # the decision, or the Shed/RoutingError it failed with
        held.future.cancel()
        reason = "deadline" if waiter.expires_at >= min(deadline_at, expires_by) else "ttl"
        waited = self.clock() - waiter.enqueued_at
        if reason == "ttl":  # the queue's own doing (a deadline is the client's): its hint counts it
            self._left_waits.append(waited)
        raise self._shed(
            reason,
            f"request {ctx.request_id}: no rank had room within "
            + (
                f"its TTFT deadline or the call's deadline ({waited:.2f} s queued)"
                if reason == "deadline"
                else f"the queue TTL ({ttl:g} s)"
            ),
        )

    async def _gather(self, ctx: RouteContext, priority: int) -> None:
        """Wait until the gather window that `ctx` arrived in closes (`gather_s` after its first
        request), then return in the window's order: priority, then the fewest prompt tokens left to
        compute on the rank caching most of the prompt (`Policy.cached_tokens`), then arrival.

        Why: requests arriving together (a client's fan-out, a burst) are otherwise decided one by
        one in arrival order, so a cold long prompt decided first can take the one rank that caches
        another request's whole prefix, or fill the ranks' prefill room so that short prompts wait
        behind it. Least work first (shortest-job-first within the window) places the cache hits on
        their ranks and the short prompts on the ranks with the least prefill ahead, and leaves the
        long cold prompts the rest. (Longest first, which list scheduling favours for the makespan,
        queued longer at the p99 in a trial on the trace replay, one seed: 408 against 305 ms at 0.6
        of capacity; the short prompts decided last found the ranks' prefill room taken and waited
        for a long prompt's chunk.) The queue's own order applies to what is held after the window.
        The price is up to `gather_s` added to every request's time to first token. The window is
        bounded by `max_queued_requests` requests (a fuller window closes at once). The released
        requests' continuations run in release order (asyncio runs ready callbacks first in, first
        out) and each decides without awaiting, so decisions follow it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        left = ctx.num_tokens - self.router.policy.cached_tokens(ctx)
        self._gathered.append(((priority, left, self._gather_seq), future))
        self._gather_seq += 1
        if len(self._gathered) >= self.options.max_queued_requests:
            self._release_gathered()
        elif self._gather_timer is None:
            self._gather_timer = loop.call_later(self.options.gather_s, self._release_gathered)
        await future  # a cancelled caller cancels it; the release skips it

    def _release_gathered(self) -> None:
        if self._gather_timer is not None:
            self._gather_timer.cancel()
            self._gather_timer = None
        window, self._gathered = sorted(self._gathered, key=lambda pair: pair[0]), []
        for _, future in window:
            if not future.done():
                future.set_result(None)

    def kick(self) -> None:
        """Bind queued requests, in queue order, while the head fits somewhere; then, when every
        request left is past its tenant's share, those the others' unused room can be lent to."""
        if self._kicking or not self.queue.size:
            return
        self._kicking = True
        try:
            while (lendable := self._bind_within()) is not None:
                held: _Held = lendable.payload
                roomy = self.roomy(held.ctx, held.sheddable)
                verdict = self._verdict(held.tenant, held.ctx) if roomy else Verdict.HELD
                if verdict is not Verdict.LENT:  # what the pass bound took the room it was lent
                    self._note_held(held)
                    return
                self._bind(lendable, roomy, verdict)
        finally:
            self._kicking = False

    def _bind_within(self) -> Waiter | None:
        """One pass of kick(): binds, in queue order, the requests within their tenant's share while
        the head fits somewhere. Returns the first request past its share that lending would bind,
        when the pass ended with every request left past its share; else None."""
        past_share: set[str] = set()  # tenants whose requests stay queued this pass
        lendable: Waiter | None = None
        while (waiter := self.queue.peek(skip=past_share)) is not None:
            held: _Held = waiter.payload
            if held.future.done():  # its waiting task was cancelled: drop it
                self.queue.remove(waiter)
                continue
            roomy = self.roomy(held.ctx, held.sheddable)
            if roomy is not None and not roomy:
                return None  # the head fits nowhere: nothing is lent past it either
            verdict = self._verdict(held.tenant, held.ctx) if roomy is not None else Verdict.WITHIN
            if verdict is not Verdict.WITHIN:
                past_share.add(waiter.tenant)  # other tenants' requests go first
                if verdict is Verdict.LENT:
                    lendable = lendable or waiter
                else:
                    self._note_held(held)
                continue
            self._bind(waiter, roomy, verdict)
        return lendable

    def _note_held(self, held: _Held) -> None:
        self.shares.held_total += not held.past_share
        held.past_share = True

    def _bind(self, waiter: Waiter, roomy: list[WorkerEntry] | None, verdict: Verdict) -> None:
        """Bind a queued request to the rank its role's method picks among `roomy`."""
        held: _Held = waiter.payload
        self.queue.pop(waiter)
        try:
            decision = self.router.decide(held.ctx, among=roomy)
        except RoutingError as exc:
            held.future.set_exception(exc)
            return
        self._acquire(held.ctx, held.tenant, waiter.tokens, held.sheddable, verdict)
        self.admitted_total += 1
        waited = self.clock() - waiter.enqueued_at
        self.recent_waits.append(waited)
        self._left_waits.append(waited)
        self.on_wait(waited)
        held.future.set_result(decision)

    def _acquire(self, ctx: RouteContext, tenant: str, tokens: int, sheddable: bool, verdict: Verdict) -> None:
        """Count a request just bound: its tenant's share, and the better classes' in flight."""
        self.shares.acquire(ctx.request_id, tenant, tokens)
        self.shares.lent_total += verdict is Verdict.LENT
        if not sheddable:
            self._better_in_flight.add(ctx.request_id)
            self._better_peak.observe(len(self._better_in_flight), self.clock())

    def release(self, request_id: str) -> None:
        """A request bound here ended (finished, failed, cancelled): its tenant's share frees.
        Callers kick() afterwards."""
        self.shares.release(request_id)
        self._better_in_flight.discard(request_id)

    def prefilled(self, request_id: str) -> None:
        """A request's first token came back: on mixed and prefill ranks its prompt stops counting
        against its tenant's share of the prefill room (its slot counts until it ends)."""
        if self.router.role is not Role.DECODE and self.shares.release_tokens(request_id):
            self.kick()

    def _verdict(self, tenant: str, ctx: RouteContext) -> Verdict:
        """Whether `tenant` is within its share for `ctx`, past it on lent room, or held."""
        if not self.shares.enabled:
            return Verdict.WITHIN
        return self.shares.verdict(tenant, max(ctx.num_tokens, 1), self._room(), self.queue.tenant_names())

    def _room(self) -> Room:
        """The room all live ranks offer together, summed again only when the ranks or their
        capacities changed (a sum over every rank per decision was most of flow control's cost at
        a thousand ranks)."""
        table = self.router.table
        candidates = table.candidates()
        if self._room_of is candidates and self._room_version == table.capacity_version:
            return self._room_cached
        if self.router.role is Role.DECODE:  # admission by KV: a request holds its KV until it ends
            tokens = sum(e.reported.kv_tokens_capacity for e in candidates)
        else:  # the prefill work the room test lets queue on each rank (at least one chunk)
            chunks = max(self.options.max_prefill_ahead_chunks, 1.0)
            tokens = int(sum(chunks * e.reported.prefill_tokens_per_step for e in candidates))
        room = Room(
            requests=sum(e.reported.max_running_requests for e in candidates), tokens=tokens, ranks=len(candidates)
        )
        self._room_of, self._room_version, self._room_cached = candidates, table.capacity_version, room
        return room

    # room ------------------------------------------------------------------------------------
    def roomy(self, ctx: RouteContext, sheddable: bool = False) -> list[WorkerEntry] | None:
        """The ranks that take `ctx` without it queueing there (see the module doc), leaving the slot
        reserve free when it is `sheddable` and the reserve holds; None when no
        rank is live at all (the decision then fails UNAVAILABLE at once, nothing to wait for);
        every rank when the prompt exceeds every rank's KV capacity (waiting would not help: the
        chosen worker refuses it with RESOURCE_EXHAUSTED naming its budget)."""
        candidates = self.router.table.candidates()
        if not candidates:
            return None
        tokens = ctx.num_tokens
        reserve = self.reserve_slots() if sheddable else 0
        if reserve and self.options.work_conserving and self._reserve_lendable(candidates, reserve):
            reserve = 0
        # A rank caching part of the prompt may have that many more tokens of prompt work ahead: the
        # request computes that much less there, so it still starts about as soon as a cold one would.
        counted = self.router.role is not Role.DECODE and not self.options.max_wait_ms > 0
        counted = counted and self.options.max_prefill_ahead_chunks > 0
        cached = self.router.policy.cached_by_rank(ctx, remember=True) if counted else {}
        if reserve or self.router.role is Role.DECODE or self.options.max_wait_ms > 0:
            roomy = [e for e in candidates if self._fits(e, tokens, reserve, cached.get(e.worker.worker_id, 0))]
        else:  # the common case, `_fits` inlined: one pass over the rows' plain numbers
            chunks, roomy = self.options.max_prefill_ahead_chunks, []
            for e in candidates:
                r = e.reported
                if r.kv_tokens_capacity and e.kv_free < tokens:
                    continue
                chunk = r.prefill_tokens_per_step
                if (
                    chunks > 0
                    and chunk > 0
                    and e.queued_tokens >= chunks * chunk + (cached.get(e.worker.worker_id, 0) if cached else 0)
                ):
                    continue
                if not e.slot_excess if r.max_running_requests else not e.total_requests:
                    roomy.append(e)
        if not roomy and all(0 < e.reported.kv_tokens_capacity < tokens for e in candidates):
            return candidates  # it fits no rank's KV even when idle: the worker says so at once
        # The table's own list when every rank fits, and the last answer when the same ranks fit
        # again: policies index a list once and keep that index while it is the one they get.
        if len(roomy) == len(candidates):
            return candidates
        last = self._last_roomy
        if len(last) == len(roomy) and all(map(operator.is_, roomy, last)):
            return last
        self._last_roomy = roomy
        return roomy

    def reserve_slots(self) -> int:
        """Batch slots per rank sheddable requests leave free now: `reserved_slots` while a request of
        non-sheddable priority arrived within `reserve_window_s`, else 0."""
        if not self.options.reserved_slots or self.clock() - self._better_seen_at > self.options.reserve_window_s:
            return 0
        return self.options.reserved_slots

    def _reserve_lendable(self, candidates: list[WorkerEntry], reserve: int) -> bool:
        """Whether a sheddable request may take a reserved slot: the free batch slots of all ranks
        after it still cover the better classes' headroom (their recent peak in flight here plus
        `lend_headroom`, less what they hold, at most the whole reserve)."""
        in_use = len(self._better_in_flight)
        peak = self._better_peak.peak(in_use, self.clock())
        keep = headroom(in_use + reserve * len(candidates), in_use, peak, self.options.lend_headroom)
        return sum(self._free_slots(e) for e in candidates) - 1 >= keep

    @staticmethod
    def _free_slots(entry: WorkerEntry) -> int:
        """A rank's free batch slots: its batch, less those running, waiting or in flight (0 when it
        never reported its batch size)."""
        r = entry.reported
        if not r.max_running_requests:
            return 0
        running = max(0, r.running_requests - entry.finished_unreported)
        return max(0, r.max_running_requests - running - r.waiting_requests - entry.inflight_requests)

    def _fits(self, entry: WorkerEntry, tokens: int, reserve: int = 0, cached: int = 0) -> bool:
        r = entry.reported
        if r.kv_tokens_capacity and entry.kv_free < tokens:
            return False
        if self.router.role is not Role.DECODE:
            if self.options.max_wait_ms > 0:
                return self._predicted_wait_ms(entry) <= self.options.max_wait_ms
            chunks, chunk = self.options.max_prefill_ahead_chunks, r.prefill_tokens_per_step
            if chunks > 0 and chunk > 0 and entry.queued_tokens >= chunks * chunk + cached:
                return False
        if r.max_running_requests:
            if reserve:  # free slots after this one
                return self._free_slots(entry) - 1 >= reserve
            return not entry.slot_excess  # waiting + in flight + this one fit the free batch slots
        return not entry.total_requests  # never reported its batch size: one request at a time

    @staticmethod
    def _predicted_wait_ms(entry: WorkerEntry) -> float:
        """How long a request sent now would wait on the rank before its own prefill, in ms: for a
        batch slot (the k-th frees after k x mean output x step time / running requests) and for
        the prompt work queued ahead (its fitted step line); 0 for what is not measured yet."""
        r = entry.reported
        step_s = r.step_ms / 1000
        wait_s = 0.0
        if entry.slot_excess and r.max_running_requests:
            wait_s += entry.slot_excess * (r.mean_output_tokens or 1.0) * step_s / max(r.running_requests, 1)
        if r.prefill_tokens_per_s > 0:
            per_token_s = 1 / r.prefill_tokens_per_s + (r.step_base_ms / 1000) / max(r.prefill_tokens_per_step, 1)
            wait_s += entry.queued_tokens * per_token_s
        return wait_s * 1000

    # shedding --------------------------------------------------------------------------------
    def retry_after_s(self) -> int:
        """Whole seconds a refused client should wait before it sends again: the median queue wait
        of the last RECENT_LEFT requests that left the queue, bound or shed at their TTL, rounded
        up; at least 1, at most the queue TTL (rounded up).

        Why the waits: a client that comes back joins the same queue, and while the load holds,
        its wait is about what the requests before it waited; after less than that it meets the
        same overload. TTL sheds count (they waited their whole TTL: leaving them out, as the hint
        did, said 1 s while every request was shed after 1.5 s); requests refused at once or shed
        at their own deadline tell nothing of the queue. Why the cap: a request queued now is
        bound or shed within the TTL, so later than that the queue holds other requests entirely
        and a longer hint only idles the client."""
        waits = sorted(self._left_waits)
        median = waits[len(waits) // 2] if waits else 0.0
        return min(max(1, math.ceil(median)), max(1, math.ceil(self.options.queue_ttl_s)))

    def _count_shed(self, reason: str) -> None:
        self.shed_total += 1
        self.shed_by_reason[reason] += 1
        self.on_shed(reason)

    def _shed(self, reason: str, message: str) -> Shed:
        self._count_shed(reason)
        retry = self.retry_after_s()
        return Shed(reason, f"{message}; retry after {retry} s or add capacity", retry)

    def _fail(self, waiter: Waiter, reason: str, why: str) -> None:
        held: _Held = waiter.payload
        if not held.future.done():
            held.future.set_exception(self._shed(reason, f"request {waiter.request_id}: {why}"))

    def fail_all(self, why: str) -> None:
        """Shutting down: every queued request fails now, UNAVAILABLE with `why` (not shed with a
        retry hint: this dispatcher will not take it again), instead of waiting out its TTL. So do
        the requests of a gather window not closed yet."""
        if self._gather_timer is not None:
            self._gather_timer.cancel()
            self._gather_timer = None
        window, self._gathered = self._gathered, []
        for _, future in window:
            if not future.done():
                self._count_shed("shutdown")
                future.set_exception(RoutingError(grpc.StatusCode.UNAVAILABLE, f"{why}; nothing ran: send it again"))
        for waiter in list(self.queue):
            self.queue.remove(waiter)
            held: _Held = waiter.payload
            if not held.future.done():
                self._count_shed("shutdown")
                message = f"request {waiter.request_id}: {why}; it was queued, nothing ran: send it again elsewhere"
                held.future.set_exception(RoutingError(grpc.StatusCode.UNAVAILABLE, message))

    def wait_percentiles_ms(self, qs: Sequence[float] = (50, 99)) -> list[float]:
        waits = sorted(self.recent_waits)
        if not waits:
            return [0.0 for _ in qs]
        return [waits[min(len(waits) - 1, int(q / 100 * len(waits)))] * 1000 for q in qs]
