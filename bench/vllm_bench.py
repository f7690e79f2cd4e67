"""Balancing 2 vLLM DP ranks: pdlb's methods against vLLM's own internal DP load balancing.

One vLLM server with `--data-parallel-size 2` (started here, or attached with --vllm-url) serves
every method, so weights, dtype and engine cores are the same:
- `vllm_internal`: requests go straight to the server's /v1/completions; vLLM's DP coordinator
  picks the engine (its internal load balancing), no pdlb;
- pdlb methods (e.g. `round_robin`, `predicted_latency`): requests go to pdlb's gateway (OpenAI
  HTTP API), a mixed dispatcher with that method picks the rank, and its worker sends the request
  to the server with X-data-parallel-rank.
Same workload for every method (pdlb.workload, token-id prompts, greedy, ignore_eos), each run with
its own token salt so no run warms another's prefix cache; methods interleaved run by run. Prints
TTFT p50/p99 and output tokens/s per run, then medians over runs with the spread (min-max), and
ratios against vLLM's internal balancing. Each finished run is saved at once (`--json`), so a
measurement can be split over several invocations (each starts the server afresh) and summarised
together:

    python -m bench.vllm_bench --runs 2 --requests 24 --rate 2
    python -m bench.vllm_bench --runs 1 --first-run 2 --append --requests 24 --rate 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from pdlb.common.etcd_process import EtcdProcess
from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceProcess, script
from pdlb.engines.vllm.server import SERVED_NAME, VLLMServer, VLLMServerSpec, find_venv, missing_reason
from pdlb.workload import WorkItem, WorkloadSpec, generate, percentile_fields, salted

RESULTS = Path(__file__).parent / "results"


def start_pdlb(method: str, etcd: EtcdProcess, vllm_url: str, log_dir: str, procs: list[ServiceProcess]) -> str:
    """A mixed dispatcher with `method`, a vLLM worker per DP rank, and a gateway, added to `procs`
    as they are spawned (so the caller stops them whatever happens after); their HTTP base URL."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", f"/bench-{method}", "--model", SERVED_NAME]
    started = [
        ServiceProcess(
            f"dispatcher-{method}",
            [*script("pdlb-dispatcher"), *common, "--port", "0", "--load-balance-method", method],
            log_dir,
        )
    ]
    for rank in range(2):
        started.append(
            ServiceProcess(
                f"worker-{method}-{rank}",
                [
                    *script("pdlb-scheduler"),
                    *common,
                    "--port",
                    "0",
                    "--dp-rank",
                    str(rank),
                    "--engine",
                    "vllm",
                    "--vllm-url",
                    vllm_url,
                    "--vllm-server-ranks",
                    "2",
                    "--max-running-requests",
                    "256",
                ],
                log_dir,
            )
        )
    http_port = free_port()
    started.append(
        ServiceProcess(
            f"gateway-{method}",
            [*script("pdlb-gateway"), *common, "--port", "0", "--http-port", str(http_port)],
            log_dir,
        )
    )
    for proc in started:  # side by side: each imports torch, seconds on a busy machine
        procs.append(proc)
        proc.spawn()
    for proc in started:
        proc.wait_ready(timeout=300)
    return f"http://127.0.0.1:{http_port}"


async def wait_gateway(session: aiohttp.ClientSession, base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{base}/dashboard/state") as resp:
                state = await resp.json()
                if sum(len(r["workers"]) for r in state["roles"]) == 2:
                    return
        except (aiohttp.ClientError, ValueError, KeyError):
            pass
        await asyncio.sleep(0.2)  # no event to await: the gateway learns workers from etcd
    raise TimeoutError(f"gateway {base} does not see 2 workers")


async def one(session: aiohttp.ClientSession, base: str, item: WorkItem, start: float) -> tuple[float, int]:
    """Send at the item's arrival time; (TTFT seconds, output tokens)."""
    await asyncio.sleep(max(0.0, start + item.arrival_s - time.monotonic()))
    body = {
        "model": SERVED_NAME,
        "prompt": item.input_ids,
        "max_tokens": item.max_new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    sent = time.monotonic()
    ttft = None
    chunks = 0
    async with session.post(f"{base}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{base}: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if any(c.get("text") for c in chunk.get("choices") or []):
                ttft = ttft if ttft is not None else time.monotonic() - sent
                chunks += 1
    return (ttft if ttft is not None else float("nan")), item.max_new_tokens


async def run_once(base: str, items: list[WorkItem]) -> dict:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.monotonic()
        results = await asyncio.gather(*(one(session, base, item, start) for item in items))
        makespan = time.monotonic() - start
    ttfts = [t for t, _ in results]
    return {
        **percentile_fields("ttft", ttfts, unit="s"),
        "tokens_per_s": sum(n for _, n in results) / makespan,
        "makespan_s": makespan,
    }


def summarise(rows: list[dict], methods: list[str]) -> str:
    def med(method: str, key: str) -> tuple[float, float, float]:
        values = [r[key] for r in rows if r["method"] == method]
        return statistics.median(values), min(values), max(values)

    base = {k: med("vllm_internal", k)[0] for k in ("ttft_p50_s", "ttft_p99_s", "tokens_per_s")}
    out = [
        "| method | TTFT p50 s (min-max) | TTFT p99 s (min-max) | output tok/s (min-max) | p50 / vLLM | p99 / vLLM "
        "| tok/s / vLLM |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        cells = [med(method, k) for k in ("ttft_p50_s", "ttft_p99_s", "tokens_per_s")]
        text = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in cells[:2]] + [
            f"{cells[2][0]:.1f} ({cells[2][1]:.1f}-{cells[2][2]:.1f})"
        ]
        ratios = [
            cells[0][0] / base["ttft_p50_s"],
            cells[1][0] / base["ttft_p99_s"],
            cells[2][0] / base["tokens_per_s"],
        ]
        out.append(f"| {method} | " + " | ".join(text) + " | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(out)


RUN_LINE = re.compile(
    r"^run (\d+) (\S+)\s+TTFT p50 ([\d.]+) s  p99 ([\d.]+) s  ([\d.]+) tok/s  \((\d+) s\)$", re.MULTILINE
)


def rows_from_log(text: str) -> list[dict]:
    """The runs an earlier invocation printed (its "run N method ..." lines), as rows."""
    return [
        {
            "method": method,
            "run": int(run),
            "ttft_p50_s": float(p50),
            "ttft_p99_s": float(p99),
            "tokens_per_s": float(rate),
            "makespan_s": float(makespan),
        }
        for run, method, p50, p99, rate, makespan in RUN_LINE.findall(text)
    ]


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-url", default="", help="a running server with --data-parallel-size 2 (default: start one)")
    p.add_argument("--dtype", default="bfloat16", help="the started server's --dtype")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True, help="start it --enforce-eager")
    p.add_argument("--methods", default="vllm_internal,round_robin,predicted_latency", help="vllm_internal or pdlb's")
    p.add_argument("--runs", type=int, default=3, help="runs per method (medians reported)")
    p.add_argument("--requests", type=int, default=48, help="requests per run")
    p.add_argument("--rate", type=float, default=3.0, help="Poisson arrival rate, requests/s")
    p.add_argument("--input-median", type=int, default=200, help="prompt length median, tokens")
    p.add_argument("--output-median", type=int, default=48, help="output length median, tokens")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--first-run", type=int, default=0, help="index of the first run (salts its tokens)")
    p.add_argument("--append", action="store_true", help="add to the runs already in --json, summarise them all")
    p.add_argument("--from-log", default="", help="with --append: also take the runs printed in this output file")
    p.add_argument("--out", default=str(RESULTS / "vllm_balance.md"), help="markdown results file")
    p.add_argument("--json", default=str(RESULTS / "vllm_balance.json"), help="every run's numbers, saved per run")
    args = p.parse_args(argv)
    # SIGTERM stops the run like Ctrl-C does: through the `finally` below, which stops every child
    # (pdlb's services first, then etcd and the vLLM server's process group). Python's default
    # SIGTERM would end this process with no cleanup at all.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    methods = args.methods.split(",")
    log_dir = tempfile.mkdtemp(prefix="pdlb-vllm-bench-")
    server = None
    if not args.vllm_url:
        venv = find_venv()
        if venv is None:
            print(missing_reason(), file=sys.stderr)
            return 2
        spec = VLLMServerSpec(venv=venv, dp_size=2, cpus="0|1", dtype=args.dtype, enforce_eager=args.eager)
        server = VLLMServer(spec, f"{log_dir}/vllm.log").spawn()
        print(f"starting vLLM (--data-parallel-size 2, {args.dtype}); log {log_dir}/vllm.log", flush=True)
    etcd = EtcdProcess()
    procs: list[ServiceProcess] = []
    try:
        if server is not None:
            server.wait_ready()
            print(f"vLLM ready after {server.ready_s:.0f} s", flush=True)
        url = args.vllm_url or server.url
        etcd.start()
        bases = {"vllm_internal": url}
        for method in methods:
            if method != "vllm_internal":
                bases[method] = start_pdlb(method, etcd, url, log_dir, procs)

        async def ready() -> None:
            async with aiohttp.ClientSession() as session:
                for method in methods:
                    if method != "vllm_internal":
                        await wait_gateway(session, bases[method])

        asyncio.run(ready())
        workload = generate(
            WorkloadSpec(
                num_requests=args.requests,
                rate=args.rate,
                input_median=args.input_median,
                output_median=args.output_median,
                max_input=1024,
                max_output=256,
                seed=args.seed,
            )
        )
        asyncio.run(run_once(url, salted(workload[:4], 251)))  # warm-up, not measured
        rows = json.loads(Path(args.json).read_text()) if args.append and Path(args.json).exists() else []
        if args.append and args.from_log:
            seen = {(r["method"], r["run"]) for r in rows}
            rows += [r for r in rows_from_log(Path(args.from_log).read_text()) if (r["method"], r["run"]) not in seen]
        for run in range(args.first_run, args.first_run + args.runs):
            for index, method in enumerate(methods):
                items = salted(workload, 1 + run * len(methods) + index)
                row = {"method": method, "run": run, **asyncio.run(run_once(bases[method], items))}
                rows.append(row)
                Path(args.json).write_text(json.dumps(rows, indent=1))
                print(
                    f"run {run} {method:<18} TTFT p50 {row['ttft_p50_s']:.2f} s  p99 {row['ttft_p99_s']:.2f} s  "
                    f"{row['tokens_per_s']:.1f} tok/s  ({row['makespan_s']:.0f} s)",
                    flush=True,
                )
        table = summarise(rows, list(dict.fromkeys([*methods, *(r["method"] for r in rows)])))  # earlier runs' too
        runs = len({r["run"] for r in rows})
        header = (
            f"2 vLLM DP ranks (one server, --data-parallel-size 2, {args.dtype}), {args.requests} requests at "
            f"{args.rate}/s Poisson, input median {args.input_median}, output median {args.output_median}; "
            f"medians of {runs} runs (min-max)\n\n"
        )
        print("\n" + header + table)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(header + table + "\n")
    finally:
        for proc in reversed(procs):
            proc.terminate(timeout=15)
        etcd.close()
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
