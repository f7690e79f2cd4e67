"""Shared fixtures: a real etcd server, and services started as real processes on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from pdlb.common.etcd_process import EtcdProcess
from pdlb.common.processes import ServiceProcess, script
from pdlb.common.security import TLSConfig


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdProcess]:
    """One real etcd for the session, on a free loopback port with a temporary data dir."""
    server = EtcdProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture
def prefix() -> str:
    """An etcd key prefix of this test's own, so tests sharing the etcd never see each other."""
    return f"/pdlb-test-{uuid.uuid4().hex[:10]}"


StartService = Callable[..., ServiceProcess]
# Services default to the packaged real model; tests of mechanics use the toy (fast on 2 cores),
# and tests of the model say --model smollm2-135m-instruct.
TOY_MODEL_ENV = {
    "PDLB_SCHEDULER_MODEL": "tiny-random",
    "PDLB_DISPATCHER_MODEL": "tiny-random",
    "PDLB_GATEWAY_MODEL": "tiny-random",
}


@pytest.fixture
def start_service(tmp_path) -> Iterator[StartService]:
    """Start `pdlb-<kind>` with flags; every process is stopped (SIGTERM, then SIGKILL) after the test."""
    started: list[ServiceProcess] = []

    def start(
        kind: str,
        *flags: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
        tls: TLSConfig | None = None,
        wait: bool = True,
    ) -> ServiceProcess:
        """`wait=False`: spawn only (call `wait_ready()`), for services that start together."""
        label = name or f"{kind}-{len(started)}"
        proc = ServiceProcess(
            label, [*script(f"pdlb-{kind}"), "--port", "0", *flags], tmp_path, {**TOY_MODEL_ENV, **(env or {})}, tls
        )
        started.append(proc)
        if not wait:
            proc.spawn()
            return proc
        return proc.start()

    yield start
    for proc in reversed(started):
        proc.terminate(timeout=15)
