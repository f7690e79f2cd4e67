"""The `pdlb` command line against a local cluster it starts itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pdlb.common.orphan_guard import guarded


def pdlb(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdlb.cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def start_up(tmp_path, *flags: str):
    """`pdlb up` on free ports with `flags`; returns (process, state, env) once everything is healthy."""
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "pdlb.cli.main", "up", *flags, "--port", "0", "--etcd-port", "0", "--http-port", "0"]
    up = subprocess.Popen(
        guarded([*argv, "--log-dir", str(tmp_path / "logs")]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in up.stdout:  # the summary ends with the "try:" line once everything is healthy
        lines.append(line)
        if line.startswith("try:"):
            break
    else:
        pytest.fail("pdlb up ended early:\n" + "".join(lines))
    return up, json.loads((tmp_path / "state" / "cluster.json").read_text()), env


def stop_up(up: subprocess.Popen) -> str:
    up.send_signal(signal.SIGINT)
    rest = up.stdout.read()
    assert up.wait(timeout=60) == 0
    return rest


@pytest.fixture
def cluster(tmp_path):
    """`pdlb up` in mixed mode (toy model, sim runner); yields (process, state, env)."""
    up, state, env = start_up(
        tmp_path, "--mode", "mixed", "--workers", "2", "--runner", "sim", "--model", "tiny-random"
    )
    yield up, state, env
    if up.poll() is None:
        up.kill()
        up.wait()


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", [["--mode", "pd", "--prefill", "1", "--decode", "1"], ["--mode", "mixed", "--workers", "1"]]
)
def test_up_serves_the_real_model_and_generate_chat_answers_in_words(tmp_path, mode):
    up, _, env = start_up(tmp_path, *mode)  # the default model: the packaged SmolLM2
    try:
        answer = pdlb("generate", "--chat", "What is the capital of France?", env=env, timeout=120)
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout and "FINISH_REASON_STOP" in answer.stderr
        workers = pdlb("workers", env=env)
        assert "smollm2-135m-instruct" in workers.stdout
    finally:
        rest = stop_up(up)
    assert "etcd keys left behind: none" in rest


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not running
        return stat.read().split()[2] != "Z"


def test_up_generate_workers_route_and_clean_shutdown(cluster):
    up, state, env = cluster
    generated = pdlb("generate", "hello there", "--max-new-tokens", "5", env=env)
    assert generated.returncode == 0 and "FINISH_REASON_LENGTH" in generated.stderr
    workers = pdlb("workers", env=env)
    assert workers.returncode == 0 and workers.stdout.count("rank ") == 2
    routed = pdlb("route", "hi", env=env)
    assert "method predicted_latency" in routed.stdout  # the default of mixed dispatchers
    top = pdlb("top", "--once", env=env)
    assert top.returncode == 0 and "predicted_latency" in top.stdout and "live" in top.stdout
    with urllib.request.urlopen(f"{state['http']}/v1/models", timeout=10) as reply:  # the gateway pdlb up started
        assert json.loads(reply.read())["data"][0]["id"] == "tiny-random"
    bench = pdlb("bench-client", "--num-requests", "10", "--rate", "50", "--output-median", "4", env=env)
    assert bench.returncode == 0 and "10/10 requests ok" in bench.stdout
    rest = stop_up(up)
    assert "etcd keys left behind: none" in rest
    assert not [pid for pid in state["pids"] if alive(pid)], "orphan processes"


def test_killed_up_leaves_no_orphans(cluster):
    up, state, _ = cluster
    up.kill()  # kill -9: children get SIGTERM from the kernel (parent-death signal)
    up.wait()
    deadline = time.monotonic() + 30
    while [pid for pid in state["pids"] if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in state["pids"] if alive(pid)]


def test_up_lockstep_pd_groups_serve_and_stop_cleanly(tmp_path):
    """`pdlb up --lockstep`: each role's two ranks step as one group; PD requests flow through both
    groups, `pdlb top` shows their waves, and SIGINT stops both groups without breaking them."""
    flags = ["--mode", "pd", "--prefill", "2", "--decode", "2", "--runner", "sim", "--model", "tiny-random"]
    up, state, env = start_up(tmp_path, *flags, "--lockstep")
    try:
        for i in range(3):
            generated = pdlb("generate", f"hello {i}", "--max-new-tokens", "6", env=env)
            assert generated.returncode == 0 and "FINISH_REASON_LENGTH" in generated.stderr, generated.stderr
        top = pdlb("top", "--once", env=env)
        assert top.returncode == 0 and top.stdout.count("wave ") == 4, top.stdout
    finally:
        rest = stop_up(up)
    assert "etcd keys left behind: none" in rest
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("scheduler-*.log"))
    assert "leaving its DP group" not in logs  # stopped as a whole: no rank saw its group break
    assert not [pid for pid in state["pids"] if alive(pid)], "orphan processes"


def test_up_with_dispatcher_replicas_behind_the_gateway(tmp_path):
    """`pdlb up --dispatchers 2`: the gateway spreads requests over both replicas. Each replica counts
    only its own dispatches as in flight; the others' requests reach its table through the
    workers' load reports (running / waiting), never as its own in-flight."""
    flags = ["--mode", "mixed", "--workers", "2", "--runner", "sim", "--model", "tiny-random", "--dispatchers", "2"]
    up, state, env = start_up(tmp_path, *flags)
    try:
        assert len(state["replicas"]) == 1
        for i in range(8):
            body = json.dumps(
                {"model": "tiny-random", "prompt": f"spread {i}", "max_tokens": 3, "ignore_eos": True}
            ).encode()
            request = urllib.request.Request(
                f"{state['http']}/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as reply:
                assert json.loads(reply.read())["usage"]["completion_tokens"] == 3
        counts = []
        for address in (state["dispatcher"], state["replicas"][0]):
            top = pdlb("--dispatcher", address, "top", "--once", env=env)
            counts.append(sum(int(line.split("│")[-2]) for line in top.stdout.splitlines() if "live" in line))
        assert counts == [4, 4], counts  # round robin over the replicas
        asyncio.run(_replica_view(state["dispatcher"], state["replicas"][0]))
    finally:
        rest = stop_up(up)
    assert "etcd keys left behind: none" in rest


async def _replica_view(a: str, b: str) -> None:
    """A request running through replica A shows in replica B's table as the worker reports it
    (running), not as B's in-flight; in A's table it is acknowledged the same way."""
    from pdlb.v1 import common_pb2, dispatch_pb2
    from tests.helpers import dispatch_stub, load_snapshot, wait_until

    (ch_a, stub_a), (ch_b, stub_b) = dispatch_stub(a), dispatch_stub(b)
    req = common_pb2.InferenceRequest(
        request_id="long-through-a",
        input_ids=list(range(1, 30)),
        sampling=common_pb2.SamplingParams(max_new_tokens=2000, ignore_eos=True, temperature=0.0),
    )
    call = stub_a.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=120)
    try:
        first = await call.read()
        rank = first.dp_rank

        async def seen_by_b() -> bool:
            row = next(w for w in (await load_snapshot(stub_b)).workers if w.worker.dp_rank == rank)
            return row.reported.running_requests == 1 and row.inflight_requests == 0

        await wait_until(seen_by_b, 10, "replica B to see A's request in the worker's report")
    finally:
        call.cancel()
        await ch_a.close()
        await ch_b.close()
