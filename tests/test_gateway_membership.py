"""The gateway when its dispatchers come and go: replicas per role killed under load, and membership
flaps (an etcd paused past the lease, every key deleted, every lease revoked) while requests stream. Real etcd,
real services on loopback, real HTTP and gRPC clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import grpc
import pytest

from pdlb.common.etcd_process import EtcdProcess
from pdlb.common.free_port import free_port
from pdlb.common.plurals import counted
from pdlb.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.helpers import greedy_gateway_stream, wait_until

SIM = ["--runner", "sim", "--report-interval-ms", "50"]


def pd_cluster(etcd: EtcdProcess, prefix: str, start_service, replicas: int, slowdown: str, ttl: str = "5"):
    """bootstrap, `replicas` dispatchers per role, 2 + 2 sim workers, a gateway; returns
    (gateway, its HTTP base URL, {role: [dispatcher processes]})."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--lease-ttl", ttl]
    start_service("bootstrap", *common)
    dispatchers: dict[str, list] = {"prefill": [], "decode": []}
    spawned = []
    for role in dispatchers:
        for r in range(replicas):
            dispatchers[role].append(
                start_service("dispatcher", *common, "--disaggregation-mode", role, name=f"disp-{role}-{r}", wait=False)
            )
            spawned.append(dispatchers[role][-1])
        for r in range(2):
            spawned.append(
                start_service(
                    "scheduler",
                    *common,
                    *SIM,
                    "--sim-slowdown",
                    slowdown,
                    "--disaggregation-mode",
                    role,
                    "--dp-rank",
                    str(r),
                    name=f"{role}-{r}",
                    wait=False,
                )
            )
    for proc in spawned:
        proc.wait_ready()
    http_port = free_port()
    gateway = start_service("gateway", *common, "--http-port", str(http_port))
    return gateway, f"http://127.0.0.1:{http_port}", dispatchers


async def dispatched(address: str) -> int:
    """Requests a dispatcher has sent to its workers so far (its WatchLoad snapshot)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = dispatch_pb2_grpc.DispatchStub(channel)
        async for snapshot in stub.WatchLoad(dispatch_pb2.WatchLoadRequest(interval_ms=50)):
            return sum(w.dispatched_total for w in snapshot.workers)
    return 0


async def all_workers_seen(dispatchers: dict[str, list]) -> None:
    async def ready() -> bool:
        for procs in dispatchers.values():
            for proc in procs:
                async with grpc.aio.insecure_channel(proc.address) as channel:
                    reply = await dispatch_pb2_grpc.DispatchStub(channel).ListWorkers(
                        dispatch_pb2.ListWorkersRequest(), timeout=5
                    )
                if len(reply.workers) < 2:
                    return False
        return True

    await wait_until(ready, timeout=60, what="every dispatcher replica to see its 2 workers")


async def gateway_tokens(stub, rid: str, prompt: list[int], started: asyncio.Event | None = None) -> list[int]:
    request = common_pb2.InferenceRequest(
        request_id=rid, input_ids=prompt, sampling=common_pb2.SamplingParams(max_new_tokens=30, ignore_eos=True)
    )
    tokens: list[int] = []
    async for chunk in stub.Generate(gateway_pb2.GatewayGenerateRequest(request=request), timeout=120):
        tokens += chunk.token_ids
        if tokens and started is not None:
            started.set()
    return tokens


@pytest.mark.parametrize("victim", ["decode", "prefill"])
async def test_replicas_share_the_load_and_a_killed_one_loses_no_request(etcd, prefix, start_service, victim):
    """2 dispatchers per role: requests spread over both replicas of each role; after kill -9 of one
    replica under load, every request (running on it, or arriving before its lease expires) completes
    with the uninterrupted greedy output."""
    gateway, _, dispatchers = pd_cluster(etcd, prefix, start_service, replicas=2, slowdown="4")
    await all_workers_seen(dispatchers)
    prompts = [[(37 * i + j) % 250 + 1 for j in range(16 + i)] for i in range(24)]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        reference = [await gateway_tokens(stub, f"ref-{i}", p) for i, p in enumerate(prompts[:8])]
        for role, procs in dispatchers.items():  # 8 requests: each replica of each role took some
            counts = [await dispatched(p.address) for p in procs]
            assert all(counts) and sum(counts) == 8, f"{role} replicas got {counts}"
        first = asyncio.Event()
        runs = []
        for i, prompt in enumerate(prompts):
            runs.append(asyncio.create_task(gateway_tokens(stub, f"run-{i}", prompt, first if i == 4 else None)))
            await asyncio.sleep(0.05)
            if i == 8:
                await asyncio.wait_for(first.wait(), 30)
                dispatchers[victim][0].kill()  # kill -9; its etcd key stays until the lease expires
        results = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 180)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[0]!r}"
    assert results[:8] == reference
    assert all(len(tokens) == 30 for tokens in results)


async def sse_tokens(session: aiohttp.ClientSession, base: str, i: int, started: asyncio.Event) -> tuple[int, str]:
    """One streamed completion; returns (completion tokens seen, the last data line)."""
    body = {"model": "tiny-random", "prompt": f"flap {i}", "max_tokens": 40, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    pieces, last = 0, ""
    async with session.post(f"{base}/v1/completions", json=body) as reply:
        assert reply.status == 200, await reply.text()
        async for raw in reply.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            last = line[6:]
            if last == "[DONE]":
                break
            event = json.loads(last)
            assert "error" not in event, event
            if event.get("usage"):
                pieces = event["usage"]["completion_tokens"]
            if event.get("choices"):
                started.set()
    return pieces, last


async def non_stream(session: aiohttp.ClientSession, base: str, i: int) -> dict:
    body = {"model": "tiny-random", "prompt": f"flap n{i}", "max_tokens": 40, "ignore_eos": True}
    async with session.post(f"{base}/v1/completions", json=body) as reply:
        assert reply.status == 200, f"request {i}: {await reply.text()}"
        return await reply.json()


def registered_keys(etcd: EtcdProcess, prefix: str) -> set[str]:
    """The keys every service of the cluster holds under the prefix."""
    return set(etcd.etcdctl("get", "--prefix", f"{prefix}/", "--keys-only").split())


@pytest.mark.parametrize("flap", ["pause-etcd", "delete-keys", "revoke-leases"])
async def test_membership_flap_does_not_cut_running_requests(prefix, start_service, tmp_path, flap):
    """etcd paused (SIGSTOP) past the lease TTL, so every lease expires when it resumes; every key
    of the cluster deleted (`etcdctl del`) while the services live; or every lease revoked: running
    HTTP requests, streamed or not, all finish with every token and [DONE]; each service registers
    again (dispatchers, workers, bootstrap, gateway), and requests sent during and right after the
    flap, even while the dispatchers' worker tables are empty, are served."""
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd"))  # its own: it is paused
    etcd.start()
    try:
        _, base, dispatchers = pd_cluster(etcd, prefix, start_service, replicas=1, slowdown="6", ttl="2")
        await all_workers_seen(dispatchers)
        keys = registered_keys(etcd, prefix)
        assert len(keys) == 8, keys  # bootstrap, 2 dispatchers, 4 workers, the gateway
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            started = asyncio.Event()
            streams = [asyncio.create_task(sse_tokens(session, base, i, started)) for i in range(8)]
            plain = [asyncio.create_task(non_stream(session, base, i)) for i in range(4)]
            await asyncio.wait_for(started.wait(), 30)
            if flap == "pause-etcd":
                os.kill(etcd.proc.pid, signal.SIGSTOP)
                await asyncio.sleep(3.5)  # the flap itself: longer than the 2 s lease, nothing to await
                os.kill(etcd.proc.pid, signal.SIGCONT)
            elif flap == "delete-keys":
                etcd.etcdctl("del", "--prefix", f"{prefix}/")
            else:
                for lease in etcd.etcdctl("lease", "list").splitlines()[1:]:  # "found N leases", then ids
                    etcd.etcdctl("lease", "revoke", lease.strip())
            # requests sent as the keys go and come back, one every 20 ms for about a second: each
            # waits for the dispatchers (gateway) or their workers (dispatcher) to register again
            for i in range(50):
                plain.append(asyncio.create_task(non_stream(session, base, 100 + i)))
                await asyncio.sleep(0.02)
            await wait_until(lambda: registered_keys(etcd, prefix) == keys, timeout=30, what="every key back")
            streams += [asyncio.create_task(sse_tokens(session, base, 200 + i, asyncio.Event())) for i in range(4)]
            results = await asyncio.wait_for(asyncio.gather(*streams), 120)
            replies = await asyncio.wait_for(asyncio.gather(*plain), 120)
        assert results == [(40, "[DONE]")] * len(streams)
        assert [r["usage"]["completion_tokens"] for r in replies] == [40] * len(replies)
        assert all(r["choices"][0]["text"] for r in replies)
    finally:
        if etcd.proc is not None:
            os.kill(etcd.proc.pid, signal.SIGCONT)
        etcd.close()


def one_dispatcher_per_role(etcd: EtcdProcess, prefix: str, start_service, mode: str, *gateway_flags: str):
    """One dispatcher per role (mixed, or prefill + decode with a bootstrap), 2 slow sim workers per
    role, a gateway; the dispatcher of the last role listens on a fixed port, so it can be started
    again there. Returns (gateway, {role: dispatcher}, that dispatcher's flags)."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    roles = ["mixed"] if mode == "mixed" else ["prefill", "decode"]
    if mode == "pd":
        start_service("bootstrap", *common)
    dispatchers, flags = {}, []
    for role in roles:
        # a long lease: its key outlives the kill, as in a restart within the TTL
        flags = [*common, "--lease-ttl", "30", "--port", str(free_port())]
        if role != "mixed":
            flags += ["--disaggregation-mode", role]
        dispatchers[role] = start_service("dispatcher", *flags, name=f"disp-{role}")
        role_flags = [*common, *SIM, "--sim-slowdown", "8"] + (["--disaggregation-mode", role] if mode == "pd" else [])
        for r in range(2):
            start_service("scheduler", *role_flags, "--dp-rank", str(r), name=f"{role}-{r}")
    gateway = start_service("gateway", *common, *gateway_flags)
    return gateway, dispatchers, flags


@pytest.mark.parametrize("mode", ["mixed", "pd"])
async def test_the_only_dispatcher_restarting_loses_no_stream(etcd, prefix, start_service, mode):
    """One dispatcher per role, 4 streams in flight: kill -9 of the (decode) dispatcher, and it is
    started again on its port. The gateway waits for it to come back (its retries are not spent on
    refused connections) and resumes every stream: each equals the uninterrupted greedy output token
    for token."""
    gateway, dispatchers, flags = one_dispatcher_per_role(etcd, prefix, start_service, mode)
    await all_workers_seen({role: [d] for role, d in dispatchers.items()})
    victim = dispatchers["mixed" if mode == "mixed" else "decode"]
    prompts = [[(41 * i + j) % 250 + 1 for j in range(12 + i)] for i in range(4)]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        reference = [(await greedy_gateway_stream(stub, f"ref-{i}", p))[0] for i, p in enumerate(prompts)]
        started = [asyncio.Event() for _ in prompts]
        runs = [
            asyncio.create_task(greedy_gateway_stream(stub, f"run-{i}", p, started[i])) for i, p in enumerate(prompts)
        ]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 30)
        victim.kill()  # kill -9 with 4 streams mid-way
        again = await asyncio.to_thread(start_service, "dispatcher", *flags, name="disp-again")
        assert again.address == victim.address
        results = await asyncio.wait_for(asyncio.gather(*runs), 120)
    assert [tokens for tokens, _ in results] == reference
    assert all(retries for _, retries in results), "a stream ended before the kill: nothing was tested"


async def test_no_dispatcher_coming_back_fails_after_the_bound_naming_it(etcd, prefix, start_service):
    """The only dispatcher is killed and stays down: a stream in flight, and a request sent after, fail
    once --dispatcher-wait has passed (not within moments, not hanging), UNAVAILABLE / HTTP 503 with a
    message in pdlb's terms (no dispatcher reachable), not gRPC's connection error."""
    http_port = free_port()
    gateway, dispatchers, _ = one_dispatcher_per_role(
        etcd, prefix, start_service, "mixed", "--dispatcher-wait", "1.5", "--http-port", str(http_port)
    )
    dispatcher = dispatchers["mixed"]
    await all_workers_seen({"mixed": [dispatcher]})
    expected = f"no mixed dispatcher reachable for 1.5 s ({dispatcher.address} not accepting connections"
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = asyncio.Event()
        run = asyncio.create_task(greedy_gateway_stream(stub, "cut", [5, 6, 7], started))
        await asyncio.wait_for(started.wait(), 30)
        dispatcher.kill()
        killed = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(run, 30)
        waited = asyncio.get_running_loop().time() - killed
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert expected in caught.value.details() and "request cut:" in caught.value.details(), caught.value.details()
    assert "Connection refused" not in caught.value.details()
    assert waited >= 1.5, f"failed after {waited:.2f}s: it did not wait for the dispatcher"
    body = {"model": "tiny-random", "prompt": "after", "max_tokens": 8}
    async with aiohttp.ClientSession() as session:
        started_at = asyncio.get_running_loop().time()
        async with session.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body) as reply:
            assert reply.status == 503, await reply.text()
            error = (await reply.json())["error"]
        assert asyncio.get_running_loop().time() - started_at >= 1.5
    assert expected in error["message"] and "0 tokens streamed before" in error["message"], error


async def test_a_killed_dispatcher_deregistered_and_not_back_fails_after_the_bound(etcd, prefix, start_service):
    """As `pdlb up` does with a dead child, the killed dispatcher's registration is deleted at once, and
    no dispatcher comes back: the stream fails once --dispatcher-wait has passed, naming that none is
    registered."""
    gateway, dispatchers, _ = one_dispatcher_per_role(etcd, prefix, start_service, "mixed", "--dispatcher-wait", "1.5")
    await all_workers_seen({"mixed": [dispatchers["mixed"]]})
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        started = asyncio.Event()
        run = asyncio.create_task(greedy_gateway_stream(gateway_pb2_grpc.GatewayStub(channel), "gone", [8, 9], started))
        await asyncio.wait_for(started.wait(), 30)
        # the time before the kill: the gateway may see the stream break while kill() reaps the process
        killed = asyncio.get_running_loop().time()
        dispatchers["mixed"].kill()
        await asyncio.to_thread(etcd.etcdctl, "del", "--prefix", f"{prefix}/dispatchers/")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(run, 30)
        waited = asyncio.get_running_loop().time() - killed
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    details = caught.value.details()
    assert "no mixed dispatcher reachable for 1.5 s (no mixed dispatcher registered;" in details, details
    assert waited >= 1.5, f"failed after {waited:.2f}s: it did not wait for a dispatcher"


async def test_a_dispatcher_dying_after_every_restart_fails_the_stream_bounded_and_named(etcd, prefix, start_service):
    """The only dispatcher dies again after every restart: the stream is resumed on each comeback
    while its retries last (2 moves), and the next death fails it at once, UNAVAILABLE, saying the
    dispatcher went away that often (not gRPC's bare connection error), never hanging."""
    # a restart can take seconds on a loaded machine, and past the wait the stream fails for that
    # reason instead; a gateway that waited again after its retries were spent still shows (< 5 s)
    wait = ["--dispatcher-wait", "30"]
    gateway, dispatchers, flags = one_dispatcher_per_role(etcd, prefix, start_service, "mixed", *wait)
    victim = dispatchers["mixed"]
    await all_workers_seen({"mixed": [victim]})
    seen = {"retries": -1, "tokens": 0}
    progressed = asyncio.Event()
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        request = common_pb2.InferenceRequest(
            request_id="flaky",
            input_ids=[3, 4, 5],
            sampling=common_pb2.SamplingParams(max_new_tokens=3000, ignore_eos=True, temperature=0.0),
        )

        async def stream() -> None:
            call = gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GatewayGenerateRequest(request=request))
            async for chunk in call:
                seen["tokens"] += len(chunk.token_ids)
                if chunk.retries > seen["retries"]:
                    seen["retries"] = chunk.retries
                    progressed.set()

        run = asyncio.create_task(stream())
        for death in range(3):
            # it runs (again) on this incarnation; a stream that ended instead says why
            ran = asyncio.create_task(progressed.wait())
            await asyncio.wait([ran, run], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            ran.cancel()
            if run.done():
                run.result()  # raises the stream's error
                pytest.fail(f"the stream ended before death {death}: {seen}")
            assert progressed.is_set(), f"no progress within 60 s before death {death}: {seen}"
            progressed.clear()
            victim.kill()
            killed = asyncio.get_running_loop().time()
            # started again on its port (as `pdlb up` does): the stream resumes there, until the last
            victim = await asyncio.to_thread(start_service, "dispatcher", *flags, name=f"disp-again-{death}")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(run, 60)
        failed_after = asyncio.get_running_loop().time() - killed
    details = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    said = f"request flaky: failed again through mixed dispatcher {victim.address} ("
    assert details.startswith(said) and "not retried further" in details and "retries)" in details, details
    assert f"{counted(seen['tokens'], 'token')} streamed before" in details, (details, seen)
    assert failed_after < 5, f"failed {failed_after:.1f} s after the last death: it waited again"
