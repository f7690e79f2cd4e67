"""Balancing against the real peer routers: pdlb's dispatcher methods, SGLang's model gateway (`smg`)
and vllm-router choosing the DP ranks of the same simulated cluster, with the same workload, in one
run.

Cluster: one etcd, `--ranks` `pdlb-scheduler --runner sim` ranks (the balancing suite's settings),
and per routing method a dispatcher with a gateway in front of it (`--etcd ''`, so a gateway sends
only to its own dispatcher). Every request is a streamed OpenAI `/v1/completions` over HTTP:
- pdlb's methods: client -> gateway -> dispatcher (the method picks the rank);
- `smg:<policy>`: client -> `smg launch --dp-aware --policy <policy>` -> gateway -> dispatcher; smg
  reads `dp_size` from the gateway's `/server_info`, treats `url@rank` as workers, and pins its
  pick with `data_parallel_rank` in the body, which the dispatcher honours;
- `vllm-router:<policy>`: the same through `vllm-router --intra-node-data-parallel-size <ranks>`,
  which pins with vLLM's `X-data-parallel-rank` header.
So every path crosses the same gateway; only who picks the rank differs. Prompts are text: the
workload's token ids (0..255) become printable characters, and the gateway's byte tokenizer
(`tiny-random`) turns each back into one token, so lengths and shared prefixes are the workload's
and the routers' text-based prefix trees see the sharing.

Workloads: the balancing suite's (`--workload heavy_tail`, ...; rate = share of its recorded
capacity) and the Mooncake conversation trace (`--workload mooncake`, scaling stated in the
results). Reported per method, as the suite does: TTFT p50 / p99, the TTFT floor (each request alone
on an idle rank), queueing p99 (TTFT less the floor), throughput and the prefix-cache hit rate; the
suite's ratios to round robin are taken against pdlb's `round_robin` of the same run.

  make install-routers
  python -m bench.router_balance_bench --workload heavy_tail --seeds 3
  python -m bench.router_balance_bench --workload mooncake --trace ../shared/traces/mooncake_conversation_trace.jsonl
  # one seed per invocation (each fits a time slot), summarised together:
  python -m bench.router_balance_bench --workload shared_mix --seeds 1 --first-seed 2 --append
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import grpc

from bench import balance_bench, balance_suite, mooncake_trace, peer_routers
from pdlb.common.etcd_process import EtcdProcess
from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceProcess, script
from pdlb.engines.torch.runners import CostModel
from pdlb.v1 import dispatch_pb2_grpc
from pdlb.workload import WorkItem, generate, salted

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny-random"
ENV = {f"PDLB_{s}_MODEL": MODEL for s in ("SCHEDULER", "DISPATCHER", "GATEWAY")}
PDLB_METHODS = "predicted_latency,cache_aware,least_wait,round_robin,peer_sglang_round_robin,peer_llmd"
ROUTER_METHODS = ",".join(
    [f"smg:{p}" for p in peer_routers.SMG_POLICIES] + [f"vllm-router:{p}" for p in peer_routers.VLLM_ROUTER_POLICIES]
)
PINNED = "pinned"  # the dispatcher behind the routers: every request comes with its rank


def to_text(ids: list[int]) -> str:
    """Token ids 0..255 as printable ASCII, one character (one byte token) each; equal ids stay equal."""
    return "".join(chr(33 + t % 94) for t in ids)


def text_ids(ids: list[int]) -> list[int]:
    """The ids the gateway's byte tokenizer makes of to_text(ids) (what the ranks compute)."""
    return [33 + t % 94 for t in ids]


class Cluster:
    """Sim ranks, a dispatcher + gateway per pdlb method and one pinned pair for the routers."""

    def __init__(self, args: argparse.Namespace, pdlb_methods: list[str], routers: list[str]) -> None:
        self.args, self.pdlb_methods, self.router_methods = args, pdlb_methods, routers
        self.log_dir = Path(tempfile.mkdtemp(prefix="pdlb-router-balance-"))
        self.etcd = EtcdProcess()
        self.procs: list[ServiceProcess] = []
        self.dispatchers: dict[str, str] = {}  # method (or PINNED) -> dispatcher address
        self.gateways: dict[str, list[str]] = {}  # method (or PINNED) -> gateway URLs
        self.routers: dict[str, peer_routers.Router] = {}

    def start(self) -> None:
        self.etcd.start()
        common = ["--etcd", self.etcd.endpoint, "--lease-ttl", "10", "--log-level", "WARNING", "--port", "0"]
        a = self.args
        flags = [
            "--runner", "sim", "--sim-slowdown", str(a.slowdown), "--max-total-tokens", str(a.kv_tokens),
            "--max-running-requests", str(a.max_running), "--chunked-prefill-size", str(balance_bench.CHUNKED_PREFILL),
            "--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--max-position", str(a.kv_tokens),
            "--max-prompt-tokens", str(a.kv_tokens),
        ]  # fmt: skip
        schedulers = [
            ServiceProcess(f"scheduler-{r}", [*script("pdlb-scheduler"), *common, "--dp-rank", str(r), *flags],
                           self.log_dir, ENV)
            for r in range(a.ranks)
        ]  # fmt: skip
        for proc in schedulers:
            proc.spawn()
        for method in [*self.pdlb_methods, *([PINNED] if self.router_methods else [])]:
            argv = [
                *script("pdlb-dispatcher"), *common, "--load-balance-method",
                "round_robin" if method == PINNED else method, "--report-interval-ms", "100",
                "--dp-size", str(a.ranks),
            ]  # fmt: skip
            proc = ServiceProcess(f"dispatcher-{method}", argv, self.log_dir, ENV)
            self.procs.append(proc.start())
            self.dispatchers[method] = proc.address
            # the routers refuse power_of_two with one worker URL (checked before the DP expansion):
            # the pinned dispatcher gets a second gateway replica for it
            for replica in range(2 if method == PINNED else 1):
                http_port = free_port()
                gateway = ServiceProcess(
                    f"gateway-{method}-{replica}",
                    [
                        *script("pdlb-gateway"), "--etcd", "", "--port", "0", "--log-level", "WARNING",
                        "--http-port", str(http_port), "--dispatcher", proc.address, "--model", MODEL,
                    ],
                    self.log_dir,
                    ENV,
                )  # fmt: skip
                self.procs.append(gateway.start())
                self.gateways.setdefault(method, []).append(f"http://127.0.0.1:{http_port}")
        for proc in schedulers:
            self.procs.append(proc.wait_ready(120))

    async def start_routers(self) -> None:
        """After the ranks are live: a DP-aware router asks the gateway for dp_size at start."""
        for method in self.router_methods:
            kind, policy = method.split(":", 1)
            router = peer_routers.Router(
                kind,
                policy,
                self.gateways[PINNED] if policy == "power_of_two" else self.gateways[PINNED][:1],
                dp_size=self.args.ranks,
                log_dir=self.log_dir,
            )
            self.routers[method] = await asyncio.to_thread(router.start)
            await peer_routers.wait_serving(router.url, MODEL)

    def url(self, method: str) -> str:
        return self.routers[method].url if method in self.routers else self.gateways[method][0]

    def dispatcher(self, method: str) -> str:
        return self.dispatchers[PINNED if method in self.routers else method]

    def stop(self) -> None:
        for router in self.routers.values():
            router.stop()
        for proc in reversed(self.procs):
            proc.terminate()
        self.etcd.close()


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    item: WorkItem,
    result: balance_bench.RunResult,
    start: float,
    floor: float | None,
    ranks: dict,
) -> None:
    await asyncio.sleep(max(0.0, item.arrival_s - (time.perf_counter() - start)))  # the arrival schedule
    body = {
        "model": MODEL,
        "prompt": to_text(item.input_ids),
        "max_tokens": item.max_new_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    sent = time.perf_counter()
    last, chunks = sent, 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as reply:
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status} {(await reply.text())[:400]}")
            async for line in reply.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"stream error {event['error'].get('code', '')}")
                if not event.get("choices"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft.append(now - sent)
                    if floor is not None:  # served requests only, as their TTFTs
                        result.floors.append(floor)
                    rank = event.get("dp_rank")
                    ranks[rank] = ranks.get(rank, 0) + 1
                    if floor is not None:
                        result.queued.append(now - sent - floor)
                else:
                    result.itl.append(now - last)
                chunks += 1
                last = now
    except (aiohttp.ClientError, RuntimeError, asyncio.TimeoutError) as exc:
        result.failed += 1
        key = re.sub(r"(cmpl|mixed)-[\w-]+", "", str(exc))[-200:] or type(exc).__name__  # the kind, not the id
        result.errors[key] = result.errors.get(key, 0) + 1
        return
    result.ok += 1
    result.output_tokens += item.max_new_tokens  # ignore_eos: exactly max_tokens each
    result.e2e.append(last - sent)


async def run_method(
    cluster: Cluster, method: str, items: list[WorkItem], label: tuple[str, float], floors: list[float] | None
) -> tuple[balance_bench.RunResult, dict]:
    result = balance_bench.RunResult(method, label[0], label[1])
    served: dict = {}  # rank that served -> requests (from the gateway's dp_rank field)
    channel = grpc.aio.insecure_channel(cluster.dispatcher(method))
    stub = dispatch_pb2_grpc.DispatchStub(channel)
    ranks = cluster.args.ranks
    await balance_bench.wait_ready_and_idle(stub, ranks)
    before = balance_bench.cache_counters(await balance_bench.snapshot(stub))
    stop = asyncio.Event()
    start = time.perf_counter()
    sampler = asyncio.create_task(balance_bench.sample_imbalance(stub, result, start, stop))
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        url = cluster.url(method)
        await asyncio.gather(
            *[
                one_request(session, url, item, result, start, floor, served)
                for item, floor in zip(items, floors or [None] * len(items), strict=True)
            ]
        )
    result.span_s = time.perf_counter() - start
    stop.set()
    await sampler
    await balance_bench.wait_ready_and_idle(stub, ranks)
    after = balance_bench.cache_counters(await balance_bench.snapshot(stub))
    result.cache_hit_tokens, result.prompt_tokens = after[0] - before[0], after[1] - before[1]
    await channel.close()
    return result, served


def workload(args: argparse.Namespace, seed: int) -> tuple[list[WorkItem], list[int], tuple[str, float], str]:
    """(items, each item's prompt tokens a prefix cache could at best serve, (label, rate), how the
    workload was made) for `--workload` and one seed."""
    if args.workload == "mooncake":
        scaling = mooncake_trace.TraceScaling(
            start=args.trace_start + (seed - 1) * args.num_requests,  # each seed: the next window
            num_requests=args.num_requests,
            length_divisor=args.trace_length_divisor,
            speedup=args.trace_speedup,
        )
        items, reusable = mooncake_trace.load(Path(args.trace), scaling)
        rate = len(items) / items[-1].arrival_s if items and items[-1].arrival_s else 0.0
        return items, reusable, ("mooncake", round(rate, 2)), scaling.describe()
    flags, recorded = balance_suite.WORKLOADS[args.workload]
    rate = round(balance_suite.LOADS[args.load] * recorded[1], 1)
    bench_args = balance_bench.build_parser().parse_args([*flags, "--rates", str(rate), "--seed", str(seed)])
    spec = balance_bench.workload_spec(bench_args, rate, bench_args.arrivals, seed, args.num_requests)
    items = generate(spec)
    reusable = [spec.prefix_len if i.group >= 0 else 0 for i in items]  # as the suite's floors
    return items, reusable, (args.workload, rate), f"suite workload {args.workload} at {args.load} load ({rate} req/s)"


def floors_of(items: list[WorkItem], reusable: list[int], cost: CostModel) -> list[float]:
    """Each request's TTFT alone on an idle rank that caches all of its prompt any earlier request
    could have left there: the floor no placement beats."""
    return [balance_bench.ttft_floor(item, cached, cost) for item, cached in zip(items, reusable, strict=True)]


def summarise(rows: list[dict]) -> str:
    """Per method: medians over seeds of the suite's numbers and of the ratios to pdlb's round robin."""
    by_seed: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], {})[row["method"]] = row
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "| method | routed by | TTFT p50 ms | TTFT p99 ms | p99 / round_robin | floor p99 ms | queueing p99 ms | "
        "queueing p99 / round_robin | throughput tok/s | throughput / round_robin | cache hit rate | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def spread(values: list[float]) -> str:
        return f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""

    for method in methods:
        mine = [runs[method] for runs in by_seed.values() if method in runs]
        base = [runs.get("round_robin") for runs in by_seed.values() if method in runs]
        p99_ratio = [m["ttft_p99_ms"] / b["ttft_p99_ms"] for m, b in zip(mine, base, strict=True) if b]
        q_ratio = [m["queued_p99_ms"] / b["queued_p99_ms"] for m, b in zip(mine, base, strict=True) if b]
        t_ratio = [m["throughput_tok_s"] / b["throughput_tok_s"] for m, b in zip(mine, base, strict=True) if b]
        ok = sum(m["ok"] for m in mine)
        total = sum(m["ok"] + m["failed"] for m in mine)
        lines.append(
            f"| {method} | {routed_by(method)} | {med([m['ttft_p50_ms'] for m in mine]):.0f} | "
            f"{med([m['ttft_p99_ms'] for m in mine]):.0f} | {med(p99_ratio):.2f}{spread(p99_ratio)} | "
            f"{med([m['ttft_floor_p99_ms'] for m in mine]):.0f} | {med([m['queued_p99_ms'] for m in mine]):.0f} | "
            f"{med(q_ratio):.2f}{spread(q_ratio)} | {med([m['throughput_tok_s'] for m in mine]):.0f} | "
            f"{med(t_ratio):.2f} | {med([m['cache_hit_rate'] for m in mine]):.1%} | {ok}/{total} |"
        )
    return "\n".join(lines) + "\n"


def routed_by(method: str) -> str:
    if method.startswith(("smg:", "vllm-router:")):
        return "real router (PyPI binary)"
    if method.startswith("peer_"):
        return "pdlb re-implementation of a peer"
    return "pdlb"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workload", default="heavy_tail", help=f"mooncake or one of {', '.join(balance_suite.WORKLOADS)}"
    )
    parser.add_argument(
        "--load", default="high", choices=list(balance_suite.LOADS), help="suite workloads: share of capacity"
    )
    parser.add_argument(
        "--pdlb-methods", default=PDLB_METHODS, help="pdlb dispatcher methods (round_robin is the base)"
    )
    parser.add_argument("--routers", default=ROUTER_METHODS, help="kind:policy list ('' for none)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed", type=int, default=1, help="run seeds first-seed .. first-seed+seeds-1 (split a long run)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the other seeds' rows of an earlier run of the same --name and summarise them all",
    )
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--slowdown", type=float, default=10.0, help="sim cost model multiplier")
    parser.add_argument("--kv-tokens", type=int, default=16384)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--trace", default=str(mooncake_trace.DEFAULT_TRACE), help="the Mooncake trace (JSONL)")
    parser.add_argument("--trace-start", type=int, default=0, help="first trace request (seed s: the s-th window)")
    parser.add_argument("--trace-length-divisor", type=int, default=16)
    parser.add_argument("--trace-speedup", type=float, default=2.5, help="time compression of the trace")
    parser.add_argument("--name", default="", help="result file stem (default: routers_<workload>)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    args.name = args.name or f"routers_{args.workload}"
    pdlb_methods = [m for m in args.pdlb_methods.split(",") if m]
    if "round_robin" not in pdlb_methods:
        parser.error("--pdlb-methods must include round_robin (the base of the ratios)")
    routers = [m for m in args.routers.split(",") if m]
    if routers:
        peer_routers.binary("smg"), peer_routers.binary("vllm-router")  # fail early, saying how to install
    methods = [*pdlb_methods, *routers]
    cost = CostModel().scaled(args.slowdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(args, pdlb_methods, routers)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows: list[dict] = []
    described = ""
    earlier = out / f"{args.name}.json"
    if args.append and earlier.is_file():  # an earlier invocation's seeds (one run split to fit a time slot)
        kept = json.loads(earlier.read_text())
        rows = [r for r in kept["rows"] if r["seed"] not in seeds]
        described = kept["workload"]
    try:
        cluster.start()
        asyncio.run(cluster.start_routers())
        for seed in seeds:
            items, reusable, label, described = workload(args, seed)
            floors = floors_of(items, reusable, cost)
            shift = (seed - 1) % len(methods)
            for n, method in enumerate(methods[shift:] + methods[:shift]):  # rotating order per seed
                # caches start cold for every run; then ids the byte tokenizer gives back from text
                run_items = [replace(i, input_ids=text_ids(i.input_ids)) for i in salted(items, seed * 1000 + n + 1)]
                result, ranks = asyncio.run(run_method(cluster, method, run_items, label, floors))
                row = {**result.row(), "seed": seed, "workload": label[0], "ranks": sorted(ranks.items(), key=str)}
                rows.append(row)
                print(
                    f"seed {seed} {method:28} ok {row['ok']:4}/{row['ok'] + row['failed']} "
                    f"TTFT p99 {row['ttft_p99_ms']:7.0f} ms queueing p99 {row['queued_p99_ms']:7.0f} ms "
                    f"hit {row['cache_hit_rate']:.1%} ranks {[n for _, n in row['ranks']]} {row['errors'] or ''}",
                    flush=True,
                )
                (out / f"{args.name}.json").write_text(json.dumps({"workload": described, "rows": rows}))
    finally:
        cluster.stop()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "trace")}  # no local paths in results
    text = (
        f"# Balancing against the real routers: {args.workload}\n\nWorkload: {described}; "
        f"{len({r['seed'] for r in rows})} seeds x "
        f"{args.num_requests} requests per method, {args.ranks} sim ranks.\n\nSettings: {json.dumps(settings)}\n\n"
        "Medians over seeds (ratios: min-max over seeds in brackets).\n\n" + summarise(rows)
    )
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
