"""Load: back-pressure instead of unbounded buffering, and a soak with a memory bound.

The soak runs for PDLB_SOAK_SECONDS (20 by default; longer runs are the same test) with churning
prefixes and session keys, so every client-keyed structure (prefix cache, prefix index, session
map, in-flight table) is exercised past its bound. Memory (RSS) is measured after a warm-up and at
the end, and may grow by at most SOAK_RSS_BOUND_MB per process.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import grpc

from pdlb.v1 import dispatch_pb2
from tests.helpers import dispatch_stub, load_snapshot, request, wait_for_workers, wait_until

SOAK_SECONDS = float(os.environ.get("PDLB_SOAK_SECONDS", "20"))
SOAK_RSS_BOUND_MB = 24.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def outcome_of(stub, req, timeout: float = 60) -> grpc.StatusCode:
    try:
        async for _ in stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=timeout):
            pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_flood_gets_resource_exhausted_and_everything_else_completes(etcd, prefix, start_service):
    flags = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *flags, "--max-concurrent-requests", "40")
    for rank in range(2):
        start_service(
            "scheduler", *flags, "--runner", "sim", "--dp-rank", str(rank),
            "--max-running-requests", "4", "--max-waiting-requests", "8", name=f"s{rank}",
        )  # fmt: skip
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 2)
        flood = [outcome_of(stub, request(f"f{i}", "flood", max_new_tokens=60)) for i in range(200)]
        codes = await asyncio.wait_for(asyncio.gather(*flood), 120)  # every request ends: none hangs
        served = codes.count(grpc.StatusCode.OK)
        pushed_back = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert served + pushed_back == 200, set(codes)
        # At most 2 x (4 running + 8 waiting) fit the workers, and 40 the dispatcher, at a time.
        assert pushed_back >= 200 - 40 and served >= 2 * (4 + 8)
        rows = (await load_snapshot(stub)).workers
        assert all(r.inflight_requests == 0 for r in rows)  # refused requests are not left counted
        assert await outcome_of(stub, request("after-flood", "ok", max_new_tokens=3)) == grpc.StatusCode.OK


async def test_soak_memory_stays_bounded(etcd, prefix, start_service):
    flags = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service(
        "dispatcher", *flags, "--load-balance-method", "cache_aware",
        "--cache-index-blocks", "256", "--max-routing-keys", "500",
    )  # fmt: skip
    sched_flags = ["--runner", "sim", "--max-total-tokens", "4096", "--max-running-requests", "16"]
    schedulers = [
        start_service("scheduler", *flags, *sched_flags, "--dp-rank", str(rank), name=f"soak{rank}")
        for rank in range(2)
    ]
    rng = random.Random(7)
    counts: dict[grpc.StatusCode, int] = {}
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 2)

        async def client(worker: int, until: float) -> None:
            n = 0
            while time.monotonic() < until:
                group = rng.randrange(10_000)  # churning prefixes: caches and the index keep evicting
                prompt = [group % 256, (group // 256) % 256] * 40 + [rng.randrange(256) for _ in range(20)]
                req = request(f"c{worker}-{n}", input_ids=prompt, max_new_tokens=rng.randrange(1, 12))
                req.routing_key = f"session-{rng.randrange(5000)}"
                code = await outcome_of(stub, req)
                counts[code] = counts.get(code, 0) + 1
                n += 1

        warmup = max(3.0, SOAK_SECONDS / 4)
        start = time.monotonic()
        await asyncio.gather(*[client(i, start + warmup) for i in range(12)])
        procs = [dispatcher, *schedulers]
        before = {p.name: rss_mb(p.pid) for p in procs}
        served_before = counts.get(grpc.StatusCode.OK, 0)
        await asyncio.gather(*[client(i + 100, time.monotonic() + SOAK_SECONDS) for i in range(12)])
        after = {p.name: rss_mb(p.pid) for p in procs}

        async def settled() -> bool:
            rows = (await load_snapshot(stub)).workers
            return all(r.inflight_requests == 0 and r.reported.running_requests == 0 for r in rows)

        await wait_until(settled, what="the cluster to settle after the soak")
        rows = (await load_snapshot(stub)).workers
    served = counts.get(grpc.StatusCode.OK, 0)
    growth = {name: after[name] - before[name] for name in before}
    print(
        f"soak {SOAK_SECONDS:.0f}s: served {served - served_before} requests, RSS MB before {before}, growth {growth}"
    )
    assert set(counts) == {grpc.StatusCode.OK}, counts  # nothing failed under sustained load
    assert served - served_before > 50
    assert all(g <= SOAK_RSS_BOUND_MB for g in growth.values()), growth
    assert all(r.reported.kv_tokens_used <= r.reported.kv_tokens_capacity for r in rows)
