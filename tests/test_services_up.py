"""Each service started from its console script: health, reflection, and a real round trip."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdlb.common.membership import connect_client
from pdlb.v1 import (
    bootstrap_pb2,
    bootstrap_pb2_grpc,
    dispatch_pb2,
    dispatch_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.helpers import request


def _services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        return {s.name for reply in replies for s in reply.list_services_response.service}


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )


@pytest.mark.parametrize(
    ("kind", "services"),
    [
        ("dispatcher", {"pdlb.v1.Dispatch", "pdlb.v1.LoadReport"}),
        ("bootstrap", {"pdlb.v1.Bootstrap"}),
        ("scheduler", {"pdlb.v1.Scheduler"}),
    ],
)
def test_health_and_reflection(start_service, kind, services):
    proc = start_service(kind)
    listed = _services(proc.address)
    assert services | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
    for name in ["", *services]:
        assert _health(proc.address, name) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(proc.address) as channel, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_bootstrap_round_trip(start_service):
    proc = start_service("bootstrap")
    with grpc.insecure_channel(proc.address) as channel:
        stub = bootstrap_pb2_grpc.BootstrapStub(channel)
        record = bootstrap_pb2.RoomRecord(
            bootstrap_room=42, prefill_dp_rank=3, prefill_worker_id="p3", prefill_address="127.0.0.1:1"
        )
        created = stub.RegisterRoom(bootstrap_pb2.RegisterRoomRequest(record=record), timeout=5)
        assert created.created
        found = stub.LookupRoom(bootstrap_pb2.LookupRoomRequest(bootstrap_room=42), timeout=5)
        assert (found.record.prefill_dp_rank, found.record.prefill_worker_id) == (3, "p3")
        with pytest.raises(grpc.RpcError) as err:
            stub.LookupRoom(bootstrap_pb2.LookupRoomRequest(bootstrap_room=43), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_scheduler_round_trip(start_service):
    proc = start_service("scheduler", "--max-total-tokens", "256")
    with grpc.insecure_channel(proc.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        chunks = list(
            stub.Generate(
                scheduler_pb2.SchedulerGenerateRequest(request=request("r1", "hi", max_new_tokens=5)), timeout=30
            )
        )
        tokens = [t for c in chunks for t in c.token_ids]
        assert len(tokens) == 5 and chunks[-1].finish_reason == 1  # FINISH_REASON_LENGTH
        load = stub.GetLoad(scheduler_pb2.GetLoadRequest(), timeout=5)
        assert load.load.kv_tokens_capacity == 256 and load.load.running_requests == 0


async def test_dispatcher_with_etcd_routes_to_registered_scheduler(etcd, prefix, start_service):
    dispatcher = start_service("dispatcher", "--etcd", etcd.endpoint, "--etcd-prefix", prefix)
    scheduler = start_service("scheduler", "--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--dp-rank", "0")
    async with grpc.aio.insecure_channel(dispatcher.address) as channel:
        stub = dispatch_pb2_grpc.DispatchStub(channel)
        from tests.helpers import wait_until

        async def one_worker():
            return len((await stub.ListWorkers(dispatch_pb2.ListWorkersRequest(), timeout=5)).workers) == 1

        await wait_until(one_worker, what="the scheduler to appear through etcd")
        routed = await stub.Route(dispatch_pb2.RouteRequest(request=request("x", "hello")), timeout=5)
        assert routed.worker.address == scheduler.address and routed.dispatch_seq == 1
    client = connect_client(etcd.endpoint)
    keys = [kv.key.decode() for kv in await client.get_prefix(prefix.encode())]
    assert any("/workers/mixed/" in k for k in keys) and any("/dispatchers/mixed/" in k for k in keys)
    # SIGTERM: the scheduler drains, deregisters (its key is gone at once, not after the TTL), exits 0.
    assert scheduler.terminate() == 0
    keys = [kv.key.decode() for kv in await client.get_prefix(prefix.encode())]
    assert not any("/workers/" in k for k in keys)
    await client.close()


# Messages whose field 1 is a message whose string field (1, or 3: RoomRecord.prefill_worker_id)
# is not UTF-8, and bytes that are no protobuf at all.
NOT_UTF8 = b"\x0a\x03\x0a\x01\xff"
NOT_UTF8_RECORD = b"\x0a\x03\x1a\x01\xff"
CORRUPT = b"\xff\xff\xff\xff"


@pytest.mark.parametrize(
    ("kind", "method", "shape"),
    [
        ("dispatcher", "/pdlb.v1.Dispatch/Route", "unary"),
        ("dispatcher", "/pdlb.v1.Dispatch/Generate", "server stream"),
        ("dispatcher", "/pdlb.v1.LoadReport/Report", "bidi stream"),
        ("bootstrap", "/pdlb.v1.Bootstrap/RegisterRoom", "unary"),
        ("gateway", "/pdlb.v1.Gateway/Generate", "server stream"),
    ],
)
async def test_a_request_that_does_not_parse_is_invalid_argument(start_service, kind, method, shape):
    """Bytes that are not the RPC's message (a string that is not UTF-8, a corrupt wire format)
    were gRPC's UNKNOWN "Unexpected <class DecodeError>" with a traceback in the server's log; every
    server now answers INVALID_ARGUMENT naming the method and protobuf's reason, and serves on."""
    proc = start_service(kind)
    async with grpc.aio.insecure_channel(proc.address) as channel:
        raw = {"serializer": lambda b: b, "deserializer": lambda b: b}
        not_utf8 = NOT_UTF8_RECORD if kind == "bootstrap" else NOT_UTF8
        for sent, reason in ((not_utf8, "bad UTF-8"), (CORRUPT, "corrupt")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                if shape == "unary":
                    await channel.unary_unary(method, raw["serializer"], raw["deserializer"])(sent, timeout=10)
                elif shape == "server stream":
                    call = channel.unary_stream(method, raw["serializer"], raw["deserializer"])(sent, timeout=10)
                    [_ async for _ in call]
                else:
                    call = channel.stream_stream(method, raw["serializer"], raw["deserializer"])(
                        iter([sent]), timeout=10
                    )
                    [_ async for _ in call]
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
            details = refused.value.details()
            assert details.startswith(f"{method}: the request is not a valid message of this RPC"), details
            assert reason in details, details
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in proc.log_path.read_text()
