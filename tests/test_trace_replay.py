"""The trace replay's goodput: the highest load of a ladder at which >= 99% of requests met their
TTFT SLO, every lower rung meeting it too; ratios to round robin of the same seed."""

from __future__ import annotations

from bench.trace_replay import goodput, goodput_report


def rows(method: str, seed: int, attainment: list[float], loads=(0.2, 0.4, 0.6)) -> list[dict]:
    return [
        {"method": method, "seed": seed, "load": x, "all": {"slo_attainment": a}}
        for x, a in zip(loads, attainment, strict=True)
    ]


def test_goodput_is_the_top_of_the_ladder_met_from_the_bottom():
    runs = rows("a", 1, [1.0, 0.995, 0.98]) + rows("b", 1, [0.98, 1.0, 1.0]) + rows("c", 1, [1.0, 1.0, 0.99])
    assert goodput(runs, "a", 1) == 0.4
    assert goodput(runs, "b", 1) == 0.0, "a lucky upper rung does not count when a lower one missed"
    assert goodput(runs, "c", 1) == 0.6
    assert goodput(runs, "a", 2) is None


def test_goodput_report_gives_rates_and_ratios_to_round_robin_per_seed():
    runs = (
        rows("round_robin", 1, [1.0, 0.98, 0.9])
        + rows("round_robin", 2, [1.0, 1.0, 0.9])
        + rows("fast", 1, [1.0, 1.0, 0.995])
        + rows("fast", 2, [1.0, 1.0, 0.95])
    )
    table = goodput_report(runs, capacity=10.0).splitlines()
    fast = next(line for line in table if line.startswith("| fast "))
    assert "| 6.0, 4.0 |" in fast and "2.00 (1.00-3.00)" in fast
