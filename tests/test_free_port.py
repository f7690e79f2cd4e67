"""Ports chosen for servers that bind later: outside the kernel's ephemeral range, never handed out
twice, and a vLLM server that finds its chosen port taken is started again on another.

The last case reproduces a CI failure: a second vLLM server's port, chosen before the first server
started, was taken by one of the first server's engine-core sockets ("Address already in use")."""

from __future__ import annotations

import socket
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import pdlb.engines.vllm.server as vllm_server
from pdlb.common.free_port import LOWEST, ephemeral_range, explicit_range, free_port
from pdlb.engines.vllm.server import VLLMServer, VLLMServerSpec


def test_the_range_lies_below_the_ephemeral_range_else_above_else_nowhere():
    assert explicit_range((32768, 60999)) == (LOWEST, 32768)
    assert explicit_range((LOWEST + 500, 60000)) == (60001, 65536)  # too little room below
    assert explicit_range((1024, 65000)) is None  # neither side has 1000 ports: the kernel chooses
    assert explicit_range(None) is None


def test_ports_are_bindable_outside_the_ephemeral_range_and_not_repeated():
    span = explicit_range(ephemeral_range())
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    if span is not None:
        assert all(span[0] <= port < span[1] for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # free when handed out


# a stand-in for vLLM's API server: binds --port like vLLM does (printing vLLM's error when it
# cannot), then answers /health
STAND_IN = textwrap.dedent(
    """
    import http.server, sys
    port = int(sys.argv[1])

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    try:
        server = http.server.HTTPServer(("127.0.0.1", port), Health)
    except OSError as error:
        print(f"OSError: {error}", flush=True)
        sys.exit(1)
    server.serve_forever()
    """
)


@dataclass
class StandInSpec(VLLMServerSpec):
    def argv(self) -> list[str]:
        return [sys.executable, "-c", STAND_IN, str(self.port)]


@pytest.fixture
def taken():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_server_whose_chosen_port_is_taken_starts_again_on_another(tmp_path: Path, taken, monkeypatch):
    chosen = iter([taken, free_port()])
    monkeypatch.setattr(vllm_server, "free_port", lambda: next(chosen))
    server = VLLMServer(StandInSpec(venv=tmp_path), tmp_path / "server.log").spawn()
    try:
        assert server.spec.port == taken
        server.wait_ready(timeout=60)
        assert server.respawns == 1 and server.spec.port != taken
        assert server.url.endswith(f":{server.spec.port}")
        assert "Address already in use" in server.log_path.read_text()
    finally:
        server.stop()


def test_a_restart_keeps_the_port_the_server_was_healthy_on(tmp_path: Path):
    server = VLLMServer(StandInSpec(venv=tmp_path), tmp_path / "server.log").spawn().wait_ready(timeout=60)
    try:
        port = server.spec.port
        server.kill()
        server.spawn().wait_ready(timeout=60)
        assert server.spec.port == port and server.respawns == 0
    finally:
        server.stop()


def test_a_port_the_caller_named_is_not_changed(tmp_path: Path, taken):
    server = VLLMServer(StandInSpec(venv=tmp_path, port=taken), tmp_path / "server.log").spawn()
    try:
        with pytest.raises(RuntimeError, match=f"on :{taken} exited"):
            server.wait_ready(timeout=60)
        assert server.respawns == 0
    finally:
        server.stop()


def test_retries_are_bounded(tmp_path: Path, taken, monkeypatch):
    monkeypatch.setattr(vllm_server, "free_port", lambda: taken)
    server = VLLMServer(StandInSpec(venv=tmp_path), tmp_path / "server.log").spawn()
    try:
        with pytest.raises(RuntimeError, match="Address already in use"):
            server.wait_ready(timeout=60)
        assert server.respawns == VLLMServer.port_retries
    finally:
        server.stop()
