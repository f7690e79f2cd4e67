"""The field's routers in front of a real pdlb gateway: SGLang's model gateway (`smg`, PyPI
sglang-router 0.3.2) with `--dp-aware`, and vllm-router 0.1.17 with its DP-aware mode, over a mixed
cluster of sim ranks. They must pass chat, streaming and completions through, and a rank the router
picks must be the rank that serves (the dispatcher counts it as an external pin).

The routers come from the virtualenv `make install-routers` builds (`ROUTERS_VENV`); the tests skip,
saying so, when it is not there."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import aiohttp
import pytest

from bench import peer_routers
from pdlb.common.free_port import free_port
from tests.helpers import dispatch_stub, load_snapshot, shared_prefix_ranks, wait_for_workers, wait_until

MODEL = "tiny-random"
RANKS = 2

pytestmark = pytest.mark.skipif(
    not all((peer_routers.venv() / "bin" / name).is_file() for name in ("smg", "vllm-router")),
    reason=f"smg / vllm-router not installed in {peer_routers.venv()}: run `make install-routers` "
    "(or set ROUTERS_VENV to their virtualenv)",
)


@pytest.fixture
def gateway(etcd, prefix, start_service, tmp_path):
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    metrics = free_port()
    dispatcher = start_service("dispatcher", *common, "--metrics-port", str(metrics), name="disp")
    for rank in range(RANKS):
        start_service("scheduler", *common, "--runner", "sim", "--dp-rank", str(rank), name=f"sim-{rank}")
    http_port = free_port()
    start_service("gateway", *common, "--http-port", str(http_port))
    return dispatcher, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics}/metrics"


def external_dispatches(metrics_url: str) -> dict[int, int]:
    """Per rank, the dispatches decided by a pin in the request (method "external")."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    counts = {}
    for line in text.splitlines():
        match = re.match(r"pdlb_dispatches_total\{(.*)\} ([0-9.e+]+)", line)
        if match and 'method="external"' in match.group(1):
            rank = int(re.search(r'dp_rank="(\d+)"', match.group(1)).group(1))
            counts[rank] = int(float(match.group(2)))
    return counts


async def pass_through(url: str) -> list[dict]:
    """Chat, streamed chat and completions through a router; the non-streamed bodies."""
    bodies = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True}
        async with http.post(f"{url}/v1/chat/completions", json=chat) as reply:
            body = await reply.json()
            assert reply.status == 200, body
            assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] == 5
            bodies.append(body)
        async with http.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}) as reply:
            assert reply.status == 200, await reply.text()
            events = [line for line in (await reply.text()).splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
            assert "".join(deltas)
        completion = {"model": MODEL, "prompt": "Once upon", "max_tokens": 4, "ignore_eos": True}
        async with http.post(f"{url}/v1/completions", json=completion) as reply:
            body = await reply.json()
            assert reply.status == 200, body
            assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 4
            bodies.append(body)
    return bodies


@pytest.mark.parametrize("kind", ["smg", "vllm-router"])
async def test_dp_aware_router_picks_pdlb_ranks(gateway, kind, tmp_path):
    dispatcher, base, metrics = gateway
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, RANKS)
    router = peer_routers.Router(kind, "round_robin", [base], dp_size=RANKS, log_dir=tmp_path)
    await asyncio.to_thread(router.start)
    try:
        await peer_routers.wait_serving(router.url, MODEL)
        await pass_through(router.url)
        before = external_dispatches(metrics)
        async with aiohttp.ClientSession() as http:
            for _ in range(6):
                body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
                async with http.post(f"{router.url}/v1/completions", json=body) as reply:
                    assert reply.status == 200, await reply.text()
        after = external_dispatches(metrics)
        # Every request came with the router's pin, and round robin over url@0, url@1 spread them evenly.
        added = {rank: after.get(rank, 0) - before.get(rank, 0) for rank in range(RANKS)}
        assert added == {0: 3, 1: 3}, (before, after)
    finally:
        router.stop()


def renders(base: str) -> int:
    """Render calls the gateway answered (vLLM's /v1/completions/render and chat's), from its metrics."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(r'pdlb_gateway_requests_total\{api="render",outcome="200"\} ([0-9.e+]+)', text)
    return int(float(match.group(1))) if match else 0


async def test_vllm_router_cache_aware_matches_on_the_gateways_token_ids(gateway, tmp_path):
    """vllm-router's cache_aware asks the worker to render every request into token ids and matches
    prefixes on those: through pdlb's gateway each request is rendered once, then served, and a
    shared prefix stays on the rank the router chose for it."""
    dispatcher, base, _ = gateway
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, RANKS)
    router = peer_routers.Router("vllm-router", "cache_aware", [base], dp_size=RANKS, log_dir=tmp_path)
    await asyncio.to_thread(router.start)
    try:
        await peer_routers.wait_serving(router.url, MODEL)
        before = renders(base)
        await pass_through(router.url)  # chat, streamed chat, completions
        ranks = await shared_prefix_ranks(router.url, MODEL, 4, repeats=8)
        assert renders(base) - before == 3 + 4
        assert len(set(ranks[1:])) == 1, f"cache_aware spread one prefix over ranks {ranks}"
    finally:
        router.stop()


async def test_smg_forwards_sglang_generate_to_the_ranks_it_picks(gateway, tmp_path):
    """SGLang's native /generate through `smg --dp-aware`: smg adds its rank pick to the body and
    the gateway serves it there, in SGLang's response shape, streamed or not."""
    dispatcher, base, metrics = gateway
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, RANKS)
    router = peer_routers.Router("smg", "round_robin", [base], dp_size=RANKS, log_dir=tmp_path)
    await asyncio.to_thread(router.start)
    try:
        await peer_routers.wait_serving(router.url, MODEL)
        before = external_dispatches(metrics)
        served = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            for i in range(4):
                body = {
                    "text": f"Once upon a time {i}",
                    "sampling_params": {"max_new_tokens": 5, "ignore_eos": True, "temperature": 0},
                    "stream": i % 2 == 1,
                }
                async with http.post(f"{router.url}/generate", json=body) as reply:
                    assert reply.status == 200, await reply.text()
                    if body["stream"]:
                        events = [line for line in (await reply.text()).splitlines() if line.startswith("data: ")]
                        assert events[-1] == "data: [DONE]", events[-3:]
                        out = json.loads(events[-2][6:])
                    else:
                        out = await reply.json()
                assert len(out["output_ids"]) == 5 and out["text"], out
                meta = out["meta_info"]
                assert meta["finish_reason"] == {"type": "length", "length": 5} and meta["completion_tokens"] == 5
                served.append(meta["dp_rank"])
        after = external_dispatches(metrics)
        added = {rank: after.get(rank, 0) - before.get(rank, 0) for rank in range(RANKS)}
        assert added == {0: 2, 1: 2}, (served, before, after)  # every request pinned by smg, in turn
        assert sorted(served) == [0, 0, 1, 1]
    finally:
        router.stop()


def gateway_answers(base: str, status: int) -> int:
    """HTTP requests the gateway answered with `status` (its /metrics)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(rf'pdlb_gateway_requests_total\{{api="http",outcome="{status}"\}} ([0-9.e+]+)', text)
    return int(float(match.group(1))) if match else 0


RECOMMENDED = ["--disable-circuit-breaker", "--disable-retries"]  # README: routers before --flow-control
SHED = 12  # more than the routers' circuit-breaker threshold (10 failures in a row)


@pytest.mark.parametrize(
    ("kind", "extra"), [("smg", RECOMMENDED), ("vllm-router", RECOMMENDED), ("smg", []), ("vllm-router", [])]
)
async def test_router_before_flow_control_passes_429_on(etcd, prefix, start_service, tmp_path, kind, extra):
    """A router in front of a gateway whose dispatcher sheds with --flow-control: the only rank is
    held, its queue (1) is full, and SHED more requests through the router are shed. With the
    README's flags every one reaches the client as 429 with the dispatcher's Retry-After, the gateway
    answers each once (the router retried none), and the router serves the next requests as soon
    as the rank frees (no circuit opened). With their defaults, both retry each 429 at once (the
    gateway sees it several times), and smg then opens its circuit: later requests get 503
    although the cluster serves, which is why the flags are needed."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *common, "--flow-control", "--max-queued-requests", "1", name="disp")
    sim = ["--runner", "sim", "--sim-slowdown", "10", "--max-running-requests", "1", "--report-interval-ms", "50"]
    start_service("scheduler", *common, *sim, "--dp-rank", "0", name="sim-0")
    http_port = free_port()
    start_service("gateway", *common, "--http-port", str(http_port))
    base = f"http://127.0.0.1:{http_port}"
    channel, stub = dispatch_stub(dispatcher.address)
    await wait_for_workers(stub, 1)
    router = peer_routers.Router(kind, "round_robin", [base], log_dir=tmp_path, extra=extra)
    await asyncio.to_thread(router.start)
    small = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "ignore_eos": True}
    try:
        await peer_routers.wait_serving(router.url, MODEL)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            # the rank held by a long stream sent to the gateway itself (cancelled below), one queued
            blocker = await http.post(f"{base}/v1/completions", json={**small, "max_tokens": 2000, "stream": True})
            assert blocker.status == 200
            await blocker.content.readline()  # its first event: it runs
            queued = asyncio.create_task(http.post(f"{router.url}/v1/completions", json=small))

            async def one_queued() -> bool:
                return (await load_snapshot(stub)).flow.queued_requests == 1

            await wait_until(one_queued, what="a request queued behind the held rank")
            before = gateway_answers(base, 429)
            answers = []
            for _ in range(SHED):
                async with http.post(f"{router.url}/v1/completions", json=small) as reply:
                    answers.append((reply.status, reply.headers.get("Retry-After"), await reply.text()))
            blocker.close()  # the rank frees: the queued request runs
            async with await queued as reply:
                assert reply.status == 200, await reply.text()
            later = []
            for _ in range(3):
                async with http.post(f"{router.url}/v1/completions", json=small) as reply:
                    later.append((reply.status, await reply.text()))
        shed_at_gateway = gateway_answers(base, 429) - before
        if extra:
            assert [status for status, _, _ in answers] == [429] * SHED, answers
            assert all(after and int(after) >= 1 for _, after, _ in answers), answers  # Retry-After passed on
            assert all("rate_limit_exceeded" in body for _, _, body in answers), answers[0]
            assert shed_at_gateway == SHED  # each answered once: the router retried none
            assert [status for status, _ in later] == [200] * 3, later  # no circuit opened
        elif kind == "smg":  # its defaults: each 429 retried, then its circuit opens while the cluster serves
            assert [status for status, _, _ in answers[:2]] == [429, 429] and shed_at_gateway > 2, answers
            assert [status for status, _ in later] == [503] * 3, later
            assert all("no_available_workers" in body for _, body in later), later[0]
        else:  # vllm-router's defaults: no circuit opened, but every 429 was retried at once
            assert [status for status, _, _ in answers] == [429] * SHED, answers
            assert shed_at_gateway > SHED, shed_at_gateway
            assert [status for status, _ in later] == [200] * 3, later
    finally:
        router.stop()
        await channel.close()
