"""Prometheus metrics of one dispatcher, on a registry of its own."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdlb.services.dispatcher.load_table import LoadTable


class DispatcherMetrics:
    def __init__(self, table: LoadTable) -> None:
        self.registry = CollectorRegistry()
        self.dispatches = Counter(
            "pdlb_dispatches", "Requests dispatched", ["method", "dp_rank"], registry=self.registry
        )
        self.redispatches = Counter(
            "pdlb_redispatches",
            "Requests re-dispatched after a worker failed before the first token",
            registry=self.registry,
        )
        self.failures = Counter("pdlb_request_failures", "Requests failed, by status", ["code"], registry=self.registry)
        self.stale_reports = Counter(
            "pdlb_stale_reports",
            "Load reports ignored as older than one already applied",
            registry=self.registry,
        )
        self.start_waves = Counter(
            "pdlb_start_waves",
            "StartWave messages sent to paused ranks of lockstep DP groups",
            registry=self.registry,
        )
        self.shed = Counter(
            "pdlb_queue_shed",
            "Requests the admission queue failed, by reason: ttl, deadline, full, displaced (RESOURCE_EXHAUSTED), "
            "shutdown (UNAVAILABLE)",
            ["reason"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "pdlb_queue_wait_seconds",
            "Time requests waited in the admission queue before being bound to a rank",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.worker_wait = Histogram(
            "pdlb_worker_wait_seconds",
            "Time requests waited for a worker to register while none could take them (a membership flap), "
            "served or not (--worker-wait)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.worker_waiting = Gauge(
            "pdlb_worker_waiting_requests",
            "Requests waiting now for a worker to register (--worker-wait); a dispatcher shutting down fails them",
            registry=self.registry,
        )
        self.registry.register(LoadCollector(table))
        self._dispatch_children: dict[tuple[str, int], Counter] = {}

    def count_shed(self, reason: str) -> None:
        self.shed.labels(reason).inc()

    def count_dispatch(self, method: str, dp_rank: int) -> None:
        # Resolving labels takes a lock and builds a key; keep each (method, rank) child once.
        child = self._dispatch_children.get((method, dp_rank))
        if child is None:
            child = self._dispatch_children[(method, dp_rank)] = self.dispatches.labels(method, str(dp_rank))
        child.inc()

    def watch_queue(self, depth: Callable[[], tuple[int, int, int, int, int]]) -> None:
        """Export the admission queue's (requests, prompt tokens, tenants, requests held past their
        tenant's share so far, requests bound on room lent past it so far), read at scrape time."""
        self.registry.register(QueueCollector(depth))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


class LoadCollector(Collector):
    """Reads the load table at scrape time, so the gauges are never out of date."""

    def __init__(self, table: LoadTable) -> None:
        self.table = table

    def collect(self):
        requests = GaugeMetricFamily("pdlb_rank_requests", "Effective requests per rank", labels=["dp_rank"])
        tokens = GaugeMetricFamily("pdlb_rank_tokens", "Effective tokens per rank", labels=["dp_rank"])
        inflight = GaugeMetricFamily("pdlb_rank_inflight", "Unacknowledged dispatches per rank", labels=["dp_rank"])
        kv = GaugeMetricFamily("pdlb_rank_kv_used_ratio", "KV tokens used over capacity", labels=["dp_rank"])
        age = GaugeMetricFamily("pdlb_report_age_seconds", "Seconds since the last load report", labels=["dp_rank"])
        now = self.table.clock()
        for entry in list(self.table.entries.values()):  # a copy: the scrape runs on another thread
            rank = str(entry.dp_rank)
            requests.add_metric([rank], entry.total_requests)
            tokens.add_metric([rank], entry.total_tokens)
            inflight.add_metric([rank], entry.inflight_requests)
            capacity = entry.reported.kv_tokens_capacity
            kv.add_metric([rank], entry.kv_used / capacity if capacity else 0.0)
            if entry.last_report_at is not None:
                age.add_metric([rank], now - entry.last_report_at)
        yield from (requests, tokens, inflight, kv, age)


class QueueCollector(Collector):
    def __init__(self, depth: Callable[[], tuple[int, int, int, int, int]]) -> None:
        self.depth = depth

    def collect(self):
        requests, tokens, tenants, share_held, share_lent = self.depth()
        yield GaugeMetricFamily("pdlb_queue_requests", "Requests held in the admission queue", value=requests)
        yield GaugeMetricFamily("pdlb_queue_tokens", "Prompt tokens of the queued requests", value=tokens)
        yield GaugeMetricFamily("pdlb_queue_tenants", "Tenants with queued requests", value=tenants)
        yield CounterMetricFamily(
            "pdlb_queue_share_held",
            "Requests held in the admission queue because their tenant held its share of the ranks (--tenant-share)",
            value=share_held,
        )
        yield CounterMetricFamily(
            "pdlb_queue_share_lent",
            "Requests bound past their tenant's share on room the other tenants left unused (--work-conserving)",
            value=share_lent,
        )


def wall_ms() -> int:
    return int(time.time() * 1000)
