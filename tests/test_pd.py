"""PD disaggregation end to end on real processes: bootstrap, rank sync, KV hand-off."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdlb.client import PDLBClient
from pdlb.v1 import bootstrap_pb2, bootstrap_pb2_grpc, dispatch_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.helpers import dispatch_stub, load_snapshot, request, wait_for_workers, wait_until

MODEL = ["--hidden-size", "64", "--num-layers", "3", "--num-heads", "4", "--seed", "11"]


class PDCluster:
    def __init__(
        self,
        etcd,
        prefix,
        start_service,
        prefill_ranks=2,
        decode_ranks=2,
        method="total_tokens",
        dispatcher_flags=(),
        prefill_flags=(),
        decode_flags=(),
    ):
        flags = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", "3"]
        self.bootstrap = start_service("bootstrap", *flags, name="bootstrap")
        self.prefill_dispatcher = start_service(
            "dispatcher",
            *flags,
            "--disaggregation-mode",
            "prefill",
            "--load-balance-method",
            method,
            *dispatcher_flags,
            name="disp-p",
        )
        self.decode_dispatcher = start_service(
            "dispatcher", *flags, "--disaggregation-mode", "decode", *dispatcher_flags, name="disp-d"
        )
        self.prefills = [
            start_service(
                "scheduler",
                *flags,
                *MODEL,
                "--disaggregation-mode",
                "prefill",
                "--dp-rank",
                str(r),
                *prefill_flags,
                name=f"prefill-{r}",
            )
            for r in range(prefill_ranks)
        ]
        self.decodes = [
            start_service(
                "scheduler",
                *flags,
                *MODEL,
                "--disaggregation-mode",
                "decode",
                "--dp-rank",
                str(r),
                *decode_flags,
                name=f"decode-{r}",
            )
            for r in range(decode_ranks)
        ]
        self.mixed = start_service("scheduler", *MODEL, name="mixed-reference")

    def client(self) -> PDLBClient:
        return PDLBClient(prefill=self.prefill_dispatcher.address, decode=self.decode_dispatcher.address)

    async def ready(self) -> None:
        for proc, count in ((self.prefill_dispatcher, len(self.prefills)), (self.decode_dispatcher, len(self.decodes))):
            channel, stub = dispatch_stub(proc.address)
            async with channel:
                await wait_for_workers(stub, count)

    async def mixed_tokens(self, req) -> list[int]:
        async with grpc.aio.insecure_channel(self.mixed.address) as channel:
            call = scheduler_pb2_grpc.SchedulerStub(channel).Generate(
                scheduler_pb2.SchedulerGenerateRequest(request=req)
            )
            return [t async for chunk in call for t in chunk.token_ids]


async def pd_tokens(client: PDLBClient, req) -> tuple[list[int], int]:
    chunks = [chunk async for chunk in client.generate(req, timeout=60)]
    return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason


@pytest.fixture
def pd(etcd, prefix, start_service):
    return lambda **kw: PDCluster(etcd, prefix, start_service, **kw)


async def test_pd_tokens_equal_mixed_and_many_concurrent_rooms(pd):
    cluster = pd()
    await cluster.ready()
    client = cluster.client()
    prompts = [f"room number {i} says " + "abc" * i for i in range(12)]
    results = await asyncio.gather(
        *[pd_tokens(client, request(f"pd{i}", p, max_new_tokens=10)) for i, p in enumerate(prompts)]
    )
    for i, (tokens, reason) in enumerate(results):
        assert reason == 1 and len(tokens) == 10
        assert tokens == await cluster.mixed_tokens(request(f"ref{i}", prompts[i], max_new_tokens=10))
    # The prefill dispatcher balanced by tokens over both prefill ranks (not room % dp_size).
    channel, stub = dispatch_stub(cluster.prefill_dispatcher.address)
    async with channel:
        snapshot = await load_snapshot(stub)
        assert snapshot.method == "total_tokens" and all(w.dispatched_total > 0 for w in snapshot.workers)

        async def kv_freed():
            rows = (await load_snapshot(stub)).workers  # only the (unused, evictable) prefix cache remains
            return all(w.reported.kv_tokens_used == w.reported.kv_tokens_evictable for w in rows)

        await wait_until(kv_freed, what="prefill workers to free every pulled KV")
    await client.close()


def _metric(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_kv_handoff_costs_are_exported_on_both_sides(pd):
    """What an operator reads to know the hand-off's price: tokens and seconds on each side."""
    from pdlb.common.free_port import free_port

    prefill_port, decode_port = free_port(), free_port()
    cluster = pd(
        prefill_ranks=1,
        decode_ranks=1,
        prefill_flags=("--metrics-port", str(prefill_port)),
        decode_flags=("--metrics-port", str(decode_port)),
    )
    await cluster.ready()
    client = cluster.client()
    try:
        chunks = []
        for i in range(3):
            chunks.append([c async for c in client.generate(request(f"kv{i}", "x" * (40 + i), max_new_tokens=2))])
    finally:
        await client.close()
    prompt_tokens = sum(c[-1].prompt_tokens for c in chunks)
    assert prompt_tokens == 40 + 41 + 42  # the toy tokenizer: one token per byte
    sent = await asyncio.to_thread(_metric, prefill_port, "pdlb_scheduler_kv_sent_tokens_total")
    received = await asyncio.to_thread(_metric, decode_port, "pdlb_scheduler_kv_received_tokens_total")
    assert sent == received == prompt_tokens
    for port, name in (
        (prefill_port, "pdlb_scheduler_kv_read_seconds_total"),
        (decode_port, "pdlb_scheduler_kv_receive_seconds_total"),
        (decode_port, "pdlb_scheduler_kv_write_seconds_total"),
    ):
        assert 0 < await asyncio.to_thread(_metric, port, name) < 10, name


async def test_router_assigns_both_ranks(pd):
    cluster = pd(method="round_robin")
    await cluster.ready()
    client = cluster.client()
    req = request(
        "ext", "externally routed", max_new_tokens=6, bootstrap_room=12345, prefill_dp_rank=1, decode_dp_rank=0
    )
    chunks = [c async for c in client.generate(req, timeout=60)]
    assert {c.dp_rank for c in chunks} == {0}
    async with grpc.aio.insecure_channel(cluster.bootstrap.address) as channel:
        record = await bootstrap_pb2_grpc.BootstrapStub(channel).LookupRoom(
            bootstrap_pb2.LookupRoomRequest(bootstrap_room=12345)
        )
        assert record.record.prefill_dp_rank == 1 and record.record.prefill_address == cluster.prefills[1].address
        endpoints = await bootstrap_pb2_grpc.BootstrapStub(channel).ListPrefillEndpoints(
            bootstrap_pb2.ListPrefillEndpointsRequest()
        )
        assert [e.dp_rank for e in endpoints.endpoints] == [0, 1]
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == await cluster.mixed_tokens(request("ref", "externally routed", max_new_tokens=6))
    await client.close()


async def test_bootstrap_lists_only_prefill_endpoints_that_are_members(pd):
    """A prefill worker that dies for good (kill -9, never restarted) leaves the bootstrap's endpoint
    list once its lease expires, as it leaves the dispatchers' tables."""
    cluster = pd(decode_ranks=1)
    await cluster.ready()
    async with grpc.aio.insecure_channel(cluster.bootstrap.address) as channel:
        stub = bootstrap_pb2_grpc.BootstrapStub(channel)

        async def listed() -> list[int]:
            reply = await stub.ListPrefillEndpoints(bootstrap_pb2.ListPrefillEndpointsRequest())
            return [e.dp_rank for e in reply.endpoints]

        assert await listed() == [0, 1]
        cluster.prefills[1].kill()  # its key stays until the 3 s lease expires

        async def only_rank_0() -> bool:
            return await listed() == [0]

        await wait_until(only_rank_0, timeout=20, what="the dead prefill rank to be unlisted")


async def test_decode_arriving_before_prefill_waits_for_the_room(pd):
    cluster = pd(prefill_ranks=1, decode_ranks=1)
    await cluster.ready()
    req = request("early", "decode first", max_new_tokens=5, bootstrap_room=777)
    d_channel, decode = dispatch_stub(cluster.decode_dispatcher.address)
    p_channel, prefill = dispatch_stub(cluster.prefill_dispatcher.address)
    async with d_channel, p_channel:
        decode_call = decode.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=60)
        decode_task = asyncio.ensure_future(_collect(decode_call))

        async def decode_waiting():  # dispatched to the decode worker, which has not taken it in yet
            row = (await load_snapshot(decode)).workers[0]
            return row.inflight_requests == 1 and row.reported.running_requests == 0

        await wait_until(decode_waiting, what="the decode request to wait for its room")
        assert not decode_task.done()
        prefill_chunks = await _collect(prefill.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=60))
        assert prefill_chunks[-1].finish_reason == 4  # FINISH_REASON_PREFILL_DONE
        tokens = [t for c in await decode_task for t in c.token_ids]
    assert tokens == await cluster.mixed_tokens(request("ref", "decode first", max_new_tokens=5))


async def _collect(call) -> list:
    return [chunk async for chunk in call]


async def test_prefill_worker_death_gives_unavailable_promptly_and_no_leak(pd):
    cluster = pd(prefill_ranks=1, decode_ranks=1, prefill_flags=("--lease-ttl", "60"))
    await cluster.ready()
    p_channel, prefill = dispatch_stub(cluster.prefill_dispatcher.address)
    d_channel, decode = dispatch_stub(cluster.decode_dispatcher.address)
    async with p_channel, d_channel:
        req = request("orphan", "x" * 300, max_new_tokens=5, bootstrap_room=4242)
        await _collect(prefill.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=60))  # KV held
        cluster.prefills[0].kill()  # dies holding the KV, before or while the decode side pulls
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(decode.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "orphan" in err.value.details()
        # Not re-dispatched to another decode rank (the KV is gone): the hand-off error itself comes back.
        assert "pulling KV" in err.value.details() or "KV of room" in err.value.details(), err.value.details()
        assert loop.time() - started < 10
        async with grpc.aio.insecure_channel(cluster.decodes[0].address) as channel:
            load = await scheduler_pb2_grpc.SchedulerStub(channel).GetLoad(scheduler_pb2.GetLoadRequest())
            assert load.load.kv_tokens_used == 0 and load.load.running_requests == 0


async def test_abandoned_pull_and_expired_hold_free_the_prefill_kv(pd):
    cluster = pd(prefill_ranks=1, decode_ranks=1, prefill_flags=("--kv-hold-ttl", "1"))
    await cluster.ready()
    address = cluster.prefills[0].address
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)

        async def prefill(room):
            req = request(f"hold{room}", "y" * 200, max_new_tokens=5, bootstrap_room=room)
            await _collect(stub.Generate(scheduler_pb2.SchedulerGenerateRequest(request=req)))
            assert (await stub.GetLoad(scheduler_pb2.GetLoadRequest())).load.kv_tokens_used == 200

        async def kv_free():
            load = (await stub.GetLoad(scheduler_pb2.GetLoadRequest())).load
            return load.kv_tokens_used == load.kv_tokens_evictable  # held KV freed; the cache may stay

        await prefill(1)
        pull = stub.PullKV(scheduler_pb2.PullKVRequest(bootstrap_room=1, request_id="d"))
        assert (await pull.read()).HasField("header")
        pull.cancel()  # the decode side goes away mid-transfer
        await wait_until(kv_free, what="the abandoned transfer to free the KV")
        await prefill(2)
        await wait_until(kv_free, what="the unpulled KV to expire after 1 s")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(stub.PullKV(scheduler_pb2.PullKVRequest(bootstrap_room=2, request_id="late"), timeout=2))
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_duplicate_room_on_one_prefill_rank_is_refused_and_the_first_kv_stays(pd):
    """Two prefill halves with one room, one after the other, both on rank 0 (room % 2): the second
    is refused at once and the first request's held KV stays intact for its decode half."""
    cluster = pd(prefill_ranks=2, decode_ranks=1, method="follow_bootstrap_room")
    await cluster.ready()
    room = 2024  # even: rank 0
    first = request("dup-a", "the first prompt", max_new_tokens=5, bootstrap_room=room)
    second = request("dup-b", "another prompt entirely", max_new_tokens=5, bootstrap_room=room)
    p_channel, prefill = dispatch_stub(cluster.prefill_dispatcher.address)
    d_channel, decode = dispatch_stub(cluster.decode_dispatcher.address)
    async with p_channel, d_channel:
        done = await _collect(prefill.Generate(dispatch_pb2.GenerateRequest(request=first), timeout=60))
        assert done[-1].finish_reason == 4 and done[-1].dp_rank == 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(prefill.Generate(dispatch_pb2.GenerateRequest(request=second), timeout=60))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
        assert f"room {room}" in err.value.details() and "dup-a" in err.value.details()
        assert loop.time() - started < 5  # at once: refused at admission, no prefill run
        chunks = await _collect(decode.Generate(dispatch_pb2.GenerateRequest(request=first), timeout=60))
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == await cluster.mixed_tokens(request("ref", "the first prompt", max_new_tokens=5))
        # The second decode half finds the room's KV taken by the first: told at once, not after a wait.
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(decode.Generate(dispatch_pb2.GenerateRequest(request=second), timeout=60))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "already pulled" in err.value.details()
        assert loop.time() - started < 5


async def test_a_room_held_on_one_prefill_rank_is_refused_at_dispatch_for_another_rank(pd):
    """A second request with the room of one whose prefill holds its KV on rank 0, sent to rank 1
    (the rank that would not see the clash), is refused ALREADY_EXISTS by the prefill dispatcher at
    once, naming the holder, before any rank runs its prefill; the first request is served."""
    cluster = pd(prefill_ranks=2, decode_ranks=1, method="round_robin")
    await cluster.ready()
    room = 4242
    first = request("held-a", "the first prompt", max_new_tokens=5, bootstrap_room=room, prefill_dp_rank=0)
    second = request("held-b", "another prompt", max_new_tokens=5, bootstrap_room=room, prefill_dp_rank=1)
    p_channel, prefill = dispatch_stub(cluster.prefill_dispatcher.address)
    d_channel, decode = dispatch_stub(cluster.decode_dispatcher.address)
    async with p_channel, d_channel:
        done = await _collect(prefill.Generate(dispatch_pb2.GenerateRequest(request=first), timeout=60))
        assert done[-1].finish_reason == 4 and done[-1].dp_rank == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(prefill.Generate(dispatch_pb2.GenerateRequest(request=second), timeout=60))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
        assert f"room {room} is already held by prefill rank 0" in err.value.details(), err.value.details()
        rows = {r.worker.dp_rank: r for r in (await load_snapshot(prefill)).workers}
        assert rows[1].reported.prompt_tokens_total == 0 and rows[1].inflight_requests == 0  # no prefill ran
        chunks = await _collect(decode.Generate(dispatch_pb2.GenerateRequest(request=first), timeout=60))
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == await cluster.mixed_tokens(request("ref", "the first prompt", max_new_tokens=5))


async def test_a_duplicate_request_id_or_room_in_flight_is_refused_by_dispatcher_and_decode_worker(pd):
    """ALREADY_EXISTS wherever both copies meet: at a dispatcher (they would run on two ranks) and at
    a decode worker while the first waits for its room's KV."""
    cluster = pd(prefill_ranks=1, decode_ranks=2, method="round_robin")
    await cluster.ready()
    d_channel, decode = dispatch_stub(cluster.decode_dispatcher.address)
    async with d_channel:
        waiting = request("same-id", "waits for a prefill that comes later", max_new_tokens=3, bootstrap_room=91)
        call = decode.Generate(dispatch_pb2.GenerateRequest(request=waiting), timeout=60)
        pending = asyncio.ensure_future(_collect(call))

        async def decode_waiting():
            rows = (await load_snapshot(decode)).workers
            return sum(r.inflight_requests for r in rows) == 1

        await wait_until(decode_waiting, what="the decode half to wait for its room")
        for clash in (
            request("same-id", "other", max_new_tokens=3, bootstrap_room=92),  # same id, another room
            request("other-id", "other", max_new_tokens=3, bootstrap_room=91),  # same room, another id
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _collect(decode.Generate(dispatch_pb2.GenerateRequest(request=clash), timeout=10))
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
        # Straight to the decode worker that holds the waiting half (no dispatcher in between).
        rank = next(r.worker.dp_rank for r in (await load_snapshot(decode)).workers if r.inflight_requests)
        async with grpc.aio.insecure_channel(cluster.decodes[rank].address) as channel:
            worker = scheduler_pb2_grpc.SchedulerStub(channel)
            for clash in (request("same-id", "x", bootstrap_room=93), request("third-id", "x", bootstrap_room=91)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _collect(worker.Generate(scheduler_pb2.SchedulerGenerateRequest(request=clash), timeout=10))
                assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
        assert not pending.done()
        p_channel, prefill = dispatch_stub(cluster.prefill_dispatcher.address)
        async with p_channel:
            await _collect(prefill.Generate(dispatch_pb2.GenerateRequest(request=waiting), timeout=60))
        assert sum(len(c.token_ids) for c in await pending) == 3  # the first one was never disturbed
