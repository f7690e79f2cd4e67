"""Flow control's gather window as pure logic: release order, cancellation inside the window, a
full window, shutdown. (The order's effect on a real dispatcher and sim rank is in
test_flow_control.py; this drives FlowControl with a stand-in router whose policy says from a table
how much of each request some rank caches.)"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdlb.services.dispatcher.flow_control import FlowControl, FlowOptions
from pdlb.services.dispatcher.policies import RouteContext, RoutingError

CACHED = {"c300": 300, "c100": 100, "c100-longer": 100}  # request id -> tokens some rank caches


class _Policy:
    def cached_tokens(self, ctx: RouteContext) -> int:
        return CACHED.get(ctx.request_id, 0)


class _Table:
    def candidates(self) -> list:
        return []  # no live rank: flow control hands the request straight to the router


class _Router:
    policy = _Policy()
    table = _Table()

    def decide(self, ctx: RouteContext, among=None) -> str:
        return f"decided {ctx.request_id}"


def flow(**options) -> FlowControl:
    return FlowControl(_Router(), FlowOptions(enabled=True, **options))  # type: ignore[arg-type]


async def test_the_window_releases_by_priority_then_work_left_then_arrival() -> None:
    fc = flow(gather_s=0.05)
    released: list[str] = []

    async def arrive(rid: str, tokens: int, priority: int = 0) -> None:
        await fc._gather(RouteContext(rid, tokens), priority)
        released.append(rid)

    arrivals = [
        ("short", 50, 0), ("late-class", 900, 1), ("long", 900, 0), ("c100", 400, 0), ("short-2", 50, 0),
        ("c300", 400, 0), ("c100-longer", 800, 0),
    ]  # fmt: skip
    await asyncio.wait_for(asyncio.gather(*(arrive(*a) for a in arrivals)), 5)
    # work left: c300 100, c100 300, c100-longer 700; short and short-2 50 each, in arrival order
    assert released == ["short", "short-2", "c300", "c100", "c100-longer", "long", "late-class"]


async def test_a_request_cancelled_in_the_window_does_not_hold_the_others() -> None:
    fc = flow(gather_s=0.05)
    doomed = asyncio.create_task(fc._gather(RouteContext("doomed", 1), 0))
    kept = asyncio.create_task(fc._gather(RouteContext("kept", 5), 0))
    await asyncio.sleep(0)  # both entered the window (one loop turn: nothing to await instead)
    assert len(fc._gathered) == 2
    doomed.cancel()
    await asyncio.wait_for(kept, 5)
    assert doomed.cancelled() and fc._gathered == [] and fc._gather_timer is None


async def test_a_full_window_closes_at_once() -> None:
    fc = flow(gather_s=60.0, max_queued_requests=3)
    tasks = [asyncio.create_task(fc._gather(RouteContext(str(i), 10 - i), 0)) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)  # not the 60 s window
    assert fc._gather_timer is None


async def test_shutdown_fails_the_window_unavailable() -> None:
    fc = flow(gather_s=60.0)
    task = asyncio.create_task(fc._gather(RouteContext("r", 10), 0))
    await asyncio.sleep(0)
    fc.fail_all("dispatcher shutting down")
    with pytest.raises(RoutingError) as err:
        await asyncio.wait_for(task, 5)
    assert err.value.code is grpc.StatusCode.UNAVAILABLE and "shutting down" in str(err.value)
    assert fc.shed_by_reason["shutdown"] == 1


async def test_a_request_due_within_the_window_is_decided_at_once() -> None:
    # The window would hold it 60 s; its TTFT deadline (or its call's deadline) is 50 ms away
    fc = flow(gather_s=60.0)
    soon = fc.clock() + 0.05
    assert await asyncio.wait_for(fc.decide(RouteContext("urgent", 10), deadline_at=soon), 5) == "decided urgent"
    assert await asyncio.wait_for(fc.decide(RouteContext("call", 10), expires_by=soon), 5) == "decided call"
    relaxed = asyncio.create_task(fc.decide(RouteContext("relaxed", 10), deadline_at=fc.clock() + 120))
    await asyncio.sleep(0)  # one loop turn: it entered the window and waits there
    assert not relaxed.done() and len(fc._gathered) == 1
    relaxed.cancel()
