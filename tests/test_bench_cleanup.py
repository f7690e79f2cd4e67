"""A benchmark stopped mid-run leaves no process behind: bench/vllm_bench.py started against a
vLLM address that accepts connections and never answers (its workers wait in their start), then
stopped with SIGTERM or SIGINT as a user or a job runner would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_vllm_bench_stopped_mid_start_stops_every_child(tmp_path, sig):
    silent = socket.socket()  # a "vLLM server" that accepts and never answers: the workers keep waiting
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    port = silent.getsockname()[1]
    argv = [
        sys.executable, "-m", "bench.vllm_bench", "--vllm-url", f"http://127.0.0.1:{port}",
        "--methods", "round_robin", "--runs", "1", "--requests", "2",
        "--out", str(tmp_path / "out.md"), "--json", str(tmp_path / "out.json"),
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the bench's log directory lands here
    bench = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        children: set[int] = set()

        def waiting_workers() -> int:  # workers that started and now wait for the silent server
            logs = tmp_path.glob("pdlb-vllm-bench-*/worker-*.log")
            return sum("waiting for vLLM" in log.read_text(errors="replace") for log in logs)

        # etcd, dispatcher, 2 workers, gateway; both workers past their start-up, in their wait
        while (len(children) < 5 or waiting_workers() < 2) and time.monotonic() < deadline:
            assert bench.poll() is None, bench.stdout.read() if bench.stdout else ""
            children |= children_of(bench.pid)
            time.sleep(0.1)  # polling /proc and logs: no event tells when a child reached its wait
        assert len(children) >= 5 and waiting_workers() == 2, children
        bench.send_signal(sig)
        output, _ = bench.communicate(timeout=60)
        gone_by = time.monotonic() + 30
        while [p for p in children if alive(p)] and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not [p for p in children if alive(p)], f"orphans left behind:\n{output[-2000:]}"
    finally:
        silent.close()
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_a_service_signalled_while_starting_exits_at_once(tmp_path):
    """A worker still waiting for its vLLM server (up to --vllm-wait) stops on SIGTERM at once:
    nothing serves yet, so there is nothing to drain."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    argv = [
        sys.executable, "-m", "pdlb.services.scheduler.main", "--port", "0", "--engine", "vllm",
        "--vllm-url", f"http://127.0.0.1:{silent.getsockname()[1]}", "--model", "smollm2-135m-instruct",
    ]  # fmt: skip
    worker = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert worker.stdout is not None
        for line in worker.stdout:
            if "waiting for vLLM" in line:
                break
        else:
            pytest.fail(f"the worker ended before waiting for vLLM (exit {worker.wait()})")
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
        assert time.monotonic() - signalled < 10  # not the --vllm-wait of 600 s
    finally:
        silent.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
