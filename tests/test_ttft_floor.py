"""The balancing benchmark's TTFT floor (a request alone on an idle sim rank): its arithmetic, and
that real sim workers never serve a first token sooner (it is reported as a bound no placement can
beat, so it must be one)."""

from __future__ import annotations

import time

from bench.balance_bench import CHUNKED_PREFILL, ttft_floor
from pdlb.engines.torch.runners import CostModel
from pdlb.v1 import common_pb2, dispatch_pb2
from pdlb.workload import WorkItem
from tests.helpers import dispatch_stub, wait_for_workers

COST = CostModel().scaled(3)


def item(tokens: int, salt: int = 0) -> WorkItem:
    return WorkItem(0, 0.0, [(7 * i + salt) % 250 + 1 for i in range(tokens)], 4)


def test_floor_is_its_prefill_chunks_back_to_back():
    c = COST
    # 2500 tokens: chunks of 1024, 1024 and 452, each a step (fixed cost, tokens, attended context)
    chunks = ((1024, 1024), (1024, 2048), (452, 2500))  # (new tokens, context at the end)
    expected = sum(c.base_s + n * c.per_prefill_token_s + end * c.per_kv_token_s for n, end in chunks)
    assert CHUNKED_PREFILL == 1024 and abs(ttft_floor(item(2500), 0, c) - expected) < 1e-12
    # a cached prefix is skipped; a fully cached prompt still computes its last token
    assert ttft_floor(item(2500), 2048, c) < ttft_floor(item(2500), 1024, c) < expected
    assert ttft_floor(item(64), 64, c) == c.base_s + c.per_decode_seq_s + 64 * c.per_kv_token_s


async def test_sim_workers_never_beat_the_floor(etcd, prefix, start_service):
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *common)
    start_service(
        "scheduler", *common, "--runner", "sim", "--sim-slowdown", "3", "--chunked-prefill-size", str(CHUNKED_PREFILL),
        "--max-total-tokens", "8192",
    )  # fmt: skip
    channel, stub = dispatch_stub(dispatcher.address)
    try:
        await wait_for_workers(stub, 1)
        for n, tokens in enumerate((40, 700, 1500, 3000)):  # one at a time: the rank is idle for each
            work = item(tokens, salt=n)  # no prefix another one cached
            req = common_pb2.InferenceRequest(
                request_id=f"f{n}",
                input_ids=work.input_ids,
                sampling=common_pb2.SamplingParams(max_new_tokens=2, ignore_eos=True, temperature=0.0),
            )
            sent = time.perf_counter()
            ttft = None
            async for chunk in stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=30):
                if chunk.token_ids and ttft is None:
                    ttft = time.perf_counter() - sent
            floor = ttft_floor(work, 0, COST)
            assert ttft is not None and ttft >= floor, (tokens, ttft, floor)
            assert floor > 0.3 * ttft, (tokens, ttft, floor)  # not a vacuous bound: the steps are most of it
    finally:
        await channel.close()
