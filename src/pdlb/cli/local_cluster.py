"""`pdlb up`: etcd, bootstrap, dispatchers and schedulers as child processes on this machine."""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import grpc

from pdlb.cli import state
from pdlb.common.etcd_process import EtcdProcess, free_port
from pdlb.common.membership import connect_client
from pdlb.common.processes import ServiceProcess, script
from pdlb.models.catalog import SMOLLM2, TINY
from pdlb.v1 import dispatch_pb2, dispatch_pb2_grpc

TINY_MODEL = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["pd", "mixed"], default="pd", help="PD disaggregated, or mixed workers")
    parser.add_argument("--prefill", type=int, default=2, help="PD: prefill ranks")
    parser.add_argument("--decode", type=int, default=2, help="PD: decode ranks")
    parser.add_argument("--workers", type=int, default=2, help="mixed: DP ranks")
    # Defaults follow the benchmarks (docs/BENCHMARKS.md): predicted_latency for mixed and prefill
    # dispatchers of independent workers, least_wait for decode; in lockstep groups cache_aware for
    # mixed and prefill, total_requests for decode.
    parser.add_argument("--prefill-method", default="", help="prefill dispatcher's method (default: see above)")
    parser.add_argument("--decode-method", default="", help="decode dispatcher's method (default: see above)")
    parser.add_argument(
        "--method",
        default="",
        help="mixed dispatcher's method (default: predicted_latency; cache_aware with --lockstep)",
    )
    parser.add_argument("--runner", choices=["torch", "sim"], default="torch", help="scheduler runner")
    parser.add_argument(
        "--engine",
        choices=["pdlb", "vllm"],
        default="pdlb",
        help="what runs requests: pdlb's own engine, or vLLM servers (mixed mode; one worker per vLLM DP rank)",
    )
    parser.add_argument(
        "--vllm-url",
        default="",
        help="vllm: attach to these running servers (URL[,URL...]) instead of starting one; each holds "
        "--vllm-server-ranks DP ranks",
    )
    parser.add_argument(
        "--vllm-server-ranks",
        type=int,
        default=0,
        help="vllm: DP ranks per server (default: --workers when pdlb starts the server, else 1)",
    )
    parser.add_argument("--vllm-port", type=int, default=8100, help="vllm: port of the server pdlb starts (0: free)")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="vllm: --dtype of the server pdlb starts")
    parser.add_argument(
        "--vllm-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="vllm: start the server with --enforce-eager (no torch.compile: faster start, slower steps)",
    )
    parser.add_argument(
        "--model",
        default=SMOLLM2,
        help=f"what every scheduler and dispatcher serves: {SMOLLM2}, {TINY}, a .gguf file or a model directory",
    )
    parser.add_argument("--etcd-port", type=int, default=2379, help="etcd client port (0: any free port)")
    parser.add_argument(
        "--port",
        type=int,
        default=50051,
        help="first dispatcher's port; the decode one gets +1, bootstrap +9 (0: free ports)",
    )
    parser.add_argument(
        "--dispatchers",
        type=int,
        default=1,
        help="dispatcher replicas per role (the gateway spreads requests over them)",
    )
    parser.add_argument(
        "--http-port", type=int, default=8000, help="the gateway's HTTP port: OpenAI API and dashboard (0: free)"
    )
    parser.add_argument("--log-dir", default="", help="where service logs go (default: a new temp dir)")
    parser.add_argument("--scheduler-arg", action="append", default=[], help="extra flag for every scheduler")
    parser.add_argument(
        "--lockstep",
        action="store_true",
        help="each role's ranks form one lockstep DP-attention group (request waves), as with DP attention",
    )


@dataclass
class LocalCluster:
    args: argparse.Namespace
    etcd: EtcdProcess | None = None
    services: list[ServiceProcess] = field(default_factory=list)
    vllm_servers: list = field(default_factory=list)  # VLLMServer children, stopped after the schedulers
    prefix: str = "/pdlb"
    log_dir: str = ""

    def _port(self, offset: int) -> str:
        return str(self.args.port + offset) if self.args.port else "0"

    def start(self) -> dict:
        args = self.args
        first = "cache_aware" if args.lockstep else "predicted_latency"  # mixed and prefill
        args.method = args.method or first
        args.prefill_method = args.prefill_method or first
        args.decode_method = args.decode_method or ("total_requests" if args.lockstep else "least_wait")
        self.log_dir = args.log_dir or tempfile.mkdtemp(prefix="pdlb-cluster-")
        if args.engine == "vllm":
            if args.mode != "mixed":
                raise SystemExit(
                    "pdlb up --engine vllm runs mixed workers (--mode mixed): vLLM's PD needs its own KV connectors"
                )
            self._vllm_targets()
        self.etcd = EtcdProcess(client_port=args.etcd_port)
        self.etcd.start()
        common = ["--etcd", self.etcd.endpoint, "--etcd-prefix", self.prefix, "--lease-ttl", "5"]
        info: dict = {"mode": args.mode, "etcd": self.etcd.endpoint, "log_dir": self.log_dir}
        replicas: list[str] = []
        if args.mode == "mixed":
            info["dispatcher"] = self._run(
                "dispatcher", common, "--port", self._port(0), "--load-balance-method", args.method
            )
            for r in range(1, args.dispatchers):  # replicas: the gateway spreads requests over them
                replicas.append(
                    self._run(
                        "dispatcher",
                        common,
                        "--port",
                        self._port(10 + r),
                        "--load-balance-method",
                        args.method,
                        name=f"dispatcher-{r}",
                    )
                )
            self._schedulers(common, "null", args.workers)
            for address in [info["dispatcher"], *replicas]:
                self._await_workers(address, args.workers)
        else:
            info["bootstrap"] = self._run("bootstrap", common, "--port", self._port(9))
            info["prefill_dispatcher"] = self._run(
                "dispatcher",
                common,
                "--port",
                self._port(0),
                name="dispatcher-prefill",
                extra=["--disaggregation-mode", "prefill", "--load-balance-method", args.prefill_method],
            )
            info["decode_dispatcher"] = self._run(
                "dispatcher",
                common,
                "--port",
                self._port(1),
                name="dispatcher-decode",
                extra=["--disaggregation-mode", "decode", "--load-balance-method", args.decode_method],
            )
            for r in range(1, args.dispatchers):
                for offset, role, method in (
                    (10 + 2 * r, "prefill", args.prefill_method),
                    (11 + 2 * r, "decode", args.decode_method),
                ):
                    replicas.append(
                        self._run(
                            "dispatcher",
                            common,
                            "--port",
                            self._port(offset),
                            name=f"dispatcher-{role}-{r}",
                            extra=["--disaggregation-mode", role, "--load-balance-method", method],
                        )
                    )
            self._schedulers(common, "prefill", args.prefill)
            self._schedulers(common, "decode", args.decode)
            self._await_workers(info["prefill_dispatcher"], args.prefill)
            self._await_workers(info["decode_dispatcher"], args.decode)
            for index, address in enumerate(replicas):  # prefill, decode, prefill, ...
                self._await_workers(address, args.decode if index % 2 else args.prefill)
        if replicas:
            info["replicas"] = replicas
        http_port = args.http_port or free_port()
        info["gateway"] = self._run("gateway", common, "--port", self._port(8), "--http-port", str(http_port))
        info["http"] = f"http://127.0.0.1:{http_port}"
        self._await_gateway(info["http"])
        info["workers"] = {s.name: s.address for s in self.services if s.name.startswith("scheduler")}
        info["pids"] = [s.pid for s in self.services] + ([self.etcd.proc.pid] if self.etcd.proc else [])
        state.save(info)
        return info

    def _run(self, kind: str, common: list[str], *flags: str, name: str = "", extra: list[str] | None = None) -> str:
        model = ["--model", self.args.model] if kind in ("dispatcher", "gateway") else []
        argv = [*script(f"pdlb-{kind}"), *common, *model, *flags, *(extra or [])]
        proc = ServiceProcess(name or kind, argv, self.log_dir)
        self.services.append(proc)
        return proc.start().address

    def _schedulers(self, common: list[str], mode: str, count: int) -> None:
        procs = []
        group = (
            ["--dp-group-size", str(count), "--dp-group-address", f"127.0.0.1:{free_port()}"]
            if self.args.lockstep and count > 1
            else []
        )
        for rank in range(count):
            proc = ServiceProcess(
                f"scheduler-{'mixed' if mode == 'null' else mode}-{rank}",
                [
                    *script("pdlb-scheduler"),
                    *common,
                    "--model",
                    self.args.model,
                    "--port",
                    "0",
                    "--disaggregation-mode",
                    mode,
                    "--dp-rank",
                    str(rank),
                    "--runner",
                    self.args.runner,
                    *self._vllm_flags(rank),
                    *TINY_MODEL,
                    *group,
                    *self.args.scheduler_arg,
                ],
                self.log_dir,
            )
            self.services.append(proc)
            procs.append(proc)
        # Schedulers import torch (seconds each): start them side by side, then wait for each.
        for proc in procs:
            proc.spawn()
        for proc in procs:
            proc.wait_ready(self.args.vllm_wait if self.args.engine == "vllm" else 60.0)

    def _vllm_targets(self) -> None:
        """The vLLM servers the workers use: those at --vllm-url, else one started here with
        --data-parallel-size --workers (waits until it is healthy: minutes on a CPU)."""
        from pdlb.engines.vllm.server import VLLMServer, VLLMServerSpec, find_venv, missing_reason

        args = self.args
        args.vllm_wait = 900.0
        if args.vllm_url:
            args.vllm_urls = [u.strip() for u in args.vllm_url.split(",") if u.strip()]
            args.vllm_server_ranks = args.vllm_server_ranks or 1
            args.workers = len(args.vllm_urls) * args.vllm_server_ranks
            return
        venv = find_venv()
        if venv is None:
            raise SystemExit(f"pdlb up --engine vllm: {missing_reason()}")
        args.vllm_server_ranks = args.vllm_server_ranks or args.workers
        if args.workers % args.vllm_server_ranks:
            raise SystemExit("--workers must be a multiple of --vllm-server-ranks")
        port = args.vllm_port or free_port()
        for index in range(args.workers // args.vllm_server_ranks):
            spec = VLLMServerSpec(
                port=port + index,
                venv=venv,
                dp_size=args.vllm_server_ranks,
                dtype=args.vllm_dtype,
                enforce_eager=args.vllm_eager,
            )
            server = VLLMServer(spec, f"{self.log_dir}/vllm-{index}.log").spawn()
            self.vllm_servers.append(server)
        print(
            f"starting {len(self.vllm_servers)} vLLM server(s); logs in {self.log_dir} (minutes on a CPU)", flush=True
        )
        for server in self.vllm_servers:
            server.wait_ready()
            print(f"vLLM at {server.url} ready after {server.ready_s:.0f} s", flush=True)
        args.vllm_urls = [server.url for server in self.vllm_servers]

    def _vllm_flags(self, rank: int) -> list[str]:
        args = self.args
        if args.engine != "vllm":
            return []
        url = args.vllm_urls[rank // args.vllm_server_ranks]
        return ["--engine", "vllm", "--vllm-url", url, "--vllm-server-ranks", str(args.vllm_server_ranks)]

    @staticmethod
    def _await_gateway(http: str, timeout: float = 30) -> None:
        """Until the gateway has found the dispatchers (its /health says ok)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{http}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway at {http} is not healthy after {timeout}s")
            time.sleep(0.1)

    @staticmethod
    def _await_workers(address: str, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(address) as channel:
            stub = dispatch_pb2_grpc.DispatchStub(channel)
            while len(stub.ListWorkers(dispatch_pb2.ListWorkersRequest(), timeout=5).workers) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dispatcher {address} sees fewer than {count} workers after {timeout}s")
                time.sleep(0.1)

    def stop(self) -> list[str]:
        """Schedulers first (they deregister), then dispatchers and bootstrap, then etcd.
        Returns the etcd keys left behind (none when every service deregistered)."""
        order = sorted(self.services, key=lambda s: 0 if s.name.startswith("scheduler") else 1)
        threads = [threading.Thread(target=s.terminate) for s in order if s.name.startswith("scheduler")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for service in order:
            service.terminate()
        for server in self.vllm_servers:
            server.stop()
        leftover = self._leftover_keys()
        if self.etcd:
            self.etcd.close()
        state.clear()
        return leftover

    def _leftover_keys(self) -> list[str]:
        if not self.etcd or not self.etcd.proc:
            return []

        async def keys() -> list[str]:
            client = connect_client(self.etcd.endpoint)
            try:
                return [kv.key.decode() for kv in await client.get_prefix(self.prefix.encode())]
            finally:
                await client.close()

        try:
            return asyncio.run(keys())
        except Exception:
            return []


def run(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        info = cluster.start()
        print_summary(info)
        stop.wait()
    finally:
        print("\nstopping: schedulers, dispatchers, bootstrap, etcd ...", flush=True)
        leftover = cluster.stop()
        print("stopped; etcd keys left behind: " + (", ".join(leftover) if leftover else "none"), flush=True)
    return 0


def print_summary(info: dict) -> None:
    print(f"pdlb local cluster ({info['mode']}) is up; logs in {info['log_dir']}")
    print(f"  etcd                 {info['etcd']}")
    for key in ("bootstrap", "dispatcher", "prefill_dispatcher", "decode_dispatcher", "gateway"):
        if key in info:
            print(f"  {key.replace('_', ' '):<20} {info[key]}")
    for name, address in info["workers"].items():
        print(f"  {name:<20} {address}")
    for address in info.get("replicas", []):
        print(f"  {'dispatcher replica':<20} {address}")
    print(f"  OpenAI API           {info['http']}/v1   (dashboard: {info['http']}/dashboard)")
    print(
        'try:  pdlb generate --chat "What is the capital of France?"   |   pdlb top   |   pdlb workers'
        "      (Ctrl-C stops everything)",
        flush=True,
    )
