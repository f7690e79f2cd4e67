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
# histograms whose _sum and _count give the rates predicted_latency needs
ITL = "vllm:inter_token_latency_seconds"  # one sample per decode step of a request: the step time
PREFILL_TIME = "vllm:request_prefill_time_seconds"  # per request: scheduled to first token
PREFILL_COMPUTED = "vllm:request_prefill_kv_computed_tokens"  # per request: prompt tokens computed (not cached)
GENERATED = "vllm:request_generation_tokens"  # per finished request: output tokens
SUMMED = (ITL, PREFILL_TIME, PREFILL_COMPUTED, GENERATED)
WANTED = frozenset(
    [RUNNING, WAITING, KV_USAGE, PREFIX_QUERIES + "_total", PREFIX_HITS + "_total"]
    + [name + suffix for name in SUMMED for suffix in ("_sum", "_count")]
)


@dataclass(frozen=True)
class RankStats:
    """A rank's series at one scrape; missing series read 0."""

    running: int = 0  # requests in the running batch
    waiting: int = 0  # requests queued for admission
    kv_usage: float = 0.0  # fraction of KV cache blocks in use, 0..1
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache (counter)
    prefix_hit_tokens: int = 0  # of those, tokens found cached (counter)
    kv_capacity_tokens: int = 0  # KV cache blocks x block size (from cache_config_info), 0 if not shown
    # cumulative histogram sums and counts (seconds or tokens; counts in samples)
    itl_sum_s: float = 0.0
    itl_count: int = 0
    prefill_sum_s: float = 0.0
    prefill_computed_tokens: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0


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
            elif sample.name in WANTED:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return RankStats(
        running=int(values.get(RUNNING, 0)),
        waiting=int(values.get(WAITING, 0)),
        kv_usage=values.get(KV_USAGE, 0.0),
        prefix_queried_tokens=int(values.get(PREFIX_QUERIES + "_total", 0)),
        prefix_hit_tokens=int(values.get(PREFIX_HITS + "_total", 0)),
        kv_capacity_tokens=capacity,
        itl_sum_s=values.get(ITL + "_sum", 0.0),
        itl_count=int(values.get(ITL + "_count", 0)),
        prefill_sum_s=values.get(PREFILL_TIME + "_sum", 0.0),
        prefill_computed_tokens=int(values.get(PREFILL_COMPUTED + "_sum", 0)),
        generated_tokens=int(values.get(GENERATED + "_sum", 0)),
        finished_requests=int(values.get(GENERATED + "_count", 0)),
    )


EWMA_WEIGHT = 0.2  # of the newest scrape's rate


@dataclass
class RankRates:
    """Rates between scrapes, as moving averages (0 until measured): what predicted_latency uses."""

    step_s: float = 0.0  # decode step time (mean inter-token latency)
    prefill_tokens_per_s: float = 0.0  # prompt tokens computed per second of prefill
    mean_output_tokens: float = 0.0  # output tokens of finished requests

    def update(self, before: RankStats, after: RankStats) -> None:
        """Fold in the deltas between two scrapes (a restarted server's counters go back: skipped)."""

        def fold(average: float, sample: float) -> float:
            return sample if average <= 0 else average + EWMA_WEIGHT * (sample - average)

        steps = after.itl_count - before.itl_count
        if steps > 0:
            self.step_s = fold(self.step_s, (after.itl_sum_s - before.itl_sum_s) / steps)
        seconds = after.prefill_sum_s - before.prefill_sum_s
        tokens = after.prefill_computed_tokens - before.prefill_computed_tokens
        if seconds > 0 and tokens > 0:
            self.prefill_tokens_per_s = fold(self.prefill_tokens_per_s, tokens / seconds)
        finished = after.finished_requests - before.finished_requests
        if finished > 0:
            self.mean_output_tokens = fold(
                self.mean_output_tokens, (after.generated_tokens - before.generated_tokens) / finished
            )
