"""Scheduler servicer: admission, token streaming, abort, load, and PD KV hand-off."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from pdlb.common.bootstrap_locator import BootstrapLocator
from pdlb.common.requests import InvalidRequest, check_request_off_loop, prompt_chars_limit, sampling_seed
from pdlb.common.security import open_channel
from pdlb.common.tokenizer import Tokenizer
from pdlb.engines.base import Engine, KVHandoffEngine
from pdlb.engines.torch.batching import AdmissionError, PreloadedKV, Sequence
from pdlb.services.scheduler.kv_transfer import TransferError, decode_kv, encode_kv
from pdlb.v1 import bootstrap_pb2, common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

KV_WAIT_S = 30.0  # longest a decode request waits for its room's prefill
MAX_DISPATCHERS_TRACKED = 1024


class DispatchAcks:
    """Highest dispatch sequence received per dispatcher, acknowledged in load reports."""

    def __init__(self) -> None:
        self.highest: dict[str, int] = {}

    def record(self, dispatcher_id: str, seq: int) -> None:
        if not dispatcher_id or seq <= 0:
            return
        if dispatcher_id not in self.highest and len(self.highest) >= MAX_DISPATCHERS_TRACKED:
            self.highest.pop(next(iter(self.highest)))  # forget the oldest dispatcher
        self.highest[dispatcher_id] = max(seq, self.highest.get(dispatcher_id, 0))

    def get(self, dispatcher_id: str) -> int:
        return self.highest.get(dispatcher_id, 0)


NO_REDISPATCH_KEY = "pdlb-no-redispatch"


async def _abort_kv(context, code: grpc.StatusCode, message: str) -> None:
    """Fail a decode request whose KV hand-off failed. The KV is consumed or lost with it, so
    another decode rank could not do better: tell the dispatcher not to re-dispatch."""
    context.set_trailing_metadata(((NO_REDISPATCH_KEY, "kv-handoff"),))
    await context.abort(code, message)


async def _next_outputs(seq: Sequence) -> tuple[list[int], int, tuple[grpc.StatusCode, str] | None]:
    """The next tokens of a request, merged with any that queued up meanwhile: a slow reader gets
    fewer, larger messages instead of falling further behind. Then the finish reason, or the error
    the request failed with."""
    out = await seq.outbox.get()
    tokens, reason = list(out.token_ids), out.finish_reason
    while not reason and not seq.outbox.empty():
        out = seq.outbox.get_nowait()
        tokens += out.token_ids
        reason = out.finish_reason
    return tokens, reason, out.error


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        engine: Engine | KVHandoffEngine,  # prefill/decode roles need a KVHandoffEngine
        worker: common_pb2.WorkerInfo,
        role: str,
        acks: DispatchAcks,
        bootstrap: BootstrapLocator | None,
        tokenizer: Tokenizer,
    ) -> None:
        self.engine, self.worker, self.role, self.acks, self.bootstrap = engine, worker, role, acks, bootstrap
        self.tokenizer = tokenizer  # for clients that send text straight to the worker
        self._kv_channels: dict[str, grpc.aio.Channel] = {}

    async def Generate(self, request: scheduler_pb2.SchedulerGenerateRequest, context) -> AsyncIterator:
        req = request.request
        try:
            limit = self.engine.limits.max_prompt_tokens
            checked = await check_request_off_loop(req, limit, self.tokenizer, prompt_chars_limit(limit))
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        room = req.bootstrap_room if req.HasField("bootstrap_room") else None
        if self.role != "mixed" and room is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {checked.request_id}: a {self.role} worker needs bootstrap_room",
            )
        seq = Sequence(
            request_id=checked.request_id,
            prompt=checked.input_ids,
            max_new_tokens=checked.max_new_tokens,
            temperature=checked.temperature,
            stop_ids=frozenset(req.sampling.stop_token_ids),
            ignore_eos=req.sampling.ignore_eos,
            seed=sampling_seed(req),
            seed_position=req.sampling.seed_position,
            prefill_only=self.role == "prefill",
            bootstrap_room=room,
        )
        try:
            self.engine.check(seq)  # fail fast, before a KV pull
            if self.role == "decode":
                seq.preloaded = await self._pull_kv(request, seq, context)
            self.engine.submit(seq, request.dp_wave if request.HasField("dp_wave") else None)
        except AdmissionError as exc:
            await context.abort(exc.code, str(exc))
        self.acks.record(request.dispatcher_id, request.dispatch_seq)  # now part of this worker's load
        finished = False
        try:
            while not finished:
                tokens, reason, error = await _next_outputs(seq)
                finished = reason != common_pb2.FINISH_REASON_UNSPECIFIED
                if error is not None:
                    await context.abort(*error)
                yield scheduler_pb2.SchedulerGenerateResponse(
                    request_id=seq.request_id,
                    token_ids=tokens,
                    finish_reason=reason,
                    prompt_tokens=len(seq.prompt),
                    cached_tokens=seq.cache_hit,
                )
        finally:
            if not finished:  # the client went away: free the batch slot and the KV
                self.engine.abort(seq.request_id)

    async def _pull_kv(self, request: scheduler_pb2.SchedulerGenerateRequest, seq: Sequence, context) -> PreloadedKV:
        room = seq.bootstrap_room
        remaining = context.time_remaining()
        wait_s = min(KV_WAIT_S, remaining) if remaining is not None else KV_WAIT_S
        address = request.prefill_address or await self._lookup(room, seq.request_id, wait_s, context)
        channel = self._kv_channels.get(address)
        if channel is None:
            channel = self._kv_channels[address] = open_channel(address)
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        call = stub.PullKV(scheduler_pb2.PullKVRequest(bootstrap_room=room, request_id=seq.request_id), timeout=wait_s)
        first: list[float] = []

        async def timed(stream):  # the clock starts at the first message, not while prefill runs
            async for message in stream:
                if not first:
                    first.append(time.perf_counter())
                yield message

        try:
            header, k, v = await decode_kv(timed(call))
            self.engine.kv_receive_s += time.perf_counter() - first[0]
            self.engine.kv_received_tokens += len(header.input_ids)
        except grpc.aio.AioRpcError as err:
            code = grpc.StatusCode.NOT_FOUND if err.code() == grpc.StatusCode.NOT_FOUND else grpc.StatusCode.UNAVAILABLE
            await _abort_kv(
                context,
                code,
                f"request {seq.request_id}: pulling KV of room {room} from {address} failed: "
                f"{err.code().name}: {err.details()}",
            )
        except TransferError as exc:
            await _abort_kv(context, grpc.StatusCode.UNAVAILABLE, f"request {seq.request_id}: KV of room {room}: {exc}")
        if list(header.input_ids) != seq.prompt:
            await _abort_kv(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request {seq.request_id}: room {room} holds the KV of a different prompt",
            )
        return PreloadedKV(k=k, v=v, first_token=header.first_token_id)

    async def _lookup(self, room: int, request_id: str, wait_s: float, context) -> str:
        stub = self.bootstrap.stub() if self.bootstrap else None
        if stub is None:
            await _abort_kv(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request {request_id}: no prefill_address given and no bootstrap server known",
            )
        try:
            reply = await stub.LookupRoom(
                bootstrap_pb2.LookupRoomRequest(bootstrap_room=room, wait_ms=int(wait_s * 1000)),
                timeout=wait_s + 1,
            )
        except grpc.aio.AioRpcError as err:
            code = err.code() if err.code() == grpc.StatusCode.NOT_FOUND else grpc.StatusCode.UNAVAILABLE
            await _abort_kv(context, code, f"request {request_id}: bootstrap look-up of room {room}: {err.details()}")
        return reply.record.prefill_address

    async def Abort(self, request: scheduler_pb2.AbortRequest, context) -> scheduler_pb2.AbortResponse:
        if not self.engine.abort(request.request_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {request.request_id!r} is not running here")
        return scheduler_pb2.AbortResponse()

    async def GetLoad(self, request: scheduler_pb2.GetLoadRequest, context) -> scheduler_pb2.GetLoadResponse:
        return scheduler_pb2.GetLoadResponse(worker=self.worker, load=self.engine.load())

    async def PullKV(self, request: scheduler_pb2.PullKVRequest, context) -> AsyncIterator:
        if self.role != "prefill":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this is a {self.role} worker; PullKV is served by prefill workers",
            )
        remaining = context.time_remaining()
        held = await self.engine.wait_held(request.bootstrap_room, min(KV_WAIT_S, remaining or KV_WAIT_S))
        if held is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"room {request.bootstrap_room} holds no KV here (not prefilled here, already pulled, or expired)",
            )
        try:
            k, v = await self.engine.read_held(held)
            for message in encode_kv(held.prompt, held.first_token, k, v):
                yield message
        finally:
            self.engine.free_held(held)  # after transfer, or when the decode side went away

    async def close(self) -> None:
        for channel in self._kv_channels.values():
            await channel.close()
        await asyncio.sleep(0)
