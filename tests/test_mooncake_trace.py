"""The Mooncake trace replay: scaling, shared prefixes and the best-case cache hit per request."""

from __future__ import annotations

import json

import pytest

from bench.mooncake_trace import TraceScaling, load

ROWS = [
    {"timestamp": 1000, "input_length": 1200, "output_length": 160, "hash_ids": [0, 1, 2]},
    {"timestamp": 1500, "input_length": 1500, "output_length": 32, "hash_ids": [0, 1, 3]},
    {"timestamp": 3000, "input_length": 600, "output_length": 8, "hash_ids": [4, 5]},
    {"timestamp": 4000, "input_length": 2048, "output_length": 16, "hash_ids": [0, 1, 3, 6]},
]


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_lengths_blocks_and_time_are_scaled(trace):
    items, _ = load(trace, TraceScaling(num_requests=4, length_divisor=16, speedup=2.0))
    assert [len(i.input_ids) for i in items] == [75, 93, 37, 128]
    assert [i.max_new_tokens for i in items] == [10, 2, 1, 1]
    assert [i.arrival_s for i in items] == [0.0, 0.25, 1.0, 1.5]


def test_shared_leading_blocks_are_shared_tokens_and_bound_the_cache_hit(trace):
    items, reusable = load(trace, TraceScaling(num_requests=4, length_divisor=16))
    block = 512 // 16
    assert items[0].input_ids[: 2 * block] == items[1].input_ids[: 2 * block]  # blocks 0, 1
    assert items[0].input_ids[2 * block :] != items[1].input_ids[2 * block : 3 * block]  # 2 vs 3
    assert items[3].input_ids[:93] == items[1].input_ids  # blocks 0, 1, 3 (the second was cut short)
    assert reusable == [0, 2 * block, 0, 93]  # the earlier prompt held 93 tokens of blocks 0, 1, 3


def test_window_and_missing_file(trace, tmp_path):
    items, reusable = load(trace, TraceScaling(start=2, num_requests=5))
    assert len(items) == 2 and items[0].arrival_s == 0.0 and reusable == [0, 0]
    with pytest.raises(FileNotFoundError, match="not there"):
        load(tmp_path / "absent.jsonl", TraceScaling())
