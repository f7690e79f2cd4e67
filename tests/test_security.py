"""Transport security on real processes: mutual TLS between every component, and etcd over TLS
with authentication. Certificates are generated per test session (no files in the repository)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdlb.common.etcd_process import EtcdProcess, EtcdTLS
from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceFailed
from pdlb.common.security import TLSConfig, open_channel
from pdlb.v1 import dispatch_pb2, dispatch_pb2_grpc
from tests.certs import Authority
from tests.helpers import request, wait_until

SMALL = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "4", "--vocab-size", "300"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(directory, "pdlb-ca"), Authority(directory, "rogue-ca")
    return {
        "ca": ca,
        "server": ca.issue("server", "pdlb-service"),
        "client": ca.issue("client", "pdlb-client", hosts=()),
        "rogue_client": rogue.issue("rogue-client", "intruder", hosts=()),
    }


def tls_flags(pki) -> list[str]:
    pair = pki["server"]
    return ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key), "--tls-ca", str(pki["ca"].pair.cert)]


def client_tls(pki, pair_name: str | None = "client", ca: bool = True) -> TLSConfig:
    pair = pki[pair_name] if pair_name else None
    return TLSConfig.from_files(
        str(pair.cert) if pair else "", str(pair.key) if pair else "", str(pki["ca"].pair.cert) if ca else ""
    )


async def health(address: str, tls: TLSConfig | None) -> int:
    channel = open_channel(address, tls=tls) if tls else grpc.aio.insecure_channel(address)
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


async def test_mutual_tls_end_to_end_and_clients_without_a_valid_certificate_are_refused(pki, start_service):
    flags = tls_flags(pki)
    good = client_tls(pki)
    port = free_port()
    dispatcher = start_service(
        "dispatcher", *flags, "--workers", f"0@127.0.0.1:{port}", name="tls-dispatcher", tls=good
    )
    # The scheduler reports its load to the dispatcher over mutual TLS too (`--dispatchers`).
    scheduler = start_service(
        "scheduler",
        *SMALL,
        *flags,
        "--port",
        str(port),
        "--dispatchers",
        dispatcher.address,
        name="tls-sched",
        tls=good,
    )
    async with open_channel(dispatcher.address, tls=good) as channel:
        stub = dispatch_pb2_grpc.DispatchStub(channel)
        chunks = [
            c
            async for c in stub.Generate(
                dispatch_pb2.GenerateRequest(request=request("m1", "hi", max_new_tokens=12)), timeout=30
            )
        ]
        assert sum(len(c.token_ids) for c in chunks) == 12 and chunks[-1].finish_reason

        async def reported() -> bool:  # the scheduler's reports arrived: it took over the static entry
            reply = await stub.ListWorkers(dispatch_pb2.ListWorkersRequest(), timeout=5)
            return [w.worker_id[:8] for w in reply.workers] == ["mixed-0-"]

        await wait_until(reported, what="load reports over mutual TLS")

    refused = {
        "plaintext": None,
        "TLS without a client certificate": client_tls(pki, pair_name=None),
        "a certificate from another CA": client_tls(pki, pair_name="rogue_client"),
    }
    for what, tls in refused.items():
        for address in (dispatcher.address, scheduler.address):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health(address, tls)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what
    # A client that does not trust the CA refuses the server in turn.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health(dispatcher.address, client_tls(pki, ca=False))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # ... and the service is unharmed by the refused handshakes.
    assert await health(dispatcher.address, good) == health_pb2.HealthCheckResponse.SERVING


def test_tls_flags_are_checked_at_start(start_service, pki, tmp_path):
    pair = pki["server"]
    # Each refusal is reported at once with the service's own line naming the flag or file.
    with pytest.raises(
        ServiceFailed, match="exited with status 1: pdlb-bootstrap: --tls-cert and --tls-key go together"
    ):
        start_service("bootstrap", "--tls-cert", str(pair.cert), name="cert-without-key")
    with pytest.raises(ServiceFailed, match=r"exited with status 1: .*missing\.key"):
        start_service("bootstrap", "--tls-cert", str(pair.cert), "--tls-key", str(tmp_path / "missing.key"))


async def test_membership_through_etcd_with_tls_client_certificates_and_auth(pki, start_service, prefix):
    server, ca = pki["server"], str(pki["ca"].pair.cert)
    client = pki["client"]
    etcd = EtcdProcess(tls=EtcdTLS(str(server.cert), str(server.key), client_ca=ca))
    etcd.start()
    try:
        creds = {"cacert": ca, "cert": str(client.cert), "key": str(client.key)}
        etcd.etcdctl("user", "add", "root:rootpw", **creds)
        etcd.etcdctl("user", "add", "pdlb:s3cret", **creds)
        etcd.etcdctl("role", "add", "pdlb-rw", **creds)
        etcd.etcdctl("role", "grant-permission", "pdlb-rw", "--prefix=true", "readwrite", prefix, **creds)
        etcd.etcdctl("user", "grant-role", "pdlb", "pdlb-rw", **creds)
        etcd.etcdctl("auth", "enable", **creds)
        common = [
            "--etcd", etcd.endpoint, "--etcd-prefix", prefix,
            "--etcd-ca", ca, "--etcd-cert", str(client.cert), "--etcd-key", str(client.key),
            "--etcd-user", "pdlb",
        ]  # fmt: skip
        env = {"PDLB_DISPATCHER_ETCD_PASSWORD": "s3cret", "PDLB_SCHEDULER_ETCD_PASSWORD": "s3cret"}
        dispatcher = start_service("dispatcher", *common, name="etcd-tls-dispatcher", env=env)
        start_service("scheduler", *common, "--runner", "sim", name="etcd-tls-sched", env=env)
        async with grpc.aio.insecure_channel(dispatcher.address) as channel:
            stub = dispatch_pb2_grpc.DispatchStub(channel)

            async def joined() -> bool:
                reply = await stub.ListWorkers(dispatch_pb2.ListWorkersRequest(), timeout=5)
                return len(reply.workers) == 1

            await wait_until(joined, what="the worker to join through etcd over TLS with auth")
        keys = etcd.etcdctl("get", "--prefix", "--keys-only", prefix, **creds, user="root:rootpw")
        assert "/workers/" in keys
        # Wrong password: the service refuses to start rather than run without membership.
        with pytest.raises(ServiceFailed, match=r"etcd at .* refused user 'pdlb': .*authentication failed"):
            start_service(
                "scheduler", *common, "--runner", "sim", name="bad-password", env={"PDLB_SCHEDULER_ETCD_PASSWORD": "no"}
            )
    finally:
        etcd.close()
