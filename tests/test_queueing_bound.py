"""The burst lower bound of queueing (bench/queueing_bound.py) against brute force over every
finishing order, and against cases worked by hand."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from bench.queueing_bound import Arrival, groups, must_queue, p99_bound, slot_bound
from pdlb.engines.torch.runners import CostModel

COST = CostModel(base_s=0.04, per_prefill_token_s=0.0002, per_decode_seq_s=0.0, per_kv_token_s=0.0)


def floor(tokens: int) -> float:
    return COST.base_s + COST.per_prefill_token_s * tokens


def brute_force(group: list[Arrival], threshold: float, ranks: int) -> int:
    """The fewest requests at or over the threshold over every assignment of finishing positions."""
    tokens = sorted(r.tokens for r in group)
    earliest = [COST.base_s + COST.per_prefill_token_s * sum(tokens[: m + 1]) / ranks for m in range(len(group))]
    first = group[0].at_s
    return min(
        sum(1 for r, pos in zip(group, order, strict=True) if earliest[pos] - (r.at_s - first) - r.floor_s >= threshold)
        for order in itertools.permutations(range(len(group)))
    )


def test_one_rank_equal_prompts_queue_behind_each_other() -> None:
    # one rank, four 1,000-token prompts at once: the m-th finishes >= 40 + 200 m ms, so it queues
    # >= 200 (m - 1) ms over its 240 ms floor
    group = [Arrival(0.0, 1000, floor(1000))] * 4
    assert must_queue(group, 0.5999, 1, COST) == 1
    assert must_queue(group, 0.3999, 1, COST) == 2
    assert must_queue(group, 0.1999, 1, COST) == 3
    assert must_queue(group, 0.0001, 1, COST) == 3  # the first may start at once


def test_no_more_requests_than_ranks_forces_nothing() -> None:
    group = [Arrival(0.0, n, floor(n)) for n in (10, 500, 2000, 700)]
    assert must_queue(group, 1e-9, 4, COST) == 0


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_on_random_groups(seed: int) -> None:
    rng = random.Random(seed)
    ranks = rng.choice([1, 2, 3])
    group = []
    for _ in range(rng.randint(1, 6)):
        n = rng.randint(1, 2500)
        group.append(Arrival(rng.choice([0.0, 0.001, 0.003]), n, floor(max(1, n - rng.choice([0, n // 2])))))
    group.sort(key=lambda r: r.at_s)
    for threshold in (1e-9, 0.05, 0.2, 0.6):
        assert must_queue(group, threshold, ranks, COST) == brute_force(group, threshold, ranks)


def test_groups_cut_on_the_window_from_each_groups_first_arrival() -> None:
    requests = [Arrival(t, 1, 0.0) for t in (0.0, 0.004, 0.006, 0.02, 0.021)]
    assert [len(g) for g in groups(requests, 0.005)] == [2, 1, 2]
    assert [len(g) for g in groups(requests, 0.0)] == [1] * 5


def test_p99_bound_counts_from_the_top_as_the_nearest_rank_percentile() -> None:
    # 100 isolated requests and one group of 3 on one rank: the group's last two queue >= 200 and
    # >= 400 ms; nearest-rank p99 of 103 values is the 102nd smallest, so 2 from the top count
    requests = [Arrival(float(i), 100, floor(100)) for i in range(100)]
    requests += [Arrival(500.0, 1000, floor(1000))] * 3
    assert p99_bound(requests, 1, COST) == pytest.approx(0.2, abs=1e-6)
    assert p99_bound(requests[:100], 1, COST) == 0.0


def best_kth_wait(requests: list[Arrival], slots: int, decode_step_s: float, k: int) -> float:
    """The smallest k-th largest wait for a slot over every start order, each request holding a slot
    for exactly its shortest service (floor + decode steps): list schedules over all permutations,
    each request taking the slot that frees first (they include an optimal schedule for a
    non-decreasing objective of the start times on identical slots)."""
    best = float("inf")
    for order in itertools.permutations(range(len(requests))):
        free = [0.0] * slots
        waits = []
        for i in order:
            r = requests[i]
            slot = min(range(slots), key=lambda s: free[s])
            start = max(r.at_s, free[slot])
            free[slot] = start + r.floor_s + (r.output_tokens - 1) * decode_step_s
            waits.append(start - r.at_s)
        best = min(best, sorted(waits, reverse=True)[k - 1])
    return best


def test_slot_bound_one_slot_two_requests_worked_by_hand() -> None:
    # one slot; two requests at once, each 100 ms floor + 10 decode steps of 50 ms: whichever goes
    # second waits 600 ms; nearest-rank p99 of 2 values is the larger
    pair = [Arrival(0.0, 100, 0.1, 11)] * 2
    assert slot_bound(pair, 1, 0.05) == pytest.approx(0.6)
    assert slot_bound(pair, 2, 0.05) == 0.0  # a slot each


@pytest.mark.parametrize("seed", range(40))
def test_slot_bound_never_exceeds_the_best_schedule(seed: int) -> None:
    rng = random.Random(1000 + seed)
    slots = rng.choice([1, 2, 3])
    requests = [
        Arrival(rng.choice([0.0, 0.0, 0.1, 0.3, 0.35]), 1, rng.uniform(0.05, 0.3), rng.randint(1, 12))
        for _ in range(rng.randint(1, 6))
    ]
    k = len(requests) - math.ceil(0.99 * len(requests)) + 1
    bound = slot_bound(requests, slots, 0.04)
    assert bound <= best_kth_wait(requests, slots, 0.04, k) + 1e-9


def test_slot_bound_is_reached_when_bursts_fill_the_slots() -> None:
    # 2 slots; a burst of 2 requests holding a slot 1 s each, then another such burst 0.5 s later:
    # one of the bursts waits 0.5 s whatever the order, and the bound finds it
    first, second = [Arrival(0.0, 1, 0.2, 17)] * 2, [Arrival(0.5, 1, 0.2, 17)] * 2
    assert slot_bound(first + second, 2, 0.05) == pytest.approx(0.5)
    assert best_kth_wait(first + second, 2, 0.05, 1) == pytest.approx(0.5)
    # not tight where holding a slot idle for a later, shorter request pays: the bound stays below
    mixed = [Arrival(0.0, 1, 0.2, 17)] * 2 + [Arrival(0.1, 1, 0.2, 2)] * 2
    assert slot_bound(mixed, 2, 0.05) == pytest.approx(0.25)
    assert best_kth_wait(mixed, 2, 0.05, 1) == pytest.approx(0.35)
