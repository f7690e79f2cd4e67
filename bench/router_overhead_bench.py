"""Gateway overhead against the Rust routers, over echo backends, in one run.

Paths, each a streamed `/v1/completions` of a short text prompt and `--tokens` tokens:
- `echo HTTP (direct)`: the OpenAI-shaped echo worker (bench/echo_openai.py), no router;
- `smg -> echo HTTP` and `vllm-router -> echo HTTP`: SGLang's model gateway and vllm-router
  (round robin, one worker) in front of that echo worker;
- `pdlb gateway -> echo Dispatch`: the gateway (tokenises, then one gRPC `Dispatch.Generate`)
  in front of the echo dispatcher (bench/echo_server.py), whose `Generate` streams tokens at once.

Each router's added latency is its path's p50 / p99 less its backend's direct p50 / p99 in the same
round (the gateway's backend is gRPC, so its direct path is `echo Dispatch (direct gRPC)`), at
concurrency 1 in interleaved rounds; the table gives medians over rounds with the min to max.
Throughput is closed loop at `--concurrency` for `--throughput-requests`
requests per path: requests/s and the CPU time the router process spent per request (read from
/proc, user + system). On a small shared machine the load generator and the backend share the
cores with the router, so requests/s is a floor of what a router sustains; CPU per request
is the number that carries over (1000 / CPU ms = requests/s per core it would sustain).

  make install-routers && python -m bench.router_overhead_bench     # bench/results/router_overhead.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc

from bench import peer_routers
from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceProcess, script
from pdlb.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc
from pdlb.workload import percentile

RESULTS = Path(__file__).parent / "results"
PROMPT = "The quick brown fox jumps over the lazy dog."
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / CLOCK_TICKS


async def http_ok(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/health") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout:.0f} s")


class Paths:
    """The processes of every path and one call per path."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log_dir = Path(tempfile.mkdtemp(prefix="pdlb-router-overhead-"))
        self.procs: list[ServiceProcess] = []
        self.routers: list[peer_routers.Router] = []
        self.pids: dict[str, int] = {}

    async def start(self) -> None:
        echo_port = free_port()
        echo_http = ServiceProcess(
            "echo-openai", [*script_module("bench.echo_openai"), "--port", str(echo_port)], self.log_dir
        )
        echo_http.spawn()
        self.procs.append(echo_http)
        echo_grpc = ServiceProcess("echo-dispatch", [*script_module("bench.echo_server"), "0"], self.log_dir)
        self.procs.append(echo_grpc.start())
        http_port = free_port()
        gateway = ServiceProcess(
            "gateway",
            [
                *script("pdlb-gateway"),
                "--etcd", "", "--port", "0", "--http-port", str(http_port), "--dispatcher", echo_grpc.address,
                "--model", "tiny-random", "--log-level", "WARNING",
            ],
            self.log_dir,
        )  # fmt: skip
        self.procs.append(gateway.start())
        self.echo_http, self.echo_grpc = f"http://127.0.0.1:{echo_port}", echo_grpc.address
        await http_ok(self.echo_http)
        self.gateway = f"http://127.0.0.1:{http_port}"
        for kind in ("smg", "vllm-router"):
            router = peer_routers.Router(kind, "round_robin", [self.echo_http], log_dir=self.log_dir)
            self.routers.append(await asyncio.to_thread(router.start))
            await peer_routers.wait_serving(router.url, "echo")
            self.pids[kind] = router.proc.pid
        self.pids["pdlb gateway"] = gateway.pid
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.channel = grpc.aio.insecure_channel(self.echo_grpc)
        self.stub = dispatch_pb2_grpc.DispatchStub(self.channel)

    async def stop(self) -> None:
        await self.session.close()
        await self.channel.close()
        for router in self.routers:
            router.stop()
        for proc in reversed(self.procs):
            proc.terminate()

    def calls(self) -> dict[str, tuple[Callable[[], Awaitable[None]], str | None, str]]:
        """Path name -> (one request, the router process it measures or None, its baseline path)."""
        smg, vllm = (r.url for r in self.routers)
        return {
            "echo HTTP (direct)": (lambda: self.http(self.echo_http, "echo"), None, ""),
            "smg -> echo HTTP": (lambda: self.http(smg, "echo"), "smg", "echo HTTP (direct)"),
            "vllm-router -> echo HTTP": (lambda: self.http(vllm, "echo"), "vllm-router", "echo HTTP (direct)"),
            "echo Dispatch (direct gRPC)": (self.grpc_direct, None, ""),
            "pdlb gateway -> echo Dispatch": (
                lambda: self.http(self.gateway, "tiny-random"),
                "pdlb gateway",
                "echo Dispatch (direct gRPC)",
            ),
        }

    async def http(self, url: str, model: str) -> None:
        body = {"model": model, "prompt": PROMPT, "max_tokens": self.args.tokens, "stream": True}
        async with self.session.post(f"{url}/v1/completions", json=body) as reply:
            if reply.status != 200:
                raise RuntimeError(f"{url}: {reply.status} {await reply.text()}")
            events = 0
            async for line in reply.content:
                events += line.startswith(b"data: {")
            if events < self.args.tokens:
                raise RuntimeError(f"{url}: {events} chunks for {self.args.tokens} tokens")

    async def grpc_direct(self) -> None:
        request = common_pb2.InferenceRequest(
            request_id=f"r{time.monotonic_ns()}",
            input_ids=list(PROMPT.encode()),
            sampling=common_pb2.SamplingParams(max_new_tokens=self.args.tokens, ignore_eos=True),
        )
        async for _ in self.stub.Generate(dispatch_pb2.GenerateRequest(request=request), timeout=30):
            pass


def script_module(module: str) -> list[str]:
    import sys

    return [sys.executable, "-m", module]


async def closed_loop(call: Callable[[], Awaitable[None]], concurrency: int, count: int) -> tuple[list[float], float]:
    """`count` calls from `concurrency` loops; each call's seconds and the whole span."""
    times: list[float] = []
    todo = iter(range(count))

    async def loop() -> None:
        for _ in todo:
            started = time.perf_counter()
            await call()
            times.append(time.perf_counter() - started)

    start = time.perf_counter()
    await asyncio.gather(*[loop() for _ in range(concurrency)])
    return times, time.perf_counter() - start


async def run(args: argparse.Namespace) -> list[dict]:
    paths = Paths(args)
    await paths.start()
    calls = paths.calls()
    latency: dict[str, list[list[float]]] = {name: [] for name in calls}  # per round
    tput: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}  # (requests/s, CPU ms / request)
    try:
        for call, _, _ in calls.values():  # warm-up: connections, caches
            await closed_loop(call, 4, 50)
        for _ in range(args.rounds):  # interleaved rounds: drift hits every path alike
            for name, (call, _, _) in calls.items():
                times, _ = await closed_loop(call, 1, args.requests)
                latency[name].append(times)
            for name, (call, process, _) in calls.items():
                before = cpu_seconds(paths.pids[process]) if process else 0.0
                _, span = await closed_loop(call, args.concurrency, args.throughput_requests)
                cpu = cpu_seconds(paths.pids[process]) - before if process else float("nan")
                tput[name].append((args.throughput_requests / span, cpu * 1000 / args.throughput_requests))
    finally:
        await paths.stop()
    rows = []
    for name, (_, process, base) in calls.items():
        rates = [r for r, _ in tput[name]]
        cpu = [c for _, c in tput[name]]
        row = {"path": name, "requests": sum(len(t) for t in latency[name])}
        for q in (50, 99):  # per round, then the median over rounds; added: against the base in the same round
            mine = [percentile(t, q) * 1000 for t in latency[name]]
            added = [m - percentile(b, q) * 1000 for m, b in zip(mine, latency[base], strict=True)] if base else [0.0]
            row[f"p{q}_ms"], row[f"p{q}_range"] = statistics.median(mine), (min(mine), max(mine))
            row[f"added_p{q}_ms"], row[f"added_p{q}_range"] = statistics.median(added), (min(added), max(added))
        row.update(
            rps_median=statistics.median(rates),
            rps_min=min(rates),
            rps_max=max(rates),
            cpu_ms_median=statistics.median(cpu) if process else float("nan"),
            cpu_ms_min=min(cpu) if process else float("nan"),
            cpu_ms_max=max(cpu) if process else float("nan"),
        )
        rows.append(row)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| path | p50 ms | p99 ms | added p50 ms | added p99 ms | "
        f"requests/s at concurrency {args.concurrency} | router CPU ms / request |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(value: float, bounds: tuple[float, float], signed: bool = False) -> str:
        fmt = "{:+.2f}" if signed else "{:.2f}"
        return f"{fmt.format(value)} ({fmt.format(bounds[0])} to {fmt.format(bounds[1])})"

    for r in rows:
        cpu = (
            f"{r['cpu_ms_median']:.2f} ({r['cpu_ms_min']:.2f}-{r['cpu_ms_max']:.2f})"
            if r["cpu_ms_median"] == r["cpu_ms_median"]
            else "-"
        )
        lines.append(
            f"| {r['path']} | {cell(r['p50_ms'], r['p50_range'])} | {cell(r['p99_ms'], r['p99_range'])} | "
            f"{cell(r['added_p50_ms'], r['added_p50_range'], True)} | "
            f"{cell(r['added_p99_ms'], r['added_p99_range'], True)} | "
            f"{r['rps_median']:.0f} ({r['rps_min']:.0f}-{r['rps_max']:.0f}) | {cpu} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="latency: requests per path per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    parser.add_argument("--tokens", type=int, default=4, help="output tokens per request")
    parser.add_argument("--concurrency", type=int, default=32, help="throughput: requests in flight")
    parser.add_argument("--throughput-requests", type=int, default=1000, help="throughput: requests per round")
    parser.add_argument("--out", default=str(RESULTS / "router_overhead.md"))
    args = parser.parse_args(argv)
    peer_routers.binary("smg"), peer_routers.binary("vllm-router")  # fail early, saying how to install
    rows = asyncio.run(run(args))
    settings = {k: v for k, v in vars(args).items() if k != "out"}  # no local paths in results
    table = markdown(rows, args)
    Path(args.out).write_text(
        f"# Gateway overhead against the Rust routers\n\nSettings: {json.dumps(settings)}\n\n{table}"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
