"""The gateway's own measurements: Prometheus metrics, and a sliding window for the dashboard."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdlb.common.requests import SHED_REASONS
from pdlb.v1 import dispatch_pb2

WINDOW_S = 30.0
RENDER_API = "render"  # vLLM's render endpoints: counted, but they generate nothing (not in the window)
API_KEY = "pdlb_api"  # where a handler notes its API on the aiohttp request, for the error middleware
MAX_SAMPLES = 50_000  # per series in the window: bounded whatever the request rate


class Timer:
    """Times one request's tokens as they arrive; `observe(first, seconds, tokens)` records them."""

    def __init__(self, observe) -> None:
        self.observe, self.started, self.last, self.count = observe, time.perf_counter(), 0.0, 0

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        self.observe(self.count == 0, now - (self.started if self.count == 0 else self.last), n)
        self.last, self.count = now, self.count + n


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pdlb_gateway_requests", "Requests finished, by API and outcome", ["api", "outcome"], registry=self.registry
        )
        self.ttft = Histogram(
            "pdlb_gateway_ttft_seconds",
            "Time to first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.itl = Histogram(
            "pdlb_gateway_itl_seconds",
            "Time between tokens",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=self.registry,
        )
        self.tokens_out = Counter("pdlb_gateway_output_tokens", "Tokens streamed to clients", registry=self.registry)
        self.retries = Counter(
            "pdlb_gateway_retries", "Requests re-run or resumed after a worker failed", registry=self.registry
        )
        self.window_ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self.window_itl: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self.window_done: deque[float] = deque(maxlen=MAX_SAMPLES)
        self.retries_total = 0

    def watch_queues(self, snapshots: Callable[[], Iterable[tuple[str, str, dispatch_pb2.WatchLoadResponse]]]) -> None:
        """Export the admission queues of the dispatchers behind this gateway (flow control), read at
        scrape time from `snapshots()`: (role, dispatcher address, latest WatchLoad snapshot) each."""
        self.registry.register(QueueCollector(snapshots))

    def retried(self) -> None:
        self.retries.inc()
        self.retries_total += 1

    def timer(self) -> Timer:
        return Timer(self.observe)

    def observe(self, first: bool, seconds: float, tokens: int) -> None:
        now = time.monotonic()
        self.tokens_out.inc(tokens)
        if first:
            self.ttft.observe(seconds)
            self.window_ttft.append((now, seconds))
        else:
            per_token = seconds / tokens
            self.itl.observe(per_token)
            self.window_itl.append((now, per_token))

    def done(self, api: str, outcome: str) -> None:
        self.requests.labels(api, outcome).inc()
        if api != RENDER_API:
            self.window_done.append(time.monotonic())

    def window(self) -> dict:
        """Request rate and TTFT / ITL percentiles over the last WINDOW_S seconds."""
        cutoff = time.monotonic() - WINDOW_S
        for series in (self.window_ttft, self.window_itl):
            while series and series[0][0] < cutoff:
                series.popleft()
        while self.window_done and self.window_done[0] < cutoff:
            self.window_done.popleft()
        return {
            "window_s": WINDOW_S,
            "requests_per_s": len(self.window_done) / WINDOW_S,
            "ttft_ms": _percentiles([v for _, v in self.window_ttft]),
            "itl_ms": _percentiles([v for _, v in self.window_itl]),
            "retries": self.retries_total,
        }

    async def http(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class QueueCollector(Collector):
    """The dispatchers' admission queues as the gateway last received them over WatchLoad (one
    report interval old at most), labelled by role and dispatcher; dispatchers without
    --flow-control are left out. The same numbers as each dispatcher's own --metrics-port, here
    where users scrape."""

    def __init__(self, snapshots: Callable[[], Iterable[tuple[str, str, dispatch_pb2.WatchLoadResponse]]]) -> None:
        self.snapshots = snapshots

    def collect(self):
        labels = ["role", "dispatcher"]
        families = {
            "requests": GaugeMetricFamily(
                "pdlb_gateway_queue_requests", "Requests held in a dispatcher's admission queue", labels=labels
            ),
            "tokens": GaugeMetricFamily(
                "pdlb_gateway_queue_tokens", "Prompt tokens of a dispatcher's queued requests", labels=labels
            ),
            "tenants": GaugeMetricFamily(
                "pdlb_gateway_queue_tenants", "Tenants with requests in a dispatcher's queue", labels=labels
            ),
            "wait_p50": GaugeMetricFamily(
                "pdlb_gateway_queue_wait_p50_seconds",
                "Median queue wait of a dispatcher's recently bound requests (last 512)",
                labels=labels,
            ),
            "wait_p99": GaugeMetricFamily(
                "pdlb_gateway_queue_wait_p99_seconds",
                "99th percentile queue wait of a dispatcher's recently bound requests (last 512)",
                labels=labels,
            ),
            "admitted": CounterMetricFamily(
                "pdlb_gateway_queue_admitted",
                "Requests a dispatcher bound to a rank after waiting in its queue, since it started",
                labels=labels,
            ),
            "shed": CounterMetricFamily(
                "pdlb_gateway_queue_shed",
                "Requests a dispatcher's queue failed since it started, by reason: ttl, deadline, full, displaced "
                "(RESOURCE_EXHAUSTED: HTTP 429), shutdown (UNAVAILABLE: HTTP 503)",
                labels=[*labels, "reason"],
            ),
        }
        for role, address, snapshot in self.snapshots():
            flow = snapshot.flow
            if not flow.enabled:
                continue
            values = {
                "requests": flow.queued_requests,
                "tokens": flow.queued_tokens,
                "tenants": flow.tenants,
                "wait_p50": flow.wait_p50_ms / 1000,
                "wait_p99": flow.wait_p99_ms / 1000,
                "admitted": flow.admitted_total,
            }
            for key, value in values.items():
                families[key].add_metric([role, address], value)
            for reason in SHED_REASONS:  # a fixed label set, whatever a dispatcher sends
                families["shed"].add_metric([role, address, reason], flow.shed_by_reason.get(reason, 0))
        yield from families.values()


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}
