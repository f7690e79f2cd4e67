"""A bare Dispatch server that answers at once: the baseline for Route's overhead, and the backend of
the gateway overhead benchmark.

Same shape as the dispatcher: grpc.aio, the same ServiceHost (health + reflection), the same
request and response messages; it only skips the decision. Route returns a fixed answer; Generate
streams `max_new_tokens` tokens (one per message, the last with FINISH_REASON_LENGTH) with no model
behind them.
"""

from __future__ import annotations

import asyncio
import sys

from pdlb.common.grpc_server import ServiceHost, shutdown_event
from pdlb.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc


class EchoDispatch(dispatch_pb2_grpc.DispatchServicer):
    def __init__(self) -> None:
        self.worker = common_pb2.WorkerInfo(
            worker_id="w0", role=common_pb2.ROLE_MIXED, dp_rank=0, address="127.0.0.1:1"
        )

    async def Route(self, request, context):
        return dispatch_pb2.RouteResponse(
            request_id=request.request.request_id,
            dp_rank=0,
            worker=self.worker,
            method="echo",
            dispatch_seq=1,
            dispatcher_id="echo",
        )

    async def Generate(self, request, context):
        inner = request.request
        count = max(1, inner.sampling.max_new_tokens)
        for i in range(count):
            last = i == count - 1
            yield dispatch_pb2.GenerateResponse(
                request_id=inner.request_id,
                token_ids=[ord("a")],
                text="a",
                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED,
                dp_rank=0,
                worker_id="echo",
                prompt_tokens=len(inner.input_ids),
            )


async def main(port: int) -> None:
    host = ServiceHost("127.0.0.1", port, [dispatch_pb2.DESCRIPTOR.services_by_name["Dispatch"].full_name])
    dispatch_pb2_grpc.add_DispatchServicer_to_server(EchoDispatch(), host.server)
    stop = shutdown_event()
    await host.start()
    print(f"echo listening on {host.address}", flush=True)
    await stop.wait()
    await host.stop(1)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
