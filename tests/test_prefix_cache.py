"""Prefix cache: the radix tree alone (pure logic), then inside the engine with the real torch model."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdlb.engines.request import EngineLimits
from pdlb.engines.torch.batching import Engine
from pdlb.engines.torch.prefix_cache import PrefixCache
from pdlb.engines.torch.runners import CostModel, SimRunner
from tests.test_scheduler_engine import CONFIG, collect, make_engine, prompt, seq


class SlotBank:
    """Hands out slot numbers and records releases (the tree's only side effect)."""

    def __init__(self) -> None:
        self.next, self.released = 1, []

    def take(self, n: int) -> list[int]:
        slots = list(range(self.next, self.next + n))
        self.next += n
        return slots

    def release(self, slots: list[int]) -> None:
        self.released.extend(slots)


def test_match_is_block_aligned_and_shares_blocks_between_prefixes():
    bank = SlotBank()
    cache = PrefixCache(4, bank.release)
    tokens = list(range(10))
    slots = bank.take(10)
    path, dup = cache.insert(tokens, slots, [])
    assert len(path) == 2 and dup == [] and cache.cached_tokens == 8  # the partial block is not cached
    assert cache.locked_tokens == 8
    assert [n.slots for n in cache.match(tokens)] == [slots[:4], slots[4:8]]
    assert len(cache.match(tokens, max_tokens=7)) == 1  # at most 7 tokens: one full block
    assert cache.match([0, 1, 2, 9]) == []  # first block differs
    # A second request with the same first block and a different second one shares the first.
    other = [0, 1, 2, 3, 7, 7, 7, 7]
    other_slots = bank.take(8)
    own_first_block = other_slots[:4]
    other_path, dup = cache.insert(other, other_slots, [])
    assert dup == own_first_block and other_slots[:4] == slots[:4]  # rewritten to the cached copy
    assert other_path[0] is path[0] and cache.cached_tokens == 12
    cache.unlock(path)
    cache.unlock(other_path)
    assert cache.locked_tokens == 0 and cache.evictable_tokens == 12


def test_eviction_is_lru_over_leaves_and_skips_locked_paths():
    bank = SlotBank()
    cache = PrefixCache(2, bank.release)
    a, b, c = [1, 1, 2, 2], [1, 1, 3, 3], [4, 4, 5, 5]
    paths = {}
    for name, tokens in (("a", a), ("b", b), ("c", c)):
        paths[name], _ = cache.insert(tokens, bank.take(4), [])
    for name in ("a", "b", "c"):
        cache.unlock(paths[name])  # a is least recently used, then b, then c
    cache.lock(cache.match(a))  # a in use again: not evictable
    assert cache.evict(2) == 2
    assert cache.match(b) == cache.match(b)[:1] and len(cache.match(b)) == 1  # b's leaf went first
    assert len(cache.match(a)) == 2  # locked path untouched
    assert cache.evict(100) == 4  # c's two blocks; b's first block is shared with locked a
    assert cache.cached_tokens == 4 and len(cache.match(a)) == 2
    assert sorted(bank.released) == sorted(paths["b"][1].slots + paths["c"][0].slots + paths["c"][1].slots)


# Random insert / lock / evict sequences under every eviction order: test_prefix_eviction.py.


async def test_prefill_skips_the_cached_prefix_and_tokens_match_no_cache():
    plain, _ = make_engine(page_size=0)
    reference = seq("ref", prompt(100), max_new=10)
    plain.submit(reference)
    expected, _ = await collect(reference)
    await plain.close()

    engine, runner = make_engine(page_size=16)
    first = seq("first", prompt(100), max_new=10)
    engine.submit(first)
    assert (await collect(first))[0] == expected
    computed_before = runner.computed_tokens
    second = seq("second", prompt(100), max_new=10)
    engine.submit(second)
    assert (await collect(second))[0] == expected  # same tokens from the shared KV
    assert second.cache_hit == 96  # six full blocks; the last token is always computed
    # Prefill ran over 4 prompt tokens instead of 100, then the 9 decode steps.
    assert runner.computed_tokens - computed_before == 4 + 9
    load = engine.load()
    assert load.cache_hit_tokens == 96 and load.prompt_tokens_total == 200
    await engine.close()


async def test_concurrent_requests_share_a_prefix_once_it_is_prefilled_and_kv_stays_in_budget():
    engine, runner = make_engine(max_total_tokens=400, max_running=8, chunk=32, page_size=16)
    system = prompt(64, salt=3)
    head = seq("head", [*system, 1, 2, 3], max_new=4)
    engine.submit(head)
    await head.outbox.get()  # prefilled: the system prompt's blocks are cached
    turns = [seq(f"t{i}", system + prompt(10 + i, salt=i), max_new=30) for i in range(6)]
    for s in turns:
        engine.submit(s)
    await collect(head)
    await asyncio.gather(*[collect(s) for s in turns])
    assert all(s.cache_hit == 64 for s in turns)
    assert runner.peak_kv <= 400
    # Idle: nothing is reserved or locked, and every used slot belongs to the cache.
    assert engine.reserved == 0 and engine.cache.locked_tokens == 0
    assert runner.kv_used == engine.cache.cached_tokens > 0
    await engine.close()


async def test_lru_eviction_makes_room_under_the_kv_budget():
    engine, runner = make_engine(max_total_tokens=256, max_running=4, page_size=16)
    for i in range(12):  # 12 distinct 100-token prompts: far more than 256 tokens of cache
        s = seq(f"d{i}", prompt(100, salt=i + 10), max_new=8)
        engine.submit(s)
        await collect(s)
        assert runner.kv_used <= 256
    assert engine.cache.evicted_tokens > 0 and engine.cache.cached_tokens <= 256
    # The most recent prompt survived eviction; the oldest did not.
    last, oldest = seq("last", prompt(100, salt=21), max_new=2), seq("old", prompt(100, salt=10), max_new=2)
    engine.submit(last)
    await collect(last)
    engine.submit(oldest)
    await collect(oldest)
    assert last.cache_hit == 96 and oldest.cache_hit == 0
    await engine.close()


async def test_prefill_role_holds_cached_blocks_until_the_kv_is_taken():
    engine, runner = make_engine(max_total_tokens=512, page_size=16)
    for room in (1, 2):
        s = seq(f"p{room}", prompt(70), max_new=1, prefill_only=True, bootstrap_room=room)
        engine.submit(s)
        await collect(s)
    assert engine.load().cache_hit_tokens == 64
    first, second = engine.take_held(1), engine.take_held(2)
    assert first.slots[:64] == second.slots[:64]  # both hand-offs read the shared blocks
    assert engine.cache.locked_tokens == 64
    engine.free_held(first)
    engine.free_held(second)
    assert engine.reserved == 0 and engine.cache.locked_tokens == 0
    assert runner.kv_used == engine.cache.cached_tokens == 64
    await engine.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 60), st.integers(1, 12)), min_size=1, max_size=25),
    st.integers(160, 600),
)
def test_cached_engine_gives_the_same_tokens_as_no_cache_under_random_traffic(requests, budget):
    """Sim runner: a token is a hash of the KV slots' contents, so any wrongly shared slot shows."""

    async def run(page_size: int) -> tuple[list[list[int]], Engine, SimRunner]:
        runner = SimRunner(CONFIG, budget, CostModel().scaled(0.001))
        engine = Engine(runner, EngineLimits(budget, 4, 32, 64, 400), page_size=page_size)
        engine.start()
        seqs = [
            seq(f"r{i}", prompt(40, salt=group) + prompt(tail, salt=100 + i), max_new=new)
            for i, (group, tail, new) in enumerate(requests)
        ]
        outs = []
        for chunk in (seqs[: len(seqs) // 2], seqs[len(seqs) // 2 :]):  # two waves: the second one hits
            for s in chunk:
                engine.submit(s)
            outs += [tokens for tokens, _ in await asyncio.gather(*[collect(s) for s in chunk])]
        await engine.close()
        return outs, engine, runner

    async def both() -> None:
        plain, _, _ = await run(0)
        cached, engine, runner = await run(8)
        assert cached == plain
        assert engine.reserved == 0 and engine.cache.locked_tokens == 0
        assert runner.kv_used == engine.cache.cached_tokens <= budget

    asyncio.run(both())


async def test_requests_admitted_together_share_the_blocks_the_first_one_computes():
    engine, runner = make_engine(max_total_tokens=1024, chunk=32, page_size=16)
    twins = [seq(f"twin{i}", prompt(120, salt=5), max_new=3) for i in range(3)]
    for s in twins:
        engine.submit(s)  # all admitted in the same step, before any prefill ran
    results = await asyncio.gather(*[collect(s) for s in twins])
    assert results[0] == results[1] == results[2]
    # The chunk budget lets about one request prefill per step; the others pick up the blocks
    # computed by then (twin1 starts with the budget left in twin0's last step: 96 tokens cached).
    assert twins[0].cache_hit == 0 and twins[1].cache_hit >= 96 and twins[2].cache_hit == 112
    assert runner.computed_tokens < 3 * 120 / 2
    await engine.close()
