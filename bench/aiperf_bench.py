"""NVIDIA's aiperf (the field's standard load tool) against the gateway, beside pdlb's own
`pdlb bench-client`, for the same load in one run.

Cluster: `pdlb up --mode mixed --runner sim` (etcd, a dispatcher, `--workers` sim ranks, the
gateway), serving the packaged SmolLM2's tokenizer. aiperf gets that tokenizer as a local
directory exported from the packaged GGUF (`pdlb export-tokenizer`), so it needs no model hub;
it sends streamed `/v1/completions` to the gateway's OpenAI API. bench-client sends the same
load (Poisson arrivals at `--rate`, `--requests` requests of `--isl` prompt and `--osl` output
tokens, EOS ignored) over gRPC to the dispatcher. The two alternate, `--runs` times each; the
table gives each tool's medians with the min-max over runs.

What differs by construction: aiperf times server-sent events through the gateway (HTTP, and the
gateway's incremental detokenisation may hold a token back until its character is complete),
bench-client times gRPC messages from the dispatcher; aiperf's ITL is per request, (end-to-end -
TTFT) / (output tokens - 1), bench-client's is per gap between tokens.

  make install-routers && make aiperf      # bench/results/aiperf.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import peer_routers
from pdlb.cli import bench_client, local_cluster
from pdlb.client import PDLBClient
from pdlb.models.catalog import SMOLLM2, resolve
from pdlb.models.tokenizer_export import export_tokenizer
from pdlb.workload import WorkloadSpec, generate, percentile_fields

RESULTS = Path(__file__).parent / "results"
METRICS = ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "req_s", "tok_s")


def start_cluster(workers: int, log_dir: Path) -> tuple[local_cluster.LocalCluster, dict]:
    parser = argparse.ArgumentParser()
    local_cluster.add_arguments(parser)
    args = parser.parse_args(
        [
            "--mode", "mixed", "--workers", str(workers), "--runner", "sim", "--port", "0", "--etcd-port", "0",
            "--http-port", "0", "--log-dir", str(log_dir), "--name", f"aiperf-bench-{os.getpid()}",
        ]
    )  # fmt: skip
    cluster = local_cluster.LocalCluster(args)
    return cluster, cluster.start()


def run_aiperf(args: argparse.Namespace, url: str, tokenizer: Path, out: Path) -> dict[str, float]:
    """One aiperf profile run; its medians and p99s in ms, and throughputs."""
    argv = [
        str(peer_routers.binary("aiperf")), "profile", "--model", SMOLLM2, "--url", url,
        "--endpoint-type", "completions", "--streaming", "--tokenizer", str(tokenizer),
        "--isl", str(args.isl), "--isl-stddev", "0", "--osl", str(args.osl), "--osl-stddev", "0",
        "--extra-inputs", "ignore_eos:true", "--request-rate", str(args.rate), "--arrival-pattern", "poisson",
        "--request-count", str(args.requests), "--use-server-token-count", "--artifact-dir", str(out),
        "--ui-type", "none", "--random-seed", str(args.seed),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # aiperf reads the directory itself
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode:
        raise RuntimeError(f"aiperf exited {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    export = next(out.rglob("profile_export_aiperf.json"), None)
    if export is None:
        raise RuntimeError(f"aiperf wrote no profile_export_aiperf.json under {out}")
    return parse_aiperf(json.loads(export.read_text()))


def parse_aiperf(data: dict) -> dict[str, float]:
    """TTFT / ITL p50 and p99 (ms), requests/s and output tokens/s from aiperf's JSON export."""
    metrics = data.get("records", data)

    def stat(name: str, key: str) -> float:
        value = metrics.get(name) or {}
        return float(value.get(key, float("nan")))

    return {
        "ttft_p50": stat("time_to_first_token", "p50"),
        "ttft_p99": stat("time_to_first_token", "p99"),
        "itl_p50": stat("inter_token_latency", "p50"),
        "itl_p99": stat("inter_token_latency", "p99"),
        "req_s": stat("request_throughput", "avg"),
        "tok_s": stat("output_token_throughput", "avg"),
        "ok": stat("request_count", "avg"),
    }


async def run_bench_client(args: argparse.Namespace, dispatcher: str, seed: int) -> dict[str, float]:
    """pdlb bench-client's request loop (its run_one) on the same load."""
    spec = WorkloadSpec(
        num_requests=args.requests, rate=args.rate, arrival="poisson", input_median=args.isl, input_sigma=0.0,
        output_median=args.osl, output_sigma=0.0, max_input=args.isl, max_output=args.osl, seed=seed,
    )  # fmt: skip
    items = generate(spec)
    client = PDLBClient(dispatcher=dispatcher)
    run_id = f"bench-{int(time.time())}-{seed}"
    start = time.perf_counter()

    async def one(item):
        await asyncio.sleep(max(0.0, item.arrival_s - (time.perf_counter() - start)))
        return await bench_client.run_one(client, item, run_id)

    results = await asyncio.gather(*[one(item) for item in items])
    elapsed = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1000 for r in ok]
    itl = [x * 1000 for r in ok for x in r.itl_s]
    return {
        **percentile_fields("ttft", ttft),
        **percentile_fields("itl", itl),
        "req_s": len(ok) / elapsed,
        "tok_s": sum(r.tokens for r in ok) / elapsed,
        "ok": len(ok),
    }


def markdown(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [
        "| tool | path | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | requests/s | output tok/s | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    paths = {"aiperf": "HTTP, gateway /v1/completions (SSE)", "pdlb bench-client": "gRPC, Dispatch.Generate"}
    for tool, values in runs.items():
        cells = []
        for metric in METRICS:
            xs = [v[metric] for v in values]
            cells.append(f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})")
        ok = ", ".join(f"{v['ok']:.0f}" for v in values)
        lines.append(f"| {tool} | {paths[tool]} | " + " | ".join(cells) + f" | {ok} of {args.requests} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="sim DP ranks")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    parser.add_argument("--requests", type=int, default=100, help="requests per run")
    parser.add_argument("--isl", type=int, default=128, help="prompt tokens")
    parser.add_argument("--osl", type=int, default=32, help="output tokens")
    parser.add_argument("--runs", type=int, default=3, help="runs of each tool, alternating")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600, help="longest one aiperf run may take, seconds")
    parser.add_argument("--out", default=str(RESULTS / "aiperf.md"))
    args = parser.parse_args(argv)
    peer_routers.binary("aiperf")  # fail early, saying how to install
    work = Path(tempfile.mkdtemp(prefix="pdlb-aiperf-"))
    tokenizer = work / "tokenizer"
    export_tokenizer(resolve(SMOLLM2), tokenizer)
    cluster, info = start_cluster(args.workers, work / "logs")
    runs: dict[str, list[dict[str, float]]] = {"aiperf": [], "pdlb bench-client": []}
    try:
        for n in range(args.runs):
            runs["aiperf"].append(run_aiperf(args, info["http"], tokenizer, work / f"aiperf-{n}"))
            print("aiperf", runs["aiperf"][-1], flush=True)
            runs["pdlb bench-client"].append(asyncio.run(run_bench_client(args, info["dispatcher"], args.seed + n)))
            print("bench-client", runs["pdlb bench-client"][-1], flush=True)
    finally:
        cluster.stop()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "timeout")}  # no local paths in results
    table = markdown(runs, args)
    Path(args.out).write_text(
        "# aiperf beside pdlb bench-client\n\n"
        f"Settings: {json.dumps(settings)}\n\nMedians over runs (min-max in brackets).\n\n{table}"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
