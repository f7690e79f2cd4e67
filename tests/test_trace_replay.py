"""The trace replay's goodput: the highest load of a ladder at which >= 99% of requests met their
TTFT SLO, every lower rung meeting it too; ratios to round robin and the best peer of the same
seed, under the goal's SLO and the stand-in's (from the cold floor). The floors and SLOs from the
cost model. The requests that meet the SLO only with their cached prefix. The breakdown of the
worst queueing. The tenant flood's report, and the method options that set dispatcher flags."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from bench.balance_bench import method_flags, ttft_floor
from bench.trace_replay import (
    GOAL,
    STAND_IN,
    best_peer,
    breakdown,
    breakdown_report,
    cache_critical,
    eviction_losses,
    flood_report,
    followed,
    goodput,
    goodput_bounds,
    goodput_report,
    ratio_cell,
    scale,
    slo_limit,
    stand_in_misses,
)
from pdlb.engines.torch.runners import CostModel
from pdlb.workload import WorkItem


def rows(
    method: str, seed: int, attainment: list[float], loads=(0.2, 0.4, 0.6), stand_in: list[float] | None = None
) -> list[dict]:
    """Runs of a ladder: the goal's SLO attained as `attainment`, the stand-in's as `stand_in`
    (absent, as in runs that predate it, when None)."""
    return [
        {"method": method, "seed": seed, "load": x, "all": {GOAL: a, **({STAND_IN: c} if stand_in else {})}}
        for x, a, c in zip(loads, attainment, stand_in or attainment, strict=True)
    ]


def test_goodput_is_the_top_of_the_ladder_met_from_the_bottom():
    runs = rows("a", 1, [1.0, 0.995, 0.98]) + rows("b", 1, [0.98, 1.0, 1.0]) + rows("c", 1, [1.0, 1.0, 0.99])
    assert goodput(runs, "a", 1) == 0.4
    assert goodput(runs, "b", 1) == 0.0, "a lucky upper rung does not count when a lower one missed"
    assert goodput(runs, "c", 1) == 0.6
    assert goodput(runs, "a", 2) is None


def test_goodput_report_gives_rates_and_ratios_to_round_robin_per_seed():
    runs = (
        rows("round_robin", 1, [1.0, 0.98, 0.9])
        + rows("round_robin", 2, [1.0, 1.0, 0.9])
        + rows("fast", 1, [1.0, 1.0, 0.995])
        + rows("fast", 2, [1.0, 1.0, 0.95])
    )
    table = goodput_report(runs, capacity=10.0).splitlines()
    fast = next(line for line in table if line.startswith("| fast | goal"))
    # seed 1: 0.6 met at the top rung over round robin's 0.2; seed 2: 0.4 over 0.4
    assert "| >= 6.0, 4.0 | >= 3.00, 1.00 | - |" in fast, fast
    stand_in = next(line for line in table if line.startswith("| fast | stand-in"))
    assert "| -, - |" in stand_in, "runs without the stand-in's attainment have no goodput under it"


def test_goodput_under_the_stand_in_slo_compares_with_round_robin_and_the_best_peer():
    """Under the goal's SLO nobody reaches 99% (every goodput is below the ladder); under the
    stand-in the method's goodput is 0.6, round robin's 0.2 and the better peer's 0.4."""
    low = [0.95, 0.95, 0.95]
    runs = (
        rows("round_robin", 1, low, stand_in=[0.995, 0.98, 0.9])
        + rows("peer_a", 1, low, stand_in=[0.999, 0.991, 0.97])
        + rows("peer_b", 1, low, stand_in=[0.98, 1.0, 1.0])
        + rows("fast", 1, low, stand_in=[1.0, 0.999, 0.99])
    )
    assert goodput(runs, "fast", 1, STAND_IN) == 0.6 and goodput(runs, "fast", 1) == 0.0
    assert best_peer(runs, 1, STAND_IN) == ("peer_a", 0.4)
    assert goodput_bounds(runs, "fast", 1, STAND_IN) == (0.6, math.inf), "the top rung met: at least 0.6"
    assert goodput_bounds(runs, "fast", 1) == (0.0, 0.2), "the lowest rung missed: below 0.2"
    table = goodput_report(runs, capacity=10.0).splitlines()
    goal = next(line for line in table if line.startswith("| fast | goal"))
    assert "| < 2.0 | ? | ? (peer_a) | 95.0% | 95.0% | 95.0% |" in goal, goal
    stand_in = next(line for line in table if line.startswith("| fast | stand-in"))
    assert "| >= 6.0 | >= 3.00 | >= 1.50 (peer_a) | 100.0% | 99.9% | 99.0% |" in stand_in, stand_in
    peer = next(line for line in table if line.startswith("| peer_a | stand-in"))
    assert "| 4.0 | 2.00 | - |" in peer, "a peer is not compared with the best peer"


def test_ratio_cell_bounds_a_ratio_of_goodputs_the_ladder_does_not_bracket():
    assert ratio_cell((0.6, 0.6), (0.2, 0.2)) == "3.00"
    assert ratio_cell((0.6, 0.6), (0.0, 0.2)) == ">= 3.00", "over a goodput below the ladder: a lower bound"
    assert ratio_cell((0.4, 0.4), (0.85, math.inf)) == "<= 0.47", "over one above the ladder: an upper bound"
    assert ratio_cell((0.85, math.inf), (0.4, math.inf)) == "?"
    assert ratio_cell((0.0, 0.2), (0.0, 0.2)) == "?"
    assert ratio_cell((0.0, 0.2), (0.4, 0.4)) == "<= 0.50"
    assert ratio_cell(None, (0.4, 0.4)) == "-"


def test_floors_and_slos_follow_the_cost_model(tmp_path):
    """A 2,048-token prompt, then one that repeats it and adds 512 tokens. With the cost model x 10
    (40 ms a step, 0.2 ms a prefill token, 2 us an attended token) and 1,024-token chunks, the first
    prefills in two chunks cold (its floor is its cold floor: nothing cached before it); the second
    in one 512-token chunk over 2,048 cached tokens, or in three chunks cold. Its goal SLO (3 x that
    one chunk + 200 ms) is under its cold floor, so it needs its prefix; the stand-in SLO (3 x the
    cold floor + 200 ms) it meets alone cold, as does every request."""
    rows = [
        {"timestamp": 0, "input_length": 2048, "output_length": 4, "hash_ids": [0, 1, 2, 3]},
        {"timestamp": 100, "input_length": 2560, "output_length": 4, "hash_ids": [0, 1, 2, 3, 4]},
    ]
    args = _trace_args(tmp_path, rows)
    cost = CostModel().scaled(10)
    first, second = scale(args, 1.0, cost, seed=0)

    def chunk(new: int, end: int) -> float:  # one prefill step of `new` tokens ending at position `end`
        return 0.04 + new * 0.0002 + end * 0.000002

    assert first.floor == pytest.approx(chunk(1024, 1024) + chunk(1024, 2048))
    assert first.cold_floor == pytest.approx(first.floor) and first.cached == 0
    assert second.cached == 2048 and second.floor == pytest.approx(chunk(512, 2560))
    assert second.cold_floor == pytest.approx(chunk(1024, 1024) + chunk(1024, 2048) + chunk(512, 2560))
    assert slo_limit(second.floor) == pytest.approx(3 * chunk(512, 2560) + 0.2)
    assert slo_limit(second.floor) < second.cold_floor < slo_limit(second.cold_floor)
    assert cache_critical(args, cost) == (1, 2)
    assert stand_in_misses(args, cost) == (0, 2)


def _trace_args(tmp_path, trace_rows: list[dict]) -> argparse.Namespace:
    """The replay's arguments for a trace file of `trace_rows`, unscaled, every request in the window."""
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in trace_rows))
    return argparse.Namespace(
        trace=str(path), offset=0, num_requests=len(trace_rows), length_divisor=1, max_input=8192, capacity=1.0,
        high_share=1.0, flood_tenant=0.0,
    )  # fmt: skip


def test_cache_critical_counts_requests_that_need_their_cached_prefix(tmp_path):
    """A long prompt that repeats an earlier 4,096-token prefix has a floor of one short chunk; cold,
    its 5 chunks take longer than 3 x that floor + 200 ms, so only a cache hit meets its SLO. The
    first request (nothing cached) and a short unrelated one meet it cold."""
    rows = [
        {"timestamp": 0, "input_length": 4096, "output_length": 4, "hash_ids": list(range(8))},
        {"timestamp": 100, "input_length": 4608, "output_length": 4, "hash_ids": [*range(8), 8]},
        {"timestamp": 200, "input_length": 300, "output_length": 4, "hash_ids": [9]},
    ]
    args = _trace_args(tmp_path, rows)
    assert cache_critical(args, CostModel().scaled(10)) == (1, 3)


def test_breakdown_splits_the_worst_queueing_into_cache_shortfall_and_the_rest():
    """Three requests on two ranks. Request 2 is the worst: it got none of the 1,024 cached tokens
    its floor assumes, and request 1 was in prefill on its rank when it was sent, while rank 1 had
    no prompt in prefill. Its cache shortfall is what the cold prompt costs alone over its floor."""
    cost = CostModel().scaled(10)
    warm = ttft_floor(WorkItem(0, 0.0, [0] * 1100, 1), 1024, cost)
    cold = ttft_floor(WorkItem(0, 0.0, [0] * 1100, 1), 0, cost)
    row = {
        "requests": [
            # (index, sent s, TTFT s, floor s, rank, cached, prompt tokens, best cached)
            (0, 0.0, 0.2, 0.15, 1, 0, 500, 0),
            (1, 1.0, 0.5, 0.15, 0, 0, 500, 0),
            (2, 1.1, cold + 0.3, warm, 0, 0, 1100, 1024),
        ]
    }
    (worst,) = breakdown(row, cost, worst=0.01)
    assert worst["index"] == 2
    assert worst["cold_ms"] == pytest.approx((cold - warm) * 1000)
    assert worst["rest_ms"] == pytest.approx(300)
    assert worst["ahead"] == 1 and worst["joined"] == 0 and worst["idle_ranks"] == 1
    table = breakdown_report([{"load": 0.6, "method": "m", **row}], cost).splitlines()
    assert table[-1].startswith("| 0.6 | m | 1 |") and "| 100% | 100% | 100% | 1100 |" in table[-1]


def _evicting(args: argparse.Namespace, ranks: int, kv_tokens: int) -> argparse.Namespace:
    return argparse.Namespace(**vars(args), ranks=ranks, kv_tokens=kv_tokens, page_size=16)


def test_eviction_losses_count_the_prefixes_the_ranks_caches_no_longer_hold(tmp_path):
    """Request 2 repeats request 0's 2,048-token prefix. With room for 3,072 tokens, request 1's
    2,048 unrelated tokens evict the least recently used leaves: the last 1,024 tokens of request
    0's prompt (the real cache evicts leaves only, so its first half stays), and request 2 prefills
    the rest: it loses that over its floor. With room for all it loses nothing, and neither do
    requests with nothing cached to lose. On a rank other than request 0's it loses everything."""
    rows = [
        {"timestamp": 0, "input_length": 2048, "output_length": 4, "hash_ids": [0, 1, 2, 3]},
        {"timestamp": 100, "input_length": 2048, "output_length": 4, "hash_ids": [4, 5, 6, 7]},
        {"timestamp": 200, "input_length": 2560, "output_length": 4, "hash_ids": [0, 1, 2, 3, 8]},
    ]
    args = _trace_args(tmp_path, rows)
    cost = CostModel().scaled(10)
    cold = ttft_floor(WorkItem(2, 0.0, [0] * 2560, 1), 0, cost)
    half = ttft_floor(WorkItem(2, 0.0, [0] * 2560, 1), 1024, cost)
    warm = ttft_floor(WorkItem(2, 0.0, [0] * 2560, 1), 2048, cost)
    assert eviction_losses(_evicting(args, 1, 3072), cost, "lru") == pytest.approx([0.0, 0.0, half - warm])
    assert eviction_losses(_evicting(args, 1, 8192), cost, "lru") == [0.0, 0.0, 0.0]
    roomy = _evicting(args, 2, 8192)
    assert eviction_losses(roomy, cost, "lru", "round_robin") == pytest.approx([0.0, 0.0, 0.0])  # 0 and 2: rank 0
    moved = [(0, 0), (1, 0), (2, 1)]  # a real run's placement: request 2 went to the other rank
    assert eviction_losses(roomy, cost, "lru", recorded=moved) == pytest.approx([0.0, 0.0, cold - warm])


def test_slru_keeps_a_reused_prefix_that_lru_evicts_in_the_replay(tmp_path):
    """Request 1 continues request 0 (a hit: request 0's 1,024 tokens are protected under slru);
    request 2 is a newer one-off; request 3's 1,536 tokens need 1,024 more of a 3,072-token cache;
    request 4 continues request 0 again. LRU evicts request 1's tail and then request 0's last 512
    tokens (the least recently used); slru evicts what was seen once, request 1's tail and request
    2's last 512 tokens, and request 4 finds request 0's whole prefix."""
    rows = [
        {"timestamp": 0, "input_length": 1024, "output_length": 4, "hash_ids": [0, 1]},
        {"timestamp": 100, "input_length": 1536, "output_length": 4, "hash_ids": [0, 1, 2]},
        {"timestamp": 200, "input_length": 1024, "output_length": 4, "hash_ids": [3, 4]},
        {"timestamp": 300, "input_length": 1536, "output_length": 4, "hash_ids": [5, 6, 7]},
        {"timestamp": 400, "input_length": 1536, "output_length": 4, "hash_ids": [0, 1, 9]},
    ]
    args = _evicting(_trace_args(tmp_path, rows), 1, 3072)
    cost = CostModel().scaled(10)
    half = ttft_floor(WorkItem(4, 0.0, [0] * 1536, 1), 512, cost)
    warm = ttft_floor(WorkItem(4, 0.0, [0] * 1536, 1), 1024, cost)
    assert eviction_losses(args, cost, "lru") == pytest.approx([0.0, 0.0, 0.0, 0.0, half - warm])
    assert eviction_losses(args, cost, "slru") == [0.0] * 5


def test_followed_counts_continued_turns_sent_to_their_prefixs_rank(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 1024, "output_length": 4, "hash_ids": [0, 1]},
        {"timestamp": 100, "input_length": 1024, "output_length": 4, "hash_ids": [0, 2]},
        {"timestamp": 200, "input_length": 1536, "output_length": 4, "hash_ids": [0, 1, 3]},
        {"timestamp": 300, "input_length": 1536, "output_length": 4, "hash_ids": [0, 2, 4]},
    ]
    args = _evicting(_trace_args(tmp_path, rows), 2, 8192)
    items = scale(args, 1.0, CostModel().scaled(10), seed=0)
    # (index, sent, TTFT, floor, rank, cached, prompt, best cached): 2 follows 0 to rank 0, 3 leaves 1's rank
    run = {"requests": [(0, 0, 0, 0, 0, 0, 1024, 0), (1, 1, 0, 0, 1, 0, 1024, 512), (2, 2, 0, 0, 0, 0, 1536, 1024),
                        (3, 3, 0, 0, 0, 0, 1536, 1024)]}  # fmt: skip
    assert followed(run, items, page=16, system=32) == (2, 1)  # request 1 shares only the 512-token system block


def test_method_switches_turn_boolean_dispatcher_flags_on_and_off():
    assert method_flags("least_wait+flow:lend=0")[-1] == "--no-work-conserving"
    assert method_flags("least_wait+flow:lend=1:headroom=2")[-3:] == ["--work-conserving", "--lend-headroom", "2"]
    with pytest.raises(SystemExit, match="lend"):
        method_flags("least_wait+flow:lend=yes")


def test_flood_report_gives_steady_ratios_and_the_requests_served_under_the_flood():
    def run(method: str, seed: int, variant: str, steady_ms: float, served: float) -> dict:
        tenant = {"ttft_p99_ms": steady_ms, "shed": 0}
        return {
            "method": method, "seed": seed, "load": 1.5, "variant": variant, "all": {"requests_per_s": served},
            "tenant_steady": tenant, "tenant_flood": {"ttft_p99_ms": 2 * steady_ms, "shed": 0},
        }  # fmt: skip

    runs = [run("lent", s, "fair", 500, 4) for s in (1, 2, 3)]
    runs += [run("lent", 1, "flood", 600, 20.0), run("lent", 2, "flood", 700, 21.0), run("lent", 3, "flood", 550, 20.5)]
    line = next(x for x in flood_report(runs).splitlines() if x.startswith("| 1.5 | lent "))
    assert "| 1.20 (1.10-1.40) |" in line and "| 20.5 (20.0-21.0) | 3 |" in line, line
