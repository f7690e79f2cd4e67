"""The gateway's HTTP API and the services' request intake against real services (etcd, dispatchers,
sim schedulers, the gateway, on loopback): tokenising off the event loop, input limits, error
bodies, timeouts."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import grpc
import pytest

from pdlb.common.etcd_process import free_port
from pdlb.v1 import dispatch_pb2
from tests.helpers import dispatch_stub, request, wait_for_workers, wait_until

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
        # Under the characters limit (16 x 32768 = 524288), over the token limit: tokenised, then 400.
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
            assert status == 400 and "exceeds the limit 32768" in reply["error"]["message"], reply
        assert busy_s > 1.0, f"the huge prompts took only {busy_s:.2f}s: too little to measure a stall"
        assert len(latencies) >= 5 and max(latencies) < busy_s / 4, (max(latencies), busy_s)
