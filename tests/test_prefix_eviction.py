"""Eviction orders of the prefix cache: what goes first, what never goes, and that the block events
the dispatchers index stay exact under every order (pure logic); then real sim workers started with
`--prefix-eviction`."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdlb.common.processes import ServiceFailed
from pdlb.engines.kv_events import KVEventLog
from pdlb.engines.torch.eviction import EVICTIONS, PROTECTED, SLRU, SLRURandom, eviction_order
from pdlb.engines.torch.prefix_cache import PrefixCache
from pdlb.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.helpers import request
from tests.test_prefix_cache import SlotBank

ORDERS = ["lru", "slru", "slru:0.5", "slru-random", "slru-random:0.3"]


def cached(cache: PrefixCache, tokens: list[int]) -> int:
    return sum(len(n.slots) for n in cache.match(tokens))


def serve(cache: PrefixCache, bank: SlotBank, tokens: list[int]) -> int:
    """One request as the engine runs it: lock the cached prefix (a hit), compute and cache the
    rest, release. Returns the tokens it found cached."""
    path = cache.match(tokens)
    hit = sum(len(n.slots) for n in path)
    cache.lock(path)
    path, duplicates = cache.insert(tokens, [s for n in path for s in n.slots] + bank.take(len(tokens) - hit), path)
    bank.release(duplicates)
    cache.unlock(path)
    return hit


@pytest.mark.parametrize("order", ["slru", "slru-random"])
def test_a_reused_prefix_outlives_newer_blocks_seen_once_where_lru_drops_it_first(order):
    results = {}
    for name in ("lru", order):
        bank = SlotBank()
        cache = PrefixCache(2, bank.release, eviction=name)
        first_turn = [1, 1, 2, 2]
        serve(cache, bank, first_turn)
        assert serve(cache, bank, [*first_turn, 3, 3]) == 4  # its second turn reuses it: protected
        serve(cache, bank, [7, 7, 8, 8, 9, 9])  # a newer one-off prompt, seen once
        cache.evict(8)  # of 12 cached tokens
        results[name] = cached(cache, [*first_turn, 3, 3]), cached(cache, [7, 7, 8, 8, 9, 9])
    # LRU drops the least recently used leaves: the conversation, whole, then the one-off's tail.
    # The segmented orders drop the blocks seen once (the second turn's own block and the one-off
    # prompt) and keep the reused prefix.
    assert results["lru"] == (0, 4)
    assert results[order] == (4, 0)


def test_protected_blocks_give_way_once_they_hold_more_than_their_share():
    bank = SlotBank()
    cache = PrefixCache(2, bank.release, eviction=SLRU(protected_share=0.5))
    shared = [1, 1, 2, 2, 3, 3]
    serve(cache, bank, shared)
    serve(cache, bank, shared)  # all three blocks reused: 6 protected tokens
    serve(cache, bank, [5, 5])  # 2 probationary tokens
    assert cache.segment_tokens(PROTECTED) == 6 and cache.cached_tokens == 8
    cache.evict(2)  # 6 > 0.5 x 8: the protected segment's least recently used leaf goes first
    assert cached(cache, shared) == 4 and cached(cache, [5, 5]) == 2
    cache.evict(2)  # 4 > 0.5 x 6 still
    assert cached(cache, shared) == 2 and cached(cache, [5, 5]) == 2
    cache.evict(2)  # 2 of 4 is within the share: now the probation
    assert cached(cache, shared) == 2 and cached(cache, [5, 5]) == 0


@pytest.mark.parametrize("order", ORDERS)
def test_locked_blocks_are_never_evicted(order):
    bank = SlotBank()
    cache = PrefixCache(2, bank.release, eviction=order)
    running = [4, 4, 5, 5, 6, 6]
    path = cache.match(running)
    path, _ = cache.insert(running, bank.take(6), path)  # a running request holds it
    for salt in range(5):
        serve(cache, bank, [10 + salt, 0, 9, 9])  # one-offs sharing no block with it
    assert cache.evict(10_000) == 5 * 4  # everything but the locked path
    assert cache.cached_tokens == 6 and cached(cache, running) == 6
    cache.unlock(path)
    assert cache.evict(10_000) == 6 and cache.cached_tokens == 0


def test_slru_random_keeps_some_first_turns_that_lru_loses_all_of():
    """Twenty first turns of 4 blocks, then one-off prompts that take 40 blocks of the cache's 80:
    LRU drops the oldest 10 first turns whole; the random probation trims tails of many, so more
    first turns keep at least their first half for their second turn, in every seed."""
    for seed in range(10):
        kept = {}
        for name in ("lru", "slru-random"):
            bank = SlotBank()
            cache = PrefixCache(1, bank.release, eviction=eviction_order(name, seed))
            turns = [[1000 + t, t, t, t] for t in range(20)]
            for turn in turns:
                serve(cache, bank, turn)
            for one_off in range(10):
                serve(cache, bank, [2000 + one_off, 0, 0, 0])
                cache.evict(max(0, cache.cached_tokens - 80))
            kept[name] = sum(cached(cache, turn) >= 2 for turn in turns)
        assert kept["lru"] == 10 and kept["slru-random"] > 10, (seed, kept)


def test_orders_by_name_and_refusals():
    assert set(EVICTIONS) == {"lru", "slru", "slru-random"}
    assert isinstance(eviction_order("slru-random:0.3", seed=4), SLRURandom)
    assert eviction_order("slru:0.25").protected_share == 0.25
    with pytest.raises(ValueError, match="unknown prefix-cache eviction 'lfu'; known: lru, slru, slru-random"):
        eviction_order("lfu")
    with pytest.raises(ValueError, match="'lru' takes no argument"):
        eviction_order("lru:0.5")
    with pytest.raises(ValueError, match="must be a number in"):
        eviction_order("slru:half")
    with pytest.raises(ValueError, match=r"protected_share must be in \[0, 1\], got 2.0"):
        eviction_order("slru:2")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ORDERS),
    st.lists(
        st.tuples(st.lists(st.integers(0, 2), min_size=0, max_size=12), st.booleans(), st.integers(0, 30)),
        max_size=40,
    ),
)
def test_every_order_keeps_paths_whole_locks_held_and_events_exact(order, ops):
    bank, events = SlotBank(), KVEventLog()
    cache = PrefixCache(3, bank.release, events, eviction=eviction_order(order, seed=len(ops)))
    held = []
    for tokens, keep, evict in ops:
        path = cache.match(tokens)
        cache.lock(path)
        slots = [s for n in path for s in n.slots] + bank.take(len(tokens) - 3 * len(path))
        path, dup = cache.insert(tokens, slots, path)
        bank.release(dup + slots[3 * len(path) :])  # duplicates and the uncached tail are the caller's
        held.append(path) if keep else cache.unlock(path)
        cache.evict(evict)
        alive, stack = set(), [cache.root]
        while stack:  # every cached block hangs off a cached parent: no path has a hole
            node = stack.pop()
            for child in node.children.values():
                assert child.alive and child.parent is node
                alive.add(child.name)
                stack.append(child)
        assert events.live == alive  # the dispatchers' exact index sees exactly what is cached
        locked = {id(n): n for p in held for n in p}
        assert cache.locked_tokens == sum(len(n.slots) for n in locked.values())
        assert cache.cached_tokens == 3 * cache.node_count()
        assert all(n.alive for p in held for n in p)  # locked: never evicted
        assert sum(cache.segment_tokens(s) for s in range(cache.eviction.segments)) == cache.cached_tokens
    for path in held:
        cache.unlock(path)
    cache.clear()
    assert cache.cached_tokens == 0 and events.live == set()
    assert sorted(bank.released) == list(range(1, bank.next))  # every slot came back exactly once


async def cached_tokens_of(stub, rid: str, ids: list[int]) -> int:
    call = stub.Generate(
        scheduler_pb2.SchedulerGenerateRequest(request=request(rid, input_ids=ids, max_new_tokens=2)), timeout=60
    )
    return max([chunk.cached_tokens async for chunk in call])


@pytest.mark.parametrize("order", ["slru", "slru-random"])
async def test_a_worker_keeps_a_continued_conversation_where_lru_loses_it(start_service, order):
    """Real sim workers, one per order, 256 tokens of KV, blocks of 16: a conversation's second turn
    reuses its first turn's prefix; then four one-off prompts of 120 tokens pass through; its third
    turn finds the prefix cached on the segmented worker and nothing on the LRU one (the cache hit
    each response reports, and the worker's hit counter)."""
    kv = ["--runner", "sim", "--max-total-tokens", "256", "--page-size", "16", "--max-running-requests", "1"]
    workers = {
        name: start_service("scheduler", *kv, "--prefix-eviction", name, name=f"worker-{name}")
        for name in ("lru", order)
    }
    first = [(7 * i) % 250 + 1 for i in range(100)]
    hits = {}
    for name, proc in workers.items():
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            assert await cached_tokens_of(stub, "turn1", first) == 0
            assert await cached_tokens_of(stub, "turn2", [*first, 3, 3, 3]) == 96  # the first turn's 6 blocks
            for n in range(4):
                assert await cached_tokens_of(stub, f"one-off{n}", [251 + n, *range(1, 120)]) == 0
            hits[name] = await cached_tokens_of(stub, "turn3", [*first, 3, 3, 3, 4, 4])
            load = (await stub.GetLoad(scheduler_pb2.GetLoadRequest(), timeout=5)).load
            assert load.cache_hit_tokens == 96 + hits[name]
    assert hits == {"lru": 0, order: 96}


async def test_an_unknown_eviction_is_refused_at_start(start_service):
    with pytest.raises(ServiceFailed, match=r"--prefix-eviction: unknown prefix-cache eviction 'mru'; known: lru"):
        start_service("scheduler", "--runner", "sim", "--prefix-eviction", "mru", name="bad-eviction")
