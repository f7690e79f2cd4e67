"""Work-conserving lending, as pure logic: the recent peak and the headroom it keeps; a tenant past
its share bound on the room the others leave unused but never on their headroom, and held again as
they come back; flow control, over a load table, binding requests within their share first and
lending only what is left; and sheddable requests lent the slot reserve while the better classes
leave it unused."""

from __future__ import annotations

import asyncio

import pytest

from pdlb.services.dispatcher.flow_control import FlowControl
from pdlb.services.dispatcher.lending import RecentPeak, headroom
from pdlb.services.dispatcher.policies import RouteContext
from pdlb.services.dispatcher.tenant_share import Room, TenantShares, Verdict
from tests.test_tenant_share import flow_on as tenant_share_flow_on


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_recent_peak_keeps_a_peak_one_to_two_windows_then_forgets_it():
    peak = RecentPeak(window_s=10)
    peak.observe(5, now=0)
    peak.observe(2, now=1)
    assert peak.peak(1, now=9) == 5
    assert peak.peak(1, now=15) == 5, "the previous bucket's peak still counts"
    assert peak.peak(1, now=21) == 1, "two windows on, it is forgotten"
    assert peak.peak(3, now=22) == 3, "the value now always counts"
    assert peak.peak(0, now=55) == 0
    with pytest.raises(ValueError):
        RecentPeak(window_s=0)


def test_headroom_is_the_peak_plus_margin_less_use_within_the_unused_entitlement():
    assert headroom(entitled=32, in_use=3, peak=5, margin=1) == 3  # 5 + 1 - 3
    assert headroom(entitled=4, in_use=3, peak=5, margin=1) == 1, "never more than it is still entitled to"
    assert headroom(entitled=32, in_use=7, peak=5, margin=1) == 0, "past its peak: nothing kept"
    assert headroom(entitled=2, in_use=3, peak=5, margin=1) == 0


ROOM = Room(requests=16, tokens=0, ranks=2)


def lending(clock: Clock | None = None, headroom_requests: float = 1) -> TenantShares:
    return TenantShares(lend=True, lend_headroom=headroom_requests, clock=clock or Clock())


def bind_until_held(
    shares: TenantShares, tenant: str, room: Room = ROOM, tokens: int = 10, prefix: str = ""
) -> list[Verdict]:
    """Acquire `tenant`'s requests (ids `{prefix or tenant}-0`, -1, ...) while they are not held;
    the verdicts they were bound with."""
    verdicts = []
    while (verdict := shares.verdict(tenant, tokens, room)) is not Verdict.HELD:
        shares.acquire(f"{prefix or tenant}-{len(verdicts)}", tenant, tokens)
        verdicts.append(verdict)
        assert len(verdicts) <= room.requests, "never past the room"
    return verdicts


def test_a_lone_tenant_takes_all_the_room_within_its_share():
    shares = lending()
    for i in range(16):
        assert shares.verdict("flood", 10, ROOM) is Verdict.WITHIN
        shares.acquire(f"flood-{i}", "flood", 10)


def test_a_tenant_past_its_share_borrows_all_but_the_others_headroom():
    shares = lending()
    shares.acquire("steady-0", "steady", 10)  # steady holds 1 (its peak): its headroom is 1 more
    verdicts = bind_until_held(shares, "flood")
    assert verdicts == [Verdict.WITHIN] * 8 + [Verdict.LENT] * 6, "8 is its half of 16; 16 - 1 - 1 kept"
    assert shares.requests == 15, "one slot stays free for steady's next arrival"
    hard = TenantShares()
    hard.acquire("steady-0", "steady", 10)
    assert bind_until_held(hard, "flood") == [Verdict.WITHIN] * 8, "the hard share leaves 7 slots idle"


def test_the_headroom_follows_the_owners_recent_peak_and_the_owner_gets_lent_room_back():
    clock = Clock()
    shares = lending(clock)
    for i in range(4):  # steady's burst: its peak is 4
        shares.acquire(f"steady-{i}", "steady", 10)
    for i in range(3):
        shares.release(f"steady-{i}")
    assert len(bind_until_held(shares, "flood")) == 11, "16 - steady's 1 - (4 + 1 - 1) kept"
    # Steady comes back: its arrivals up to its peak + 1 take the free room; the flood is held.
    for i in range(4, 8):
        assert shares.verdict("steady", 10, ROOM) is Verdict.WITHIN
        shares.acquire(f"steady-{i}", "steady", 10)
    assert shares.requests == 16
    assert shares.verdict("flood", 10, ROOM) is Verdict.HELD
    # A lent request ends: steady holds 5 (its new peak) and keeps 1 more, so the flood stays held.
    shares.release("flood-0")
    assert shares.verdict("flood", 10, ROOM) is Verdict.HELD
    shares.release("flood-1")
    assert shares.verdict("flood", 10, ROOM) is Verdict.LENT, "room past steady's peak + 1 is lent again"
    # Steady drops to 1: its peak of 5 keeps 5 slots for it until it is forgotten (10-20 s).
    for i in range(4, 8):
        shares.release(f"steady-{i}")
    assert len(bind_until_held(shares, "flood", prefix="late")) == 1, "16 - 10 - (5 + 1 - 1) - 1"
    clock.now += 20
    assert len(bind_until_held(shares, "flood", prefix="later")) == 4, "now 1 + 1 - 1 kept: 16 - 11 - 1"


def test_prompt_room_is_lent_keeping_room_for_the_others_next_prompts():
    shares = lending()
    room = Room(requests=64, tokens=4096, ranks=4)  # 1,024 prompt tokens a rank
    shares.acquire("steady-0", "steady", 500)  # steady's headroom: one more prompt of its mean, 500
    verdicts = bind_until_held(shares, "flood", room, tokens=500)
    assert verdicts == [Verdict.WITHIN] * 4 + [Verdict.LENT] * 2, "3,000 <= 4,096 - 500 - 500 < 3,500"
    assert shares.release_tokens("flood-0"), "prefilled: its prompt stops counting"
    assert shares.verdict("flood", 500, room) is Verdict.LENT
    # A tenant only queued, no prompt of it seen yet, is kept one rank's worth (1,024 tokens).
    assert shares.verdict("flood", 500, room, queued_tenants=["new"]) is Verdict.HELD


def test_weights_and_several_owners_each_keep_their_headroom():
    shares = TenantShares(weights={"gold": 2.0}, lend=True, lend_headroom=2, clock=Clock())
    shares.acquire("gold-0", "gold", 10)
    shares.acquire("quiet-0", "quiet", 10)
    # flood's share is 1/4 of 16 = 4; gold keeps min(8, 1 + 2) - 1 = 2 and quiet min(4, 3) - 1 = 2.
    verdicts = bind_until_held(shares, "flood")
    assert verdicts == [Verdict.WITHIN] * 4 + [Verdict.LENT] * 6
    assert 16 - shares.requests == 4


def test_lending_off_or_the_share_off():
    hard = TenantShares(lend=False)
    hard.acquire("steady-0", "steady", 10)
    bind_until_held(hard, "flood")
    assert hard.over_share("flood", 10, ROOM) and hard.verdict("flood", 10, ROOM) is Verdict.HELD
    off = TenantShares(scale=0, lend=True)
    off.acquire("steady-0", "steady", 10)
    for i in range(15):
        off.acquire(f"flood-{i}", "flood", 10)
    assert off.verdict("flood", 10, ROOM) is Verdict.WITHIN
    with pytest.raises(ValueError):
        TenantShares(lend=True, lend_headroom=-1)


def test_totals_follow_acquire_release_and_prefill():
    shares = lending()
    shares.acquire("a", "x", 100)
    shares.acquire("a", "x", 100)  # a second acquire of one id is ignored
    shares.acquire("b", "y", 50)
    assert (shares.requests, shares.tokens) == (2, 150)
    shares.release_tokens("a")
    shares.release("b")
    shares.release("b")
    assert (shares.requests, shares.tokens) == (1, 0)
    shares.release("a")
    assert (shares.requests, shares.tokens) == (0, 0)


# flow control over a load table ------------------------------------------------------------------


def flow_on(slots_per_rank: int, ranks: int, **options) -> FlowControl:
    """test_tenant_share's flow control over sim ranks, lending unless a test turns it off."""
    return tenant_share_flow_on(slots_per_rank, ranks, **{"work_conserving": True, **options})


def finish(flow: FlowControl, request_id: str, decision) -> None:
    """The request's stream ended: its slot frees in the load table and its tenant's count drops."""
    flow.router.table.record_finish(decision.entry.worker.worker_id, decision.seq)
    flow.release(request_id)
    flow.kick()


async def test_flow_control_lends_the_unused_share_and_holds_the_headroom():
    flow = flow_on(slots_per_rank=4, ranks=2)
    await flow.decide(RouteContext("steady-0", 10), tenant="steady")
    bound = {}
    for i in range(6):  # 4 within its half of 8 slots, 2 lent; 1 kept for steady
        bound[f"flood-{i}"] = await flow.decide(RouteContext(f"flood-{i}", 10), tenant="flood")
    assert flow.shares.lent_total == 2 and len(flow.queue) == 0
    held = asyncio.create_task(flow.decide(RouteContext("flood-6", 10), tenant="flood"))
    await asyncio.sleep(0)
    assert len(flow.queue) == 1 and flow.shares.held_total == 1, "a slot is free, but it is steady's headroom"
    # Steady's arrival binds at once into its headroom; then every slot is taken.
    assert (await asyncio.wait_for(flow.decide(RouteContext("steady-1", 10), tenant="steady"), 1)).entry
    steady2 = asyncio.create_task(flow.decide(RouteContext("steady-2", 10), tenant="steady"))
    await asyncio.sleep(0)
    assert len(flow.queue) == 2
    # A lent request ends: its slot goes to steady (within its share), not to the flood.
    finish(flow, "flood-5", bound["flood-5"])
    assert (await asyncio.wait_for(steady2, 1)).entry is not None
    assert not held.done() and len(flow.queue) == 1
    # Cancelled while held: it leaves the queue; the ones bound release their counts.
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    assert len(flow.queue) == 0
    for rid in [f"flood-{i}" for i in range(5)] + ["steady-0", "steady-1", "steady-2"]:
        flow.release(rid)
    assert (flow.shares.requests, flow.shares.tokens) == (0, 0)


async def test_flow_control_binds_requests_within_their_share_before_lending():
    """No headroom beyond the owner's peak: one slot frees while a flood request past its share and
    a steady request within its share both wait. Lending alone would give it to either; the pass
    over the requests within their share goes first, so steady's takes it."""
    flow = flow_on(slots_per_rank=4, ranks=2, lend_headroom=0)
    bound = {}
    for i in range(2):
        bound[f"steady-{i}"] = await flow.decide(RouteContext(f"steady-{i}", 10), tenant="steady")
    for i in range(6):  # 4 within its share, 2 lent: steady keeps nothing beyond its peak of 2
        bound[f"flood-{i}"] = await flow.decide(RouteContext(f"flood-{i}", 10), tenant="flood")
    flood = asyncio.create_task(flow.decide(RouteContext("flood-6", 10), tenant="flood"))
    await asyncio.sleep(0)
    steady = asyncio.create_task(flow.decide(RouteContext("steady-2", 10), tenant="steady"))
    await asyncio.sleep(0)
    assert len(flow.queue) == 2, "every slot is taken"
    finish(flow, "flood-0", bound["flood-0"])
    assert (await asyncio.wait_for(steady, 1)).entry is not None
    assert not flood.done() and len(flow.queue) == 1, "the flood, past its share, is not lent the last slot"
    finish(flow, "flood-1", bound["flood-1"])
    assert (await asyncio.wait_for(flood, 1)).entry is not None, "2 slots free, steady's peak keeps 1: 1 is lent"
    assert flow.shares.lent_total == 3 and len(flow.queue) == 0


async def test_sheddable_requests_are_lent_the_slot_reserve_beyond_the_better_classes_headroom():
    """2 ranks of 4 slots, a reserve of 2 a rank. One high-priority request in flight (its peak):
    the hard reserve lets sheddable requests take 2 + 1 slots; lending lets them take all but
    the high class's headroom (1 more than its peak, less what it holds: 1)."""
    for work_conserving, bound in ((False, 3), (True, 6)):
        flow = flow_on(slots_per_rank=4, ranks=2, reserved_slots=2, work_conserving=work_conserving)
        await flow.decide(RouteContext("high-0", 10), priority=0)
        low = []
        for i in range(8):
            task = asyncio.create_task(flow.decide(RouteContext(f"low-{i}", 10), priority=1))
            await asyncio.sleep(0)
            low.append(task)
        assert sum(t.done() for t in low) == bound, work_conserving
        assert len(flow.queue) == 8 - bound
        # A high-priority request is bound at once into what was kept.
        assert (await asyncio.wait_for(flow.decide(RouteContext("high-1", 10), priority=0), 1)).entry
        for task in low:
            task.cancel()
        await asyncio.gather(*low, return_exceptions=True)
        assert len(flow.queue) == 0
