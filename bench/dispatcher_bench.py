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
from collections import OrderedDict
from dataclasses import replace

import grpc

from pdlb.common.processes import ServiceProcess, script
from pdlb.services.dispatcher.flow_control import FlowControl, FlowOptions
from pdlb.services.dispatcher.kv_index import ExactPrefixIndex
from pdlb.services.dispatcher.load_table import LoadTable, ReportedLoad, Role, Worker
from pdlb.services.dispatcher.policies import PolicyOptions, RouteContext, create_policy, method_names
from pdlb.services.dispatcher.router import Router
from pdlb.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc, load_report_pb2


def decision_times(
    ranks: int, method: str, decisions: int = 2000, repeats: int = 5, exact: bool = False, flow: bool = False
) -> tuple[float, float, float]:
    """Median microseconds per Router.decide (policy + in-flight bookkeeping), the dispatcher's
    handling of load reports per decision (off the request's path) and, for prefix-aware methods,
    the hashing of each prompt's blocks (once per request, beside its tokenisation), with
    a report from a random rank every 4 decisions so reports interleave with dispatches as in
    production.

    `exact`: the workers send prefix-cache block events (pdlb's schedulers do), so prefix-aware
    methods match against the exact index; each report carries the block events of the requests
    sent to that worker since its last one (from a model of its cache with its KV capacity).

    `flow`: through flow control's admission (its queue empty, as when a rank has room: the check
    for a rank with a free slot and enough KV, then the method over those ranks)."""
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
    index = ExactPrefixIndex() if exact else None
    pending: dict[str, list[RouteContext]] = {}  # worker -> requests sent to it since its last report
    caches = {f"w{r}": _WorkerCache(10**5 // 16) for r in range(ranks)}
    if index is not None:
        router.policy.exact = index
        for r in range(ranks):
            index.apply(f"w{r}", load_report_pb2.KVEvents(first_seq=1, last_seq=0, snapshot=True))
    # Prompts share one of 64 system prompts (512 tokens) plus a question: cache_aware hashes them.
    prefixes = [[rng.randrange(256) for _ in range(512)] for _ in range(64)]
    contexts = []
    for i in range(decisions):
        prompt = rng.choice(prefixes) + [rng.randrange(256) for _ in range(rng.randrange(1, 512))]
        contexts.append(RouteContext(f"r{i}", len(prompt), bootstrap_room=rng.getrandbits(32), input_ids=prompt))
    flow_control = FlowControl(router, FlowOptions(enabled=True)) if flow else None
    decide = router.decide if flow_control is None else lambda ctx: _now(flow_control.decide(ctx))
    samples, report_samples, hashing = [], [], []
    clock = time.perf_counter
    for _ in range(repeats):
        fresh = [replace(ctx, _chains={}) for ctx in contexts]  # each request is hashed once, as in production
        deciding = reporting = 0.0
        index_of = getattr(router.policy, "index", None)
        if index_of is not None:  # prompt hashing is per request, like tokenising: timed on its own
            start = clock()
            for ctx in fresh:
                ctx.blocks(index_of)
            hashing.append((clock() - start) / decisions * 1e6)
        for i, ctx in enumerate(fresh):
            start = clock()
            decision = decide(ctx)
            deciding += clock() - start
            if index is not None:
                pending.setdefault(decision.entry.worker.worker_id, []).append(ctx)
            if i % 4 == 3:
                entry = table.get(f"w{rng.randrange(ranks)}")
                worker = entry.worker.worker_id
                # what the worker would report (its cache's events) is built outside the clock
                batch = (
                    caches[worker].events(pending.pop(worker, ()), router.policy.index, index.next_seq[worker])
                    if index
                    else None
                )
                start = clock()
                table.apply_report(worker, entry.reported, entry.next_seq)
                router.policy.on_report(entry)
                if batch is not None:
                    index.apply(worker, batch)
                reporting += clock() - start
        samples.append(deciding / decisions * 1e6)
        report_samples.append(reporting / decisions * 1e6)
    hashed = statistics.median(hashing) if hashing else 0.0
    return statistics.median(samples), statistics.median(report_samples), hashed


def _now(coroutine):
    """The result of a coroutine that finishes without waiting (flow control's admission when a
    rank has room), without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("admission waited: no rank had room in the benchmark's table")


class _WorkerCache:
    """A worker's prefix cache as the bench models it: the blocks of the prompts it computed, at
    most `capacity`, evicting the oldest first; `events` is the batch it would report."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def events(self, requests, index, first_seq: int) -> load_report_pb2.KVEvents:
        stored, removed = [], []
        for ctx in requests:
            for name in reversed(ctx.blocks(index)):  # deepest first, so it is evicted first
                if name in self.blocks:
                    self.blocks.move_to_end(name)
                else:
                    self.blocks[name] = None
                    stored.append(name)
        while len(self.blocks) > self.capacity:
            removed.append(self.blocks.popitem(last=False)[0])
        last = first_seq + len(stored) + len(removed) - 1
        return load_report_pb2.KVEvents(first_seq=first_seq, last_seq=last, stored=stored, removed=removed)


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
    parser.add_argument(
        "--exact-methods",
        default="cache_aware,predicted_latency",
        help="prefix-aware methods measured again with workers sending block events (the exact index)",
    )
    parser.add_argument(
        "--flow-methods",
        default="least_wait,predicted_latency",
        help="methods measured again through flow control's admission (late binding, queue empty)",
    )
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    # every registered method (baselines included), without `auto`, unless --methods names some
    methods = args.methods.split(",") if args.methods else method_names()[1:]
    print("## Decision time per dispatch (median µs: policy + in-flight bookkeeping; in brackets, the")
    print("handling of load reports and block events per dispatch, off the request's path, and for")
    print("prefix-aware methods the hashing of the prompt's blocks, once per request)\n")
    print("| method | " + " | ".join(f"{r} ranks" for r in ranks) + " |")
    print("|---|" + "---|" * len(ranks))
    runs = [(m, False, False) for m in methods]
    runs += [(m, True, False) for m in args.exact_methods.split(",") if m in methods]
    runs += [(m, False, True) for m in args.flow_methods.split(",") if m in methods]
    # flow control's room test reads the prefix index (what each rank caches of the prompt)
    runs += [(m, True, True) for m in args.flow_methods.split(",") if m in methods and m in args.exact_methods]
    for method, exact, flow in runs:
        decisions, repeats = (500, 3) if args.quick else (2000, 5)
        times = [decision_times(r, method, decisions, repeats, exact, flow) for r in ranks]
        cells = [
            f"{decide:.1f} (+{reports:.1f}{f'; hash {hashed:.1f}' if hashed else ''})"
            for decide, reports, hashed in times
        ]
        label = method + (" (exact index)" if exact else "") + (" + flow control" if flow else "")
        print(f"| {label} | " + " | ".join(cells) + " |")

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
