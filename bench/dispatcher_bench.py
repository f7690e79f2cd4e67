"""Dispatcher overhead: decision time per dispatch vs ranks, and Route throughput vs a bare echo server.

Run: `make bench` (or `python -m bench.dispatcher_bench --quick`). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import grpc

from pdlb.common.processes import ServiceProcess, script
from pdlb.services.dispatcher.load_table import LoadTable, ReportedLoad, Role, Worker
from pdlb.services.dispatcher.policies import PolicyOptions, RouteContext, create_policy, method_names
from pdlb.services.dispatcher.router import Router
from pdlb.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc


def decision_times(ranks: int, method: str, decisions: int = 2000, repeats: int = 5) -> float:
    """Median microseconds per Router.decide (policy + in-flight bookkeeping), with a report from a
    random rank every 4 decisions so reports interleave with dispatches as in production."""
    rng = random.Random(ranks)
    table = LoadTable()
    for r in range(ranks):
        table.upsert(Worker(f"w{r}", Role.MIXED, r, f"h:{r}"))
        table.apply_report(
            f"w{r}",
            ReportedLoad(
                running_requests=rng.randrange(50),
                running_tokens=rng.randrange(10**5),
                kv_tokens_used=rng.randrange(10**5),
                kv_tokens_capacity=10**5,
                max_running_requests=64,
                prefill_tokens_per_s=rng.uniform(5e3, 2e4),
                step_ms=rng.uniform(10, 40),
                mean_output_tokens=rng.uniform(50, 300),
            ),
            0,
        )
    router = Router(Role.PREFILL, table, create_policy(method, Role.PREFILL, PolicyOptions(dp_size=ranks)))
    for entry in table.candidates():  # policies learn the reported loads as the dispatcher feeds them
        router.policy.on_report(entry)
    # Prompts share one of 64 system prompts (512 tokens) plus a question: cache_aware hashes them.
    prefixes = [[rng.randrange(256) for _ in range(512)] for _ in range(64)]
    contexts = []
    for i in range(decisions):
        prompt = rng.choice(prefixes) + [rng.randrange(256) for _ in range(rng.randrange(1, 512))]
        contexts.append(RouteContext(f"r{i}", len(prompt), bootstrap_room=rng.getrandbits(32), input_ids=prompt))
    samples = []
    for _ in range(repeats):
        fresh = [replace(ctx, _chains={}) for ctx in contexts]  # each request is hashed once, as in production
        start = time.perf_counter()
        for i, ctx in enumerate(fresh):
            decision = router.decide(ctx)
            if i % 4 == 3:
                entry = table.get(f"w{rng.randrange(ranks)}")
                table.apply_report(entry.worker.worker_id, entry.reported, entry.next_seq)
                router.policy.on_report(entry)
        samples.append((time.perf_counter() - start) / decisions * 1e6)
        del decision
    return statistics.median(samples)


async def route_throughput(address: str, seconds: float, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = dispatch_pb2_grpc.DispatchStub(channel)
        req = dispatch_pb2.RouteRequest(request=common_pb2.InferenceRequest(request_id="b", input_ids=list(range(64))))
        await stub.Route(req, timeout=5)
        done = 0
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await stub.Route(req, timeout=5)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return done / (time.perf_counter() - start)


def start_servers(log_dir: str) -> tuple[ServiceProcess, ServiceProcess]:
    workers = ",".join(f"{r}@127.0.0.1:{20000 + r}" for r in range(8))
    dispatcher = ServiceProcess(
        "dispatcher",
        [
            *script("pdlb-dispatcher"),
            "--port",
            "0",
            "--workers",
            workers,
            "--load-balance-method",
            "total_tokens",
            "--stale-after",
            "3600",
            "--inflight-timeout",
            "2",
            "--log-level",
            "WARNING",
        ],
        log_dir,
    )
    echo = ServiceProcess("echo", [sys.executable, "-m", "bench.echo_server", "0"], log_dir)
    return dispatcher.start(), echo.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke run)")
    parser.add_argument("--ranks", default="8,64,512,1024")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: all)")
    parser.add_argument("--decisions-only", action="store_true", help="skip the Route throughput part")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    # every registered method (baselines included), without `auto`, unless --methods names some
    methods = args.methods.split(",") if args.methods else method_names()[1:]
    print("## Decision time per dispatch (median µs, policy + in-flight bookkeeping)\n")
    print("| method | " + " | ".join(f"{r} ranks" for r in ranks) + " |")
    print("|---|" + "---|" * len(ranks))
    for method in methods:
        cells = [f"{decision_times(r, method, 500 if args.quick else 2000, 3 if args.quick else 5):.1f}" for r in ranks]
        print(f"| {method} | " + " | ".join(cells) + " |")

    if args.decisions_only:
        return 0
    print("\n## Route RPC throughput vs a bare echo server of the same shape (same run, alternating)\n")
    dispatcher, echo = start_servers(tempfile.mkdtemp(prefix="pdlb-bench-"))
    rounds, seconds = (2, 2.0) if args.quick else (5, 4.0)
    print("| concurrency | echo req/s | pdlb Route req/s | ratio |")
    print("|---|---|---|---|")
    try:
        for concurrency in (1, 16, 64):
            pdlb_rates, echo_rates = [], []
            for _ in range(rounds):
                echo_rates.append(asyncio.run(route_throughput(echo.address, seconds, concurrency)))
                pdlb_rates.append(asyncio.run(route_throughput(dispatcher.address, seconds, concurrency)))
            e, p = statistics.median(echo_rates), statistics.median(pdlb_rates)
            print(f"| {concurrency} | {e:,.0f} | {p:,.0f} | {p / e:.2f} |", flush=True)
    finally:
        dispatcher.terminate()
        echo.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
