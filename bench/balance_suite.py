"""The balancing workload set, every method and peer on each, several seeds: medians of ratios to
round robin taken within each run (same cluster, same workload, methods in rotating order).

Each (workload, load, seed) is one `bench.balance_bench` run; the table reports, per method and
workload, the median over seeds of TTFT p99 / round robin's, of throughput / round robin's and of
the mean token imbalance (max / mean tokens per rank over time), and for sim ranks the TTFT floor
(each request alone on an idle rank: what no placement can beat) and the queueing p99 (TTFT less
that floor). A load is a share of the workload's capacity (what the ranks serve when overloaded,
recorded per lockstep group size; `--probe` measures it). The goals of the balancing issue are
checked for the recommended method at the end.

  python -m bench.balance_suite                         # independent ranks, 3 seeds
  python -m bench.balance_suite --group-size 4 --name suite_lockstep4 --workloads heavy_tail,bursts_16
  python -m bench.balance_suite --probe --seeds 2 --num-requests 300     # measure the capacities
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import balance_bench

RESULTS = balance_bench.RESULTS
METHODS = (
    "least_wait,total_requests,predicted_latency,cache_aware,round_robin,peer_vllm_dp,"
    "peer_sglang_minimum_tokens,peer_dynamo_kv,peer_llmd,peer_sglang_lmetric"
)
NO_TAIL = ["--long-tail-fraction", "0"]
# name: (flags, capacity in requests/s by lockstep group size); chat-sized prompts unless the flags
# say otherwise. A capacity is what 8 sim ranks served when overloaded (round robin, `--probe`,
# median of 2 seeds of 300 requests); a load is a share of it, so "high" means the same pressure on
# every workload. Lockstep groups serve less: a step lasts as long as the group's busiest rank's.
WORKLOADS: dict[str, tuple[list[str], dict[int, float]]] = {
    "chat": (["--arrivals", "poisson", *NO_TAIL], {1: 12.0}),
    "heavy_tail": (["--arrivals", "poisson", "--long-tail-fraction", "0.1"], {1: 7.6, 4: 6.3}),
    "bursts_4": (["--arrivals", "bursty", "--burst-size", "4", *NO_TAIL], {1: 12.3}),
    "bursts_16": (["--arrivals", "bursty", "--burst-size", "16", *NO_TAIL], {1: 11.6, 4: 8.7}),
    "bursts_32": (["--arrivals", "bursty", "--burst-size", "32", *NO_TAIL], {1: 11.0}),
    "bimodal": (["--arrivals", "bursty", "--burst-size", "8", "--doc-fraction", "0.2", *NO_TAIL], {1: 10.2, 4: 7.8}),
    "shared_mix": (
        ["--arrivals", "poisson", "--prefix-groups", "8", "--prefix-len", "512", "--shared-fraction", "0.5", *NO_TAIL],
        {1: 11.1},
    ),
}
LOADS = {"moderate": 0.6, "high": 0.85}  # shares of the workload's capacity
PROBE_LOAD = 2.0  # the probe offers twice the recorded capacity, so queues never run dry
PEERS_PREFIX = "peer_"


def is_peer(method: str) -> bool:
    """Peers' policies; round robin is SGLang's (and vLLM's simplest) too."""
    return method.startswith(PEERS_PREFIX) or method == "round_robin"


def run(args: argparse.Namespace) -> list[dict]:
    """Every (workload, load, seed) run, `--jobs` at a time (each its own cluster: a machine with
    many cores runs several without them sharing cores much)."""
    configs = []
    for workload in args.workloads.split(","):
        flags, recorded = WORKLOADS[workload]
        # a probe of a group size never measured starts from the independent ranks' capacity
        capacity = recorded.get(args.group_size) or (recorded[1] if args.probe else None)
        if capacity is None:
            raise SystemExit(f"{workload}: no capacity recorded for groups of {args.group_size}; measure it (--probe)")
        for load in args.loads.split(","):
            rate = round((PROBE_LOAD if load == "probe" else LOADS[load]) * capacity, 1)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                name = f"{args.name}_{workload}_{load}_s{seed}"
                argv = [
                    *flags,
                    "--rates", str(rate), "--seed", str(seed), "--num-requests", str(args.num_requests),
                    "--methods", args.methods, "--group-size", str(args.group_size), "--name", name,
                    "--out", str(args.runs),
                ]  # fmt: skip
                configs.append((workload, load, seed, name, argv))
    runs = Path(args.runs)

    def one(config) -> None:
        _, _, _, name, argv = config
        if args.jobs == 1:
            balance_bench.main(argv)
            return
        with open(runs / f"{name}.log", "w") as log:
            done = subprocess.run([sys.executable, "-m", "bench.balance_bench", *argv], stdout=log, stderr=log)
        if done.returncode:
            print(f"{name} failed (exit {done.returncode}); see {runs / name}.log", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, configs))
    rows = []
    for workload, load, seed, name, _ in configs:
        result = runs / f"{name}.json"
        if not result.is_file():
            continue  # a failed run: said above, and left out of the medians
        for record in json.loads(result.read_text()):
            rows.append({**record["row"], "workload": workload, "load": load, "seed": seed})
    return rows


def summarise(rows: list[dict], recommended: str) -> str:
    cells: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    by_run: dict[tuple[str, str, int], dict[str, dict]] = {}
    for row in rows:
        by_run.setdefault((row["workload"], row["load"], row["seed"]), {})[row["method"]] = row
    for (workload, load, _), runs in by_run.items():
        base = runs.get("round_robin")
        if base is None:
            continue
        for method, row in runs.items():
            keys = ("p99", "tput", "imb", "dummy", "step", "floor", "queued")
            cell = cells.setdefault((workload, load, method), {k: [] for k in keys})
            if row.get("dummy_step_share") == row.get("dummy_step_share"):  # lockstep runs only (not NaN)
                cell["dummy"].append(row["dummy_step_share"])
                cell["step"].append(row["step_imbalance"])
            cell["p99"].append(row["ttft_p99_ms"] / base["ttft_p99_ms"])
            cell["tput"].append(row["throughput_tok_s"] / base["throughput_tok_s"])
            cell["imb"].append(row["imbalance_mean"])
            if row.get("ttft_floor_p99_ms", 0) > 0:  # sim runs of mixed ranks
                cell["floor"].append(row["ttft_floor_p99_ms"] / base["ttft_p99_ms"])
                cell["queued"].append(row["queued_p99_ms"] / base["queued_p99_ms"])
    columns = sorted({(w, load) for w, load, _ in cells}, key=lambda c: (list(WORKLOADS).index(c[0]), c[1]))
    methods = list(dict.fromkeys(m for _, _, m in cells))
    tables = [
        ("TTFT p99 / round robin (median over seeds; lower is better)", "p99", "{:.2f}"),
        ("throughput / round robin (median over seeds)", "tput", "{:.2f}"),
        ("mean token imbalance (median over seeds)", "imb", "{:.2f}"),
    ]
    if any(c["floor"] for c in cells.values()):
        tables += [
            (
                "TTFT floor p99 / round robin's TTFT p99: the lowest ratio any placement could reach "
                "(each request alone on an idle rank; median over seeds)",
                "floor",
                "{:.2f}",
            ),
            (
                "queueing p99 / round robin (TTFT less the request's own floor: the delay placement "
                "decides; median over seeds)",
                "queued",
                "{:.2f}",
            ),
        ]
    if any(c["dummy"] for c in cells.values()):
        tables += [
            ("dummy-step share (lockstep) (median over seeds)", "dummy", "{:.1%}"),
            ("per-step imbalance (lockstep) (median over seeds)", "step", "{:.2f}"),
        ]
    lines = []
    for title, key, fmt in tables:
        lines.append(f"## {title}\n")
        lines.append("| method | " + " | ".join(f"{w} {load}" for w, load in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        # the floor is the workload's, the same in every method's row: one row (round robin's run)
        for method in ["round_robin"] if key == "floor" else methods:
            values = [cells.get((w, load, method)) for w, load in columns]
            lines.append(
                f"| {'any method' if key == 'floor' else method} | "
                + " | ".join(fmt.format(statistics.median(v[key])) if v and v[key] else "-" for v in values)
                + " |"
            )
        lines.append("")
    lines.append(f"## Goals for `{recommended}`\n")
    for w, load in columns:
        mine = cells.get((w, load, recommended))
        if not mine:
            continue
        peers = {m: c for (w2, l2, m), c in cells.items() if (w2, l2) == (w, load) and is_peer(m)}
        peer_p99 = ((m, statistics.median(c["p99"])) for m, c in peers.items())
        best_peer, best_p99 = min(peer_p99, key=lambda kv: kv[1], default=("-", float("nan")))
        peer_tput = max((statistics.median(c["tput"]) for c in peers.values()), default=float("nan"))
        p99, tput, imbalance = (statistics.median(mine[k]) for k in ("p99", "tput", "imb"))
        floor = f"; floor {statistics.median(mine['floor']):.2f}x RR" if mine["floor"] else ""
        lines.append(
            f"- {w} {load}: p99 {p99:.2f}x RR ({'met' if p99 <= 0.5 else 'not met'} <= 0.5{floor}); best peer "
            f"{best_peer} {best_p99:.2f}x ({'below' if p99 < best_p99 else 'not below'}); throughput "
            f"{tput:.2f}x RR vs best peer {peer_tput:.2f}x; token imbalance {imbalance:.2f}"
        )
    return "\n".join(lines) + "\n"


def capacities(rows: list[dict], group_size: int) -> str:
    """What the probe measured: requests/s served under overload, per workload (median over seeds)."""
    lines = ["| workload | recorded capacity req/s | measured req/s (median) | runs |", "|---|---|---|---|"]
    for workload, (_, recorded) in WORKLOADS.items():
        measured = [r["requests_per_s"] for r in rows if r["workload"] == workload and r["load"] == "probe"]
        if measured:
            was = recorded.get(group_size)
            lines.append(
                f"| {workload} | {was if was else '-'} | {statistics.median(measured):.1f} | {len(measured)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--loads", default="high,moderate", help=f"high, moderate or both (shares of capacity: {LOADS})"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own cluster")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--recommended", default="predicted_latency", help="the method whose goals are checked")
    parser.add_argument("--group-size", type=int, default=1)
    parser.add_argument("--name", default="suite")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--runs", default=str(RESULTS / "runs"), help="where each run's own files go")
    parser.add_argument("--summarise-only", action="store_true", help="re-read <out>/<name>.json")
    parser.add_argument(
        "--probe",
        action="store_true",
        help=f"measure each workload's capacity instead: round robin offered {PROBE_LOAD:g}x the recorded one",
    )
    args = parser.parse_args(argv)
    if args.probe:
        args.loads, args.methods, args.name = "probe", "round_robin", f"{args.name}_probe"
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    if args.summarise_only:
        rows = json.loads((Path(args.out) / f"{args.name}.json").read_text())
    else:
        rows = run(args)
        (Path(args.out) / f"{args.name}.json").write_text(json.dumps(rows))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "runs", "summarise_only", "jobs")}
    body = capacities(rows, args.group_size) if args.probe else summarise(rows, args.recommended)
    text = f"# Balancing suite\n\nSettings: {json.dumps(settings)}\n\n" + body
    (Path(args.out) / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
