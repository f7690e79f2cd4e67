"""One lockstep DP group of real torch runners (NCCL on GPUs, gloo on CPU) behind a real dispatcher:
how long a group step takes against the busiest rank's own compute, with the load skewed onto one
rank and then spread evenly, and the request waves in between.

Run on a machine with two GPUs: `python -m bench.lockstep_bench --device cuda`; on CPU with a small
shape: `python -m bench.lockstep_bench --device cpu --hidden-size 64 --num-layers 2 --num-heads 4`.
The model is the toy transformer at the given shape (random weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceProcess, script
from pdlb.v1 import common_pb2, dispatch_pb2
from tests.helpers import dispatch_stub, load_snapshot, wait_until


def start(args: argparse.Namespace, log_dir: str) -> tuple[ServiceProcess, list[ServiceProcess]]:
    ports = [free_port() for _ in range(args.ranks)]
    env = {"PDLB_SCHEDULER_MODEL": "tiny-random", "PDLB_DISPATCHER_MODEL": "tiny-random"}
    dispatcher = ServiceProcess(
        "dispatcher",
        [
            *script("pdlb-dispatcher"),
            "--port", "0",
            "--workers", ",".join(f"127.0.0.1:{p}" for p in ports),
            "--report-interval-ms", "50",
        ],
        log_dir,
        env,
    ).start()  # fmt: skip
    rendezvous = f"127.0.0.1:{free_port()}"
    ranks = []
    for rank, port in enumerate(ports):
        device = f"{args.device}:{rank}" if args.device == "cuda" else args.device
        argv = [
            *script("pdlb-scheduler"),
            "--port", str(port), "--dispatchers", dispatcher.address, "--dp-rank", str(rank),
            "--runner", "torch", "--device", device, "--dtype", args.dtype, "--torch-threads", "1",
            "--vocab-size", str(args.vocab_size), "--hidden-size", str(args.hidden_size),
            "--num-layers", str(args.num_layers), "--num-heads", str(args.num_heads),
            "--max-total-tokens", str(args.kv_tokens), "--max-running-requests", str(args.batch * 2),
            "--dp-group-size", str(args.ranks), "--dp-group-address", rendezvous, "--no-prefix-cache",
        ]  # fmt: skip
        ranks.append(ServiceProcess(f"rank{rank}", argv, log_dir, env))
    for proc in ranks:
        proc.spawn()
    for proc in ranks:
        proc.wait_ready(300)
    return dispatcher, ranks


async def phase(stub, name: str, per_rank: list[int], args: argparse.Namespace) -> dict:
    """Run `per_rank[r]` decode requests pinned to each rank at once; returns the group's step
    statistics for the phase (from the ranks' reports, after the group paused again)."""
    before = await settled(stub)
    calls = []
    for rank, count in enumerate(per_rank):
        for i in range(count):
            req = common_pb2.InferenceRequest(
                request_id=f"{name}-{rank}-{i}-{time.monotonic_ns()}",
                input_ids=[(7 * i + j) % 200 + 1 for j in range(args.prompt)],
                sampling=common_pb2.SamplingParams(max_new_tokens=args.output, ignore_eos=True, temperature=0.0),
                decode_dp_rank=rank,
            )
            calls.append(_tokens(stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=600)))
    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*calls))
    span = time.perf_counter() - started
    after = await settled(stub)
    g0, g1 = before[0], after[0]
    steps = g1.steps - g0.steps
    row = {
        "phase": name,
        "requests per rank": per_rank,
        "tokens": tokens,
        "tok/s": tokens / span,
        "group steps": steps,
        "mean step ms": (g1.step_seconds_total - g0.step_seconds_total) / steps * 1000,
        "mean busiest-rank compute ms": (g1.busiest_compute_seconds_total - g0.busiest_compute_seconds_total)
        / steps
        * 1000,
        "dummy share": sum(after[r].dummy_steps - before[r].dummy_steps for r in after) / (steps * len(after)),
        "waves": g1.wave - g0.wave,
    }
    row["step / busiest"] = row["mean step ms"] / row["mean busiest-rank compute ms"]
    return row


async def settled(stub) -> dict[int, common_pb2.DPGroupState]:
    rows: dict[int, common_pb2.DPGroupState] = {}

    async def paused() -> bool:
        nonlocal rows
        snap = await load_snapshot(stub)
        rows = {w.worker.dp_rank: w.dp_group for w in snap.workers if w.HasField("dp_group")}
        states = list(rows.values())
        return bool(states) and not any(s.running for s in states) and len({s.steps for s in states}) == 1

    await wait_until(paused, timeout=120, what="the group to pause")
    return rows


async def _tokens(call) -> int:
    return sum([len(chunk.token_ids) async for chunk in call], 0)


async def run(args: argparse.Namespace) -> list[dict]:
    dispatcher, ranks = start(args, tempfile.mkdtemp(prefix="pdlb-lockstep-"))
    try:
        channel, stub = dispatch_stub(dispatcher.address)
        await settled(stub)
        await phase(stub, "warm-up", [2] * args.ranks, args)
        rows = [
            await phase(stub, "skewed", [args.batch] + [0] * (args.ranks - 1), args),
            await phase(stub, "even", [args.batch // args.ranks] * args.ranks, args),
            await phase(stub, "even-double", [args.batch] * args.ranks, args),
        ]
        await channel.close()
        return rows
    finally:
        for proc in [*ranks, dispatcher]:
            proc.terminate(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (rank r on cuda:r, NCCL) or cpu (gloo)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--hidden-size", type=int, default=576)
    parser.add_argument("--num-layers", type=int, default=30)
    parser.add_argument("--num-heads", type=int, default=9)
    parser.add_argument("--kv-tokens", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=32, help="requests on the busy rank")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=64)
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    print(json.dumps(rows, indent=1))
    print("| phase | requests per rank | group steps | mean step ms | busiest-rank compute ms | step / busiest | "
          "dummy share | waves | tok/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['requests per rank']} | {r['group steps']} | {r['mean step ms']:.2f} | "
            f"{r['mean busiest-rank compute ms']:.2f} | {r['step / busiest']:.2f} | {r['dummy share']:.0%} | "
            f"{r['waves']} | {r['tok/s']:.0f} |"
        )


if __name__ == "__main__":
    main()
