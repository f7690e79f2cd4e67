"""Replay of the Mooncake conversation trace (FAST'25) on simulated ranks, methods side by side.

The trace (`../shared/traces/mooncake_conversation_trace.jsonl` beside the checkout; see the
README there) gives each request's arrival, input and output length and its 512-token prefix block
hashes. It is scaled to the sim ranks:

- lengths: divided by `--length-divisor` D, block size too (512 / D tokens), so prompts fit the
  ranks and prefix sharing keeps its shape; prompts are capped at `--max-input` tokens (their block
  lists cut with them), outputs at 256;
- time: a window of `--num-requests` consecutive requests from `--offset`, its arrival times
  compressed so the mean rate is `--load` x `--capacity` (requests/s), keeping the trace's bursts;
- tokens: each hash id becomes a fixed block of token ids (drawn from a generator seeded with the
  id; `bench/mooncake_trace.py` loads and scales it), so requests that share leading ids share that
  prefix exactly and prefix caches hit for real.

Each request's floor is its TTFT alone on an idle rank that caches the longest prefix any earlier
request of the window had (the best cache it could have); queueing = TTFT - floor. Its cold floor
is the same with nothing cached. Two TTFT SLOs are reported side by side: the goal's, 3 x floor +
200 ms, and a stand-in every request can meet alone on an idle rank whatever it finds cached,
3 x cold floor + 200 ms (not the goal's definition: it forgives a method that misses a cached
prefix). Per run, the share of requests meeting each (shed and failed requests miss both); with
`--goodput`, per SLO: the highest rate of the `--loads` ladder at which >= 99% of requests meet it,
per method and seed, against round robin's and the best peer's (`peer_*`). `--cache-critical`
counts the requests that miss the goal's SLO alone on an idle rank unless they hit their cached
prefix (what no placement without that hit can meet, at any load), and those that miss the
stand-in alone and cold (none can: the check that it is meetable).
`--high-share` marks that share of requests priority 0 and the rest priority 1 (sheddable), to
measure overload; `--flood-tenant` makes one tenant send that multiple of another's
share to measure fair sharing.

  python -m bench.trace_replay --loads 0.6,0.85 --seeds 1,2,3 --num-requests 300
  python -m bench.trace_replay --goodput --loads 0.2,0.35,0.5,0.65 --seeds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from bench import balance_bench, mooncake_trace
from pdlb.client import PDLBClient
from pdlb.engines.torch.eviction import eviction_order
from pdlb.engines.torch.prefix_cache import PrefixCache
from pdlb.engines.torch.runners import CostModel
from pdlb.workload import WorkItem, percentile_fields, salted

DEFAULT_METHODS = "round_robin,predicted_latency,peer_dynamo_kv,predicted_latency+flow"
EVICTION_SEP = "~"  # METHOD~ORDER: the method on ranks whose prefix caches evict in ORDER
SLO_FLOOR_FACTOR, SLO_SLACK_S = 3.0, 0.2  # the TTFT SLO: 3 x the request's own floor + 200 ms
GOAL, STAND_IN = "slo_attainment", "slo_cold_attainment"  # a run's attainment of each SLO (summary keys)
SLO_NAMES = {GOAL: "goal: 3 x floor + 200 ms", STAND_IN: "stand-in: 3 x cold floor + 200 ms"}


def slo_limit(floor: float) -> float:
    """The TTFT (seconds) a request of `floor` seconds must not exceed: 3 x floor + 200 ms. Given the
    warm floor it is the goal's SLO; given the cold floor, the stand-in's."""
    return SLO_FLOOR_FACTOR * floor + SLO_SLACK_S


@dataclass
class TraceItem:
    item: WorkItem
    floor: float
    priority: int = 0
    tenant: str = ""
    cached: int = 0  # prompt tokens the floor takes as cached (the best cache the request could have)
    cold_floor: float = 0.0  # seconds: its TTFT alone on an idle rank with nothing cached (>= floor)


@dataclass
class Outcome:
    ttft: list[float] = field(default_factory=list)
    queued: list[float] = field(default_factory=list)
    slo_met: int = 0  # answered within the goal's SLO (`slo_limit` of the floor)
    slo_cold_met: int = 0  # answered within the stand-in SLO (`slo_limit` of the cold floor)
    ok: int = 0
    shed: int = 0  # RESOURCE_EXHAUSTED
    failed: int = 0  # anything else
    retry_after_missing: int = 0
    output_tokens: int = 0
    # With --per-request, one row per answered request: (index, sent s from the run's start, TTFT s,
    # floor s, DP rank, cached prompt tokens, prompt tokens, tokens the floor took as cached,
    # predicted_latency's predicted TTFT ms on the rank it chose, 0 for other methods).
    records: list[tuple] = field(default_factory=list)


def scale(args: argparse.Namespace, rate: float, cost: CostModel, seed: int) -> list[TraceItem]:
    """The window as sim work items (`bench.mooncake_trace`), time-compressed to a mean of `rate`
    requests/s, with floors, priorities and tenants (see the module doc)."""
    full = mooncake_trace.TraceScaling(args.offset, args.num_requests, args.length_divisor, max_input=args.max_input)
    items, _ = mooncake_trace.load(Path(args.trace), full)
    if len(items) < args.num_requests:
        raise SystemExit(f"{args.trace}: only {len(items)} requests from offset {args.offset}")
    span = items[-1].arrival_s or 1.0
    scaling = replace(full, speedup=span / (len(items) / rate))
    items, reusable = mooncake_trace.load(Path(args.trace), scaling)
    rng = random.Random(seed)
    out = []
    for item, cached in zip(items, reusable, strict=True):
        priority = 0 if rng.random() < args.high_share else 1
        tenant = ""
        if args.flood_tenant > 0:  # tenant "flood" sends flood_tenant x the share of tenant "steady"
            tenant = "flood" if rng.random() < args.flood_tenant / (args.flood_tenant + 1) else "steady"
        floor, cold = balance_bench.ttft_floor(item, cached, cost), balance_bench.ttft_floor(item, 0, cost)
        out.append(TraceItem(item, floor, priority, tenant, cached, cold))
    return out


def cache_critical(args: argparse.Namespace, cost: CostModel) -> tuple[int, int]:
    """(requests of the window that miss the SLO even alone on an idle rank unless they hit their
    cached prefix, requests): the misses no placement avoids without that cache hit, so the
    attainment a method can reach without it is at most 1 - first / second (load-free)."""
    items = scale(args, args.capacity, cost, seed=0)  # lengths and caches do not depend on the rate
    critical = sum(1 for t in items if t.cold_floor > slo_limit(t.floor))
    return critical, len(items)


def stand_in_misses(args: argparse.Namespace, cost: CostModel) -> tuple[int, int]:
    """(requests of the window whose TTFT alone on an idle rank with nothing cached, their cold
    floor, exceeds the stand-in SLO, requests). A cache hit only shortens a prefill, so a request
    alone meets the stand-in whatever it finds cached; the first count is 0 by the arithmetic
    (3 x cold floor + 200 ms > cold floor), counted here from the cost model to show it."""
    items = scale(args, args.capacity, cost, seed=0)
    return sum(1 for t in items if balance_bench.ttft_floor(t.item, 0, cost) > slo_limit(t.cold_floor)), len(items)


class _Slots:
    """A rank's KV slots for the offline replay: counts only (the cache's release hands them back)."""

    def __init__(self, tokens: int) -> None:
        self.free = tokens

    def take(self, n: int) -> list[int]:
        self.free -= n
        return [0] * n

    def release(self, slots: list[int]) -> None:
        self.free += len(slots)


PLACEMENTS = ("pooled", "round_robin", "affinity")


def block_names(ids: list[int], page: int) -> list[int]:
    """The names of the prompt's full blocks of `page` tokens, each chained over those before it."""
    names, name = [], 0
    for start in range(0, len(ids) - len(ids) % page, page):
        name = hash((name, tuple(ids[start : start + page])))
        names.append(name)
    return names


def eviction_losses(
    args: argparse.Namespace,
    cost: CostModel,
    eviction: str,
    placement: str = "pooled",
    seed: int = 0,
    recorded: list[tuple[int, int]] | None = None,
) -> list[float]:
    """What each request of the window loses over its floor (seconds, >= 0) to eviction, offline and
    load-free: the window's prompts go in order through the ranks' prefix caches
    (`pdlb.engines.torch.prefix_cache`, `--page-size` blocks, evicting by `eviction`, a random order
    seeded with `seed` + rank), each request locking its cached prefix, computing and caching the
    rest, then unlocking; its loss is its TTFT alone on an idle rank with the prefix its cache still
    held, less its floor (which assumes a cache that never evicts). `placement`: `pooled`, one cache
    of all ranks' KV (`--ranks` x `--kv-tokens`, no duplicates, none held by running requests: more
    than eight separate caches give any method); `round_robin`, request i on rank i mod ranks (a
    continued conversation rarely lands where its prefix is); `affinity`, the rank an earlier request
    sharing its longest prefix beyond the trace's first block (the system prompt) went to, whether or
    not that rank still caches it, else the rank given the fewest prompt tokens over the last
    `--ranks` requests: a stand-in for the cache-aware methods, and a placement that does not depend
    on the eviction order, so orders compare on the same placement; `recorded`, the (request, DP
    rank) pairs of a real run in the order they were sent (`--placements-from`)."""
    items = scale(args, args.capacity, cost, seed=0)  # lengths and caches do not depend on the rate
    pooled = placement == "pooled" and recorded is None
    ranks = 1 if pooled else args.ranks
    kv = args.kv_tokens * (args.ranks if pooled else 1)
    banks = [_Slots(kv) for _ in range(ranks)]
    caches = [
        PrefixCache(args.page_size, bank.release, eviction=eviction_order(eviction, seed + rank))
        for rank, bank in enumerate(banks)
    ]
    system = (mooncake_trace.TRACE_BLOCK_TOKENS // args.length_divisor) // args.page_size  # blocks of it
    recent: list[tuple[int, int]] = []  # (rank, prompt tokens), the last `ranks` requests
    placed: dict[int, int] = {}  # block chain name -> the rank the last request with it went to
    losses = []
    for index, given in recorded or [(i, -1) for i in range(len(items))]:
        t = items[index]
        ids = t.item.input_ids
        names = block_names(ids, args.page_size)
        rank = given if given >= 0 else index % ranks
        if placement == "affinity" and given < 0:
            shared = next((placed[n] for n in reversed(names[system:]) if n in placed), None)
            if shared is None:
                work = [0] * ranks
                for r, tokens in recent:
                    work[r] += tokens
                shared = min(range(ranks), key=lambda r: work[r])
            rank = shared
            recent = [*recent[-(ranks - 1) :], (rank, len(ids))]
            placed.update((n, rank) for n in names)
        cache, bank = caches[rank], banks[rank]
        path = cache.match(ids, len(ids) - 1)  # the last token is computed for its logits, as the engine does
        hit = sum(len(node.slots) for node in path)
        losses.append(max(0.0, balance_bench.ttft_floor(t.item, min(hit, t.cached), cost) - t.floor))
        cache.lock(path)
        new = len(ids) - hit
        if new > bank.free:
            cache.evict(new - bank.free)
        path, duplicates = cache.insert(ids, [0] * hit + bank.take(new), path)
        bank.release(duplicates)
        bank.release([0] * (len(ids) - sum(len(node.slots) for node in path)))  # the uncached tail, freed
        cache.unlock(path)
    return losses


RANDOM_SEEDS = (1, 2, 3, 4, 5)  # an order that draws at random is replayed with each


def eviction_report(args: argparse.Namespace, cost: CostModel) -> str:
    """Per placement and eviction order: requests losing > 200 ms to eviction and the p99 loss (for
    a random order the median over `RANDOM_SEEDS`, min-max in brackets)."""
    lines = [
        f"Offline eviction replay: requests {args.offset}..{args.offset + args.num_requests - 1} of the trace, "
        f"lengths / {args.length_divisor}, {args.ranks} ranks x {args.kv_tokens} tokens of KV, blocks of "
        f"{args.page_size} tokens; loss = TTFT alone on an idle rank with the prefix still cached - floor",
        "",
        f"| placement | eviction | requests losing > {SLO_SLACK_S * 1000:.0f} ms (of {args.num_requests}) "
        "| loss p99 ms | mean loss ms |",
        "|---|---|---|---|---|",
    ]

    def cell(values: list[float], fmt: str) -> str:
        if len(values) == 1:
            return format(values[0], fmt)
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    placements = [(p, None) for p in args.placements.split(",") if p]
    for name in [n for n in args.placements_from.split(",") if n]:  # real runs' placements
        for run in json.loads((Path(args.out) / f"{name}.json").read_text())["runs"]:
            if run.get("requests") and not run.get("variant"):
                label = f"{run['method']} at {run['load']:g}, seed {run['seed']} (ranks: {run.get('eviction', 'lru')})"
                sent = [(r[0], r[4]) for r in sorted(run["requests"], key=lambda r: r[1])]
                placements.append((label, sent))
    for placement, recorded in placements:
        for eviction in args.evictions.split(","):
            seeds = RANDOM_SEEDS if "random" in eviction else (0,)
            over, worst, mean = [], [], []
            for seed in seeds:
                losses = sorted(eviction_losses(args, cost, eviction, placement, seed, recorded))
                worst.append(losses[-max(1, math.ceil(0.01 * len(losses)))] * 1000)
                over.append(sum(loss > SLO_SLACK_S for loss in losses))
                mean.append(statistics.fmean(losses) * 1000)
            lines.append(
                f"| {placement} | {eviction} | {cell(over, '.0f')} | {cell(worst, '.0f')} | {cell(mean, '.1f')} |"
            )
    return "\n".join(lines)


async def one(
    client: PDLBClient,
    t: TraceItem,
    run_id: str,
    out: dict[tuple[int, str], Outcome],
    start: float,
    per_request: bool = False,
):
    from pdlb.v1 import common_pb2

    await asyncio.sleep(max(0.0, t.item.arrival_s - (time.perf_counter() - start)))
    req = common_pb2.InferenceRequest(
        request_id=f"{run_id}-{t.item.index}",
        input_ids=t.item.input_ids,
        sampling=common_pb2.SamplingParams(max_new_tokens=t.item.max_new_tokens, ignore_eos=True),
        priority=t.priority,
        tenant=t.tenant,
    )
    res = out.setdefault((t.priority, t.tenant), Outcome())
    sent = time.perf_counter()
    first = None
    rank = cached = -1
    predicted = 0.0
    try:
        async for chunk in client.generate(req, timeout=600):
            if chunk.token_ids and first is None:
                first = time.perf_counter() - sent
                rank, cached, predicted = chunk.dp_rank, chunk.cached_tokens, chunk.predicted_ms
            res.output_tokens += len(chunk.token_ids)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            res.shed += 1
            if not any(k == "retry-after" for k, _ in err.trailing_metadata() or ()):
                res.retry_after_missing += 1
        else:
            res.failed += 1
        return
    res.ok += 1
    if first is not None:
        res.ttft.append(first)
        res.queued.append(first - t.floor)
        res.slo_met += first <= slo_limit(t.floor)
        res.slo_cold_met += first <= slo_limit(t.cold_floor)
        if per_request:
            res.records.append(
                (t.item.index, sent - start, first, t.floor, rank, cached, len(t.item.input_ids), t.cached, predicted)
            )


async def run(
    replicas: list[dict[str, str]], items: list[TraceItem], ranks: int, run_id: str, per_request: bool = False
) -> tuple[dict, float]:
    clients = [PDLBClient(**addresses) for addresses in replicas]
    stub = clients[0].mixed
    await balance_bench.wait_ready_and_idle(stub, ranks)
    out: dict[tuple[int, str], Outcome] = {}
    depths: list[tuple[int, int]] = []
    sampler = asyncio.create_task(sample_queues(stub, depths))
    start = time.perf_counter()
    await asyncio.gather(
        *[one(clients[t.item.index % len(clients)], t, run_id, out, start, per_request) for t in items]
    )
    span = time.perf_counter() - start
    sampler.cancel()
    out[QUEUES] = depths  # type: ignore[index]
    await balance_bench.wait_ready_and_idle(stub, ranks)
    for c in clients:
        await c.close()
    return out, span


QUEUES = "queues"  # key of the sampled queue depths in a run's outcomes


async def sample_queues(stub, depths: list[tuple[int, int]]) -> None:
    """Every 100 ms while a run lasts: (requests waiting in the ranks' own queues, summed; requests
    held in the dispatcher's queue), from the dispatcher's WatchLoad."""
    from pdlb.v1 import dispatch_pb2

    try:
        async for snap in stub.WatchLoad(dispatch_pb2.WatchLoadRequest(interval_ms=100)):
            depths.append((sum(w.reported.waiting_requests for w in snap.workers), snap.flow.queued_requests))
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        return


def queue_summary(depths: list[tuple[int, int]]) -> dict:
    """Mean and max of the sampled depths (see `sample_queues`)."""
    ranks, held = [d[0] for d in depths] or [0], [d[1] for d in depths] or [0]
    return {
        "rank_waiting_mean": statistics.fmean(ranks),
        "rank_waiting_max": max(ranks),
        "held_mean": statistics.fmean(held),
        "held_max": max(held),
    }


def summary(out: dict, span: float, cls: tuple[int | None, str | None] = (None, None)) -> dict:
    parts = [o for k, o in out.items() if k != QUEUES and cls[0] in (None, k[0]) and cls[1] in (None, k[1])]
    merged = Outcome()
    for o in parts:
        merged.ttft += o.ttft
        merged.queued += o.queued
        for name in ("slo_met", "slo_cold_met", "ok", "shed", "failed", "retry_after_missing", "output_tokens"):
            setattr(merged, name, getattr(merged, name) + getattr(o, name))
    total = merged.ok + merged.shed + merged.failed
    return {
        "requests": total,
        "ok": merged.ok,
        "shed": merged.shed,
        "failed": merged.failed,
        "retry_after_missing": merged.retry_after_missing,
        **percentile_fields("ttft", merged.ttft, unit="ms", scale=1000),
        **percentile_fields("queued", merged.queued, (99,), unit="ms", scale=1000),
        GOAL: merged.slo_met / total if total else float("nan"),
        STAND_IN: merged.slo_cold_met / total if total else float("nan"),
        "throughput_tok_s": merged.output_tokens / span if span else 0.0,
        "requests_per_s": merged.ok / span if span else 0.0,
    }


def run_line(row: dict) -> str:
    """One run's numbers on one line, with each priority class and tenant."""
    a, q = row["all"], row["queues"]
    classes = [k for k in row if k.startswith(("priority_", "tenant_"))]
    return (
        f"seed {row['seed']} load {row['load']:.2f} {row['variant']:5} {row['method']:26} ok {a['ok']}/{a['requests']} "
        f"shed {a['shed']} failed {a['failed']} TTFT p50 {a['ttft_p50_ms']:.0f} p99 {a['ttft_p99_ms']:.0f} ms "
        f"queued p99 {a['queued_p99_ms']:.0f} ms SLO {a[GOAL]:.1%} stand-in {a[STAND_IN]:.1%} "
        f"{a['throughput_tok_s']:.0f} tok/s "
        f"{a['requests_per_s']:.1f} req/s | waiting at ranks mean {q['rank_waiting_mean']:.1f} max "
        f"{q['rank_waiting_max']}, held mean {q['held_mean']:.1f} max {q['held_max']} | load average "
        f"{row.get('loadavg', math.nan):.1f}"
        + "".join(
            f" | {k} p99 {row[k]['ttft_p99_ms']:.0f} ms shed {row[k]['shed']}" for k in classes if len(classes) > 1
        )
    )


def variants(args: argparse.Namespace, items: list[TraceItem], seed: int) -> list[tuple[str, list[TraceItem]]]:
    """The runs of one window: as is, or with a tenant flood first "fair" (the flood tenant thinned
    to the steady tenant's rate: each sends its share) and then "flood" (all of it). The steady
    tenant's requests and arrival times are the same in both, so its TTFT p99 compares directly."""
    if args.flood_tenant <= 0:
        return [("", items)]
    rng = random.Random(seed * 7919)
    keep = 1 / args.flood_tenant
    fair = [t for t in items if t.tenant != "flood" or rng.random() < keep]
    return [("fair", fair), ("flood", items)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(mooncake_trace.DEFAULT_TRACE))
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--offset", type=int, default=0, help="first request of the window")
    parser.add_argument("--num-requests", type=int, default=600)
    parser.add_argument("--length-divisor", type=int, default=16, help="input/output lengths and block size / D")
    parser.add_argument("--max-input", type=int, default=2048, help="prompt cap after scaling, tokens")
    parser.add_argument("--capacity", type=float, default=16.0, help="requests/s the ranks serve (--probe)")
    parser.add_argument("--loads", default="0.6,0.85", help="shares of --capacity")
    parser.add_argument("--seeds", default="1,2,3", help="one run per seed (priorities, tenants, salts)")
    parser.add_argument("--high-share", type=float, default=1.0, help="share of priority-0 requests (rest: 1)")
    parser.add_argument("--flood-tenant", type=float, default=0.0, help="tenant 'flood' sends this x 'steady'")
    parser.add_argument(
        "--goodput",
        action="store_true",
        help="also report goodput: the highest of --loads at which >= 99%% of requests meet TTFT <= 3 x floor + 200 ms "
        "(the goal's SLO), and the same for 3 x cold floor + 200 ms (a stand-in every request meets alone)",
    )
    parser.add_argument(
        "--cache-critical",
        action="store_true",
        help="only print how many requests of the window miss the goal's SLO alone on an idle rank without their "
        "cached prefix (no placement meets it for them without the cache hit), how many miss the stand-in SLO "
        "alone and cold (0: it is meetable), and exit",
    )
    parser.add_argument(
        "--eviction-bound",
        action="store_true",
        help="only print what the requests of the window lose over their floors to eviction, replayed offline "
        "through the ranks' prefix caches with each of --evictions and --placements, and exit",
    )
    parser.add_argument(
        "--evictions", default="lru,slru,slru-random", help="--eviction-bound: prefix-cache eviction orders to compare"
    )
    parser.add_argument(
        "--placements",
        default=",".join(PLACEMENTS),
        help="--eviction-bound: pooled (one cache of all ranks' KV), round_robin, affinity (longest cached prefix)",
    )
    parser.add_argument(
        "--placements-from",
        default="",
        help="--eviction-bound: also replay the placements of these earlier runs (comma separated names of their "
        "JSON under --out, run with --per-request): each run's requests on the ranks they went to, in send order",
    )
    parser.add_argument("--page-size", type=int, default=16, help="--eviction-bound: the ranks' cache block, tokens")
    parser.add_argument(
        "--per-request",
        action="store_true",
        help="keep each request's rank, cache hit and times, and break the worst queueing of each run down "
        "(cache shortfall, prefills sharing its rank; see breakdown_report)",
    )
    parser.add_argument(
        "--prefix-eviction",
        default="",
        help="the ranks' prefix-cache eviction order (pdlb-scheduler --prefix-eviction; default: theirs). A method "
        f"written METHOD{EVICTION_SEP}ORDER runs on a second set of ranks evicting in ORDER, in the same invocation",
    )
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--slowdown", type=float, default=10.0)
    parser.add_argument("--kv-tokens", type=int, default=16384)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--out", default=str(balance_bench.RESULTS))
    parser.add_argument("--name", default="trace")
    parser.add_argument(
        "--combine",
        default="",
        help="comma separated names of earlier runs (their JSON under --out): write their runs together as --name "
        "and run nothing (seeds split over several invocations)",
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    if args.combine:
        return combine(args, out_dir)
    if args.cache_critical:
        critical, total = cache_critical(args, CostModel().scaled(args.slowdown))
        cold, _ = stand_in_misses(args, CostModel().scaled(args.slowdown))
        print(
            f"{critical} of {total} requests ({critical / total:.1%}) miss TTFT <= {SLO_FLOOR_FACTOR:g} x floor + "
            f"{SLO_SLACK_S * 1000:.0f} ms alone on an idle rank unless they hit their cached prefix\n"
            f"{cold} of {total} requests ({cold / total:.1%}) miss TTFT <= {SLO_FLOOR_FACTOR:g} x cold floor + "
            f"{SLO_SLACK_S * 1000:.0f} ms alone on an idle rank with nothing cached"
        )
        return 0
    if args.eviction_bound:
        print(eviction_report(args, CostModel().scaled(args.slowdown)))
        return 0
    methods = args.methods.split(",")
    evictions: dict[str, str] = {}  # method -> its ranks' eviction order ("" for the schedulers' default)
    for method in methods:
        evictions[method] = method.partition(EVICTION_SEP)[2] or args.prefix_eviction
    cost = CostModel().scaled(args.slowdown)
    clusters, dispatchers = [], {}
    for eviction in dict.fromkeys(evictions.values()):  # one set of ranks per order, each started once
        mine = [m for m in methods if evictions[m] == eviction]
        cluster_args = argparse.Namespace(
            mode="mixed", replicas=1, runner="sim", slowdown=args.slowdown, kv_tokens=args.kv_tokens,
            max_running=args.max_running, kv_events=True, ranks=args.ranks, group_size=1, prefix_eviction=eviction,
        )  # fmt: skip
        cluster = balance_bench.Cluster(cluster_args, list(dict.fromkeys(m.partition(EVICTION_SEP)[0] for m in mine)))
        clusters.append(cluster)
        cluster.start()
        dispatchers.update({m: cluster.dispatchers[m.partition(EVICTION_SEP)[0]] for m in mine})
    results = []
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for load in [float(x) for x in args.loads.split(",")]:
                items = scale(args, load * args.capacity, cost, seed)
                for variant, chosen in variants(args, items, seed):
                    shift = len(results) % len(methods)
                    for method in methods[shift:] + methods[:shift]:  # rotating order
                        salt = len(results) + 1  # cold caches for every run
                        salted_items = [
                            TraceItem(s, t.floor, t.priority, t.tenant, t.cached, t.cold_floor)
                            for s, t in zip(salted([t.item for t in chosen], salt), chosen, strict=True)
                        ]
                        out, span = asyncio.run(
                            run(
                                dispatchers[method],
                                salted_items,
                                args.ranks,
                                f"{method}-{seed}-{load}-{salt}",
                                args.per_request,
                            )
                        )
                        row = {
                            "method": method,
                            "seed": seed,
                            "load": load,
                            "variant": variant,
                            "eviction": evictions[method] or "default",
                            "sent": len(salted_items),
                            "all": summary(out, span),
                            "loadavg": os.getloadavg()[0],  # 1-minute, at the run's end: the machine's contention
                        }
                        row["queues"] = queue_summary(out.pop(QUEUES))
                        if args.per_request:
                            row["requests"] = sorted(r for o in out.values() for r in o.records)
                        for p in sorted({p for p, _ in out}):
                            row[f"priority_{p}"] = summary(out, span, (p, None))
                        for tenant in sorted({t for _, t in out if t}):
                            row[f"tenant_{tenant}"] = summary(out, span, (None, tenant))
                        results.append(row)
                        print(run_line(row), flush=True)
                        write(results, args, out_dir)
    finally:
        for cluster in clusters:
            cluster.stop()
    print(report(results))
    if args.flood_tenant > 0:
        print(flood_report(results))
    if 0 < args.high_share < 1:
        print(overload_report(results))
    if args.goodput:
        print(goodput_report(results, args.capacity))
    if args.per_request:
        print(breakdown_report(results, cost))
        print(cache_report(results, cost, window(args)))
    return 0


def combine(args: argparse.Namespace, out_dir: Path) -> int:
    """Merge the runs of earlier invocations (same settings but seeds) into one report."""
    results = []
    for name in args.combine.split(","):
        saved = json.loads((out_dir / f"{name}.json").read_text())
        for key in (
            "flood_tenant", "high_share", "num_requests", "capacity", "goodput", "per_request", "slowdown", "offset",
            "length_divisor", "max_input",
        ):  # fmt: skip
            setattr(args, key, saved["settings"].get(key, getattr(args, key)))
        results += saved["runs"]
    args.combine = ""
    args.seeds = ",".join(sorted({str(r["seed"]) for r in results}))
    args.loads = ",".join(f"{x:g}" for x in sorted({r["load"] for r in results}))
    args.methods = ",".join(dict.fromkeys(r["method"] for r in results))
    write(results, args, out_dir)
    print(report(results))
    if args.flood_tenant > 0:
        print(flood_report(results))
    if 0 < args.high_share < 1:
        print(overload_report(results))
    if args.goodput:
        print(goodput_report(results, args.capacity))
    if args.per_request:
        print(breakdown_report(results, CostModel().scaled(args.slowdown)))
        print(cache_report(results, CostModel().scaled(args.slowdown), window(args)))
    return 0


def write(results: list[dict], args: argparse.Namespace, out_dir: Path) -> None:
    """The runs so far: every run's numbers (JSON, local) and the table of medians (markdown)."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "trace")}  # no local paths
    (out_dir / f"{args.name}.json").write_text(json.dumps({"settings": settings, "runs": results}))
    runs = "\n".join(
        f"| {r['method']} | {r['seed']} | {r['load']:g}{' ' + r['variant'] if r.get('variant') else ''} | "
        f"{r.get('loadavg', math.nan):.1f} | "
        + " | ".join(
            f"{k}: TTFT p99 {v['ttft_p99_ms']:.0f} ms, queued p99 {v['queued_p99_ms']:.0f} ms, "
            f"SLO {v[GOAL]:.1%}, stand-in SLO {v.get(STAND_IN, math.nan):.1%}, shed {v['shed']}/{v['requests']}"
            for k, v in r.items()
            if isinstance(v, dict) and k != "queues"
        )
        + " |"
        for r in results
    )
    (out_dir / f"{args.name}.md").write_text(
        f"# Trace replay\n\nSettings: {json.dumps(settings)}\n\n## Medians over seeds\n\n{report(results)}\n\n"
        + (f"## Tenant flood\n\n{flood_report(results)}\n\n" if args.flood_tenant > 0 else "")
        + (f"## Overload, two priority classes\n\n{overload_report(results)}\n\n" if 0 < args.high_share < 1 else "")
        + (f"## Goodput\n\n{goodput_report(results, args.capacity)}\n\n" if args.goodput else "")
        + (
            f"## The worst 1% of requests by queueing, broken down\n\n"
            f"{breakdown_report(results, CostModel().scaled(args.slowdown))}\n\n"
            f"## Cache shortfall of every request\n\n"
            f"{cache_report(results, CostModel().scaled(args.slowdown), window(args))}\n\n"
            if args.per_request
            else ""
        )
        + f"## Every run\n\n| method | seed | load | load average | classes |\n|---|---|---|---|---|\n{runs}\n"
    )
    plot(results, out_dir / f"{args.name}_queued_p99.png")


def plot(results: list[dict], path: Path) -> None:
    """Queueing p99 of each run against round robin's of the same seed and load (dots), per method."""
    try:
        import matplotlib
    except ImportError:  # tables only
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = sorted({r["load"] for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        for x, method in enumerate(methods):
            values = [r["all"]["queued_p99_ms"] for r in results if (r["load"], r["method"]) == (load, method)]
            ax.scatter([x] * len(values), values, color="tab:gray" if method.startswith("peer_") else "tab:blue")
            if values:
                ax.plot([x - 0.3, x + 0.3], [statistics.median(values)] * 2, color="black")
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("queueing p99 (TTFT - floor), ms")
        ax.set_title(f"load {load:g} of capacity: runs and median", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def flood_report(results: list[dict]) -> str:
    """Per method, the steady tenant's TTFT p99 under the flood over its value when both tenants
    send their share (same seed and load), median over seeds and spread; the goal is <= 1.2. Also
    the requests served per second under the flood (median, spread): what a share leaves idle."""
    lines = [
        "| load | method | steady TTFT p99 flood / fair (spread) | steady p99 fair, flood ms | flood p99 ms | "
        "shed (flood tenant) | served req/s under the flood (spread) | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for load in sorted({r["load"] for r in results if r.get("variant") == "flood"}):
        for method in dict.fromkeys(r["method"] for r in results):
            ratios, fair_ms, flood_ms, flood_p99, shed, served = [], [], [], [], [], []
            for r in results:
                if (r["load"], r["method"], r.get("variant")) != (load, method, "flood"):
                    continue
                fair = next(
                    (
                        b
                        for b in results
                        if (b["load"], b["method"], b["seed"], b.get("variant")) == (load, method, r["seed"], "fair")
                    ),
                    None,
                )
                if fair is None or "tenant_steady" not in r or "tenant_steady" not in fair:
                    continue
                a, b = r["tenant_steady"]["ttft_p99_ms"], fair["tenant_steady"]["ttft_p99_ms"]
                ratios.append(a / b)
                fair_ms.append(b)
                flood_ms.append(a)
                flood_p99.append(r["tenant_flood"]["ttft_p99_ms"])
                shed.append(r["tenant_flood"]["shed"])
                served.append(r["all"]["requests_per_s"])
            if ratios:
                lines.append(
                    f"| {load:g} | {method} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
                    f"{statistics.median(fair_ms):.0f}, {statistics.median(flood_ms):.0f} | "
                    f"{statistics.median(flood_p99):.0f} | {statistics.median(shed):.0f} | "
                    f"{statistics.median(served):.1f} ({min(served):.1f}-{max(served):.1f}) | {len(ratios)} |"
                )
    return "\n".join(lines)


def overload_report(results: list[dict]) -> str:
    """With two priority classes: per method, the high class's (priority 0) TTFT p99 at each load
    over its value at the lowest load (same seed), medians over seeds, and its p50; served, shed and failed
    counts per class and the served rate (requests/s over the run, its drain included; medians),
    and the requests answered with any status against those sent, summed over seeds (equal: none
    hung). The goal at 1.5x capacity is <= 2, with the low class shed, not hanging."""
    plain = [r for r in results if not r.get("variant") and "priority_1" in r and "priority_0" in r]
    if not plain:
        return ""
    low = min(r["load"] for r in plain)
    lines = [
        f"| load | method | high TTFT p99 / at load {low:g} (per seed) | high TTFT p99 ms | high TTFT p50 ms | "
        "low TTFT p99 ms | served high / low | shed high / low | shed without Retry-After | failed | served req/s | "
        "answered / sent | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in sorted({r["load"] for r in plain}):
        for method in dict.fromkeys(r["method"] for r in plain):
            rows = [r for r in plain if (r["load"], r["method"]) == (load, method)]
            ratios = []
            for r in rows:
                base = next((b for b in plain if (b["load"], b["method"], b["seed"]) == (low, method, r["seed"])), None)
                if base is not None:
                    ratios.append(r["priority_0"]["ttft_p99_ms"] / base["priority_0"]["ttft_p99_ms"])
            if not rows:
                continue

            def med(key: str, cls: str, rows=rows) -> float:
                return statistics.median(r[cls][key] for r in rows)

            lines.append(
                f"| {load:g} | {method} | {statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) | "
                f"{med('ttft_p99_ms', 'priority_0'):.0f} | {med('ttft_p50_ms', 'priority_0'):.0f} | "
                f"{med('ttft_p99_ms', 'priority_1'):.0f} | "
                f"{med('ok', 'priority_0'):.0f} / {med('ok', 'priority_1'):.0f} | "
                f"{med('shed', 'priority_0'):.0f} / {med('shed', 'priority_1'):.0f} | "
                f"{med('retry_after_missing', 'all'):.0f} | {med('failed', 'all'):.0f} | "
                f"{med('requests_per_s', 'all'):.1f} | {sum(r['all']['requests'] for r in rows)} / "
                f"{sum(r.get('sent', r['all']['requests']) for r in rows)} | {len(rows)} |"
            )
    return "\n".join(lines)


def breakdown(row: dict, cost: CostModel, worst: float = 0.01) -> list[dict]:
    """The worst `worst` share of a run's requests by queueing (TTFT - floor), each broken down:
    `cold_ms`, what its cache shortfall cost (its TTFT alone on an idle rank with the cache it got,
    less its floor, which assumes the best cache it could have); `rest_ms`, the remainder (waiting
    for the rank's current step, sharing steps with other prompts' chunks, the dispatcher's queue,
    RPC overhead); `ahead`, other prompts of the run in prefill on its rank when it was sent
    (sent before it, first token after); `joined`, prompts sent to its rank during its prefill;
    `idle_ranks`, ranks with no prompt in prefill when it was sent. Needs --per-request rows."""
    rows = row.get("requests") or []
    if not rows:
        return []
    by_rank: dict[int, list[tuple]] = {}
    for r in rows:
        by_rank.setdefault(r[4], []).append(r)
    ranks = sorted(by_rank)
    out = []
    count = max(1, math.ceil(worst * len(rows)))
    for index, sent, ttft, floor, rank, cached, prompt, best, *_ in sorted(rows, key=lambda r: r[3] - r[2])[:count]:
        got = balance_bench.ttft_floor(WorkItem(index, 0.0, [0] * prompt, 1), max(cached, 0), cost)
        cold = max(0.0, got - floor)
        first = sent + ttft
        mine = by_rank[rank]
        out.append(
            {
                "index": index,
                "queued_ms": (ttft - floor) * 1000,
                "cold_ms": cold * 1000,
                "rest_ms": (ttft - floor - cold) * 1000,
                "prompt": prompt,
                "cached": cached,
                "best_cached": best,
                "ahead": sum(1 for r in mine if r[1] < sent < r[1] + r[2] and r[0] != index),
                "joined": sum(1 for r in mine if sent < r[1] < first and r[0] != index),
                "idle_ranks": sum(
                    1 for k in ranks if not any(r[1] <= sent < r[1] + r[2] and r[0] != index for r in by_rank[k])
                ),
            }
        )
    return out


def breakdown_report(results: list[dict], cost: CostModel) -> str:
    """Per load and method, over seeds: the worst 1% of requests by queueing, broken down (see
    `breakdown`): medians of queueing, of what the cache shortfall cost and of the rest; the share
    of them that got less cache than the best they could have, that had another prompt in prefill
    on their rank when sent, and that were sent while some rank had no prompt in prefill."""
    lines = [
        "| load | method | worst-1% requests | queueing ms (median) | of it cache shortfall ms | rest ms | "
        "short of cache | prefill ahead on its rank | a prefill-idle rank existed | prompt tokens (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in sorted({r["load"] for r in results}):
        for method in dict.fromkeys(r["method"] for r in results):
            worst = [
                b
                for r in results
                if (r["load"], r["method"]) == (load, method) and not r.get("variant")
                for b in breakdown(r, cost)
            ]
            if not worst:
                continue
            n = len(worst)

            def med(key: str, worst=worst) -> float:
                return statistics.median(b[key] for b in worst)

            lines.append(
                f"| {load:g} | {method} | {n} | {med('queued_ms'):.0f} | {med('cold_ms'):.0f} | {med('rest_ms'):.0f} | "
                f"{sum(b['cached'] < b['best_cached'] for b in worst) / n:.0%} | "
                f"{sum(b['ahead'] > 0 for b in worst) / n:.0%} | {sum(b['idle_ranks'] > 0 for b in worst) / n:.0%} | "
                f"{med('prompt'):.0f} |"
            )
    return "\n".join(lines)


def window(args: argparse.Namespace) -> list[TraceItem] | None:
    """The run's window of the trace (token ids as the runs had them before salting), or None when
    the trace is not there (a report from saved runs elsewhere)."""
    try:
        return scale(args, args.capacity, CostModel().scaled(args.slowdown), seed=0)
    except (FileNotFoundError, SystemExit):
        return None


def shortfalls(row: dict, cost: CostModel) -> list[float]:
    """Per answered request of a run (--per-request rows): what its cache shortfall cost, seconds
    (its TTFT alone on an idle rank with the cache it got, less its floor), as the offline eviction
    replay counts a request's loss, here with the placement and the eviction the run had."""
    return [
        max(0.0, balance_bench.ttft_floor(WorkItem(index, 0.0, [0] * prompt, 1), max(cached, 0), cost) - floor)
        for index, _, _, floor, _, cached, prompt, _, *_ in row.get("requests") or []
    ]


def followed(row: dict, items: list[TraceItem], page: int, system: int) -> tuple[int, int]:
    """(requests of a run that continue an earlier request's prompt beyond the system prompt's
    `system` blocks, by at least 512 tokens, those of them sent to the DP rank that earlier request
    went to): how often a method followed a conversation to the rank that computed its prefix."""
    placed: dict[int, int] = {}
    continued = same = 0
    for index, _, _, _, rank, _, _, best, *_ in sorted(row.get("requests") or [], key=lambda r: r[1]):
        names = block_names(items[index].item.input_ids, page)
        earlier = next((placed[n] for n in reversed(names[system:]) if n in placed), None)
        if earlier is not None and best >= 512:
            continued += 1
            same += earlier == rank
        placed.update((n, rank) for n in names)
    return continued, same


def cache_report(results: list[dict], cost: CostModel, items: list[TraceItem] | None = None, page: int = 16) -> str:
    """Per load and method: requests whose cache shortfall cost > 200 ms, the p99 of that cost,
    the prompt tokens served from cache over those the best cache would have served, and (given the
    window's `items`) how many continued conversations went to the rank of their prefix, per seed
    (medians over seeds first). Needs --per-request rows."""
    lines = [
        f"| load | method | ranks' eviction | requests short of their cache by > {SLO_SLACK_S * 1000:.0f} ms, median "
        "(per seed) | shortfall p99 ms, median (per seed) | cached / best cached tokens | continued turns on their "
        "prefix's rank (per seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    system = 32 // page  # the trace's first block (its system prompt) at the benchmark's scaling
    for load in sorted({r["load"] for r in results}):
        for method in dict.fromkeys(r["method"] for r in results):
            runs = [
                r
                for r in results
                if (r["load"], r["method"]) == (load, method) and not r.get("variant") and r.get("requests")
            ]
            if not runs:
                continue
            over, p99, got, best, follow = [], [], 0, 0, []
            for r in sorted(runs, key=lambda r: r["seed"]):
                if items is not None:
                    continued, same = followed(r, items, page, system)
                    follow.append(f"{same}/{continued}")
                costs = sorted(shortfalls(r, cost))
                over.append(sum(c > SLO_SLACK_S for c in costs))
                p99.append(costs[-max(1, math.ceil(0.01 * len(costs)))] * 1000)
                got += sum(max(q[5], 0) for q in r["requests"])
                best += sum(q[7] for q in r["requests"])
            lines.append(
                f"| {load:g} | {method} | {runs[0].get('eviction', 'default')} | {statistics.median(over):g} "
                f"({', '.join(str(n) for n in over)}) | {statistics.median(p99):.0f} "
                f"({', '.join(f'{v:.0f}' for v in p99)}) | {got / best if best else 0:.1%} | "
                f"{', '.join(follow) or '-'} |"
            )
    return "\n".join(lines)


SLO_TARGET = 0.99  # goodput: the share of requests that must meet the SLO
PEER_PREFIX = "peer_"  # the re-implemented peers' methods: the best of them is the goal's other yardstick


def goodput(results: list[dict], method: str, seed: int, slo: str = GOAL) -> float | None:
    """The highest load of `method`'s runs of `seed` whose attainment of `slo` (GOAL or STAND_IN) is
    >= SLO_TARGET and whose lower loads all met it too (a ladder, not a lucky rung); 0 when the
    lowest misses it; None without runs, or when a run predates the stand-in SLO."""
    runs = sorted((r["load"], r["all"].get(slo)) for r in results if (r["method"], r["seed"]) == (method, seed))
    if not runs or any(attained is None for _, attained in runs):
        return None
    best = 0.0
    for load, attained in runs:
        if attained < SLO_TARGET:
            break
        best = load
    return best


def best_peer(results: list[dict], seed: int, slo: str = GOAL) -> tuple[str, float] | None:
    """(method, goodput in loads) of the peer (`peer_*`) with the highest goodput of `seed` under
    `slo`, or None without peer runs."""
    peers = [(m, goodput(results, m, seed, slo)) for m in dict.fromkeys(r["method"] for r in results)]
    ranked = [(m, g) for m, g in peers if m.startswith(PEER_PREFIX) and g is not None]
    return max(ranked, key=lambda p: p[1]) if ranked else None


def goodput_bounds(results: list[dict], method: str, seed: int, slo: str = GOAL) -> tuple[float, float] | None:
    """What `method`'s goodput of `seed` under `slo` is known to lie in, in loads, both ends closed:
    (g, g) when the ladder brackets it; (0, lowest rung) when even the lowest rung missed (it is
    below it); (top rung, inf) when the top rung met it (it is at least that); None without runs."""
    g = goodput(results, method, seed, slo)
    if g is None:
        return None
    mine = sorted(r["load"] for r in results if (r["method"], r["seed"]) == (method, seed))
    if g == 0:
        return 0.0, mine[0]
    return (g, math.inf) if g == mine[-1] else (g, g)


def ratio_cell(num: tuple[float, float] | None, den: tuple[float, float] | None) -> str:
    """The ratio of two goodputs given as `goodput_bounds`: `x.xx` when both are bracketed, `>= x`
    or `<= x` when one end is open, `a-b` for a range, `?` when nothing is known, `-` without runs."""
    if num is None or den is None:
        return "-"
    lo = num[0] / den[1] if den[1] > 0 else math.inf
    hi = num[1] / den[0] if den[0] > 0 else math.inf
    if lo == hi:
        return f"{lo:.2f}"
    if hi == math.inf:
        return f">= {lo:.2f}" if lo > 0 else "?"
    return f"<= {hi:.2f}" if lo == 0 else f"{lo:.2f}-{hi:.2f}"


def goodput_report(results: list[dict], capacity: float) -> str:
    """Per method and SLO (the goal's, then the stand-in's): goodput (req/s) per seed, written
    `< x` when the ladder's lowest rung missed and `>= x` when its top rung met it (not bracketed);
    its ratio to round robin's and to the best peer's of the same seed, per seed (bounds where a
    goodput is not bracketed, see `ratio_cell`); and the attainment at each load of the ladder
    (median over seeds)."""
    plain = [r for r in results if not r.get("variant")]
    loads = sorted({r["load"] for r in plain})
    seeds = sorted({r["seed"] for r in plain})
    lines = [
        "| method | SLO | goodput req/s per seed | / round_robin per seed | / best peer per seed (which) | "
        + " | ".join(f"attained at {x:g}" for x in loads)
        + " | seeds |",
        "|---|---|---|---|---|" + "---|" * len(loads) + "---|",
    ]

    def rate(bounds: tuple[float, float] | None) -> str:
        if bounds is None:
            return "-"
        lo, hi = bounds
        if lo == 0:
            return f"< {hi * capacity:.1f}"
        return f"{'>= ' if hi == math.inf else ''}{lo * capacity:.1f}"

    for slo in (GOAL, STAND_IN):
        for method in dict.fromkeys(r["method"] for r in plain):
            own = {s: goodput_bounds(plain, method, s, slo) for s in seeds}
            to_rr, to_peer = [], []
            for s in seeds:
                to_rr.append(ratio_cell(own[s], goodput_bounds(plain, "round_robin", s, slo)))
                peer = best_peer(plain, s, slo)
                if peer and not method.startswith(PEER_PREFIX):
                    to_peer.append(f"{ratio_cell(own[s], goodput_bounds(plain, peer[0], s, slo))} ({peer[0]})")
            attained = []
            for x in loads:
                values = [r["all"].get(slo) for r in plain if (r["method"], r["load"]) == (method, x)]
                values = [v for v in values if v is not None]
                attained.append(f"{statistics.median(values):.1%}" if values else "-")
            lines.append(
                f"| {method} | {SLO_NAMES[slo]} | {', '.join(rate(own[s]) for s in seeds)} | "
                f"{', '.join(to_rr) if method != 'round_robin' else '-'} | {', '.join(to_peer) or '-'} | "
                + " | ".join(attained)
                + f" | {len(seeds)} |"
            )
    return "\n".join(lines)


def report(results: list[dict]) -> str:
    """Medians over seeds of each method's ratios to round robin's (same seed and load)."""
    lines = [
        "| load | method | queued p99 / round_robin | TTFT p99 / round_robin | throughput / round_robin | "
        "SLO attainment (goal, stand-in) | shed | waiting at ranks, held (means) | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for load in sorted({r["load"] for r in results}):
        for method in dict.fromkeys(r["method"] for r in results):
            ratios: dict[str, list[float]] = {k: [] for k in ("q", "t", "x", "slo", "cold", "shed", "w", "h")}
            for r in results:
                if r["load"] != load or r["method"] != method or r.get("variant"):
                    continue
                rr = next(
                    (b for b in results if (b["load"], b["seed"], b["method"]) == (load, r["seed"], "round_robin")),
                    None,
                )
                if rr is None:
                    continue
                a, b = r["all"], rr["all"]
                ratios["q"].append(a["queued_p99_ms"] / b["queued_p99_ms"] if b["queued_p99_ms"] > 0 else math.nan)
                ratios["t"].append(a["ttft_p99_ms"] / b["ttft_p99_ms"])
                ratios["x"].append(a["throughput_tok_s"] / b["throughput_tok_s"])
                ratios["slo"].append(a[GOAL])
                ratios["cold"].append(a.get(STAND_IN, math.nan))
                ratios["shed"].append(a["shed"])
                ratios["w"].append(r.get("queues", {}).get("rank_waiting_mean", math.nan))
                ratios["h"].append(r.get("queues", {}).get("held_mean", math.nan))
            if ratios["t"]:
                med = {k: statistics.median(v) for k, v in ratios.items()}
                spread = f"{min(ratios['q']):.2f}-{max(ratios['q']):.2f}"
                lines.append(
                    f"| {load:g} | {method} | {med['q']:.2f} ({spread}) | {med['t']:.2f} | {med['x']:.2f} | "
                    f"{med['slo']:.1%}, {med['cold']:.1%} | {med['shed']:.0f} | {med['w']:.1f}, {med['h']:.1f} | "
                    f"{len(ratios['t'])} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
