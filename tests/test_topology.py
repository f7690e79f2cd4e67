"""The multi-node testbed: compose.yaml validated offline, and the same topology run across
distinct loopback addresses (one per "host"), so what crosses hosts (advertised addresses, etcd
membership, KV pulls) is exercised for real."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml

from pdlb.client import PDLBClient
from pdlb.common.etcd_process import EtcdProcess
from pdlb.services.bootstrap.main import build_parser as bootstrap_parser
from pdlb.services.dispatcher.main import build_parser as dispatcher_parser
from pdlb.services.gateway.main import build_parser as gateway_parser
from pdlb.services.scheduler.main import build_parser as scheduler_parser
from tests.helpers import dispatch_stub, request, wait_for_workers

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {
    "pdlb-dispatcher": dispatcher_parser,
    "pdlb-bootstrap": bootstrap_parser,
    "pdlb-scheduler": scheduler_parser,
    "pdlb-gateway": gateway_parser,
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_services_parse_with_the_real_flag_parsers(compose, monkeypatch):
    services = compose["services"]
    pdlb = {name: s for name, s in services.items() if s.get("image") == "pdlb:latest"}
    assert {"bootstrap", "dispatcher-prefill", "dispatcher-decode", "gateway"} <= set(pdlb)
    roles: dict[str, set[int]] = {}
    for name, service in pdlb.items():
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, value)
        command = service["command"]
        args = PARSERS[command[0]]().parse_args(command[1:])  # exits on an unknown or malformed flag
        host, port = args.advertise_address.rsplit(":", 1)
        assert host == name and int(port) == args.port, f"{name} must advertise its own service name and port"
        assert args.host == "0.0.0.0" and args.etcd == "etcd:2379" and "etcd" in service["depends_on"]
        if command[0] == "pdlb-scheduler":
            ranks = roles.setdefault(args.disaggregation_mode, set())
            assert args.dp_rank not in ranks, f"rank {args.dp_rank} twice for {args.disaggregation_mode}"
            ranks.add(args.dp_rank)
        if command[0] == "pdlb-dispatcher":
            roles.setdefault(args.disaggregation_mode, set())
    assert set(roles) == {"prefill", "decode"} and all(roles.values())
    published = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), "a host port is published twice"


def test_prometheus_and_grafana_are_provisioned_with_metrics_that_exist(compose):
    """Every series the Grafana dashboard plots is one the gateway or the dispatchers export, and
    Prometheus scrapes exactly the metrics endpoints compose publishes."""
    from prometheus_client import generate_latest

    from pdlb.services.dispatcher.load_table import LoadTable, ReportedLoad, Role, Worker
    from pdlb.services.dispatcher.metrics import DispatcherMetrics
    from pdlb.services.gateway.metrics import GatewayMetrics

    gateway = GatewayMetrics()
    gateway.observe(True, 0.1, 1)
    gateway.observe(False, 0.1, 1)
    gateway.done("http", "200")
    gateway.retried()
    table = LoadTable()
    table.upsert(Worker("w0", Role.MIXED, 0, "127.0.0.1:1"))  # per-rank series exist once a rank reports
    table.apply_report("w0", ReportedLoad(), 0)
    dispatcher = DispatcherMetrics(table)
    dispatcher.count_dispatch("m", 0)
    dispatcher.failures.labels("UNAVAILABLE").inc()
    exported = generate_latest(gateway.registry).decode() + generate_latest(dispatcher.registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in exported.splitlines() if line and not line.startswith("#")}
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/pdlb.json").read_text())
    used = {m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"pdlb_\w+", t["expr"])}
    assert used and used <= names, f"plotted but not exported: {sorted(used - names)}"
    volumes = compose["services"]["grafana"]["volumes"] + compose["services"]["prometheus"]["volumes"]
    for volume in volumes:
        assert (ROOT / volume.split(":")[0]).exists(), volume
    scrape = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"gateway:8000", "dispatcher-prefill:9100", "dispatcher-decode:9101"}
    for service, flag in (("gateway", "--http-port=8000"), ("dispatcher-prefill", "--metrics-port=9100")):
        assert flag in compose["services"][service]["command"]
    for name, service in compose["services"].items():  # every service is health-checked, and waited for
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dep, condition in (service.get("depends_on") or {}).items():
            assert condition["condition"] == "service_healthy", f"{name} starts before {dep} is healthy"


def test_dockerfile_copies_what_exists():
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


async def test_pd_topology_across_loopback_hosts(start_service, tmp_path):
    etcd = EtcdProcess(host="127.0.0.2")
    etcd.start()
    try:
        common = ["--etcd", etcd.endpoint, "--lease-ttl", "3"]
        model = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "4"]
        start_service("bootstrap", "--host", "127.0.0.3", *common, name="host3-bootstrap")
        prefill = start_service(
            "dispatcher",
            "--host",
            "127.0.0.4",
            *common,
            "--disaggregation-mode",
            "prefill",
            "--load-balance-method",
            "total_tokens",
            name="host4-dispatcher-prefill",
        )
        decode = start_service(
            "dispatcher",
            "--host",
            "127.0.0.5",
            *common,
            "--disaggregation-mode",
            "decode",
            "--load-balance-method",
            "least_wait",
            name="host5-dispatcher-decode",
        )
        workers = [
            start_service(
                "scheduler",
                "--host",
                f"127.0.0.{6 + i}",
                *common,
                *model,
                "--disaggregation-mode",
                role,
                "--dp-rank",
                str(rank),
                name=f"host{6 + i}-{role}-{rank}",
            )
            for i, (role, rank) in enumerate([("prefill", 0), ("prefill", 1), ("decode", 0), ("decode", 1)])
        ]
        assert len({w.address.split(":")[0] for w in workers}) == 4
        for proc in (prefill, decode):
            channel, stub = dispatch_stub(proc.address)
            async with channel:
                listed = await wait_for_workers(stub, 2)
                assert all(w.address.startswith("127.0.0.") and not w.address.startswith("127.0.0.1:") for w in listed)
        client = PDLBClient(prefill=prefill.address, decode=decode.address)
        results = await asyncio.gather(
            *[_tokens(client, request(f"x{i}", f"across hosts {i}", max_new_tokens=6)) for i in range(6)]
        )
        assert all(len(tokens) == 6 for tokens in results)
        await client.close()
    finally:
        etcd.close()


async def _tokens(client: PDLBClient, req) -> list[int]:
    return [t async for chunk in client.generate(req, timeout=60) for t in chunk.token_ids]


def test_kubernetes_manifests_validate_and_wire_up():
    """deploy/k8s: valid against the Kubernetes 1.30 schemas (strict: unknown fields fail), every pdlb
    container's args accepted by the service's real flag parser, readiness from gRPC health on the
    port it serves (the gateway's: its HTTP /health, which says whether every role can serve),
    scheduler ranks from the StatefulSet pod ordinal, every address a Service."""
    import kubernetes_validate

    docs = list(yaml.safe_load_all((ROOT / "deploy/k8s/pdlb.yaml").read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    broken = {**docs[1], "spec": {**docs[1]["spec"], "replica": 2}}  # the validator does catch a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert {"etcd", "bootstrap", "dispatcher-prefill", "dispatcher-decode", "gateway"} <= services
    for workload in workloads:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if container["image"] != "pdlb:latest":
                continue
            args = PARSERS[container["args"][0]]().parse_args(container["args"][1:])
            if container["args"][0] == "pdlb-gateway":  # ready when every role can serve, not just up
                assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": args.http_port}
                assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": args.http_port}
            else:
                assert container["readinessProbe"]["grpc"]["port"] == args.port
            assert args.etcd.split(":")[0] in services
            host = args.advertise_address.split(":")[0]
            if workload["kind"] == "StatefulSet":
                assert workload["spec"]["serviceName"] in services and host.endswith(
                    "." + workload["spec"]["serviceName"]
                )
                env = {e["name"]: e for e in container["env"]}
                rank_from = env["PDLB_SCHEDULER_DP_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
                assert rank_from == "metadata.labels['apps.kubernetes.io/pod-index']"
            elif not host.startswith("$("):
                assert host in services, f"{workload['metadata']['name']} advertises {host}, which is no Service"
