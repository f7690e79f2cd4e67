"""Live load dashboard: the dispatchers' WatchLoad streams, pushed to browsers as server-sent events.

The gateway follows WatchLoad on every dispatcher it knows (new ones are picked up, gone ones
dropped) and keeps the latest snapshot of each. Each page gets one SSE stream carrying, every
interval, the per-rank rows of every role, the cluster's request rate and TTFT / ITL percentiles
over a sliding window, the cache hit rate, and the membership events seen (joins, leaves, stale).
The page (static/dashboard.html, no external assets) only renders what arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from pathlib import Path

import grpc
from aiohttp import web

from pdlb.common.slots import Slots
from pdlb.services.gateway.openai_api import error_response
from pdlb.services.gateway.upstreams import ROLES, Upstreams
from pdlb.v1 import dispatch_pb2

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
STATE = {
    dispatch_pb2.MEMBER_STATE_LIVE: "live",
    dispatch_pb2.MEMBER_STATE_STALE: "stale",
    dispatch_pb2.MEMBER_STATE_GONE: "gone",
}
MAX_EVENTS = 200


class Dashboard:
    def __init__(self, upstreams: Upstreams, metrics, interval_ms: int, max_pages: int) -> None:
        self.upstreams, self.metrics = upstreams, metrics
        self.interval_s = max(interval_ms, 50) / 1000
        self.pages = Slots("dashboards open", max_pages, "--max-dashboards")
        self.latest: dict[str, tuple[str, dispatch_pb2.WatchLoadResponse]] = {}  # address -> (role, snapshot)
        self.events: deque[dict] = deque(maxlen=MAX_EVENTS)
        self._follows: dict[str, asyncio.Task] = {}
        self._known: dict[str, str] = {}  # worker id -> last state seen
        self._owner: dict[str, str] = {}  # worker id -> role whose snapshots list it
        self._task: asyncio.Task | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/dashboard", self.page)
        app.router.add_get("/dashboard/events", self.stream)
        app.router.add_get("/dashboard/state", self.state_json)

    def start(self) -> None:
        self._task = asyncio.create_task(self._manage(), name="dashboard")

    async def _manage(self) -> None:
        """Keep one WatchLoad follower per known dispatcher."""
        while True:
            wanted = {address: role for role in ROLES for address in self.upstreams.addresses(role)}
            for address, role in wanted.items():
                if address not in self._follows or self._follows[address].done():
                    self._follows[address] = asyncio.create_task(self._follow(address, role))
            for address in [a for a in self._follows if a not in wanted]:
                self._follows.pop(address).cancel()
                self.latest.pop(address, None)
            await asyncio.sleep(self.interval_s)  # pacing the membership check

    async def _follow(self, address: str, role: str) -> None:
        try:
            async with self.upstreams.dispatcher(address) as stub:  # the requests' channel
                request = dispatch_pb2.WatchLoadRequest(interval_ms=int(self.interval_s * 1000))
                async for snapshot in stub.WatchLoad(request):
                    self._diff(role, snapshot)
                    self.latest[address] = (role, snapshot)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as err:  # the dispatcher went, or its channel closed
            why = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.aio.AioRpcError) else str(err)
            log.info("dashboard: WatchLoad on %s ended (%s)", address, why)  # one line, not the error's repr
            self.latest.pop(address, None)

    def _diff(self, role: str, snapshot: dispatch_pb2.WatchLoadResponse) -> None:
        seen = set()
        for row in snapshot.workers:
            worker_id, state = row.worker.worker_id, STATE.get(row.state, "?")
            seen.add(worker_id)
            self._owner[worker_id] = role
            before = self._known.get(worker_id)
            if before != state:
                what = "joined" if before is None else f"is {state}"
                self._event(role, row.worker.dp_rank, worker_id, what)
                self._known[worker_id] = state
        for worker_id in [w for w in self._known if w not in seen and self._owner.get(w) == role]:
            self._event(role, -1, worker_id, "left")
            del self._known[worker_id]
        for table in (self._known, self._owner):  # bounded: forget the oldest
            for worker_id in list(table)[: max(0, len(table) - 4096)]:
                del table[worker_id]

    def _event(self, role: str, rank: int, worker_id: str, what: str) -> None:
        self.events.append({"t": time.time(), "role": role, "rank": rank, "worker": worker_id, "what": what})

    def state(self) -> dict:
        roles = []
        prompt = hits = 0
        for address, (role, snap) in sorted(self.latest.items(), key=lambda item: (ROLES.index(item[1][0]), item[0])):
            rows = []
            for w in snap.workers:
                load = w.reported
                prompt += load.prompt_tokens_total
                hits += load.cache_hit_tokens
                in_use = load.kv_tokens_used - load.kv_tokens_evictable
                group = w.dp_group if w.HasField("dp_group") else None
                rows.append(
                    {
                        "rank": w.worker.dp_rank,
                        "worker": w.worker.worker_id,
                        "state": STATE.get(w.state, "?"),
                        "running": load.running_requests,
                        "waiting": load.waiting_requests,
                        "tokens": load.running_tokens + load.waiting_tokens + w.inflight_tokens,
                        "kv_use": in_use / load.kv_tokens_capacity if load.kv_tokens_capacity else 0.0,
                        "inflight": w.inflight_requests,
                        "report_age_ms": w.report_age_ms,
                        "dispatched": w.dispatched_total,
                        "group": None
                        if group is None
                        else {"wave": group.wave, "running": group.running, "size": group.group_size},
                    }
                )
            flow = snap.flow
            queue = {
                "enabled": flow.enabled,
                "queued": flow.queued_requests,
                "queued_tokens": flow.queued_tokens,
                "tenants": flow.tenants,
                "admitted": flow.admitted_total,
                "shed": flow.shed_total,
                "wait_p50_ms": flow.wait_p50_ms,
                "wait_p99_ms": flow.wait_p99_ms,
            }
            roles.append({"role": role, "dispatcher": address, "method": snap.method, "workers": rows, "queue": queue})
        return {
            "t": time.time(),
            "mode": self.upstreams.mode(),
            "roles": roles,
            "cluster": {**self.metrics.window(), "cache_hit_rate": hits / prompt if prompt else None},
            "events": list(self.events)[-30:],
        }

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "dashboard.html")

    async def state_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if not self.pages.try_acquire():
            response = error_response(429, f"{self.pages.refusal()} at this gateway; close one, or retry later")
            response.headers["Retry-After"] = "1"  # a slot frees as soon as any page closes
            return response
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            with contextlib.suppress(ConnectionResetError):
                while True:
                    await response.write(b"data: " + json.dumps(self.state()).encode() + b"\n\n")
                    await asyncio.sleep(self.interval_s)  # pacing the pushes to the page
            return response
        finally:
            self.pages.release()

    async def close(self) -> None:
        tasks = [t for t in [self._task, *self._follows.values()] if t]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
