"""`pdlb bench-client`: send a synthetic workload to a cluster and summarise latency and throughput."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from dataclasses import dataclass, field

import grpc
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from pdlb.cli.flag_types import UINT32_MAX, float_in, int_in
from pdlb.client import PDLBClient
from pdlb.common.config import integer
from pdlb.v1 import common_pb2
from pdlb.workload import WorkItem, WorkloadSpec, generate, percentile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-requests", type=int_in(1, 10**7), default=100, help="requests to send in all (default: 100)"
    )
    parser.add_argument(
        "--rate",
        type=float_in(0, 1e6),
        default=10.0,
        help="mean requests per second (0: all at once; default: 10)",
    )
    parser.add_argument(
        "--arrival",
        choices=["poisson", "bursty", "all-at-once"],
        default="poisson",
        help="how arrivals spread around --rate (default: poisson)",
    )
    parser.add_argument(
        "--input-median", type=int_in(1, UINT32_MAX), default=128, help="median prompt length, tokens (default: 128)"
    )
    parser.add_argument(
        "--output-median", type=int_in(1, UINT32_MAX), default=32, help="median tokens to generate (default: 32)"
    )
    parser.add_argument(
        "--long-tail-fraction",
        type=float_in(0, 1),
        default=0.05,
        help="fraction of requests 8x as long in and out, 0 to 1 (default: 0.05)",
    )
    parser.add_argument(
        "--max-input", type=int_in(1, UINT32_MAX), default=1024, help="longest prompt, tokens (default: 1024)"
    )
    parser.add_argument(
        "--max-output", type=int_in(1, UINT32_MAX), default=256, help="most tokens to generate (default: 256)"
    )
    parser.add_argument(
        "--max-concurrency",
        type=int_in(1, 10**6),
        default=256,
        help="bound on requests in flight (default: 256)",
    )
    parser.add_argument(
        "--seed",
        type=integer,
        default=0,
        help="seed of the workload's draws: the same seed, the same requests (default: 0)",
    )


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


async def run_one(client: PDLBClient, item: WorkItem, run_id: str) -> RequestResult:
    req = common_pb2.InferenceRequest(
        request_id=f"{run_id}-{item.index}",
        input_ids=item.input_ids,
        sampling=common_pb2.SamplingParams(max_new_tokens=item.max_new_tokens, ignore_eos=True, temperature=0.0),
    )
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    try:
        async for chunk in client.generate(req):
            if chunk.token_ids:
                stamps.append(time.perf_counter())
                tokens += len(chunk.token_ids)
    except grpc.aio.AioRpcError as err:
        return RequestResult(False, error=err.code().name)
    if not stamps:
        return RequestResult(False, error="no tokens")
    itl = [b - a for a, b in itertools.pairwise(stamps)]
    return RequestResult(True, stamps[0] - start, stamps[-1] - start, itl, tokens)


async def run(args: argparse.Namespace, client: PDLBClient) -> int:
    spec = WorkloadSpec(
        num_requests=args.num_requests,
        rate=args.rate,
        arrival=args.arrival,
        input_median=args.input_median,
        output_median=args.output_median,
        long_tail_fraction=args.long_tail_fraction,
        max_input=args.max_input,
        max_output=args.max_output,
        seed=args.seed,
    )
    items = generate(spec)
    limit = asyncio.Semaphore(args.max_concurrency)
    run_id = f"bench-{int(time.time())}"
    results: list[RequestResult] = []
    start = time.perf_counter()
    with Progress() as progress:
        task = progress.add_task("requests", total=len(items))

        async def one(item: WorkItem) -> None:
            await asyncio.sleep(max(0.0, item.arrival_s - (time.perf_counter() - start)))  # the arrival schedule
            async with limit:
                results.append(await run_one(client, item, run_id))
            progress.advance(task)

        await asyncio.gather(*[one(item) for item in items])
    elapsed = time.perf_counter() - start
    await client.close()
    Console().print(summary_table(results, elapsed))
    return 0 if all(r.ok for r in results) else 1


def summary_table(results: list[RequestResult], elapsed: float) -> Table:
    ok = [r for r in results if r.ok]
    table = Table(title=f"{len(ok)}/{len(results)} requests ok in {elapsed:.1f} s")
    for column in ("metric", "p50", "p90", "p99"):
        table.add_column(column, justify="right")
    for name, values in (
        ("TTFT (ms)", [r.ttft_s for r in ok]),
        ("ITL (ms)", [x for r in ok for x in r.itl_s]),
        ("end-to-end (ms)", [r.e2e_s for r in ok]),
    ):
        table.add_row(name, *(f"{percentile(values, q) * 1000:.1f}" for q in (50, 90, 99)))
    tokens = sum(r.tokens for r in ok)
    table.caption = f"throughput: {len(ok) / elapsed:.2f} req/s, {tokens / elapsed:.1f} output tok/s"
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        table.caption += f"; errors: {', '.join(errors)}"
    return table
