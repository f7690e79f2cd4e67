"""The scheduler as a process: weights from safetensors, load reports, abort, SIGTERM and kill -9."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from safetensors.torch import save_file

from pdlb.common.membership import connect_client
from pdlb.common.processes import ServiceFailed
from pdlb.engines.torch.model import ModelConfig, TinyTransformer
from pdlb.v1 import dispatch_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.helpers import dispatch_stub, load_snapshot, request, rest_of, wait_for_workers, wait_until

SMALL = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "4", "--vocab-size", "300"]


async def tokens_of(stub, req) -> list[int]:
    call = stub.Generate(scheduler_pb2.SchedulerGenerateRequest(request=req), timeout=60)
    return [t async for chunk in call for t in chunk.token_ids]


async def test_weights_from_safetensors_change_the_output(start_service, tmp_path):
    config = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, seed=123)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in TinyTransformer.random(config).state_dict().items()}, str(path))
    seeded = start_service("scheduler", *SMALL, "--seed", "123", name="seeded")
    loaded = start_service("scheduler", *SMALL, "--seed", "0", "--model-path", str(path), name="loaded")
    plain = start_service("scheduler", *SMALL, "--seed", "0", name="plain")
    outs = []
    for proc in (seeded, loaded, plain):
        async with grpc.aio.insecure_channel(proc.address) as channel:
            outs.append(
                await tokens_of(scheduler_pb2_grpc.SchedulerStub(channel), request("w", "weights", max_new_tokens=10))
            )
    assert outs[0] == outs[1] != outs[2]


async def test_wrong_weights_file_fails_at_start(start_service, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"embed.weight": torch.zeros(3, 3)}, str(path))
    # Reported at once with the service's own error line, not after a start timeout.
    with pytest.raises(ServiceFailed, match=r"bad-weights exited with status 1: .*loading state_dict"):
        start_service("scheduler", *SMALL, "--model-path", str(path), name="bad-weights")


async def test_reports_reflect_the_queue_at_the_dispatcher(etcd, prefix, start_service):
    flags = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *flags, "--disaggregation-mode", "null")
    # Slowed down so the two running requests (3000 tokens each) outlast the checks below.
    start_service(
        "scheduler", *flags, "--runner", "sim", "--sim-slowdown", "4", "--max-running-requests", "2", name="sched"
    )
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 1)
        calls = [
            stub.Generate(dispatch_pb2.GenerateRequest(request=request(f"q{i}", "x" * 50, max_new_tokens=3000)))
            for i in range(5)
        ]
        # Wait for the first tokens of whichever two got the batch slots (their prompts are then
        # computed and cached): forwards reach the scheduler in any order, not the calls' order.
        first_tokens = [asyncio.ensure_future(call.read()) for call in calls]
        started = asyncio.as_completed(first_tokens, timeout=30)
        for _ in range(2):
            await next(started)
        seen: list[tuple[int, int, int]] = []

        async def queued():
            row = (await load_snapshot(stub)).workers[0]
            seen.append((row.reported.running_requests, row.reported.waiting_requests, row.inflight_requests))
            return seen[-1] == (2, 3, 0)

        try:
            await wait_until(queued, what="2 running, 3 waiting and nothing unacknowledged")
        except AssertionError as err:
            raise AssertionError(f"{err}; (running, waiting, in flight) seen: {sorted(set(seen))}") from None
        for call in calls:
            call.cancel()
        await asyncio.gather(*first_tokens, return_exceptions=True)

        async def drained():
            row = (await load_snapshot(stub)).workers[0]
            # What stays is the prefix cache: the shared 50-token prompt's 3 full blocks of 16.
            return (
                row.reported.running_requests + row.reported.waiting_requests == 0
                and row.reported.kv_tokens_used == row.reported.kv_tokens_evictable == 48
            )

        await wait_until(drained, what="cancelled requests to free their batch slots and KV")


async def test_abort_rpc(start_service):
    proc = start_service("scheduler", "--runner", "sim")
    async with grpc.aio.insecure_channel(proc.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        call = stub.Generate(scheduler_pb2.SchedulerGenerateRequest(request=request("ab", "x", max_new_tokens=3000)))
        await call.read()
        await stub.Abort(scheduler_pb2.AbortRequest(request_id="ab"), timeout=5)
        last = (await rest_of(call))[-1]
        assert last.finish_reason == 3  # FINISH_REASON_ABORT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Abort(scheduler_pb2.AbortRequest(request_id="ab"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_sigterm_deregisters_first_then_finishes_running_requests(etcd, prefix, start_service):
    flags = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", "30"]
    proc = start_service("scheduler", *flags, "--runner", "sim", "--shutdown-grace", "20")
    client = connect_client(etcd.endpoint)
    workers_key = f"{prefix}/workers/".encode()
    assert len(list(await client.get_prefix(workers_key))) == 1
    async with grpc.aio.insecure_channel(proc.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        call = stub.Generate(scheduler_pb2.SchedulerGenerateRequest(request=request("drain", "x", max_new_tokens=200)))
        await call.read()
        proc.proc.terminate()  # SIGTERM
        rest = await rest_of(call)
        tokens = 1 + sum(len(chunk.token_ids) for chunk in rest)
        assert (tokens, rest[-1].finish_reason) == (200, 1)  # the running request completed during the drain
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert list(await client.get_prefix(workers_key)) == []
    await client.close()


async def test_kill_9_removes_the_worker_after_the_lease_ttl(etcd, prefix, start_service):
    flags = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", "2"]
    proc = start_service("scheduler", *flags, "--runner", "sim")
    client = connect_client(etcd.endpoint)
    key = f"{prefix}/workers/".encode()
    assert len(list(await client.get_prefix(key))) == 1
    proc.kill()

    async def gone():
        return list(await client.get_prefix(key)) == []

    await wait_until(gone, timeout=10, what="the lease to expire")
    await client.close()


async def test_prefix_cache_hits_show_in_load_and_metrics(start_service):
    import urllib.request

    from pdlb.common.free_port import free_port

    metrics_port = free_port()
    proc = start_service("scheduler", *SMALL, "--page-size", "8", "--metrics-port", str(metrics_port), name="cached")
    system = "You are a helpful assistant. " * 3  # 87 bytes; with "hello", 11 full blocks of 8 tokens
    async with grpc.aio.insecure_channel(proc.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        first = await tokens_of(stub, request("c1", system + "hello", max_new_tokens=6))
        second = await tokens_of(stub, request("c2", system + "hello", max_new_tokens=6))
        assert first == second
        call = stub.Generate(scheduler_pb2.SchedulerGenerateRequest(request=request("c3", system + "hello")))
        assert {chunk.cached_tokens async for chunk in call} == {88}  # every response says what was cached
        load = (await stub.GetLoad(scheduler_pb2.GetLoadRequest(), timeout=5)).load
    assert load.prompt_tokens_total == 3 * len(system + "hello")
    assert load.cache_hit_tokens == 2 * 88  # 11 blocks of the 92-token prompt: all but the last token's block
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read())
    text = body.decode()
    assert "pdlb_scheduler_cache_hit_tokens_total 176.0" in text
    assert "pdlb_scheduler_cache_tokens 88.0" in text
