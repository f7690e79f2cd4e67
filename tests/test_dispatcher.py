"""The dispatcher against a real etcd and real scheduler processes."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
import urllib.request

import grpc
import pytest

from pdlb.common.free_port import free_port
from pdlb.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc, load_report_pb2, load_report_pb2_grpc
from tests.helpers import (
    dispatch_stub,
    generate,
    live_workers,
    load_snapshot,
    request,
    rest_of,
    wait_for_workers,
    wait_until,
)


def etcd_flags(etcd, prefix, ttl: int = 2) -> list[str]:
    return ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", str(ttl)]


def start_schedulers(start_service, flags, ranks, *extra):
    return [start_service("scheduler", *flags, "--dp-rank", str(r), *extra, name=f"sched-{r}") for r in ranks]


@pytest.mark.parametrize("method", ["round_robin", "total_requests", "total_tokens", "kv_aware"])
async def test_each_method_serves_real_requests_on_every_rank(etcd, prefix, start_service, method):
    flags = etcd_flags(etcd, prefix)
    dispatcher = start_service("dispatcher", *flags, "--load-balance-method", method)
    start_schedulers(start_service, flags, range(2))
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 2)
        results = await asyncio.gather(
            *[generate(stub, request(f"{method}-{i}", "x" * (5 + i), max_new_tokens=4)) for i in range(6)]
        )
        ranks = {chunks[0].dp_rank for chunks in results}
        assert ranks == {0, 1}
        for chunks in results:
            assert sum(len(c.token_ids) for c in chunks) == 4 and chunks[-1].finish_reason == 1


async def test_total_tokens_avoids_the_rank_holding_a_long_request(etcd, prefix, start_service):
    flags = etcd_flags(etcd, prefix)
    dispatcher = start_service("dispatcher", *flags, "--load-balance-method", "total_tokens")
    start_schedulers(start_service, flags, range(2), "--runner", "sim")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 2)
        long_call = stub.Generate(dispatch_pb2.GenerateRequest(request=request("long", "y" * 3000, max_new_tokens=400)))
        first = await long_call.read()
        busy = first.dp_rank
        # Short requests all avoid the busy rank while the long one runs (its tokens dominate).
        for i in range(4):
            routed = await stub.Route(dispatch_pb2.RouteRequest(request=request(f"s{i}", "z" * 20)), timeout=5)
            assert routed.dp_rank != busy
        long_call.cancel()


async def test_follow_bootstrap_room_and_external_ranks(etcd, prefix, start_service):
    flags = etcd_flags(etcd, prefix)
    dispatcher = start_service(
        "dispatcher",
        *flags,
        "--disaggregation-mode",
        "decode",
        "--load-balance-method",
        "follow_bootstrap_room",
        "--dp-size",
        "3",
    )
    start_schedulers(start_service, flags, range(3), "--disaggregation-mode", "decode", "--runner", "sim")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 3)
        for room in (0, 4, 8, 11):
            routed = await stub.Route(dispatch_pb2.RouteRequest(request=request(f"r{room}", "a", bootstrap_room=room)))
            assert (routed.dp_rank, routed.method) == (room % 3, "follow_bootstrap_room")
        routed = await stub.Route(
            dispatch_pb2.RouteRequest(request=request("ext", "a", bootstrap_room=0, decode_dp_rank=2))
        )
        assert (routed.dp_rank, routed.method) == (2, "external")
        for rank, code in ((3, grpc.StatusCode.INVALID_ARGUMENT), (-5, grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Route(
                    dispatch_pb2.RouteRequest(request=request("bad", "a", bootstrap_room=1, decode_dp_rank=rank))
                )
            assert err.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Route(dispatch_pb2.RouteRequest(request=request("noroom", "a")))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bootstrap_room" in err.value.details()


async def test_membership_follows_etcd_leases_and_survives_dispatcher_restart(etcd, prefix, start_service):
    flags = etcd_flags(etcd, prefix)
    dispatcher = start_service("dispatcher", *flags)
    s0, s1 = start_schedulers(start_service, flags, range(2), "--runner", "sim")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 2)
        s1.kill()  # kill -9: no deregistration, the lease (TTL 2 s) must expire
        workers = await wait_for_workers(stub, 1, timeout=15)
        assert workers[0].address == s0.address
        s2 = start_service("scheduler", *flags, "--dp-rank", "1", "--runner", "sim", name="sched-1b")
        await wait_for_workers(stub, 2)
    assert dispatcher.terminate() == 0
    restarted = start_service("dispatcher", *flags, name="dispatcher-2")
    channel, stub = dispatch_stub(restarted.address)
    async with channel:
        workers = await wait_for_workers(stub, 2)
        assert {w.address for w in workers} == {s0.address, s2.address}
        chunks = await generate(stub, request("after-restart", "hello"))
        assert chunks[-1].finish_reason == 1


async def test_redispatch_once_when_worker_dies_before_first_token(etcd, prefix, start_service):
    flags = etcd_flags(etcd, prefix, ttl=60)  # the dead worker stays registered
    dispatcher = start_service("dispatcher", *flags, "--load-balance-method", "round_robin")
    s0, s1 = start_schedulers(start_service, flags, range(2), "--runner", "sim")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 2)
        s0.kill()
        results = await asyncio.gather(*[generate(stub, request(f"re{i}", "hi")) for i in range(4)])
        assert all(chunks[-1].dp_rank == 1 and chunks[-1].finish_reason == 1 for chunks in results)
        s1.kill()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(stub, request("lost-1", "hi"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "lost-1" in err.value.details()


async def test_worker_death_after_first_token_gives_unavailable_with_request_id(etcd, prefix, start_service):
    flags = etcd_flags(etcd, prefix, ttl=60)
    dispatcher = start_service("dispatcher", *flags)
    (s0,) = start_schedulers(start_service, flags, range(1), "--runner", "sim")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 1)
        call = stub.Generate(dispatch_pb2.GenerateRequest(request=request("mid", "x" * 100, max_new_tokens=3000)))
        assert len((await call.read()).token_ids) == 1
        os.kill(s0.pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "mid" in err.value.details() and "after streaming started" in err.value.details()


async def test_watch_load_and_metrics(etcd, prefix, start_service):
    flags = etcd_flags(etcd, prefix)
    metrics_port = free_port()
    dispatcher = start_service(
        "dispatcher", *flags, "--metrics-port", str(metrics_port), "--load-balance-method", "total_tokens"
    )
    start_schedulers(start_service, flags, range(2), "--runner", "sim")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 2)
        await generate(stub, request("m1", "hello"))
        snapshot = await load_snapshot(stub)
        assert snapshot.method == "total_tokens" and len(snapshot.workers) == 2
        assert all(w.state == dispatch_pb2.MEMBER_STATE_LIVE for w in snapshot.workers)
        assert sum(w.dispatched_total for w in snapshot.workers) == 1

        async def reported():
            snap = await load_snapshot(stub)
            return all(0 <= w.report_age_ms < 2000 and w.reported.kv_tokens_capacity > 0 for w in snap.workers)

        await wait_until(reported, what="load reports from both workers")
        call = stub.WatchLoad(dispatch_pb2.WatchLoadRequest(interval_ms=1))  # raised to the 50 ms minimum
        stamps = []
        async for snap in call:
            stamps.append(snap.timestamp_ms)
            if len(stamps) == 4:
                break
        call.cancel()
        assert all(b - a >= 45 for a, b in itertools.pairwise(stamps))
    assert f"metrics on :{metrics_port}/metrics" in dispatcher.log_path.read_text()
    body = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
    assert "pdlb_dispatches_total{dp_rank=" in body and "pdlb_rank_tokens" in body


async def test_static_workers_without_etcd(start_service):
    port = free_port()
    dispatcher = start_service("dispatcher", "--workers", f"0@127.0.0.1:{port}")
    start_service("scheduler", "--runner", "sim", "--port", str(port), "--dispatchers", dispatcher.address)
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:

        async def adopted():  # the reporting scheduler replaced the static placeholder entry
            snap = await load_snapshot(stub)
            return len(snap.workers) == 1 and snap.workers[0].worker.worker_id.startswith("mixed-0-")

        await wait_until(adopted, what="the static worker to report")
        chunks = await generate(stub, request("static", "hi"))
        assert chunks[-1].finish_reason == 1 and chunks[0].dp_rank == 0


async def test_a_report_taking_over_a_static_entry_mid_stream_keeps_the_stream(start_service):
    # The scheduler's first report can arrive while a request already streams through the static
    # entry; the takeover changes the worker id at the same address and must not cut the stream.
    scheduler = start_service("scheduler", "--runner", "sim", "--sim-slowdown", "10")  # no reports of its own
    dispatcher = start_service("dispatcher", "--workers", f"0@{scheduler.address}")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel, grpc.aio.insecure_channel(dispatcher.address) as report_channel:
        call = stub.Generate(
            dispatch_pb2.GenerateRequest(request=request("takeover", "x", max_new_tokens=100)), timeout=60
        )
        first = await call.read()
        done = asyncio.Event()

        async def one_report_then_hold():  # the stream stays open, as a reporting worker's would
            yield report_from(scheduler.address, worker_id="mixed-0-report")
            await done.wait()

        reports = load_report_pb2_grpc.LoadReportStub(report_channel).Report(one_report_then_hold(), timeout=30)
        assert (await reports.read()).dispatcher_id  # the dispatcher took the report

        async def taken_over() -> bool:
            return [w.worker_id for w in await live_workers(stub)] == ["mixed-0-report"]

        await wait_until(taken_over, what="the report to take over the static entry")
        rest = await rest_of(call)
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 100 and rest[-1].finish_reason == 1
        done.set()
        reports.cancel()


async def test_sigterm_on_a_worker_lets_its_streams_finish_through_the_dispatcher(etcd, prefix, start_service):
    # A draining scheduler leaves etcd first, then finishes what it runs: the dispatcher must keep
    # forwarding those streams after the worker left its table (rolling restarts lose nothing).
    flags = etcd_flags(etcd, prefix, ttl=30)
    dispatcher = start_service("dispatcher", *flags)
    (worker,) = start_schedulers(start_service, flags, [0], "--runner", "sim", "--sim-slowdown", "10")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 1)
        call = stub.Generate(
            dispatch_pb2.GenerateRequest(request=request("drain", "x", max_new_tokens=150)), timeout=60
        )
        first = await call.read()
        worker.proc.terminate()  # SIGTERM: deregister, drain, exit
        await wait_for_workers(stub, 0)
        rest = await rest_of(call)
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 150 and rest[-1].finish_reason == 1
    assert await asyncio.to_thread(worker.proc.wait, 30) == 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def report_from(address: str, worker_id: str, rank: int = 0) -> load_report_pb2.ReportRequest:
    worker = common_pb2.WorkerInfo(worker_id=worker_id, role=common_pb2.ROLE_MIXED, dp_rank=rank, address=address)
    return load_report_pb2.ReportRequest(worker=worker, incarnation="test", load=common_pb2.WorkerLoad())


async def test_a_request_waits_for_a_worker_when_the_role_has_none(etcd, prefix, start_service):
    """While no worker of the role is live (a membership flap empties the table for a moment), a
    request waits for one to join, up to --worker-wait and never past its deadline; with
    --worker-wait 0, or once the wait is over, it fails UNAVAILABLE naming the role."""
    flags = etcd_flags(etcd, prefix)
    metrics_port = free_port()
    waiting = start_service(
        "dispatcher", *flags, "--worker-wait", "60", "--metrics-port", str(metrics_port), name="waits"
    )
    at_once = start_service("dispatcher", *flags, "--worker-wait", "0", name="at-once")
    channel, stub = dispatch_stub(waiting.address)
    async with channel, grpc.aio.insecure_channel(at_once.address) as other:
        impatient = dispatch_pb2_grpc.DispatchStub(other)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await impatient.Route(dispatch_pb2.RouteRequest(request=request("none-0", "hi")), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no live mixed worker" in err.value.details()

        # the deadline bounds the wait: it ends then, not after the 60 s --worker-wait
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Route(dispatch_pb2.RouteRequest(request=request("short", "hi")), timeout=1.0)
        assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        assert 0.9 <= time.monotonic() - began < 20  # it waited, and was not held past its deadline

        sent = [asyncio.create_task(generate(stub, request(f"early-{i}", "hi", max_new_tokens=3))) for i in range(3)]
        routed = asyncio.ensure_future(stub.Route(dispatch_pb2.RouteRequest(request=request("early-r", "hi"))))
        assert not await live_workers(stub)  # they were sent while the role had no worker
        start_schedulers(start_service, flags, [0], "--runner", "sim")
        for chunks in await asyncio.wait_for(asyncio.gather(*sent), 60):
            assert sum(len(c.token_ids) for c in chunks) == 3 and chunks[-1].finish_reason == 1
        assert (await asyncio.wait_for(routed, 60)).dp_rank == 0
    body = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
    assert "pdlb_worker_wait_seconds_count 5.0" in body  # the short one, 3 Generate, 1 Route


async def test_sigterm_fails_requests_waiting_for_a_worker_at_once(etcd, prefix, start_service):
    """Requests waiting for a worker to join (--worker-wait 60) when the dispatcher gets SIGTERM fail
    at once with UNAVAILABLE naming the shutdown: they used to wait out --worker-wait, holding the
    dispatcher's exit and their clients."""
    metrics_port = free_port()
    flags = [*etcd_flags(etcd, prefix), "--worker-wait", "60", "--metrics-port", str(metrics_port)]
    dispatcher = start_service("dispatcher", *flags)
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        sent = [asyncio.ensure_future(generate(stub, request(f"w{i}", "hi"), timeout=120)) for i in range(2)]

        async def both_waiting() -> bool:
            scrape = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
            return "pdlb_worker_waiting_requests 2.0" in scrape

        await wait_until(both_waiting, 30, "two requests waiting for a worker")
        dispatcher.signal_stop()
        done, _ = await asyncio.wait(sent, timeout=30)  # far below the 60 s --worker-wait
        assert len(done) == 2, "a waiting request was held past the shutdown"
        for task in done:
            err = task.exception()
            assert isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "no live mixed worker, and the dispatcher is shutting down" in err.details(), err.details()
    assert dispatcher.proc.wait(timeout=30) == 0


async def test_a_request_for_a_rank_that_just_left_waits_for_it_to_register_again(etcd, prefix, start_service):
    """A worker's key deleted while the worker is frozen (SIGSTOP): requests pinned to its rank wait
    (the rank left moments ago: a flap), and once the worker runs again it puts its key back by
    itself and they are served. A rank that never had a worker fails UNAVAILABLE at once."""
    flags = etcd_flags(etcd, prefix, ttl=30)
    dispatcher = start_service("dispatcher", *flags, "--worker-wait", "60")
    s0, _ = start_schedulers(start_service, flags, range(2), "--runner", "sim")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(stub, request("nowhere", "hi", decode_dp_rank=5), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "dp rank 5 has no live worker" in err.value.details()

        os.kill(s0.pid, signal.SIGSTOP)
        try:
            etcd.etcdctl("del", "--prefix", f"{prefix}/workers/mixed/")
            await wait_for_workers(stub, 1)  # rank 1 put its key back by itself; frozen rank 0 cannot
            pinned = [asyncio.create_task(generate(stub, request(f"p{i}", "hi", decode_dp_rank=0))) for i in range(3)]
            assert [w.dp_rank for w in await live_workers(stub)] == [1]  # sent while rank 0 had none
        finally:
            os.kill(s0.pid, signal.SIGCONT)
        for chunks in await asyncio.wait_for(asyncio.gather(*pinned), 60):
            assert chunks[-1].dp_rank == 0 and chunks[-1].finish_reason == 1
        assert sorted(w.dp_rank for w in await live_workers(stub)) == [0, 1]


async def test_sigterm_fails_a_request_running_past_the_grace_naming_it(etcd, prefix, start_service):
    """A forwarded request still running when the dispatcher's --shutdown-grace runs out fails
    UNAVAILABLE naming the grace and the shutdown: the client used to get gRPC's own 'Cancelling
    all calls' (CANCELLED), which says nothing a person can act on."""
    flags = etcd_flags(etcd, prefix)
    dispatcher = start_service("dispatcher", *flags, "--shutdown-grace", "1")
    start_schedulers(start_service, flags, [0], "--runner", "sim")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 1)
        # far more tokens than the sim worker makes in the 1 s grace
        call = stub.Generate(
            dispatch_pb2.GenerateRequest(request=request("long", "hi", max_new_tokens=4000)), timeout=120
        )
        first = await call.read()
        assert first.token_ids, "the request did not start"
        dispatcher.signal_stop()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() != grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "--shutdown-grace (1 s) ran out" in err.value.details(), err.value.details()
    assert dispatcher.proc.wait(timeout=30) == 0
