"""The field's routers and load tool as processes: SGLang's model gateway (`smg`, PyPI
sglang-router 0.3.2), vllm-router 0.1.17 and NVIDIA's aiperf 0.13.0, from the virtualenv that
`make install-routers` builds (`ROUTERS_VENV`, default `.venv-routers` in the checkout).

A router is started on a free loopback port in front of worker URLs, waited for until it answers
`/health` and its first completion, and stopped with SIGTERM (then SIGKILL after a grace).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from pdlb.common.free_port import free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".venv-routers"
SMG_POLICIES = ("cache_aware", "power_of_two", "round_robin")
VLLM_ROUTER_POLICIES = ("cache_aware", "power_of_two", "round_robin")
# vllm-router's DP-aware mode (--intra-node-data-parallel-size > 1) sends a bearer key to workers
VLLM_ROUTER_API_KEY = "pdlb-bench"


def venv() -> Path:
    return Path(os.environ.get("ROUTERS_VENV", DEFAULT_VENV))


def binary(name: str) -> Path:
    """A tool of the routers' virtualenv; SystemExit saying how to install it when it is missing."""
    path = venv() / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `make install-routers` (or set ROUTERS_VENV to its virtualenv)")
    return path


def available() -> bool:
    return all((venv() / "bin" / name).is_file() for name in ("smg", "vllm-router", "aiperf"))


@dataclass
class Router:
    """One router process: `kind` is "smg" or "vllm-router"."""

    kind: str
    policy: str
    workers: list[str]
    dp_size: int = 1  # > 1: DP-aware, the router picks a rank of each worker URL itself
    log_dir: Path = field(default_factory=lambda: Path("."))
    extra: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        self.port = self.port or free_port()
        metrics = str(free_port())  # both export Prometheus on a fixed port by default: one each
        common = ["--host", "127.0.0.1", "--port", str(self.port), "--policy", self.policy]
        common += ["--worker-urls", *self.workers, "--prometheus-port", metrics]
        if self.kind == "smg":
            dp = ["--dp-aware"] if self.dp_size > 1 else []
            return [str(binary("smg")), "launch", *common, *dp, "--log-level", "warn", *self.extra]
        if self.kind == "vllm-router":
            dp = []
            if self.dp_size > 1:
                dp = ["--intra-node-data-parallel-size", str(self.dp_size), "--api-key", VLLM_ROUTER_API_KEY]
            return [str(binary("vllm-router")), *common, *dp, "--log-level", "warning", *self.extra]
        raise ValueError(f"unknown router {self.kind!r}")

    def start(self, timeout: float = 60.0) -> Router:
        argv = self.argv()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{self.kind}-{self.policy}-{self.port}.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited {self.proc.returncode}; see {log.name}")
            try:
                _get(f"{self.url}/health")
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.kind} did not answer /health within {timeout:.0f} s; see {log.name}")

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _get(url: str) -> None:
    """Raises OSError unless the URL answers 200 (no event loop needed: stdlib)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            if reply.status != 200:
                raise OSError(f"{url}: {reply.status}")
    except urllib.error.URLError as exc:
        raise OSError(str(exc)) from exc


async def wait_serving(url: str, model: str, timeout: float = 60.0) -> None:
    """Until one completion through `url` succeeds (a router may answer /health before its workers
    are in its table)."""
    deadline = time.monotonic() + timeout
    last = ""
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                body = {"model": model, "prompt": "hi", "max_tokens": 1}
                async with session.post(f"{url}/v1/completions", json=body) as reply:
                    if reply.status == 200:
                        await reply.read()
                        return
                    last = f"{reply.status} {await reply.text()}"
            except aiohttp.ClientError as exc:
                last = str(exc)
            await _sleep(0.3)
    raise TimeoutError(f"{url} did not serve a completion within {timeout:.0f} s: {last}")


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
