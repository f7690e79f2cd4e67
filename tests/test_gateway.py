"""The gateway against real clusters (etcd, dispatchers, bootstrap, sim schedulers on loopback), used
through clients someone else wrote: the official `openai` package, and a gRPC client built from the
server's reflection alone."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceFailed
from pdlb.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.browser import Browser, chromium_path
from tests.helpers import greedy_gateway_stream, rest_of, wait_until

MODEL = "tiny-random"
EOS_OFF = {"ignore_eos": True}
SIM = ["--runner", "sim"]


def start_cluster(etcd, prefix, start_service, mode: str, ranks: int = 2, slowdown: str = "1"):
    """A PD or mixed cluster in etcd and a gateway; returns (gateway process, its HTTP base URL, workers)."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    sched = [*common, *SIM, "--sim-slowdown", slowdown, "--report-interval-ms", "50"]
    workers = []
    if mode == "pd":
        start_service("bootstrap", *common)
        for role in ("prefill", "decode"):
            start_service("dispatcher", *common, "--disaggregation-mode", role, name=f"disp-{role}")
            role_flags = [*sched, "--disaggregation-mode", role]
            workers += [
                start_service("scheduler", *role_flags, "--dp-rank", str(r), name=f"{role}-{r}") for r in range(ranks)
            ]
    else:
        start_service("dispatcher", *common, name="disp-mixed")
        workers += [start_service("scheduler", *sched, "--dp-rank", str(r), name=f"mixed-{r}") for r in range(ranks)]
    http_port = free_port()
    gateway = start_service("gateway", *common, "--http-port", str(http_port), "--max-body-bytes", "65536")
    return gateway, f"http://127.0.0.1:{http_port}", workers


async def ready(base: str, workers: int) -> None:
    async def all_workers() -> bool:
        try:
            state = await asyncio.to_thread(get_json, f"{base}/dashboard/state")
        except OSError:
            return False
        return sum(len(r["workers"]) for r in state["roles"]) == workers

    await wait_until(all_workers, timeout=30, what=f"{workers} workers on the dashboard")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(params=["pd", "mixed"])
def cluster(request, etcd, prefix, start_service):
    gateway, base, workers = start_cluster(etcd, prefix, start_service, request.param)
    return request.param, gateway, base, workers


async def test_openai_package_completions_and_chat(cluster):
    mode, _, base, workers = cluster
    await ready(base, len(workers))
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]

        done = await client.completions.create(
            model=MODEL, prompt="Hello there", max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
        )
        assert done.choices[0].finish_reason == "length"
        assert done.usage.completion_tokens == 7 and done.usage.prompt_tokens == len(b"Hello there")
        assert done.usage.total_tokens == done.usage.prompt_tokens + 7

        # streaming: the same text, usage equal to the tokens streamed, ending in [DONE]
        stream = await client.completions.create(
            model=MODEL,
            prompt="Hello there",
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        texts, usage, reasons = [], None, []
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                texts.append(choice.text)
                reasons.append(choice.finish_reason)
        assert "".join(texts) == done.choices[0].text
        assert usage.completion_tokens == 7 and reasons[-1] == "length"

        chat = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=5,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        content, usage = [], None
        async for chunk in stream:
            usage = chunk.usage or usage
            content += [c.delta.content or "" for c in chunk.choices]
        assert "".join(content) == chat.choices[0].message.content and usage.completion_tokens == 5

        # pinned ranks: vLLM's header (the decode rank in PD), and SGLang-style body fields
        for rank in (0, 1):
            pinned = await client.completions.create(
                model=MODEL,
                prompt="x",
                max_tokens=2,
                extra_headers={"X-data-parallel-rank": str(rank)},
                extra_body={"ignore_eos": True},
            )
            assert pinned.model_extra["dp_rank"] == rank
        if mode == "pd":
            pinned = await client.completions.create(
                model=MODEL,
                prompt="y",
                max_tokens=2,
                extra_body={"ignore_eos": True, "prefill_dp_rank": 1, "decode_dp_rank": 0},
            )
            assert (pinned.model_extra["prefill_dp_rank"], pinned.model_extra["dp_rank"]) == (1, 0)

        # stop strings end the text before the stop string
        full = done.choices[0].text
        if len(full) > 3:
            stop = full[2:4]
            stopped = await client.completions.create(
                model=MODEL, prompt="Hello there", max_tokens=7, temperature=0, stop=[stop], extra_body=EOS_OFF
            )
            assert stopped.choices[0].finish_reason == "stop"
            assert stopped.choices[0].text == full[: full.find(stop)]
    finally:
        await client.close()


STREAM = {"model": MODEL, "prompt": "x", "stream": True}
BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": MODEL}).encode(), 400, "prompt"),
    (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": 7, "prompt": "x"}).encode(), 400, "model"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "x", "n": 2}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "prompt": "x", "logprobs": 30}).encode(), 400, "logprobs"),
    (json.dumps({"model": MODEL, "prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"model": MODEL, "prompt": "x", "echo": True}).encode(), 400, "echo"),
    (json.dumps({"model": MODEL, "prompt": "x", "tools": [{"type": "function"}]}).encode(), 400, "tools"),
    (
        json.dumps({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}).encode(),
        400,
        "stream_options",
    ),
    (json.dumps({"model": MODEL, "prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    # stream_options' fields are checked (a string such as "no" asked for usage, an unknown field was ignored)
    (json.dumps({**STREAM, "stream_options": {"include_usage": "no"}}).encode(), 400, "stream_options.include_usage"),
    (json.dumps({**STREAM, "stream_options": {"usage": True}}).encode(), 400, "stream_options.usage"),
    (
        json.dumps({**STREAM, "stream_options": {"continuous_usage_stats": True}}).encode(),
        400,
        "stream_options.continuous_usage_stats",
    ),
    (json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "x", "frobnicate": 1}).encode(), 400, "frobnicate"),
    (json.dumps({"model": MODEL, "prompt": "x" * 70_000}).encode(), 413, None),
]


@pytest.mark.parametrize("cluster", ["mixed"], indirect=True)
async def test_bad_http_input_gets_openai_errors_and_the_gateway_stays_healthy(cluster):
    _, _, base, workers = cluster
    await ready(base, len(workers))
    for body, status, param in BAD:
        code, reply = await asyncio.to_thread(post, f"{base}/v1/completions", body)
        assert code == status, (body[:60], code, reply)
        assert reply["error"]["message"] and reply["error"]["type"]
        if param:
            assert reply["error"]["param"] == param, reply
        health = await asyncio.to_thread(get_json, f"{base}/health")
        assert health["status"] == "ok"
    code, reply = await asyncio.to_thread(post, f"{base}/v1/chat/completions", json.dumps({"model": MODEL}).encode())
    assert code == 400 and reply["error"]["param"] == "messages"
    # no model, null or "": the served one, as vLLM and SGLang answer (it was 400 "model is required")
    for model in ({}, {"model": None}, {"model": ""}):
        body = json.dumps({**model, "prompt": "x", "max_tokens": 2}).encode()
        code, reply = await asyncio.to_thread(post, f"{base}/v1/completions", body)
        assert code == 200 and reply["model"] == MODEL, (model, code, reply)
        chat = json.dumps({**model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).encode()
        code, reply = await asyncio.to_thread(post, f"{base}/v1/chat/completions", chat)
        assert code == 200 and reply["model"] == MODEL, (model, code, reply)
    code, reply = await asyncio.to_thread(post, f"{base}/v1/nowhere", b"{}")
    assert code == 404 and "error" in reply
    # every refusal counts among finished requests, the body over --max-body-bytes too (it was left out)
    metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode())
    assert 'pdlb_gateway_requests_total{api="http",outcome="413"} 1.0' in metrics, metrics


async def test_openai_details_as_vllm_serves_them(etcd, prefix, start_service):
    """What a trial user met, with vLLM's behaviour as the reference: GET /v1/models/{id}, chat
    roles, a refused tool list named in a message that reads whole, stream_options without stream,
    and a 503 with Retry-After once the only dispatcher is gone."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *common, name="disp-mixed")
    start_service("scheduler", *common, *SIM, name="mixed-0")
    http_port = free_port()
    start_service("gateway", *common, "--http-port", str(http_port))
    base = f"http://127.0.0.1:{http_port}"
    await ready(base, 1)
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    try:
        model = await client.models.retrieve(MODEL)
        assert (model.id, model.object) == (MODEL, "model")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("no-such-model")
        assert missing.value.body["code"] == "model_not_found" and "no-such-model" in missing.value.body["message"]

        user = {"role": "user", "content": "hi"}
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "developer", "content": "be brief"}, user], max_tokens=2
        )
        assert chat.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError) as role:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "robot", "content": "x"}], max_tokens=2
            )
        assert role.value.body["param"] == "messages[0].role" and "'robot'" in role.value.body["message"]
        assert "system, user, assistant, tool, developer" in role.value.body["message"]
        # content missing where the role needs it, a name that is not a string: refused, naming the field
        malformed = [
            ([{"role": "user"}], "messages[0].content", "required for role 'user'"),
            ([{"role": "system", "content": None}, user], "messages[0].content", "required for role 'system'"),
            ([{**user, "name": 5}], "messages[0].name", "must be a string"),
            ([{"role": "user", "content": [{"type": "text", "text": 7}]}], "messages[0].content[0].text", "string"),
            ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content", "string or a list"),
            # these said "needs a role" whatever was wrong, and an image part named only messages[0] (vLLM: 400)
            (["hi"], "messages[0]", "messages[0] must be an object with a role and content, not a string"),
            ([{"content": "hi"}], "messages[0].role", "messages[0] needs a role: one of system, user,"),
            (
                [{"role": 1, "content": "hi"}],
                "messages[0].role",
                "role must be a string, one of system, user, assistant",
            ),
            (
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
                "messages[0].content[0]",
                "only text content parts are supported (a part of type 'text'), not type 'image_url'",
            ),
        ]
        for messages, param, words in malformed:
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
            assert bad.value.body["param"] == param and words in bad.value.body["message"], (messages, bad.value.body)
        # an assistant turn may be empty (OpenAI's schema), and a string name is fine
        turns = [{**user, "name": "ann"}, {"role": "assistant"}, user]
        chat = await client.chat.completions.create(model=MODEL, messages=turns, max_tokens=2)
        assert chat.choices[0].finish_reason in ("stop", "length")

        tool = {"type": "function", "function": {"name": "get_weather", "description": "The weather " * 20}}
        with pytest.raises(openai.BadRequestError) as tools:
            await client.chat.completions.create(model=MODEL, messages=[user], tools=[tool], max_tokens=2)
        message = tools.value.body["message"]
        assert tools.value.body["param"] == "tools" and message.startswith("tools=[...1 item...] is not supported")
        assert message.endswith("it serves only tools=[] (or leave it out)"), message

        with pytest.raises(openai.BadRequestError) as options:
            await client.chat.completions.create(
                model=MODEL, messages=[user], max_tokens=2, stream_options={"include_usage": True}
            )
        assert options.value.body["param"] == "stream_options" and "stream is true" in options.value.body["message"]
    finally:
        await client.close()

    dispatcher.kill()  # the mixed role's only dispatcher
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as gone:
        await asyncio.to_thread(urllib.request.urlopen, request, timeout=60)
    assert gone.value.code == 503, gone.value.read()
    assert gone.value.headers["Retry-After"] == "5"
    assert json.loads(gone.value.read())["error"]["type"] == "server_error"


@pytest.mark.parametrize("cluster", ["pd"], indirect=True)
async def test_client_disconnect_mid_stream_frees_the_workers(cluster):
    _, _, base, workers = cluster
    await ready(base, len(workers))
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
    stream = await client.completions.create(
        model=MODEL, prompt="a long one", max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
    )
    got = 0
    async for chunk in stream:
        got += len(chunk.choices[0].text) if chunk.choices else 0
        if got > 5:
            break
    await stream.close()  # the client goes away mid-stream
    await client.close()

    async def idle() -> bool:
        for proc in workers:
            async with grpc.aio.insecure_channel(proc.address) as channel:
                load = (await scheduler_pb2_grpc.SchedulerStub(channel).GetLoad(scheduler_pb2.GetLoadRequest())).load
            if load.running_requests or load.waiting_requests or load.kv_tokens_used - load.kv_tokens_evictable:
                return False
        return True

    await wait_until(idle, timeout=15, what="every worker to abort the request and free its KV")
    # counted among finished requests, as nginx's 499 (client closed request); it used to be left out
    metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode())
    assert 'pdlb_gateway_requests_total{api="http",outcome="499"} 1.0' in metrics, metrics


async def reflected_gateway(channel: grpc.aio.Channel):
    """Message classes of pdlb.v1.Gateway from server reflection only (no generated code)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    pool = descriptor_pool.DescriptorPool()
    seen: set[str] = set()
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="pdlb.v1.Gateway"))
    reply = await call.read()
    files = {}
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    while True:
        missing = [d for f in files.values() for d in f.dependency if d not in files and d not in seen]
        if not missing:
            break
        for name in missing:
            seen.add(name)
            await call.write(reflection_pb2.ServerReflectionRequest(file_by_filename=name))
            for raw in (await call.read()).file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files[proto.name] = proto
    await call.done_writing()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        for dep in files[name].dependency:
            add(dep)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    request_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("pdlb.v1.GatewayGenerateRequest"))
    response_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("pdlb.v1.GatewayGenerateResponse"))
    return request_class, response_class


@pytest.mark.parametrize("cluster", ["pd"], indirect=True)
async def test_single_call_pd_rpc_from_a_reflection_built_client(cluster):
    _, gateway, base, workers = cluster
    await ready(base, len(workers))
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        request_class, response_class = await reflected_gateway(channel)
        generate = channel.unary_stream(
            "/pdlb.v1.Gateway/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        request = request_class()
        request.request.request_id = "reflected-1"
        request.request.text = "hello"
        request.request.sampling.max_new_tokens = 6
        request.request.sampling.ignore_eos = True
        chunks = [c async for c in generate(request, timeout=30)]
        assert sum(len(c.token_ids) for c in chunks) == 6
        assert chunks[-1].finish_reason == 1 and chunks[-1].prefill_dp_rank >= 0  # LENGTH, both halves ran

        failing = request_class()
        failing.request.request_id = "prefill-fails"
        failing.request.text = "hello"
        failing.request.prefill_dp_rank = 7  # no such prefill rank: the prefill half fails
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [c async for c in generate(failing, timeout=30)]
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "prefill-fails" in caught.value.details() and "rank 7" in caught.value.details()


@pytest.mark.parametrize("victim", ["decode-1", "prefill-0"])
async def test_kill_9_under_load_every_request_completes_exactly(etcd, prefix, start_service, victim):
    """A worker is killed while requests stream through the gateway: every request completes, and
    every stream (resumed or re-run) equals the uninterrupted greedy output token for token."""
    from pdlb.v1 import gateway_pb2_grpc

    gateway, base, workers = start_cluster(etcd, prefix, start_service, "pd", slowdown="4")
    await ready(base, len(workers))
    prompts = [[(31 * i + j) % 250 + 1 for j in range(20 + i)] for i in range(16)]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        reference = [await greedy_gateway_stream(stub, f"ref-{i}", p) for i, p in enumerate(prompts)]
        assert all(len(tokens) == 40 and retries == 0 for tokens, retries in reference)
        first = asyncio.Event()
        runs = []
        for i, prompt in enumerate(prompts):
            runs.append(asyncio.create_task(greedy_gateway_stream(stub, f"run-{i}", prompt, first if i == 8 else None)))
            await asyncio.sleep(0.05)  # the arrival schedule: 20 requests a second
        await asyncio.wait_for(first.wait(), 30)
        next(p for p in workers if p.name == victim).kill()
        results = await asyncio.wait_for(asyncio.gather(*runs), 120)
    assert [tokens for tokens, _ in results] == [tokens for tokens, _ in reference]
    if victim.startswith("decode"):  # streams were cut mid-way: the gateway resumed them
        assert any(retries for _, retries in results), "the kill hit no stream: nothing was tested"
    # (a killed prefill worker mostly fails requests before their first token, which the prefill
    # dispatcher re-dispatches itself; KV it held for a decode pull makes the gateway re-run)


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (make install-browser installs it)")
async def test_dashboard_in_headless_chromium(etcd, prefix, start_service, tmp_path):
    """The page shows every rank, updates at least 4 times a second, its numbers move under load,
    and a killed worker shows as stale or gone within the lease TTL."""
    _, base, workers = start_cluster(etcd, prefix, start_service, "pd")
    await ready(base, len(workers))
    browser = await Browser().start()
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
    try:
        await browser.open(f"{base}/dashboard")
        rows = "document.querySelectorAll('tr[data-rank]')"
        await wait_until(lambda: browser.eval(f"{rows}.length === 4"), 15, "4 ranks on the page")
        roles = await browser.eval("[...document.querySelectorAll('section[data-role]')].map(s => s.dataset.role)")
        assert roles == ["prefill", "decode"]
        updates = "Number(document.body.dataset.updates)"
        first = await browser.eval(updates)
        await asyncio.sleep(2.0)  # measuring the page's update rate over a fixed span
        assert await browser.eval(updates) - first >= 8, "fewer than 4 updates a second"

        dispatched = f"[...{rows}].map(r => Number(r.children[11].textContent)).reduce((a, b) => a + b, 0)"
        before = await browser.eval(dispatched)
        await asyncio.gather(
            *[
                client.completions.create(model=MODEL, prompt=f"load {i}", max_tokens=8, extra_body=EOS_OFF)
                for i in range(6)
            ]
        )
        await wait_until(lambda: browser.eval(f"{dispatched} >= {before + 12}"), 10, "the page to count 12 dispatches")
        await wait_until(
            lambda: browser.eval("document.getElementById('ttft').textContent !== '- / -'"), 10, "TTFT on the page"
        )
        await browser.screenshot(Path(os.environ.get("PDLB_SCREENSHOT", tmp_path / "dashboard.png")))

        victim = next(p for p in workers if p.name == "decode-1")
        victim.kill()
        gone = (
            f"[...{rows}].filter(r => r.dataset.rank === '1' && r.closest('section').dataset.role === 'decode')"
            ".every(r => r.dataset.state !== 'live')"
        )
        await wait_until(lambda: browser.eval(gone), 12, "the killed worker to show as stale or gone")
        events = await browser.eval("document.getElementById('events').textContent")
        assert "left" in events or "stale" in events
    finally:
        await client.close()
        await browser.close()


async def test_pd_requests_queued_at_prefill_wait_for_their_room_and_timeouts_are_504(etcd, prefix, start_service):
    """The decode half waits for its room as long as the request's deadline allows, however long the
    prefill half is queued (the decode workers' --kv-wait-timeout, 2 s here, bounds only requests
    without a deadline). A real timeout is DEADLINE_EXCEEDED / HTTP 504, never 404."""
    import aiohttp

    from pdlb.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    sched = [*common, *SIM, "--kv-wait-timeout", "2", "--report-interval-ms", "50"]
    start_service("bootstrap", *common)
    for role in ("prefill", "decode"):
        start_service("dispatcher", *common, "--disaggregation-mode", role, name=f"disp-{role}")
    # A slow prefill rank: 12 prompts of 1000 tokens take about 7 s to prefill, so most decode
    # halves wait well beyond 2 s for their rooms.
    start_service("scheduler", *sched, "--disaggregation-mode", "prefill", "--sim-slowdown", "20", name="prefill")
    decode = start_service("scheduler", *sched, "--disaggregation-mode", "decode", name="decode")
    port, short_port = free_port(), free_port()
    gateway = start_service("gateway", *common, "--http-port", str(port), "--request-timeout", "120", name="gw")
    start_service("gateway", *common, "--http-port", str(short_port), "--request-timeout", "2", name="gw-short")
    base, short = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{short_port}"
    await ready(base, 2)
    await ready(short, 2)

    async def complete(session: aiohttp.ClientSession, url: str, i: int) -> tuple[int, dict, float]:
        body = {"model": MODEL, "prompt": f"{i:04d}" + "x" * 996, "max_tokens": 2, **EOS_OFF}
        started = asyncio.get_running_loop().time()
        async with session.post(f"{url}/v1/completions", json=body) as reply:
            return reply.status, await reply.json(), asyncio.get_running_loop().time() - started

    async with aiohttp.ClientSession() as session:
        queued = [asyncio.ensure_future(complete(session, base, i)) for i in range(12)]

        async def prefill_busy() -> bool:
            state = await asyncio.to_thread(get_json, f"{base}/dashboard/state")
            rows = [w for r in state["roles"] if r["role"] == "prefill" for w in r["workers"]]
            return any(w["waiting"] + w["running"] >= 6 for w in rows)

        await wait_until(prefill_busy, what="the prefill rank to queue the burst")
        # Meanwhile, requests whose deadline passes while they queue behind the burst.
        status, body, took = await complete(session, short, 99)
        assert status == 504 and body["error"]["type"], body
        assert took < 10, took
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            request = common_pb2.InferenceRequest(
                request_id="short-deadline", text="y" * 1000, sampling=common_pb2.SamplingParams(max_new_tokens=2)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                [c async for c in stub.Generate(gateway_pb2.GatewayGenerateRequest(request=request), timeout=2)]
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        done = await asyncio.gather(*queued)
    statuses = [status for status, _, _ in done]
    assert statuses == [200] * 12, [(s, b) for s, b, _ in done if s != 200]
    assert all(b["usage"]["completion_tokens"] == 2 for _, b, _ in done)
    slowest = max(took for _, _, took in done)
    print(f"PD queued at prefill: 12 requests ok, the slowest after {slowest:.1f} s (decode --kv-wait-timeout 2 s)")
    assert slowest > 2 * 2  # the burst really kept decode halves waiting beyond the flag

    # A decode half without a deadline whose prefill never comes: bounded by --kv-wait-timeout.
    async with grpc.aio.insecure_channel(decode.address) as channel:
        orphan = common_pb2.InferenceRequest(
            request_id="orphan-decode",
            input_ids=[5] * 20,
            bootstrap_room=4711,
            sampling=common_pb2.SamplingParams(max_new_tokens=2),
        )
        started = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            call = scheduler_pb2_grpc.SchedulerStub(channel).Generate(
                scheduler_pb2.SchedulerGenerateRequest(request=orphan)
            )
            [c async for c in call]
        waited = asyncio.get_running_loop().time() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
    assert "--kv-wait-timeout" in err.value.details() and "4711" in err.value.details()
    assert 1.5 < waited < 10, waited


async def test_a_request_id_or_room_already_in_flight_is_refused_with_already_exists(etcd, prefix, start_service):
    """The gateway refuses a second request with the id (or the client-chosen bootstrap room) of one
    in flight, at once and without disturbing the first; the ids are free again once it ends."""
    from pdlb.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    gateway, base, workers = start_cluster(etcd, prefix, start_service, "mixed", ranks=2, slowdown="5")
    await ready(base, len(workers))

    def generate_request(rid: str, room: int | None, tokens: int) -> gateway_pb2.GatewayGenerateRequest:
        request = common_pb2.InferenceRequest(
            request_id=rid, text="hello", sampling=common_pb2.SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        )
        if room is not None:
            request.bootstrap_room = room
        return gateway_pb2.GatewayGenerateRequest(request=request)

    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = stub.Generate(generate_request("twice", 31337, 200), timeout=60)
        assert (await first.read()).token_ids  # in flight
        for rid, room in (("twice", None), ("twice", 5), ("other", 31337)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [c async for c in stub.Generate(generate_request(rid, room, 4), timeout=10)]
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
            assert rid in err.value.details()
        rest = await rest_of(first)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        again = [c async for c in stub.Generate(generate_request("twice", 31337, 4), timeout=30)]
        assert sum(len(c.token_ids) for c in again) == 4


async def test_gateway_sigterm_fails_streams_running_past_the_grace_naming_it(etcd, prefix, start_service):
    """SIGTERM to the gateway alone, with streams running past its --shutdown-grace: each one ends
    with a failure naming the shutdown and the grace (an OpenAI error event, which the `openai`
    package raises, then [DONE]; SGLang's /generate alike; gRPC UNAVAILABLE). HTTP streams used to
    stop with neither [DONE] nor an error, gRPC ones with 'Cancelling all calls'."""
    from pdlb.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    start_service("dispatcher", *common, name="disp-mixed")
    flags = [*SIM, "--sim-slowdown", "4", "--max-total-tokens", "16384", "--dp-rank", "0"]
    start_service("scheduler", *common, *flags, name="mixed-0")  # room for the three streams
    http_port = free_port()
    gateway = start_service("gateway", *common, "--http-port", str(http_port), "--shutdown-grace", "1")
    base = f"http://127.0.0.1:{http_port}"
    await ready(base, 1)
    said = "the gateway is shutting down and its --shutdown-grace (1 s) ran out while the request ran"
    long = 3000  # far more tokens than the sim worker makes in the 1 s grace
    started = [asyncio.Event() for _ in range(3)]

    async def openai_stream() -> openai.APIError:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=long,
                stream=True,
                extra_body=EOS_OFF,
            )
            with pytest.raises(openai.APIError) as failed:
                async for _ in stream:
                    started[0].set()
            return failed.value

    async def sglang_stream() -> list[str]:
        body = {"text": "hi", "sampling_params": {"max_new_tokens": long, "ignore_eos": True}, "stream": True}
        async with aiohttp.ClientSession() as http, http.post(f"{base}/generate", json=body) as reply:
            assert reply.status == 200
            events = []
            async for line in reply.content:
                if line.startswith(b"data: "):
                    events.append(line.decode().strip())
                    started[1].set()
            return events

    async def grpc_stream() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            request = common_pb2.InferenceRequest(request_id="long-grpc", text="hi")
            request.sampling.max_new_tokens = long
            request.sampling.ignore_eos = True
            call = gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GatewayGenerateRequest(request=request))
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in call:
                    started[2].set()
            return failed.value

    runs = [asyncio.create_task(run()) for run in (openai_stream, sglang_stream, grpc_stream)]
    streaming = asyncio.ensure_future(asyncio.gather(*(event.wait() for event in started)))
    done, _ = await asyncio.wait([streaming, *runs], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    ended = [run.result() if not run.exception() else run.exception() for run in runs if run in done]
    assert streaming in done, f"streams started: {[e.is_set() for e in started]}; ended early: {ended}"
    gateway.signal_stop()
    error, events, status = await asyncio.wait_for(asyncio.gather(*runs), 60)
    assert error.type == "server_error" and said in error.message, error.message
    assert events[-1] == "data: [DONE]", events[-3:]
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error" and said in events[-2], events[-2]
    assert status.code() == grpc.StatusCode.UNAVAILABLE and said in status.details(), status
    assert await asyncio.to_thread(gateway.proc.wait, 30) == 0


async def test_a_dashboard_past_max_dashboards_gets_openai_shaped_429(start_service):
    """One page open of --max-dashboards 1: a second one is refused 429 with the body every other
    OpenAI-shaped error has (message, type, param, code; it lacked param and code) and Retry-After;
    once the first page closes, a new one is served."""
    http_port = free_port()
    start_service("gateway", "--http-port", str(http_port), "--max-dashboards", "1")
    url = f"http://127.0.0.1:{http_port}/dashboard/events"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get(url) as first:
            assert first.status == 200
            assert (await first.content.readline()).startswith(b"data: ")  # the page's slot is taken
            async with http.get(url) as second:
                assert second.status == 429 and second.headers["Retry-After"] == "1"
                error = (await second.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert (error["type"], error["param"], error["code"]) == ("rate_limit_error", None, "rate_limit_exceeded")
        assert "1 dashboards open (--max-dashboards=1)" in error["message"], error

        async def served() -> bool:  # the slot frees when the server sees the first page gone
            async with http.get(url) as again:
                return again.status == 200 and (await again.content.readline()).startswith(b"data: ")

        await wait_until(served, timeout=10, what="a dashboard page served after the first closed")


async def test_an_out_of_vocabulary_prompt_id_is_refused_alike_in_pd_and_mixed_mode(cluster):
    """A prompt id outside the workers' vocabulary is the request's own fault: 400 / INVALID_ARGUMENT
    with the worker's words, read the same in both modes (PD said "prefill half: ..." before them,
    an internal the client never asked about)."""
    mode, gateway, base, workers = cluster
    await ready(base, len(workers))
    said = "token id 99999 is outside the vocabulary 0..319"  # the toy model's 320 ids
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.completions.create(model=MODEL, prompt=[5, 99999, 7], max_tokens=4)
    message = refused.value.body["message"]
    assert re.fullmatch(rf"request cmpl-[0-9a-f]{{32}}: {re.escape(said)}", message), (mode, message)
    assert refused.value.body["param"] == "prompt", refused.value.body  # was null

    from pdlb.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    async with grpc.aio.insecure_channel(gateway.address) as channel:
        request = common_pb2.InferenceRequest(request_id=f"oov-{mode}", input_ids=[5, 99999, 7])
        request.sampling.max_new_tokens = 4
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GatewayGenerateRequest(request=request))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await rest_of(call)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details() == f"request oov-{mode}: {said}", (mode, failed.value.details())


async def test_a_logit_bias_outside_the_vocabulary_is_refused_naming_logit_bias(cluster):
    """A logit_bias on a token id outside the vocabulary, which only the workers know, was refused
    400 with `param: null`; vLLM names `logit_bias`, and so does the gateway now, streamed or not,
    in both modes, and the SGLang API names `sampling_params.logit_bias`."""
    mode, _gateway, base, workers = cluster
    await ready(base, len(workers))
    said = "logit_bias names token ids outside the vocabulary 0..319: 999999"
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                    logit_bias={"999999": 5, "3": 1}, stream=stream,
                )  # fmt: skip
            body = refused.value.body
            assert body["param"] == "logit_bias" and body["message"].endswith(said), (mode, stream, body)
    code, reply = await asyncio.to_thread(
        post, f"{base}/generate", json.dumps({"text": "hi", "sampling_params": {"logit_bias": {"999999": 1}}}).encode()
    )
    assert code == 400 and reply["error"]["param"] == "sampling_params.logit_bias", reply


MALFORMED = [  # raw requests aiohttp's parser refuses, and words its 400 names the fault with
    (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        "Content-Type",
    ),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", "Content-Length"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "Content-Length"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "chunk"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", "header"),
    (b"GARBAGE\x01 / HTTP/1.1\r\n\r\n", "method"),  # aiohttp logs this one at debug level only
]


async def raw_exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` on a new connection; everything the server sends until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)  # to EOF: the server closed it
    finally:
        writer.close()


async def test_a_malformed_http_request_is_refused_400_and_logged_in_one_line(start_service):
    """Requests aiohttp cannot parse get its 400 naming the fault and a closed connection (they never
    reach the gateway's handlers, so the body is aiohttp's text: it has no hook to shape it), the
    gateway serves on, and its log has one line per refusal (it had an ERROR traceback each)."""
    http_port = free_port()
    gateway = start_service("gateway", "--http-port", str(http_port))
    for raw, words in MALFORMED:
        answer = await raw_exchange(http_port, raw)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", (raw, answer)
        assert words.lower() in body.decode().lower(), (raw, answer)
    served = await raw_exchange(http_port, b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert served.startswith(b"HTTP/1.1 200") and served.endswith(b'{"status": "ok"}'), served
    log = gateway.log_path.read_text()
    refusals = [line for line in log.splitlines() if "malformed HTTP request: " in line]
    assert "Traceback" not in log, log
    assert len(refusals) == len(MALFORMED) - 1, log  # the bad method: at debug level
    assert all(" from 127.0.0.1: " in line for line in refusals), refusals


async def test_a_declared_body_past_the_bound_with_expect_100_continue_is_413_at_once(start_service):
    """`Expect: 100-continue` with a Content-Length past --max-body-bytes got 100 Continue, then (no
    body coming) a 408 after --http-body-timeout: now 413 in OpenAI error JSON before any body, and
    the connection closes; a body within the bound still gets its 100 Continue and is served. Every
    route that reads a body alike: the render routes and SGLang's /generate answered 100 Continue.
    Without `Expect` the same: such a request waited for its body until --http-body-timeout (408);
    an unknown path keeps its 404."""
    http_port = free_port()
    start_service("gateway", "--http-port", str(http_port), "--max-body-bytes", "4096", "--http-body-timeout", "30")
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
    routes = [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions/render"),
        ("POST", "/v1/chat/completions/render"),
        ("POST", "/generate"),
        ("PUT", "/generate"),
    ]
    for (method, path), expect in itertools.product(routes, (True, False)):
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        try:
            first = head.replace(b"POST /v1/completions", f"{method} {path}".encode())
            writer.write(first if expect else first.replace(b"Expect: 100-continue\r\n", b""))
            writer.write(b"Content-Length: 999999999\r\n\r\n")
            await writer.drain()
            status = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
            assert status.startswith("HTTP/1.1 413") and "Connection: close" in status, (path, status)
            length = int(re.search(r"Content-Length: (\d+)", status).group(1))
            error = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))["error"]
            assert "999999999 bytes) exceeds 4096 bytes (--max-body-bytes)" in error["message"], error
        finally:
            writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    try:  # an unknown path keeps its 404 (the head is enough: the connection waits for the body)
        writer.write(b"POST /v1/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 404")
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    try:
        writer.write(head + b"Content-Length: 2\r\nConnection: close\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"{}")  # no model or prompt: the handler's own 400 shows the body was read
        reply = await asyncio.wait_for(reader.read(), 10)
        assert reply.startswith(b"HTTP/1.1 400"), reply
    finally:
        writer.close()


async def test_a_body_that_does_not_decode_is_400_and_one_cut_off_is_499_never_a_500(start_service):
    """A gzip body that is not gzip was a 500 "internal error in the gateway" with a traceback: it
    is the client's 400, naming the encoding, and the connection closes (the rest of the body is
    unknown: kept open, aiohttp reset the next request on it). A client that leaves mid-body counts
    as 499 and leaves no traceback (aiohttp logged an ERROR one)."""
    http_port = free_port()
    gateway = start_service("gateway", "--http-port", str(http_port))
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    def gzipped(body: bytes) -> bytes:
        return f"{head}Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body

    answer = await raw_exchange(http_port, gzipped(b"not gzip at all"))  # read to EOF: closed
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400"), answer
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and "(Content-Encoding: gzip)" in error["message"], error
    async with aiohttp.ClientSession() as http:  # a real gzip body decodes: its empty prompt is what is refused
        async with http.post(
            f"http://127.0.0.1:{http_port}/v1/completions",
            data=gzip.compress(json.dumps({"prompt": "", "max_tokens": 2}).encode()),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        ) as reply:
            assert reply.status == 400 and (await reply.json())["error"]["param"] == "prompt"

        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        writer.write(f"{head}Content-Length: 100\r\n\r\n".encode() + b'{"prompt": ')
        await writer.drain()
        writer.close()  # 11 bytes of 100 sent: the client leaves
        await writer.wait_closed()
        assert await reader.read() == b""

        async def counted() -> bool:
            async with http.get(f"http://127.0.0.1:{http_port}/metrics") as metrics:
                return 'pdlb_gateway_requests_total{api="http",outcome="499"} 1.0' in await metrics.text()

        await wait_until(counted, timeout=10, what="the cut-off request counted as 499")
    log = gateway.log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "Unhandled exception" not in log, log  # the corrupt gzip: the gateway's 400, no fault of its own


@pytest.mark.parametrize("encoding", ["zstd", "br", "compress", "foo", "gzip, zstd"])
async def test_a_content_encoding_not_supported_is_415_naming_the_supported_ones(start_service, encoding):
    """`Content-Encoding: zstd` or `br` got aiohttp's plain-text 400 ("Please install `Brotli`")
    before any of the gateway's code ran, and an unknown coding was read as if uncompressed. Now
    each is 415 in OpenAI's error JSON naming the codings decoded, with `Accept-Encoding` (RFC 9110),
    the connection closed; the gateway logs no fault of its own."""
    http_port = free_port()
    gateway = start_service("gateway", "--http-port", str(http_port), "--dispatcher-wait", "0")
    body = b'{"prompt": "hi", "max_tokens": 2}'  # its coding is refused before the body is read
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Encoding: {encoding}\r\n"
    answer = await raw_exchange(http_port, f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status, _, reply = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 415"), answer
    assert b"\r\nAccept-Encoding: gzip, deflate, identity\r\n" in status, status
    error = json.loads(reply)["error"]
    assert error["type"] == "invalid_request_error", error
    assert error["message"].startswith(f"Content-Encoding {encoding.split(',')[-1].strip()!r} is not supported: "), (
        error
    )
    assert "gzip or deflate" in error["message"], error
    log = gateway.log_path.read_text()
    assert "Unhandled exception" not in log and "Error handling request" not in log, log


async def test_gzip_and_deflate_bodies_decode_within_the_body_bound(start_service):
    """The gateway decodes gzip (and x-gzip, several members), deflate (zlib-wrapped or raw, as
    clients send it) and both in a row; a body cut short, or with bytes after the end of its stream,
    is 400 saying so, and one that decodes past
    --max-body-bytes is 413 (a small compressed body must not expand without bound)."""
    import zlib

    from multidict import CIMultiDict

    http_port = free_port()
    start_service("gateway", "--http-port", str(http_port), "--dispatcher-wait", "0", "--max-body-bytes", "4096")
    url = f"http://127.0.0.1:{http_port}/v1/completions"
    body = json.dumps({"prompt": "", "max_tokens": 2}).encode()  # decoded, its empty prompt is what is refused
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    cases = [
        ("gzip", gzip.compress(body)),
        ("x-gzip", gzip.compress(body[:10]) + gzip.compress(body[10:])),
        ("deflate", zlib.compress(body)),
        ("deflate", raw_deflate.compress(body) + raw_deflate.flush()),
        ("deflate, gzip", gzip.compress(zlib.compress(body))),
        ("identity", body),
    ]
    async with aiohttp.ClientSession() as http:
        for encoding, data in cases:
            headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
            async with http.post(url, data=data, headers=headers) as reply:
                error = (await reply.json())["error"]
                assert reply.status == 400 and error["param"] == "prompt", (encoding, error)
        twice = CIMultiDict([("Content-Type", "application/json"), ("Content-Encoding", "deflate")])
        twice.add("Content-Encoding", "gzip")  # two headers list the codings as one would
        async with http.post(url, data=gzip.compress(zlib.compress(body)), headers=twice) as reply:
            assert reply.status == 400 and (await reply.json())["error"]["param"] == "prompt"
        refusals = [
            ("gzip", gzip.compress(body)[:-12], 400, "the request body ends before its gzip stream does"),
            ("gzip", gzip.compress(b" " * 100_000), 413, "decodes (gzip) to more than 4096 bytes (--max-body-bytes)"),
            ("deflate", b"\x78\x9c not deflate", 400, "the request body is not valid deflate"),
            # junk after the stream was read as a next member: "not valid gzip: incorrect header check"
            ("gzip", gzip.compress(body) + b"junk", 400, "has 4 bytes after the end of its gzip stream"),
            ("gzip", gzip.compress(body) + b"\0\0", 400, "has 2 bytes after the end of its gzip stream"),
            ("gzip", gzip.compress(body) + b"\0", 400, "has 1 byte after the end of its gzip stream"),
            ("deflate", zlib.compress(body) + b"junk", 400, "has 4 bytes after the end of its deflate stream"),
            # a label that does not match the body got the library's words: zlib's "incorrect header
            # check", or a JSON / UTF-8 decoding error about compressed bytes
            (
                "gzip",
                body,
                400,
                "the body is not gzip data (Content-Encoding: gzip): it starts with '{\"prompt', not gzip's magic "
                "bytes 1f 8b; check the Content-Encoding header (leave it out for a body sent uncompressed)",
            ),
            (
                "deflate",
                body,
                400,
                "the body is not deflate data (Content-Encoding: deflate): it starts with '{\"prompt'",
            ),
            (
                "identity",
                gzip.compress(body),
                400,
                "the body starts with a gzip header but Content-Encoding is 'identity': check the Content-Encoding "
                "header (send Content-Encoding: gzip with it, or the body uncompressed)",
            ),
            (
                "",
                gzip.compress(body),
                400,
                "the body starts with a gzip header but there is no Content-Encoding header",
            ),
            (
                "",
                zlib.compress(body),
                400,
                "starts with a zlib (deflate) header but there is no Content-Encoding header",
            ),
            (
                "gzip",
                gzip.compress(gzip.compress(body)),
                400,
                "with its Content-Encoding ('gzip') undone, the body still starts with a gzip header: check the "
                "Content-Encoding header (list gzip once for each time the body was compressed)",
            ),
        ]
        for encoding, data, status, said in refusals:
            headers = {"Content-Type": "application/json", **({"Content-Encoding": encoding} if encoding else {})}
            async with http.post(url, data=data, headers=headers) as reply:
                error = (await reply.json())["error"]
                assert reply.status == status and said in error["message"], (encoding, reply.status, error)
                assert error["type"] == "invalid_request_error" and error["param"] is None, error


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_a_chunked_body_broken_after_the_headers_is_refused_saying_it_may_be_malformed(start_service, parser):
    """A chunked body whose framing breaks after the headers arrived (a chunk size that is not hex)
    is dropped by aiohttp's C parser without a word to the gateway, whose read then waits: it ends at
    --http-body-timeout, and the 408 no longer says only that the body "did not arrive" but that it
    may have stopped short or be malformed, so the client looks at what it sent. aiohttp's
    pure-Python parser (AIOHTTP_NO_EXTENSIONS=1) does tell: a 400 at once naming the framing."""
    http_port = free_port()
    start_service(
        "gateway", "--http-port", str(http_port), "--dispatcher-wait", "0", "--http-body-timeout", "5",
        "--max-concurrent-streams", "1", env={"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "python" else {},
    )  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    writer.write(head + b'5\r\n{"pro\r\n')
    await writer.drain()
    async with aiohttp.ClientSession() as http:

        async def in_handler() -> bool:  # it holds the only stream slot: it is in its handler, reading its body
            async with http.post(f"http://127.0.0.1:{http_port}/v1/completions", json={"prompt": "x"}) as reply:
                return reply.status == 429

        await wait_until(in_handler, timeout=10, what="the chunked request in its handler")
    writer.write(b"zz\r\n")  # not a chunk size
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 30)  # to EOF: answered, then closed
    writer.close()
    status, _, reply = answer.partition(b"\r\n\r\n")
    message = json.loads(reply)["error"]["message"]
    if parser == "python":
        assert status.startswith(b"HTTP/1.1 400"), answer
        assert message == "the request body's chunked framing is broken (Transfer-Encoding: chunked): 'zz'", message
        return
    assert status.startswith(b"HTTP/1.1 408"), answer
    assert message == (
        "the request body did not arrive whole within 5 s (--http-body-timeout): it was sent too slowly, stopped "
        "short of its Content-Length, or its chunked framing is malformed"
    ), message


@pytest.mark.parametrize("flags", [[], ["--prefill-dispatcher", "127.0.0.1:1"]], ids=["none", "prefill-only"])
async def test_a_request_with_no_dispatcher_known_fails_503_once_saying_what_to_start(start_service, flags):
    """No dispatcher (or half of PD) known: one membership wait, then 503 naming what is missing
    and where the gateway looks. It was retried, waiting twice, and its message read "failed again
    through  (no dispatchers known ...)", naming no dispatcher; gRPC alike."""
    http_port = free_port()
    gateway = start_service("gateway", "--http-port", str(http_port), *flags)
    known = "only a prefill one is known" if flags else "none is known"
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as failed:
            await c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert failed.value.status_code == 503 and failed.value.response.headers["Retry-After"] == "5"
    message = failed.value.body["message"]
    assert re.fullmatch(
        r"request cmpl-[0-9a-f]{32}: no dispatchers known after 5\.0 s \(a mixed one, or a prefill and a decode "
        rf"one; {known}\): start them, or check the gateway's --etcd and --etcd-prefix or its --dispatcher, "
        r"--prefill-dispatcher and --decode-dispatcher",
        message,
    ), message

    from pdlb.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    async with grpc.aio.insecure_channel(gateway.address) as channel:
        request = common_pb2.InferenceRequest(request_id="nowhere", text="hi")
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GatewayGenerateRequest(request=request))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rest_of(call)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.value.details().startswith("request nowhere: no dispatchers known after 5.0 s (a mixed one, or "), (
        refused.value.details()
    )
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{http_port}/metrics") as metrics:
        assert "pdlb_gateway_retries_total 0.0" in await metrics.text()  # not re-run: the wait was the retry


async def test_a_prompt_id_out_of_range_and_a_wrong_method_are_refused_saying_what_is_wrong(start_service):
    """A prompt id of 10**10 was refused with "prompt token ids must be >= 0"; now the message names
    the id, its place and what a token id is (the SGLang API's input_ids alike). A 405 lost
    aiohttp's Allow header (RFC 9110 requires it) and did not say which method the path takes."""
    http_port = free_port()
    start_service("gateway", "--http-port", str(http_port))
    base = f"http://127.0.0.1:{http_port}"
    said = "is not a token id: token ids are integers from 0 to the model's vocabulary size - 1"
    async with aiohttp.ClientSession() as http:
        for path, field, ids in [
            ("/v1/completions", "prompt", [5, 10**10]),
            ("/v1/completions", "prompt", [-3]),
            ("/generate", "input_ids", [5, 6, 2**31]),
        ]:
            async with http.post(f"{base}{path}", json={field: ids}) as reply:
                error = (await reply.json())["error"]
            assert reply.status == 400 and error["param"] == field, error
            assert error["message"] == f"{field}[{len(ids) - 1}] = {ids[-1]} {said}", error
        async with http.delete(f"{base}/v1/completions") as reply:
            error = (await reply.json())["error"]
            assert reply.status == 405 and reply.headers["Allow"] == "POST", reply.headers
        assert error["message"] == "DELETE /v1/completions: Method Not Allowed (it takes POST)", error


async def test_sigterm_answers_a_request_whose_body_is_still_arriving_503_at_once(start_service):
    """SIGTERM while a request's body still arrives: it never started here, so it gets 503 naming
    the shutdown at once and the gateway exits without waiting out its grace (it held the exit for
    the whole grace, then closed the connection without a word)."""
    http_port = free_port()
    gateway = start_service(
        "gateway", "--http-port", str(http_port), "--max-concurrent-streams", "1", "--shutdown-grace", "60"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n"
    writer.write(head.encode() + b'{"prompt": ')  # 11 bytes of 50
    await writer.drain()
    async with aiohttp.ClientSession() as http:

        async def slot_taken() -> bool:  # the slow request holds the only stream slot: it is in its handler
            async with http.post(f"http://127.0.0.1:{http_port}/v1/completions", json={"prompt": "x"}) as reply:
                return reply.status == 429

        await wait_until(slot_taken, timeout=10, what="the slow-body request in its handler")
    gateway.signal_stop()
    answer = await asyncio.wait_for(reader.read(), 30)  # to EOF: answered, then closed
    writer.close()
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 503"), answer
    error = json.loads(body)["error"]
    assert error["type"] == "server_error", error
    assert error["message"] == (
        "the gateway is shutting down and the request body was still arriving; send the request to another one"
    ), error
    assert await asyncio.to_thread(gateway.proc.wait, 30) == 0  # well within its 60 s grace


HEADER_NUMBERS = [  # (header or None for the body's logit_bias, value as sent, the param refused)
    ("X-pdlb-TTFT-Deadline-Ms", "²".encode(), "X-pdlb-TTFT-Deadline-Ms"),  # was a 500: int('²') raised
    ("X-pdlb-TTFT-Deadline-Ms", "\u0661\u0662".encode(), "X-pdlb-TTFT-Deadline-Ms"),  # Arabic-Indic 12: 12 ms
    ("X-pdlb-TTFT-Deadline-Ms", b"99999999999999999999", "X-pdlb-TTFT-Deadline-Ms"),
    ("X-data-parallel-rank", "\u0661".encode(), "X-data-parallel-rank"),  # was a pin to rank 1
    ("X-data-parallel-rank", b"1_0", "X-data-parallel-rank"),  # was a pin to rank 10
    (None, "\u0661\u0662".encode(), "logit_bias"),  # was a bias on token 12
    (None, b" 7", "logit_bias"),
]


@pytest.mark.parametrize(("header", "value", "param"), HEADER_NUMBERS)
async def test_numbers_in_headers_and_keys_are_ascii_digits_or_refused(start_service, header, value, param):
    """Python's int() reads other scripts' digits, '_' and spaces, and raises on '²': a deadline
    header of '²' was a 500, and Arabic-Indic '12' a 12 ms deadline, a rank pin or a logit_bias key. A number a
    client sends as text is ASCII digits, or a 400 naming where it was sent."""
    http_port = free_port()
    start_service("gateway", "--http-port", str(http_port), "--dispatcher-wait", "0")
    bias = {value.decode(): 1} if header is None else {}
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "logit_bias": bias}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    sent = head + (f"{header}: ".encode() + value + b"\r\n" if header else b"")
    answer = await raw_exchange(http_port, sent + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status, _, reply = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400"), answer
    error = json.loads(reply)["error"]
    assert error["param"] == param, error
    assert "ASCII digits" in error["message"] or "from 1 to 4294967295" in error["message"], error


@pytest.mark.parametrize("header", ["X-Session-Id", "X-pdlb-Tenant"])
async def test_a_text_header_that_is_not_utf8_is_refused_400_naming_it(start_service, header):
    """X-Session-Id or X-pdlb-Tenant bytes that are not UTF-8 were a 500 (aiohttp keeps them as lone
    surrogates, which the request's protobuf string cannot hold); now a 400 naming the header."""
    http_port = free_port()
    start_service("gateway", "--http-port", str(http_port), "--dispatcher-wait", "0")
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    sent = head + header.encode() + b": \xff\xfe\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    status, _, reply = (await raw_exchange(http_port, sent)).partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400"), (status, reply)
    error = json.loads(reply)["error"]
    said = f"the {header} header must be UTF-8 text, not the bytes b'\\xff\\xfe'"
    assert error["param"] == header and said in error["message"], error


def test_an_http_port_in_use_is_one_line_naming_the_flag(start_service):
    # what a second gateway, or a test beside a running `pdlb up`, meets on the default port 8000:
    # exit 1 with one line, not a traceback
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = rf"exited with status 1: .*127\.0\.0\.1:{port} \(--http-port\).*in use"
        with pytest.raises(ServiceFailed, match=refused):
            start_service("gateway", "--http-port", str(port), "--dispatcher", "127.0.0.1:1")
