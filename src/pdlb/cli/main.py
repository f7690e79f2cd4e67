"""`pdlb`: run a local cluster and talk to it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc

from pdlb.cli import state
from pdlb.cli.flag_types import UINT32_MAX, UINT64_MAX, float_in, int_in
from pdlb.client import PDLBClient
from pdlb.common import security
from pdlb.common.config import env_fallbacks
from pdlb.common.plurals import counted
from pdlb.common.requests import MAX_NEW_TOKENS_LIMIT
from pdlb.common.security import open_channel
from pdlb.v1 import bootstrap_pb2, bootstrap_pb2_grpc, common_pb2, dispatch_pb2, dispatch_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdlb", description="pdlb: DP rank dispatch for PD-disaggregated LLM serving")
    add_connection_flags(parser)
    # the same flags after the subcommand too (`pdlb top --cluster b`): SUPPRESS keeps a subparser
    # from overwriting what was given before the subcommand with its default
    connection = argparse.ArgumentParser(add_help=False)
    add_connection_flags(connection)
    for action in connection._actions:
        action.default = argparse.SUPPRESS
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[connection], **kwargs)

    from pdlb.cli import bench_client, local_cluster

    local_cluster.add_arguments(sub.add_parser("up", help="start a local cluster (Ctrl-C stops it)"))
    gen = command("generate", help="stream the completion of a prompt")
    gen.add_argument("text", help="the prompt (tokenised by the cluster's model; with --chat, the user's message)")
    gen.add_argument(
        "--chat", action="store_true", help="send TEXT as a user message (the model's chat template applies)"
    )
    gen.add_argument("--system", default="", help="with --chat: a system message first")
    gen.add_argument(
        "--max-new-tokens",
        type=int_in(1, MAX_NEW_TOKENS_LIMIT),
        default=64,
        help=f"tokens to generate at most, 1 to {MAX_NEW_TOKENS_LIMIT} (default: 64)",
    )
    gen.add_argument(
        "--temperature",
        type=float_in(0.0, 2.0),
        default=0.0,
        help="sampling temperature, 0 to 2 as in the OpenAI API (0: greedy, the most likely token; default: 0)",
    )
    gen.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens tokens whatever comes")
    gen.add_argument(
        "--token-ids", action="store_true", help="print the generated token ids (as <id>) instead of their text"
    )
    route = command("route", help="ask which rank would serve a prompt (counts as a dispatch)")
    route.add_argument("text", help="the prompt whose rank to ask for (tokenised as generate would)")
    route.add_argument("--room", type=int_in(0, UINT64_MAX), default=None, help="bootstrap room")
    command("workers", help="list the workers of each dispatcher")
    rooms = command("rooms", help="look rooms up in bootstrap (no room: list prefill KV endpoints)")
    rooms.add_argument("room", nargs="*", type=int_in(0, UINT64_MAX))
    top = command("top", help="live load dashboard")
    top.add_argument(
        "--interval-ms", type=int_in(1, UINT32_MAX), default=250, help="how often to redraw, in ms (default: 250)"
    )
    top.add_argument(
        "--once", action="store_true", help="print one frame and exit (also when stdout is not a terminal)"
    )
    bench_client.add_arguments(command("bench-client", help="load generator with a latency summary"))
    export = command(
        "export-tokenizer",
        help="write a model's tokenizer as a Hugging Face directory (tokenizer.json + tokenizer_config.json) "
        "for tools that load one by path, such as aiperf",
    )
    export.add_argument("directory", help="where to write the files (created if missing)")
    export.add_argument(
        "--model", default="smollm2-135m-instruct", help="packaged model id, .gguf file or HF directory"
    )
    health = command(
        "health", help="exit 0 when the gRPC service at ADDRESS reports SERVING (container health checks, probes)"
    )
    health.add_argument("address", help="host:port of any pdlb service")
    health.add_argument("--service", default="", help="service name to check ('' is the whole server)")
    health.add_argument(
        "--timeout",
        type=float_in(0.001, 3600.0),
        default=3.0,
        help="seconds to wait for an answer, 0.001 to 3600 (default: 3)",
    )
    # Every flag falls back to an environment variable, as the services' do: PDLB_CLUSTER,
    # PDLB_DISPATCHER... for the connection flags, PDLB_<COMMAND>_<FLAG> for a command's own.
    # a variable's value its flag refuses is reported once the command is known (in main)
    parser.set_defaults(env_errors=[])
    connection_errors: list[str] = []
    env_fallbacks(parser, "PDLB_", errors=connection_errors)
    named = {a.dest: a for a in parser._actions}
    for action in connection._actions:  # the subcommands' copies: their --help names the variable too
        action.help = named[action.dest].help
    shared = {action.dest for action in connection._actions}
    for name, subparser in sub.choices.items():
        # `up` has no connection flags (its --prefill and --decode count ranks)
        skip = () if name == "up" else shared
        errors = list(connection_errors)  # every command reads the connection flags too
        found = env_fallbacks(subparser, f"PDLB_{name.upper().replace('-', '_')}_", skip=skip, errors=errors)
        subparser.set_defaults(env_flags=found, env_errors=errors)
    return parser


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """The flags saying which cluster or services a command talks to (accepted before or after it)."""
    parser.add_argument(
        "--cluster", default="", help="which `pdlb up` cluster to talk to, by --name (default: the only one running)"
    )
    parser.add_argument("--dispatcher", default="", help="mixed dispatcher host:port (default: from `pdlb up`)")
    parser.add_argument("--prefill", default="", help="prefill dispatcher host:port (default: from `pdlb up`)")
    parser.add_argument("--decode", default="", help="decode dispatcher host:port (default: from `pdlb up`)")
    parser.add_argument("--bootstrap", default="", help="bootstrap host:port (default: from `pdlb up`)")
    parser.add_argument("--tls-cert", default="", help="PEM client certificate (services with mutual TLS)")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", default="", help="PEM CA that signed the services' certificates")
    parser.add_argument("--tls-server-name", default="", help="name expected in server certificates")


def dispatchers(args: argparse.Namespace) -> dict[str, str]:
    """Label -> address of the dispatchers to talk to: flags first, then the `pdlb up` state."""
    if args.dispatcher:
        return {"mixed": args.dispatcher}
    saved = {} if args.prefill and args.decode else state.load(args.cluster)
    prefill, decode = (
        args.prefill or saved.get("prefill_dispatcher", ""),
        args.decode or saved.get("decode_dispatcher", ""),
    )
    if prefill and decode:
        return {"prefill": prefill, "decode": decode}
    if saved.get("dispatcher"):
        return {"mixed": saved["dispatcher"]}
    raise SystemExit("no dispatcher: start one with `pdlb up`, or pass --dispatcher / --prefill and --decode")


def client_for(args: argparse.Namespace) -> PDLBClient:
    found = dispatchers(args)
    if "mixed" in found:
        return PDLBClient(dispatcher=found["mixed"])
    return PDLBClient(prefill=found["prefill"], decode=found["decode"])


def rendered(text: str, token_ids: list[int], as_ids: bool = False) -> str:
    """What `pdlb generate` prints for one streamed chunk: its text, or its token ids as `<id>` when
    asked for or when the text would not print (a replacement character from bytes that are not
    UTF-8, or control characters other than newline and tab: what random ids decode to)."""
    if as_ids or "\ufffd" in text or any(not c.isprintable() and c not in "\n\t" for c in text):
        return "".join(f"<{token}>" for token in token_ids)
    return text


class StreamRendering:
    """`rendered` over a whole stream. A chunk with ids but no text holds bytes of a character not
    complete yet; its ids are kept and shown with the next chunk that prints as ids (or dropped when
    the character completes as text), so every token shows once, in order, whatever its bytes."""

    def __init__(self, as_ids: bool = False) -> None:
        self.as_ids = as_ids
        self.held: list[int] = []

    def feed(self, text: str, token_ids: list[int], stopped: bool = False) -> str:
        """`stopped`: the chunk ends the stream on a stop token (EOS), whose id is not shown as
        text: like the OpenAI endpoint, it prints nothing (with `as_ids` every id shows)."""
        ids = self.held + list(token_ids)
        if stopped and not self.as_ids:
            ids = ids[:-1]
        if not text and not self.as_ids:
            self.held = ids[-64:]  # bounded: a UTF-8 character is at most 4 bytes
            return ""
        self.held = []
        return rendered(text, ids, self.as_ids)

    def end(self) -> str:
        """What is still held when the stream ends (bytes that never made a character), as ids."""
        held, self.held = self.held, []
        return "".join(f"<{token}>" for token in held)


async def cmd_generate(args: argparse.Namespace) -> int:
    client = client_for(args)
    req = common_pb2.InferenceRequest(
        request_id=f"cli-{id(args):x}",
        sampling=common_pb2.SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos
        ),
    )
    if args.chat:
        if args.system:
            req.messages.add(role="system", content=args.system)
        req.messages.add(role="user", content=args.text)
    else:
        req.text = args.text
    last = None
    shown_ids = False
    rendering = StreamRendering(args.token_ids)
    try:
        async for chunk in client.generate(req):
            stopped = chunk.finish_reason == common_pb2.FINISH_REASON_STOP
            piece = rendering.feed(chunk.text, list(chunk.token_ids), stopped)
            shown_ids |= piece != chunk.text
            print(piece, end="", flush=True)
            last = chunk
    finally:
        await client.close()
    tail = rendering.end()
    shown_ids |= bool(tail)
    print(tail, end="")
    reason = common_pb2.FinishReason.Name(last.finish_reason) if last else "none"
    usage = f"{counted(last.prompt_tokens, 'prompt token')}, {last.cached_tokens} cached" if last else ""
    print(flush=True)  # the completion ends its line on stdout; the summary goes to stderr
    if shown_ids and not args.token_ids:
        print(
            "[<n>: token id n, whose text is not printable (simulated workers and the random tiny-random "
            "model draw arbitrary ids); "
            "--token-ids prints every token as its id]",
            file=sys.stderr,
        )
    print(f"[rank {last.dp_rank if last else '-'}, {reason}, {usage}]", file=sys.stderr)
    return 0


async def cmd_route(args: argparse.Namespace) -> int:
    for label, address in dispatchers(args).items():
        async with open_channel(address) as channel:
            # text: the dispatcher tokenises it with its model's tokenizer before it decides
            req = common_pb2.InferenceRequest(request_id=f"route-{id(args):x}", text=args.text)
            if args.room is not None:
                req.bootstrap_room = args.room
            reply = await dispatch_pb2_grpc.DispatchStub(channel).Route(
                dispatch_pb2.RouteRequest(request=req), timeout=10
            )
            print(
                f"{label}: rank {reply.dp_rank} -> {reply.worker.worker_id} at {reply.worker.address} "
                f"(method {reply.method}, seq {reply.dispatch_seq})"
            )
    return 0


async def cmd_workers(args: argparse.Namespace) -> int:
    for label, address in dispatchers(args).items():
        async with open_channel(address) as channel:
            reply = await dispatch_pb2_grpc.DispatchStub(channel).ListWorkers(
                dispatch_pb2.ListWorkersRequest(), timeout=10
            )
        print(f"{label} dispatcher {address}:")
        for w in reply.workers:
            print(f"  rank {w.dp_rank:<4} {w.worker_id:<28} {w.address:<22} {w.model}")
    return 0


async def cmd_rooms(args: argparse.Namespace) -> int:
    address = args.bootstrap or state.load(args.cluster).get("bootstrap", "")
    if not address:
        raise SystemExit("no bootstrap server: pass --bootstrap or start a PD cluster with `pdlb up`")
    async with open_channel(address) as channel:
        stub = bootstrap_pb2_grpc.BootstrapStub(channel)
        if not args.room:
            reply = await stub.ListPrefillEndpoints(bootstrap_pb2.ListPrefillEndpointsRequest(), timeout=10)
            for e in reply.endpoints:
                print(f"prefill rank {e.dp_rank:<4} {e.worker_id:<28} {e.address}")
            return 0
        status = 0
        for room in args.room:
            try:
                r = (await stub.LookupRoom(bootstrap_pb2.LookupRoomRequest(bootstrap_room=room), timeout=10)).record
                print(f"room {room}: prefill rank {r.prefill_dp_rank} ({r.prefill_worker_id} at {r.prefill_address})")
            except grpc.aio.AioRpcError as err:
                print(f"room {room}: {err.code().name}: {err.details()}")
                status = 1
        return status


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit status. A refusal or failure is one line on stderr after the
    program's name (`pdlb top: ...`), as argparse's own refusals read: a SystemExit with a message
    (no such cluster, no dispatcher, a TLS flag without its pair...) exits 1, a failed RPC 1.
    Ctrl-C cancels the command's calls (their servers abort them) and exits 130, without a traceback."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if "up" in argv:
        from pdlb.cli.local_cluster import spaced_pass_through

        spaced = spaced_pass_through(argv)
        if spaced:  # found before argparse, whose own refusal would say only "expected one argument"
            print(f"pdlb up: {spaced}", file=sys.stderr, flush=True)
            return 2
    args, unknown = parser.parse_known_args(argv)  # --help answers even with a variable refused below
    if args.command == "up" and args.env_errors:
        from pdlb.cli.local_cluster import ignored_variables

        # a variable of the other mode's or engine's flags is ignored with one line at the start, its value too
        ignored = set(ignored_variables(args))
        args.env_errors = [error for error in args.env_errors if error.split("=", 1)[0] not in ignored]
    if args.env_errors:  # a variable of this command's flags holding a value the flag refuses
        print(f"pdlb {args.command}: {args.env_errors[0]}", file=sys.stderr, flush=True)
        return 2
    if unknown:
        from pdlb.cli.local_cluster import pass_through_hint

        hint = pass_through_hint(unknown) if args.command == "up" else None
        if hint:  # a service's flag given to `pdlb up`, which passes it on only through --*-arg
            print(f"pdlb up: {hint}", file=sys.stderr, flush=True)
            return 2
        # argparse's own refusal, exit 2, from the command's parser: its usage and `pdlb up: error: ...`
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr, flush=True)  # end the line the ^C was echoed on
        return 130
    except BrokenPipeError:
        # the reader went away (`pdlb workers | head -1`): stop quietly, as the shell's tools do; the
        # rest of stdout goes nowhere, so the interpreter's final flush raises no second error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        print(f"pdlb {args.command}: {exc.code}", file=sys.stderr, flush=True)
        return 1
    except grpc.aio.AioRpcError as err:
        print(f"pdlb {args.command}: {err.code().name}: {err.details()}", file=sys.stderr, flush=True)
        return 1


def _run(args: argparse.Namespace) -> int:
    security.configure(security.tls_from_args(args))
    if args.command == "health":
        return _health(args)
    if args.command == "export-tokenizer":
        return _export_tokenizer(args)
    if args.command == "up":
        from pdlb.cli import local_cluster

        return local_cluster.run(args)
    if args.command == "top":
        from pdlb.cli import top

        try:
            # piped or redirected, a live screen would show nothing until killed: print one frame instead
            once = args.once or not sys.stdout.isatty()
            asyncio.run(top.watch(dispatchers(args), args.interval_ms, once=once))
        except KeyboardInterrupt:
            pass
        except top.StreamLost as exc:
            print(f"pdlb top: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "bench-client":
        from pdlb.cli import bench_client

        async def bench() -> int:
            return await bench_client.run(args, client_for(args))  # channels belong to this loop

        return asyncio.run(bench())
    handler = {"generate": cmd_generate, "route": cmd_route, "workers": cmd_workers, "rooms": cmd_rooms}[args.command]
    return asyncio.run(handler(args))


def _export_tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdlb.models.catalog import resolve
    from pdlb.models.config import UnsupportedModel
    from pdlb.models.tokenizer_export import export_tokenizer

    try:
        written = export_tokenizer(resolve(args.model), Path(args.directory))
    except UnsupportedModel as exc:
        print(f"pdlb export-tokenizer: {exc}", file=sys.stderr)
        return 2
    print("wrote", *written)
    return 0


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdlb.common.security import open_sync_channel

    try:
        with open_sync_channel(args.address, security.active()) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as err:
        print(f"pdlb health: {args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main())
