"""Each tenant's share of the cluster's room, as pure logic: the cap holds only while others are
active, follows the weights, always allows one request, frees on release, and stays bounded; and
flow control, over a load table, holds a tenant past its share while binding another's at once
(the hard share, `work_conserving=False`; lending: test_share_lending.py)."""

from __future__ import annotations

import asyncio

import pytest

from pdlb.services.dispatcher.flow_control import FlowControl, FlowOptions, Shed
from pdlb.services.dispatcher.load_table import LoadTable, ReportedLoad, Role, Worker
from pdlb.services.dispatcher.policies import PolicyOptions, RouteContext, create_policy
from pdlb.services.dispatcher.router import Router
from pdlb.services.dispatcher.tenant_share import Room, TenantShares


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


ROOM = Room(requests=8, tokens=0)


def fill(shares: TenantShares, tenant: str, n: int, tokens: int = 10) -> None:
    for i in range(n):
        shares.acquire(f"{tenant}-{i}", tenant, tokens)


def test_alone_a_tenant_may_take_all_the_room():
    shares = TenantShares()
    fill(shares, "flood", 7)
    assert not shares.over_share("flood", 10, ROOM)
    assert shares.share("flood") == 1.0


def test_with_another_tenant_active_the_cap_is_the_even_share():
    shares = TenantShares()
    fill(shares, "flood", 3)
    shares.acquire("steady-0", "steady", 10)
    assert shares.share("flood") == 0.5
    assert not shares.over_share("flood", 10, ROOM)  # 4 of 8 slots is its half
    shares.acquire("flood-3", "flood", 10)
    assert shares.over_share("flood", 10, ROOM)  # a 5th would pass it
    assert not shares.over_share("steady", 10, ROOM)


def test_queued_tenants_count_as_active():
    shares = TenantShares()
    fill(shares, "flood", 4)
    assert not shares.over_share("flood", 10, ROOM)
    assert shares.over_share("flood", 10, ROOM, queued_tenants=["steady"])


def test_a_tenant_stays_active_for_its_window_after_its_last_request():
    clock = Clock()
    shares = TenantShares(active_window_s=2.0, clock=clock)
    shares.acquire("steady-0", "steady", 10)
    fill(shares, "flood", 4)
    shares.release("steady-0")
    clock.now += 1.9
    assert shares.over_share("flood", 10, ROOM), "steady's gap between requests keeps its room"
    clock.now += 0.2
    assert not shares.over_share("flood", 10, ROOM), "past the window the flood may take it all"
    assert len(shares) == 1, "the idle tenant's entry is dropped"


def test_weights_set_the_share():
    shares = TenantShares(weights={"gold": 3.0})
    shares.acquire("b-0", "batch", 10)
    fill(shares, "gold", 5)
    assert shares.share("gold") == 0.75 and shares.share("batch") == 0.25
    assert not shares.over_share("gold", 10, ROOM)  # 6 of 8 is gold's 3/4
    shares.acquire("b-1", "batch", 10)
    assert shares.over_share("batch", 10, ROOM)  # a 3rd would pass batch's 2 of 8


def test_one_request_is_always_allowed_and_scale_zero_disables():
    shares = TenantShares(weights={"tiny": 0.01})
    fill(shares, "big", 6)
    assert not shares.over_share("tiny", 10, ROOM), "nothing in flight: never held"
    off = TenantShares(scale=0)
    fill(off, "flood", 8)
    off.acquire("s", "steady", 1)
    assert not off.over_share("flood", 10, ROOM)


def test_prompt_tokens_are_capped_by_the_token_share_until_prefilled():
    shares = TenantShares()
    shares.acquire("s", "steady", 10)
    room = Room(requests=64, tokens=16_000)
    shares.acquire("huge-0", "long", 20_000)  # alone past the share: one prompt is always allowed
    shares.release("huge-0")
    shares.acquire("long-0", "long", 6000)
    assert shares.over_share("long", 4000, room)  # 10,000 tokens would pass half of 16,000
    assert not shares.over_share("long", 1000, room)
    assert shares.release_tokens("long-0") and not shares.release_tokens("long-0")
    assert shares.in_flight("long") == (1, 0), "prefilled: its slot still counts, its prompt not"
    assert not shares.over_share("long", 7000, room)
    shares.release("long-0")
    assert shares.in_flight("long") == (0, 0)


def test_release_frees_the_share_and_is_idempotent():
    shares = TenantShares()
    shares.acquire("s", "steady", 10)
    fill(shares, "flood", 4)
    assert shares.over_share("flood", 10, ROOM)
    shares.release("flood-0")
    shares.release("flood-0")
    shares.release("unknown")
    assert shares.in_flight("flood") == (3, 30)
    assert not shares.over_share("flood", 10, ROOM)


def test_tenant_map_is_bounded():
    shares = TenantShares(max_tenants=2)
    shares.acquire("a", "a", 1)
    shares.acquire("b", "b", 1)
    shares.acquire("c", "c", 1)  # counted under the overflow key
    assert len(shares) == 3 and shares.in_flight("") == (1, 1)
    assert shares.key("x" * 500) == ""


def test_tenants_past_max_tenants_are_capped_as_the_overflow_class():
    """Past `max_tenants`, tenants share the overflow key "" for counting and for the cap alike,
    so they are held as one tenant instead of escaping the share."""
    shares = TenantShares(max_tenants=2)
    shares.acquire("a-0", "a", 10)
    shares.acquire("b-0", "b", 10)
    assert shares.key("c") == shares.key("d" * 500) == ""
    shares.acquire("c-0", "c", 10)
    shares.acquire("d-0", "d", 10)
    assert shares.in_flight("c") == shares.in_flight("d") == shares.in_flight("") == (2, 20)
    assert shares.share("c") == pytest.approx(1 / 3), "a, b and the overflow class are active"
    assert shares.over_share("c", 10, ROOM) and shares.over_share("e", 10, ROOM), "3 would pass 8/3 slots"
    assert not shares.over_share("a", 10, ROOM)
    shares.release("a-0")
    assert shares.key("a") == "a", "a is tracked while its window lasts"


def flow_on(slots_per_rank: int, ranks: int, **options) -> FlowControl:
    table = LoadTable()
    for rank in range(ranks):
        table.upsert(Worker(f"w{rank}", Role.MIXED, rank, f"h:{rank}"))
        table.apply_report(f"w{rank}", ReportedLoad(max_running_requests=slots_per_rank), 0)
    router = Router(Role.MIXED, table, create_policy("least_wait", Role.MIXED, PolicyOptions()))
    return FlowControl(router, FlowOptions(enabled=True, max_prefill_ahead_chunks=0, **options))


async def test_flow_control_holds_the_flood_past_its_share_and_binds_another_tenant_at_once():
    flow = flow_on(slots_per_rank=4, ranks=2, sheddable_ttl_s=0.05, work_conserving=False)  # the hard share
    steady = await flow.decide(RouteContext("steady-0", 10), tenant="steady")
    flood = [await flow.decide(RouteContext(f"flood-{i}", 10), tenant="flood") for i in range(4)]
    assert len(flood) == 4 and steady.entry is not None
    # 5 of 8 slots are taken: room is left, but the flood holds its half of it.
    held = asyncio.create_task(flow.decide(RouteContext("flood-4", 10), tenant="flood"))
    await asyncio.sleep(0)
    assert len(flow.queue) == 1 and flow.shares.held_total == 1
    # Another tenant's request is bound at once, past the flood's queued one.
    other = await asyncio.wait_for(flow.decide(RouteContext("steady-1", 10), tenant="steady"), 1)
    assert other.entry is not None and len(flow.queue) == 1
    flow.release("flood-0")
    flow.kick()
    assert (await asyncio.wait_for(held, 1)).entry is not None
    assert flow.shares.in_flight("flood") == (4, 40)
    # Past its share, a sheddable flood request is shed by its TTL with a retry hint.
    with pytest.raises(Shed) as shed:
        await flow.decide(RouteContext("flood-5", 10), priority=1, tenant="flood")
    assert shed.value.reason == "ttl" and shed.value.retry_after_s >= 1


async def test_flow_control_shares_the_prefill_room_until_the_first_token():
    """Two ranks prefilling 1,024 tokens a step: while steady is active, flood's prompts awaiting
    their first token may total half of 2,048 tokens; its first token frees that part at once."""
    table = LoadTable()
    for rank in range(2):
        table.upsert(Worker(f"w{rank}", Role.MIXED, rank, f"h:{rank}"))
        table.apply_report(f"w{rank}", ReportedLoad(max_running_requests=8, prefill_tokens_per_step=1024), 0)
    router = Router(Role.MIXED, table, create_policy("least_wait", Role.MIXED, PolicyOptions()))
    flow = FlowControl(router, FlowOptions(enabled=True, max_prefill_ahead_chunks=0, work_conserving=False))
    await flow.decide(RouteContext("steady-0", 100), tenant="steady")
    await flow.decide(RouteContext("flood-0", 600), tenant="flood")
    held = asyncio.create_task(flow.decide(RouteContext("flood-1", 600), tenant="flood"))
    await asyncio.sleep(0)
    assert len(flow.queue) == 1, "1,200 prompt tokens would pass flood's 1,024"
    flow.prefilled("flood-0")  # kicks: the held request fits now
    assert (await asyncio.wait_for(held, 1)).entry is not None
    assert flow.shares.in_flight("flood") == (2, 600)


async def test_flow_control_holds_a_tenant_past_max_tenants_by_the_overflow_class_share():
    """With --max-tenants 2 and tenants a and b in flight, tenants c and d are counted and capped
    as the overflow class: its third request waits while a's is bound at once."""
    flow = flow_on(slots_per_rank=4, ranks=2, max_tenants=2, work_conserving=False)  # the hard share
    for tenant in ("a", "b", "c", "d"):
        assert (await flow.decide(RouteContext(f"{tenant}-0", 10), tenant=tenant)).entry is not None
    assert flow.shares.in_flight("") == (2, 20)
    held = asyncio.create_task(flow.decide(RouteContext("e-0", 10), tenant="e" * 300))
    await asyncio.sleep(0)
    assert len(flow.queue) == 1 and flow.shares.held_total == 1, "the overflow class holds its 8/3 slots"
    assert (await asyncio.wait_for(flow.decide(RouteContext("a-1", 10), tenant="a"), 1)).entry is not None
    flow.release("c-0")
    flow.kick()
    assert (await asyncio.wait_for(held, 1)).entry is not None
    assert flow.shares.in_flight("") == (2, 20)
