"""Requests whose bytes are not the RPC's message: INVALID_ARGUMENT, not gRPC's UNKNOWN.

grpc.aio parses a request with the method's deserializer before any servicer code runs; a message
protobuf cannot parse (corrupt wire format, a string field that is not UTF-8) raised DecodeError
there, which gRPC answers UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: ..."
and logs with a traceback, one per call any client can make. `MalformedRequests`, a server
interceptor every pdlb server installs, parses instead into a `Malformed` marker and ends such a
call INVALID_ARGUMENT naming the message type and protobuf's reason (a streamed request: at the
message that does not parse), before the servicer sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class Malformed:
    """A request message that did not parse: what to tell the client."""

    def __init__(self, message: str) -> None:
        self.message = message


def _parser(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            return Malformed(f"{method}: the request is not a valid message of this RPC ({exc})")

    return parse


async def _refuse(context: grpc.aio.ServicerContext, request: Any) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        await _refuse(context, request)
        yield request


async def _settled(result: Any) -> Any:
    """A servicer method's return: awaited when it is a coroutine (every pdlb servicer's is)."""
    return await result if inspect.isawaitable(result) else result


async def _streamed(responses: Any) -> AsyncIterator[Any]:
    """A streaming servicer method's responses: its async generator's, or none when it is a
    coroutine that writes them with context.write."""
    if inspect.isasyncgen(responses):
        async for response in responses:
            yield response
    else:
        await _settled(responses)


def _guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with requests parsed into Malformed markers, refused before its servicer runs.
    grpc.aio picks how to run a method by its function's kind (coroutine, async generator), so each
    wrapper has the kind of its shape: async generators for streamed responses."""
    parse = _parser(handler.request_deserializer, method)
    serialize = handler.response_serializer
    if handler.unary_unary:
        unary_unary = handler.unary_unary

        async def one_to_one(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _refuse(context, request)
            return await _settled(unary_unary(request, context))

        return grpc.unary_unary_rpc_method_handler(one_to_one, parse, serialize)
    if handler.unary_stream:
        unary_stream = handler.unary_stream

        async def one_to_many(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _refuse(context, request)
            async for response in _streamed(unary_stream(request, context)):
                yield response

        return grpc.unary_stream_rpc_method_handler(one_to_many, parse, serialize)
    if handler.stream_unary:
        stream_unary = handler.stream_unary

        async def many_to_one(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await _settled(stream_unary(_checked(requests, context), context))

        return grpc.stream_unary_rpc_method_handler(many_to_one, parse, serialize)
    stream_stream = handler.stream_stream

    async def many_to_many(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in _streamed(stream_stream(_checked(requests, context), context)):
            yield response

    return grpc.stream_stream_rpc_method_handler(many_to_many, parse, serialize)


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Ends a call whose request does not parse with INVALID_ARGUMENT (see the module's text)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # no such method (gRPC answers UNIMPLEMENTED), or raw bytes taken as they come
        return _guard(handler, handler_call_details.method)
