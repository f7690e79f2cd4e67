"""The real routers in front of pdlb's gateway, and pdlb's re-implemented peers against them.

SGLang's model gateway (`smg launch --dp-aware`, PyPI sglang-router 0.3.2) and vllm-router 0.1.17
(`--intra-node-data-parallel-size`) choose pdlb's DP ranks themselves: they read `dp_size` from the
gateway, address `url@rank`, and pin each request (SGLang: `data_parallel_rank` in the body, vLLM:
the `X-data-parallel-rank` header). The routers come from `make install-routers` (ROUTERS_VENV);
without them these tests skip and say how to install them.

Decisions are compared on the same load: requests one at a time, so every policy sees an idle
cluster before each decision. SGLang's router round robin and pdlb's `peer_sglang_round_robin`
(and vLLM's) must then each visit every rank once per cycle, in a fixed order. The order itself
may differ: smg lists `url@rank` workers in the order their registrations finished (seen: 1, 0,
3, 2), a relabelling of the ranks that changes no load.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from bench import peer_routers
from pdlb.common.free_port import free_port
from tests.helpers import dispatch_stub, shared_prefix_ranks, wait_for_workers

pytestmark = [
    pytest.mark.skipif(
        not peer_routers.available(),
        reason=f"routers not installed at {peer_routers.venv()}: run `make install-routers` (or set ROUTERS_VENV)",
    ),
    pytest.mark.timeout(300),  # eight services and a router start per test; slow on a loaded 2-core machine
]
RANKS = 4
MODEL = "tiny-random"


async def ranks_served(url: str, count: int, session: aiohttp.ClientSession) -> list[int]:
    """The rank of each of `count` completions sent one after another."""
    ranks = []
    for i in range(count):
        body = {"model": MODEL, "prompt": f"request {i} " * 8, "max_tokens": 2, "ignore_eos": True}
        async with session.post(f"{url}/v1/completions", json=body) as reply:
            assert reply.status == 200, await reply.text()
            ranks.append((await reply.json())["dp_rank"])
    return ranks


def is_rotation(ranks: list[int]) -> bool:
    """Every run of RANKS consecutive picks covers all ranks, always in the same cyclic order."""
    return all(ranks[i] == ranks[i % RANKS] for i in range(len(ranks))) and sorted(ranks[:RANKS]) == list(range(RANKS))


@pytest.fixture
async def cluster(etcd, prefix, start_service, tmp_path):
    """RANKS sim ranks; a dispatcher + gateway with `peer_sglang_round_robin`, and a pinned pair
    (the ranks come from the router in front)."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    ranks = [
        start_service("scheduler", *common, "--dp-rank", str(r), "--runner", "sim", "--sim-slowdown", "0.1", wait=False)
        for r in range(RANKS)
    ]
    for rank in ranks:  # started together, ready in any order
        rank.wait_ready(120)
    urls = {}
    for method in ("peer_sglang_round_robin", "round_robin"):
        dispatcher = start_service("dispatcher", *common, "--load-balance-method", method, "--dp-size", str(RANKS))
        channel, stub = dispatch_stub(dispatcher.address)
        await wait_for_workers(stub, RANKS)
        await channel.close()
        port = free_port()
        start_service("gateway", "--etcd", "", "--dispatcher", dispatcher.address, "--http-port", str(port))
        urls[method] = f"http://127.0.0.1:{port}"
    routers = []
    yield urls, routers, tmp_path
    for router in routers:
        router.stop()


@pytest.mark.parametrize("kind", ["smg", "vllm-router"])
async def test_router_round_robin_picks_pdlb_ranks_like_the_reimplemented_peer(cluster, kind):
    urls, routers, log_dir = cluster
    router = peer_routers.Router(kind, "round_robin", [urls["round_robin"]], dp_size=RANKS, log_dir=log_dir)
    routers.append(await asyncio.to_thread(router.start))
    await peer_routers.wait_serving(router.url, MODEL)
    async with aiohttp.ClientSession() as session:
        real = await ranks_served(router.url, 3 * RANKS, session)
        mine = await ranks_served(urls["peer_sglang_round_robin"], 3 * RANKS, session)
    assert is_rotation(real), f"{kind} round_robin over pdlb's ranks: {real}"
    assert is_rotation(mine), f"peer_sglang_round_robin: {mine}"


@pytest.mark.parametrize("kind", ["smg", "vllm-router"])
async def test_router_cache_aware_keeps_a_prefix_on_one_pdlb_rank(cluster, kind):
    """The router's own prefix tree decides: one long shared prefix stays on the rank it chose."""
    urls, routers, log_dir = cluster
    router = peer_routers.Router(kind, "cache_aware", [urls["round_robin"]], dp_size=RANKS, log_dir=log_dir)
    routers.append(await asyncio.to_thread(router.start))
    await peer_routers.wait_serving(router.url, MODEL)
    ranks = await shared_prefix_ranks(router.url, MODEL, 6)
    assert len(set(ranks[1:])) == 1, f"{kind} cache_aware spread one prefix over ranks {ranks}"
