"""Whether the cluster behind a gateway can serve a request now, role by role (its /health).

A role can serve when one of its dispatchers answers (its WatchLoad stream, which the dashboard
follows, is up) and lists a live worker; PD mode also needs a bootstrap server that answers its
gRPC health check. What is missing is named, so an operator (or a router that polls /health before
it sends traffic) knows what to fix.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdlb.common.bootstrap_locator import BootstrapLocator
from pdlb.services.gateway.dashboard import Dashboard
from pdlb.services.gateway.upstreams import Upstreams
from pdlb.v1 import dispatch_pb2

BOOTSTRAP_CHECK_TIMEOUT_S = 1.0
BOOTSTRAP_CHECK_TTL_S = 1.0  # health probes share one bootstrap check per second


@dataclass
class Verdict:
    """ready: every role the mode needs can serve; missing: what is not there, in words; roles:
    per role, the dispatchers known and answering and the live workers they list."""

    ready: bool
    mode: str | None
    missing: list[str] = field(default_factory=list)
    roles: dict[str, dict] = field(default_factory=dict)
    bootstrap: dict | None = None


class Readiness:
    def __init__(self, upstreams: Upstreams, dashboard: Dashboard, bootstrap: BootstrapLocator) -> None:
        self.upstreams, self.dashboard, self.bootstrap = upstreams, dashboard, bootstrap
        self._bootstrap_checked: tuple[float, str, str | None] | None = None  # (when, address, problem)
        self._bootstrap_lock = asyncio.Lock()

    async def verdict(self) -> Verdict:
        mode = self.upstreams.mode()
        if mode is None:
            return Verdict(False, None, ["no dispatchers known: a mixed one, or a prefill and a decode one"])
        verdict = Verdict(True, mode)
        for role in ("mixed",) if mode == "mixed" else ("prefill", "decode"):
            known = self.upstreams.addresses(role)
            answering = [a for a in known if a in self.dashboard.latest]
            live = {
                (row.worker.dp_rank, row.worker.worker_id)
                for address in answering
                for row in self.dashboard.latest[address][1].workers
                if row.state == dispatch_pb2.MEMBER_STATE_LIVE
            }
            ranks = sorted({rank for rank, _ in live})
            verdict.roles[role] = {"dispatchers": len(known), "answering": len(answering), "live_ranks": ranks}
            if not answering:
                verdict.missing.append(f"no {role} dispatcher answers ({len(known)} known)")
            elif not live:
                verdict.missing.append(f"no live {role} worker")
        if mode == "pd":
            address, problem = await self._check_bootstrap()
            verdict.bootstrap = {"address": address or None, "serving": problem is None}
            if problem is not None:
                verdict.missing.append(problem)
        verdict.ready = not verdict.missing
        return verdict

    async def _check_bootstrap(self) -> tuple[str, str | None]:
        async with self._bootstrap_lock:
            address = self.bootstrap.address
            cached = self._bootstrap_checked
            if cached and cached[1] == address and time.monotonic() - cached[0] < BOOTSTRAP_CHECK_TTL_S:
                return address, cached[2]
            problem = await self._probe_bootstrap(address)
            self._bootstrap_checked = (time.monotonic(), address, problem)
            return address, problem

    async def _probe_bootstrap(self, address: str) -> str | None:
        channel = self.bootstrap.channel()
        if channel is None:
            return "no bootstrap server known (PD needs one: --bootstrap, or one registered in etcd)"
        health = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=BOOTSTRAP_CHECK_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return f"the bootstrap server at {address} does not answer ({err.code().name})"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"the bootstrap server at {address} is not serving"
        return None
