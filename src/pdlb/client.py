"""Client helpers for pdlb's Dispatch API, in mixed and in PD (prefill + decode) deployments."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc

from pdlb.common.security import open_channel
from pdlb.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc


def new_room() -> int:
    """A random 63-bit bootstrap room."""
    return random.getrandbits(63)


class PDLBClient:
    """Talks to one dispatcher (mixed), or to a prefill and a decode dispatcher (PD)."""

    def __init__(self, dispatcher: str = "", prefill: str = "", decode: str = "") -> None:
        if not dispatcher and not (prefill and decode):
            raise ValueError("give a dispatcher address, or both prefill and decode dispatcher addresses")
        self._channels: list[grpc.aio.Channel] = []
        self.mixed = self._stub(dispatcher) if dispatcher else None
        self.prefill = self._stub(prefill) if prefill else None
        self.decode = self._stub(decode) if decode else None

    def _stub(self, address: str) -> dispatch_pb2_grpc.DispatchStub:
        channel = open_channel(address)
        self._channels.append(channel)
        return dispatch_pb2_grpc.DispatchStub(channel)

    @property
    def main(self) -> dispatch_pb2_grpc.DispatchStub:
        """The dispatcher whose stream carries the tokens (mixed, or decode in PD)."""
        return self.mixed or self.decode  # type: ignore[return-value]

    async def generate(
        self, request: common_pb2.InferenceRequest, timeout: float = 600
    ) -> AsyncIterator[dispatch_pb2.GenerateResponse]:
        """Stream a request's tokens. PD: the prefill half runs beside the decode stream, same room,
        once the decode half is bound to a rank; the last chunk's cached_tokens are the prefill
        worker's (the decode worker computes no prompt), as is the first token's logprob when
        logprobs are asked for."""
        if self.mixed is not None:
            async for chunk in self.mixed.Generate(dispatch_pb2.GenerateRequest(request=request), timeout=timeout):
                yield chunk
            return
        if not request.HasField("bootstrap_room"):
            request.bootstrap_room = new_room()
        call = self.decode.Generate(dispatch_pb2.GenerateRequest(request=request), timeout=timeout)
        prefilled: list[dispatch_pb2.GenerateResponse] = []  # the prefill half's last message
        prefill = asyncio.ensure_future(self._prefill(request, timeout, prefilled, call))
        failure: list[BaseException] = []

        def stop_decode_on_prefill_failure(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is not None:
                failure.append(task.exception())
                call.cancel()  # the decode side would otherwise wait for KV that never comes

        prefill.add_done_callback(stop_decode_on_prefill_failure)
        first = True
        try:
            async for chunk in call:
                if first and chunk.token_ids and request.sampling.HasField("logprobs"):
                    first = False
                    await asyncio.wait({prefill})  # ends with the first token, which the prefill drew
                    if prefilled and len(chunk.logprobs) < len(chunk.token_ids):
                        merged = [*prefilled[-1].logprobs, *chunk.logprobs]
                        del chunk.logprobs[:]
                        chunk.logprobs.extend(merged)
                if chunk.finish_reason:
                    await asyncio.wait({prefill})  # done already: the decode worker had its KV
                    if prefilled:  # the decode worker computed no prompt: the cache hit is the prefill's
                        chunk.cached_tokens = prefilled[-1].cached_tokens
                yield chunk
            await prefill
        except asyncio.CancelledError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            if not prefill.done():
                prefill.cancel()

    async def _prefill(
        self, request: common_pb2.InferenceRequest, timeout: float, out: list[dispatch_pb2.GenerateResponse], decode
    ) -> None:
        """The prefill half, sent once the decode half is bound to a rank (its dispatcher's initial
        metadata), so a decode half queued or shed by flow control leaves no prefill KV held."""
        await decode.initial_metadata()
        if decode.done():  # failed before binding: the decode stream raises its error
            return
        async for response in self.prefill.Generate(dispatch_pb2.GenerateRequest(request=request), timeout=timeout):
            out[:] = [response]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
