"""Prometheus metrics of one scheduler, read from the engine's counters at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdlb.engines.torch.batching import Engine


class EngineCollector(Collector):
    """Plain integer reads only: the scrape runs on the HTTP thread while the loop mutates state."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        engine, cache = self.engine, self.engine.cache
        yield _counter("pdlb_scheduler_prompt_tokens", "Prompt tokens received", engine.prompt_tokens_total)
        yield _counter(
            "pdlb_scheduler_cache_hit_tokens", "Prompt tokens served from the prefix cache", engine.cache_hit_tokens
        )
        yield _counter("pdlb_scheduler_steps", "Forward passes run", engine.steps)
        yield _counter(
            "pdlb_scheduler_kv_sent_tokens", "PD: prompt tokens of KV sent to decode workers", engine.kv_sent_tokens
        )
        yield _counter("pdlb_scheduler_kv_read_seconds", "PD: time reading held KV off the device", engine.kv_read_s)
        yield _counter(
            "pdlb_scheduler_kv_received_tokens",
            "PD: prompt tokens of KV pulled from prefill workers",
            engine.kv_received_tokens,
        )
        yield _counter(
            "pdlb_scheduler_kv_receive_seconds",
            "PD: time from a pull's first message to reassembled KV",
            engine.kv_receive_s,
        )
        yield _counter("pdlb_scheduler_kv_write_seconds", "PD: time writing pulled KV into the pool", engine.kv_write_s)
        yield _gauge("pdlb_scheduler_running_requests", "Requests in the running batch", len(engine.running))
        yield _gauge("pdlb_scheduler_waiting_requests", "Requests queued for admission", len(engine.waiting))
        yield _gauge("pdlb_scheduler_kv_used_tokens", "KV slots in use (cache included)", engine.runner.kv_used)
        yield _gauge("pdlb_scheduler_kv_capacity_tokens", "KV budget in tokens", engine.limits.max_total_tokens)
        if cache is not None:
            yield _gauge("pdlb_scheduler_cache_tokens", "Tokens held by the prefix cache", cache.cached_tokens)
            yield _gauge(
                "pdlb_scheduler_cache_locked_tokens", "Prefix-cache tokens in use by requests", cache.locked_tokens
            )
            yield _counter("pdlb_scheduler_cache_evicted_tokens", "Prefix-cache tokens evicted", cache.evicted_tokens)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def serve_metrics(engine: Engine, port: int, host: str) -> int:
    """Expose /metrics over HTTP; returns the bound port."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port
