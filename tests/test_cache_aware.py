"""cache_aware as pure logic over a real load table (fake clock), then on real processes."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pdlb.services.dispatcher.load_table import ReportedLoad, Role
from pdlb.services.dispatcher.policies import PolicyOptions, RouteContext, cache_aware, create_policy
from pdlb.services.dispatcher.prefix_index import PrefixIndex
from pdlb.services.dispatcher.router import Router
from pdlb.v1 import dispatch_pb2
from tests.helpers import dispatch_stub, load_snapshot, request, rest_of, wait_for_workers, wait_until
from tests.test_load_table import make_table

BLOCK = 16


def system_prompt(group: int, length: int = 256) -> list[int]:
    rng = random.Random(group)
    return [rng.randrange(256) for _ in range(length)]


def make_router(ranks: int = 4, **options) -> Router:
    table = make_table(ranks)
    for entry in table.entries.values():
        table.apply_report(
            entry.worker.worker_id, ReportedLoad(kv_tokens_capacity=100_000, max_running_requests=64), acked_seq=0
        )
    policy = create_policy("cache_aware", Role.MIXED, PolicyOptions(**options))
    for entry in table.entries.values():
        policy.on_report(entry)
    return Router(Role.MIXED, table, policy)


def route(router: Router, rid: str, tokens: list[int], key: str = "") -> int:
    ctx = RouteContext(request_id=rid, num_tokens=len(tokens), routing_key=key, input_ids=tokens)
    return router.decide(ctx).entry.dp_rank


def settle(router: Router) -> None:
    """Every worker reports that it took what was sent (in flight -> running), idle queues."""
    table = router.table
    for entry in table.entries.values():
        running = entry.total_requests
        load = ReportedLoad(running_requests=running, kv_tokens_capacity=100_000, max_running_requests=64)
        table.apply_report(entry.worker.worker_id, load, acked_seq=entry.next_seq)
        router.policy.on_report(entry)


def test_prefix_index_matches_leading_blocks_per_worker():
    index = PrefixIndex(block_size=4)
    a = index.chain(list(range(16)))
    b = index.chain([*range(8), 9, 9, 9, 9, 1, 1, 1, 1])
    assert len(a) == 4 and a[:2] == b[:2] and a[2] != b[2]
    index.insert("w0", a)
    index.insert("w1", b)
    assert index.match(a) == {"w0": 4, "w1": 2}
    assert index.match(index.chain([7] * 16)) == {}
    index.remove_worker("w0")
    assert index.match(a) == {"w1": 2} and index.size() == 4


def test_repeated_prefixes_stick_to_one_rank_and_groups_spread():
    router = make_router(ranks=4)
    placed: dict[int, set[int]] = {}
    for turn in range(6):
        for group in range(4):
            tokens = [*system_prompt(group), turn, group, 1, 2, 3]
            placed.setdefault(group, set()).add(route(router, f"g{group}t{turn}", tokens))
        settle(router)
    assert all(len(ranks) == 1 for ranks in placed.values()), placed
    assert len({next(iter(r)) for r in placed.values()}) == 4  # one group per rank: new prefixes spread
    assert router.policy.reasons[cache_aware.CACHE_HIT] == 4 * 5


def test_guard_spills_a_hot_prefix_under_skew_and_keeps_it_within_thresholds():
    router = make_router(ranks=3, balance_abs_threshold=4, balance_rel_threshold=1.5)
    hot = system_prompt(9)
    home = route(router, "first", [*hot, 0])
    settle(router)
    # Within the thresholds the prefix stays home although home has more (running) requests.
    for i in range(3):
        assert route(router, f"near{i}", [*hot, i + 1]) == home
        settle(router)
    # Skew: home gets 20 long-running requests of other prompts; the others stay nearly idle.
    entry = router.table.for_rank(home)
    router.table.apply_report(
        entry.worker.worker_id,
        ReportedLoad(running_requests=25, kv_tokens_capacity=100_000, max_running_requests=64),
        acked_seq=entry.next_seq,
    )
    spilled = []
    for i in range(3):
        spilled.append(route(router, f"hot{i}", [*hot, 50 + i]))
        entry = router.table.for_rank(spilled[-1])  # taken and running there; home stays skewed
        router.table.apply_report(
            entry.worker.worker_id,
            ReportedLoad(running_requests=entry.total_requests, kv_tokens_capacity=100_000, max_running_requests=64),
            acked_seq=entry.next_seq,
        )
    assert home not in spilled
    assert router.policy.reasons[cache_aware.GUARDED] >= 1
    # Once spilled, the prefix has a second home: later requests follow it there.
    assert len(set(spilled)) == 1


def test_routing_key_is_honoured_until_the_guard_breaks_it():
    router = make_router(ranks=4, balance_abs_threshold=3, balance_rel_threshold=1.0)
    first = route(router, "s0", system_prompt(1), key="session-1")
    for i in range(3):  # different prompts, same session: same rank
        assert route(router, f"s{i + 1}", system_prompt(100 + i), key="session-1") == first
    assert router.policy.reasons[cache_aware.SESSION] == 3
    # The session's rank is now 4 requests ahead of idle ranks (> 3 and > 1.0x): the guard moves it.
    moved = route(router, "s9", system_prompt(200), key="session-1")
    assert moved != first
    assert route(router, "s10", system_prompt(201), key="session-1") == moved  # the key followed


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 64), st.integers(0, 2**32))
def test_index_memory_stays_bounded_under_random_traffic(cap, seed):
    rng = random.Random(seed)
    router = make_router(ranks=8, cache_index_blocks=cap, max_routing_keys=50)
    policy = router.policy
    for i in range(300):
        length = rng.randrange(1, 200)
        tokens = [rng.randrange(4) for _ in range(length)]  # a small alphabet: many shared prefixes
        route(router, f"r{i}", tokens, key=f"k{rng.randrange(1000)}")
        if i % 20 == 0:
            settle(router)
    assert policy.index.size() <= 8 * cap
    assert policy.index.block_names() <= policy.index.size()
    assert len(policy.sessions) <= 50
    for entry in list(router.table.entries.values()):
        policy.on_worker_removed(entry.worker.worker_id)
    assert policy.index.size() == 0 and policy.index.block_names() == 0


def test_index_follows_the_reported_kv_capacity():
    router = make_router(ranks=1)
    policy = router.policy
    for i in range(40):
        route(router, f"r{i}", system_prompt(i, length=64))  # 4 blocks each
    entry = router.table.for_rank(0)
    router.table.apply_report(entry.worker.worker_id, ReportedLoad(kv_tokens_capacity=10 * BLOCK), entry.next_seq)
    policy.on_report(entry)
    assert policy.index.size() == 10
    assert policy.index.match(policy.index.chain(system_prompt(39, length=64))) == {entry.worker.worker_id: 4}


async def test_cache_aware_on_real_workers_keeps_groups_together_and_hits_their_caches(etcd, prefix, start_service):
    flags = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *flags, "--load-balance-method", "cache_aware")
    for rank in range(3):
        start_service("scheduler", *flags, "--runner", "sim", "--dp-rank", str(rank), name=f"sched{rank}")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 3)
        ranks: dict[int, set[int]] = {}
        for turn in range(4):
            for group in range(3):
                req = request(f"g{group}t{turn}", "", max_new_tokens=4)
                req.input_ids.extend([*system_prompt(group, 160), turn])
                call = stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=30)
                first = await call.read()
                ranks.setdefault(group, set()).add(first.dp_rank)
                await rest_of(call)
        assert all(len(r) == 1 for r in ranks.values()), ranks

        async def hits() -> bool:
            rows = (await load_snapshot(stub)).workers
            return sum(row.reported.cache_hit_tokens for row in rows) == 3 * 3 * 160

        # Turns 2..4 of each group find its 160-token system prompt (10 blocks) cached.
        await wait_until(hits, what="every repeated system prompt to be a cache hit")


def test_a_free_batch_slot_comes_before_a_cache_hit():
    router = make_router(ranks=2)
    prompt = system_prompt(4)
    home = route(router, "a", [*prompt, 1])
    entry = router.table.for_rank(home)
    full = ReportedLoad(running_requests=2, kv_tokens_capacity=100_000, max_running_requests=2)
    router.table.apply_report(entry.worker.worker_id, full, acked_seq=entry.next_seq)
    assert route(router, "b", [*prompt, 2]) != home  # home has no free slot: queueing there costs more
    assert router.policy.reasons[cache_aware.CACHE_HIT] == 0


def test_cached_tokens_is_the_longest_prefix_any_rank_holds():
    # what flow control's gather window orders by: 256 shared tokens sent to one rank, then a prompt
    # extending them by 100 has those 256 cached somewhere; an unseen prompt none; a prompt held
    # whole still computes its last token
    router = make_router(4)
    head = system_prompt(1)
    route(router, "first", head)
    policy = router.policy
    extended = head + system_prompt(2, 100)
    assert policy.cached_tokens(RouteContext("r", len(extended), input_ids=extended)) == 256
    fresh = system_prompt(3, 300)
    assert policy.cached_tokens(RouteContext("f", 300, input_ids=fresh)) == 0
    assert policy.cached_tokens(RouteContext("h", 256, input_ids=head)) == 255
    assert create_policy("round_robin", Role.MIXED, PolicyOptions()).cached_tokens(RouteContext("r", 9)) == 0
