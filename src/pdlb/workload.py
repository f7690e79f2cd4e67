"""Synthetic serving workloads (no downloads): request lengths and arrival times.

Lengths follow log-normal distributions shaped like ShareGPT conversations (median prompt ~ a few
hundred tokens, long tail), optionally mixed with a long-tail class; arrivals are Poisson or bursty;
shared-prefix groups model sessions with a long common system prompt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 200
    rate: float = 20.0  # requests per second (mean)
    arrival: str = "poisson"  # poisson | bursty | all-at-once
    burst_size: int = 16  # bursty: requests per burst (bursts are Poisson)
    input_median: int = 200
    input_sigma: float = 0.8
    output_median: int = 64
    output_sigma: float = 0.6
    long_tail_fraction: float = 0.0  # share of requests drawn 8x longer
    doc_fraction: float = 0.0  # bimodal mixes: share of document-sized prompts ...
    doc_median: int = 1500  # ... drawn around this median (the rest chat-sized, around input_median)
    max_input: int = 2048
    max_output: int = 512
    prefix_groups: int = 0  # > 0: each request is its group's shared prefix + a question
    prefix_len: int = 0
    prompts_per_group: int = 0  # > 0: exactly this many requests per group (num_requests is ignored)
    shared_fraction: float = 1.0  # with prefix groups: share of requests that use one (the rest unique)
    seed: int = 0


@dataclass(frozen=True)
class WorkItem:
    index: int
    arrival_s: float
    input_ids: list[int]
    max_new_tokens: int
    group: int = -1


def _lognormal(rng: random.Random, median: int, sigma: float, cap: int) -> int:
    return max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def arrivals(spec: WorkloadSpec, rng: random.Random) -> list[float]:
    if spec.arrival == "all-at-once" or spec.rate <= 0:
        return [0.0] * spec.num_requests
    times, now = [], 0.0
    if spec.arrival == "bursty":
        burst_rate = spec.rate / spec.burst_size
        while len(times) < spec.num_requests:
            now += rng.expovariate(burst_rate)
            times += [now] * min(spec.burst_size, spec.num_requests - len(times))
        return times
    for _ in range(spec.num_requests):
        now += rng.expovariate(spec.rate)
        times.append(now)
    return times


def generate(spec: WorkloadSpec) -> list[WorkItem]:
    """Requests in arrival order. With prefix groups, a prompt is its group's prefix followed by a
    question drawn from the input-length distribution (so max_input bounds the question)."""
    rng = random.Random(spec.seed)
    prefixes = [[rng.randrange(256) for _ in range(spec.prefix_len)] for _ in range(spec.prefix_groups)]
    groups = _group_order(spec, rng)
    if groups is not None:
        spec = replace(spec, num_requests=len(groups))
    items = []
    for index, at in enumerate(arrivals(spec, rng)):
        scale = 8 if rng.random() < spec.long_tail_fraction else 1
        document = spec.doc_fraction > 0 and rng.random() < spec.doc_fraction  # no draw: old workloads unchanged
        median = spec.doc_median if document else spec.input_median * scale
        n_in = _lognormal(rng, median, spec.input_sigma, spec.max_input)
        n_out = _lognormal(rng, spec.output_median * scale, spec.output_sigma, spec.max_output)
        group = groups[index] if groups is not None else -1
        if group >= 0 and spec.shared_fraction < 1.0 and rng.random() >= spec.shared_fraction:
            group = -1  # drawn only for mixes, so workloads without one are unchanged
        head = prefixes[group] if group >= 0 else []
        items.append(WorkItem(index, at, head + [rng.randrange(256) for _ in range(n_in)], n_out, group))
    return items


def _group_order(spec: WorkloadSpec, rng: random.Random) -> list[int] | None:
    if not spec.prefix_groups:
        return None
    if spec.prompts_per_group:
        order = [g for g in range(spec.prefix_groups) for _ in range(spec.prompts_per_group)]
        rng.shuffle(order)
        return order
    return [rng.randrange(spec.prefix_groups) for _ in range(spec.num_requests)]


def salted(items: list[WorkItem], salt: int) -> list[WorkItem]:
    """The same workload with every token id shifted by `salt` (mod 256): same lengths and times,
    but prefixes no cache has seen (so runs of one benchmark do not warm each other's caches)."""
    return [replace(item, input_ids=[(t + salt) % 256 for t in item.input_ids]) for item in items]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def percentile_fields(
    name: str, values: list[float], qs: tuple[float, ...] = (50, 99), unit: str = "", scale: float = 1.0
) -> dict[str, float]:
    """A results row's percentile columns: `{name}_p{q}_{unit}` (no unit: `{name}_p{q}`) for each q,
    the nearest-rank percentile of `values` times `scale` (e.g. 1000 for seconds shown as ms)."""
    suffix = f"_{unit}" if unit else ""
    return {f"{name}_p{q:g}{suffix}": percentile(values, q) * scale for q in qs}
