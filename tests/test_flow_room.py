"""Which ranks flow control counts as having room, as pure logic over a load table: batch slots,
KV capacity (decode admission), the predicted-wait bound, and binding in queue order."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from pdlb.services.dispatcher.flow_control import FlowControl, FlowOptions, Shed
from pdlb.services.dispatcher.load_table import LoadTable, ReportedLoad, Role, Worker
from pdlb.services.dispatcher.policies import PolicyOptions, RouteContext, create_policy
from pdlb.services.dispatcher.router import Router


def cluster(role: Role, loads: list[ReportedLoad], method: str = "least_wait", **options) -> FlowControl:
    table = LoadTable()
    for rank, load in enumerate(loads):
        table.upsert(Worker(f"w{rank}", role, rank, f"h:{rank}"))
        table.apply_report(f"w{rank}", load, 0)
    router = Router(role, table, create_policy(method, role, PolicyOptions()))
    return FlowControl(router, FlowOptions(enabled=True, **options))


def ranks(flow: FlowControl, tokens: int) -> list[int] | None:
    roomy = flow.roomy(RouteContext("r", tokens))
    return None if roomy is None else [e.dp_rank for e in roomy]


def test_free_batch_slots_decide_room():
    full = ReportedLoad(running_requests=4, max_running_requests=4, kv_tokens_capacity=10_000)
    free = ReportedLoad(running_requests=3, max_running_requests=4, kv_tokens_capacity=10_000)
    flow = cluster(Role.MIXED, [full, free])
    assert ranks(flow, 100) == [1]
    flow.router.decide(RouteContext("a", 100))  # in flight to rank 1: its last slot is taken
    assert ranks(flow, 100) == []


def test_decode_admission_by_kv_capacity():
    used = ReportedLoad(kv_tokens_used=900, kv_tokens_capacity=1000, max_running_requests=64)
    roomy = ReportedLoad(kv_tokens_used=200, kv_tokens_capacity=1000, max_running_requests=64)
    evictable = ReportedLoad(
        kv_tokens_used=900, kv_tokens_evictable=800, kv_tokens_capacity=1000, max_running_requests=64
    )
    flow = cluster(Role.DECODE, [used, roomy, evictable])
    assert ranks(flow, 500) == [1, 2]  # the prefix cache's evictable blocks count as free
    assert ranks(flow, 850) == [2]
    assert ranks(flow, 950) == []
    assert ranks(flow, 1001) == [0, 1, 2]  # larger than any rank's KV: not held, the worker refuses it


def test_predicted_wait_bound_replaces_the_slot_check():
    # 10k prompt tokens queued at 10k tokens/s: about 1 s of prefill ahead on rank 0
    busy = ReportedLoad(
        running_requests=1,
        max_running_requests=8,
        prefill_pending_tokens=10_000,
        prefill_tokens_per_s=10_000,
        step_ms=20,
        prefill_tokens_per_step=1000,
    )
    idle = ReportedLoad(max_running_requests=8, prefill_tokens_per_s=10_000, step_ms=20, prefill_tokens_per_step=1000)
    assert ranks(cluster(Role.PREFILL, [busy, idle], max_wait_ms=500), 100) == [1]
    assert ranks(cluster(Role.PREFILL, [busy, idle], max_wait_ms=5000), 100) == [0, 1]


def test_prompt_work_ahead_of_one_prefill_chunk_leaves_no_room():
    # Both ranks have free batch slots; rank 0 still has 1,500 prompt tokens to prefill (chunk 1,024).
    backlog = ReportedLoad(running_requests=2, max_running_requests=8, prefill_pending_tokens=1500)
    light = ReportedLoad(running_requests=2, max_running_requests=8, prefill_pending_tokens=300)
    for load in (backlog, light):
        load.prefill_tokens_per_step = 1024
    flow = cluster(Role.MIXED, [backlog, light])
    assert ranks(flow, 100) == [1]
    flow.router.decide(RouteContext("a", 800), among=flow.roomy(RouteContext("a", 800)))  # rank 1: 1,100 ahead
    assert ranks(flow, 100) == []
    assert ranks(cluster(Role.MIXED, [backlog, light], max_prefill_ahead_chunks=2), 100) == [0, 1]
    assert ranks(cluster(Role.MIXED, [backlog, light], max_prefill_ahead_chunks=0), 100) == [0, 1]
    # Decode ranks are admitted by KV and slots only: prompt work is the prefill rank's.
    assert ranks(cluster(Role.DECODE, [backlog, light]), 100) == [0, 1]


def test_slot_reserve_is_kept_from_sheddable_requests_while_better_ones_arrive():
    now = [0.0]
    half = ReportedLoad(running_requests=2, max_running_requests=4, kv_tokens_capacity=10_000)
    flow = cluster(Role.MIXED, [half], reserved_slots=2, reserve_window_s=5.0)
    flow.clock = lambda: now[0]
    low = RouteContext("low", 100)
    assert [e.dp_rank for e in flow.roomy(low, sheddable=True)] == [0], "no better request seen: no reserve"
    asyncio.run(flow.decide(RouteContext("high", 100), priority=0))  # bound at once: 1 slot left
    assert flow.roomy(low, sheddable=True) == [], "the last free slot is within the reserve"
    assert [e.dp_rank for e in flow.roomy(RouteContext("high-2", 100))] == [0]
    now[0] = 5.1  # no better request for longer than the window: the reserve is released
    assert [e.dp_rank for e in flow.roomy(low, sheddable=True)] == [0]


def test_no_live_worker_is_not_a_reason_to_wait():
    assert ranks(cluster(Role.MIXED, []), 10) is None


async def test_binding_in_queue_order_as_room_frees_and_ttl():
    full = ReportedLoad(running_requests=1, max_running_requests=1)
    flow = cluster(Role.MIXED, [full], queue_ttl_s=30, sheddable_ttl_s=0.05)
    low = asyncio.create_task(flow.decide(RouteContext("low", 10), priority=2))
    high = asyncio.create_task(flow.decide(RouteContext("high", 10), priority=0))
    await asyncio.sleep(0)  # let both enter the queue
    assert len(flow.queue) == 2
    with pytest.raises(Shed) as shed:
        await low  # sheddable: gone after its 50 ms
    assert shed.value.reason == "ttl" and shed.value.retry_after_s >= 1
    table = flow.router.table
    table.apply_report("w0", ReportedLoad(max_running_requests=1), 0)  # the slot freed
    flow.kick()
    decision = await high
    assert decision.entry.dp_rank == 0 and len(flow.queue) == 0 and flow.admitted_total == 1
    assert flow.shed_total == 1


def test_a_rank_caching_the_prompt_has_room_for_that_much_more_work_ahead():
    # Both ranks have 1,500 prompt tokens ahead (chunk 1,024): no room for a cold prompt. Rank 1 was
    # sent the first 640 tokens of this prompt (the approximate index of a rank without block
    # events), so the request computes 640 fewer there: 1,500 < 1,024 + 640 leaves it room on rank 1.
    load = ReportedLoad(
        running_requests=1, max_running_requests=8, prefill_pending_tokens=1500, prefill_tokens_per_step=1024
    )
    flow = cluster(Role.MIXED, [load, replace(load)], "cache_aware")
    prompt = list(range(1000))
    flow.router.policy.on_dispatch(RouteContext("earlier", 640, input_ids=prompt[:640]), flow.router.table.for_rank(1))
    assert flow.router.policy.cached_by_rank(RouteContext("r", 1000, input_ids=prompt)) == {"w1": 640}
    assert [e.dp_rank for e in flow.roomy(RouteContext("r", 1000, input_ids=prompt))] == [1]
    assert flow.roomy(RouteContext("cold", 1000, input_ids=[7] * 1000)) == []
    # a decode rank admits by KV and slots: what it caches does not change that
    assert ranks(cluster(Role.DECODE, [load]), 100) == [0]


@pytest.mark.parametrize("seed", range(30))
def test_the_inlined_room_pass_agrees_with_fits_on_random_tables(seed):
    """roomy() checks the common case (no slot reserve, not decode, no wait bound) in one inlined
    pass for speed; `_fits` is the rule. They must agree on every rank, cache or not."""
    import random

    rng = random.Random(seed)
    loads = [
        ReportedLoad(
            running_requests=rng.randrange(10),
            waiting_requests=rng.randrange(3),
            max_running_requests=rng.choice([0, 4, 8]),
            kv_tokens_used=rng.randrange(12_000),
            kv_tokens_capacity=rng.choice([0, 12_000]),
            prefill_pending_tokens=rng.randrange(3000),
            prefill_tokens_per_step=rng.choice([0, 512, 1024]),
        )
        for _ in range(rng.randrange(1, 12))
    ]
    flow = cluster(Role.MIXED, loads, method="predicted_latency", max_prefill_ahead_chunks=rng.choice([0, 1, 2]))
    prompt = [rng.randrange(256) for _ in range(rng.randrange(1, 1500))]
    policy = flow.router.policy
    for n, entry in enumerate(flow.router.table.candidates()):  # some ranks cache part of the prompt
        if rng.random() < 0.4:
            head = prompt[: rng.randrange(1, len(prompt) + 1)]
            policy.index.insert(
                entry.worker.worker_id, RouteContext(f"c{n}", len(head), input_ids=head).blocks(policy.index)
            )
    ctx = RouteContext("r", len(prompt), input_ids=prompt)
    cached = flow.router.policy.cached_by_rank(ctx)
    tokens = len(prompt)
    expected = [
        e for e in flow.router.table.candidates() if flow._fits(e, tokens, 0, cached.get(e.worker.worker_id, 0))
    ]
    got = flow.roomy(ctx)
    if not expected and all(0 < e.reported.kv_tokens_capacity < tokens for e in flow.router.table.candidates()):
        expected = flow.router.table.candidates()
    assert [e.dp_rank for e in got] == [e.dp_rank for e in expected]


def test_the_same_ranks_with_room_are_the_same_list_and_predictions_follow_each_rank():
    """A decision over the ranks with room gets the same list object while the same ranks have
    room (a policy indexes a list once), and predicted_latency predicts each rank from its own row
    whichever subset it is given."""
    busy = ReportedLoad(running_requests=8, max_running_requests=8, kv_tokens_capacity=10_000,
                        prefill_tokens_per_s=10_000, step_ms=20, prefill_tokens_per_step=1024)  # fmt: skip
    loads = [replace(busy, running_requests=n) for n in (8, 2, 5, 8)]
    flow = cluster(Role.MIXED, loads, method="predicted_latency")
    for entry in flow.router.table.candidates():  # as the dispatcher does after each report
        flow.router.policy.on_report(entry)
    first = flow.roomy(RouteContext("a", 10))
    assert [e.dp_rank for e in first] == [1, 2]
    assert flow.roomy(RouteContext("b", 10)) is first
    policy = flow.router.policy
    alone = {e.dp_rank: policy.select(RouteContext("c", 100), [e]) and policy.last_prediction_s for e in first}
    chosen = policy.select(RouteContext("d", 100), first)
    assert policy.last_prediction_s == pytest.approx(min(alone.values()))
    assert alone[chosen.dp_rank] == pytest.approx(min(alone.values()))
    flow.router.decide(RouteContext("e", 10), among=first)  # rank 1 or 2 takes it: its row changes
    after = flow.roomy(RouteContext("f", 10))
    assert [e.dp_rank for e in after] == [1, 2] and after is first  # both still have a free slot
    taken = next(e for e in first if e.inflight_requests)
    assert taken.policy_state is None or taken.policy_state == policy.coefficients(taken)
