"""The gateway's HTTP API and the services' request intake against real services (etcd, dispatchers,
sim schedulers, the gateway, on loopback): tokenising off the event loop, input limits, error
bodies, timeouts."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from pdlb.client import PDLBClient
from pdlb.common.free_port import free_port
from pdlb.common.tokenizer import ByteTokenizer
from pdlb.v1 import common_pb2, dispatch_pb2, gateway_pb2, gateway_pb2_grpc
from tests.helpers import (
    dispatch_stub,
    generate,
    load_snapshot,
    request,
    rest_of,
    wait_for_workers,
    wait_until,
)

SMOLLM2 = "smollm2-135m-instruct"
WORDS = ["hello", "world", "the", "cat", "Paris", "quantum", "zebra", "12345", "naïve", "🎉"]


def long_text(chars: int, seed: int) -> str:
    """Varied words (so the BPE has real work), about `chars` characters."""
    rng = random.Random(seed)
    words = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


def smollm2_cluster(etcd, prefix, start_service, **gateway_flags: str):
    """A mixed dispatcher and gateway that tokenise with SmolLM2's BPE, over one sim worker that
    claims the model (the sim computes nothing, so only the tokenising costs CPU)."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    model = ["--model", SMOLLM2]
    dispatcher = start_service("dispatcher", *common, *model, name="disp")
    start_service("scheduler", *common, "--runner", "sim", "--served-model-name", SMOLLM2, name="sim-0")
    http_port = free_port()
    flags = [flag for name, value in gateway_flags.items() for flag in (f"--{name.replace('_', '-')}", value)]
    start_service("gateway", *common, *model, "--http-port", str(http_port), *flags)
    return dispatcher, f"http://127.0.0.1:{http_port}"


async def probe_while(busy: asyncio.Future, probe) -> list[float]:
    """Latencies of `probe()` calls made back to back until `busy` is done."""
    latencies = []
    while not busy.done():
        started = time.perf_counter()
        await probe()
        latencies.append(time.perf_counter() - started)
    return latencies


async def test_route_stays_responsive_while_huge_prompts_are_tokenised(etcd, prefix, start_service):
    dispatcher, _ = smollm2_cluster(etcd, prefix, start_service)
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 1)

        async def route(rid: str, text: str):
            return await stub.Route(dispatch_pb2.RouteRequest(request=request(rid, text)), timeout=120)

        await route("warm", "hello")
        # Over the token limit (131072) but under the characters limit: tokenised, then refused.
        huge = [long_text(1_500_000, seed) for seed in range(3)]
        started = time.perf_counter()
        busy = asyncio.gather(*(route(f"huge-{i}", text) for i, text in enumerate(huge)), return_exceptions=True)
        await asyncio.sleep(0)  # let the huge calls go out first

        # Over the characters limit (16 per token = 2097152): refused unread, while the others run.
        over_started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await route("over", "x" * 2_200_000)
        over_s = time.perf_counter() - over_started
        assert over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "2200000 characters exceeds the limit of 2097152 characters (--max-prompt-chars)" in over.value.details()

        latencies = await probe_while(busy, lambda: route("probe", "hello"))
        busy_s = time.perf_counter() - started
        results = busy.result()
        for result in results:
            assert isinstance(result, grpc.aio.AioRpcError), result
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the limit 131072" in result.details()
        # The loop kept serving: every probe took a small part of the time the tokenising took.
        assert busy_s > 1.0, f"the huge prompts took only {busy_s:.2f}s: too little to measure a stall"
        assert len(latencies) >= 5 and max(latencies) < busy_s / 4, (max(latencies), busy_s)
        assert over_s < busy_s / 4, (over_s, busy_s)


async def test_gateway_health_answers_while_huge_prompts_are_tokenised(etcd, prefix, start_service):
    dispatcher, base = smollm2_cluster(etcd, prefix, start_service, max_body_bytes=str(32 << 20))
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 1)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def complete(prompt: str) -> tuple[int, dict]:
            body = {"model": SMOLLM2, "prompt": prompt, "max_tokens": 1}
            async with http.post(f"{base}/v1/completions", json=body) as reply:
                return reply.status, await reply.json()

        async def health() -> None:
            async with http.get(f"{base}/health") as reply:
                await reply.read()

        await wait_until(lambda: complete("hi"), timeout=30, what="a first completion")
        # Under the characters limit (16 x 32768 = 524288), over the token limit (the worker's 4095):
        # tokenised, then 400.
        huge = [long_text(500_000, seed) for seed in range(4)]
        started = time.perf_counter()
        busy = asyncio.gather(*(complete(text) for text in huge))
        await asyncio.sleep(0)
        status, over = await complete("y" * 600_000)
        assert status == 400 and over["error"]["param"] == "prompt"
        assert "600000 characters exceeds the limit of 524288 characters" in over["error"]["message"]
        latencies = await probe_while(busy, health)
        busy_s = time.perf_counter() - started
        for status, reply in busy.result():
            assert status == 400 and "exceeds the limit 4095" in reply["error"]["message"], reply
        assert busy_s > 1.0, f"the huge prompts took only {busy_s:.2f}s: too little to measure a stall"
        assert len(latencies) >= 5 and max(latencies) < busy_s / 4, (max(latencies), busy_s)


MODEL = "tiny-random"


def toy_cluster(etcd, prefix, start_service, ranks=(0, 1), **gateway_flags: str):
    """A mixed dispatcher over sim workers of the toy model at `ranks`, and a gateway."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *common, name="disp")
    for rank in ranks:
        start_service("scheduler", *common, "--runner", "sim", "--dp-rank", str(rank), name=f"sim-{rank}")
    http_port = free_port()
    flags = [flag for name, value in gateway_flags.items() for flag in (f"--{name.replace('_', '-')}", value)]
    gateway = start_service("gateway", *common, "--http-port", str(http_port), *flags)
    return dispatcher, f"http://127.0.0.1:{http_port}", gateway


async def ready_workers(dispatcher, count: int) -> None:
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, count)


async def test_bodies_that_break_parsers_get_openai_errors_never_plain_text(etcd, prefix, start_service):
    dispatcher, base, _gateway = toy_cluster(etcd, prefix, start_service)
    await ready_workers(dispatcher, 2)
    nested = ("[" * 1000 + "]" * 1000).encode()
    deep_object = json.dumps({"model": MODEL, "prompt": "x"})[:-1].encode() + b', "metadata": ' + nested + b"}"
    cases = [
        ("/v1/completions", nested, None, "nests too deeply"),
        ("/v1/chat/completions", deep_object, None, "nests too deeply"),
        ("/v1/completions", b'{"model": "tiny-random", "prompt": "a\\ud800b"}', "prompt", "lone UTF-16 surrogate"),
        (
            "/v1/chat/completions",
            b'{"model": "tiny-random", "messages": [{"role": "user", "content": "\\udfffx"}]}',
            "messages[0].content",
            "lone UTF-16 surrogate",
        ),
        ("/v1/completions", b'{"model": "tiny-random", "prompt": "x", "stop": ["\\ud83d"]}', "stop[0]", "surrogate"),
        ("/v1/completions", b"\xff\xfe{}", None, "not valid JSON"),
    ]
    async with aiohttp.ClientSession() as http:
        for path, body, param, words in cases:
            async with http.post(f"{base}{path}", data=body, headers={"Content-Type": "application/json"}) as reply:
                assert reply.status == 400, (body[:60], reply.status, await reply.text())
                assert reply.content_type == "application/json"
                error = (await reply.json())["error"]
            assert words in error["message"] and error["type"] == "invalid_request_error", error
            assert error["param"] == param, error
        async with http.post(f"{base}/v1/completions", json={"model": "nosuch", "prompt": "x"}) as reply:
            assert reply.status == 404 and (await reply.json())["error"]["code"] == "model_not_found"
        async with http.post(f"{base}/nowhere", json={"text": "x"}) as reply:  # a path, not a model
            error = (await reply.json())["error"]
            assert reply.status == 404 and error["code"] == "not_found", error
        async with http.get(f"{base}/health") as reply:
            assert reply.status == 200


async def test_slow_headers_and_bodies_are_dropped(etcd, prefix, start_service):
    dispatcher, base, _gateway = toy_cluster(
        etcd, prefix, start_service, http_header_timeout="2", http_body_timeout="2", max_concurrent_streams="4"
    )
    await ready_workers(dispatcher, 2)
    port = int(base.rsplit(":", 1)[1])
    request_head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    async def slowloris(index: int) -> float:
        """Send headers at 1 byte per 0.25 s; seconds until the server closes the connection."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        try:
            for byte in request_head + b"X-Pad: " + b"a" * 200:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), 0.25) == b"":
                        break
                except TimeoutError:
                    continue
        except ConnectionError:
            pass
        finally:
            writer.close()
        return time.monotonic() - started

    async def slow_body() -> tuple[bytes, float, float]:
        """Send a body at 1 byte per 0.5 s: the answer, seconds until it came, and until the close."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(request_head + b"Content-Length: 100\r\n\r\n{")
        await writer.drain()
        answer, answered_s = b"", 0.0
        for _ in range(60):
            try:
                writer.write(b" ")
                await writer.drain()
                chunk = await asyncio.wait_for(reader.read(4096), 0.5)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            answer += chunk
            answered_s = answered_s or time.monotonic() - started
        writer.close()
        return answer, answered_s, time.monotonic() - started

    # More slow connections than the gateway takes requests: none of them holds anything.
    slow = asyncio.gather(*(slowloris(i) for i in range(20)))
    body_answer, answered_s, closed_s = await slow_body()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "ignore_eos": True}
        ) as reply:
            assert reply.status == 200, await reply.text()
    held = await slow
    assert max(held) < 8, held  # dropped at the 2 s header timeout, not held for the 50 s they would take
    head, _, payload = body_answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), body_answer[:200]
    assert "--http-body-timeout" in json.loads(payload)["error"]["message"]
    assert answered_s < 8, answered_s
    assert closed_s < 20, closed_s  # aiohttp lingers up to 10 s reading the rest, then closes


async def test_a_pinned_rank_without_a_worker_fails_at_once_naming_only_the_clients_id(etcd, prefix, start_service):
    dispatcher, base, _gateway = toy_cluster(etcd, prefix, start_service, ranks=(0, 2))  # rank 1 has no worker
    await ready_workers(dispatcher, 2)
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        async with http.post(f"{base}/v1/completions", json=body, headers={"X-data-parallel-rank": "1"}) as reply:
            assert reply.status == 503, await reply.text()
            error = (await reply.json())["error"]
        assert "rank 1" in error["message"] and "~r" not in error["message"], error
        assert "(live ranks: 0, 2)" in error["message"], error  # what the client may pin instead
        assert "retry" not in error["message"], error  # pins are not retried on other ranks
        async with http.post(f"{base}/v1/completions", json=body, headers={"X-data-parallel-rank": "2"}) as reply:
            assert reply.status == 200 and (await reply.json())["dp_rank"] == 2


async def test_pd_reports_the_prefill_cache_hit_once(etcd, prefix, start_service):
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    start_service("bootstrap", *common)
    dispatchers = {}
    for role in ("prefill", "decode"):
        dispatchers[role] = start_service("dispatcher", *common, "--disaggregation-mode", role, name=f"d-{role}")
        for rank in (0,):
            start_service(
                "scheduler", *common, "--runner", "sim", "--disaggregation-mode", role, "--dp-rank", str(rank),
                name=f"{role}-{rank}",
            )  # fmt: skip
    http_port = free_port()
    gateway = start_service("gateway", *common, "--http-port", str(http_port))
    base = f"http://127.0.0.1:{http_port}"
    for process in dispatchers.values():
        await ready_workers(process, 1)
    prompt = "The same long prefix, shared by every request of this test. " * 8
    async with aiohttp.ClientSession() as http:
        usages = []
        for _ in range(2):  # the second finds the first's prompt in prefill rank 0's prefix cache
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "ignore_eos": True, "prefill_dp_rank": 0}
            async with http.post(f"{base}/v1/completions", json=body) as reply:
                done = await reply.json()
                assert reply.status == 200, done
            assert done["prefill_dp_rank"] == 0
            usages.append(done["usage"])
        assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
        hit = usages[1]["prompt_tokens_details"]["cached_tokens"]
        assert 0 < hit < usages[1]["prompt_tokens"], usages

    # gRPC: the usage comes once, on the last chunk; every chunk names the prefill rank
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        req = request("grpc-1", prompt, max_new_tokens=4, prefill_dp_rank=0)
        req.sampling.logprobs = 1
        chunks = [c async for c in stub.Generate(gateway_pb2.GatewayGenerateRequest(request=req), timeout=30)]
    assert len(chunks) >= 2 and all(c.prefill_dp_rank == 0 for c in chunks), chunks
    assert [c.cached_tokens for c in chunks[:-1]] == [0] * (len(chunks) - 1)
    assert [c.prompt_tokens for c in chunks[:-1]] == [0] * (len(chunks) - 1)
    assert chunks[-1].cached_tokens == hit and chunks[-1].prompt_tokens == usages[1]["prompt_tokens"]
    # logprobs: one per token, the first one (drawn by the prefill worker) included
    tokens = [t for c in chunks for t in c.token_ids]
    assert [e.token_id for c in chunks for e in c.logprobs] == tokens and len(tokens) == 4

    # the command line's client, straight to the dispatchers, reports the prefill's hit as well
    client = PDLBClient(prefill=dispatchers["prefill"].address, decode=dispatchers["decode"].address)
    try:
        req = request("cli-1", prompt, max_new_tokens=3, prefill_dp_rank=0)
        req.sampling.logprobs = 0
        chunks = [c async for c in client.generate(req, timeout=30)]
    finally:
        await client.close()
    assert chunks[-1].cached_tokens == hit, chunks[-1]
    assert [e.token_id for c in chunks for e in c.logprobs] == [t for c in chunks for t in c.token_ids]


async def test_a_stop_token_ends_the_text_unseen_and_counts_as_generated(etcd, prefix, start_service):
    dispatcher, base, gateway = toy_cluster(etcd, prefix, start_service)
    await ready_workers(dispatcher, 2)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def run(rid: str, **sampling) -> list[gateway_pb2.GatewayGenerateResponse]:
            req = request(rid, "Once upon a time", max_new_tokens=12)
            req.sampling.MergeFrom(common_pb2.SamplingParams(**sampling))
            call = stub.Generate(gateway_pb2.GatewayGenerateRequest(request=req), timeout=30)
            return [chunk async for chunk in call]

        free = [t for c in await run("free") for t in c.token_ids]
        cut = next(i for i in range(1, len(free)) if free[i] not in free[:i] and free[i] < 256)
        chunks = await run("stopped", stop_token_ids=[free[cut]])
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == free[: cut + 1]  # the stop token is generated and listed, as vLLM does
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert "".join(c.text for c in chunks) == ByteTokenizer().decode(free[:cut])  # ...but never shown

    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, "temperature": 0}
        for stream in (False, True):
            body_stop = {**body, "stop_token_ids": [free[cut]], "stream": stream}
            if stream:
                body_stop["stream_options"] = {"include_usage": True}
            async with http.post(f"{base}/v1/completions", json=body_stop) as reply:
                assert reply.status == 200
                if stream:
                    events = [json.loads(line[6:]) for line in (await reply.text()).splitlines()
                              if line.startswith("data: {")]  # fmt: skip
                    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
                    usage = events[-1]["usage"]
                    finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
                else:
                    done = await reply.json()
                    text, usage, finish = done["choices"][0]["text"], done["usage"], done["choices"][0]["finish_reason"]
            assert text == ByteTokenizer().decode(free[:cut]) and finish == "stop"
            assert usage["completion_tokens"] == cut + 1


async def test_health_says_which_role_cannot_serve(etcd, prefix, start_service):
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    bootstrap = start_service("bootstrap", *common)
    dispatchers, workers = {}, {}
    for role in ("prefill", "decode"):
        dispatchers[role] = start_service("dispatcher", *common, "--disaggregation-mode", role, name=f"d-{role}")
        workers[role] = start_service(
            "scheduler", *common, "--runner", "sim", "--disaggregation-mode", role, name=f"{role}-0"
        )
    http_port = free_port()
    start_service("gateway", *common, "--http-port", str(http_port))
    base = f"http://127.0.0.1:{http_port}"
    async with aiohttp.ClientSession() as http:

        async def health() -> tuple[int, dict]:
            async with http.get(f"{base}/health") as reply:
                return reply.status, await reply.json()

        async def says(status: int, words: str = "") -> bool:
            code, body = await health()
            return code == status and (not words or any(words in m for m in body["missing"]))

        await wait_until(lambda: says(200), timeout=30, what="a ready PD cluster")
        _, body = await health()
        assert body["mode"] == "pd" and body["roles"]["decode"]["live_ranks"] == [0] and body["bootstrap"]["serving"]

        bootstrap.kill()  # its etcd key outlives it until the lease expires; the check sees it at once
        await wait_until(lambda: says(503, "bootstrap server"), timeout=10, what="503 naming the bootstrap")
        _, body = await health()
        assert body["status"] == "unavailable" and body["bootstrap"]["serving"] is False, body
        async with http.get(f"{base}/live") as reply:
            assert reply.status == 200  # the gateway itself is fine: no reason to restart it

        bootstrap = start_service("bootstrap", *common, name="bootstrap-2")
        await wait_until(lambda: says(200), timeout=30, what="ready again with the new bootstrap")

        workers["decode"].kill()
        await wait_until(lambda: says(503, "no live decode worker"), timeout=30, what="503 naming the decode role")

        dispatchers["prefill"].kill()
        await wait_until(
            lambda: says(503, "no prefill dispatcher answers"), timeout=30, what="503 naming the prefill dispatcher"
        )
        _, body = await health()
        assert "no live decode worker" in body["missing"], body


async def test_worker_endpoints_and_reflection_v1(etcd, prefix, start_service):
    """The worker endpoints advertise the workers' own length limits (the smallest over the live
    ranks): a request at those limits is served on every rank, one token past them is refused."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *common, name="disp")
    limits = {0: ["--max-prompt-tokens", "1000"], 1: ["--max-position", "2048"], 2: []}  # default: 4096 each
    for rank, flags in limits.items():
        start_service("scheduler", *common, "--runner", "sim", "--dp-rank", str(rank), *flags, name=f"sim-{rank}")
    http_port = free_port()
    gateway = start_service("gateway", *common, "--http-port", str(http_port))
    base = f"http://127.0.0.1:{http_port}"
    await ready_workers(dispatcher, 3)
    async with aiohttp.ClientSession() as http:

        async def get(path: str):
            async with http.get(f"{base}{path}") as reply:
                assert reply.status == 200, path
                return await reply.json()

        async def complete(prompt_tokens: int, max_tokens: int, rank: int) -> tuple[int, dict]:
            body = {"model": MODEL, "prompt": [7] * prompt_tokens, "max_tokens": max_tokens, "ignore_eos": True}
            async with http.post(f"{base}/v1/completions", json={**body, "data_parallel_rank": rank}) as reply:
                return reply.status, await reply.json()

        await wait_until(lambda: _dp_size(get), timeout=20, what="the gateway to see 3 ranks")
        info = await get("/server_info")
        assert info["dp_size"] == 3 and info["dp_size_per_role"] == {"mixed": 3}
        assert info["served_model_name"] == MODEL
        # rank 0's prompt limit and rank 1's context, not the gateway's own 32k + 16k
        assert (info["max_prompt_tokens"], info["context_length"], info["max_new_tokens"]) == (1000, 2048, 2047)
        assert (await get("/get_server_info")) == info
        model_info = await get("/model_info")
        assert model_info["served_model_name"] == MODEL and model_info["max_model_len"] == 2048
        for rank in limits:  # at the advertised limits every rank serves
            status, body = await complete(1000, 2048 - 1000, rank)
            assert status == 200 and body["usage"]["completion_tokens"] == 1048, (rank, body)
        status, body = await complete(1001, 1, 0)
        assert status == 400 and "exceeds" in body["error"]["message"], body
        assert "worker" not in body["error"]["message"], body  # the limit in the worker's words, no internals
        status, body = await complete(1000, 2048 - 999, 1)
        assert status == 400 and "context is 2048 tokens" in body["error"]["message"], body
        assert body["error"]["param"] == "max_tokens", body
        loads = await get("/get_load")
        assert [load["dp_rank"] for load in loads] == [0, 1, 2]
        assert all({"num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load) for load in loads)

    async with grpc.aio.insecure_channel(gateway.address) as channel:
        for package in ("grpc.reflection.v1", "grpc.reflection.v1alpha"):
            call = channel.stream_stream(
                f"/{package}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="pdlb.v1.Gateway"),
            ]
            replies = [reply async for reply in call(iter(requests))]
            assert "pdlb.v1.Gateway" in [s.name for s in replies[0].list_services_response.service], package
            assert replies[1].file_descriptor_response.file_descriptor_proto, package


async def test_the_gateway_refuses_what_the_workers_cannot_take_before_dispatch(etcd, prefix, start_service):
    """One source for the length limits: the workers' (sim ranks at --max-prompt-tokens 4096 and a
    context of 4096 take prompts of at most 4095 tokens, leaving one for output). The gateway
    advertises them, serves a request exactly at them, and refuses one past them itself, before
    any dispatch, with an OpenAI error naming the field to shorten; a default max_tokens is cut to
    the room left (vLLM's behaviour). The worker refuses in the same numbers."""
    dispatcher, base, gateway = toy_cluster(etcd, prefix, start_service)
    await ready_workers(dispatcher, 2)
    channel, stub = dispatch_stub(dispatcher.address)

    async def dispatched() -> int:
        return sum(row.dispatched_total for row in (await load_snapshot(stub)).workers)

    async with channel, aiohttp.ClientSession() as http:

        async def post(path: str, body: dict) -> tuple[int, dict]:
            async with http.post(f"{base}{path}", json={"model": MODEL, **body}) as reply:
                return reply.status, await reply.json()

        async def limits_known() -> bool:
            async with http.get(f"{base}/server_info") as reply:
                return (await reply.json())["max_prompt_tokens"] == 4095

        await wait_until(limits_known, timeout=20, what="the gateway to see the workers' limits")
        async with http.get(f"{base}/server_info") as reply:
            info = await reply.json()
        assert (info["max_prompt_tokens"], info["context_length"]) == (4095, 4096), info

        at_limit = {"prompt": [7] * 4095, "max_tokens": 1, "ignore_eos": True}
        status, body = await post("/v1/completions", at_limit)
        assert status == 200 and body["usage"] == {**body["usage"], "prompt_tokens": 4095, "completion_tokens": 1}
        before = await dispatched()

        refusals = [
            ("/v1/completions", {"prompt": [7] * 4096, "max_tokens": 1}, "prompt"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),
            ("/v1/completions", {"prompt": [7] * 4000, "max_tokens": 97}, "max_tokens"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4096},
             "max_completion_tokens"),
            ("/generate", {"input_ids": [7] * 4096}, "input_ids"),
            ("/generate", {"text": "x" * 4000, "sampling_params": {"max_new_tokens": 200}},
             "sampling_params.max_new_tokens"),
        ]  # fmt: skip
        for path, request_body, param in refusals:
            status, body = await post(path, request_body)
            assert status == 400, (path, param, body)
            error = body["error"]
            assert (error["param"], error["type"]) == (param, "invalid_request_error"), (path, error)
            assert "context is 4096 tokens" in error["message"], error
            if param in ("prompt", "messages", "input_ids"):
                assert "exceeds the limit 4095" in error["message"], error
            else:
                assert "at most" in error["message"], error
        status, body = await post("/v1/completions", {"prompt": [7] * 4095, "max_tokens": 2})
        assert status == 400 and "Ask for at most 1 new token with this prompt" in body["error"]["message"], body
        # past the hard bound on any request: the message points to where this model's limit is
        status, body = await post("/v1/completions", {"prompt": [7], "max_tokens": 16385})
        assert status == 400 and body["error"]["param"] == "max_tokens", body
        assert "(16384)" in body["error"]["message"] and "/server_info" in body["error"]["message"], body
        assert await dispatched() == before  # refused at the gateway: no dispatcher saw them

        # max_tokens left out: the default (16) is cut to the one token the context leaves
        status, body = await post("/v1/completions", {"prompt": [7] * 4095, "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 1, body
        assert body["choices"][0]["finish_reason"] == "length"

        # gRPC callers of the gateway get the same refusal, as INVALID_ARGUMENT
        async with grpc.aio.insecure_channel(gateway.address) as grpc_channel:
            gateway_stub = gateway_pb2_grpc.GatewayStub(grpc_channel)
            call = gateway_stub.Generate(
                gateway_pb2.GatewayGenerateRequest(request=request("long", input_ids=[7] * 4000, max_new_tokens=97))
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await rest_of(call)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "context is 4096 tokens" in refused.value.details()

        # a client of the dispatcher (no gateway check) hears the worker's refusal in the same numbers
        with pytest.raises(grpc.aio.AioRpcError) as worker_refusal:
            await generate(stub, request("direct", input_ids=[7] * 4096, max_new_tokens=1))
        assert worker_refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the limit 4095" in worker_refusal.value.details(), worker_refusal.value.details()


async def _dp_size(get) -> bool:
    return (await get("/server_info"))["dp_size"] == 3


async def sglang_generate(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, list[dict]]:
    """POST /generate; (status, the outputs: one, or every event of a stream before [DONE])."""
    async with http.post(f"{url}/generate", json=body) as reply:
        if not body.get("stream"):
            return reply.status, [await reply.json()]
        lines = [line for line in (await reply.text()).splitlines() if line.startswith("data: ")]
        assert reply.status != 200 or lines[-1] == "data: [DONE]", lines[-3:]
        return reply.status, [json.loads(line[6:]) for line in lines[:-1]]


async def test_sglang_generate_in_sglangs_shape(etcd, prefix, start_service):
    """SGLang's native /generate: text or input_ids, sampling_params, stream (whole output so far in
    each event), rid, data_parallel_rank; meta_info with the token counts and finish reason."""
    dispatcher, base, _ = toy_cluster(etcd, prefix, start_service)
    await ready_workers(dispatcher, 2)
    bytes_ = ByteTokenizer()
    async with aiohttp.ClientSession() as http:
        greedy = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
        status, [out] = await sglang_generate(
            http, base, {"text": "Once upon a time", "sampling_params": greedy, "rid": "story-1"}
        )
        assert status == 200, out
        free, meta = out["output_ids"], out["meta_info"]
        assert len(free) == 12 and out["text"] == bytes_.decode(free)
        assert meta["id"] == "story-1" and meta["finish_reason"] == {"type": "length", "length": 12}
        assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(bytes_.encode("Once upon a time")), 12)
        assert meta["cached_tokens"] >= 0 and meta["e2e_latency"] > 0

        # token ids in, streamed, pinned: each event holds the whole output so far
        ids = bytes_.encode("Once upon a time")
        for rank in (0, 1):
            body = {"input_ids": ids, "sampling_params": greedy, "stream": True, "data_parallel_rank": rank}
            status, events = await sglang_generate(http, base, body)
            assert status == 200, events
            assert events[-1]["output_ids"] == free and events[-1]["text"] == out["text"]  # same prompt, greedy
            assert all(e["meta_info"]["dp_rank"] == rank for e in events)
            assert [e["meta_info"]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
            lengths = [len(e["output_ids"]) for e in events]
            # text grows with the ids (a character split over byte tokens waits for its last byte)
            assert lengths == sorted(lengths) and all(out["text"].startswith(e["text"]) for e in events)

        # a stop token and a stop string, with SGLang's finish reasons
        cut = next(i for i in range(1, len(free)) if free[i] not in free[:i])
        stop_ids = {**greedy, "stop_token_ids": [free[cut]]}
        status, [out] = await sglang_generate(http, base, {"text": "Once upon a time", "sampling_params": stop_ids})
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": free[cut]}, out
        assert out["output_ids"] == free[: cut + 1] and out["text"] == bytes_.decode(free[:cut])
        text = bytes_.decode(free)
        at = next(i for i in range(1, len(text)) if text[i] not in text[:i] and text[i] != "\ufffd")
        status, [out] = await sglang_generate(
            http, base, {"text": "Once upon a time", "sampling_params": {**greedy, "stop": text[at]}}
        )
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": text[at]}, out
        assert out["text"] == text[:at], (out, text)

        bad = [
            ({"sampling_params": greedy}, "text"),
            ({"text": "x", "input_ids": [1]}, "input_ids"),
            ({"text": "x", "sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
            ({"text": "x", "sampling_params": {"regex": "a+"}}, "sampling_params.regex"),
            ({"text": "x", "sampling_params": {"n": 2}}, "sampling_params.n"),
            ({"text": "x", "return_logprob": True}, "return_logprob"),
            ({"text": "x", "image_data": "a.png"}, "image_data"),
            ({"text": "x", "rid": "a b\n"}, "rid"),
            ({"text": "x" * 40_000}, "text"),
        ]
        for body, param in bad:
            status, [error] = await sglang_generate(http, base, body)
            assert status == 400 and error["error"]["param"] == param, (body, error)
            assert param.split(".")[-1] in error["error"]["message"] or param == "text", error
        status, [error] = await sglang_generate(http, base, {"text": "x", "model": "gpt-4"})
        assert status == 404 and error["error"]["code"] == "model_not_found", error


@pytest.mark.parametrize(
    ("body", "headers", "said"),
    [
        ({"data_parallel_rank": -5}, {}, "data_parallel_rank must be an integer rank from 0 to 1048575, not -5"),
        ({"data_parallel_rank": True}, {}, "data_parallel_rank must be an integer rank from 0 to 1048575, not True"),
        ({}, {"X-data-parallel-rank": "-1"}, "X-data-parallel-rank must be an integer rank from 0 to 1048575, not -1"),
        ({"prefill_dp_rank": 1 << 20}, {}, "prefill_dp_rank must be an integer rank from 0 to 1048575, not 1048576"),
        ({"decode_dp_rank": "1"}, {}, "decode_dp_rank must be an integer rank from 0 to 1048575, not '1'"),
    ],
)
def test_a_bad_rank_pin_is_refused_naming_what_the_client_sent(body, headers, said):
    """A bad `data_parallel_rank` (or vLLM's header) used to be refused as `decode_dp_rank`, a field
    the client never sent (where it maps in PD), and a rank past the bound as 'must be >= 0'."""
    from aiohttp.test_utils import make_mocked_request

    from pdlb.services.gateway.openai_api import ApiError, OpenAIApi
    from pdlb.v1 import common_pb2

    with pytest.raises(ApiError) as refused:
        OpenAIApi.rank_pins(
            make_mocked_request("POST", "/v1/completions", headers=headers), body, common_pb2.InferenceRequest()
        )
    assert (refused.value.status, str(refused.value), refused.value.param) == (400, said, said.split()[0])
    request = common_pb2.InferenceRequest()
    OpenAIApi.rank_pins(make_mocked_request("POST", "/", headers={"X-data-parallel-rank": "3"}), {}, request)
    assert request.decode_dp_rank == 3 and not request.HasField("prefill_dp_rank")
