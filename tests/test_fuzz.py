"""Property-based fuzzing of every RPC against live services.

Hypothesis builds messages with hostile field values (negative and huge ranks, empty and oversized
prompts, out-of-vocabulary and negative token ids, non-ASCII and over-long ids, NaN temperatures,
unknown enum values, duplicate request ids, absurd deadlines and wait times, huge room numbers).
Every call must end with OK or one precise status from the RPC's documented set (never UNKNOWN or
INTERNAL: an unhandled exception), within its deadline, and each service must stay healthy.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceProcess, script
from pdlb.v1 import (
    bootstrap_pb2,
    bootstrap_pb2_grpc,
    common_pb2,
    dispatch_pb2,
    dispatch_pb2_grpc,
    load_report_pb2,
    load_report_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

C = grpc.StatusCode
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
IDS = st.one_of(
    st.text(min_size=0, max_size=140),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8),
    st.sampled_from(["dup", "dup", "dup-2"]),  # the same id again and again
)
PROMPTS = st.one_of(
    st.lists(INT32, max_size=40),
    st.lists(st.integers(0, 400), max_size=600),  # some ids outside the 320-token vocabulary
    st.just([7] * 5000),  # longer than the scheduler's --max-prompt-tokens
)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ_SETTINGS = settings(SETTINGS, max_examples=60)


@st.composite
def inference_requests(draw) -> common_pb2.InferenceRequest:
    sampling = common_pb2.SamplingParams(
        max_new_tokens=draw(st.one_of(st.integers(0, 8), UINT32)),
        temperature=draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.just(0.0))),
        seed=draw(UINT64),
        stop_token_ids=draw(st.lists(INT32, max_size=4)),
        ignore_eos=draw(st.booleans()),
    )
    req = common_pb2.InferenceRequest(
        request_id=draw(IDS),
        input_ids=draw(PROMPTS),
        text=draw(st.text(max_size=50)),
        sampling=sampling,
        routing_key=draw(st.one_of(st.text(max_size=20), st.just("k" * 300))),
    )
    for name in ("prefill_dp_rank", "decode_dp_rank"):
        if draw(st.booleans()):
            setattr(req, name, draw(st.one_of(INT32, st.integers(-1, 3))))
    if draw(st.booleans()):
        req.bootstrap_room = draw(UINT64)
    return req


DEADLINES = st.one_of(st.just(None), st.floats(0.001, 0.05), st.floats(5, 10))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = Path(tmp_path_factory.mktemp("fuzz"))
    started = []

    def start(kind: str, *flags: str) -> ServiceProcess:
        proc = ServiceProcess(f"{kind}-{len(started)}", [*script(f"pdlb-{kind}"), "--port", "0", *flags], logs)
        started.append(proc.start())
        return proc

    port = free_port()
    dispatcher = start("dispatcher", "--workers", f"0@127.0.0.1:{port}", "--dp-size", "2")
    scheduler = start(
        "scheduler", "--runner", "sim", "--port", str(port), "--dispatchers", dispatcher.address,
        "--max-prompt-tokens", "4096", "--max-waiting-requests", "64",
    )  # fmt: skip
    bootstrap = start("bootstrap", "--max-rooms", "1000")
    channels = {name: grpc.insecure_channel(p.address) for name, p in
                (("scheduler", scheduler), ("bootstrap", bootstrap), ("dispatcher", dispatcher))}  # fmt: skip
    yield channels
    for channel in channels.values():
        channel.close()
    for proc in reversed(started):
        assert proc.alive(), f"{proc.name} died during fuzzing; see {proc.log_path}"
        proc.terminate()


def outcome(call, allowed: set[grpc.StatusCode]) -> grpc.StatusCode:
    """Run a call (a thunk); its status must be OK or one of `allowed` (never UNKNOWN/INTERNAL)."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            for _ in result:
                pass
    except grpc.RpcError as err:
        code = err.code()
        assert code in allowed | {C.DEADLINE_EXCEEDED}, f"{code}: {err.details()}"
        if code is not C.DEADLINE_EXCEEDED:
            assert err.details(), "an error status must say what to fix"
        return code
    return C.OK


@FUZZ_SETTINGS
@given(inference_requests(), DEADLINES)
def test_dispatch_route(cluster, req, deadline):
    stub = dispatch_pb2_grpc.DispatchStub(cluster["dispatcher"])
    code = outcome(
        lambda: stub.Route(dispatch_pb2.RouteRequest(request=req), timeout=deadline),
        {C.INVALID_ARGUMENT, C.UNAVAILABLE, C.RESOURCE_EXHAUSTED},
    )
    if code is C.OK:
        assert req.input_ids or req.text  # an empty prompt is never accepted
        assert not (req.HasField("prefill_dp_rank") and req.prefill_dp_rank < 0)


@FUZZ_SETTINGS
@given(inference_requests(), DEADLINES)
def test_dispatch_generate(cluster, req, deadline):
    stub = dispatch_pb2_grpc.DispatchStub(cluster["dispatcher"])
    req.sampling.max_new_tokens = min(req.sampling.max_new_tokens, 4) or 1 if req.sampling.max_new_tokens else 0
    code = outcome(
        lambda: stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=deadline or 10),
        {C.INVALID_ARGUMENT, C.UNAVAILABLE, C.RESOURCE_EXHAUSTED, C.ALREADY_EXISTS},
    )
    if code is C.OK:
        assert math.isfinite(req.sampling.temperature) and req.sampling.temperature >= 0


@FUZZ_SETTINGS
@given(inference_requests(), st.text(max_size=20), UINT64, DEADLINES)
def test_scheduler_generate(cluster, req, dispatcher_id, seq, deadline):
    stub = scheduler_pb2_grpc.SchedulerStub(cluster["scheduler"])
    req.sampling.max_new_tokens = min(req.sampling.max_new_tokens, 4)
    message = scheduler_pb2.SchedulerGenerateRequest(request=req, dispatcher_id=dispatcher_id, dispatch_seq=seq)
    outcome(
        lambda: stub.Generate(message, timeout=deadline or 10),
        {C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED, C.ALREADY_EXISTS, C.FAILED_PRECONDITION, C.UNAVAILABLE},
    )


@SETTINGS
@given(UINT64, INT32, st.text(max_size=200), st.text(max_size=300), st.integers(0, 2**32 - 1), DEADLINES)
def test_bootstrap_rooms(cluster, room, rank, worker_id, address, wait_ms, deadline):
    stub = bootstrap_pb2_grpc.BootstrapStub(cluster["bootstrap"])
    record = bootstrap_pb2.RoomRecord(
        bootstrap_room=room, prefill_dp_rank=rank, prefill_worker_id=worker_id, prefill_address=address
    )
    outcome(
        lambda: stub.RegisterRoom(bootstrap_pb2.RegisterRoomRequest(record=record), timeout=deadline),
        {C.INVALID_ARGUMENT, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED},
    )
    wait = min(wait_ms, 20) if wait_ms % 2 else wait_ms  # half the look-ups ask for absurd waits
    outcome(
        lambda: stub.LookupRoom(bootstrap_pb2.LookupRoomRequest(bootstrap_room=room, wait_ms=wait), timeout=0.2),
        {C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED},
    )
    endpoint = bootstrap_pb2.PrefillEndpoint(worker_id=worker_id, dp_rank=rank, address=address)
    outcome(
        lambda: stub.RegisterPrefillEndpoint(bootstrap_pb2.RegisterPrefillEndpointRequest(endpoint=endpoint)),
        {C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED},
    )


@SETTINGS
@given(st.text(max_size=200), st.integers(-5, 10), INT32, st.text(max_size=300), UINT64, st.text(max_size=40))
def test_load_reports_from_strangers(cluster, worker_id, role, rank, address, acked, incarnation):
    stub = load_report_pb2_grpc.LoadReportStub(cluster["dispatcher"])
    worker = common_pb2.WorkerInfo(worker_id=worker_id, role=role, dp_rank=rank, address=address)
    report = load_report_pb2.ReportRequest(
        worker=worker, incarnation=incarnation, acked_dispatch_seq=acked, load=common_pb2.WorkerLoad(running_requests=3)
    )
    outcome(
        lambda: stub.Report(iter([report]), timeout=2),
        {C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.PERMISSION_DENIED},
    )


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_watch_load_interval(cluster, interval_ms):
    stub = dispatch_pb2_grpc.DispatchStub(cluster["dispatcher"])
    call = stub.WatchLoad(dispatch_pb2.WatchLoadRequest(interval_ms=interval_ms), timeout=1)
    try:
        first = next(call)
        assert first.workers  # the static worker is listed
    except grpc.RpcError as err:
        assert err.code() in {C.INVALID_ARGUMENT, C.DEADLINE_EXCEEDED}, err.details()
    finally:
        call.cancel()


def test_services_stay_healthy_after_fuzzing(cluster):
    for name, channel in cluster.items():
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    stub = dispatch_pb2_grpc.DispatchStub(cluster["dispatcher"])
    sched = scheduler_pb2_grpc.SchedulerStub(cluster["scheduler"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # fuzzed requests run out (a status, polled)
        load = sched.GetLoad(scheduler_pb2.GetLoadRequest(), timeout=5).load
        if load.running_requests + load.waiting_requests == 0:
            break
        time.sleep(0.05)
    good = common_pb2.InferenceRequest(request_id="after-fuzz", text="still fine")
    good.sampling.max_new_tokens = 3
    chunks = list(stub.Generate(dispatch_pb2.GenerateRequest(request=good), timeout=30))
    assert sum(len(c.token_ids) for c in chunks) == 3
