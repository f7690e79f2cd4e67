"""The `pdlb` command line against a local cluster it starts itself."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import grpc
import pytest

from pdlb.cli.local_cluster import loading, print_summary
from pdlb.cli.main import StreamRendering, rendered
from pdlb.common.orphan_guard import guarded
from pdlb.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.helpers import dispatch_stub, load_snapshot, rest_of, wait_until


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
    up.start_lines = lines  # type: ignore[attr-defined]  # what it printed while starting
    return up, json.loads((tmp_path / "state" / "clusters" / "local.json").read_text()), env


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


def test_the_dequantisation_note_only_where_pdlb_loads_gguf_weights():
    note = "dequantises its weights"
    assert note in loading("pdlb", "torch", "smollm2-135m-instruct")
    assert note in loading("pdlb", "torch", "models/llama.gguf")
    assert note not in loading("vllm", "torch", "smollm2-135m-instruct")  # vLLM loads its own export
    assert loading("vllm", "torch", "smollm2-135m-instruct") == "(smollm2-135m-instruct, on vLLM ranks)"
    assert note not in loading("pdlb", "sim", "smollm2-135m-instruct")
    assert note not in loading("pdlb", "torch", "models/hf-llama")  # safetensors: nothing to dequantise
    assert note not in loading("pdlb", "torch", "tiny-random")


def test_the_start_summary_lists_the_vllm_servers():
    lines: list[str] = []
    info = {
        "mode": "pd",
        "log_dir": "logs",
        "etcd": "127.0.0.1:2379",
        "gateway": "127.0.0.1:50059",
        "workers": {"scheduler-prefill-0": "127.0.0.1:50100"},
        "http": "http://127.0.0.1:8000",
        "vllm": {"prefill": ["http://127.0.0.1:8100"], "decode": ["http://127.0.0.1:8101"]},
    }
    print_summary(info, lines.append)
    assert "  vLLM prefill server  http://127.0.0.1:8100" in lines
    assert "  vLLM decode server   http://127.0.0.1:8101" in lines
    print_summary({**info, "vllm": {"null": ["http://127.0.0.1:8100"]}}, lines.append)
    assert "  vLLM server          http://127.0.0.1:8100" in lines


def test_make_run_starts_the_cluster_with_the_makefiles_python():
    """`make run` ran whichever `pdlb` came first on PATH, not the one `make install` put in $(PYTHON)."""
    root = Path(__file__).resolve().parent.parent
    # --no-print-directory: run from `make test`, a nested make would add its Entering/Leaving lines
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", "PYTHON=/opt/venv/bin/python"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "/opt/venv/bin/python -m pdlb.cli.main up"


def test_the_start_summary_names_the_cluster_and_how_to_reach_it():
    """The summary said "local cluster (mixed)" whatever --name was, and its `try:` line omitted the
    --cluster NAME the other commands need to find a cluster not named local."""
    workers = {"scheduler-mixed-0": "127.0.0.1:1"}
    info = {"name": "b", "mode": "mixed", "log_dir": "logs", "etcd": "e", "workers": workers, "http": "http://h"}
    lines: list[str] = []
    print_summary(info, lines.append)
    assert lines[0] == "pdlb local cluster 'b' (mixed) is up; logs in logs"
    assert 'pdlb generate --cluster b --chat "What' in lines[-1] and "pdlb top --cluster b " in lines[-1]
    assert "pdlb workers --cluster b " in lines[-1]
    lines.clear()
    print_summary({**info, "name": "local", "flow_control": True}, lines.append)
    assert lines[0] == "pdlb local cluster 'local' (mixed, flow control on) is up; logs in logs"
    assert "--cluster" not in lines[-1]  # the default cluster is found without it


def test_variables_of_the_other_mode_are_named_on_stderr_and_the_banner_shows_the_settings(tmp_path, monkeypatch):
    """PDLB_UP_WORKERS in a PD cluster was ignored in silence (the flag is refused; a variable may
    be set for both modes, so the start goes on): one line on stderr names it and why. The ready
    banner showed flow control's on/off alone, never lending (--work-conserving through
    --dispatcher-arg), the prefix cache's eviction order or the methods: now every setting that
    changes how requests are routed, held or served."""
    monkeypatch.setenv("PDLB_UP_WORKERS", "4")
    monkeypatch.setenv("PDLB_UP_METHOD", "round_robin")
    flags = ["--runner", "sim", "--model", "tiny-random", "--prefill", "1", "--decode", "1", "--flow-control"]
    flags += ["--dispatcher-arg=--work-conserving", "--dispatcher-arg=--queue-ttl=10", "--prefix-eviction", "slru"]
    up, state, _ = start_up(tmp_path, *flags)
    try:
        said = [line for line in up.start_lines if "PDLB_UP_" in line]
        assert said == [
            "pdlb up: PDLB_UP_WORKERS=4, PDLB_UP_METHOD=round_robin are ignored: they set flags of --mode mixed, "
            "and this cluster is --mode pd (its ranks: --prefill and --decode); unset them, or add --mode mixed\n"
        ], up.start_lines
        assert sorted(state["workers"]) == ["scheduler-decode-0", "scheduler-prefill-0"]  # as the flags said
        banner = "".join(up.start_lines)
        for shown in (
            "  method               prefill predicted_latency, decode least_wait\n",
            "  flow control         on, work-conserving (idle share lent), --queue-ttl=10\n",
            "  prefix eviction      slru\n",
            "  lockstep             off\n",
            "  engine               pdlb (sim runner)\n",
        ):
            assert shown in banner, banner
    finally:
        stop_up(up)


def test_variables_of_the_other_engine_are_named_and_their_values_not_checked(tmp_path, monkeypatch):
    """PDLB_UP_VLLM_* variables with pdlb's own engine (and PDLB_UP_RUNNER with --engine vllm) were
    ignored in silence; a variable may be set for several setups, so one line names them instead of
    a refusal, and a value the flag would refuse does not stop the start either."""
    from pdlb.cli.local_cluster import ignored_variables, variables_of_the_other_engine
    from pdlb.cli.main import build_parser

    monkeypatch.setenv("PDLB_UP_VLLM_PORT", "abc")
    monkeypatch.setenv("PDLB_UP_VLLM_DTYPE", "float16")
    args = build_parser().parse_args(["up"])
    assert variables_of_the_other_engine(args) == (
        "PDLB_UP_VLLM_PORT=abc, PDLB_UP_VLLM_DTYPE=float16 are ignored: they set flags of --engine vllm, and this "
        "cluster runs --engine pdlb; unset them, or add --engine vllm"
    )
    assert variables_of_the_other_engine(build_parser().parse_args(["up", "--engine", "vllm"])) is None
    monkeypatch.setenv("PDLB_UP_RUNNER", "sim")
    monkeypatch.setenv("PDLB_UP_VLLM_DECODE_URL", "http://d")  # of mixed mode and vLLM: named once, by the mode
    args = build_parser().parse_args(["up", "--mode", "mixed", "--engine", "vllm"])
    assert variables_of_the_other_engine(args) == (
        "PDLB_UP_RUNNER=sim is ignored: it sets a flag of --engine pdlb, and this cluster runs --engine vllm; "
        "unset it, or add --engine pdlb"
    )
    assert ignored_variables(args) == ["PDLB_UP_VLLM_DECODE_URL", "PDLB_UP_RUNNER"]
    # the bad port is not what stops this start: the model is (checked before anything starts)
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state"), "PDLB_UP_VLLM_PORT": "abc"}
    refused = pdlb("up", "--model", "smolm2", "--port", "0", "--etcd-port", "0", "--http-port", "0", env=env)
    assert refused.returncode == 2 and refused.stderr.startswith("pdlb up: --model 'smolm2'"), refused.stderr


def test_the_banner_settings_follow_what_is_passed_on_and_the_mode(monkeypatch):
    from pdlb.cli.local_cluster import LocalCluster, variables_of_the_other_mode
    from pdlb.cli.main import build_parser

    monkeypatch.setenv("PDLB_UP_PREFILL", "3")
    monkeypatch.setenv("PDLB_UP_DECODE", "5")
    args = build_parser().parse_args(["up", "--mode", "mixed", "--scheduler-arg=--prefix-eviction=slru-random"])
    said = variables_of_the_other_mode(args)
    assert said is not None and said.startswith("PDLB_UP_PREFILL=3, PDLB_UP_DECODE=5 are ignored: they set flags")
    assert "this cluster is --mode mixed (its ranks: --workers)" in said
    monkeypatch.delenv("PDLB_UP_DECODE")
    assert variables_of_the_other_mode(build_parser().parse_args(["up", "--mode", "pd"])) is None  # its own mode's
    settings = LocalCluster(args).settings("cache_aware", "", "")
    assert settings["method"] == "cache_aware" and settings["flow control"] == "off"
    assert settings["prefix eviction"] == "slru-random"  # passed on to the schedulers: still shown
    args = build_parser().parse_args(["up", "--dispatcher-arg=--flow-control", "--dispatcher-arg=--no-work-conserving"])
    settings = LocalCluster(args).settings("", "cache_aware", "total_requests")
    assert settings["flow control"] == "on, hard shares (no lending)"
    assert settings["method"] == "prefill cache_aware, decode total_requests"
    assert settings["prefix eviction"] == "lru (the schedulers' default)"
    # pdlb up's --flow-control comes first on the dispatchers' command line: a later --no- wins there
    args = build_parser().parse_args(["up", "--flow-control", "--dispatcher-arg=--no-flow-control"])
    assert LocalCluster(args).settings("", "a", "b")["flow control"] == "off"
    assert not LocalCluster(args).flow_control()
    # the children inherit pdlb up's environment: their own variables count too
    monkeypatch.setenv("PDLB_DISPATCHER_FLOW_CONTROL", "1")
    monkeypatch.setenv("PDLB_DISPATCHER_WORK_CONSERVING", "true")
    monkeypatch.setenv("PDLB_SCHEDULER_PREFIX_EVICTION", "slru")
    settings = LocalCluster(build_parser().parse_args(["up"])).settings("", "a", "b")
    assert settings["flow control"] == "on, work-conserving (idle share lent)"
    assert settings["prefix eviction"] == "slru"


def test_generate_prints_text_and_renders_what_would_not_print_as_ids():
    assert rendered("Paris.\n", [12, 13, 14]) == "Paris.\n"
    assert rendered("", [5]) == ""  # a character still incomplete: printed with a later chunk
    assert rendered("a\ufffd", [97, 200]) == "<97><200>"
    assert rendered("\x1b[2J", [27, 91]) == "<27><91>"  # a control sequence would act on the terminal
    assert rendered("Paris", [12], as_ids=True) == "<12>"


def test_a_stream_shows_every_token_once_when_bytes_are_held_between_chunks():
    # The chunks a simulated worker streamed in a user's trial: a lone UTF-8 byte (id 132) comes
    # with no text, and the next chunk carries it as U+FFFD; the held id used to vanish.
    chunks = [("\ufffd", [193]), ("", [132]), ("\ufffdb", [82]), ("", [187]), ("", [226]), ("\ufffd\ufffdF", [70])]
    rendering = StreamRendering()
    shown = "".join(rendering.feed(text, ids) for text, ids in chunks) + rendering.end()
    assert shown == "<193><132><82><187><226><70>"
    completed = StreamRendering()  # two byte tokens that make one character print as it
    assert completed.feed("", [195]) + completed.feed("é", [169]) + completed.end() == "é"
    unfinished = StreamRendering()  # bytes still held when the stream ends show as their ids
    assert unfinished.feed("a", [97]) + unfinished.feed("", [226]) + unfinished.end() == "a<226>"
    as_ids = StreamRendering(as_ids=True)
    assert "".join(as_ids.feed(t, i) for t, i in chunks) + as_ids.end() == "<193><132><82><187><226><70>"
    # A real model's stream ends on EOS (id 2 for SmolLM2) with no text: nothing shows for it, but
    # bytes still held before it do; with --token-ids its id shows too.
    eos = StreamRendering()
    assert eos.feed("Paris.", [12]) + eos.feed("", [2], stopped=True) + eos.end() == "Paris."
    held = StreamRendering()
    assert held.feed("", [226]) + held.feed("", [2], stopped=True) + held.end() == "<226>"
    eos_ids = StreamRendering(as_ids=True)
    assert eos_ids.feed("Paris.", [12]) + eos_ids.feed("", [2], stopped=True) + eos_ids.end() == "<12><2>"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not running
        return stat.read().split()[2] != "Z"


def test_up_generate_workers_route_and_clean_shutdown(cluster):
    up, state, env = cluster
    generated = pdlb("generate", "hello there", "--max-new-tokens", "40", env=env)
    assert generated.returncode == 0 and "FINISH_REASON_LENGTH" in generated.stderr
    assert generated.stdout.endswith("\n")  # the completion ends its line; the summary is on stderr
    # The sim draws arbitrary byte ids: what does not decode to printable text shows as <id>, never
    # as raw bytes or replacement characters.
    assert all(c.isprintable() for c in generated.stdout[:-1]), repr(generated.stdout)
    assert "<" in generated.stdout and "token id n, whose text is not printable" in generated.stderr
    ids = pdlb("generate", "hello there", "--max-new-tokens", "40", "--token-ids", env=env)
    assert ids.returncode == 0 and re.fullmatch(r"(<\d+>){40}\n", ids.stdout), ids.stdout
    workers = pdlb("workers", "--cluster", "local", env=env)  # connection flags after the subcommand too
    assert workers.returncode == 0 and workers.stdout.count("rank ") == 2
    routed = pdlb("route", "hi", env=env)
    assert "method predicted_latency" in routed.stdout  # the default of mixed dispatchers
    top = pdlb("top", "--once", env=env)
    assert top.returncode == 0 and "predicted_latency" in top.stdout and "live" in top.stdout
    piped = pdlb("top", env=env, timeout=30)  # stdout not a terminal: one frame (it showed nothing, forever)
    assert piped.returncode == 0 and "predicted_latency" in piped.stdout and "live" in piped.stdout
    with urllib.request.urlopen(f"{state['http']}/v1/models", timeout=10) as reply:  # the gateway pdlb up started
        assert json.loads(reply.read())["data"][0]["id"] == "tiny-random"
    bench = pdlb("bench-client", "--num-requests", "10", "--rate", "50", "--output-median", "4", env=env)
    assert bench.returncode == 0 and "10/10 requests ok" in bench.stdout
    rest = stop_up(up)
    assert "stopping: gateway, dispatchers, schedulers, etcd ..." in rest  # what runs in mixed mode, no bootstrap
    assert "etcd keys left behind: none" in rest
    assert not [pid for pid in state["pids"] if alive(pid)], "orphan processes"


def test_a_second_ctrl_c_while_stopping_kills_the_children_at_once(tmp_path):
    """The "stopping:" line did not say that pdlb up waits up to --shutdown-grace for running
    requests, and a second Ctrl-C during that wait did nothing visible: now the line names the
    wait, and a second SIGINT says in one line that it stops now, kills the children within a
    couple of seconds (not the 120 s grace a request in flight holds the dispatcher for) and exits 130."""
    flags = ["--mode", "mixed", "--workers", "1", "--runner", "sim", "--model", "tiny-random"]
    flags += ["--dispatcher-arg=--shutdown-grace=120", "--scheduler-arg=--sim-slowdown=50"]
    up, state, env = start_up(tmp_path, *flags)
    argv = [sys.executable, "-m", "pdlb.cli.main", "generate", "hi", "--max-new-tokens", "2000", "--ignore-eos"]
    generate = subprocess.Popen([*argv, "--token-ids"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert generate.stdout is not None and generate.stdout.read(1) == b"<"  # its first token came: it runs
        up.send_signal(signal.SIGINT)
        line = next((line for line in up.stdout if line.startswith("stopping:")), "")
        assert line.rstrip("\n").endswith(
            "etcd ... (running requests get up to 120 s to finish, their --shutdown-grace; Ctrl-C again stops at once)"
        ), line
        asked = time.monotonic()
        up.send_signal(signal.SIGINT)
        rest = up.stdout.read()
        assert up.wait(timeout=60) == 130, rest
        assert time.monotonic() - asked < 30, rest  # not the dispatcher's 120 s grace
        assert rest.startswith("pdlb up: Ctrl-C again: stopping now, requests still running are cut"), rest
        assert "stopped at once (second Ctrl-C)" in rest and "logs of the failed start" not in rest, rest
        assert not [pid for pid in state["pids"] if alive(pid)], "orphan processes"
        assert generate.wait(timeout=30) == 1  # its stream was cut, not finished
    finally:
        for proc in (generate, up):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_killed_up_leaves_no_orphans(cluster):
    up, state, _ = cluster
    up.kill()  # kill -9: children get SIGTERM from the kernel (parent-death signal)
    up.wait()
    deadline = time.monotonic() + 30
    while [pid for pid in state["pids"] if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in state["pids"] if alive(pid)]


def test_a_later_up_removes_the_etcd_data_a_killed_up_left_and_no_live_ones(tmp_path, monkeypatch):
    """kill -9 of `pdlb up` left its etcd data directory in the temp dir for good; the next
    `pdlb up` removes those of `pdlb up`s that no longer run, never a live one's (nor other kinds)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    flags = ["--mode", "mixed", "--workers", "1", "--runner", "sim", "--model", "tiny-random"]
    up, state, _ = start_up(tmp_path, *flags)
    up.kill()  # kill -9
    up.wait()
    deadline = time.monotonic() + 30
    while [pid for pid in state["pids"] if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)  # the children end on the parent-death signal: only observable by polling
    left = sorted(p.name for p in temp.iterdir() if p.name.startswith("pdlb-up-etcd-"))
    assert left and left[0].startswith(f"pdlb-up-etcd-{up.pid}-"), left
    live = temp / f"pdlb-up-etcd-{os.getpid()}-abc"  # a live process's (this test's): kept
    other = temp / "pdlb-etcd-xyz"  # not pdlb up's kind: kept
    live.mkdir()
    other.mkdir()
    up2, _, _ = start_up(tmp_path / "second", *flags)
    try:
        assert any("removed the etcd data of 1 killed pdlb up" in line for line in up2.start_lines), up2.start_lines
        now = sorted(p.name for p in temp.iterdir() if p.name.startswith("pdlb-up-etcd-"))
        assert left[0] not in now and live.name in now and other.exists()
        assert any(name.startswith(f"pdlb-up-etcd-{up2.pid}-") for name in now), now  # the running one's
    finally:
        stop_up(up2)
    assert not [p for p in temp.iterdir() if p.name.startswith(f"pdlb-up-etcd-{up2.pid}-")]  # stopped: removed


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
    assert "stopping: gateway, dispatchers, schedulers, bootstrap, etcd ..." in rest
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


def test_up_refuses_zero_ranks_and_help_shows_every_default(tmp_path):
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state")}
    for flag in ("--prefill", "--decode", "--workers"):
        refused = pdlb("up", flag, "0", env=env)
        said = f"argument {flag}: 0 ranks: expected an integer of 1 or more"
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    # named as what it counts, with the range it takes (it said "ranks" for --dispatchers too)
    said = "0 dispatchers per role: expected an integer of 1 or more"
    refused = pdlb("up", "--dispatchers", "0", env=env)
    assert refused.returncode == 2 and f"argument --dispatchers: {said}" in refused.stderr, refused.stderr
    refused = pdlb("up", env={**env, "PDLB_UP_DISPATCHERS": "0"})
    assert refused.returncode == 2 and refused.stderr.startswith(f"pdlb up: PDLB_UP_DISPATCHERS='0': {said}")
    assert "rank" not in refused.stderr
    negative = pdlb("up", "--max-restarts", "-1", env=env)
    assert negative.returncode == 2 and "argument --max-restarts: -1 restarts: expected an integer of 0 or more" in (
        negative.stderr
    )
    shown = " ".join(pdlb("up", "--help", env=env).stdout.split())  # unwrapped
    assert "see above" not in shown
    for default in (
        "--prefill PREFILL PD: prefill ranks [env: PDLB_UP_PREFILL] (default: 2)",
        "--workers WORKERS mixed: DP ranks [env: PDLB_UP_WORKERS] (default: 2)",
        "(default: 2379)",
        "(0: free ports) [env: PDLB_UP_PORT] (default: 50051)",
        "(default: 8000)",
        "(default: least_wait; total_requests with --lockstep)",
    ):
        assert default in shown, default


def test_up_stops_cleanly_on_sighup_after_its_console_went_away(cluster, tmp_path):
    """A closed terminal: its output pipe is gone (every later line is a broken pipe) and SIGHUP
    arrives. pdlb up still stops in order (exit 0) and removes its state, instead of dying on the
    first line it cannot print and leaving etcd's data and the state file behind."""
    up, state, _ = cluster
    up.stdout.close()
    up.send_signal(signal.SIGHUP)
    assert up.wait(timeout=90) == 0
    assert not (tmp_path / "state" / "clusters" / "local.json").exists()
    assert "up_pid" in state  # the state that was there while it ran


def test_up_refuses_an_unwritable_log_dir_and_ports_past_65535_before_starting(tmp_path):
    """Both are refused at once, naming the flag, with nothing started (no etcd, no state, no
    traceback): an unwritable --log-dir used to hang pdlb up, and --port 65530 to crash it once a
    service's port (--port + offset) passed 65535."""
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state")}
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    free = ["--port", "0", "--etcd-port", "0", "--http-port", "0", "--model", "tiny-random"]
    refused = pdlb("up", *free, "--log-dir", str(blocked / "logs"), env=env, timeout=30)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"pdlb up: --log-dir {blocked / 'logs'}: cannot write there" in refused.stderr
    high = pdlb("up", "--etcd-port", "0", "--http-port", "0", "--port", "65530", env=env, timeout=30)
    assert high.returncode == 2, high.stdout + high.stderr
    assert "is past 65535" in high.stderr and "--port +" in high.stderr
    for run in (refused, high):
        assert "Traceback" not in run.stdout + run.stderr and "starting cluster" not in run.stdout
    assert not list((tmp_path / "state").glob("clusters/*.json"))


def test_up_reports_a_child_that_dies_at_once_with_its_own_error(tmp_path):
    """`--model` a .gguf file that is not one: pdlb up's own check passes it, the dispatcher exits at
    start; pdlb up says so at once, with the child's own message and no traceback, stops what it
    started, and leaves no state behind."""
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state"), "TMPDIR": str(tmp_path)}
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    flags = ["--mode", "mixed", "--workers", "1", "--model", str(broken), "--port", "0", "--etcd-port", "0"]
    failed = pdlb("up", *flags, "--http-port", "0", env=env, timeout=45)  # not the old 60 s start timeout
    assert failed.returncode == 1, failed.stdout + failed.stderr
    said = f"could not start the cluster: dispatcher exited with status 1: pdlb-dispatcher: cannot use --model {broken}"
    assert said in failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    assert "etcd keys left behind: none" in failed.stdout
    assert not list((tmp_path / "state").glob("clusters/*.json"))


def test_second_up_is_refused_and_leaves_the_running_cluster_alone(cluster, tmp_path):
    """A second `pdlb up` of the same name, or on a taken port, refuses before starting anything:
    it names the cluster or the port, reports no keys of the other cluster, leaves no temp dir, and
    the first cluster's state and service are untouched."""
    up, state, env = cluster
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**env, "TMPDIR": str(scratch)}
    free = ["--port", "0", "--http-port", "0", "--runner", "sim", "--model", "tiny-random", "--mode", "mixed"]
    same_name = pdlb("up", *free, "--etcd-port", "0", env=env)
    assert same_name.returncode == 2
    assert f"a cluster named 'local' already runs (pdlb up pid {up.pid}" in same_name.stderr
    etcd_port = state["etcd"].rsplit(":", 1)[1]
    taken = pdlb("up", "--name", "second", *free, "--etcd-port", etcd_port, env=env)
    assert taken.returncode == 2
    assert f"port {etcd_port} (--etcd-port: etcd) is taken" in taken.stderr  # a refusal: on stderr
    assert not taken.stdout, taken.stdout
    assert "left behind" not in taken.stdout and "Traceback" not in taken.stdout + taken.stderr
    http_port = state["http"].rsplit(":", 1)[1]
    sim = free[4:]  # runner, model, mode
    ports = ["--port", "0", "--etcd-port", "0", "--http-port", http_port]
    busy_http = pdlb("up", "--name", "third", *sim, *ports, env=env)
    assert busy_http.returncode == 2
    assert f"port {http_port} (--http-port: the gateway's HTTP API) is taken" in busy_http.stderr
    assert not list(scratch.iterdir()), "a temp dir was left behind"
    workers = pdlb("workers", env=env)  # the first cluster is still found and serves
    assert workers.returncode == 0 and workers.stdout.count("rank ") == 2


def test_state_per_cluster_finds_the_running_one_and_never_touches_another(tmp_path, monkeypatch):
    """Pure logic of the state files: a live `pdlb up` pid makes a cluster running, a dead one makes
    its file stale; several running clusters need --cluster; clear() deletes only its own file."""
    from pdlb.cli import state

    monkeypatch.setenv("PDLB_STATE_DIR", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    state.save("mine", {"http": "http://127.0.0.1:1"})
    stale = tmp_path / "clusters" / "stale.json"
    stale.write_text(json.dumps({"up_pid": dead_pid, "http": "http://127.0.0.1:2"}))
    assert state.load()["http"] == "http://127.0.0.1:1"  # the only running one
    other = tmp_path / "clusters" / "other.json"
    other.write_text(json.dumps({"up_pid": os.getppid(), "http": "http://127.0.0.1:3"}))  # a live process
    with pytest.raises(state.StateError, match=r"several clusters run here: mine .*, other .*--cluster NAME"):
        state.load()
    assert state.load("other")["http"] == "http://127.0.0.1:3"
    with pytest.raises(state.StateError, match="no running cluster named 'stale'"):
        state.load("stale")
    state.clear("other")  # not ours: kept
    assert other.exists()
    state.clear("mine")
    assert not (tmp_path / "clusters" / "mine.json").exists()
    with pytest.raises(state.StateError, match="cluster name"):
        state.save("../escape", {})


def wait_for_lines(up: subprocess.Popen, wanted: str, count: int, seen: list[str]) -> None:
    """Read `pdlb up`'s console until `wanted` appeared `count` times (the test's timeout bounds it)."""
    while sum(wanted in line for line in seen) < count:
        line = up.stdout.readline()
        if not line:
            pytest.fail("pdlb up ended:\n" + "".join(seen))
        seen.append(line)


def test_up_restarts_children_killed_with_kill_9(tmp_path):
    """kill -9 of bootstrap, the decode dispatcher and a prefill worker under `pdlb up`: each death is
    reported, each child restarted on its address, and PD requests succeed afterwards, through the
    CLI and the gateway."""
    flags = ["--mode", "pd", "--prefill", "1", "--decode", "1", "--runner", "sim", "--model", "tiny-random"]
    up, state, env = start_up(tmp_path, *flags)
    try:
        victims = ["bootstrap", "dispatcher-decode", "scheduler-prefill-0"]
        for name in victims:
            os.kill(state["children"][name], signal.SIGKILL)
        seen: list[str] = []
        wait_for_lines(up, " is back on ", len(victims), seen)
        console = "".join(seen)
        for name in victims:
            assert f"! {name} was killed by SIGKILL" in console, console
            assert f"  {name} is back on " in console
        assert f"dispatcher-decode is back on {state['decode_dispatcher']}" in console  # same address
        generated = pdlb("generate", "after the restarts", "--max-new-tokens", "5", env=env)
        assert generated.returncode == 0 and "FINISH_REASON_LENGTH" in generated.stderr, generated.stderr
        body = json.dumps({"model": "tiny-random", "prompt": "again", "max_tokens": 4, "ignore_eos": True}).encode()
        request = urllib.request.Request(
            f"{state['http']}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.loads(reply.read())["usage"]["completion_tokens"] == 4
        now = json.loads((tmp_path / "state" / "clusters" / "local.json").read_text())
        assert all(now["children"][n] != state["children"][n] for n in victims)  # the state says the new pids
    finally:
        rest = stop_up(up)
    assert "etcd keys left behind: none" in rest


def test_top_quits_on_q_in_a_terminal(cluster):
    """`pdlb top` in a real pseudo-terminal shows the quit hint and exits on `q`, restoring the terminal."""
    import pty
    import termios

    _, _, env = cluster
    controller, terminal = pty.openpty()
    before = termios.tcgetattr(terminal)
    top = subprocess.Popen(
        [sys.executable, "-m", "pdlb.cli.main", "top"], stdin=terminal, stdout=terminal, stderr=terminal, env=env
    )
    try:
        screen = b""
        while b"q: quit" not in screen or b"live" not in screen:  # the hint under a first frame
            screen += os.read(controller, 65536)
        os.write(controller, b"q")
        assert top.wait(timeout=30) == 0
        assert termios.tcgetattr(terminal) == before  # cbreak mode undone
    finally:
        if top.poll() is None:
            top.kill()
        os.close(controller)
        os.close(terminal)


def test_up_restarts_a_lockstep_group_as_a_whole(tmp_path):
    """kill -9 of one rank of a lockstep DP group under `pdlb up`: its group's other rank is restarted
    with it (a rank alone never becomes ready), and requests succeed afterwards."""
    flags = ["--mode", "mixed", "--workers", "2", "--runner", "sim", "--model", "tiny-random", "--lockstep"]
    up, state, env = start_up(tmp_path, *flags)
    try:
        os.kill(state["children"]["scheduler-mixed-1"], signal.SIGKILL)
        seen: list[str] = []
        wait_for_lines(up, " is back on ", 2, seen)
        console = "".join(seen)
        assert "restarting it with its DP group (scheduler-mixed-0)" in console, console
        generated = pdlb("generate", "after the group restart", "--max-new-tokens", "5", env=env)
        assert generated.returncode == 0 and "FINISH_REASON_LENGTH" in generated.stderr, generated.stderr
    finally:
        rest = stop_up(up)
    assert "etcd keys left behind: none" in rest


def test_connection_flags_are_taken_before_or_after_the_subcommand():
    from pdlb.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["--cluster", "a", "top"]).cluster == "a"
    assert parser.parse_args(["top", "--cluster", "b"]).cluster == "b"
    assert parser.parse_args(["--cluster", "a", "workers", "--dispatcher", "h:1"]).cluster == "a"  # kept
    assert parser.parse_args(["rooms", "--bootstrap", "h:2", "7"]).bootstrap == "h:2"
    assert parser.parse_args(["generate", "hi"]).dispatcher == ""  # the defaults still apply


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(tmp_path):
    """`pdlb workers | head -1`: a command whose stdout reader has gone gets EPIPE on its next
    print; it exits 1 with nothing on stderr, not a BrokenPipeError traceback (any command:
    export-tokenizer needs no cluster)."""
    run = subprocess.Popen(
        [sys.executable, "-m", "pdlb.cli.main", "export-tokenizer", str(tmp_path / "tok")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    run.stdout.close()  # the reader is gone before the command prints
    stderr = run.stderr.read().decode()
    assert run.wait(timeout=120) == 1 and stderr == "", stderr
    assert (tmp_path / "tok" / "tokenizer.json").exists()  # the work itself was done


def test_every_flag_falls_back_to_an_environment_variable(monkeypatch, tmp_path):
    """As the services' flags do: PDLB_<COMMAND>_<FLAG> (PDLB_<FLAG> for the connection flags)
    sets a default, the command line still wins, --help names the variable, and a value the flag
    refuses is refused in one line naming the variable (exit 2)."""
    from pdlb.cli.main import build_parser

    for name, value in {
        "PDLB_UP_MODE": "mixed",
        "PDLB_UP_WORKERS": "3",
        "PDLB_UP_FLOW_CONTROL": "1",
        "PDLB_UP_METHOD": "least_wait",
        "PDLB_UP_VLLM_EAGER": "no",
        "PDLB_TOP_INTERVAL_MS": "100",
        "PDLB_CLUSTER": "env-cluster",
        "PDLB_DISPATCHER": "h:9",
    }.items():
        monkeypatch.setenv(name, value)
    parser = build_parser()
    up = parser.parse_args(["up"])
    assert (up.mode, up.workers, up.flow_control, up.method, up.vllm_eager) == ("mixed", 3, True, "least_wait", False)
    assert parser.parse_args(["up", "--workers", "5"]).workers == 5  # the line wins
    top = parser.parse_args(["top"])
    assert (top.interval_ms, top.cluster, top.dispatcher) == (100, "env-cluster", "h:9")
    assert parser.parse_args(["top", "--cluster", "line"]).cluster == "line"

    from pdlb.cli.local_cluster import flags_of_the_other_mode

    # a method set in the environment for every run is no contradiction of the mode chosen
    assert flags_of_the_other_mode(parser.parse_args(["up", "--mode", "pd"])) == []
    assert flags_of_the_other_mode(parser.parse_args(["up", "--mode", "pd", "--method", "x"])) == ["--method"]

    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state")}
    shown = " ".join(pdlb("up", "--help", env=env).stdout.split())
    for variable in ("PDLB_UP_FLOW_CONTROL", "PDLB_UP_ENGINE", "PDLB_UP_PREFILL_METHOD", "PDLB_UP_MAX_RESTARTS"):
        assert f"[env: {variable}]" in shown, variable
    for command, variable, value, said in (
        # PDLB_UP_MODE=mixed above: --workers is this mode's (the other mode's variables are ignored)
        ("up", "PDLB_UP_WORKERS", "0", "PDLB_UP_WORKERS='0': 0 ranks: expected an integer of 1 or more"),
        ("up", "PDLB_UP_MODE", "both", "PDLB_UP_MODE='both': expected one of pd, mixed"),
        ("up", "PDLB_UP_FLOW_CONTROL", "maybe", "PDLB_UP_FLOW_CONTROL='maybe': expected true/false"),
        ("top", "PDLB_TOP_INTERVAL_MS", "abc", "PDLB_TOP_INTERVAL_MS='abc'"),
    ):
        argv = ["--once"] if command == "top" else ["--runner", "sim", "--port", "0", "--etcd-port", "0"]
        refused = pdlb(command, *argv, env={**env, variable: value})
        assert refused.returncode == 2 and refused.stderr.startswith(f"pdlb {command}: {said}"), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert pdlb(command, "--help", env={**env, variable: value}).returncode == 0  # help still answers
    # a variable of another command's flag does not stop this one
    other = pdlb("workers", "--dispatcher", "127.0.0.1:1", env={**env, "PDLB_TOP_INTERVAL_MS": "abc"})
    assert "PDLB_TOP_INTERVAL_MS" not in other.stderr and "UNAVAILABLE" in other.stderr, other.stderr
    # a subcommand's --help names the connection flags' variables too
    assert "[env: PDLB_CLUSTER]" in " ".join(pdlb("top", "--help", env=env).stdout.split())
    # checked when pdlb up starts, not by the flag's type: still named as the variable that set it
    ports = ("--port", "0", "--etcd-port", "0", "--http-port", "0")
    refused = pdlb("up", *ports, env={**env, "PDLB_UP_PREFIX_EVICTION": "fifo"})
    said = "pdlb up: PDLB_UP_PREFIX_EVICTION='fifo': unknown prefix-cache eviction 'fifo'"
    assert refused.returncode == 2 and refused.stderr.startswith(said), refused.stderr


def test_a_word_for_a_number_in_any_commands_variable_or_flag_says_what_was_expected(monkeypatch):
    """Every numeric flag of every `pdlb` command, from its variable or from the command line, says
    `expected an integer` / `expected a number` as the services' flags do; the variables of pdlb
    up's own types (ranks, ports, restarts) showed int()'s `invalid literal for int() with base 10`,
    and the flag itself argparse's `invalid positive value`."""
    from pdlb.cli.main import build_parser

    positional = {"generate": ["hi"], "route": ["hi"], "export-tokenizer": ["d"], "health": ["h:1"]}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = 0
    for command, subparser in commands.items():
        for action in subparser._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if not long or action.type is None or action.choices is not None or action.dest == "rooms":
                continue
            try:
                action.type("0.5")  # every float flag takes a half; no integer flag does
                expected = "expected a number"
            except (ValueError, argparse.ArgumentTypeError):
                expected = "expected an integer"
            prefix = "PDLB_" if action.dest in ("cluster", "dispatcher", "bootstrap") and command != "up" else ""
            variable = prefix or f"PDLB_{command.upper().replace('-', '_')}_"
            variable += long[0][2:].replace("-", "_").upper()
            monkeypatch.setenv(variable, "abc")
            args, _ = build_parser().parse_known_args([command, *positional.get(command, [])])
            monkeypatch.delenv(variable)
            assert args.env_errors == [f"{variable}='abc': {expected}"], (command, long[0], args.env_errors)
            checked += 1
    assert checked >= 15  # the walk found pdlb up's ranks, ports and restarts and the other commands' numbers


def test_a_bad_value_in_a_variable_of_the_other_mode_is_ignored_with_it(monkeypatch, capsys):
    """A variable of the other mode's flags is ignored with one line at the start (it may be set
    for runs of either mode); its value was still checked, so PDLB_UP_WORKERS=abc stopped a PD
    cluster while PDLB_UP_WORKERS=4 did not. Now neither does; a bad value of this mode's still does."""
    from pdlb.cli.local_cluster import variables_of_the_other_mode
    from pdlb.cli.main import build_parser, main

    monkeypatch.setenv("PDLB_UP_WORKERS", "abc")
    monkeypatch.setenv("PDLB_UP_METHOD", "bogus")
    with pytest.raises(SystemExit) as refused:  # reaches the next check: the unknown flag's refusal
        main(["up", "--mode", "pd", "--no-such-flag"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "PDLB_UP_WORKERS" not in err and "--no-such-flag" in err, err
    args, _ = build_parser().parse_known_args(["up", "--mode", "pd"])
    said = variables_of_the_other_mode(args)
    assert said is not None and said.startswith("PDLB_UP_WORKERS=abc, PDLB_UP_METHOD=bogus are ignored"), said
    assert main(["up", "--mode", "mixed"]) == 2  # its own mode's variable: refused, in one line
    assert capsys.readouterr().err == "pdlb up: PDLB_UP_WORKERS='abc': expected an integer\n"


def test_the_words_on_the_command_line_for_a_word_in_a_numeric_flag(tmp_path):
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state")}
    for flag, said in (("--prefill", "'abc': expected an integer"), ("--port", "'abc': expected an integer")):
        refused = pdlb("up", flag, "abc", env=env)
        assert refused.returncode == 2 and f"argument {flag}: {said}" in refused.stderr, refused.stderr
    refused = pdlb("bench-client", "--rate", "abc", "--dispatcher", "127.0.0.1:1", env=env)
    assert "argument --rate: 'abc': expected a number" in refused.stderr, refused.stderr


def test_every_commands_numeric_flag_says_its_words_on_the_command_line_and_has_a_help_text(capsys):
    """`pdlb generate --temperature abc` was argparse's `invalid float value: 'abc'` (bench-client
    --seed and health --timeout alike), and generate's --help said nothing of --max-new-tokens and
    --temperature: every numeric flag of every command now refuses a word as its variable does, and
    says in --help what it takes (its range or unit and its default)."""
    from pdlb.cli.main import build_parser

    positional = {"generate": ["hi"], "route": ["hi"], "export-tokenizer": ["d"], "health": ["h:1"]}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = []
    for command, subparser in commands.items():
        for action in subparser._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if not long or action.type is None or action.choices is not None:
                continue
            help_text = (action.help or "").split(" [env: ")[0]
            assert help_text, f"pdlb {command} {long[0]} has no help text"
            with pytest.raises(SystemExit):
                build_parser().parse_args([command, *positional.get(command, []), long[0], "abc"])
            err = capsys.readouterr().err
            assert f"argument {long[0]}: 'abc': expected " in err and "invalid" not in err, (command, err)
            checked.append(f"{command} {long[0]}")
    assert {"generate --temperature", "generate --max-new-tokens", "bench-client --seed", "health --timeout"} <= set(
        checked
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--temperature", "3"])
    assert "argument --temperature: 3 is out of range: a number from 0 to 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--max-new-tokens", "20000"])
    assert "20000 is out of range: an integer from 1 to 16384" in capsys.readouterr().err


def test_a_services_variable_its_flag_refuses_is_one_line_naming_it_exit_2():
    """A service's PDLB_<SERVICE>_<FLAG> holding a value its flag refuses (a choice it does not
    have, a word for a number) stops the start in one line naming the variable, exit 2, as the same
    value on the command line does; it was exit 1, a traceback, or (a choice) started anyway."""
    for program, variable, value, said in (
        ("pdlb-gateway", "PDLB_GATEWAY_MAX_BODY_BYTES", "abc", "_MAX_BODY_BYTES='abc': expected an integer"),
        ("pdlb-dispatcher", "PDLB_DISPATCHER_LOAD_BALANCE_METHOD", "bogus", "='bogus': expected one of auto, "),
        ("pdlb-scheduler", "PDLB_SCHEDULER_CPU_DECODE_OPS", "bogus", "='bogus': expected one of auto, eager, fused"),
        ("pdlb-bootstrap", "PDLB_BOOTSTRAP_SHUTDOWN_GRACE", "soon", "PDLB_BOOTSTRAP_SHUTDOWN_GRACE='soon': expected a"),
    ):
        ran = subprocess.run(
            [program, "--port", "0"], env={**os.environ, variable: value}, capture_output=True, text=True, timeout=60
        )
        assert ran.returncode == 2, (program, ran.returncode, ran.stderr)
        line = ran.stderr.strip()
        assert line.startswith(f"{program}: ") and said in line and len(line.splitlines()) == 1, line
        # --help still answers
        helped = subprocess.run(
            [program, "--help"], env={**os.environ, variable: value}, capture_output=True, text=True, timeout=60
        )
        assert helped.returncode == 0 and variable in " ".join(helped.stdout.split())
    # the same word on the command line, in the same words (it was argparse's `invalid float value`)
    for program, flag, said in (
        ("pdlb-dispatcher", "--queue-ttl", "argument --queue-ttl: 'abc': expected a number"),
        ("pdlb-gateway", "--max-body-bytes", "argument --max-body-bytes: 'abc': expected an integer"),
    ):
        ran = subprocess.run([program, flag, "abc"], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 2 and said in ran.stderr, ran.stderr


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["generate", "hi", "--max-new-tokens", "-3"], "pdlb generate: error: argument --max-new-tokens: -3 is out"),
        (["generate", "hi", "--max-new-tokens", "2**40"], "pdlb generate: error: argument --max-new-tokens: '2**40'"),
        (["route", "hi", "--room", "-1"], "pdlb route: error: argument --room: -1 is out of range"),
        (["rooms", "5", "-1"], "pdlb rooms: error: argument room: -1 is out of range"),
        (["top", "--interval-ms", "-5"], "pdlb top: error: argument --interval-ms: -5 is out of range"),
        (["bench-client", "--max-concurrency", "0"], "pdlb bench-client: error: argument --max-concurrency: 0 is"),
        (["bench-client", "--rate", "nan"], "pdlb bench-client: error: argument --rate: nan is out of range"),
        (["bench-client", "--num-requests", "-1"], "pdlb bench-client: error: argument --num-requests: -1 is"),
    ],
)
def test_a_numeric_flag_out_of_range_is_refused_in_one_line(argv, said):
    """Values that protobuf cannot hold (a negative --max-new-tokens or room: a ValueError traceback
    from the request builder) or that never make progress (--max-concurrency 0 hung forever) are
    argparse's refusal naming the flag, exit 2, before anything is sent."""
    env = {**os.environ, "PDLB_STATE_DIR": "/nonexistent-pdlb-state"}
    refused = pdlb(*argv, "--dispatcher", "127.0.0.1:1", "--bootstrap", "127.0.0.1:1", env=env, timeout=30)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(said), refused.stderr


def test_up_turns_flow_control_on_and_passes_dispatcher_flags(tmp_path):
    """--dispatcher-arg reaches the dispatchers, --prefix-eviction the schedulers, and --gateway-arg
    the gateway (pdlb up had no way to set a gateway flag: here its body bound, which a request over
    it meets)."""
    up, state, env = start_up(
        tmp_path, "--mode", "mixed", "--workers", "1", "--runner", "sim", "--model", "tiny-random",
        "--flow-control", "--dispatcher-arg=--max-queued-requests=7", "--gateway-arg=--max-body-bytes=1000",
        "--prefix-eviction", "slru-random",
    )  # fmt: skip
    try:
        assert any("(mixed, flow control on); logs in" in line for line in up.start_lines), up.start_lines  # banner
        assert any("(mixed, flow control on) is up" in line for line in up.start_lines), up.start_lines  # summary
        assert any("starting 1 mixed scheduler (tiny-random" in line for line in up.start_lines), up.start_lines
        top = pdlb("top", "--once", env=env)
        assert top.returncode == 0 and "queue 0 (0 tokens" in top.stdout, top.stdout  # the queue line: enabled
        generated = pdlb("generate", "hi", "--max-new-tokens", "3", env=env)
        assert generated.returncode == 0 and "FINISH_REASON_LENGTH" in generated.stderr
        argvs = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in state["pids"] if alive(pid)]
        dispatcher = next(a for a in argvs if any(part.endswith(b"pdlb-dispatcher") for part in a))
        assert b"--flow-control" in dispatcher and b"--max-queued-requests=7" in dispatcher, dispatcher
        scheduler = next(a for a in argvs if any(part.endswith(b"pdlb-scheduler") for part in a))
        assert scheduler[scheduler.index(b"--prefix-eviction") + 1] == b"slru-random", scheduler
        big = json.dumps({"prompt": "x" * 2000, "max_tokens": 1}).encode()
        request = urllib.request.Request(
            f"{state['http']}/v1/completions", data=big, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        said = json.loads(refused.value.read())["error"]["message"]
        assert refused.value.code == 413 and "exceeds 1000 bytes (--max-body-bytes)" in said, said
    finally:
        rest = stop_up(up)
    assert "etcd keys left behind: none" in rest


@pytest.mark.parametrize(
    ("service", "flags", "status", "said"),
    [
        ("scheduler", ["--dp-rank", "-1"], 2, "pdlb-scheduler: --dp-rank must be >= 0"),
        ("dispatcher", ["--worker-wait", "-1"], 2, "pdlb-dispatcher: --worker-wait must be >= 0 seconds, not -1.0"),
        ("gateway", ["--tls-cert", "cert.pem"], 1, "pdlb-gateway: --tls-cert and --tls-key go together"),
        ("bootstrap", ["--etcd-user", "u"], 1, "pdlb-bootstrap: --etcd-user and --etcd-password go together"),
    ],
)
def test_a_refused_start_is_one_line_after_the_programs_name(service, flags, status, said):
    """The service runner names the program once, before the refusal's message (the raisers no
    longer write it; the TLS and etcd pairings used to print with no name at all)."""
    refused = subprocess.run(
        [sys.executable, "-m", f"pdlb.services.{service}.main", "--port", "0", *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == status, refused.stdout + refused.stderr
    assert refused.stderr.strip() == said


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["top", "--once"],
            "pdlb top: no running cluster named 'nosuch' (running: none); start it with `pdlb up --name nosuch`",
        ),
        (["workers"], "pdlb workers: no running cluster named 'nosuch'"),
        (["generate", "hi"], "pdlb generate: no running cluster named 'nosuch'"),
        (["route", "hi"], "pdlb route: no running cluster named 'nosuch'"),
        (["rooms", "7"], "pdlb rooms: no running cluster named 'nosuch'"),
        (["bench-client", "--num-requests", "1"], "pdlb bench-client: no running cluster named 'nosuch'"),
        (["generate", "hi", "--tls-cert", "c.pem"], "pdlb generate: --tls-cert and --tls-key go together"),
        (["generate", "hi", "--dispatcher", "127.0.0.1:1"], "pdlb generate: UNAVAILABLE: "),
        (["workers", "--dispatcher", "127.0.0.1:1"], "pdlb workers: UNAVAILABLE: "),
    ],
)
def test_a_command_refused_or_failed_says_so_after_the_programs_name(tmp_path, argv, said):
    """`pdlb top --cluster nosuch` (and every other command's refusal, a failed RPC too: it read
    `error: UNAVAILABLE: ...`) printed its message with no program name before it, unlike argparse's
    refusals and `pdlb top`'s lost stream: one line `pdlb <command>: ...`, exit 1."""
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state")}  # no cluster runs
    refused = pdlb(*argv, "--cluster", "nosuch", env=env, timeout=60)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(said), refused.stderr


@pytest.mark.parametrize(
    "argv",
    [["generate", "hi"], ["workers"], ["route", "hi"], ["bench-client", "--num-requests", "2"]],
    ids=lambda argv: argv[0],
)
def test_ctrl_c_ends_a_command_with_status_130_and_no_traceback(tmp_path, argv):
    """Ctrl-C while a command waits on a dispatcher (here one that accepts and never answers) printed
    asyncio's KeyboardInterrupt traceback; now it exits 130 (128 + SIGINT), as shells expect."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(30)
        env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state")}
        address = f"127.0.0.1:{server.getsockname()[1]}"
        command = [sys.executable, "-m", "pdlb.cli.main", *argv, "--dispatcher", address]
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            connection, _ = server.accept()  # the command's call is under way
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            connection.close()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and not err.strip(), err


def test_top_says_which_dispatcher_it_cannot_reach_in_one_line():
    """`pdlb top` against a dispatcher that does not answer printed a grpc traceback."""
    env = {**os.environ, "PDLB_STATE_DIR": "/nonexistent-pdlb-state"}
    lost = pdlb("top", "--once", "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:1", env=env, timeout=30)
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert "Traceback" not in lost.stderr and len(lost.stderr.strip().splitlines()) == 1, lost.stderr
    assert re.match(r"pdlb top: (prefill|decode) dispatcher 127\.0\.0\.1:1: UNAVAILABLE: ", lost.stderr), lost.stderr


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--workers", "4"], "pdlb up: --workers is for --mode mixed, and this cluster is --mode pd"),
        (["--method", "round_robin"], "pdlb up: --method is for --mode mixed, and this cluster is --mode pd"),
        (
            ["--mode", "mixed", "--prefill", "2"],
            "pdlb up: --prefill is for --mode pd, and this cluster is --mode mixed",
        ),
        (
            ["--mode", "mixed", "--decode", "3", "--decode-method", "least_wait"],
            "pdlb up: --decode, --decode-method are for --mode pd",
        ),
        # a --model naming nothing started etcd and bootstrap, then failed in the first dispatcher
        (["--model", "/nonexistent/m.gguf"], "pdlb up: --model '/nonexistent/m.gguf': no such file or directory"),
        (["--model", "smolm2"], "pdlb up: --model 'smolm2': not smollm2-135m-instruct, tiny-random, a .gguf file"),
        # the engine's flags alike: --vllm-* with pdlb's own engine (the default) started it in silence
        (
            ["--vllm-port", "9000", "--no-vllm-eager"],
            "pdlb up: --vllm-port, --vllm-eager are for --engine vllm, and this cluster runs --engine pdlb; add "
            "--engine vllm, or drop them",
        ),
        (["--vllm-url", "http://127.0.0.1:1"], "pdlb up: --vllm-url is for --engine vllm"),
        (
            ["--engine", "vllm", "--vllm-url", "http://127.0.0.1:1", "--runner", "torch"],
            "pdlb up: --runner is for --engine pdlb, and this cluster runs --engine vllm; add --engine pdlb, or drop "
            "it",
        ),
        # --lockstep with vLLM reached the schedulers, which refuse DP groups for vLLM's engine
        (
            ["--engine", "vllm", "--vllm-url", "http://127.0.0.1:1", "--lockstep"],
            "pdlb up: --lockstep is for --engine pdlb, and this cluster runs --engine vllm",
        ),
        # found only after etcd and the bootstrap had started
        (
            ["--engine", "vllm", "--vllm-url", "http://127.0.0.1:1"],
            "pdlb up: --mode pd --engine vllm --vllm-url needs --vllm-decode-url too",
        ),
    ],
)
def test_flags_of_the_other_mode_are_refused_before_anything_starts(tmp_path, flags, said):
    """`pdlb up --workers 4` started the default PD cluster of 2 + 2 ranks, the 4 ignored in silence
    (and --prefill with --mode mixed alike): a flag only the other mode reads is one line, exit 2.
    A --model that names no model alike, and a flag only the other engine reads."""
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state"), "TMPDIR": str(tmp_path)}
    refused = pdlb("up", *flags, "--port", "0", "--etcd-port", "0", "--http-port", "0", env=env, timeout=30)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().startswith(said) and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not refused.stdout and not [p for p in tmp_path.iterdir() if p.name.startswith("pdlb-")]


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (
            ["--flow-control", "--tenant-share", "0.5"],
            "pdlb up: --tenant-share is a flag of pdlb-dispatcher, not of pdlb up: pass it on as "
            "--dispatcher-arg=--tenant-share=0.5 (with --flow-control)",
        ),
        (
            ["--reserved-slots=-1"],
            "pdlb up: --reserved-slots is a flag of pdlb-dispatcher, not of pdlb up: pass it on as "
            "--dispatcher-arg=--reserved-slots=-1 (with --flow-control)",
        ),
        (
            ["--max-running-requests", "2", "--mode", "mixed"],
            "pdlb up: --max-running-requests is a flag of pdlb-scheduler, not of pdlb up: pass it on as "
            "--scheduler-arg=--max-running-requests=2",
        ),
        (
            ["--http-body-timeout", "5"],
            "pdlb up: --http-body-timeout is a flag of pdlb-gateway, not of pdlb up: pass it on as "
            "--gateway-arg=--http-body-timeout=5",
        ),
        (
            ["--gateway-arg=--http-port=9"],
            "pdlb up: --gateway-arg=--http-port=9: pdlb up sets --http-port itself (the gateway must be where the "
            "other commands look); use pdlb up's own --port, --http-port or --etcd-port",
        ),
        (["--no-such-flag", "1"], "pdlb up: error: unrecognized arguments: --no-such-flag 1"),
        # a value the dispatchers refuse is refused before etcd starts, not by the dispatchers after it
        (
            ["--flow-control", "--dispatcher-arg=--gather-ms=-1"],
            "pdlb up: --dispatcher-arg: --gather-ms must be within 0..1000 (ms), not -1.0",
        ),
        (
            ["--flow-control", "--dispatcher-arg=--queue-ttl=abc"],
            "pdlb up: --dispatcher-arg: argument --queue-ttl: 'abc': expected a number",
        ),
        # a --*-arg value after a space was argparse's bare "expected one argument"
        (
            ["--flow-control", "--dispatcher-arg", "--queue-ttl=4"],
            "pdlb up: --dispatcher-arg --queue-ttl=4: a value starting with '-' is read as a flag of pdlb up unless "
            "joined with '=': write --dispatcher-arg=--queue-ttl=4",
        ),
        (
            ["--scheduler-arg", "--max-running-requests", "2", "--mode", "mixed"],
            "pdlb up: --scheduler-arg --max-running-requests: a value starting with '-' is read as a flag of pdlb up "
            "unless joined with '=': write --scheduler-arg=--max-running-requests=2",
        ),
        (
            ["--gateway-arg", "--request-log"],
            "pdlb up: --gateway-arg --request-log: a value starting with '-' is read as a flag of pdlb up unless "
            "joined with '=': write --gateway-arg=--request-log",
        ),
        # joined, then a space: argparse's usage and "unrecognized arguments: 4"
        (
            ["--flow-control", "--dispatcher-arg=--queue-ttl", "4"],
            "pdlb up: --dispatcher-arg=--queue-ttl 4: the passed-on flag's value goes after '=', not a space: write "
            "--dispatcher-arg=--queue-ttl=4",
        ),
        (
            ["--flow-control", "--dispatcher-arg=--queue-ttl", "-4"],
            "pdlb up: --dispatcher-arg=--queue-ttl -4: the passed-on flag's value goes after '=', not a space: write "
            "--dispatcher-arg=--queue-ttl=-4",
        ),
        (
            ["--flow-control", "--dispatcher-arg=--queue-ttl 4"],
            "pdlb up: --dispatcher-arg='--queue-ttl 4': the passed-on flag's value goes after '=', not a space: write "
            "--dispatcher-arg=--queue-ttl=4",
        ),
    ],
)
def test_a_services_flag_given_to_up_says_how_to_pass_it_on(tmp_path, flags, said):
    """`pdlb up --flow-control --tenant-share 0.5` (what a user types after reading about flow
    control) was argparse's bare "unrecognized arguments"; a flag of the dispatchers or the
    schedulers now gets one line naming its service and the --*-arg that passes it on, exit 2,
    before anything starts. A flag of nobody's is still argparse's refusal."""
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state")}
    refused = pdlb("up", "--port", "0", "--etcd-port", "0", "--http-port", "0", *flags, env=env, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == said, refused.stderr
    assert not refused.stdout and not (tmp_path / "state").exists()  # nothing started


def test_engine_vllm_without_vllm_installed_is_refused_before_anything_starts(tmp_path):
    """`pdlb up --engine vllm` with no vLLM virtualenv started etcd and the bootstrap, then failed
    (exit 1): now one line naming where it looked and how to install it, exit 2, nothing started."""
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state"), "TMPDIR": str(tmp_path)}
    env["VLLM_VENV"] = str(tmp_path / "no-vllm")
    flags = ["--engine", "vllm", "--vllm-port", "0", "--port", "0", "--etcd-port", "0", "--http-port", "0"]
    refused = pdlb("up", *flags, env=env, timeout=30)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    said = f"pdlb up: --engine vllm: vLLM is not installed at {tmp_path / 'no-vllm'} (make install-vllm"
    assert refused.stderr.startswith(said) and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not refused.stdout and not [p for p in tmp_path.iterdir() if p.name.startswith("pdlb-")]


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--prefix-eviction", "lfu"], "pdlb up: --prefix-eviction: unknown prefix-cache eviction 'lfu'; known: lru"),
        (
            ["--prefix-eviction", "slru", "--engine", "vllm", "--vllm-url", "http://127.0.0.1:1"],
            "pdlb up: --prefix-eviction is for --engine pdlb, and this cluster runs --engine vllm",
        ),
    ],
)
def test_a_prefix_eviction_pdlb_up_cannot_use_is_refused_before_anything_starts(tmp_path, flags, said):
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state")}
    up = pdlb("up", "--port", "0", "--etcd-port", "0", "--http-port", "0", *flags, env=env)
    assert up.returncode == 2, up.stdout + up.stderr
    assert up.stderr.startswith(said) and len(up.stderr.strip().splitlines()) == 1, up.stderr
    assert "starting cluster" not in up.stdout


def test_flow_flags_without_flow_control_are_refused_before_anything_starts(tmp_path):
    """A flow-control flag without --flow-control used to be ignored in silence (pdlb-dispatcher and
    `pdlb up --dispatcher-arg`): now one line names both flags, exit 2. Set through its environment
    variable it is ignored with a warning naming the variable (the dispatcher serves)."""
    refused = subprocess.run(
        [sys.executable, "-m", "pdlb.services.dispatcher.main", "--port", "0", "--tenant-share", "0.5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip() == (
        "pdlb-dispatcher: --tenant-share acts only with --flow-control, which is off: add --flow-control or drop "
        "--tenant-share"
    )
    env = {**os.environ, "PDLB_STATE_DIR": str(tmp_path / "state")}
    up = pdlb("up", "--port", "0", "--etcd-port", "0", "--http-port", "0", "--dispatcher-arg=--queue-ttl=3", env=env)
    assert up.returncode == 2, up.stdout + up.stderr
    said = "pdlb up: --dispatcher-arg=--queue-ttl=3 acts only with --flow-control, which is off: add --flow-control"
    assert said in up.stderr
    assert "starting cluster" not in up.stdout  # refused before anything started
    served = subprocess.Popen(
        guarded([sys.executable, "-m", "pdlb.services.dispatcher.main", "--port", "0", "--model", "tiny-random"]),
        env={**os.environ, "PDLB_DISPATCHER_TENANT_SHARE": "0.5", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in served.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        text = "".join(lines)
        assert "flow control is off (--flow-control): PDLB_DISPATCHER_TENANT_SHARE ignored" in text, text
        assert "listening on" in text, text
    finally:
        served.terminate()
        served.wait(timeout=30)


@pytest.mark.parametrize(
    "mode", [["--mode", "mixed", "--workers", "1"], ["--mode", "pd", "--prefill", "1", "--decode", "1"]]
)
def test_sigterm_fails_queued_requests_at_once_and_lets_the_running_one_finish(tmp_path, mode):
    """SIGTERM to `pdlb up --flow-control` with one request running and four queued in the
    dispatcher (three over HTTP, one over the gateway's gRPC): the queued ones get 503 (gRPC:
    UNAVAILABLE) naming the shutdown while the running one still streams
    (they used to wait for a worker after the schedulers stopped first, be re-run by the draining
    gateway and fail 15 s later with "no dispatchers known"); the running one streams to its end;
    pdlb up exits 0 and leaves nothing in etcd."""
    up, state, _ = start_up(
        tmp_path, *mode, "--runner", "sim", "--model", "tiny-random",
        "--flow-control", "--scheduler-arg=--max-running-requests=1", "--scheduler-arg=--sim-slowdown=10",
    )  # fmt: skip
    try:
        running, queued = asyncio.run(_sigterm_with_queued_requests(up, state))
        rest = up.stdout.read()
        assert up.wait(timeout=60) == 0, rest
    finally:
        if up.poll() is None:
            up.kill()
    assert all(status == 503 for status, _, _ in queued), queued
    assert all("the dispatcher is shutting down" in message for _, message, _ in queued), queued
    assert all(message.endswith("(the gateway is shutting down: not retried)") for _, message, _ in queued), queued
    assert all(retry_after for _, _, retry_after in queued), queued
    finish, tokens, done_before = running
    assert not done_before, "the running request ended before the queued ones were answered"
    assert (finish, tokens) == ("length", 150)  # it ran to its end through the drain
    bootstrap = "bootstrap, " if "pd" in mode else ""
    assert f"stopping: gateway, dispatchers, schedulers, {bootstrap}etcd ..." in rest
    assert "etcd keys left behind: none" in rest


async def _sigterm_with_queued_requests(up: subprocess.Popen, state: dict) -> tuple[tuple, list[tuple]]:
    url = f"{state['http']}/v1/completions"
    async with aiohttp.ClientSession() as session:
        body = {"model": "tiny-random", "prompt": "running", "max_tokens": 150, "ignore_eos": True, "stream": True}
        running = await session.post(url, json={**body, "stream_options": {"include_usage": True}})
        assert running.status == 200, await running.text()
        assert (await running.content.readline()).startswith(b"data: ")  # its first token: it runs
        queued = [
            asyncio.ensure_future(
                session.post(url, json={"model": "tiny-random", "prompt": f"queued {i}", "max_tokens": 4})
            )
            for i in range(3)
        ]
        gateway = grpc.aio.insecure_channel(state["gateway"])  # and one through the gateway's gRPC API
        request = common_pb2.InferenceRequest(request_id="queued-grpc", text="queued 3")
        request.sampling.max_new_tokens = 4
        call = gateway_pb2_grpc.GatewayStub(gateway).Generate(gateway_pb2.GatewayGenerateRequest(request=request))
        queued_grpc = asyncio.ensure_future(rest_of(call))
        addresses = [state[key] for key in ("dispatcher", "prefill_dispatcher", "decode_dispatcher") if key in state]
        stubs = [dispatch_stub(address) for address in addresses]

        async def four_queued() -> bool:  # PD: each one's prefill or decode half, or both
            queued = [(await load_snapshot(stub)).flow.queued_requests for _, stub in stubs]
            return max(queued) == 4

        await wait_until(four_queued, 30, "four requests queued in a dispatcher")
        for channel, _ in stubs:
            await channel.close()
        up.send_signal(signal.SIGTERM)
        answers = []
        for reply in await asyncio.gather(*queued):  # each answered, none hangs (the test's timeout bounds it)
            answers.append((reply.status, (await reply.json())["error"]["message"], reply.headers.get("Retry-After")))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await queued_grpc
        await gateway.close()
        grpc_said = failed.value.details()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (failed.value.code(), grpc_said)
        assert "the dispatcher is shutting down" in grpc_said and "queued-grpc" in grpc_said, grpc_said
        done_before = running.content.at_eof()
        finish, tokens = "", 0
        async for line in running.content:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                finish = next((c["finish_reason"] for c in event["choices"] if c["finish_reason"]), finish)
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
        return (finish, tokens, done_before), answers


@pytest.mark.parametrize(
    ("module", "flags", "message"),
    [
        ("pdlb.services.scheduler.main", ["--runner", "sim", "--torch-bind-cpus", "abc"], "not a CPU id or range"),
        (
            "pdlb.services.dispatcher.main",
            ["--flow-control", "--tenant-share=-1"],
            "--tenant-share and --tenant-active-window must",
        ),
        (
            "pdlb.services.dispatcher.main",
            ["--flow-control", "--lend-headroom=-1"],
            "--reserved-slots, --reserve-window and --lend-headroom must be >= 0",
        ),
    ],
)
def test_a_flag_refused_while_starting_prints_its_message_alone(module, flags, message):
    """A value argparse accepts but the service refuses as it starts: exit 2 (as argparse's own
    refusals) with the one line, no asyncio traceback (SystemExit raised inside the serving task used
    to escape the loop)."""
    run = subprocess.run(
        [sys.executable, "-m", module, "--port", "0", *flags], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Traceback" not in run.stderr and "never retrieved" not in run.stderr, run.stderr
