"""`pdlb top`: a live per-rank load dashboard fed by Dispatch.WatchLoad (rich). `q` quits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import grpc
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pdlb.common.plurals import counted
from pdlb.common.security import open_channel
from pdlb.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc

STATE_STYLE = {
    dispatch_pb2.MEMBER_STATE_LIVE: ("live", "green"),
    dispatch_pb2.MEMBER_STATE_STALE: ("stale", "yellow"),
    dispatch_pb2.MEMBER_STATE_GONE: ("gone", "red"),
}
BAR_WIDTH = 20
QUIT_KEYS = {"q", "Q"}
HINT = Text("q: quit", style="grey50")


def bar(value: float, maximum: float, style: str) -> Text:
    filled = 0 if maximum <= 0 else round(BAR_WIDTH * min(value / maximum, 1.0))
    return Text("█" * filled, style=style) + Text("░" * (BAR_WIDTH - filled), style="grey37")


def render(label: str, snapshot: dispatch_pb2.WatchLoadResponse) -> Table:
    role = common_pb2.Role.Name(snapshot.role).removeprefix("ROLE_").lower()
    table = Table(
        title=f"{label}: {role} dispatcher, method {snapshot.method}{_flow(snapshot.flow)}",
        title_justify="left",
        expand=False,
    )
    for column in (
        "rank",
        "worker",
        "state",
        "run",
        "wait",
        "tokens",
        "",
        "KV use",
        "",
        "in-flight",
        "report age",
        "dispatched",
    ):
        table.add_column(column, justify="right" if column not in ("worker", "state", "") else "left")
    rows = list(snapshot.workers)
    lockstep = any(w.HasField("dp_group") for w in rows)
    if lockstep:  # lockstep DP groups: wave, running or paused, and the share of dummy steps
        table.add_column("group", justify="left")
    max_tokens = max((_tokens(w) for w in rows), default=0) or 1
    for w in rows:
        load = w.reported
        in_use = load.kv_tokens_used - load.kv_tokens_evictable  # the evictable prefix cache counts as free
        kv_ratio = in_use / load.kv_tokens_capacity if load.kv_tokens_capacity else 0.0
        state, style = STATE_STYLE.get(w.state, ("?", "white"))
        table.add_row(
            str(w.worker.dp_rank),
            w.worker.worker_id,
            Text(state, style=style),
            str(load.running_requests),
            str(load.waiting_requests),
            str(_tokens(w)),
            bar(_tokens(w), max_tokens, "cyan"),
            f"{kv_ratio:6.1%}",
            bar(kv_ratio, 1.0, "magenta"),
            str(w.inflight_requests),
            "-" if w.report_age_ms < 0 else f"{w.report_age_ms} ms",
            str(w.dispatched_total),
            *([_group(w.dp_group)] if lockstep else []),
        )
    return table


def _flow(f: dispatch_pb2.FlowControlState) -> str:
    """The admission queue in the title: depth, wait percentiles, bound after waiting, shed."""
    if not f.enabled:
        return ""
    return (
        f", queue {f.queued_requests} ({counted(f.queued_tokens, 'token')}, {counted(f.tenants, 'tenant')}), "
        f"wait p50 {f.wait_p50_ms:.0f} / p99 {f.wait_p99_ms:.0f} ms, admitted {f.admitted_total}, shed {f.shed_total}"
    )


def _group(g: common_pb2.DPGroupState) -> Text:
    if not g.group_id:
        return Text("-")
    dummy = g.dummy_steps / g.steps if g.steps else 0.0
    state = Text("running", style="green") if g.running else Text("paused", style="grey50")
    return Text(f"{g.group_rank}/{g.group_size} wave {g.wave} ") + state + Text(f" dummy {dummy:.0%}")


def _tokens(w: dispatch_pb2.WorkerLoadEntry) -> int:
    return w.reported.running_tokens + w.reported.waiting_tokens + w.inflight_tokens


class StreamLost(Exception):
    """A dispatcher's WatchLoad stream failed or ended: the message names the dispatcher and why."""


async def watch(dispatchers: dict[str, str], interval_ms: int, once: bool = False) -> None:
    """Show one table per dispatcher, refreshed on every snapshot; `once` prints a single frame.
    StreamLost when a dispatcher cannot be reached or its stream ends."""
    latest: dict[str, dispatch_pb2.WatchLoadResponse] = {}
    channels = {label: open_channel(address) for label, address in dispatchers.items()}
    updated = asyncio.Event()

    async def follow(label: str) -> None:
        stub = dispatch_pb2_grpc.DispatchStub(channels[label])
        where = f"{label} dispatcher {dispatchers[label]}"
        try:
            async for snapshot in stub.WatchLoad(dispatch_pb2.WatchLoadRequest(interval_ms=interval_ms)):
                latest[label] = snapshot
                updated.set()
        except grpc.aio.AioRpcError as err:
            raise StreamLost(f"{where}: {err.code().name}: {err.details()}") from None
        # a stream that ends without an error would leave the screen frozen (or --once waiting forever)
        raise StreamLost(f"{where} ended its load stream (it stopped?)")

    tasks = [asyncio.create_task(follow(label)) for label in dispatchers]
    try:
        if once:
            while len(latest) < len(dispatchers):
                await _next(updated, tasks)
            from rich.console import Console

            Console(width=160).print(Group(*(render(label, latest[label]) for label in dispatchers)))
            return
        quit_asked = asyncio.Event()

        def on_keys(typed: str) -> None:
            if QUIT_KEYS & set(typed):
                quit_asked.set()

        with (
            keypresses(on_keys),
            Live(Group(Text("waiting for the first snapshot ..."), HINT), refresh_per_second=10) as live,
        ):
            while await _next(updated, tasks, quit_asked):
                live.update(Group(*(render(label, snap) for label, snap in latest.items()), HINT))
    finally:
        for task in tasks:
            task.cancel()
        for channel in channels.values():
            await channel.close()


async def _next(updated: asyncio.Event, tasks: list[asyncio.Task], quit_asked: asyncio.Event | None = None) -> bool:
    """Wait for a new snapshot (True) or for quit (False); a broken stream raises."""
    waiters = [asyncio.create_task(updated.wait())]
    if quit_asked is not None:
        waiters.append(asyncio.create_task(quit_asked.wait()))
    try:
        done, _ = await asyncio.wait([*waiters, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    for task in tasks:
        if task in done:
            task.result()  # a broken stream raises here
    updated.clear()
    return quit_asked is None or not quit_asked.is_set()


@contextlib.contextmanager
def keypresses(on_keys: Callable[[str], None]) -> Iterator[None]:
    """Deliver what is typed on a terminal's stdin to `on_keys`, key by key (cbreak mode: no Enter
    needed, Ctrl-C still interrupts); the terminal's settings are restored on exit. Nothing happens
    when stdin is not a terminal."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()
    tty.setcbreak(fd)
    loop.add_reader(fd, lambda: on_keys(os.read(fd, 64).decode(errors="replace")))
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
