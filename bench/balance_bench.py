"""Balancing quality: pdlb's methods against the peers' policies on one cluster, in one run.

One etcd, N simulated DP ranks (`pdlb-scheduler --runner sim`, real batching, step times from a
cost model) and one dispatcher per method, all attached to the same schedulers. Every method gets
the same synthetic workload (same seed) in turn, after the cluster has drained. Reported: TTFT and
ITL percentiles, throughput, and load imbalance over time (max / mean tokens per rank, sampled from
the dispatcher's load table every 100 ms).

Run: `make bench` or `python -m bench.balance_bench --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from pdlb.client import PDLBClient
from pdlb.common.etcd_process import EtcdProcess
from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceProcess, script
from pdlb.engines.torch.model import SeqChunk
from pdlb.engines.torch.runners import CostModel, StepItem
from pdlb.v1 import common_pb2, dispatch_pb2
from pdlb.workload import WorkItem, WorkloadSpec, generate, percentile, percentile_fields, salted

CHUNKED_PREFILL = 1024  # the schedulers' --chunked-prefill-size
DEFAULT_METHODS = "least_wait,total_requests,total_tokens,kv_aware,round_robin,peer_sglang_minimum_tokens,peer_vllm_dp"
RESULTS = Path(__file__).parent / "results"


@dataclass
class RunResult:
    method: str
    arrival: str
    rate: float
    ok: int = 0
    failed: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    output_tokens: int = 0
    span_s: float = 0.0
    imbalance: list[tuple[float, float]] = field(default_factory=list)  # (t, max/mean tokens)
    errors: dict[str, int] = field(default_factory=dict)
    cache_hit_tokens: int = 0  # prompt tokens the workers served from their prefix caches in this run
    prompt_tokens: int = 0
    group: GroupCounters | None = None  # lockstep groups: what this run added to the counters
    floors: list[float] = field(default_factory=list)  # sim: each request's TTFT alone on an idle rank
    queued: list[float] = field(default_factory=list)  # sim: TTFT less that floor, per served request
    # One row per request that got a first token: (index, arrival s from the run's start, TTFT s,
    # floor s or -1, DP rank, cached prompt tokens, prompt tokens, output tokens asked, the
    # predicted-latency method's predicted TTFT ms on its rank or 0): where the tail came from.
    records: list[tuple] = field(default_factory=list)

    def row(self) -> dict:
        active = [v for _, v in self.imbalance]
        return {
            "method": self.method,
            "arrival": self.arrival,
            "rate": self.rate,
            "ok": self.ok,
            "failed": self.failed,
            **percentile_fields("ttft", self.ttft, unit="ms", scale=1000),
            **percentile_fields("ttft_floor", self.floors, (99,), unit="ms", scale=1000),
            **percentile_fields("queued", self.queued, unit="ms", scale=1000),
            **percentile_fields("itl", self.itl, unit="ms", scale=1000),
            **percentile_fields("e2e", self.e2e, (50,), unit="ms", scale=1000),
            "throughput_tok_s": self.output_tokens / self.span_s if self.span_s else 0.0,
            "requests_per_s": self.ok / self.span_s if self.span_s else 0.0,
            "imbalance_mean": statistics.fmean(active) if active else float("nan"),
            "imbalance_p90": percentile(active, 90),
            "cache_hit_rate": self.cache_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "errors": dict(self.errors),
            "dummy_step_share": self.group.dummy_share if self.group else float("nan"),
            "step_imbalance": self.group.step_imbalance if self.group else float("nan"),
        }


@dataclass
class GroupCounters:
    """Sums over every rank of a role's lockstep groups (DPGroupState)."""

    steps: int = 0
    dummy_steps: int = 0
    imbalance_sum: float = 0.0
    imbalance_steps: int = 0

    @staticmethod
    def of(snaps: list[dispatch_pb2.WatchLoadResponse]) -> GroupCounters:
        total = GroupCounters()
        for snap in snaps:
            for row in snap.workers:
                g = row.dp_group
                total.steps += g.steps
                total.dummy_steps += g.dummy_steps
                total.imbalance_sum += g.imbalance_sum
                total.imbalance_steps += g.imbalance_steps
        return total

    def minus(self, before: GroupCounters) -> GroupCounters:
        return GroupCounters(
            self.steps - before.steps,
            self.dummy_steps - before.dummy_steps,
            self.imbalance_sum - before.imbalance_sum,
            self.imbalance_steps - before.imbalance_steps,
        )

    @property
    def dummy_share(self) -> float:
        """Share of rank-steps spent waiting for other ranks with no work of one's own."""
        return self.dummy_steps / self.steps if self.steps else float("nan")

    @property
    def step_imbalance(self) -> float:
        """Mean over group steps of max / mean attention tokens across the group's ranks."""
        return self.imbalance_sum / self.imbalance_steps if self.imbalance_steps else float("nan")


FLOW_SUFFIX = "+flow"  # a method name with this suffix: the same method with flow control on
# ... with flow control judging room by batch slots and KV only (not by prompt work queued ahead)
FLOW_SLOTS_SUFFIX = "+flow-slots"


# `method:key=value:...` sets these dispatcher flags of a method's cluster, e.g. `+flow:share=0`.
METHOD_OPTIONS = {
    "share": "--tenant-share",
    "window": "--tenant-active-window",
    "sttl": "--sheddable-queue-ttl",
    "ttl": "--queue-ttl",
    "reserve": "--reserved-slots",
    "headroom": "--lend-headroom",
    "gather": "--gather-ms",
}
# `method:key=0|1` turns these boolean dispatcher flags off or on, e.g. `+flow:lend=0` (a hard share).
METHOD_SWITCHES = {"lend": "--work-conserving"}


def method_flags(method: str) -> list[str]:
    """Dispatcher flags of a benchmarked method: `least_wait+flow` is least_wait with late binding
    (the dispatcher's admission queue, its default room test); `least_wait+flow@0.25` the same with
    `--max-prefill-ahead-chunks 0.25`; `least_wait+flow-slots` with room judged by free batch slots
    and KV alone; without a suffix, flow control is off. Options after `:` (METHOD_OPTIONS,
    METHOD_SWITCHES), e.g. `least_wait+flow:share=0:sttl=2` or `least_wait+flow:lend=0`, add their flags."""
    method, *options = method.split(":")
    extra = []
    for option in options:
        key, sep, value = option.partition("=")
        if sep and key in METHOD_SWITCHES and value in ("0", "1"):
            flag = METHOD_SWITCHES[key]
            extra.append(flag if value == "1" else "--no-" + flag[2:])
            continue
        if not sep or key not in METHOD_OPTIONS:
            known = sorted(METHOD_OPTIONS) + [f"{k} (0 or 1)" for k in sorted(METHOD_SWITCHES)]
            raise SystemExit(f"method option {option!r}: expected one of {known} as key=value")
        extra += [METHOD_OPTIONS[key], value]
    return _base_flags(method) + extra


def _base_flags(method: str) -> list[str]:
    if method.endswith(FLOW_SLOTS_SUFFIX):
        base = method.removesuffix(FLOW_SLOTS_SUFFIX)
        return ["--load-balance-method", base, "--flow-control", "--max-prefill-ahead-chunks", "0"]
    base, sep, chunks = method.partition(FLOW_SUFFIX + "@")
    if sep:
        return ["--load-balance-method", base, "--flow-control", "--max-prefill-ahead-chunks", chunks]
    base = method.removesuffix(FLOW_SUFFIX)
    return ["--load-balance-method", base, "--flow-control" if method != base else "--no-flow-control"]


class Cluster:
    def __init__(self, args: argparse.Namespace, methods: list[str]) -> None:
        self.args, self.methods = args, methods
        self.log_dir = tempfile.mkdtemp(prefix="pdlb-balance-")
        self.etcd = EtcdProcess()
        self.procs: list[ServiceProcess] = []
        self.dispatchers: dict[str, list[dict[str, str]]] = {}  # method -> per replica: PDLBClient arguments

    def start(self) -> None:
        self.etcd.start()
        common = ["--etcd", self.etcd.endpoint, "--lease-ttl", "10", "--log-level", "WARNING"]
        pd = self.args.mode == "pd"
        if pd:
            self.procs.append(
                ServiceProcess("bootstrap", [*script("pdlb-bootstrap"), *common, "--port", "0"], self.log_dir).start()
            )
        for method, replica in [(m, r) for m in self.methods for r in range(self.args.replicas)]:
            roles = {"prefill": "prefill", "decode": "decode"} if pd else {"dispatcher": "null"}
            self.dispatchers.setdefault(method, []).append({})
            for key, mode in roles.items():
                argv = [
                    *script("pdlb-dispatcher"),
                    *common,
                    "--port",
                    "0",
                    "--disaggregation-mode",
                    mode,
                    *method_flags(method),
                    "--report-interval-ms",
                    "100",
                ]
                proc = ServiceProcess(f"dispatcher-{key}-{method}-{replica}", argv, self.log_dir)
                self.procs.append(proc.start())
                self.dispatchers[method][replica][key] = proc.address
        flags = [
            "--runner", self.args.runner, "--sim-slowdown", str(self.args.slowdown),
            "--max-total-tokens", str(self.args.kv_tokens), "--max-running-requests", str(self.args.max_running),
            "--chunked-prefill-size", str(CHUNKED_PREFILL),
            "--hidden-size", "64", "--num-layers", "2", "--num-heads", "4",
            "--kv-events" if self.args.kv_events else "--no-kv-events",
        ]  # fmt: skip
        eviction = getattr(self.args, "prefix_eviction", "")  # the schedulers' default when unset
        flags += ["--prefix-eviction", eviction] if eviction else []
        modes = ["prefill", "decode"] if pd else ["null"]
        size = self.args.group_size
        rendezvous = {(mode, g): f"127.0.0.1:{free_port()}" for mode in modes for g in range(self.args.ranks // size)}

        def group_flags(mode: str, rank: int) -> list[str]:
            if size <= 1:
                return []
            return ["--dp-group-size", str(size), "--dp-group-address", rendezvous[mode, rank // size]]

        schedulers = [
            ServiceProcess(
                f"scheduler-{mode}-{r}",
                [
                    *script("pdlb-scheduler"),
                    *common,
                    "--port",
                    "0",
                    "--disaggregation-mode",
                    mode,
                    "--dp-rank",
                    str(r),
                    *flags,
                    *group_flags(mode, r),
                ],
                self.log_dir,
            )
            for mode in modes
            for r in range(self.args.ranks)
        ]
        for proc in schedulers:
            proc.spawn()
        for proc in schedulers:
            self.procs.append(proc.wait_ready(120))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        self.etcd.close()


async def snapshot(stub) -> dispatch_pb2.WatchLoadResponse:
    call = stub.WatchLoad(dispatch_pb2.WatchLoadRequest(interval_ms=50), timeout=10)
    async for snap in call:
        call.cancel()
        return snap
    raise RuntimeError("no snapshot")


async def wait_ready_and_idle(stub, ranks: int, timeout: float = 300) -> None:
    """Every rank reporting, with nothing running, waiting or in flight (status polling)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = await snapshot(stub)
        rows = [w for w in snap.workers if w.state == dispatch_pb2.MEMBER_STATE_LIVE and w.report_age_ms >= 0]
        if len(rows) == ranks and all(
            w.reported.running_requests + w.reported.waiting_requests == 0 and w.inflight_requests == 0 for w in rows
        ):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("cluster did not become idle")


def ttft_floor(item: WorkItem, cached: int, cost: CostModel) -> float:
    """The request's time to first token on an idle sim rank that already caches `cached` of its
    prompt tokens: its prefill chunks back to back, no queueing, no other work in its steps. Every
    placement's TTFT of the request is at least this, so a percentile of these bounds the same
    percentile of any method's TTFTs from below (what no balancing can beat)."""
    done, total, seconds = min(cached, len(item.input_ids) - 1), len(item.input_ids), 0.0
    while done < total:
        n = min(CHUNKED_PREFILL, total - done)
        seconds += cost.step_time([StepItem(SeqChunk([0] * n, done, []), sample=done + n == total)])
        done += n
    return seconds


async def one_request(
    client: PDLBClient, item: WorkItem, run_id: str, result: RunResult, start: float, floor: float | None = None
) -> None:
    await asyncio.sleep(max(0.0, item.arrival_s - (time.perf_counter() - start)))  # the arrival schedule
    req = common_pb2.InferenceRequest(
        request_id=f"{run_id}-{item.index}",
        input_ids=item.input_ids,
        sampling=common_pb2.SamplingParams(max_new_tokens=item.max_new_tokens, ignore_eos=True, temperature=0.0),
    )
    sent = time.perf_counter()
    last, tokens = sent, 0
    try:
        async for chunk in client.generate(req, timeout=600):
            now = time.perf_counter()
            if chunk.token_ids:
                if tokens == 0:
                    result.ttft.append(now - sent)
                    if floor is not None:
                        result.queued.append(now - sent - floor)
                    result.records.append(
                        (item.index, item.arrival_s, now - sent, -1.0 if floor is None else floor, chunk.dp_rank,
                         chunk.cached_tokens, len(item.input_ids), item.max_new_tokens, chunk.predicted_ms)
                    )  # fmt: skip
                else:  # tokens that arrive together share the gap since the previous message
                    result.itl.extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
                tokens += len(chunk.token_ids)
                last = now
    except grpc.aio.AioRpcError as err:
        result.failed += 1
        result.errors[err.code().name] = result.errors.get(err.code().name, 0) + 1
        return
    result.ok += 1
    result.output_tokens += tokens
    result.e2e.append(last - sent)


async def sample_imbalance(stub, result: RunResult, start: float, stop: asyncio.Event) -> None:
    call = stub.WatchLoad(dispatch_pb2.WatchLoadRequest(interval_ms=100))
    async for snap in call:
        loads = [w.reported.running_tokens + w.reported.waiting_tokens for w in snap.workers]
        mean = statistics.fmean(loads) if loads else 0
        if mean > 0:
            result.imbalance.append((time.perf_counter() - start, max(loads) / mean))
        if stop.is_set():
            call.cancel()
            return


async def run_method(
    replicas: list[dict[str, str]],
    method: str,
    items: list[WorkItem],
    spec: WorkloadSpec,
    ranks: int,
    floors: list[float] | None = None,
) -> RunResult:
    """One method's run of the workload; `floors`: each item's TTFT floor (sim ranks only)."""
    result = RunResult(method, spec.arrival, spec.rate)
    result.floors = floors or []
    clients = [PDLBClient(**addresses) for addresses in replicas]  # requests alternate over replicas
    client = clients[0]
    # Imbalance is sampled where requests first land: the mixed or the prefill dispatcher.
    watched = client.mixed or client.prefill
    stubs = {id(s): s for s in (client.mixed, client.prefill, client.decode) if s}.values()
    for stub in stubs:
        await wait_ready_and_idle(stub, ranks)
    before = cache_counters(await snapshot(watched))
    groups_before = GroupCounters.of([await snapshot(stub) for stub in stubs])
    stop = asyncio.Event()
    start = time.perf_counter()
    sampler = asyncio.create_task(sample_imbalance(watched, result, start, stop))
    run_id = f"{method}-{spec.arrival}-{spec.rate}-{int(start)}"
    await asyncio.gather(
        *[
            one_request(clients[item.index % len(clients)], item, run_id, result, start, floor)
            for item, floor in zip(items, floors or [None] * len(items), strict=True)
        ]
    )
    result.span_s = time.perf_counter() - start
    stop.set()
    await sampler
    for stub in stubs:  # the counters are final once every worker reported itself idle
        await wait_ready_and_idle(stub, ranks)
    after = cache_counters(await snapshot(watched))
    result.cache_hit_tokens, result.prompt_tokens = after[0] - before[0], after[1] - before[1]
    result.group = GroupCounters.of([await snapshot(stub) for stub in stubs]).minus(groups_before)
    for each in clients:
        await each.close()
    return result


def cache_counters(snap: dispatch_pb2.WatchLoadResponse) -> tuple[int, int]:
    """Cluster totals of (prompt tokens served from prefix caches, prompt tokens)."""
    rows = snap.workers
    return sum(w.reported.cache_hit_tokens for w in rows), sum(w.reported.prompt_tokens_total for w in rows)


def markdown(rows: list[dict]) -> str:
    lines = []
    for arrival, rate in sorted({(r["arrival"], r["rate"]) for r in rows}):
        group = [r for r in rows if (r["arrival"], r["rate"]) == (arrival, rate)]
        rr = next((r for r in group if r["method"] == "round_robin"), None)
        lockstep = any(r["dummy_step_share"] == r["dummy_step_share"] for r in group)  # not NaN
        lines += [
            f"\n### {arrival} arrivals, {rate:g} req/s\n",
            "| method | ok | TTFT p50 ms | TTFT p99 ms | p99 vs round_robin | ITL p50 ms | ITL p99 ms | "
            "throughput tok/s | throughput vs round_robin | cache hit rate | imbalance mean | imbalance p90 |"
            + (" dummy-step share | per-step imbalance |" if lockstep else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if lockstep else ""),
        ]
        for r in sorted(group, key=lambda r: r["ttft_p99_ms"]):
            ratio = r["ttft_p99_ms"] / rr["ttft_p99_ms"] if rr and rr["ttft_p99_ms"] else float("nan")
            tput = r["throughput_tok_s"] / rr["throughput_tok_s"] if rr and rr["throughput_tok_s"] else float("nan")
            lines.append(
                f"| {r['method']} | {r['ok']}/{r['ok'] + r['failed']} | {r['ttft_p50_ms']:.0f} | "
                f"{r['ttft_p99_ms']:.0f} | {ratio:.2f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | "
                f"{r['throughput_tok_s']:.0f} | {tput:.2f} | {r['cache_hit_rate']:.1%} | "
                f"{r['imbalance_mean']:.2f} | {r['imbalance_p90']:.2f} |"
                + (f" {r['dummy_step_share']:.1%} | {r['step_imbalance']:.2f} |" if lockstep else "")
            )
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], out: Path, name: str) -> list[Path]:
    try:
        import matplotlib
    except ImportError:  # a machine without it (e.g. a lent GPU host running the sims): tables only
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r.row() for r in results]
    configs = sorted({(r["arrival"], r["rate"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    files = []
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, (arrival, rate) in zip(axes[0], configs, strict=True):
        values = [
            next((r["ttft_p99_ms"] for r in rows if (r["method"], r["arrival"], r["rate"]) == (m, arrival, rate)), 0)
            for m in methods
        ]
        ax.bar(
            range(len(methods)),
            values,
            color=["tab:blue" if not m.startswith("peer_") else "tab:gray" for m in methods],
        )
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"TTFT p99 (ms): {arrival}, {rate:g} req/s", fontsize=9)
    fig.tight_layout()
    files.append(out / f"{name}_ttft_p99.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    arrival, rate = configs[-1]
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        if (r.arrival, r.rate) == (arrival, rate) and r.imbalance:
            ax.plot([t for t, _ in r.imbalance], [v for _, v in r.imbalance], label=r.method, linewidth=1)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("max / mean tokens per rank")
    ax.set_title(f"Load imbalance over time: {arrival}, {rate:g} req/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / f"{name}_imbalance.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def write_results(results: list[RunResult], args: argparse.Namespace, out: Path) -> None:
    """The table (markdown) and every request's numbers (JSON) of the runs so far."""
    table = markdown([r.row() for r in results])
    settings = {k: v for k, v in vars(args).items() if k != "out"}  # no local paths in results
    (out / f"{args.name}.md").write_text(f"# Balancing benchmark\n\nSettings: {json.dumps(settings)}\n{table}")
    (out / f"{args.name}.json").write_text(json.dumps([{**asdict(r), "row": r.row()} for r in results]))


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (the suite and the router benchmark parse workload flags with it too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--rates", default="7,10")
    parser.add_argument("--arrivals", default="poisson,bursty")
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--runner", choices=["sim", "torch"], default="sim", help="scheduler runner")
    parser.add_argument("--mode", choices=["mixed", "pd"], default="mixed", help="mixed workers, or prefill + decode")
    parser.add_argument("--prefix-groups", type=int, default=0, help="shared-prefix groups (0: none)")
    parser.add_argument("--prefix-len", type=int, default=0, help="tokens of each group's shared prefix")
    parser.add_argument(
        "--prompts-per-group", type=int, default=0, help="requests per prefix group (replaces --num-requests)"
    )
    parser.add_argument(
        "--shared-fraction", type=float, default=1.0, help="with prefix groups: share of requests in one (rest unique)"
    )
    parser.add_argument("--input-median", type=int, default=256, help="median prompt (or question) tokens")
    parser.add_argument("--output-median", type=int, default=48, help="median output tokens")
    parser.add_argument("--slowdown", type=float, default=10.0, help="sim cost model multiplier")
    parser.add_argument("--kv-tokens", type=int, default=16384)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--long-tail-fraction", type=float, default=0.1)
    parser.add_argument("--doc-fraction", type=float, default=0.0, help="bimodal: share of document-sized prompts")
    parser.add_argument("--doc-median", type=int, default=1500, help="bimodal: median document prompt tokens")
    parser.add_argument("--burst-size", type=int, default=16, help="bursty arrivals: requests per burst")
    parser.add_argument("--replicas", type=int, default=1, help="dispatcher replicas per method (requests alternate)")
    parser.add_argument(
        "--kv-events", action=argparse.BooleanOptionalAction, default=True, help="workers report cache block events"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--group-size", type=int, default=1, help="ranks per lockstep DP group (1: independent workers)"
    )
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="", help="result file stem (default: balance[_pd][_torch])")
    return parser


def workload_spec(args: argparse.Namespace, rate: float, arrival: str, seed: int, num_requests: int) -> WorkloadSpec:
    """The workload of parsed `build_parser()` flags at one rate, arrival process and seed."""
    return WorkloadSpec(
        num_requests=num_requests,
        rate=rate,
        arrival=arrival,
        input_median=args.input_median,
        output_median=args.output_median,
        long_tail_fraction=args.long_tail_fraction,
        doc_fraction=args.doc_fraction,
        doc_median=args.doc_median,
        burst_size=args.burst_size,
        max_input=2048,
        max_output=256,
        seed=seed,
        prefix_groups=args.prefix_groups,
        prefix_len=args.prefix_len,
        prompts_per_group=args.prompts_per_group,
        shared_fraction=args.shared_fraction,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.name = args.name or "balance" + ("_pd" if args.mode == "pd" else "") + (
        "_torch" if args.runner == "torch" else ""
    ) + (f"_lockstep{args.group_size}" if args.group_size > 1 else "")
    if args.group_size > 1 and args.ranks % args.group_size:
        parser.error("--ranks must be a multiple of --group-size")
    methods = args.methods.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # TTFT floors need the ranks' step times: the sim's cost model (mixed ranks; a PD request's
    # first token also waits for its hand-off, which the floor does not model)
    cost = CostModel().scaled(args.slowdown) if args.runner == "sim" and args.mode == "mixed" else None
    cluster = Cluster(args, methods)
    cluster.start()
    results: list[RunResult] = []
    try:
        for arrival in args.arrivals.split(","):
            for rate in [float(r) for r in args.rates.split(",")]:
                spec = workload_spec(args, rate, arrival, args.seed, args.num_requests)
                items = generate(spec)
                # the same for every method: salting changes token ids, not lengths or groups
                floors = [ttft_floor(i, spec.prefix_len if i.group >= 0 else 0, cost) for i in items] if cost else None
                shift = (len(results) // len(methods)) % len(methods)  # one step per configuration
                order = methods[shift:] + methods[:shift]
                for method in order:  # rotate the order per configuration so no method always runs first
                    run_items = salted(items, len(results) + 1)  # caches start cold for every run
                    result = asyncio.run(
                        run_method(cluster.dispatchers[method], method, run_items, spec, args.ranks, floors)
                    )
                    results.append(result)
                    write_results(results, args, out)  # after every method: a run cut short keeps them
                    row = result.row()
                    print(
                        f"{arrival:8} {rate:5g} req/s {method:28} ok {row['ok']:4} "
                        f"TTFT p99 {row['ttft_p99_ms']:8.0f} ms  hit {row['cache_hit_rate']:.1%}"
                        f"  imbalance {row['imbalance_mean']:.2f}"
                        + (
                            f"  dummy {row['dummy_step_share']:.1%} step imbalance {row['step_imbalance']:.2f}"
                            if result.group and result.group.steps
                            else ""
                        )
                        + f" {row['errors'] or ''}",
                        flush=True,
                    )
    finally:
        cluster.stop()
    table = markdown([r.row() for r in results])  # the files were written after the last method
    files = plot(results, out, args.name)
    print(table)
    print("wrote", out / f"{args.name}.md", *files)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
