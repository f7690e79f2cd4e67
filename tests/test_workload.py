"""The benchmark workload generator (pure logic): determinism and the shared/unique mix."""

from __future__ import annotations

from pdlb.workload import WorkloadSpec, generate


def test_same_seed_same_workload_and_old_specs_unchanged_by_the_mix_option():
    spec = WorkloadSpec(num_requests=50, prefix_groups=4, prefix_len=32, seed=3)
    assert generate(spec) == generate(spec)
    # a spec without the mix draws exactly as before: every request is in a group
    assert all(item.group >= 0 for item in generate(spec))


def test_shared_fraction_mixes_grouped_and_unique_prompts():
    spec = WorkloadSpec(num_requests=400, prefix_groups=4, prefix_len=32, shared_fraction=0.5, seed=5)
    items = generate(spec)
    grouped = [i for i in items if i.group >= 0]
    assert 150 < len(grouped) < 250  # about half, drawn per request
    prefixes = {tuple(i.input_ids[:32]) for i in grouped}
    assert len(prefixes) == 4  # grouped prompts start with their group's prefix
    unique = [i for i in items if i.group < 0]
    assert not any(tuple(i.input_ids[:32]) in prefixes for i in unique)


def test_percentile_fields_name_each_column_as_the_results_rows_do():
    from pdlb.workload import percentile_fields

    values = [0.010, 0.020, 0.030, 0.040]
    assert percentile_fields("ttft", values, unit="ms", scale=1000) == {"ttft_p50_ms": 20.0, "ttft_p99_ms": 40.0}
    assert percentile_fields("itl", values) == {"itl_p50": 0.020, "itl_p99": 0.040}
    assert percentile_fields("e2e", values, (50, 90), unit="s") == {"e2e_p50_s": 0.020, "e2e_p90_s": 0.040}
    assert all(v != v for v in percentile_fields("ttft", []).values())  # NaN: nothing measured
