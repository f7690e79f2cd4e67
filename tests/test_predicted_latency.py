"""The predicted-latency method and the new peer baselines: their formulas on hand-built load
tables, and the prediction against TTFTs measured at a client of real sim workers."""

from __future__ import annotations

import asyncio
import statistics
import time

from pdlb.services.dispatcher.load_table import LoadTable, ReportedLoad, Role, Worker
from pdlb.services.dispatcher.policies import PolicyOptions, RouteContext, create_policy
from pdlb.v1 import common_pb2, dispatch_pb2
from tests.helpers import dispatch_stub, load_snapshot, wait_for_workers


def table(loads: list[ReportedLoad]) -> LoadTable:
    t = LoadTable()
    for rank, load in enumerate(loads):
        t.upsert(Worker(f"w{rank}", Role.MIXED, rank, f"127.0.0.1:{5000 + rank}"))
        t.apply_report(f"w{rank}", load, 0)
    return t


def measured(**kw) -> ReportedLoad:
    base = dict(
        kv_tokens_capacity=100_000, max_running_requests=8, prefill_tokens_per_s=1000.0, step_ms=10.0,
        mean_output_tokens=50.0,
    )  # fmt: skip
    return ReportedLoad(**{**base, **kw})


def test_prediction_is_queued_work_plus_slot_wait_plus_own_prefill():
    t = table([measured(running_requests=8, waiting_requests=2, waiting_tokens=2000)])
    policy = create_policy("predicted_latency", Role.MIXED, PolicyOptions())
    entry = t.candidates()[0]
    # 3 requests would queue for a slot (2 waiting + this one, none free): 3 * 50 * 0.01 / 8 s;
    # half of the running step (10 ms); 2000 queued prompt tokens and its own 100 at 1000 tokens/s
    slot, rest = 3 * 50 * 0.01 / 8, 0.005
    assert abs(policy.predict(entry, 100) - (slot + rest + 2.0 + 0.1)) < 1e-9
    assert abs(policy.predict(entry, 100, hit=64) - (slot + rest + 2.0 + 0.036)) < 1e-9


def test_prediction_charges_each_chunk_a_step_and_counts_prompts_still_in_prefill():
    # A running request still has 1500 prompt tokens to prefill (nothing waits): that is queued
    # work too. Steps cost 20 ms + 1 ms per 1000 tokens, 500 prefill tokens a step at most.
    load = measured(running_requests=1, prefill_pending_tokens=1500, step_base_ms=20.0, prefill_tokens_per_step=500)
    entry = table([load]).candidates()[0]
    policy = create_policy("predicted_latency", Role.MIXED, PolicyOptions())
    per_token = 1 / 1000 + 0.020 / 500
    # rest of the running step + its own final step's fixed cost + (1500 + 100) tokens
    assert abs(policy.predict(entry, 100) - (0.005 + 0.020 + 1600 * per_token)) < 1e-9
    assert entry.queued_tokens == 1500  # what cache_aware weighs too


def test_predicted_latency_prefers_the_faster_rank_not_the_emptier_one():
    # rank 0: one request queued but it prefills 10x faster than rank 1, which is idle
    t = table(
        [
            measured(running_requests=1, waiting_requests=1, waiting_tokens=500, prefill_tokens_per_s=20_000.0),
            measured(prefill_tokens_per_s=2_000.0),
        ]
    )
    policy = create_policy("predicted_latency", Role.MIXED, PolicyOptions())
    for entry in t.candidates():
        policy.on_report(entry)
    chosen = policy.select(RouteContext("r", 1000, input_ids=list(range(1000))), t.candidates())
    # half of rank 0's running step, then its queued 500 and the request's 1000 tokens
    assert chosen.dp_rank == 0 and abs(policy.last_prediction_s - (0.005 + 1500 / 20_000)) < 1e-9
    # least_wait would pick the idle rank 1
    assert (
        create_policy("least_wait", Role.MIXED, PolicyOptions()).select(RouteContext("r", 1000), t.candidates()).dp_rank
        == 1
    )


def test_without_measured_rates_it_orders_like_least_wait():
    t = table([ReportedLoad(max_running_requests=1, running_requests=1), ReportedLoad(max_running_requests=1)])
    policy = create_policy("predicted_latency", Role.MIXED, PolicyOptions())
    assert policy.select(RouteContext("r", 10), t.candidates()).dp_rank == 1 and policy.last_prediction_s is None


def test_peer_formulas():
    prompt = list(range(64))
    loads = [ReportedLoad(kv_tokens_capacity=10_000, running_requests=1, kv_tokens_used=320) for _ in range(2)]
    t = table(loads)
    request = RouteContext("a", 64, input_ids=prompt)
    for method in ("peer_dynamo_kv", "peer_sglang_lmetric", "peer_llmd"):
        policy = create_policy(method, Role.MIXED, PolicyOptions())
        first = policy.select(request, t.candidates())
        seq = t.record_dispatch(first.worker.worker_id, 64)
        policy.on_dispatch(request, first)
        t.cancel_dispatch(first.worker.worker_id, seq)  # it finished: equal loads again
        # the same prompt again: the rank that has its prefix wins
        again = policy.select(RouteContext("b", 64, input_ids=prompt), t.candidates())
        assert again is first, method
    # Dynamo's cost: prefill blocks to compute + active decode blocks (16-token blocks)
    dynamo = create_policy("peer_dynamo_kv", Role.MIXED, PolicyOptions())
    busy = table(
        [ReportedLoad(kv_tokens_capacity=10_000, kv_tokens_used=1600), ReportedLoad(kv_tokens_capacity=10_000)]
    )
    assert dynamo.select(RouteContext("c", 64, input_ids=prompt), busy.candidates()).dp_rank == 1


async def test_prediction_against_measured_ttft_on_sim_workers(etcd, prefix, start_service):
    """A mixed cluster of 4 sim ranks behind a predicted_latency dispatcher, under a stream of
    requests that queue: the prediction returned with each request is compared with the TTFT the
    client measured (median relative error, printed; bounded loosely here, the number goes to the
    docs)."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *common, "--load-balance-method", "predicted_latency")
    flags = ["--runner", "sim", "--sim-slowdown", "3", "--max-running-requests", "4", "--report-interval-ms", "50"]
    for rank in range(4):
        start_service("scheduler", *common, *flags, "--dp-rank", str(rank), name=f"sim-{rank}")
    channel, stub = dispatch_stub(dispatcher.address)
    errors: list[float] = []

    async def one(i: int) -> None:
        await asyncio.sleep(i * 0.04)
        req = common_pb2.InferenceRequest(
            request_id=f"p{i}",
            input_ids=[(i * 7 + j) % 250 + 1 for j in range(100 + (i % 5) * 150)],
            sampling=common_pb2.SamplingParams(max_new_tokens=20 + (i % 3) * 20, ignore_eos=True),
        )
        sent = time.perf_counter()
        async for chunk in stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=60):
            if chunk.token_ids:
                ttft = time.perf_counter() - sent
                if chunk.predicted_ms > 0 and i >= 20:  # after the rates are measured
                    errors.append(abs(chunk.predicted_ms / 1000 - ttft) / ttft)
                break

    try:
        await wait_for_workers(stub, 4)
        await asyncio.gather(*[one(i) for i in range(20)])  # warm-up: the workers measure their rates
        await asyncio.gather(*[one(i) for i in range(20, 100)])
        # what each worker reports is the sim's cost model: 20 us a prefill token x slowdown 3
        rates = [w.reported.prefill_tokens_per_s for w in (await load_snapshot(stub)).workers]
    finally:
        await channel.close()
    assert len(rates) == 4 and all(1 / 0.00006 * 0.65 < rate < 1 / 0.00006 * 1.35 for rate in rates), rates
    median = statistics.median(errors)
    print(f"predicted vs measured TTFT: median relative error {median:.0%} over {len(errors)} requests")
    assert len(errors) >= 60 and median < 0.6
