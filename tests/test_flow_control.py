"""Flow control on a real dispatcher with real sim workers: requests wait in the dispatcher while
no rank has a free batch slot, and are bound in priority / fair-share order as slots free; TTL,
deadline and displacement shed with RESOURCE_EXHAUSTED + retry-after; cancelled requests leave the
queue; a worker dying while requests are queued loses none of them."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request

import grpc
import openai
import pytest
from rich.console import Console

from pdlb.cli.top import render
from pdlb.common.free_port import free_port
from pdlb.common.requests import BOUND_KEY, RETRY_AFTER_KEY, SHED_REASONS
from pdlb.v1 import dispatch_pb2
from tests.helpers import dispatch_stub, load_snapshot, request, wait_for_workers, wait_until

# One request at a time per rank; a decode step of the sim takes 4 ms x 10, so a request of N
# output tokens holds its rank for about N x 40 ms.
# Blockers hold a rank for as long as a test needs (their outputs would take about 80 s) and are
# cancelled to free it: no test depends on how fast the loaded machine runs them.
BLOCK = 2000
SIM = ["--runner", "sim", "--sim-slowdown", "10", "--max-running-requests", "1", "--report-interval-ms", "50"]


async def start_cluster(
    etcd, prefix, start_service, ranks: int, *dispatcher_flags: str, lease_ttl: int = 5, slots: int = 1
):
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", str(lease_ttl)]
    dispatcher = start_service(
        "dispatcher", *common, "--load-balance-method", "least_wait", "--flow-control", *dispatcher_flags
    )
    sim = [*SIM, "--max-running-requests", str(slots)]  # the later flag wins
    workers = [
        start_service("scheduler", *common, *sim, "--dp-rank", str(r), name=f"sim-{r}", wait=False)
        for r in range(ranks)
    ]
    for proc in workers:
        proc.wait_ready()
    channel, stub = dispatch_stub(dispatcher.address)
    await wait_for_workers(stub, ranks)

    async def reporting() -> bool:
        snap = await load_snapshot(stub)
        return all(w.report_age_ms >= 0 and w.reported.max_running_requests == slots for w in snap.workers)

    await wait_until(reporting, what="every worker's first report")
    return channel, stub, dispatcher, workers


class Client:
    """Runs Generate calls, recording when each got its first token and how each ended."""

    def __init__(self, stub) -> None:
        self.stub = stub
        self.first_token_at: dict[str, float] = {}
        self.outcome: dict[str, grpc.StatusCode] = {}
        self.errors: dict[str, grpc.aio.AioRpcError] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    def send(self, rid: str, tokens: int = 10, timeout: float = 60, prompt: int = 32, **fields) -> asyncio.Task:
        self.tasks[rid] = asyncio.create_task(self._run(rid, tokens, timeout, prompt, fields))
        return self.tasks[rid]

    async def _run(self, rid: str, tokens: int, timeout: float, prompt: int, fields: dict) -> None:
        ids = [(hash(rid) + i) % 200 + 1 for i in range(prompt)]
        req = request(rid, input_ids=ids, max_new_tokens=tokens, **fields)
        try:
            async for chunk in self.stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=timeout):
                if chunk.token_ids and rid not in self.first_token_at:
                    self.first_token_at[rid] = time.monotonic()
            self.outcome[rid] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            self.outcome[rid] = err.code()
            self.errors[rid] = err

    async def started(self, rid: str) -> None:
        await wait_until(lambda: rid in self.first_token_at or rid in self.outcome, what=f"{rid}'s first token")


async def queued(stub) -> int:
    return (await load_snapshot(stub)).flow.queued_requests


async def wait_queued(stub, n: int) -> None:
    async def check() -> bool:
        return await queued(stub) == n

    await wait_until(check, what=f"{n} requests queued at the dispatcher")


async def test_late_binding_serves_priority_then_deadline_as_slots_free(etcd, prefix, start_service):
    channel, stub, _, _ = await start_cluster(etcd, prefix, start_service, 2)
    client = Client(stub)
    try:
        client.send("busy-a", tokens=BLOCK)
        client.send("busy-b", tokens=BLOCK)
        await client.started("busy-a")
        await client.started("busy-b")
        # Both ranks run one request: new ones wait in the dispatcher, not at a worker.
        client.send("low", priority=5)
        await wait_queued(stub, 1)
        client.send("normal-late-deadline", ttft_deadline_ms=50_000)
        await wait_queued(stub, 2)
        client.send("normal-early-deadline", ttft_deadline_ms=20_000)
        await wait_queued(stub, 3)
        client.send("urgent", priority=-1)
        await wait_queued(stub, 4)
        # A held request's stream has no initial metadata until it is bound (a PD client starts its
        # prefill half only then); bound, it names the rank.
        early = stub.Generate(dispatch_pb2.GenerateRequest(request=request("peek", input_ids=[5] * 8)), timeout=60)
        bound = asyncio.ensure_future(early.initial_metadata())
        await wait_queued(stub, 5)
        assert not bound.done()
        early.cancel()
        await wait_queued(stub, 4)
        snap = await load_snapshot(stub)
        assert snap.flow.enabled and snap.flow.queued_tokens == 4 * 32
        assert all(w.reported.waiting_requests == 0 for w in snap.workers), "nothing waits at a worker"
        client.tasks["busy-a"].cancel()  # one slot frees: the head (urgent) is bound to it
        await client.started("urgent")
        client.tasks["busy-b"].cancel()
        held = ["low", "normal-late-deadline", "normal-early-deadline", "urgent"]
        await asyncio.wait_for(asyncio.gather(*(client.tasks[r] for r in held)), 60)
        assert {client.outcome[r] for r in held} == {grpc.StatusCode.OK}, client.errors
        order = sorted(
            ["low", "normal-late-deadline", "normal-early-deadline", "urgent"], key=client.first_token_at.get
        )
        assert order == ["urgent", "normal-early-deadline", "normal-late-deadline", "low"]
        snap = await load_snapshot(stub)
        assert snap.flow.queued_requests == 0 and snap.flow.admitted_total == 4 and snap.flow.shed_total == 0
        assert snap.flow.wait_p99_ms > 0
    finally:
        await channel.close()


async def test_a_gather_window_decides_the_least_prompt_work_first(etcd, prefix, start_service):
    # One rank with one batch slot runs requests one at a time, in the order they were decided. Sent
    # longest prompt first within one gather window (1 s: far longer than sending takes), they start
    # shortest first; without the window the longest would be bound first and the rest queue after it.
    # (What a rank caches counts as work done: test_gather_window.py.)
    channel, stub, _, _ = await start_cluster(etcd, prefix, start_service, 1, "--gather-ms", "1000")
    client = Client(stub)
    try:
        prompts = {"long": 1500, "middle": 600, "short": 40}
        for rid, n in prompts.items():
            client.send(rid, tokens=2, prompt=n)
        await asyncio.wait_for(asyncio.gather(*client.tasks.values()), 60)
        assert set(client.outcome.values()) == {grpc.StatusCode.OK}, client.errors
        assert sorted(prompts, key=client.first_token_at.get) == ["short", "middle", "long"]
        # bound, a stream's initial metadata names its rank before any token
        call = stub.Generate(dispatch_pb2.GenerateRequest(request=request("named", input_ids=[5] * 8)), timeout=60)
        assert dict(await call.initial_metadata())[BOUND_KEY] == "0"
        assert [chunk async for chunk in call][-1].finish_reason
        snap = await load_snapshot(stub)
        assert snap.flow.queued_requests == 0 and all(w.inflight_requests == 0 for w in snap.workers)
    finally:
        await channel.close()


async def test_call_deadlines_do_not_reorder_the_queue(etcd, prefix, start_service):
    """Requests without a TTFT deadline are bound in arrival order whatever their call deadlines
    (each later one here has a shorter call timeout; they were bound latest-first, and requests sent
    within ~100 ms of each other in any order, as gRPC rounds the timeout it sends)."""
    channel, stub, _, _ = await start_cluster(etcd, prefix, start_service, 1)
    client = Client(stub)
    try:
        client.send("busy", tokens=BLOCK)
        await client.started("busy")
        held = ["first", "second", "third"]
        for i, rid in enumerate(held):
            client.send(rid, tokens=3, timeout=60 - 15 * i)
            await wait_queued(stub, i + 1)
        client.tasks["busy"].cancel()
        await asyncio.wait_for(asyncio.gather(*(client.tasks[r] for r in held)), 30)
        assert {client.outcome[r] for r in held} == {grpc.StatusCode.OK}, client.errors
        assert sorted(held, key=client.first_token_at.get) == held
    finally:
        await channel.close()


async def test_fair_share_a_flooding_tenant_does_not_starve_another(etcd, prefix, start_service):
    channel, stub, _, _ = await start_cluster(etcd, prefix, start_service, 1, "--fair-share-quantum", "32")
    client = Client(stub)
    try:
        client.send("busy", tokens=BLOCK)
        await client.started("busy")
        for i in range(8):
            client.send(f"flood-{i}", tokens=3, tenant="flood")
        await wait_queued(stub, 8)
        client.send("quiet-0", tokens=3, tenant="quiet")
        await wait_queued(stub, 9)  # queued before quiet-1: within a tenant, arrival order holds
        client.send("quiet-1", tokens=3, routing_key="quiet")  # the tenant defaults to the routing key
        await wait_queued(stub, 10)
        client.tasks.pop("busy").cancel()
        await asyncio.wait_for(asyncio.gather(*client.tasks.values()), 60)
        assert set(client.outcome.values()) == {grpc.StatusCode.OK}, client.errors
        order = sorted((rid for rid in client.first_token_at if rid != "busy"), key=client.first_token_at.get)
        # Round robin over tenants: the quiet tenant's requests alternate with the flood's.
        assert order.index("quiet-0") <= 2 and order.index("quiet-1") <= 4, order
    finally:
        await channel.close()


async def test_tenant_past_its_share_is_held_while_another_tenant_is_bound_at_once(etcd, prefix, start_service):
    """Four ranks of one slot; tenant steady holds one. Flood's first two requests take its share
    (half of the 4 slots while steady is active); its third waits in the dispatcher although a rank
    is idle, and steady's next request is bound at once past it. Once steady is gone (window 0),
    the flood's request is bound."""
    metrics_port = free_port()
    channel, stub, _, _ = await start_cluster(
        etcd, prefix, start_service, 4, "--tenant-active-window", "0", "--metrics-port", str(metrics_port)
    )
    client = Client(stub)
    try:
        client.send("steady-0", tokens=BLOCK, tenant="steady")
        await client.started("steady-0")
        for rid in ("flood-0", "flood-1"):
            client.send(rid, tokens=BLOCK, tenant="flood")
            await client.started(rid)
        client.send("flood-2", tokens=BLOCK, tenant="flood")
        await wait_queued(stub, 1)
        snap = await load_snapshot(stub)
        assert sum(w.reported.running_requests + w.inflight_requests == 0 for w in snap.workers) == 1, (
            "a rank is idle, yet the flood's request waits: its tenant holds its share"
        )
        client.send("steady-1", tokens=BLOCK, tenant="steady")
        await client.started("steady-1")
        assert "flood-2" not in client.first_token_at and await queued(stub) == 1
        scrape = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
        assert "pdlb_queue_share_held_total 1.0" in scrape
        # Steady leaves: the flood may take the whole cluster, and its held request is bound.
        for rid in ("steady-0", "steady-1"):
            client.tasks.pop(rid).cancel()
        await client.started("flood-2")
        assert client.outcome.get("flood-2") is None, client.errors
        await wait_queued(stub, 0)
        for task in client.tasks.values():
            task.cancel()
        await asyncio.gather(*client.tasks.values(), return_exceptions=True)
    finally:
        await channel.close()


async def test_work_conserving_share_lends_idle_slots_and_keeps_headroom(etcd, prefix, start_service):
    """Two ranks of 4 slots, the work-conserving share. A lone flood takes all 8 slots.
    Steady's first request waits for the first slot to free and takes it before the flood's queued
    one; the next freed slot stays idle as steady's headroom (its peak, 1, plus 1) while the flood
    waits, and steady's second request binds into it at once. Room past steady's peak plus 1 is lent
    again as flood requests end (the hard share would hold the flood to 4). Cancelling requests
    held and lent loses nothing: the ranks and the queue end empty and both tenants are served."""
    metrics_port = free_port()
    channel, stub, _, _ = await start_cluster(
        etcd, prefix, start_service, 2, "--work-conserving", "--metrics-port", str(metrics_port), slots=4
    )
    client = Client(stub)

    async def busy_slots(n: int) -> None:
        async def check() -> bool:
            snap = await load_snapshot(stub)
            return sum(w.reported.running_requests + w.inflight_requests for w in snap.workers) == n

        await wait_until(check, what=f"{n} batch slots busy")

    try:
        for i in range(8):
            client.send(f"flood-{i}", tokens=BLOCK, timeout=300, tenant="flood")
        for i in range(8):
            await client.started(f"flood-{i}")
        client.send("flood-8", tokens=BLOCK, timeout=300, tenant="flood")
        await wait_queued(stub, 1)
        client.send("steady-0", tokens=BLOCK, timeout=300, tenant="steady")
        await wait_queued(stub, 2)
        client.tasks.pop("flood-0").cancel()
        await client.started("steady-0")
        assert await queued(stub) == 1, "the freed slot went to steady, within its share"
        client.tasks.pop("flood-1").cancel()
        await busy_slots(7)
        assert await queued(stub) == 1, "a slot is free, yet the flood waits: it is steady's headroom"
        client.send("steady-1", tokens=BLOCK, timeout=300, tenant="steady")
        await client.started("steady-1")
        assert "flood-8" not in client.first_token_at
        for rid in ("flood-2", "flood-3"):  # flood 4 (its share), steady 2: 2 free, 1 kept, 1 lent
            client.tasks.pop(rid).cancel()
        await client.started("flood-8")
        await wait_queued(stub, 0)
        client.send("flood-9", tokens=BLOCK, timeout=300, tenant="flood")
        await wait_queued(stub, 1)
        client.tasks.pop("flood-9").cancel()  # cancelled while held
        await wait_queued(stub, 0)
        client.tasks.pop("flood-8").cancel()  # cancelled while lent
        await busy_slots(6)
        scrape = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
        counters = dict(line.split() for line in scrape.splitlines() if line.startswith("pdlb_queue_share_"))
        assert float(counters["pdlb_queue_share_lent_total"]) == 1.0, "flood-8 was bound on lent room"
        assert float(counters["pdlb_queue_share_held_total"]) == 2.0, "flood-8 and flood-9 were held"
        for task in list(client.tasks.values()):
            task.cancel()
        await asyncio.gather(*client.tasks.values(), return_exceptions=True)
        await busy_slots(0)
        client.tasks.clear()
        for rid, tenant in (("after-flood", "flood"), ("after-steady", "steady")):
            client.send(rid, tokens=3, timeout=60, tenant=tenant)
        await asyncio.wait_for(asyncio.gather(*client.tasks.values()), 60)
        assert client.outcome["after-flood"] == client.outcome["after-steady"] == grpc.StatusCode.OK, client.errors
        snap = await load_snapshot(stub)
        assert snap.flow.queued_requests == 0 and snap.flow.shed_total == 0
    finally:
        await channel.close()


async def test_full_queue_a_flood_does_not_lock_out_another_tenant(etcd, prefix, start_service):
    """The user trial's case: a tenant floods a bounded queue (8) past its bound. Another tenant's
    requests of equal priority are not refused: each displaces the flood's newest queued request
    (RESOURCE_EXHAUSTED, displaced) until the quiet tenant holds its share (4 of 8); all of them
    are then served as the ranks free."""
    channel, stub, _, _ = await start_cluster(
        etcd, prefix, start_service, 2, "--tenant-share", "1", "--max-queued-requests", "8", "--queue-ttl", "30"
    )
    client = Client(stub)
    try:
        for rid in ("busy-0", "busy-1"):
            client.send(rid, tokens=BLOCK, tenant="flood")
            await client.started(rid)
        for i in range(8):  # one at a time, so the queue's arrival order is known
            client.send(f"flood-{i}", tokens=3, tenant="flood")
            await wait_queued(stub, i + 1)
        refused = [client.send(f"flood-{i}", tokens=3, tenant="flood") for i in range(8, 30)]
        await asyncio.wait_for(asyncio.gather(*refused), 30)
        assert {client.outcome[f"flood-{i}"] for i in range(8, 30)} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("queue full" in client.errors[f"flood-{i}"].details() for i in range(8, 30))
        for i in range(4):
            client.send(f"quiet-{i}", tokens=3, tenant="quiet")
            victim = f"flood-{7 - i}"  # the flood's newest queued request goes
            await wait_until(lambda v=victim: v in client.outcome, what=f"{victim} displaced")
            assert client.outcome[victim] == grpc.StatusCode.RESOURCE_EXHAUSTED
            err = client.errors[victim]
            assert "displaced" in err.details() and "fair share" in err.details()
            assert int(dict(err.trailing_metadata())[RETRY_AFTER_KEY]) >= 1
            assert "quiet-" + str(i) not in client.outcome
        assert await queued(stub) == 8
        await client.send("quiet-4", tokens=3, tenant="quiet")  # quiet holds its share: refused
        assert client.outcome["quiet-4"] == grpc.StatusCode.RESOURCE_EXHAUSTED
        for rid in ("busy-0", "busy-1"):
            client.tasks.pop(rid).cancel()
        served = [f"quiet-{i}" for i in range(4)] + [f"flood-{i}" for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(client.tasks[r] for r in served)), 60)
        assert {client.outcome[r] for r in served} == {grpc.StatusCode.OK}, client.errors
        snap = await load_snapshot(stub)
        assert snap.flow.queued_requests == 0 and snap.flow.shed_total == 22 + 4 + 1
    finally:
        await channel.close()


async def test_ttl_deadline_and_displacement_shed_with_retry_after(etcd, prefix, start_service):
    channel, stub, _, _ = await start_cluster(
        etcd,
        prefix,
        start_service,
        1,
        "--queue-ttl",
        "30",
        "--sheddable-queue-ttl",
        "0.5",
        "--max-queued-requests",
        "2",
    )
    client = Client(stub)
    try:
        client.send("busy", tokens=BLOCK)
        await client.started("busy")
        t0 = time.monotonic()
        await client.send("sheddable", priority=1)  # waits at most its 0.5 s TTL
        assert client.outcome["sheddable"] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0.4 < time.monotonic() - t0 < 2.0
        err = client.errors["sheddable"]
        assert "queue TTL" in err.details() and "retry after" in err.details()
        assert int(dict(err.trailing_metadata())[RETRY_AFTER_KEY]) >= 1
        await client.send("due-soon", ttft_deadline_ms=300)
        assert client.outcome["due-soon"] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "TTFT deadline" in client.errors["due-soon"].details()
        # A full queue: a better priority displaces the worst; an equal one is refused at once.
        client.send("low", priority=3, ttft_deadline_ms=20_000)
        client.send("normal-1")
        await wait_queued(stub, 2)
        client.send("normal-2")
        await wait_until(lambda: "low" in client.outcome, what="the displaced request's status")
        assert client.outcome["low"] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "displaced" in client.errors["low"].details()
        await client.send("normal-3")
        assert client.outcome["normal-3"] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in client.errors["normal-3"].details()
        client.tasks.pop("busy").cancel()
        await asyncio.wait_for(asyncio.gather(*client.tasks.values()), 60)
        assert [client.outcome[r] for r in ("normal-1", "normal-2")] == [grpc.StatusCode.OK] * 2
        snap = await load_snapshot(stub)
        assert snap.flow.shed_total == 4 and snap.flow.queued_requests == 0
    finally:
        await channel.close()


async def test_the_retry_hint_of_a_ttl_shed_covers_the_wait_a_client_would_meet(etcd, prefix, start_service):
    """An overloaded dispatcher (its only rank busy, every request shed at the queue TTL) hinted
    `retry-after: 1` although each request had waited the whole 1.5 s TTL: a client obeying it came
    back into the same overload. The hint is the recent median queue wait (TTL sheds count: they
    waited that long too), rounded up, at most the TTL; over HTTP it is the 429's Retry-After."""
    ttl = 1.5
    channel, stub, _, _ = await start_cluster(etcd, prefix, start_service, 1, "--queue-ttl", str(ttl))
    api = _gateway_api(etcd, prefix, start_service)
    client = Client(stub)
    try:
        await wait_until(lambda: _models_ready(api), timeout=30, what="the gateway serving its model")
        client.send("busy", tokens=BLOCK)
        await client.started("busy")
        shed = [f"over-{i}" for i in range(3)]
        t0 = time.monotonic()
        await asyncio.gather(*(client.send(rid) for rid in shed))
        waited = time.monotonic() - t0
        assert waited >= ttl and {client.outcome[r] for r in shed} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        for rid in shed:
            err = client.errors[rid]
            hint = int(dict(err.trailing_metadata())[RETRY_AFTER_KEY])
            assert "queue TTL" in err.details() and f"retry after {hint} s" in err.details(), err.details()
            assert hint == math.ceil(ttl), (rid, hint)  # the 1.5 s each waited, in whole seconds; not past the TTL
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as over_http:
            await api.completions.create(model="tiny-random", prompt="hello", max_tokens=2)
        assert time.monotonic() - started >= ttl and "queue TTL" in over_http.value.body["message"]
        assert int(over_http.value.response.headers["Retry-After"]) == math.ceil(ttl)
    finally:
        await api.close()
        await channel.close()


async def test_slot_reserve_holds_sheddable_requests_and_binds_better_ones_into_it(etcd, prefix, start_service):
    """One rank of 2 batch slots, one kept free of sheddable requests while requests of better
    priority arrive: with one slot taken by a high-priority request, a sheddable one waits in the
    dispatcher though a slot is free, and a high-priority one sent after it is bound into that slot
    at once. The sheddable one is bound once both slots are free."""
    flags = ("--reserved-slots", "1", "--reserve-window", "600", "--sheddable-queue-ttl", "600")
    channel, stub, _, _ = await start_cluster(etcd, prefix, start_service, 1, *flags, slots=2)
    client = Client(stub)
    try:
        client.send("high-a", tokens=BLOCK, timeout=300, priority=0)
        await client.started("high-a")
        client.send("low", timeout=300, priority=1)
        await wait_queued(stub, 1)
        client.send("high-b", tokens=BLOCK, timeout=300, priority=0)
        await client.started("high-b")
        assert "low" not in client.first_token_at and await queued(stub) == 1, "the sheddable one still waits"
        client.tasks["high-a"].cancel()

        async def one_running() -> bool:
            snap = await load_snapshot(stub)
            return snap.workers[0].reported.running_requests == 1 and snap.workers[0].inflight_requests == 0

        await wait_until(one_running, what="high-a's slot freed")
        assert await queued(stub) == 1, "one free slot is the reserve: the sheddable one still waits"
        client.tasks["high-b"].cancel()
        await asyncio.wait_for(client.tasks["low"], 120)
        assert client.outcome["low"] == grpc.StatusCode.OK, client.errors
        snap = await load_snapshot(stub)
        # both passed through the queue: high-b arrived with low queued and was bound past it at once
        assert snap.flow.queued_requests == 0 and snap.flow.shed_total == 0 and snap.flow.admitted_total == 2
    finally:
        await channel.close()


async def test_cancelled_while_queued_leaves_the_queue(etcd, prefix, start_service):
    channel, stub, _, _ = await start_cluster(etcd, prefix, start_service, 1)
    client = Client(stub)
    try:
        client.send("busy", tokens=BLOCK)
        await client.started("busy")
        doomed = client.send("doomed")
        client.send("after")
        await wait_queued(stub, 2)
        doomed.cancel()
        await wait_queued(stub, 1)
        client.tasks["busy"].cancel()
        await asyncio.wait_for(client.tasks["after"], 60)
        assert client.outcome["after"] == grpc.StatusCode.OK and "doomed" not in client.first_token_at
        snap = await load_snapshot(stub)
        assert snap.flow.queued_requests == 0 and snap.flow.admitted_total == 1
        assert all(w.inflight_requests == 0 for w in snap.workers)
    finally:
        await channel.close()


@pytest.mark.parametrize("survivors", [1, 0])
async def test_worker_death_while_queued_loses_no_request(etcd, prefix, start_service, survivors):
    """Requests queued when a worker is killed are served by the survivor, or, with none left,
    fail UNAVAILABLE once the worker leaves; none hangs."""
    channel, stub, _, workers = await start_cluster(etcd, prefix, start_service, 1 + survivors, lease_ttl=2)
    client = Client(stub)
    try:
        for i in range(1 + survivors):
            client.send(f"busy-{i}", tokens=BLOCK)
        for i in range(1 + survivors):
            await client.started(f"busy-{i}")
        for i in range(4):
            client.send(f"queued-{i}", tokens=5)
        await wait_queued(stub, 4)
        workers[0].kill()
        for i in range(1 + survivors):  # the survivor's slot frees too
            client.tasks.pop(f"busy-{i}").cancel()
        await asyncio.wait_for(asyncio.gather(*client.tasks.values()), 60)
        queued_outcomes = {client.outcome[f"queued-{i}"] for i in range(4)}
        if survivors:
            assert queued_outcomes == {grpc.StatusCode.OK}, client.errors
        else:
            assert queued_outcomes == {grpc.StatusCode.UNAVAILABLE}, client.errors
            assert "no live" in client.errors["queued-0"].details()
        assert await queued(stub) == 0
    finally:
        await channel.close()


async def test_http_priority_deadline_and_429_with_retry_after_through_the_gateway(etcd, prefix, start_service):
    """The official `openai` client against the gateway: a sheddable request (vLLM's `priority`)
    and one past its TTFT deadline header get 429 + Retry-After while the only rank is busy; a bad
    priority gets 400 naming it; once the rank frees, requests are served."""
    metrics_port = free_port()
    channel, stub, _, _ = await start_cluster(
        etcd, prefix, start_service, 1, "--sheddable-queue-ttl", "0.3", "--metrics-port", str(metrics_port)
    )
    api = _gateway_api(etcd, prefix, start_service)
    client = Client(stub)
    try:
        await wait_until(lambda: _models_ready(api), timeout=30, what="the gateway serving its model")
        client.send("busy", tokens=BLOCK)
        await client.started("busy")
        with pytest.raises(openai.RateLimitError) as shed:
            await api.completions.create(model="tiny-random", prompt="hello", max_tokens=2, extra_body={"priority": 1})
        assert int(shed.value.response.headers["Retry-After"]) >= 1
        assert "queue TTL" in shed.value.body["message"]
        # OpenAI's rate-limit shape (it said invalid_request_error: the client's fault, not to retry)
        assert (shed.value.body["type"], shed.value.body["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        with pytest.raises(openai.RateLimitError) as late:
            await api.completions.create(
                model="tiny-random", prompt="hello", max_tokens=2, extra_headers={"X-pdlb-TTFT-Deadline-Ms": "200"}
            )
        assert "TTFT deadline" in late.value.body["message"] and late.value.response.headers["Retry-After"]
        with pytest.raises(openai.BadRequestError) as bad:
            await api.completions.create(model="tiny-random", prompt="hello", extra_body={"priority": "high"})
        assert bad.value.body["param"] == "priority"
        serving = asyncio.create_task(
            api.completions.create(
                model="tiny-random", prompt="hello", max_tokens=2, extra_body={"priority": -1, "ignore_eos": True}
            )
        )
        await wait_queued(stub, 1)  # held while the rank is busy, bound when its slot frees
        gateway_metrics = f"{_root(api)}/metrics"  # where users scrape: no dispatcher port needed

        async def gateway_shows_queued() -> bool:
            scrape = await asyncio.to_thread(_get, gateway_metrics)
            return _sample(scrape, "pdlb_gateway_queue_requests") == 1.0

        await wait_until(gateway_shows_queued, what="the gateway's /metrics to show the queued request")
        client.tasks["busy"].cancel()
        served = await asyncio.wait_for(serving, 60)
        assert served.usage.completion_tokens == 2
        snap = await load_snapshot(stub)
        assert snap.flow.shed_total == 2 and snap.flow.admitted_total >= 1
        # The same counts in the dispatcher's /metrics, `pdlb top` and the gateway's dashboard.
        scrape = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
        assert 'pdlb_queue_shed_total{reason="ttl"} 1.0' in scrape
        assert 'pdlb_queue_shed_total{reason="deadline"} 1.0' in scrape
        assert "pdlb_queue_requests 0.0" in scrape and "pdlb_queue_wait_seconds_count" in scrape

        # by reason, every reason listed (a bounded label set), as on the dispatcher's own /metrics;
        # the gateway's copy comes from the WatchLoad stream, so it is awaited whole (a snapshot from
        # between the two sheds shows the first alone)
        expected = {"ttl": 1.0, "deadline": 1.0, "full": 0.0, "displaced": 0.0, "shutdown": 0.0}
        shed_by_reason: dict[str, float | None] = {}

        async def gateway_shows_shed() -> bool:
            scrape = await asyncio.to_thread(_get, gateway_metrics)
            shed_by_reason.update({r: _sample(scrape, "pdlb_gateway_queue_shed_total", reason=r) for r in SHED_REASONS})
            return shed_by_reason == expected

        await wait_until(gateway_shows_shed, what=f"the gateway's /metrics to show the shed requests: {expected}")
        assert shed_by_reason == expected
        scrape = await asyncio.to_thread(_get, gateway_metrics)
        assert _sample(scrape, "pdlb_gateway_queue_requests") == 0.0
        assert _sample(scrape, "pdlb_gateway_queue_admitted_total") >= 1.0
        assert _sample(scrape, "pdlb_gateway_queue_wait_p50_seconds") > 0.0  # the served one waited
        console = Console(width=400, record=True)
        console.print(render("mixed", snap))
        frame = console.export_text()
        assert "queue 0 (0 tokens, 0 tenants)" in frame and "shed 2" in frame

        async def dashboard_shows_shed() -> bool:
            state = json.loads(await asyncio.to_thread(_get, f"{_root(api)}/dashboard/state"))
            return [r["queue"]["shed"] for r in state["roles"]] == [2]

        await wait_until(dashboard_shows_shed, what="the dashboard's queue counts")
    finally:
        await api.close()
        await channel.close()


def _sample(scrape: str, name: str, reason: str = "") -> float | None:
    """The value of the one sample of `name` (with that `reason` label, if given) in a Prometheus
    text scrape (labels checked: mixed role)."""
    lines = [line for line in scrape.splitlines() if line.startswith(name + "{")]
    values = [line for line in lines if not reason or f'reason="{reason}"' in line]
    assert len(values) <= 1, values
    if not values:
        return None
    assert 'role="mixed"' in values[0] and 'dispatcher="' in values[0], values[0]
    return float(values[0].rsplit(" ", 1)[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def _gateway_api(etcd, prefix, start_service) -> openai.AsyncOpenAI:
    """A gateway over the cluster under `prefix`, and an OpenAI client of its HTTP API that never retries."""
    http_port = free_port()
    start_service("gateway", "--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--http-port", str(http_port))
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)


def _root(api: openai.AsyncOpenAI) -> str:
    """The gateway's own address (http://host:port) behind an OpenAI client of its /v1 API."""
    return str(api.base_url).rstrip("/").removesuffix("/v1")


async def _models_ready(api) -> bool:
    try:
        return bool((await api.models.list()).data)
    except openai.APIError:
        return False


def test_pdlb_top_counts_one_queued_token_and_tenant_in_the_singular():
    """`pdlb top`'s queue line read "queue 1 (1 tokens, 1 tenants)"."""
    console = Console(width=400, record=True)
    for queued, said in ((1, "queue 1 (1 token, 1 tenant)"), (2, "queue 2 (2 tokens, 2 tenants)")):
        flow = dispatch_pb2.FlowControlState(enabled=True, queued_requests=queued, queued_tokens=queued, tenants=queued)
        console.print(render("mixed", dispatch_pb2.WatchLoadResponse(method="least_wait", flow=flow)))
        assert said in console.export_text(), said
