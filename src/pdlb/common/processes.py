"""Start pdlb services as child processes and wait until they are healthy (tests, local cluster)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdlb.common.orphan_guard import guarded
from pdlb.common.security import TLSConfig, open_sync_channel

LISTENING = re.compile(r"listening on (\S+)")
# A line that says why a process failed: a service's own message ("pdlb-x: ...") or an exception's.
ERROR_LINE = re.compile(r"^(pdlb-[\w-]+: .+|[\w.]*(Error|Exception|Exit)(: .*)?)$")
TAIL_LINES = 200


class ServiceFailed(RuntimeError):
    """A service exited (or never became healthy) while it was starting; the message names it, its
    exit status and its own error line."""


class ServiceProcess:
    """One service started from its console script; its address is read from its own banner.

    `on_exit` is called (from a reader thread) when the process's output ends, that is when it
    exits: a supervisor's wake-up. The last `TAIL_LINES` lines of output are kept for error reports.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: str | Path,
        env: dict[str, str] | None = None,
        tls: TLSConfig | None = None,
        on_exit: Callable[[ServiceProcess], None] | None = None,
    ) -> None:
        self.name, self.argv, self.tls, self.on_exit = name, argv, tls, on_exit
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._found = threading.Event()
        self._ended = threading.Event()

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting. Call from the main thread: the child is told to exit
        when the thread that spawned it ends (the parent-death signal follows the thread)."""
        self.address = ""
        self.tail.clear()
        self.proc = subprocess.Popen(
            guarded(self.argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            text=True,
            bufsize=1,
            start_new_session=True,  # a terminal's Ctrl-C reaches the parent, which stops children in order
        )
        self._found, self._ended = threading.Event(), threading.Event()
        threading.Thread(target=self._pump, args=(self.proc, self._found, self._ended), daemon=True).start()

    def announced(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the banner with the address, or for the process to end."""
        return self._found.wait(timeout)

    def wait_ready(self, timeout: float = 60.0) -> ServiceProcess:
        """Wait for the banner with the address, then for the health check to say SERVING. Raises
        ServiceFailed at once if the process exits meanwhile, with its own error line."""
        deadline = time.monotonic() + timeout
        if not self._found.wait(timeout) or not self.address:
            if self._ended.wait(1.0):  # ended: its last words are read
                raise self.failure()
            self.kill()
            raise ServiceFailed(f"{self.name} did not start within {timeout:.0f}s; see {self.log_path}")
        try:
            wait_healthy(self.address, max(deadline - time.monotonic(), 1.0), tls=self.tls, alive=self.alive)
        except (TimeoutError, grpc.RpcError) as exc:
            if not self.alive():
                self._ended.wait(1.0)
                raise self.failure() from None
            raise ServiceFailed(f"{self.name} at {self.address} is not healthy: {exc}; see {self.log_path}") from None
        return self

    def failure(self) -> ServiceFailed:
        """What to say about a process that exited: its status and the error line it printed."""
        code = self.proc.poll() if self.proc is not None else None
        if code is not None and code < 0:  # killed: whatever it printed last is no reason
            return ServiceFailed(f"{self.name} was killed by {signal.Signals(-code).name}; see {self.log_path}")
        status = "is not running" if code is None else f"exited with status {code}"
        return ServiceFailed(f"{self.name} {status}: {self.error_line() or '(no error printed)'}; see {self.log_path}")

    def error_line(self) -> str:
        """The first line of its output that says what went wrong, else its last line."""
        lines = [line.rstrip() for line in self.tail if line.strip()]
        for line in lines:
            if ERROR_LINE.match(line):
                return line
        return lines[-1] if lines else ""

    def _pump(self, proc: subprocess.Popen, found: threading.Event, ended: threading.Event) -> None:
        assert proc.stdout is not None
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    self.tail.append(line)
                    match = LISTENING.search(line)
                    if match and not self.address:
                        self.address = match.group(1)
                        found.set()
        finally:
            proc.wait()
            ended.set()
            found.set()  # the process ended (or its log could not be written)
            if self.on_exit is not None and proc is self.proc:
                self.on_exit(self)

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

    def signal_stop(self) -> None:
        """SIGTERM without waiting for the exit (`terminate` waits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_draining(self, timeout: float = 5.0) -> bool:
        """After `signal_stop`: until its health check says NOT_SERVING (it began to drain), its
        server is gone, or it exited; watched (the health service's Watch stream), not polled.
        False when none of that happened within `timeout` seconds."""
        if not self.alive() or not self.address:
            return True
        try:
            with open_sync_channel(self.address, self.tls) as channel:
                replies = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=timeout)
                for reply in replies:
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        return True
        except grpc.RpcError as err:
            return err.code() != grpc.StatusCode.DEADLINE_EXCEEDED  # any other end: its server is going
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_healthy(
    address: str,
    timeout: float,
    service: str = "",
    tls: TLSConfig | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Block until the standard health check reports SERVING (waiting for the channel, not sleeping).
    `alive`: checked between tries, so a process that died is not waited for until the timeout."""
    deadline = time.monotonic() + timeout
    with open_sync_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{address} not SERVING after {timeout}s")
            if alive is not None and not alive():
                raise TimeoutError(f"{address} exited before it was SERVING")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=min(remaining, 1.0 if alive else remaining),
                    wait_for_ready=True,
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
