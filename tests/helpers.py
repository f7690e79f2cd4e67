"""Small client helpers for tests (real gRPC calls, no fakes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import grpc

from pdlb.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc, gateway_pb2


def request(
    rid: str, text: str = "", *, input_ids=None, max_new_tokens: int = 8, **fields
) -> common_pb2.InferenceRequest:
    return common_pb2.InferenceRequest(
        request_id=rid,
        text=text,
        input_ids=input_ids or [],
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, temperature=0.0),
        **fields,
    )


async def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll a status predicate until it holds (for state only observable by polling)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def live_workers(stub: dispatch_pb2_grpc.DispatchStub) -> list[common_pb2.WorkerInfo]:
    reply = await stub.ListWorkers(dispatch_pb2.ListWorkersRequest(), timeout=5)
    return list(reply.workers)


async def generate(stub: dispatch_pb2_grpc.DispatchStub, req: common_pb2.InferenceRequest, timeout: float = 60):
    """All chunks of a Generate call."""
    return [chunk async for chunk in stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=timeout)]


def dispatch_stub(address: str) -> tuple[grpc.aio.Channel, dispatch_pb2_grpc.DispatchStub]:
    channel = grpc.aio.insecure_channel(address)
    return channel, dispatch_pb2_grpc.DispatchStub(channel)


async def wait_for_workers(stub: dispatch_pb2_grpc.DispatchStub, count: int, timeout: float = 30.0) -> list:
    """Wait until the dispatcher lists exactly `count` workers; returns them."""
    found: list = []

    async def check() -> bool:
        nonlocal found
        found = await live_workers(stub)
        return len(found) == count

    await wait_until(check, timeout, what=f"{count} workers at the dispatcher")
    return found


async def load_snapshot(stub: dispatch_pb2_grpc.DispatchStub) -> dispatch_pb2.WatchLoadResponse:
    call = stub.WatchLoad(dispatch_pb2.WatchLoadRequest(interval_ms=50), timeout=10)
    async for snapshot in call:
        call.cancel()
        return snapshot
    raise AssertionError("WatchLoad ended without a snapshot")


async def rest_of(call) -> list:
    """Read the remaining messages of a stream on which read() was already used."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


SHARED_SYSTEM_PROMPT = "You are a careful assistant who answers in one line. "


async def shared_prefix_ranks(url: str, model: str, count: int, repeats: int = 20) -> list[int]:
    """The rank that served each of `count` completions sent one after another through `url` (a
    router or a gateway), all behind one long shared prefix (the system prompt `repeats` times)
    and each with its own question: what a prefix-aware policy should keep on one rank."""
    system = SHARED_SYSTEM_PROMPT * repeats
    ranks = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(count):
            body = {"model": model, "prompt": system + f"question {i}?", "max_tokens": 2, "ignore_eos": True}
            async with session.post(f"{url}/v1/completions", json=body) as reply:
                assert reply.status == 200, await reply.text()
                ranks.append((await reply.json())["dp_rank"])
    return ranks


async def greedy_gateway_stream(
    stub, rid: str, prompt: list[int], started: asyncio.Event | None = None
) -> tuple[list[int], int]:
    """All tokens of one greedy request (40 new, ignore_eos) through the gateway `stub`, and how often
    it was retried; `started`, if given, is set at its first token."""
    request = common_pb2.InferenceRequest(
        request_id=rid,
        input_ids=prompt,
        sampling=common_pb2.SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.0),
    )
    tokens, retries = [], 0
    async for chunk in stub.Generate(gateway_pb2.GatewayGenerateRequest(request=request), timeout=120):
        tokens += chunk.token_ids
        retries = max(retries, chunk.retries)
        if tokens and started is not None:
            started.set()
    return tokens, retries
