"""One DP rank's load and prefix-cache counters, read from a vLLM server's Prometheus /metrics.

vLLM labels its per-engine series `engine="<dp rank>"` (one label value per engine core of the
server). Its gauges refresh once per engine step, which takes seconds on a CPU, so these numbers
lag; the engine merges them with its own exact in-flight counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_QUERIES = "vllm:prefix_cache_queries"  # counters: the parser drops the _total suffix
PREFIX_HITS = "vllm:prefix_cache_hits"
CACHE_CONFIG = "vllm:cache_config_info"


@dataclass(frozen=True)
class RankStats:
    """A rank's series at one scrape; missing series read 0."""

    running: int = 0  # requests in the running batch
    waiting: int = 0  # requests queued for admission
    kv_usage: float = 0.0  # fraction of KV cache blocks in use, 0..1
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache (counter)
    prefix_hit_tokens: int = 0  # of those, tokens found cached (counter)
    kv_capacity_tokens: int = 0  # KV cache blocks x block size (from cache_config_info), 0 if not shown


def parse_rank(text: str, engine: str) -> RankStats:
    """The series of engine label `engine` in a /metrics exposition `text`.

    Raises ValueError for text that is not Prometheus exposition format."""
    values: dict[str, float] = {}
    capacity = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("engine") != engine:
                continue
            if family.name == CACHE_CONFIG:
                blocks = sample.labels.get("num_gpu_blocks") or "0"
                block_size = sample.labels.get("block_size") or "0"
                if blocks.isdigit() and block_size.isdigit():
                    capacity = int(blocks) * int(block_size)
            elif sample.name in (RUNNING, WAITING, KV_USAGE) or sample.name in (
                PREFIX_QUERIES + "_total",
                PREFIX_HITS + "_total",
            ):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return RankStats(
        running=int(values.get(RUNNING, 0)),
        waiting=int(values.get(WAITING, 0)),
        kv_usage=values.get(KV_USAGE, 0.0),
        prefix_queried_tokens=int(values.get(PREFIX_QUERIES + "_total", 0)),
        prefix_hit_tokens=int(values.get(PREFIX_HITS + "_total", 0)),
        kv_capacity_tokens=capacity,
    )
