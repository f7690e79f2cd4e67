"""Scheduler servicer: admission, token streaming, abort, load, and PD KV hand-off."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc

from pdlb.common.bootstrap_locator import BootstrapLocator
from pdlb.common.requests import InvalidRequest, check_request_off_loop, prompt_chars_limit, sampling_seed
from pdlb.common.security import open_channel
from pdlb.common.tokenizer import Tokenizer
from pdlb.engines.base import Engine, KVHandoffEngine
from pdlb.engines.request import AdmissionError, ConnectorKV, PreloadedKV, Sampled, SamplingConfig, Sequence
from pdlb.services.scheduler.kv_transfer import (
    TransferError,
    decode_kv,
    encode_connector,
    encode_kv,
    transfer_params,
)
from pdlb.v1 import bootstrap_pb2, common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

KV_WAIT_S = 600.0  # default of --kv-wait-timeout: how long a hand-off without a deadline may wait
LOOKUP_SLICE_S = 30.0  # one LookupRoom call waits at most this long (Bootstrap caps wait_ms); then again
MAX_PENDING_HANDOFFS = 10_000  # decode requests waiting for their room's KV at once
MAX_KV_CHANNELS = 256  # prefill addresses with a cached channel (they come from requests)
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


async def _next_outputs(
    seq: Sequence,
) -> tuple[list[int], int, tuple[grpc.StatusCode, str] | None, list[Sampled]]:
    """The next tokens of a request, merged with any that queued up meanwhile: a slow reader gets
    fewer, larger messages instead of falling further behind. Then the finish reason, or the error
    the request failed with, and the tokens' log-probabilities when asked for."""
    out = await seq.outbox.get()
    tokens, reason, logprobs = list(out.token_ids), out.finish_reason, list(out.logprobs)
    while not reason and not seq.outbox.empty():
        out = seq.outbox.get_nowait()
        tokens += out.token_ids
        logprobs += out.logprobs
        reason = out.finish_reason
    return tokens, reason, out.error, logprobs


def sampling_config(params: common_pb2.SamplingParams, temperature: float) -> SamplingConfig | None:
    """The sampler's parameters of a request; None when only temperature matters (the fast path)."""
    config = SamplingConfig(
        temperature=temperature,
        top_k=max(params.top_k, 0),
        top_p=params.top_p or 1.0,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty or 1.0,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=tuple(sorted(params.logit_bias.items())),
        logprobs=params.logprobs if params.HasField("logprobs") else None,
    )
    return config if config.shapes_logits or config.logprobs is not None else None


def token_logprob(sampled: Sampled) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=sampled.token,
        logprob=sampled.logprob or 0.0,
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in sampled.top],
    )


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        engine: Engine | KVHandoffEngine,  # prefill/decode roles need a KVHandoffEngine
        worker: common_pb2.WorkerInfo,
        role: str,
        acks: DispatchAcks,
        bootstrap: BootstrapLocator | None,
        tokenizer: Tokenizer,
        kv_wait_timeout_s: float = KV_WAIT_S,
    ) -> None:
        """`kv_wait_timeout_s`: how long a PD hand-off waits for its room (decode: the Bootstrap
        record and the KV; prefill: a PullKV for a room not prefilled yet) when the request has no
        deadline of its own; a deadline always wins, so a request queued at prefill is never failed
        while its deadline allows."""
        self.engine, self.worker, self.role, self.acks, self.bootstrap = engine, worker, role, acks, bootstrap
        self.tokenizer = tokenizer  # for clients that send text straight to the worker
        self.kv_wait_timeout_s = kv_wait_timeout_s
        self._kv_channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        # Decode requests pulling their KV (not in the engine yet): request id -> room. Checked
        # with the engine's own tables, so a duplicate id or room is refused during the pull too.
        self._handoffs: dict[str, int] = {}

    async def Generate(self, request: scheduler_pb2.SchedulerGenerateRequest, context) -> AsyncIterator:
        req = request.request
        try:
            # The limit the engine reports (within its context), so refusals name what is advertised.
            limit = self.engine.load().max_prompt_tokens or self.engine.limits.max_prompt_tokens
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
            sampling=sampling_config(req.sampling, checked.temperature),
            min_tokens=req.sampling.min_tokens,
            prefill_only=self.role == "prefill",
            bootstrap_room=room,
        )
        try:
            self.engine.check(seq)  # fail fast, before a KV pull
            if self.role == "decode":
                self._claim_handoff(seq)
                try:
                    seq.preloaded = await self._pull_kv(request, seq, context)
                finally:
                    del self._handoffs[seq.request_id]
            self.engine.submit(seq, request.dp_wave if request.HasField("dp_wave") else None)
        except AdmissionError as exc:
            await context.abort(exc.code, str(exc))
        self.acks.record(request.dispatcher_id, request.dispatch_seq)  # now part of this worker's load
        finished = False
        try:
            while not finished:
                tokens, reason, error, logprobs = await _next_outputs(seq)
                finished = reason != common_pb2.FINISH_REASON_UNSPECIFIED
                if error is not None:
                    await context.abort(*error)
                yield scheduler_pb2.SchedulerGenerateResponse(
                    request_id=seq.request_id,
                    token_ids=tokens,
                    finish_reason=reason,
                    prompt_tokens=len(seq.prompt),
                    cached_tokens=seq.cache_hit,
                    logprobs=[token_logprob(sampled) for sampled in logprobs],
                )
        finally:
            if not finished:  # the client went away: free the batch slot and the KV
                self.engine.abort(seq.request_id)

    def _claim_handoff(self, seq: Sequence) -> None:
        """Decode: refuse a second request with the id or room of one still pulling its KV here."""
        rid, room = seq.request_id, seq.bootstrap_room
        if rid in self._handoffs:
            raise AdmissionError(grpc.StatusCode.ALREADY_EXISTS, f"request {rid} is already running here")
        other = next((r for r, taken in self._handoffs.items() if taken == room), None)
        if other is not None:
            raise AdmissionError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request {rid}: bootstrap room {room} is already taken here by request {other} (waiting for "
                "its KV); give every request a room of its own",
            )
        if len(self._handoffs) >= MAX_PENDING_HANDOFFS:
            raise AdmissionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request {rid}: {MAX_PENDING_HANDOFFS} decode requests already wait for their KV here; retry later",
            )
        self._handoffs[rid] = room  # type: ignore[assignment]  # decode requests always have a room

    def _wait_budget(self, context) -> tuple[float, str]:
        """How long a hand-off may wait, and what bounds it (for the message when it runs out)."""
        remaining = context.time_remaining()
        if remaining is None:
            return self.kv_wait_timeout_s, f"--kv-wait-timeout of {self.kv_wait_timeout_s:g} s"
        return max(remaining, 0.0), "the request's deadline"

    async def _pull_kv(
        self, request: scheduler_pb2.SchedulerGenerateRequest, seq: Sequence, context
    ) -> PreloadedKV | ConnectorKV:
        room = seq.bootstrap_room
        wait_s, bound = self._wait_budget(context)
        until = time.monotonic() + wait_s
        address = request.prefill_address or await self._lookup(room, seq.request_id, until, bound, context)
        channel, temporary = self._kv_channel(address)
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        left = max(until - time.monotonic(), 0.001)
        call = stub.PullKV(scheduler_pb2.PullKVRequest(bootstrap_room=room, request_id=seq.request_id), timeout=left)
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
            # NOT_FOUND: the room's KV was pulled already or expired; DEADLINE_EXCEEDED: it was
            # still not ready when the wait ran out (a timeout, never "not found").
            passed = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
            code = err.code() if err.code() in passed else grpc.StatusCode.UNAVAILABLE
            detail = f"waited up to {bound}: " if code == grpc.StatusCode.DEADLINE_EXCEEDED else ""
            await _abort_kv(
                context,
                code,
                f"request {seq.request_id}: pulling KV of room {room} from {address} failed: {detail}"
                f"{err.code().name}: {err.details()}",
            )
        except TransferError as exc:
            await _abort_kv(context, grpc.StatusCode.UNAVAILABLE, f"request {seq.request_id}: KV of room {room}: {exc}")
        finally:
            if temporary:
                await channel.close()
        if list(header.input_ids) != seq.prompt:
            await _abort_kv(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request {seq.request_id}: room {room} holds the KV of a different prompt",
            )
        ours = self.engine.kv_connector
        if header.kv_connector != ours:
            what = f"vLLM's {header.kv_connector}" if header.kv_connector else "pdlb's own KV stream"
            mine = f"vLLM's {ours}" if ours else "pdlb's own KV stream"
            await _abort_kv(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request {seq.request_id}: room {room} was prefilled for {what}, but this decode worker "
                f"loads KV through {mine}; run prefill and decode workers on the same engine",
            )
        if header.kv_connector:
            return ConnectorKV(
                room,
                seq.request_id,
                seq.prompt,
                header.first_token_id,
                header.kv_connector,
                transfer_params(header),  # checked by decode_kv
            )
        return PreloadedKV(k=k, v=v, first_token=header.first_token_id)

    def _kv_channel(self, address: str) -> tuple[grpc.aio.Channel, bool]:
        """A channel to a prefill worker, and whether it is a one-off to close after the pull
        (addresses come from requests: at most MAX_KV_CHANNELS are kept)."""
        channel = self._kv_channels.get(address)
        if channel is not None:
            self._kv_channels.move_to_end(address)
            return channel, False
        channel = open_channel(address)
        if len(self._kv_channels) >= MAX_KV_CHANNELS:
            return channel, True
        self._kv_channels[address] = channel
        return channel, False

    async def _lookup(self, room: int, request_id: str, until: float, bound: str, context) -> str:
        """The prefill address of `room` from Bootstrap, waiting until `until` (monotonic) for its
        registration: the prefill half may be queued for long, which is no failure. Past `until`:
        DEADLINE_EXCEEDED."""
        while True:
            stub = self.bootstrap.stub() if self.bootstrap else None
            if stub is None:
                await _abort_kv(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"request {request_id}: no prefill_address given and no bootstrap server known",
                )
            left = until - time.monotonic()
            wait_s = min(max(left, 0.0), LOOKUP_SLICE_S)
            try:
                reply = await stub.LookupRoom(
                    bootstrap_pb2.LookupRoomRequest(bootstrap_room=room, wait_ms=int(wait_s * 1000)),
                    timeout=wait_s + 5,
                )
                return reply.record.prefill_address
            except grpc.aio.AioRpcError as err:
                if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED):
                    code = (
                        err.code() if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else grpc.StatusCode.UNAVAILABLE
                    )
                    await _abort_kv(
                        context, code, f"request {request_id}: bootstrap look-up of room {room}: {err.details()}"
                    )
            if time.monotonic() >= until - 0.001:
                await _abort_kv(
                    context,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"request {request_id}: room {room} was not registered by its prefill half within {bound} "
                    "(the prefill is still queued or running, or was never sent)",
                )

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
        room = request.bootstrap_room
        wait_s, bound = self._wait_budget(context)
        try:
            held = await self.engine.wait_held(room, wait_s)
        except AdmissionError as exc:  # its KV was here and is gone: pulled already, or expired
            await context.abort(exc.code, str(exc))
        if held is None:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"room {room}: no KV ready here within {bound} (its prefill is still queued or running here, "
                "or it was prefilled elsewhere)",
            )
        try:
            if isinstance(held, ConnectorKV):  # the KV went through the engines' connector: say where
                yield encode_connector(held.prompt, held.first_token, held.kv_connector, held.kv_transfer_params)
            else:
                k, v = await self.engine.read_held(held)
                for message in encode_kv(held.prompt, held.first_token, k, v):
                    yield message
        finally:
            self.engine.free_held(held)  # after transfer, or when the decode side went away

    async def close(self) -> None:
        for channel in self._kv_channels.values():
            await channel.close()
        await asyncio.sleep(0)
