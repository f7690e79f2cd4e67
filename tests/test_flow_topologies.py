"""Flow control beyond one mixed dispatcher, on real processes: a PD pair of dispatchers (the decode
dispatcher admits by free KV), a lockstep group (waves) and dispatcher replicas. In each, requests
are held in a dispatcher's queue while no rank has room and bound as room frees; a request
cancelled while queued leaves the queue and the others are served."""

from __future__ import annotations

import asyncio

import grpc

from pdlb.client import PDLBClient
from pdlb.common.free_port import free_port
from pdlb.common.requests import BOUND_KEY
from pdlb.v1 import dispatch_pb2
from tests.helpers import dispatch_stub, load_snapshot, request, wait_for_workers, wait_until
from tests.test_flow_control import BLOCK, SIM, Client, queued, wait_queued

SIM_PD = ["--runner", "sim", "--sim-slowdown", "10", "--report-interval-ms", "50"]


class PDClient:
    """PD Generate calls through both dispatchers (`PDLBClient`), recording first tokens and outcomes."""

    def __init__(self, client: PDLBClient) -> None:
        self.client = client
        self.first_token: set[str] = set()
        self.outcome: dict[str, grpc.StatusCode] = {}
        self.errors: dict[str, grpc.aio.AioRpcError] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    def send(self, rid: str, prompt: int, tokens: int) -> asyncio.Task:
        req = request(rid, input_ids=[(hash(rid) + i) % 200 + 1 for i in range(prompt)], max_new_tokens=tokens)
        self.tasks[rid] = asyncio.create_task(self._run(rid, req))
        return self.tasks[rid]

    async def _run(self, rid: str, req) -> None:
        try:
            async for chunk in self.client.generate(req, timeout=60):
                if chunk.token_ids:
                    self.first_token.add(rid)
            self.outcome[rid] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            self.outcome[rid] = err.code()
            self.errors[rid] = err


async def test_pd_decode_dispatcher_holds_requests_until_kv_frees(etcd, prefix, start_service):
    """The decode rank's KV (1,024 tokens) holds a running 800-token request: PD requests of 300
    prompt tokens wait in the decode dispatcher's queue (not at the worker), one cancelled there
    leaves it, and the others are bound, and served, when the running request's KV frees; the
    cancelled one's prefill never ran."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", "5"]
    start_service("bootstrap", *common, name="bootstrap")
    # the prefill dispatcher binds at once (no flow control): the prefill half's timing is the client's
    disp_p = start_service("dispatcher", *common, "--disaggregation-mode", "prefill", name="disp-p")
    disp_d = start_service("dispatcher", *common, "--disaggregation-mode", "decode", "--flow-control", name="disp-d")
    workers = [
        start_service("scheduler", *common, *SIM_PD, "--disaggregation-mode", "prefill", name="prefill-0", wait=False),
        start_service(
            "scheduler",
            *common,
            *SIM_PD,
            "--disaggregation-mode",
            "decode",
            "--max-total-tokens",
            "1024",
            "--max-prompt-tokens",
            "1024",
            name="decode-0",
            wait=False,
        ),
    ]
    for proc in workers:
        proc.wait_ready()
    channel_p, stub_p = dispatch_stub(disp_p.address)
    channel_d, stub_d = dispatch_stub(disp_d.address)
    client = PDClient(PDLBClient(prefill=disp_p.address, decode=disp_d.address))
    try:
        for stub in (stub_p, stub_d):
            await wait_for_workers(stub, 1)

        async def decode_reports() -> bool:
            snap = await load_snapshot(stub_d)
            return all(w.report_age_ms >= 0 and w.reported.kv_tokens_capacity == 1024 for w in snap.workers)

        await wait_until(decode_reports, what="the decode worker's first report")
        client.send("busy", prompt=800, tokens=200)  # reserves 1,000 of the 1,024 KV tokens
        await wait_until(lambda: "busy" in client.first_token, what="the running request's first token")
        for i in range(3):
            client.send(f"held-{i}", prompt=300, tokens=5)
        await wait_queued(stub_d, 3)
        snap = await load_snapshot(stub_d)
        assert all(w.reported.waiting_requests == 0 for w in snap.workers), "nothing waits at the decode worker"
        client.tasks["held-1"].cancel()  # the client gives up while its decode half is queued
        await wait_queued(stub_d, 2)
        client.tasks["busy"].cancel()  # its KV frees: the queued requests are bound
        await asyncio.wait_for(asyncio.gather(client.tasks["held-0"], client.tasks["held-2"]), 60)
        assert [client.outcome[r] for r in ("held-0", "held-2")] == [grpc.StatusCode.OK] * 2, client.errors
        assert "held-1" not in client.outcome and "held-1" not in client.first_token
        snap = await load_snapshot(stub_d)
        assert snap.flow.queued_requests == 0 and snap.flow.admitted_total == 2 and snap.flow.shed_total == 0

        # A prefill half is sent only once its decode half is bound, so the request cancelled while
        # its decode half was queued never prefilled: no KV is held for it (held KV waits for its
        # decode side up to --kv-hold-ttl, 60 s; a burst of sheds once filled the prefill ranks so).
        async def no_prefill_kv_held() -> bool:
            load = (await load_snapshot(stub_p)).workers[0].reported
            return load.kv_tokens_used - load.kv_tokens_evictable == 0

        await wait_until(no_prefill_kv_held, what="no prefill KV held for the request cancelled while queued")

        async def settled() -> bool:
            rows = (await load_snapshot(stub_d)).workers
            return all(w.inflight_requests == 0 and w.reported.running_requests == 0 for w in rows)

        await wait_until(settled, what="the decode rank to be idle, the cancelled request not left running")
    finally:
        await client.client.close()
        await channel_p.close()
        await channel_d.close()


async def test_lockstep_group_requests_wait_for_a_slot_and_start_waves(etcd, prefix, start_service):
    """A lockstep group of two ranks of one batch slot each, both running: new requests wait in the
    dispatcher, are bound as slots free, and the group runs them in further waves."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", "5"]
    dispatcher = start_service("dispatcher", *common, "--load-balance-method", "least_wait", "--flow-control")
    group = ["--dp-group-size", "2", "--dp-group-address", f"127.0.0.1:{free_port()}", "--dp-group-timeout", "20"]
    ranks = [
        start_service("scheduler", *common, *SIM, *group, "--dp-rank", str(r), name=f"rank{r}", wait=False)
        for r in range(2)
    ]
    for proc in ranks:
        proc.wait_ready(60)
    channel, stub = dispatch_stub(dispatcher.address)
    client = Client(stub)
    try:
        await wait_for_workers(stub, 2)

        async def reporting() -> bool:
            snap = await load_snapshot(stub)
            return all(w.report_age_ms >= 0 and w.reported.max_running_requests == 1 for w in snap.workers)

        await wait_until(reporting, what="both ranks' first reports")
        for r in "ab":
            client.send(f"busy-{r}", tokens=BLOCK)
        for r in "ab":
            await client.started(f"busy-{r}")
        snap = await load_snapshot(stub)
        assert sorted(w.dp_group.group_size for w in snap.workers) == [2, 2]
        wave = max(w.dp_group.wave for w in snap.workers)
        for i in range(3):
            client.send(f"held-{i}", tokens=3)
            await wait_queued(stub, i + 1)  # queued one after another: arrival order is the send order
        client.tasks.pop("busy-a").cancel()
        await asyncio.wait_for(asyncio.gather(*(client.tasks[f"held-{i}"] for i in range(3))), 60)
        assert {client.outcome[f"held-{i}"] for i in range(3)} == {grpc.StatusCode.OK}, client.errors
        order = sorted((f"held-{i}" for i in range(3)), key=client.first_token_at.get)
        assert order == ["held-0", "held-1", "held-2"], "bound in arrival order as the slot freed"
        client.tasks.pop("busy-b").cancel()

        async def paused_after_more_waves() -> bool:
            rows = (await load_snapshot(stub)).workers
            return all(not w.dp_group.running and w.dp_group.wave > wave for w in rows)

        await wait_until(paused_after_more_waves, what="the group to pause after further waves")
        snap = await load_snapshot(stub)
        assert snap.flow.queued_requests == 0 and snap.flow.admitted_total == 3
    finally:
        await channel.close()


async def test_replicas_each_hold_their_own_queue(etcd, prefix, start_service):
    """Two dispatcher replicas over one rank of one batch slot: a replica learns of the other's
    running request from the worker's report and holds its own requests; neither sees the other's
    queue; when the slot frees both queues drain and every request is served."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", "5"]
    replicas = [
        start_service("dispatcher", *common, "--load-balance-method", "least_wait", "--flow-control", name=f"disp-{n}")
        for n in "ab"
    ]
    start_service("scheduler", *common, *SIM, "--dp-rank", "0", name="sim-0")
    channels, stubs = zip(*(dispatch_stub(d.address) for d in replicas), strict=True)
    a, b = (Client(stub) for stub in stubs)
    try:
        for stub in stubs:
            await wait_for_workers(stub, 1)
        a.send("busy", tokens=BLOCK)
        await a.started("busy")

        async def b_sees_the_slot_taken() -> bool:
            rows = (await load_snapshot(stubs[1])).workers
            return rows[0].reported.running_requests == 1 and rows[0].inflight_requests == 0

        await wait_until(b_sees_the_slot_taken, what="replica b to see a's request in the worker's report")
        b.send("via-b-0", tokens=3)
        await wait_queued(stubs[1], 1)
        a.send("via-a-0", tokens=3)
        await wait_queued(stubs[0], 1)
        b.send("via-b-1", tokens=3)
        await wait_queued(stubs[1], 2)
        assert await queued(stubs[0]) == 1, "a replica's queue holds only its own requests"
        for stub in stubs:
            assert (await load_snapshot(stub)).workers[0].reported.waiting_requests == 0
        a.tasks.pop("busy").cancel()
        await asyncio.wait_for(asyncio.gather(*a.tasks.values(), *b.tasks.values()), 60)
        outcomes = {**a.outcome, **b.outcome}
        assert outcomes == {r: grpc.StatusCode.OK for r in ("via-a-0", "via-b-0", "via-b-1")}, (a.errors, b.errors)
        assert b.first_token_at["via-b-0"] < b.first_token_at["via-b-1"]
        for stub, admitted in zip(stubs, (1, 2), strict=True):
            snap = await load_snapshot(stub)
            assert snap.flow.queued_requests == 0 and snap.flow.admitted_total == admitted
    finally:
        for channel in channels:
            await channel.close()


async def test_a_pd_request_cancelled_during_its_kv_pull_leaves_no_load_behind(etcd, prefix, start_service):
    """A decode worker acknowledges a request (counts it in its load) only once its KV has arrived.
    A client that went away while the decode half waited for the KV left the decode dispatcher
    counting it in flight, on a worker that ran nothing, until --inflight-timeout (60 s): every
    method and flow control read that ghost load. It is dropped when the client goes."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", "5"]
    start_service("bootstrap", *common, name="bootstrap")
    disp_d = start_service("dispatcher", *common, "--disaggregation-mode", "decode", name="disp-d")
    start_service("scheduler", *common, *SIM_PD, "--disaggregation-mode", "decode", name="decode-0")
    channel, stub = dispatch_stub(disp_d.address)
    try:
        await wait_for_workers(stub, 1)
        # A decode half whose prefill never comes: its worker waits for the KV of room 77.
        req = request("orphan", input_ids=list(range(1, 301)), max_new_tokens=5, bootstrap_room=77)
        call = stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=60)
        assert dict(await call.initial_metadata()).get(BOUND_KEY) == "0"  # bound to the only rank

        async def counted() -> bool:
            return (await load_snapshot(stub)).workers[0].inflight_requests == 1

        await wait_until(counted, what="the decode half counted in flight while its KV is awaited")
        call.cancel()

        async def released() -> bool:
            row = (await load_snapshot(stub)).workers[0]
            return row.inflight_requests == 0 and row.reported.running_requests == 0

        await wait_until(released, timeout=10, what="the cancelled decode half no longer counted in flight")
    finally:
        await channel.close()
