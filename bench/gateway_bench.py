"""The gateway's added latency: the same requests through the gateway (gRPC and the OpenAI HTTP API)
and straight to the dispatchers (the PDLBClient's client-side PD fan-out), side by side in one run.

Cluster: etcd, bootstrap, a prefill and a decode dispatcher, one prefill and one decode sim worker
with near-zero step times (so the paths' own costs dominate), and a gateway. Each request is a
short prompt and `--tokens` output tokens; reported are p50 / p99 of the whole request at
concurrency 1 and 16, and the gateway paths' difference to the direct one.

Run: `python -m bench.gateway_bench` (results in bench/results/gateway.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

from pdlb.client import PDLBClient
from pdlb.common.etcd_process import EtcdProcess
from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceProcess, script
from pdlb.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from pdlb.workload import percentile

RESULTS = Path(__file__).parent / "results"
ENV = {
    "PDLB_SCHEDULER_MODEL": "tiny-random",
    "PDLB_DISPATCHER_MODEL": "tiny-random",
    "PDLB_GATEWAY_MODEL": "tiny-random",
}


def start(log_dir: str) -> tuple[EtcdProcess, list[ServiceProcess], dict]:
    etcd = EtcdProcess()
    etcd.start()
    common = ["--etcd", etcd.endpoint, "--port", "0", "--log-level", "WARNING"]
    procs = [ServiceProcess("bootstrap", [*script("pdlb-bootstrap"), *common], log_dir, ENV).start()]
    addresses = {}
    for role in ("prefill", "decode"):
        proc = ServiceProcess(
            f"dispatcher-{role}", [*script("pdlb-dispatcher"), *common, "--disaggregation-mode", role], log_dir, ENV
        ).start()
        procs.append(proc)
        addresses[role] = proc.address
        argv = [*script("pdlb-scheduler"), *common, "--disaggregation-mode", role, "--runner", "sim"]
        procs.append(ServiceProcess(f"{role}-0", [*argv, "--sim-slowdown", "0.01"], log_dir, ENV).start())
    http_port = free_port()
    gateway = ServiceProcess("gateway", [*script("pdlb-gateway"), *common, "--http-port", str(http_port)], log_dir, ENV)
    procs.append(gateway.start())
    addresses["gateway"] = gateway.address
    addresses["http"] = f"http://127.0.0.1:{http_port}"
    return etcd, procs, addresses


def request(rid: str, tokens: int) -> common_pb2.InferenceRequest:
    return common_pb2.InferenceRequest(
        request_id=rid,
        input_ids=list(range(1, 17)),
        sampling=common_pb2.SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=0.0),
    )


async def direct(client: PDLBClient, rid: str, tokens: int) -> None:
    async for _ in client.generate(request(rid, tokens), timeout=30):
        pass


async def via_grpc(stub, rid: str, tokens: int) -> None:
    async for _ in stub.Generate(gateway_pb2.GatewayGenerateRequest(request=request(rid, tokens)), timeout=30):
        pass


async def via_http(session: aiohttp.ClientSession, url: str, rid: str, tokens: int) -> None:
    body = {"model": "tiny-random", "prompt": list(range(1, 17)), "max_tokens": tokens, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as reply:
        assert reply.status == 200, await reply.text()
        async for _ in reply.content:
            pass


async def measure(call, concurrency: int, count: int) -> list[float]:
    times: list[float] = []
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            started = time.perf_counter()
            await call(f"r{i}-{time.monotonic_ns()}")
            times.append(time.perf_counter() - started)

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return times


async def run(args: argparse.Namespace, addresses: dict) -> list[dict]:
    client = PDLBClient(prefill=addresses["prefill"], decode=addresses["decode"])
    channel = grpc.aio.insecure_channel(addresses["gateway"])
    stub = gateway_pb2_grpc.GatewayStub(channel)
    session = aiohttp.ClientSession()
    paths = {
        "direct (PDLBClient)": lambda rid: direct(client, rid, args.tokens),
        "gateway gRPC": lambda rid: via_grpc(stub, rid, args.tokens),
        "gateway HTTP (SSE)": lambda rid: via_http(session, addresses["http"], rid, args.tokens),
    }
    rows = []
    try:
        for concurrency in (1, 16):
            samples: dict[str, list[float]] = {name: [] for name in paths}
            for call in paths.values():  # warm-up: channels, connections, caches
                await measure(call, concurrency, 20)
            for _ in range(args.rounds):  # interleaved rounds: drift hits every path alike
                for name, call in paths.items():
                    samples[name] += await measure(call, concurrency, args.requests)
            base = samples["direct (PDLBClient)"]
            for name, times in samples.items():
                rows.append(
                    {
                        "path": name,
                        "concurrency": concurrency,
                        "requests": len(times),
                        "p50_ms": percentile(times, 50) * 1000,
                        "p99_ms": percentile(times, 99) * 1000,
                        "added_p50_ms": (percentile(times, 50) - percentile(base, 50)) * 1000,
                        "added_p99_ms": (percentile(times, 99) - percentile(base, 99)) * 1000,
                        "mean_ms": statistics.fmean(times) * 1000,
                    }
                )
    finally:
        await session.close()
        await channel.close()
        await client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="requests per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4, help="output tokens per request")
    parser.add_argument("--out", default=str(RESULTS / "gateway.md"))
    args = parser.parse_args()
    settings = {k: v for k, v in vars(args).items() if k != "out"}  # no local paths in results
    etcd, procs, addresses = start(tempfile.mkdtemp(prefix="pdlb-gateway-bench-"))
    try:
        rows = asyncio.run(run(args, addresses))
    finally:
        for proc in reversed(procs):
            proc.terminate()
        etcd.close()
    lines = [
        "# Gateway overhead\n",
        f"Settings: {json.dumps(settings)}\n",
        "| path | concurrency | requests | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['concurrency']} | {r['requests']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['added_p50_ms']:+.2f} | {r['added_p99_ms']:+.2f} |"
        )
    table = "\n".join(lines) + "\n"
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
