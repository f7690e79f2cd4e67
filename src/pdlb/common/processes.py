"""Start pdlb services as child processes and wait until they are healthy (tests, local cluster)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdlb.common.orphan_guard import guarded
from pdlb.common.security import TLSConfig, open_sync_channel

LISTENING = re.compile(r"listening on (\S+)")


class ServiceProcess:
    """One service started from its console script; its address is read from its own banner."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: str | Path,
        env: dict[str, str] | None = None,
        tls: TLSConfig | None = None,
    ) -> None:
        self.name, self.argv, self.tls = name, argv, tls
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting. Call from the main thread: the child is told to exit
        when the thread that spawned it ends (the parent-death signal follows the thread)."""
        self.proc = subprocess.Popen(
            guarded(self.argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            text=True,
            bufsize=1,
            start_new_session=True,  # a terminal's Ctrl-C reaches the parent, which stops children in order
        )
        self._found = threading.Event()
        threading.Thread(target=self._pump, args=(self._found,), daemon=True).start()

    def wait_ready(self, timeout: float = 60.0) -> ServiceProcess:
        """Wait for the banner with the address, then for the health check to say SERVING."""
        if not self._found.wait(timeout) or not self.address:
            self.kill()
            raise RuntimeError(f"{self.name} did not start within {timeout}s; see {self.log_path}")
        wait_healthy(self.address, timeout, tls=self.tls)
        return self

    def _pump(self, found: threading.Event) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as log:
                for line in self.proc.stdout:
                    log.write(line)
                    log.flush()
                    match = LISTENING.search(line)
                    if match and not self.address:
                        self.address = match.group(1)
                        found.set()
        finally:
            found.set()  # the process ended (or its log could not be written)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: drain, deregister, exit); SIGKILL if it does not exit in time."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_healthy(address: str, timeout: float, service: str = "", tls: TLSConfig | None = None) -> None:
    """Block until the standard health check reports SERVING (waiting for the channel, not sleeping)."""
    deadline = time.monotonic() + timeout
    with open_sync_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{address} not SERVING after {timeout}s")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=remaining, wait_for_ready=True
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            time.sleep(0.05)


def script(name: str) -> list[str]:
    """argv of a service's console script: the installed one beside this interpreter, else `python -m`."""
    installed = Path(sys.executable).parent / name
    if installed.is_file() and os.access(installed, os.X_OK):
        return [str(installed)]
    module = {
        "pdlb-dispatcher": "pdlb.services.dispatcher.main",
        "pdlb-bootstrap": "pdlb.services.bootstrap.main",
        "pdlb-scheduler": "pdlb.services.scheduler.main",
        "pdlb-gateway": "pdlb.services.gateway.main",
    }[name]
    return [sys.executable, "-m", module]
