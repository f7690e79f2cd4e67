"""`pdlb up`: etcd, bootstrap, dispatchers, schedulers and the gateway as child processes on this
machine, supervised: a child that dies is restarted (`cli/supervisor.py`).

Start-up fails fast and plainly: taken ports and a running cluster of the same name are refused
before anything starts, and a child that exits while starting is reported at once with its own
error line. Progress is printed while the schedulers load the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc

from pdlb.cli import stale_dirs, state
from pdlb.cli.flag_types import int_from
from pdlb.cli.supervisor import Supervisor
from pdlb.common.config import SHUTDOWN_GRACE_S, TRUE_WORDS, FlagRefused, integer
from pdlb.common.etcd_process import EtcdProcess
from pdlb.common.free_port import free_port
from pdlb.common.membership import connect_client
from pdlb.common.plurals import counted
from pdlb.common.processes import ServiceFailed, ServiceProcess, script
from pdlb.engines.torch.eviction import eviction_order
from pdlb.models.catalog import SMOLLM2, TINY, resolve
from pdlb.models.config import UnsupportedModel
from pdlb.v1 import dispatch_pb2, dispatch_pb2_grpc

TINY_MODEL = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4"]
START_TIMEOUT_S = 600.0  # a child that has not announced itself by then is stuck (one that exits is seen at once)
PROGRESS_EVERY_S = 15.0
TERMINATE_WAIT_S = 30.0  # a child not gone this long after SIGTERM (or its grace and a third of this) is killed
HALT_WAIT_S = 2.0  # after a second Ctrl-C: how long children get to exit before SIGKILL
# Port offsets from --port: prefill (or mixed) dispatcher, decode dispatcher, gateway (gRPC), bootstrap;
# replicas from REPLICA_OFFSET on.
DECODE_OFFSET, GATEWAY_OFFSET, BOOTSTRAP_OFFSET, REPLICA_OFFSET = 1, 8, 9, 10


ranks = int_from(1, "ranks", "a role without ranks serves nothing")
restarts = int_from(0, "restarts", "0: never restart")


def port(text: str) -> int:
    value = integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535; 0: any free port)")
    return value


class Given(argparse.Action):
    """Stores the value and records the flag in `namespace.given` (a set of dests), so a flag given
    with its default value can still be told from one left out."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


class GivenTrue(argparse.Action):
    """A flag without a value (`--x`) that sets True and records itself in `namespace.given` as
    Given does."""

    def __init__(self, option_strings, dest, default=False, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        setattr(namespace, self.dest, True)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


class GivenSwitch(argparse.BooleanOptionalAction):
    """An on/off flag (`--x` / `--no-x`) that records itself in `namespace.given` as Given does."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        super().__call__(parser, namespace, values, option_string)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


# the gateway's flags pdlb up sets itself: its addresses, and where it finds the rest of the cluster
GATEWAY_SET_BY_UP = (
    "--port", "--http-port", "--etcd", "--etcd-prefix", "--model", "--dispatcher", "--prefill-dispatcher",
    "--decode-dispatcher", "--bootstrap",
)  # fmt: skip
# flags that size or configure one mode's roles: given with the other mode they would act on nothing
MODE_FLAGS = {
    "pd": ("prefill", "decode", "prefill_method", "decode_method", "vllm_decode_url"),
    "mixed": ("workers", "method"),
}
# flags only one engine reads: given with the other engine they would act on nothing
ENGINE_FLAGS = {
    "vllm": (
        "vllm_url", "vllm_decode_url", "vllm_kv_connector", "vllm_server_ranks", "vllm_port", "vllm_dtype",
        "vllm_eager",
    ),
    "pdlb": ("runner", "prefix_eviction", "lockstep"),  # vLLM runs its own DP waves
}  # fmt: skip


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _other_engine(args: argparse.Namespace) -> str:
    return "pdlb" if getattr(args, "engine", "pdlb") == "vllm" else "vllm"


def flags_of_the_other_mode(args: argparse.Namespace) -> list[str]:
    """The flags given on the command line that only the mode not chosen reads, as typed (--workers)."""
    # a variable set for every run is no contradiction; a different value on the line is
    from_env = getattr(args, "env_flags", {})
    given = getattr(args, "given", set()) | {
        d
        for d in ("prefill_method", "decode_method", "method")
        if hasattr(args, d) and (d not in from_env or getattr(args, d) != os.environ.get(from_env[d]))
    }
    other = "mixed" if args.mode == "pd" else "pd"
    return [_flag(dest) for dest in MODE_FLAGS[other] if dest in given]


def flags_of_the_other_engine(args: argparse.Namespace) -> list[str]:
    """The flags given on the command line that only the engine not chosen reads, as typed
    (--vllm-port with --engine pdlb, --runner with --engine vllm)."""
    given = getattr(args, "given", set())
    return [_flag(dest) for dest in ENGINE_FLAGS[_other_engine(args)] if dest in given]


def _variables_of_the_other_mode(args: argparse.Namespace) -> list[str]:
    on_line = set(flags_of_the_other_mode(args))
    other = "mixed" if args.mode == "pd" else "pd"
    names = [(dest, f"PDLB_UP_{dest.upper()}") for dest in MODE_FLAGS[other]]
    return [name for dest, name in names if name in os.environ and _flag(dest) not in on_line]


def _variables_of_the_other_engine(args: argparse.Namespace) -> list[str]:
    # a variable of both the other mode and the other engine (PDLB_UP_VLLM_DECODE_URL) is named once, by the mode
    of_mode = set(_variables_of_the_other_mode(args))
    on_line = set(flags_of_the_other_engine(args))
    names = [(dest, f"PDLB_UP_{dest.upper()}") for dest in ENGINE_FLAGS[_other_engine(args)]]
    return [n for dest, n in names if n in os.environ and n not in of_mode and _flag(dest) not in on_line]


def ignored_variables(args: argparse.Namespace) -> list[str]:
    """The PDLB_UP_* variables set for flags only the mode or the engine not chosen reads (and not
    given on the command line), whatever their values: an ignored variable's value is not checked either."""
    return _variables_of_the_other_mode(args) + _variables_of_the_other_engine(args)


def variables_of_the_other_mode(args: argparse.Namespace) -> str | None:
    """One line for stderr naming the PDLB_UP_* variables that set a flag only the mode not chosen
    reads (PDLB_UP_WORKERS in a PD cluster), or None. Not a refusal, as the same flag on the
    command line is: a variable may be set for every run, of either mode, so the start goes on;
    but a cluster sized otherwise than its user thought is told of, not left silent."""
    other = "mixed" if args.mode == "pd" else "pd"
    ignored = [f"{name}={os.environ[name]}" for name in _variables_of_the_other_mode(args)]
    if not ignored:
        return None
    sizes = "--prefill and --decode" if args.mode == "pd" else "--workers"
    one = len(ignored) == 1
    return (
        f"{', '.join(ignored)} {'is' if one else 'are'} ignored: {'it sets a flag' if one else 'they set flags'} of "
        f"--mode {other}, and this cluster is --mode {args.mode} (its ranks: {sizes}); "
        f"unset {'it' if one else 'them'}, or add --mode {other}"
    )


def variables_of_the_other_engine(args: argparse.Namespace) -> str | None:
    """One line for stderr naming the PDLB_UP_* variables that set a flag only the engine not
    chosen reads (PDLB_UP_VLLM_PORT with --engine pdlb), or None; not a refusal, as for the mode's."""
    ignored = [f"{name}={os.environ[name]}" for name in _variables_of_the_other_engine(args)]
    if not ignored:
        return None
    other, one = _other_engine(args), len(ignored) == 1
    return (
        f"{', '.join(ignored)} {'is' if one else 'are'} ignored: {'it sets a flag' if one else 'they set flags'} of "
        f"--engine {other}, and this cluster runs --engine {args.engine}; unset {'it' if one else 'them'}, or add "
        f"--engine {other}"
    )


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, except empty ones and those the help text already explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in ("", [], False, None) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsShown
    parser.add_argument("--mode", choices=["pd", "mixed"], default="pd", help="PD disaggregated, or mixed workers")
    parser.add_argument("--prefill", type=ranks, default=2, action=Given, help="PD: prefill ranks")
    parser.add_argument("--decode", type=ranks, default=2, action=Given, help="PD: decode ranks")
    parser.add_argument("--workers", type=ranks, default=2, action=Given, help="mixed: DP ranks")
    # Defaults follow the benchmarks (docs/BENCHMARKS.md): predicted_latency for mixed and prefill
    # dispatchers of independent workers, least_wait for decode; in lockstep groups cache_aware for
    # mixed and prefill, total_requests for decode.
    parser.add_argument(
        "--prefill-method",
        default=argparse.SUPPRESS,
        help="prefill dispatcher's method (default: predicted_latency; cache_aware with --lockstep)",
    )
    parser.add_argument(
        "--decode-method",
        default=argparse.SUPPRESS,
        help="decode dispatcher's method (default: least_wait; total_requests with --lockstep)",
    )
    parser.add_argument(
        "--method",
        default=argparse.SUPPRESS,
        help="mixed dispatcher's method (default: predicted_latency; cache_aware with --lockstep)",
    )
    parser.add_argument(
        "--runner", choices=["torch", "sim"], default="torch", action=Given, help="pdlb: the schedulers' runner"
    )
    parser.add_argument(
        "--engine",
        choices=["pdlb", "vllm"],
        default="pdlb",
        help="what runs requests: pdlb's own engine, or vLLM servers (one worker per vLLM DP rank; PD through "
        "vLLM's KV connector)",
    )
    parser.add_argument(
        "--vllm-url",
        default="",
        action=Given,
        help="vllm: attach to these running servers (URL[,URL...]) instead of starting one; each holds "
        "--vllm-server-ranks DP ranks (PD: the prefill servers)",
    )
    parser.add_argument(
        "--vllm-decode-url",
        default="",
        action=Given,
        help="vllm, PD: the decode servers to attach to (URL[,URL...]), on the same KV connector as --vllm-url's",
    )
    parser.add_argument(
        "--vllm-kv-connector",
        default="ExampleConnector",
        action=Given,
        help="vllm, PD: the KV connector of the vLLM servers (pdlb up starts its own with vLLM's shared-storage "
        "ExampleConnector, on one directory per cluster; attached servers must already run it)",
    )
    parser.add_argument(
        "--vllm-server-ranks",
        type=int_from(0, "ranks per vLLM server", "0: the role's ranks"),
        default=0,
        action=Given,
        help="vllm: DP ranks per server (default: the role's ranks (--workers, --prefill, --decode) when pdlb "
        "starts the servers, else 1)",
    )
    parser.add_argument(
        "--vllm-port", type=port, default=8100, action=Given, help="vllm: port of the server pdlb starts (0: free)"
    )
    parser.add_argument(
        "--vllm-dtype",
        default="auto",
        action=Given,
        help="vllm: --dtype of the server pdlb starts (auto: bfloat16 on CPUs with native bfloat16, AVX512-BF16 or "
        "AMX, else float32, as pdlb's own engine)",
    )
    parser.add_argument(
        "--vllm-eager",
        action=GivenSwitch,
        default=False,
        help="vllm: start the server with --enforce-eager (no torch.compile: faster start, slower steps)",
    )
    parser.add_argument(
        "--model",
        default=SMOLLM2,
        help=f"what every scheduler and dispatcher serves: {SMOLLM2}, {TINY}, a .gguf file or a model directory",
    )
    parser.add_argument("--name", default="local", help="this cluster's name (other commands take --cluster NAME)")
    parser.add_argument("--etcd-port", type=port, default=2379, help="etcd client port (0: any free port)")
    parser.add_argument(
        "--port",
        type=port,
        default=50051,
        help=f"first dispatcher's port; the decode one gets +{DECODE_OFFSET}, the gateway's gRPC "
        f"+{GATEWAY_OFFSET}, bootstrap +{BOOTSTRAP_OFFSET}, replicas above +{REPLICA_OFFSET} (0: free ports)",
    )
    parser.add_argument(
        "--dispatchers",
        type=int_from(1, "dispatchers per role", "each role needs one to route its requests"),
        default=1,
        help="dispatcher replicas per role (the gateway spreads requests over them)",
    )
    parser.add_argument(
        "--http-port", type=port, default=8000, help="the gateway's HTTP port: OpenAI API and dashboard (0: free)"
    )
    parser.add_argument("--log-dir", default="", help="where service logs go (default: a new temp dir)")
    parser.add_argument(
        "--scheduler-arg", action="append", default=[], help="extra flag for every scheduler (repeatable)"
    )
    parser.add_argument(
        "--dispatcher-arg",
        action="append",
        default=[],
        help="extra flag for every dispatcher (repeatable), e.g. --dispatcher-arg=--max-queued-requests=64",
    )
    parser.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="extra flag for the gateway (repeatable), e.g. --gateway-arg=--http-body-timeout=10 (not the "
        "addresses pdlb up sets: --port, --http-port, --etcd...)",
    )
    parser.add_argument(
        "--flow-control",
        action="store_true",
        help="dispatchers hold requests in their admission queue until a rank has room (pdlb-dispatcher "
        "--flow-control; its other flow flags through --dispatcher-arg, refused without this)",
    )
    parser.add_argument(
        "--prefix-eviction",
        default="",
        action=Given,
        help="pdlb's engines: the order the ranks' prefix caches evict in (pdlb-scheduler --prefix-eviction: lru, "
        "slru, slru-random; default: the schedulers' own, lru). vLLM servers evict LRU themselves",
    )
    parser.add_argument(
        "--lockstep",
        action=GivenTrue,
        help="each role's ranks form one lockstep DP-attention group (request waves), as with DP attention",
    )
    parser.add_argument(
        "--max-restarts",
        type=restarts,
        default=5,
        help="restarts in a row of one dead child before pdlb up gives up on it (0: never restart)",
    )


def pass_through_hint(unknown: list[str]) -> str | None:
    """For flags `pdlb up` does not take (`unknown`, as argparse leaves them): when the first is a
    flag of the dispatchers, the schedulers or the gateway (`--tenant-share 0.5`), one line saying
    how to pass it on (`--dispatcher-arg=--tenant-share=0.5`); None when it is none of theirs."""
    from pdlb.services.dispatcher.main import build_parser as dispatcher_parser
    from pdlb.services.gateway.main import build_parser as gateway_parser
    from pdlb.services.scheduler.main import build_parser as scheduler_parser  # imports torch: only here

    flag = next((arg for arg in unknown if arg.startswith("--")), None)
    if flag is None:
        return None
    name = flag.split("=", 1)[0]
    at = unknown.index(flag)
    following = unknown[at + 1] if at + 1 < len(unknown) else "--"
    value = None if "=" in flag or following.startswith("--") else following  # "-1" is a value
    typed = flag if value is None else f"{flag}={value}"
    owners = [
        (service, option)
        for service, option, parser in (
            ("pdlb-dispatcher", "--dispatcher-arg", dispatcher_parser()),
            ("pdlb-scheduler", "--scheduler-arg", scheduler_parser()),
            ("pdlb-gateway", "--gateway-arg", gateway_parser()),
        )
        if name in parser._option_string_actions  # argparse's table of the flags it takes
    ]
    if not owners:
        return None
    services = " and ".join(service for service, _ in owners)
    how = " and ".join(f"{option}={typed}" for _, option in owners)
    flow = " (with --flow-control)" if name in _flow_flags() else ""
    return f"{name} is a flag of {services}, not of pdlb up: pass it on as {how}{flow}"


PASS_THROUGH = ("--scheduler-arg", "--dispatcher-arg", "--gateway-arg")


def spaced_pass_through(argv: list[str]) -> str | None:
    """For `pdlb up`'s command line: when a --*-arg flag is followed by its value after a space and
    the value starts with '-' (`--dispatcher-arg --queue-ttl=4`), argparse takes that value for a
    flag and says only "expected one argument"; one line saying how to write it joined with '='
    (`--dispatcher-arg=--queue-ttl=4`), else None."""
    for at, arg in enumerate(argv):
        flag, joined, value = arg.partition("=")
        if joined and flag in PASS_THROUGH and value.startswith("-") and "=" not in value:
            # `--dispatcher-arg=--queue-ttl 4` (the 4 a word of its own, which pdlb up refuses) or
            # `--dispatcher-arg="--queue-ttl 4"` (one word the service would not know)
            name, space, rest = value.partition(" ")
            following = argv[at + 1] if at + 1 < len(argv) else "-"
            # a following word that is a number (`-4`) is the value too, not a flag of pdlb up
            bare = not following.startswith("-") or _is_number(following)
            typed = f"{name}={rest}" if space else f"{value}={following}" if bare else None
            if typed:
                shown = f"{arg} {following}" if not space else f"{flag}='{value}'"
                return f"{shown}: the passed-on flag's value goes after '=', not a space: write {flag}={typed}"
        if at + 1 == len(argv):
            break
        value = argv[at + 1]
        if arg not in PASS_THROUGH or not value.startswith("-") or value == "--" or _is_number(value):
            continue
        following = argv[at + 2] if at + 2 < len(argv) else "-"
        # `--dispatcher-arg --queue-ttl 4`: the 4 is the passed-on flag's value (pdlb up takes no words)
        typed = value if "=" in value or following.startswith("-") else f"{value}={following}"
        return (
            f"{arg} {value}: a value starting with '-' is read as a flag of pdlb up unless joined with '=': "
            f"write {arg}={typed}"
        )
    return None


class _ParseRefused(Exception):
    pass


def dispatcher_args_refused(passed: list[str]) -> str | None:
    """What the dispatchers would refuse of the flags `pdlb up` passes them (`passed`: its
    `--dispatcher-arg` values, with --flow-control when it is on), checked with their own parser and
    option checks, so a bad value (`--gather-ms=-1`, `--queue-ttl=abc`) stops the start before etcd
    and the other services start; None when they take them. The dispatchers' own variables count,
    as they would for the children, which inherit the environment."""
    from pdlb.services.dispatcher.main import build_parser, flow_options, policy_options

    parser = build_parser()

    def refuse(message: str) -> NoReturn:
        raise _ParseRefused(message)

    parser.error = refuse  # type: ignore[method-assign]  # argparse's usage-and-exit, as an exception
    try:
        parsed = parser.parse_args(passed)
        flow_options(parsed)
        policy_options(parsed)
    except _ParseRefused as exc:
        return str(exc)
    except FlagRefused as exc:
        return exc.message
    except SystemExit as exc:  # a refused variable: the parser wrote its line already
        return str(exc.code) if isinstance(exc.code, str) else "refused (see the line above)"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True  # argparse takes "-1" for a value, not a flag


def _flow_flags() -> tuple[str, ...]:
    from pdlb.services.dispatcher.flow_control import FLOW_FLAGS

    return FLOW_FLAGS


def passed_on(extra: list[str], flag: str, negated: str = "") -> str:
    """The value the last `flag` in `extra` (a service's flags as --*-arg passed them on) gives:
    `--flag=V` or `--flag V` -> V; an on/off `flag` -> "on", its `negated` form -> "off"; "" when absent."""
    found = ""
    for at, arg in enumerate(extra):
        name, _, value = arg.partition("=")
        if name == flag:
            following = extra[at + 1] if at + 1 < len(extra) else ""
            found = value or ("on" if negated or not following or following.startswith("--") else following)
        elif negated and name == negated:
            found = "off"
    return found


def fixed_ports(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(port, what listens there) for every port the cluster binds that was not left to chance."""
    found = [(args.etcd_port, "--etcd-port: etcd"), (args.http_port, "--http-port: the gateway's HTTP API")]
    if args.port:
        found.append((args.port, f"--port: the {'mixed' if args.mode == 'mixed' else 'prefill'} dispatcher"))
        found.append((args.port + GATEWAY_OFFSET, f"--port + {GATEWAY_OFFSET}: the gateway's gRPC"))
        if args.mode == "pd":
            found.append((args.port + DECODE_OFFSET, f"--port + {DECODE_OFFSET}: the decode dispatcher"))
            found.append((args.port + BOOTSTRAP_OFFSET, f"--port + {BOOTSTRAP_OFFSET}: bootstrap"))
        for offset in replica_offsets(args):
            found.append((args.port + offset, f"--port + {offset}: a dispatcher replica"))
    if getattr(args, "engine", "pdlb") == "vllm" and not args.vllm_url:
        found.append((args.vllm_port, "--vllm-port: the vLLM server pdlb up starts"))
    return [(p, what) for p, what in found if p]


def replica_offsets(args: argparse.Namespace) -> list[int]:
    per_role = 1 if args.mode == "mixed" else 2
    return [REPLICA_OFFSET + per_role * r + i for r in range(1, args.dispatchers) for i in range(per_role)]


def port_taken(number: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to servers
        try:
            sock.bind(("127.0.0.1", number))
        except OSError:
            return True
    return False


class StartRefused(Exception):
    """Nothing was started: the message says why and what to change."""


class StartInterrupted(Exception):
    """SIGINT or SIGTERM arrived while the cluster was starting."""


@dataclass
class LocalCluster:
    args: argparse.Namespace
    say: Callable[[str], None] = print
    etcd: EtcdProcess | None = None
    services: list[ServiceProcess] = field(default_factory=list)
    vllm_servers: list = field(default_factory=list)  # VLLMServer children, stopped after the schedulers
    kv_storage: Path | None = None  # PD on vLLM servers pdlb started: their connector's shared directory
    prefix: str = "/pdlb"
    log_dir: str = ""
    info: dict = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)  # names of the ranks of each lockstep DP group
    wake: threading.Event = field(default_factory=threading.Event)  # a child exited, or stop was asked
    stopping: threading.Event = field(default_factory=threading.Event)  # SIGINT / SIGTERM
    _own_log_dir: bool = False
    _t0: float = field(default_factory=time.monotonic)

    def flow_control(self) -> bool:
        """Whether the dispatchers run flow control (--flow-control, passed through --dispatcher-arg,
        or set by PDLB_DISPATCHER_FLOW_CONTROL, which the dispatchers inherit). A flag passed on comes
        after pdlb up's own --flow-control on their command line, so it wins, as in their parser."""
        passed = passed_on(self.args.dispatcher_arg, "--flow-control", "--no-flow-control")
        if passed:
            return passed == "on"
        return self.args.flow_control or self._child_setting("dispatcher", "--flow-control", on_off=True) == "on"

    def _child_setting(self, kind: str, flag: str, on_off: bool = False) -> str:
        """What a child of `kind` (dispatcher, scheduler) takes for `flag` from what pdlb up passes
        on to it (--dispatcher-arg, --scheduler-arg), else from its variable, which it inherits from
        pdlb up's environment: the value, "on"/"off" for an `on_off` flag, "" when neither sets it."""
        extra = {"dispatcher": self.args.dispatcher_arg, "gateway": getattr(self.args, "gateway_arg", [])}.get(
            kind, self.args.scheduler_arg
        )
        negated = "--no-" + flag[2:] if on_off else ""
        value = passed_on(extra, flag, negated)
        raw = os.environ.get(f"PDLB_{kind.upper()}_{flag[2:].replace('-', '_').upper()}")
        if value or raw is None:
            return value
        if on_off:
            return "on" if raw.strip().lower() in TRUE_WORDS else "off"
        return raw

    def shutdown_grace(self) -> float:
        """Seconds the gateway and the dispatchers give running requests when the cluster stops (they
        drain side by side): the larger of their --shutdown-grace, as passed on through --*-arg or
        set by their variables, else the services' default."""
        found = []
        for kind in ("gateway", "dispatcher"):
            raw = self._child_setting(kind, "--shutdown-grace")
            try:
                found.append(float(raw) if raw else SHUTDOWN_GRACE_S)
            except ValueError:  # the service refuses it at its start: nothing runs to wait for
                found.append(SHUTDOWN_GRACE_S)
        return max(found)

    def halt_now(self) -> None:
        """A second Ctrl-C while stopping: SIGTERM to every child still running (again, for those
        already told), SIGKILL to any still alive HALT_WAIT_S later. Blocks up to about that long;
        the `stop` under way then finds its children gone and ends."""
        deadline = time.monotonic() + HALT_WAIT_S
        procs = [s.proc for s in self.services] + ([self.etcd.proc] if self.etcd else [])
        procs = [p for p in procs if p is not None and p.poll() is None]
        for proc in procs:
            proc.terminate()
        for server in self.vllm_servers:  # their own process groups (API server and engine cores)
            server.stop(timeout=max(deadline - time.monotonic(), 0.1))
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()

    def settings(self, method: str, prefill_method: str, decode_method: str) -> dict[str, str]:
        """What the ready banner shows beside the addresses: every setting that changes how requests
        are routed, held or served, set by pdlb up's own flags or passed on through --*-arg (the
        later flag wins there, as in the service's parser). Label -> value, in banner order."""
        args = self.args
        engine = getattr(args, "engine", "pdlb")
        methods = f"{method}" if args.mode == "mixed" else f"prefill {prefill_method}, decode {decode_method}"
        found = {
            "model": args.model,
            "engine": "vLLM servers" if engine == "vllm" else f"pdlb ({args.runner} runner)",
            "method": passed_on(args.dispatcher_arg, "--load-balance-method") or methods,  # pdlb up passes its own
            "flow control": "off",
            "lockstep": "on (one DP group per role)" if args.lockstep else "off",
        }
        if self.flow_control():
            # the dispatchers' flow flags as passed on; lending is named either way (it changes
            # who gets room a tenant share or the slot reserve keeps)
            flow = [a for a in args.dispatcher_arg if a.split("=", 1)[0] in _flow_flags()]
            lending = self._child_setting("dispatcher", "--work-conserving", on_off=True)
            shares = "work-conserving (idle share lent)" if lending == "on" else "hard shares (no lending)"
            others = [a for a in flow if a.split("=", 1)[0] not in ("--work-conserving", "--no-work-conserving")]
            found["flow control"] = ", ".join(["on", shares, *others])
        if engine != "vllm":
            # pdlb up's own flag comes before --scheduler-arg on the schedulers' command line
            order = passed_on(args.scheduler_arg, "--prefix-eviction") or getattr(args, "prefix_eviction", "")
            order = order or self._child_setting("scheduler", "--prefix-eviction")
            found["prefix eviction"] = order or "lru (the schedulers' default)"
        else:
            found["prefix eviction"] = "the vLLM servers' own (LRU)"
        return found

    def _eviction_flags(self) -> list[str]:
        if getattr(self.args, "engine", "pdlb") == "vllm":  # PDLB_UP_PREFIX_EVICTION, ignored: vLLM evicts itself
            return []
        name = getattr(self.args, "prefix_eviction", "")
        return ["--prefix-eviction", name] if name else []

    def _port(self, offset: int) -> str:
        return str(self.args.port + offset) if self.args.port else "0"

    def check(self) -> None:
        """Refuse before starting anything: a --model that names no model, --engine vllm without vLLM
        installed, a running cluster of this name, a taken port, or flow-control flags for the
        dispatchers without --flow-control (they would act on nothing)."""
        args = self.args
        state.check_name(args.name)
        try:  # every dispatcher and the gateway resolve it first thing: a typo is found now
            resolve(args.model)
        except UnsupportedModel as exc:
            raise StartRefused(str(exc)) from None
        stray = flags_of_the_other_engine(args)
        if stray:
            other = _other_engine(args)
            verb, them = ("is", "it") if len(stray) == 1 else ("are", "them")
            raise StartRefused(
                f"{', '.join(stray)} {verb} for --engine {other}, and this cluster runs --engine {args.engine}; "
                f"add --engine {other}, or drop {them}"
            )
        if (
            getattr(args, "engine", "pdlb") == "vllm"
            and args.vllm_url
            and args.mode == "pd"
            and not args.vllm_decode_url
        ):
            # found now, not after etcd and the bootstrap have started
            raise StartRefused(
                "--mode pd --engine vllm --vllm-url needs --vllm-decode-url too (the decode ranks' server)"
            )
        if getattr(args, "engine", "pdlb") == "vllm" and not args.vllm_url:
            from pdlb.engines.vllm.server import find_venv, missing_reason

            if find_venv() is None:  # found now, not after etcd and the bootstrap have started
                raise StartRefused(f"--engine vllm: {missing_reason()}")
        stray = flags_of_the_other_mode(args)
        if stray:
            wanted = "pd" if args.mode == "mixed" else "mixed"
            sizes = "--prefill N --decode M" if args.mode == "pd" else "--workers N"
            verb, them = ("is", "it") if len(stray) == 1 else ("are", "them")
            raise StartRefused(
                f"{', '.join(stray)} {verb} for --mode {wanted}, and this cluster is --mode {args.mode} "
                f"(its ranks: {sizes}); add --mode {wanted}, or drop {them}"
            )
        # with --engine vllm it came from its variable, which is ignored (the line is refused above)
        if getattr(args, "prefix_eviction", "") and getattr(args, "engine", "pdlb") != "vllm":
            try:
                eviction_order(args.prefix_eviction)
            except ValueError as exc:
                # named as the user gave it: the flag, or the variable when that set it
                env = getattr(args, "env_flags", {}).get("prefix_eviction")
                given = f"{env}={args.prefix_eviction!r}" if env and os.environ.get(env) == args.prefix_eviction else ""
                raise StartRefused(f"{given or '--prefix-eviction'}: {exc}") from None
        if not self.flow_control():
            from pdlb.services.dispatcher.flow_control import FLOW_FLAGS

            for arg in args.dispatcher_arg:
                if arg.split("=", 1)[0] in FLOW_FLAGS:
                    raise StartRefused(
                        f"--dispatcher-arg={arg} acts only with --flow-control, which is off: add --flow-control or "
                        "drop it"
                    )
        if args.dispatcher_arg:
            passed = [*(["--flow-control"] if self.flow_control() else []), *args.dispatcher_arg]
            refused = dispatcher_args_refused(passed)
            if refused:
                raise StartRefused(f"--dispatcher-arg: {refused}")
        for arg in getattr(args, "gateway_arg", []):
            if arg.split("=", 1)[0] in GATEWAY_SET_BY_UP:
                raise StartRefused(
                    f"--gateway-arg={arg}: pdlb up sets {arg.split('=', 1)[0]} itself (the gateway must be where the "
                    "other commands look); use pdlb up's own --port, --http-port or --etcd-port"
                )
        other = state.running().get(args.name)
        if other is not None:
            raise StartRefused(
                f"a cluster named {args.name!r} already runs (pdlb up pid {other['up_pid']}, {other.get('http', '')}); "
                "stop it, or give this one another --name and other ports"
            )
        for number, what in fixed_ports(args):
            if number > 65535:
                raise StartRefused(f"port {number} ({what}) is past 65535; choose a lower --port, or 0 for free ports")
            if port_taken(number):
                raise StartRefused(
                    f"port {number} ({what}) is taken, by another cluster or program; "
                    "choose another, or 0 for any free port"
                )
        if args.log_dir:  # every service writes its log there: find out now, not from a child that cannot start
            try:
                os.makedirs(args.log_dir, exist_ok=True)
                with tempfile.TemporaryFile(dir=args.log_dir):
                    pass
            except OSError as exc:
                raise StartRefused(f"--log-dir {args.log_dir}: cannot write there ({exc.strerror or exc})") from None

    def start(self) -> dict:
        args = self.args
        first = "cache_aware" if args.lockstep else "predicted_latency"  # mixed and prefill
        method = getattr(args, "method", "") or first
        prefill_method = getattr(args, "prefill_method", "") or first
        decode_method = getattr(args, "decode_method", "") or ("total_requests" if args.lockstep else "least_wait")
        self._own_log_dir = not args.log_dir
        self.log_dir = args.log_dir or tempfile.mkdtemp(prefix=f"pdlb-{args.name}-")
        flow = ", flow control on" if self.flow_control() else ""
        self.say(f"pdlb up: starting cluster {args.name!r} ({args.mode}{flow}); logs in {self.log_dir}")
        if args.engine == "vllm":
            self._vllm_targets()
        gone = stale_dirs.remove_dead_owners()
        if gone:  # a killed pdlb up's: its etcd died with it, its data dir stayed
            self.say(f"  removed the etcd data of {counted(len(gone), 'killed pdlb up')}: {', '.join(map(str, gone))}")
        self.etcd = EtcdProcess(client_port=args.etcd_port, dir_prefix=stale_dirs.etcd_dir_prefix())
        self.etcd.start()
        threading.Thread(target=self._watch_etcd, daemon=True).start()
        self._ready("etcd", self.etcd.endpoint)
        common = ["--etcd", self.etcd.endpoint, "--etcd-prefix", self.prefix, "--lease-ttl", "5"]
        info: dict = {
            "name": args.name,
            "mode": args.mode,
            "flow_control": self.flow_control(),
            "settings": self.settings(method, prefill_method, decode_method),
            "etcd": self.etcd.endpoint,
            "log_dir": self.log_dir,
        }
        self.info = info
        replicas: list[str] = []
        if args.mode == "mixed":
            flags = ["--port", self._port(0), "--load-balance-method", method]
            info["dispatcher"] = self._run("dispatcher", common, *flags)
            for r, offset in enumerate(replica_offsets(args), start=1):
                flags = ["--port", self._port(offset), "--load-balance-method", method]
                replicas.append(self._run("dispatcher", common, *flags, name=f"dispatcher-{r}"))
            self._schedulers(common, {"null": args.workers})
            for address in [info["dispatcher"], *replicas]:
                self._await_workers(address, args.workers)
        else:
            info["bootstrap"] = self._run("bootstrap", common, "--port", self._port(BOOTSTRAP_OFFSET))
            for role, offset, chosen in (("prefill", 0, prefill_method), ("decode", DECODE_OFFSET, decode_method)):
                info[f"{role}_dispatcher"] = self._run(
                    "dispatcher",
                    common,
                    "--port",
                    self._port(offset),
                    name=f"dispatcher-{role}",
                    extra=["--disaggregation-mode", role, "--load-balance-method", chosen],
                )
            offsets = iter(replica_offsets(args))
            for r in range(1, args.dispatchers):
                for role, chosen in (("prefill", prefill_method), ("decode", decode_method)):
                    flags = ["--port", self._port(next(offsets))]
                    extra = ["--disaggregation-mode", role, "--load-balance-method", chosen]
                    replicas.append(self._run("dispatcher", common, *flags, name=f"dispatcher-{role}-{r}", extra=extra))
            self._schedulers(common, {"prefill": args.prefill, "decode": args.decode})
            self._await_workers(info["prefill_dispatcher"], args.prefill)
            self._await_workers(info["decode_dispatcher"], args.decode)
            for index, address in enumerate(replicas):  # prefill, decode, prefill, ...
                self._await_workers(address, args.decode if index % 2 else args.prefill)
        if replicas:
            info["replicas"] = replicas
        http_port = args.http_port or free_port()
        info["gateway"] = self._run(
            "gateway", common, "--port", self._port(GATEWAY_OFFSET), "--http-port", str(http_port)
        )
        info["http"] = f"http://127.0.0.1:{http_port}"
        self._await_gateway(info["http"])
        self.save()
        return info

    def save(self) -> None:
        """Write the cluster's state for the other commands (again after a restart: new pids)."""
        info = self.info
        info["workers"] = {s.name: s.address for s in self.services if s.name.startswith("scheduler")}
        etcd_pid = [self.etcd.proc.pid] if self.etcd and self.etcd.proc else []
        vllm_pids = [s.proc.pid for s in self.vllm_servers if s.proc is not None]
        info["pids"] = [s.pid for s in self.services if s.proc is not None] + etcd_pid + vllm_pids
        if getattr(self.args, "engine", "pdlb") == "vllm":
            info["vllm"] = self.args.vllm_urls  # per role ("null": mixed): the servers the workers use
        info["children"] = {s.name: s.pid for s in self.services if s.proc is not None}
        state.save(self.args.name, info)

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._t0:5.1f}s"

    def group_of(self, name: str) -> list[str]:
        """The names of the lockstep DP group's ranks that `name` belongs to, else [name]."""
        return next((g for g in self.groups if name in g), [name])

    def _check_stop(self) -> None:
        if self.stopping.is_set():
            raise StartInterrupted("stopped by a signal while starting")

    def _ready(self, name: str, address: str) -> None:
        self.say(f"  [{self._elapsed()}] {name:<24} ready on {address}")

    def _service(self, name: str, argv: list[str]) -> ServiceProcess:
        proc = ServiceProcess(name, argv, self.log_dir, on_exit=lambda _: self.wake.set())
        self.services.append(proc)
        return proc

    def _run(self, kind: str, common: list[str], *flags: str, name: str = "", extra: list[str] | None = None) -> str:
        model = ["--model", self.args.model] if kind in ("dispatcher", "gateway") else []
        if kind == "dispatcher":
            extra = [*(extra or []), *(["--flow-control"] if self.args.flow_control else []), *self.args.dispatcher_arg]
        if kind == "gateway":
            extra = [*(extra or []), *getattr(self.args, "gateway_arg", [])]
        self._check_stop()
        proc = self._service(name or kind, [*script(f"pdlb-{kind}"), *common, *model, *flags, *(extra or [])])
        proc.spawn()
        proc.wait_ready(START_TIMEOUT_S)
        pin_port(proc)
        self._ready(proc.name, proc.address)
        return proc.address

    def _schedulers(self, common: list[str], counts: dict[str, int]) -> None:
        """Start every scheduler side by side (each imports torch and loads the model: seconds to a
        minute), then wait for them all, saying which are still loading."""
        procs = []
        for mode, count in counts.items():
            group = (
                ["--dp-group-size", str(count), "--dp-group-address", f"127.0.0.1:{free_port()}"]
                if self.args.lockstep and count > 1
                else []
            )
            if group:
                self.groups.append([f"scheduler-{'mixed' if mode == 'null' else mode}-{r}" for r in range(count)])
            for rank in range(count):
                argv = [
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
                    *self._vllm_flags(mode, rank),
                    *TINY_MODEL,
                    *group,
                    *self._eviction_flags(),
                    *self.args.scheduler_arg,
                ]
                procs.append(self._service(f"scheduler-{'mixed' if mode == 'null' else mode}-{rank}", argv))
        described = " + ".join(f"{n} {'mixed' if m == 'null' else m}" for m, n in counts.items())
        what = loading(getattr(self.args, "engine", "pdlb"), self.args.runner, self.args.model)
        plural = "s" if sum(counts.values()) != 1 else ""
        self.say(f"  [{self._elapsed()}] starting {described} scheduler{plural} {what}")
        for proc in procs:
            proc.spawn()
        self._await_started(procs)

    def _await_started(self, procs: list[ServiceProcess]) -> None:
        pending = list(procs)
        deadline = time.monotonic() + getattr(self.args, "vllm_wait", START_TIMEOUT_S)
        next_note = time.monotonic() + PROGRESS_EVERY_S
        while pending:
            self._check_stop()
            for proc in [p for p in pending if not p.alive() or p.announced(0)]:
                proc.wait_ready(max(deadline - time.monotonic(), 1.0))  # raises at once for one that exited
                pin_port(proc)
                self._ready(proc.name, proc.address)
                pending.remove(proc)
            if not pending:
                return
            if time.monotonic() > next_note:
                self.say(f"  [{self._elapsed()}] still loading: {', '.join(p.name for p in pending)}")
                next_note += PROGRESS_EVERY_S
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{pending[0].name} did not start in time; see {pending[0].log_path}")
            pending[0].announced(0.2)  # wakes as soon as the first one is up (or gone)

    def _vllm_targets(self) -> None:
        """The vLLM servers the workers use, per role: those at --vllm-url (PD: and
        --vllm-decode-url), else started here, one per --vllm-server-ranks ranks of a role (waits
        until they are healthy: minutes on a CPU). PD servers pdlb starts share the cluster's KV
        storage directory through vLLM's ExampleConnector."""
        from pdlb.engines.vllm.server import VLLMServer, VLLMServerSpec, cpu_dtype, find_venv, missing_reason

        args = self.args
        args.vllm_wait = 900.0
        roles = {"null": args.workers} if args.mode == "mixed" else {"prefill": args.prefill, "decode": args.decode}
        args.vllm_urls = {}
        if args.vllm_url:
            if args.mode == "pd" and not args.vllm_decode_url:
                raise SystemExit("--mode pd --engine vllm --vllm-url needs --vllm-decode-url too")
            args.vllm_server_ranks = args.vllm_server_ranks or 1
            given = {"null": args.vllm_url, "prefill": args.vllm_url, "decode": args.vllm_decode_url}
            for mode in roles:
                args.vllm_urls[mode] = [u.strip() for u in given[mode].split(",") if u.strip()]
            args.workers = len(args.vllm_urls.get("null", [])) * args.vllm_server_ranks
            args.prefill = len(args.vllm_urls.get("prefill", [])) * args.vllm_server_ranks
            args.decode = len(args.vllm_urls.get("decode", [])) * args.vllm_server_ranks
            return
        venv = find_venv()
        if venv is None:
            raise SystemExit(f"--engine vllm: {missing_reason()}")
        per_server = args.vllm_server_ranks
        if any(count % (per_server or count) for count in roles.values()):
            raise SystemExit("--workers, --prefill and --decode must be multiples of --vllm-server-ranks")
        extra: list[str] = []
        if args.mode == "pd":
            if args.vllm_kv_connector != "ExampleConnector":
                raise SystemExit("vLLM servers started here use ExampleConnector only; attach others with --vllm-url")
            storage = state.kv_storage_of(args.name)
            shutil.rmtree(storage, ignore_errors=True)  # a cluster of this name that was killed left it
            storage.mkdir(parents=True)
            self.kv_storage = storage
            config = {
                "kv_connector": "ExampleConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"shared_storage_path": str(storage)},
            }
            extra = ["--kv-transfer-config", json.dumps(config)]
        by_role: dict[str, list] = {}
        for mode, count in roles.items():
            size = per_server or count
            for _ in range(count // size):
                index = len(self.vllm_servers)
                spec = VLLMServerSpec(
                    port=args.vllm_port + index if args.vllm_port else 0,  # 0: chosen at spawn
                    venv=venv,
                    dp_size=size,
                    dtype=cpu_dtype() if args.vllm_dtype == "auto" else args.vllm_dtype,
                    enforce_eager=args.vllm_eager,
                    extra_args=extra,
                )
                server = VLLMServer(spec, f"{self.log_dir}/vllm-{index}.log").spawn()
                self.vllm_servers.append(server)
                by_role.setdefault(mode, []).append(server)
            args.vllm_server_ranks_of = {**getattr(args, "vllm_server_ranks_of", {}), mode: size}
        self.say(f"  [{self._elapsed()}] starting {len(self.vllm_servers)} vLLM server(s) (minutes on a CPU)")
        for server in self.vllm_servers:
            server.wait_ready()
            self.say(f"  [{self._elapsed()}] vLLM at {server.url} ready after {server.ready_s:.0f} s")
        args.vllm_urls = {mode: [server.url for server in servers] for mode, servers in by_role.items()}

    def _vllm_flags(self, mode: str, rank: int) -> list[str]:
        args = self.args
        if args.engine != "vllm":
            return []
        per_server = getattr(args, "vllm_server_ranks_of", {}).get(mode) or args.vllm_server_ranks
        url = args.vllm_urls[mode][rank // per_server]
        flags = ["--engine", "vllm", "--vllm-url", url, "--vllm-server-ranks", str(per_server)]
        if mode != "null":
            flags += ["--vllm-kv-connector", args.vllm_kv_connector]
        return flags

    def _await_gateway(self, http: str, timeout: float = 30) -> None:
        """Until the gateway has found the dispatchers (its /health says ok)."""
        gateway = self.services[-1]
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{http}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if not gateway.alive():
                raise gateway.failure()
            if time.monotonic() > deadline:
                raise ServiceFailed(f"gateway at {http} is not healthy after {timeout}s; see {gateway.log_path}")
            time.sleep(0.1)  # polling a status only observable by polling

    def _await_workers(self, address: str, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(address) as channel:
            stub = dispatch_pb2_grpc.DispatchStub(channel)
            while len(stub.ListWorkers(dispatch_pb2.ListWorkersRequest(), timeout=5).workers) < count:
                if time.monotonic() > deadline:
                    raise ServiceFailed(
                        f"dispatcher {address} sees fewer than {counted(count, 'worker')} after {timeout}s"
                    )
                time.sleep(0.1)  # polling a status only observable by polling

    def _watch_etcd(self) -> None:
        proc = self.etcd.proc if self.etcd else None
        if proc is not None:
            proc.wait()
            self.wake.set()

    def restart_etcd(self) -> None:
        """etcd again on the same ports and data (the supervisor's; from the main thread)."""
        assert self.etcd is not None
        self.etcd.start()
        threading.Thread(target=self._watch_etcd, daemon=True).start()

    def _stop_stages(self) -> list[tuple[str, list[ServiceProcess]]]:
        """The services by kind, in the order `stop` stops them (only what this cluster started)."""
        stages: dict[str, list[ServiceProcess]] = {"gateway": [], "dispatchers": [], "schedulers": []}
        for service in self.services:
            kind = service.name if service.name in ("gateway", "bootstrap") else service.name.split("-")[0] + "s"
            stages.setdefault(kind, []).append(service)
        return [(kind, services) for kind, services in stages.items() if services]

    def stop_order(self) -> list[str]:
        """What `stop` stops, in its order, by kind: only what this cluster started."""
        kinds = [kind for kind, _ in self._stop_stages()]
        if self.vllm_servers:
            kinds.append("vLLM servers")
        return kinds + (["etcd"] if self.etcd else [])

    def stop(self) -> list[str]:
        """Front to back, so that nothing is lost: the gateway first (it refuses new requests and
        retries none; the dispatchers are signalled once it says NOT_SERVING), then the dispatchers
        (their queued requests fail at once with UNAVAILABLE naming the shutdown, forwarded ones run
        on), both drained within their --shutdown-grace while the workers still serve; then the
        schedulers (they deregister), bootstrap, vLLM servers and etcd.
        Returns the etcd keys left behind (none when every service deregistered)."""
        stages = dict(self._stop_stages())
        wait_s = max(TERMINATE_WAIT_S, self.shutdown_grace() + TERMINATE_WAIT_S / 3)  # a drain runs its whole grace
        for gateway in stages.get("gateway", []):
            gateway.signal_stop()
            gateway.wait_draining()
        for dispatcher in stages.get("dispatchers", []):
            dispatcher.signal_stop()
        for services in stages.values():
            # side by side within a kind
            threads = [threading.Thread(target=s.terminate, args=(wait_s,)) for s in services]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for server in self.vllm_servers:
            server.stop()
        if self.kv_storage is not None:
            shutil.rmtree(self.kv_storage, ignore_errors=True)  # every prompt's KV of this cluster's PD
        leftover = self._leftover_keys()
        if self.etcd:
            self.etcd.close()
        state.clear(self.args.name)
        if self._own_log_dir and self.log_dir and os.path.isdir(self.log_dir) and not os.listdir(self.log_dir):
            shutil.rmtree(self.log_dir, ignore_errors=True)  # nothing started: no empty dir left behind
        return leftover

    def forget(self, address: str) -> list[str]:
        """Delete the registrations of a child that died at `address` (keys under this cluster's
        prefix whose value names that address), so nobody routes to it for the rest of its lease;
        returns the deleted keys. Best effort: with etcd away, its lease expires the key instead."""
        if not address or not self.etcd or not self.etcd.proc or self.etcd.proc.poll() is not None:
            return []

        async def delete() -> list[str]:
            client = connect_client(self.etcd.endpoint)
            try:
                gone = []
                for kv in await client.get_prefix(self.prefix.encode()):
                    try:
                        value = json.loads(kv.value)
                    except ValueError:
                        continue
                    if isinstance(value, dict) and value.get("address") == address:
                        await client.delete(kv.key)
                        gone.append(kv.key.decode())
                return gone
            finally:
                await client.close()

        try:
            return asyncio.run(delete())
        except Exception:
            return []

    def _leftover_keys(self) -> list[str]:
        """Keys under this cluster's prefix in its own etcd (never another cluster's)."""
        if not self.etcd or not self.etcd.proc or self.etcd.proc.poll() is not None:
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


def loading(engine: str, runner: str, model: str) -> str:
    """What the schedulers run, as `pdlb up` announces them: the dequantisation note only where it
    applies (pdlb's torch engine on a GGUF model; vLLM ranks and the sim load no pdlb weights)."""
    if engine == "vllm":
        return f"({model}, on vLLM ranks)"
    if runner != "torch":
        return f"({model}, simulated)"
    gguf = model == SMOLLM2 or model.endswith(".gguf")  # the packaged SmolLM2 is a GGUF file
    return f"({model})" + ("; a first start of a GGUF model dequantises its weights (about a minute)" if gguf else "")


def pin_port(proc: ServiceProcess) -> None:
    """A restart binds the port the first start got (`--port 0` picked one): clients keep the address."""
    bound = proc.address.rsplit(":", 1)[-1]
    argv = list(proc.argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--port":
            argv[i + 1] = bound
    proc.argv = argv


def run(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        try:
            print(line, flush=True)
        except OSError:  # the console went away (a closed pipe): the cluster runs on and still stops cleanly
            sys.stdout = open(os.devnull, "w")

    cluster = LocalCluster(args, say)
    stop = cluster.stopping
    draining = threading.Event()  # the stop has begun (by a signal, a failed start or the supervisor giving up)
    hurried = threading.Event()  # a second Ctrl-C: the children are being killed

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and (stop.is_set() or draining.is_set()) and not hurried.is_set():
            hurried.set()
            try:  # os.write: print() may be half-way through a line in the main thread, and is not reentrant
                os.write(
                    sys.stdout.fileno(),
                    f"pdlb up: Ctrl-C again: stopping now, requests still running are cut (children killed "
                    f"after {HALT_WAIT_S:g} s)\n".encode(),
                )
            except (OSError, ValueError):  # stdout closed: the stop goes on all the same
                pass
            threading.Thread(target=cluster.halt_now, daemon=True).start()
        stop.set()
        cluster.wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal was closed
        signal.signal(sig, on_signal)
    try:
        cluster.check()
        for ignored in (variables_of_the_other_mode(args), variables_of_the_other_engine(args)):
            if ignored:  # after check: a refused start says only why it was refused
                print(f"pdlb up: {ignored}", file=sys.stderr, flush=True)
    except (StartRefused, state.StateError) as exc:
        print(f"pdlb up: {exc}", file=sys.stderr, flush=True)  # nothing started: a refusal, on stderr
        return 2
    status = 0
    try:
        try:
            info = cluster.start()
        except (ServiceFailed, RuntimeError, TimeoutError, OSError) as exc:
            print(f"pdlb up: could not start the cluster: {exc}", file=sys.stderr, flush=True)
            status = 1
        except StartInterrupted as exc:
            say(f"pdlb up: {exc}")
        else:
            print_summary(info, say)
            Supervisor(cluster, say, args.max_restarts).run(stop)
    finally:
        draining.set()
        say(
            f"\nstopping: {', '.join(cluster.stop_order())} ... (running requests get up to "
            f"{cluster.shutdown_grace():g} s to finish, their --shutdown-grace; Ctrl-C again stops at once)"
        )
        leftover = cluster.stop()
        if hurried.is_set():
            say("stopped at once (second Ctrl-C); requests still running were cut")
        else:
            say("stopped; etcd keys left behind: " + (", ".join(leftover) if leftover else "none"))
        if status and os.path.isdir(cluster.log_dir):
            say(f"logs of the failed start: {cluster.log_dir}")
    return status or (130 if hurried.is_set() else 0)  # 130: 128 + SIGINT, as shells report a command Ctrl-C ended


def print_summary(info: dict, say: Callable[[str], None] = print) -> None:
    flow = ", flow control on" if info.get("flow_control") else ""
    name = info.get("name", "local")
    say(f"pdlb local cluster {name!r} ({info['mode']}{flow}) is up; logs in {info['log_dir']}")
    for label, value in info.get("settings", {}).items():  # how requests are routed, held and served
        say(f"  {label:<20} {value}")
    say(f"  etcd                 {info['etcd']}")
    for key in ("bootstrap", "dispatcher", "prefill_dispatcher", "decode_dispatcher", "gateway"):
        if key in info:
            say(f"  {key.replace('_', ' '):<20} {info[key]}")
    for worker, address in info["workers"].items():
        say(f"  {worker:<20} {address}")
    for address in info.get("replicas", []):
        say(f"  {'dispatcher replica':<20} {address}")
    for role, urls in info.get("vllm", {}).items():  # --engine vllm: the servers the workers run on
        label = "vLLM server" if role == "null" else f"vLLM {role} server"
        for url in urls:
            say(f"  {label:<20} {url}")
    say(f"  OpenAI API           {info['http']}/v1   (dashboard: {info['http']}/dashboard)")
    # the other commands find the default cluster alone; another one only by its name
    which = "" if name == "local" else f" --cluster {name}"
    say(
        f'try:  pdlb generate{which} --chat "What is the capital of France?"   |   pdlb top{which}   |   '
        f"pdlb workers{which}      (Ctrl-C stops everything; a child that dies is restarted)"
    )
