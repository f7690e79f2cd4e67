"""The batching engine in-process with the real torch model (no fakes): invariants and numerics."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from pdlb.engines.request import AdmissionError, EngineLimits, SamplingConfig, Sequence
from pdlb.engines.torch.batching import Engine
from pdlb.engines.torch.model import ModelConfig, TinyTransformer
from pdlb.engines.torch.runners import SimRunner, TorchRunner
from pdlb.v1 import common_pb2

CONFIG = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, max_position=512, seed=7)


class WatchedRunner(TorchRunner):
    """The real torch runner, observed: records the peak KV use and every batch it runs."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.peak_kv = 0
        self.batches: list[int] = []
        self.computed_tokens = 0  # tokens that went through the model

    def step(self, items):
        self.peak_kv = max(self.peak_kv, self.kv_used)
        self.batches.append(len(items))
        self.computed_tokens += sum(len(item.chunk.new_tokens) for item in items)
        return super().step(items)


def make_engine(
    max_total_tokens=2048, max_running=16, chunk=64, max_waiting=64, page_size=0, burst_window_s=0.0
) -> tuple[Engine, WatchedRunner]:
    torch.set_num_threads(1)
    runner = WatchedRunner(TinyTransformer.random(CONFIG), max_total_tokens)
    limits = EngineLimits(max_total_tokens, max_running, chunk, max_waiting, 400, burst_window_s)
    engine = Engine(runner, limits, page_size=page_size)
    engine.start()
    return engine, runner


def seq(rid: str, prompt: list[int], max_new: int = 8, **kw) -> Sequence:
    return Sequence(request_id=rid, prompt=prompt, max_new_tokens=max_new, ignore_eos=True, **kw)


async def collect(s: Sequence) -> tuple[list[int], int]:
    tokens: list[int] = []
    while True:
        out = await s.outbox.get()
        tokens += out.token_ids
        if out.finish_reason:
            return tokens, out.finish_reason


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 31 + salt * 7) % 256 for i in range(n)]


async def test_same_prompt_same_tokens_alone_and_in_a_batch_with_chunked_prefill():
    engine, runner = make_engine(chunk=16)
    alone = seq("alone", prompt(50), max_new=12)
    engine.submit(alone)
    expected, reason = await collect(alone)
    assert reason == common_pb2.FINISH_REASON_LENGTH and len(expected) == 12
    batch = [seq(f"b{i}", prompt(20 + 13 * i, salt=i), max_new=12) for i in range(5)]
    twin = seq("twin", prompt(50), max_new=12)
    for s in [*batch[:2], twin, *batch[2:]]:
        engine.submit(s)
    results = await asyncio.gather(*[collect(s) for s in [*batch, twin]])
    assert results[-1][0] == expected
    assert max(runner.batches) > 1  # it really ran batched
    await engine.close()


async def test_budget_never_exceeded_and_fifo_admission():
    engine, runner = make_engine(max_total_tokens=300, max_running=8)
    order: list[str] = []
    seqs = [seq(f"r{i}", prompt(60 + 10 * (i % 3), salt=i), max_new=20) for i in range(12)]
    for s in seqs:
        engine.submit(s)

    async def track(s: Sequence) -> None:
        first = await s.outbox.get()  # first token means admitted and prefilled
        order.append(s.request_id)
        if not first.finish_reason:
            await collect(s)

    await asyncio.gather(*[track(s) for s in seqs])
    assert runner.peak_kv <= 300
    assert order == [s.request_id for s in seqs]  # FIFO: no request overtook an earlier one
    assert engine.reserved == 0 and runner.kv_used == 0  # all KV freed after finishing
    await engine.close()


async def test_abort_frees_kv_and_waiting_requests():
    engine, runner = make_engine(max_total_tokens=200, max_running=1)
    running = seq("run", prompt(30), max_new=150)
    waiting = seq("wait", prompt(10), max_new=5)
    engine.submit(running)
    engine.submit(waiting)
    await running.outbox.get()
    assert engine.load().running_requests == 1 and engine.load().waiting_requests == 1
    assert engine.abort("wait") and engine.abort("run")
    assert (await collect(waiting))[1] == common_pb2.FINISH_REASON_ABORT
    assert (await collect(running))[1] == common_pb2.FINISH_REASON_ABORT
    await asyncio.wait_for(engine._idle.wait(), 10)
    assert runner.kv_used == 0 and engine.reserved == 0 and not engine.by_id
    assert not engine.abort("run")  # unknown now
    await engine.close()


async def test_load_reflects_queue():
    engine, _ = make_engine(max_total_tokens=400, max_running=2)
    seqs = [seq(f"q{i}", prompt(40, salt=i), max_new=100) for i in range(5)]
    for s in seqs:
        engine.submit(s)
    await seqs[0].outbox.get()
    load = engine.load()
    assert (load.running_requests, load.waiting_requests) == (2, 3)
    assert load.waiting_tokens == 3 * 40 and load.running_tokens >= 2 * 40
    assert 0 < load.kv_tokens_used <= 400 and load.kv_tokens_capacity == 400
    for s in seqs:
        engine.abort(s.request_id)
    await engine.close()


@pytest.mark.parametrize(
    ("prompt_len", "max_new", "code"),
    [
        (100, 300, grpc.StatusCode.RESOURCE_EXHAUSTED),  # 400 tokens never fit the 256-token KV budget
        (401, 1, grpc.StatusCode.INVALID_ARGUMENT),  # prompt longer than --max-prompt-tokens
        (300, 300, grpc.StatusCode.INVALID_ARGUMENT),  # longer than the model's context (512)
    ],
)
async def test_requests_that_can_never_fit_are_refused_at_admission(prompt_len, max_new, code):
    engine, _ = make_engine(max_total_tokens=256)
    with pytest.raises(AdmissionError) as err:
        engine.submit(seq("big", prompt(prompt_len), max_new=max_new))
    assert err.value.code == code
    await engine.close()


async def test_out_of_vocabulary_duplicate_and_queue_full():
    engine, _ = make_engine(max_total_tokens=256, max_running=1, max_waiting=1)
    with pytest.raises(AdmissionError) as err:
        engine.submit(seq("oov", [1, 2, 999]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "999" in str(err.value)
    # a logit_bias on ids outside the vocabulary is refused, as vLLM does (it was ignored)
    biased = SamplingConfig(logit_bias=((5, 1.0), (CONFIG.vocab_size, 2.0), (10**9, -1.0)))
    with pytest.raises(AdmissionError) as err:
        engine.submit(seq("oov-bias", [1, 2], sampling=biased))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    said = f"logit_bias names token ids outside the vocabulary 0..{CONFIG.vocab_size - 1}: {CONFIG.vocab_size}, {10**9}"
    assert said in str(err.value), err.value
    engine.submit(seq("a", prompt(10), max_new=200))
    with pytest.raises(AdmissionError) as err:
        engine.submit(seq("a", prompt(10)))
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    await engine.by_id["a"].outbox.get()  # "a" is running, so "b" is the only waiter
    engine.submit(seq("b", prompt(10)))
    with pytest.raises(AdmissionError) as err:
        engine.submit(seq("c", prompt(10)))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    engine.abort("a")
    engine.abort("b")
    await engine.close()


async def test_a_bootstrap_room_has_one_owner_and_its_held_kv_is_never_replaced():
    """Prefill role: a second request with a room refused while the first is queued, running or
    holding its KV; a pull takes the first's KV intact; a late pull learns at once that it is gone."""
    engine, runner = make_engine(max_total_tokens=1024)
    first = seq("first", prompt(40), prefill_only=True, bootstrap_room=7)
    engine.submit(first)
    with pytest.raises(AdmissionError) as err:  # queued or running
        engine.submit(seq("second", prompt(40, salt=1), prefill_only=True, bootstrap_room=7))
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and "room 7" in str(err.value) and "first" in str(err.value)
    tokens, reason = await collect(first)
    assert reason == common_pb2.FINISH_REASON_PREFILL_DONE and 7 in engine.held
    with pytest.raises(AdmissionError) as err:  # its KV held for the decode half
        engine.submit(seq("second", prompt(40, salt=1), prefill_only=True, bootstrap_room=7))
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    held = await engine.wait_held(7, timeout=1)
    assert held is not None and held.request_id == "first" and held.prompt == prompt(40)
    assert held.first_token == tokens[0]
    engine.free_held(held)
    with pytest.raises(AdmissionError) as err:  # pulled: answered at once, not after a wait
        await asyncio.wait_for(engine.wait_held(7, timeout=600), 5)
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "already pulled" in str(err.value)
    assert runner.kv_used == 0 and not engine.rooms
    # Once pulled the room is free again: a new prefill may take it, and pulls wait for that one.
    again = seq("again", prompt(30, salt=2), prefill_only=True, bootstrap_room=7)
    engine.submit(again)
    waiting = asyncio.ensure_future(engine.wait_held(7, timeout=60))
    await collect(again)
    assert (await waiting).request_id == "again"
    assert await engine.wait_held(12345, timeout=0.05) is None  # never here: the wait simply runs out
    await engine.close()


async def test_a_burst_fills_free_batch_slots_and_the_queue_before_refusals():
    """Requests that arrive together, before the loop has admitted any, are refused only beyond
    free slots + queue: a worker never turns a request away while it has a free batch slot."""
    engine, _ = make_engine(max_total_tokens=2048, max_running=4, max_waiting=8)
    burst = [seq(f"b{i}", prompt(10, salt=i), max_new=5) for i in range(12)]
    for s in burst:
        engine.submit(s)  # no await in between: the engine loop has not run
    with pytest.raises(AdmissionError) as err:
        engine.submit(seq("b12", prompt(10)))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    results = await asyncio.gather(*[collect(s) for s in burst])
    assert all(len(tokens) == 5 for tokens, _ in results)
    await engine.close()


async def test_sim_runner_behind_the_same_interface():
    runner = SimRunner(CONFIG, 500)
    engine = Engine(runner, EngineLimits(500, 8, 64, 16, 400))
    engine.start()
    seqs = [seq(f"s{i}", prompt(30, salt=i), max_new=10) for i in range(4)]
    for s in seqs:
        engine.submit(s)
    results = await asyncio.gather(*[collect(s) for s in seqs])
    assert all(len(tokens) == 10 for tokens, _ in results)
    assert runner.kv_used == 0
    await engine.close()


async def test_temperature_sampling_is_reproducible_with_a_seed():
    engine, _ = make_engine()
    outs = []
    for rid in ("t1", "t2"):
        s = seq(rid, prompt(20), max_new=16, temperature=1.5, seed=5)
        engine.submit(s)
        outs.append((await collect(s))[0])
    greedy = seq("g", prompt(20), max_new=16)
    engine.submit(greedy)
    assert outs[0] == outs[1] and outs[0] != (await collect(greedy))[0]
    # resumed after 6 tokens (prompt + those tokens, seed_position 6): the same continuation
    resumed = seq("t3", prompt(20) + outs[0][:6], max_new=10, temperature=1.5, seed=5, seed_position=6)
    engine.submit(resumed)
    assert (await collect(resumed))[0] == outs[0][6:]
    await engine.close()


async def submit_one_by_one(engine: Engine, seqs: list[Sequence]) -> None:
    """Submit each request after letting the event loop run once, as a server's handlers do when a
    burst of calls reaches it: the engine's loop sees the first request before the others."""
    for s in seqs:
        engine.submit(s)
        await asyncio.sleep(0)  # one pass of the event loop, not a wait for time


@pytest.mark.parametrize("window_s", [0.0, 30.0])
async def test_an_idle_engine_takes_a_burst_arriving_one_by_one_in_one_step(window_s):
    """With the burst window, the requests of a burst start in the same first step; without it,
    the first one is stepped alone while the others arrive. Generous windows make the test
    independent of the machine's speed: the wait ends when the prompts fill the step, long before."""
    engine, runner = make_engine(chunk=4 * 30, burst_window_s=window_s)
    engine.burst_quiet_s = window_s  # no end by a quiet gap: only a full step ends the wait
    burst = [seq(f"b{i}", prompt(30, salt=i), max_new=3) for i in range(4)]
    await submit_one_by_one(engine, burst)
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in burst)), 20)
    assert all(len(tokens) == 3 for tokens, _ in results)
    assert runner.batches[0] == (4 if window_s else 1)
    await engine.close()


async def test_the_burst_window_ends_after_a_quiet_gap_and_the_lone_request_runs():
    """A lone request on an idle engine is not held for the whole window: the wait ends once no
    other request arrived for the quiet gap; the same tokens come out as without the window."""
    engine, _ = make_engine(chunk=256, burst_window_s=60.0)
    engine.burst_quiet_s = 0.01
    lone = seq("lone", prompt(40), max_new=5)
    engine.submit(lone)
    tokens, reason = await asyncio.wait_for(collect(lone), 20)  # never the 60 s window
    plain, _ = make_engine(chunk=256)
    twin = seq("twin", prompt(40), max_new=5)
    plain.submit(twin)
    assert tokens == (await collect(twin))[0] and reason == common_pb2.FINISH_REASON_LENGTH
    await engine.close()
    await plain.close()


def test_step_defaults_are_picked_by_device_and_bad_values_refused():
    """--chunked-prefill-size 0 and --burst-window-ms -1 (the defaults) mean vLLM's CPU step size and
    a 10 ms burst window for the torch model on a CPU, and GPU-sized steps without a window
    elsewhere; a value given is kept."""
    from pdlb.common.config import FlagRefused
    from pdlb.services.scheduler.main import build_parser, step_limits

    parse = build_parser().parse_args
    assert step_limits(parse([])) == (2048, 0.010)
    assert step_limits(parse(["--device", "cuda:0"])) == (512, 0.0)
    assert step_limits(parse(["--runner", "sim"])) == (512, 0.0)
    assert step_limits(parse(["--chunked-prefill-size", "256", "--burst-window-ms", "0"])) == (256, 0.0)
    assert step_limits(parse(["--device", "cuda", "--burst-window-ms", "3"])) == (512, 0.003)
    with pytest.raises(FlagRefused) as refused:
        step_limits(parse(["--chunked-prefill-size", "-5"]))
    assert refused.value.code == 2 and "--chunked-prefill-size must be >= 0" in refused.value.message
    with pytest.raises(FlagRefused) as refused:
        step_limits(parse(["--burst-window-ms", "-2"]))
    assert "--burst-window-ms must be >= 0, or -1" in refused.value.message
