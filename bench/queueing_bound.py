"""The queueing p99 no dispatcher can beat on a workload: a lower bound from requests that arrive
together and must share the ranks' prefill throughput.

Queueing is a request's TTFT less its floor (its TTFT alone on an idle rank with the best cache it
could have), as in `bench.balance_suite` and `bench.trace_replay`. The floor alone says nothing about
requests that arrive at the same instant: 32 prompts sent at once to 8 ranks cannot all start on an
idle rank. For such a group (arrivals within `--window` of its first, at time a) on R sim ranks:

- every step costs at least the cost model's base plus its per-prefill-token cost times the prompt
  tokens it computes (`CostModel.step_time`: its other terms are >= 0);
- so the m-th request of the group to get its first token gets it no earlier than
  a + base + per_token x S_m / R, where S_m is the sum of the m smallest counts of prompt tokens the
  group's requests must compute (their prompts less the best cache each could have): by then m prompts
  are done, some rank computed at least S_m / R of those tokens, in at least one step;
- which request finishes m-th is the dispatcher's (and the engines') choice. For a threshold X, the
  bound takes the choice that leaves the fewest requests with queueing >= X (a maximum matching of
  requests to finishing positions, exact: a request is below X only in a prefix of the positions, and
  prefixes nest, so taking requests by their prefix's length, each on the first free position,
  is optimal);
- summed over the groups, if at least k requests must queue >= X, where k is what the nearest-rank
  p99 counts from the top (`pdlb.workload.percentile`: 7 of 600, 3 of 200), then every method's
  queueing p99 on these requests and ranks is >= X. The largest such X is printed.

Everything that bound leaves out only adds queueing: ranks busy with earlier groups' prefills and
decodes, batch slots, KV, the chunk limit, the report lag. Groups are taken alone, so it does not
depend on the load; Poisson arrivals give it little to work with (groups of one), bursts a lot.

A second bound counts batch slots (`slot_bound`): the ranks run at most `ranks x max_running`
requests at once, and a request holds its slot from its start until its last token, at least its
floor plus one decode step (the cost model's base plus one sequence) per further output token. So a
request is unfinished from its arrival a until at least a + floor + (output - 1) x decode step,
whatever any method does; at a time t when more requests are unfinished than there are slots, the
excess have not started, and those of them that arrived before t - X have queued more than X (the
floor counts from the start). Bursts that follow each other within a request's decode time fill the
slots; the largest X for which enough requests (the p99's count from the top) must wait is printed
beside the first bound, and the larger of the two is the bound.

  python -m bench.queueing_bound                      # the workload set's seeds 1-3, and the trace
  python -m bench.queueing_bound --workloads bursts_32 --seeds 1 --num-requests 600
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench import balance_bench, balance_suite, mooncake_trace, trace_replay
from pdlb.engines.torch.runners import CostModel
from pdlb.workload import generate

TRACE = "trace"


@dataclass(frozen=True)
class Arrival:
    """One request as the bound sees it: arrival (s), prompt tokens it must compute (under the best
    cache it could have) and its floor (s)."""

    at_s: float
    tokens: int
    floor_s: float
    output_tokens: int = 1  # tokens it generates (its first comes with its floor)


def groups(requests: Sequence[Arrival], window_s: float) -> list[list[Arrival]]:
    """Requests in arrival order cut into groups: a group holds the requests arriving within
    `window_s` seconds of its first."""
    out: list[list[Arrival]] = []
    for r in sorted(requests, key=lambda r: r.at_s):
        if out and r.at_s - out[-1][0].at_s <= window_s:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def must_queue(group: Sequence[Arrival], threshold_s: float, ranks: int, cost: CostModel) -> int:
    """The fewest requests of `group` whose queueing (TTFT - floor, seconds) reaches `threshold_s`
    under any placement and order on `ranks` idle ranks (module doc). A request arriving after the
    group's first gains the difference: its own clock starts later."""
    first = group[0].at_s
    tokens = sorted(r.tokens for r in group)
    # earliest time (from the group's first arrival) the m-th first token can come, m = 1..len
    earliest, total = [], 0
    for n in tokens:
        total += n
        earliest.append(cost.base_s + cost.per_prefill_token_s * total / ranks)
    # positions where a request stays below the threshold: those with earliest < its floor + X +
    # its lateness, a prefix of the (ascending) positions; count each prefix's length
    prefixes = sorted(sum(1 for e in earliest if e - (r.at_s - first) - r.floor_s < threshold_s) for r in group)
    below = 0
    for p in prefixes:  # nested prefixes: the shortest first, each on the first free position
        if below < p:
            below += 1
    return len(group) - below


def p99_bound(requests: Sequence[Arrival], ranks: int, cost: CostModel, window_s: float = 0.0) -> float:
    """The largest X (seconds) such that at least as many requests as the nearest-rank p99 counts
    from the top must queue >= X (module doc): a lower bound of any method's queueing p99. 0.0 when
    the groups force nothing."""
    if not requests:
        return 0.0
    need = len(requests) - math.ceil(0.99 * len(requests)) + 1
    cut = groups(requests, window_s)
    hi = max(cost.base_s + cost.per_prefill_token_s * sum(r.tokens for r in g) / ranks for g in cut)
    if sum(must_queue(g, 1e-9, ranks, cost) for g in cut) < need:
        return 0.0
    lo = 0.0
    for _ in range(50):  # bisection: the count only falls as X grows
        mid = (lo + hi) / 2
        if sum(must_queue(g, mid, ranks, cost) for g in cut) >= need:
            lo = mid
        else:
            hi = mid
    return lo


def slot_bound(requests: Sequence[Arrival], slots: int, decode_step_s: float) -> float:
    """The largest X (seconds) such that, at some time t, at least as many requests as the
    nearest-rank p99 counts from the top have not started by t although they arrived by t - X, because
    more requests than `slots` are unfinished at t (module doc): a lower bound of any method's
    queueing p99 on ranks with that many batch slots in all. 0.0 when the slots never run short.

    A request is unfinished over [at_s, at_s + floor_s + (output_tokens - 1) x decode_step_s). The
    bound is read at the right end of each interval over which the unfinished set is constant (just
    before an arrival or a forced finish), where it is largest: with U the unfinished requests there,
    q = |U| - slots - need, it is t less the arrival of the (q+1)-th latest of U."""
    if not requests:
        return 0.0
    need = len(requests) - math.ceil(0.99 * len(requests)) + 1
    spans = sorted((r.at_s, r.at_s + r.floor_s + (r.output_tokens - 1) * decode_step_s) for r in requests)
    best = 0.0
    for t in sorted({a for a, _ in spans} | {e for _, e in spans}):
        unfinished = [a for a, e in spans if a < t <= e]  # arrived before t, not finished before t
        q = len(unfinished) - slots - need
        if q >= 0:
            unfinished.sort(reverse=True)
            best = max(best, t - unfinished[q])
    return best


def suite_requests(workload: str, load: str, seed: int, num_requests: int, cost: CostModel) -> list[Arrival]:
    """The requests `bench.balance_suite` sends for one (workload, load, seed), with the floors it
    uses (a grouped request's shared prefix counted as cached)."""
    flags, capacities = balance_suite.WORKLOADS[workload]
    args = balance_bench.build_parser().parse_args(flags)
    rate = round(balance_suite.LOADS[load] * capacities[1], 1)
    arrival = args.arrivals.split(",")[0]
    items = generate(balance_bench.workload_spec(args, rate, arrival, seed, num_requests))
    out = []
    for item in items:
        cached = args.prefix_len if item.group >= 0 else 0
        tokens = len(item.input_ids) - min(cached, len(item.input_ids) - 1)
        out.append(Arrival(item.arrival_s, tokens, balance_bench.ttft_floor(item, cached, cost), item.max_new_tokens))
    return out


def trace_requests(rate: float, num_requests: int, cost: CostModel) -> list[Arrival]:
    """The trace window `bench.trace_replay` sends at `rate` requests/s, with its floors (the best
    cache each request could have)."""
    args = argparse.Namespace(
        trace=str(mooncake_trace.DEFAULT_TRACE), offset=0, num_requests=num_requests,
        length_divisor=16, max_input=2048, high_share=1.0, flood_tenant=0.0,
    )  # fmt: skip
    items = trace_replay.scale(args, rate, cost, seed=0)
    return [
        Arrival(
            t.item.arrival_s,
            len(t.item.input_ids) - min(t.cached, len(t.item.input_ids) - 1),
            t.floor,
            t.item.max_new_tokens,
        )
        for t in items
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join([*balance_suite.WORKLOADS, TRACE]))
    parser.add_argument("--loads", default=",".join(balance_suite.LOADS), help="the suite's load names")
    parser.add_argument("--seeds", default="1,2,3", help="the suite's workload seeds (the trace has one window)")
    parser.add_argument("--num-requests", type=int, default=600)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--slowdown", type=float, default=10.0, help="the sim cost model's multiplier")
    parser.add_argument(
        "--trace-capacity", type=float, default=23.0, help="requests/s: the trace's loads are shares of it"
    )
    parser.add_argument("--window", type=float, default=0.005, help="seconds: arrivals this close form a group")
    parser.add_argument("--max-running", type=int, default=8, help="batch slots of each rank (the benchmarks' default)")
    args = parser.parse_args(argv)
    cost = CostModel().scaled(args.slowdown)
    print(
        f"Queueing p99 no dispatcher can beat ({args.ranks} sim ranks, cost model x {args.slowdown:g}, "
        f"{args.num_requests} requests, arrivals within {args.window * 1000:g} ms grouped)\n"
    )
    slots, decode_step_s = args.ranks * args.max_running, cost.base_s + cost.per_decode_seq_s
    print("| workload | load | bound per seed, ms | from bursts | from batch slots | groups of more than the ranks |")
    print("|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        for load in args.loads.split(","):
            bounds, bursts, short, big = [], [], [], 0
            seeds = [0] if workload == TRACE else [int(s) for s in args.seeds.split(",")]
            for seed in seeds:
                if workload == TRACE:
                    requests = trace_requests(balance_suite.LOADS[load] * args.trace_capacity, args.num_requests, cost)
                else:
                    requests = suite_requests(workload, load, seed, args.num_requests, cost)
                bursts.append(p99_bound(requests, args.ranks, cost, args.window) * 1000)
                short.append(slot_bound(requests, slots, decode_step_s) * 1000)
                bounds.append(max(bursts[-1], short[-1]))
                big = max(big, sum(len(g) > args.ranks for g in groups(requests, args.window)))
            cells = [", ".join(f"{b:.0f}" for b in values) for values in (bounds, bursts, short)]
            print(f"| {workload} | {load} | {' | '.join(cells)} | {big} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
