"""What the MalformedRequests interceptor (common/malformed_requests.py) costs every gRPC call.

One grpc.aio server in this process serves a unary method and a 32-message server stream (the
shapes of Route and Generate), with and without the interceptor, alternating, `--runs` times each;
a client on the same loop calls it back to back. CPU time of the process (client and server) per
call, median with min-max over runs, and the ratio with/without.

Run: `python -m bench.grpc_interceptor_bench` (about 20 s). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc

from pdlb.common.malformed_requests import MalformedRequests
from pdlb.v1 import bootstrap_pb2

REQUEST = bootstrap_pb2.LookupRoomRequest(bootstrap_room=7)
RESPONSE = bootstrap_pb2.LookupRoomResponse(record=bootstrap_pb2.RoomRecord(bootstrap_room=7, prefill_worker_id="p"))
STREAMED = 32  # messages of the streaming call


async def _unary(request: bootstrap_pb2.LookupRoomRequest, context) -> bootstrap_pb2.LookupRoomResponse:
    return RESPONSE


async def _stream(request: bootstrap_pb2.LookupRoomRequest, context):
    for _ in range(STREAMED):
        yield RESPONSE


def _handlers() -> grpc.GenericRpcHandler:
    parse, write = bootstrap_pb2.LookupRoomRequest.FromString, bootstrap_pb2.LookupRoomResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        "bench.Shapes",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary, parse, write),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream, parse, write),
        },
    )


async def one_run(intercepted: bool, calls: int) -> tuple[float, float]:
    """CPU microseconds per unary call and per streaming call (client and server together)."""
    server = grpc.aio.server(interceptors=[MalformedRequests()] if intercepted else [])
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            write = bootstrap_pb2.LookupRoomRequest.SerializeToString
            parse = bootstrap_pb2.LookupRoomResponse.FromString
            unary = channel.unary_unary("/bench.Shapes/Unary", write, parse)
            stream = channel.unary_stream("/bench.Shapes/Stream", write, parse)
            for _ in range(100):  # warm the channel and the server's handler lookup
                await unary(REQUEST)
            started = time.process_time()
            for _ in range(calls):
                await unary(REQUEST)
            unary_us = (time.process_time() - started) / calls * 1e6
            streams = max(calls // 8, 1)
            started = time.process_time()
            for _ in range(streams):
                async for _ in stream(REQUEST):
                    pass
            stream_us = (time.process_time() - started) / streams * 1e6
    finally:
        await server.stop(None)
    return unary_us, stream_us


async def main_async(args: argparse.Namespace) -> None:
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.runs):
        for intercepted in (False, True):
            runs[intercepted].append(await one_run(intercepted, args.calls))
    streams = args.calls // 8
    print(f"{args.runs} runs each, alternating; {args.calls} unary and {streams} {STREAMED}-message calls a run\n")
    print("| call | without: CPU µs/call, median (min-max) | with | ratio with/without |")
    print("|---|---|---|---|")
    for index, shape in ((0, "unary"), (1, f"server stream of {STREAMED}")):
        cells = []
        for intercepted in (False, True):
            values = [run[index] for run in runs[intercepted]]
            cells.append((statistics.median(values), min(values), max(values)))
        (base, lo0, hi0), (with_, lo1, hi1) = cells
        spans = f"{base:,.0f} ({lo0:,.0f}-{hi0:,.0f}) | {with_:,.0f} ({lo1:,.0f}-{hi1:,.0f})"
        print(f"| {shape} | {spans} | {with_ / base:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs with and without the interceptor, alternating")
    parser.add_argument("--calls", type=int, default=2000, help="unary calls a run (an eighth as many streams)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
