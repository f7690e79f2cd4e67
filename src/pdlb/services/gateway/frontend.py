"""One request end to end, as the gateway serves it (gRPC and HTTP alike).

Mixed mode forwards to a mixed dispatcher. PD mode allocates a bootstrap room and sends the same
request to a prefill and a decode dispatcher, the prefill half once the decode half is bound to a
rank; the decode stream carries the tokens, and a failed prefill half cancels the decode half (which
would otherwise wait for KV that never comes).

No request is lost to a dying worker: the gateway holds the client's stream, so when an attempt
fails for a reason that is not the request's own (UNAVAILABLE, a lost KV hand-off...), it runs the
request once more, within its deadline. If no token reached the client yet, the request is re-run
end to end with a new room. Otherwise it is resumed: the prompt plus the tokens already streamed is
prefilled elsewhere and generation continues for the remaining tokens, with seed_position set so a
seeded sampler draws what the original would have; for greedy and seeded requests the client's
stream is exactly the uninterrupted one. Not resumable: a second failure of the same request, a
request pinned to a rank whose worker is gone (the pin is honoured, so the retry fails alike), and
failures that are the request's own (bad input, back-pressure, deadline).

Dispatcher replicas: each attempt prefers replicas the request has not failed on, and a failure
whose dispatcher connection is down (a killed replica) is retried on another replica at once, up to
MAX_DISPATCHER_MOVES times besides the retry above. When no replica of a role is reachable (its only
dispatcher restarting), the request first waits for one to come back, up to `dispatcher_wait_s` and
within its deadline, then retries or resumes as above; past that it fails UNAVAILABLE naming the
role and addresses that stayed down (DEADLINE_EXCEEDED when the deadline came first). A call cut
under a running request (its channel closed) fails the attempt like a dead worker would: it is
retried or resumed, never dropped silently.

Shutting down (`drain()`): new requests are refused UNAVAILABLE, requests in flight run on, and one
that fails is not retried (its dispatchers are going too): it fails at once, UNAVAILABLE, naming the
shutdown. `end_running()` gives those in flight the shutdown grace, then cuts the ones still running:
each fails UNAVAILABLE naming the shutdown and the grace (an error event in an HTTP stream, the
status of a gRPC one), never a stream that just stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc

from pdlb.client import new_room
from pdlb.common.plurals import counted
from pdlb.common.requests import (
    MAX_NEW_TOKENS_LIMIT,
    RETRY_AFTER_KEY,
    InvalidRequest,
    TooLong,
    check_request_off_loop,
    prompt_chars_limit,
    sampling_seed,
)
from pdlb.common.shutdown_cut import Cut, ShutdownCut
from pdlb.common.tokenizer import StreamDecoder, Tokenizer, visible_tokens
from pdlb.services.gateway.upstreams import Upstreams
from pdlb.v1 import common_pb2, dispatch_pb2

log = logging.getLogger(__name__)
MAX_RETRIES = 1  # retries after a failure behind a live dispatcher (a worker died, a KV hand-off failed)
MAX_DISPATCHER_MOVES = 2  # further retries when the dispatcher itself was unreachable
DISPATCHER_WAIT_S = 5.0  # default of how long a request waits for an unreachable role's dispatcher to return
MEMBERSHIP_WAIT_S = 5.0  # how long a request waits for dispatchers to be known (a membership flap)
SHUTTING_DOWN = "the gateway is shutting down"
CUT_SETTLE_S = 5.0  # how long requests cut by a shutdown get to send their failure
# Failures that are the request's own: retrying elsewhere would fail alike (or must not happen).
FINAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


class RequestFailed(Exception):
    """A request's failure; `retry_after_s`: the dispatcher's retry hint of a RESOURCE_EXHAUSTED;
    `field`: the InferenceRequest field an INVALID_ARGUMENT refused (worker_field), or ""."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s
        self.field = worker_field(message) if code == grpc.StatusCode.INVALID_ARGUMENT else ""


# The workers' own refusals of a request (engines/request.py check_prompt: the vocabulary and the
# prompt limit, which only they know for sure) and the InferenceRequest field each one is about, by
# the words after "request ID: " that begin its message.
WORKER_REFUSALS = (("logit_bias ", "logit_bias"), ("token id ", "input_ids"), ("prompt of ", "input_ids"))


def worker_field(message: str) -> str:
    """The InferenceRequest field a worker's INVALID_ARGUMENT `message` names ("logit_bias",
    "input_ids"), or "" when it is none of WORKER_REFUSALS."""
    _, _, said = message.partition(": ")
    return next((name for words, name in WORKER_REFUSALS if said.startswith(words)), "")


def retry_after_of(err: grpc.aio.AioRpcError) -> int | None:
    """The `retry-after` trailing metadata (whole seconds) a dispatcher's queue sheds with."""
    for key, value in err.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY and str(value).isdigit():
            return int(value)
    return None


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    finish_reason: int
    decode_dp_rank: int
    prefill_dp_rank: int
    prompt_tokens: int
    cached_tokens: int
    retries: int
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)  # one per token, when asked


@dataclass
class Prepared:
    """A checked request, tokenised once (a resume appends to these ids)."""

    request: common_pb2.InferenceRequest
    prompt: list[int]
    max_new_tokens: int


class Frontend:
    def __init__(
        self,
        upstreams: Upstreams,
        tokenizer: Tokenizer,
        max_prompt_tokens: int,
        timeout_s: float,
        on_retry: Callable[[], None] = lambda: None,
        max_prompt_chars: int = 0,
        limits: Callable[[], tuple[int, int]] | None = None,
        dispatcher_wait_s: float = DISPATCHER_WAIT_S,
    ) -> None:
        self.upstreams, self.tokenizer = upstreams, tokenizer
        # (longest prompt, most prompt + new tokens) the live workers take (WorkerApi.limits): the
        # limits checked before dispatch, and advertised in /server_info.
        self.limits = limits or (lambda: (max_prompt_tokens, max_prompt_tokens + MAX_NEW_TOKENS_LIMIT))
        self.max_prompt_tokens, self.timeout_s = max_prompt_tokens, timeout_s
        self.max_prompt_chars = prompt_chars_limit(max_prompt_tokens, max_prompt_chars)
        self.on_retry = on_retry  # counted in the gateway's metrics
        self.dispatcher_wait_s = dispatcher_wait_s
        # Request ids and client-chosen bootstrap rooms of the requests in flight here: a duplicate
        # is refused (ALREADY_EXISTS) before it reaches a worker. Bounded by the stream slots.
        self.active_ids: set[str] = set()
        self.active_rooms: set[int] = set()
        self.draining = False
        self.drained = asyncio.Event()  # set with draining, for waits that end when it begins
        # The tasks serving a request (an HTTP handler, a gRPC call), bounded by the stream slots, so
        # a shutdown whose grace runs out can cut them with a status naming it.
        self.calls = ShutdownCut(SHUTTING_DOWN)

    def drain(self) -> None:
        """Shutting down: refuse new requests; a request in flight that fails is not retried."""
        self.draining = True
        self.drained.set()

    async def end_running(self, grace_s: float, settle_s: float = CUT_SETTLE_S) -> None:
        """Shutting down, after drain(): wait up to `grace_s` seconds for the requests in flight to
        finish, then cut those still running, and wait up to `settle_s` seconds for them to end.
        A cut request's stream raises RequestFailed (UNAVAILABLE, naming the shutdown and the
        grace) where it would give its next chunk (shutdown_cut.py), so the failure is always the
        stream's own, which the consumer sends as it sends any."""
        await self.calls.end(grace_s, settle_s)

    async def prepare(self, request: common_pb2.InferenceRequest, fit_new_tokens: bool = False) -> Prepared:
        """Validate and tokenise (off the event loop) against the workers' length limits; raises
        InvalidRequest, TooLong when the prompt, or the prompt with max_new_tokens, exceeds them.
        `fit_new_tokens` (max_new_tokens was a default, not the client's): cut it to the room the
        context leaves after the prompt instead of refusing (as vLLM does)."""
        max_prompt, context = self.limits()
        max_prompt = min(max_prompt, self.max_prompt_tokens)
        try:
            checked = await check_request_off_loop(request, max_prompt, self.tokenizer, self.max_prompt_chars)
        except TooLong as exc:
            raise TooLong(exc.field, f"{exc}: the model's context is {context} tokens; shorten the prompt") from None
        max_new = checked.max_new_tokens
        total = len(checked.input_ids) + max_new
        if total > context and fit_new_tokens:
            max_new = context - len(checked.input_ids)
        elif total > context:
            raise TooLong(
                "max_new_tokens",
                f"request {checked.request_id}: the model's context is {context} tokens; however, {total} were "
                f"requested ({len(checked.input_ids)} in the prompt, {max_new} new). Ask for at most "
                f"{_tokens(context - len(checked.input_ids))} with this prompt, or shorten it",
            )
        request = common_pb2.InferenceRequest.FromString(request.SerializeToString())
        request.ClearField("input_ids")
        request.input_ids.extend(checked.input_ids)
        request.ClearField("text")
        request.ClearField("messages")
        request.sampling.max_new_tokens = max_new
        return Prepared(request, checked.input_ids, max_new)

    async def generate(self, prepared: Prepared, timeout: float | None = None) -> AsyncIterator[Chunk]:
        """Stream the request's tokens; raises RequestFailed with a status naming the request
        (ALREADY_EXISTS at once when its id, or the bootstrap room it chose, is in flight here)."""
        original = prepared.request
        rid = original.request_id
        room = original.bootstrap_room if original.HasField("bootstrap_room") else None
        if self.draining:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"request {rid}: {SHUTTING_DOWN}; send it to another one")
        if rid in self.active_ids:
            raise RequestFailed(
                grpc.StatusCode.ALREADY_EXISTS, f"request {rid} is already in flight here; request ids must be unique"
            )
        if room is not None and room in self.active_rooms:
            raise RequestFailed(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request {rid}: bootstrap room {room} is taken by another request in flight; leave it unset "
                "(the gateway allocates one) or give every request its own",
            )
        self.active_ids.add(rid)
        if room is not None:
            self.active_rooms.add(room)
        try:
            async with aclosing(self.calls.stream(self._generate(prepared, timeout))) as chunks:
                async for chunk in chunks:
                    yield chunk
        except Cut as cut:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"request {rid}: {cut}") from None
        finally:
            self.active_ids.discard(rid)
            if room is not None:
                self.active_rooms.discard(room)

    async def _generate(self, prepared: Prepared, timeout: float | None) -> AsyncIterator[Chunk]:
        original = prepared.request
        rid = original.request_id
        deadline = time.monotonic() + min(timeout or self.timeout_s, self.timeout_s)
        decoder = StreamDecoder(self.tokenizer, not original.sampling.keep_special_tokens)
        sent: list[int] = []
        cached = 0
        retries = moves = 0
        avoid: set[str] = set()  # dispatchers this request failed on: other replicas first
        while True:
            used: dict[str, str] = {}  # role -> the dispatcher this attempt used
            attempt = self._attempt(self._attempt_request(prepared, sent, retries), deadline, avoid, used)
            try:
                async for response, prefill_rank, attempt_cached in attempt:
                    tokens = list(response.token_ids)
                    if tokens and not sent:
                        cached = attempt_cached
                    sent += tokens
                    text = decoder.push(visible_tokens(tokens, response.finish_reason))
                    if response.finish_reason:
                        text += decoder.flush()
                    yield Chunk(
                        tokens,
                        text,
                        response.finish_reason,
                        response.dp_rank,
                        prefill_rank,
                        len(prepared.prompt),
                        cached,
                        retries,
                        list(response.logprobs),
                    )
                    if response.finish_reason:
                        return
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"request {rid}: the stream ended without a finish")
            except (grpc.aio.AioRpcError, RequestFailed) as err:
                code, details = (
                    (err.code(), err.details())
                    if isinstance(err, grpc.aio.AioRpcError)
                    else (
                        err.code,
                        err.message,
                    )
                )
                # Errors of a retry name its attempt id: the client knows only its own.
                details = details.replace(_attempt_id(rid, retries), rid) if retries else details
                left = deadline - time.monotonic()
                avoid.update(used.values())
                # every used dispatcher is checked: each one found down is passed over by later requests
                moved = code not in FINAL and [a for a in used.values() if self.upstreams.check_broken(a)]
                budget = moves < MAX_DISPATCHER_MOVES if moved else retries - moves < MAX_RETRIES
                # a pin names a rank, not a dispatcher: a pinned request still moves off a dead replica
                if self.draining and code not in FINAL:
                    # its dispatchers are stopping too: a retry would wait for ones that never come
                    text = _named(rid, details, retries)
                    raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"{text} ({SHUTTING_DOWN}: not retried)") from None
                # no dispatcher known (`used` empty) even after the attempt's membership wait: a retry
                # would only wait again
                if code in FINAL or not used or not budget or left <= 0 or (_pinned(original) and not moved):
                    if left <= 0:
                        code = grpc.StatusCode.DEADLINE_EXCEEDED
                    elif not budget and code not in FINAL:
                        # retries spent (e.g. a dispatcher dying after each restart): say where it
                        # failed last, not only gRPC's words for a connection's end
                        where = ", ".join(f"{role} dispatcher {a}" for role, a in used.items())
                        last = details.removeprefix(f"request {rid}: ")
                        details = (
                            f"request {rid}: failed again through {where} ({last}); "
                            f"{counted(len(sent), 'token')} streamed before; not retried further: check that "
                            "dispatcher and its workers"
                        )
                    hint = retry_after_of(err) if isinstance(err, grpc.aio.AioRpcError) else err.retry_after_s
                    raise RequestFailed(code, _named(rid, details, retries), hint) from None
                waited = min(self.dispatcher_wait_s, left)
                if moved and (down := await self._await_dispatchers(list(used), waited)):
                    where = "; ".join(
                        f"{', '.join(addresses)} not accepting connections"
                        if (addresses := self.upstreams.addresses(role))
                        else f"no {role} dispatcher registered"
                        for role in down
                    )
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if deadline <= time.monotonic() else code
                    text = (
                        f"no {' or '.join(down)} dispatcher reachable for {waited:.1f} s ({where}; "
                        f"{counted(len(sent), 'token')} streamed before); start one, or raise --dispatcher-wait"
                    )
                    raise RequestFailed(code, _named(rid, text, retries)) from None
                retries += 1
                moves += bool(moved)
                self.on_retry()
                log.warning(
                    "request %s failed (%s: %s) after %d tokens; %s on %s",
                    rid,
                    code.name,
                    details,
                    len(sent),
                    "resuming" if sent else "re-running it",
                    "another dispatcher replica" if moved else "other ranks",
                )
            finally:
                await attempt.aclose()  # a client that left, or a stop string: cancel the upstream calls

    async def _await_dispatchers(self, roles: list[str], timeout: float) -> list[str]:
        """Every replica of one of `roles` unreachable or gone (the only one restarting): wait up to
        `timeout` seconds for one to come back; the roles still without one ([] when all have one)."""
        if not self.upstreams.unreachable(roles):
            return []  # another replica is up: retry there at once
        log.warning("no %s dispatcher reachable; waiting up to %.1fs for one to come back", "/".join(roles), timeout)
        return await self.upstreams.wait_reachable(roles, timeout)

    def _attempt_request(self, prepared: Prepared, sent: list[int], retries: int) -> common_pb2.InferenceRequest:
        if not retries:
            return prepared.request
        request = common_pb2.InferenceRequest.FromString(prepared.request.SerializeToString())
        request.request_id = _attempt_id(prepared.request.request_id, retries)
        request.ClearField("bootstrap_room")
        if sent:  # resume: recompute the KV of the prompt plus what the client already has
            request.input_ids.extend(sent)
            request.sampling.max_new_tokens = prepared.max_new_tokens - len(sent)
            request.sampling.seed_position = prepared.request.sampling.seed_position + len(sent)
            # the worker would derive a seed from the new id: pin the original's
            request.sampling.seed = sampling_seed(prepared.request)
        return request

    async def _attempt(
        self, request: common_pb2.InferenceRequest, deadline: float, avoid: set[str], used: dict[str, str]
    ) -> AsyncIterator[tuple[dispatch_pb2.GenerateResponse, int, int]]:
        """One attempt's responses with the prefill rank (-1 in mixed mode) and the prompt tokens
        served from a prefix cache (PD: the prefill worker's; the decode worker computes no prompt).
        One dispatcher per role is used; `used` gets role -> its address."""
        waited = min(MEMBERSHIP_WAIT_S, max(deadline - time.monotonic(), 0))
        mode = await self.upstreams.wait_mode(waited)
        picked = {role: self.upstreams.pick(role, avoid) for role in (("mixed",) if mode == "mixed" else PD)}
        if mode is None or None in picked.values():
            halves = [role for role in PD if self.upstreams.addresses(role)]
            known = f"only a {halves[0]} one is known" if halves else "none is known"
            raise RequestFailed(
                grpc.StatusCode.UNAVAILABLE,
                f"request {request.request_id}: no dispatchers known after {waited:.1f} s (a mixed one, or a prefill "
                f"and a decode one; {known}): start them, or check the gateway's --etcd and --etcd-prefix or its "
                "--dispatcher, --prefill-dispatcher and --decode-dispatcher",
            )
        used.update(picked)  # type: ignore[arg-type]
        timeout = max(deadline - time.monotonic(), 0.001)
        async with contextlib.AsyncExitStack() as stack:
            stubs = {role: await stack.enter_async_context(self.upstreams.dispatcher(a)) for role, a in picked.items()}
            if mode == "mixed":
                call = stubs["mixed"].Generate(dispatch_pb2.GenerateRequest(request=request), timeout=timeout)
                try:
                    async for response in call:
                        yield response, -1, response.cached_tokens
                except asyncio.CancelledError:
                    _raise_if_cut(request, picked["mixed"])
                    raise
                finally:
                    call.cancel()
                return
            if not request.HasField("bootstrap_room"):
                request.bootstrap_room = new_room()
            message = dispatch_pb2.GenerateRequest(request=request)
            call = stubs["decode"].Generate(message, timeout=timeout)
            prefill_rank, prefill_cached = -1, 0
            prefill_error: list[BaseException] = []
            prefill_known = asyncio.get_running_loop().create_future()
            first_logprobs: list[common_pb2.TokenLogprob] = []  # the prefill worker drew the first token

            async def prefill() -> None:
                nonlocal prefill_rank, prefill_cached
                try:
                    # Only once the decode half is bound to a rank (the dispatcher's initial
                    # metadata): a decode half that flow control queues or sheds would otherwise
                    # leave the prefill worker holding KV for a decode that never comes, and a
                    # burst of sheds could fill the prefill ranks' KV until --kv-hold-ttl.
                    await call.initial_metadata()
                    if call.done():  # failed before binding: its error is the request's
                        return
                    async for response in stubs["prefill"].Generate(message, timeout=timeout):
                        prefill_rank, prefill_cached = response.dp_rank, response.cached_tokens
                        first_logprobs[:] = response.logprobs
                        if not prefill_known.done():
                            prefill_known.set_result(None)
                except asyncio.CancelledError:
                    _raise_if_cut(request, picked["prefill"])
                    raise

            def on_prefill_done(task: asyncio.Task) -> None:
                if not task.cancelled() and task.exception() is not None:
                    prefill_error.append(task.exception())
                    call.cancel()

            task = asyncio.create_task(prefill())
            task.add_done_callback(on_prefill_done)
            try:
                async for response in _handoff_errors(call, request):
                    if response.token_ids and not prefill_known.done():
                        # The prefill's last message is already on its way (the decode worker found
                        # its KV): wait for it, so the first token carries the prefill rank and cache hit.
                        await asyncio.wait({prefill_known, task}, return_when=asyncio.FIRST_COMPLETED)
                    if first_logprobs and len(response.logprobs) < len(response.token_ids):
                        # The decode worker received its first token with the KV, without its logprob.
                        merged = [first_logprobs.pop(), *response.logprobs]
                        del response.logprobs[:]
                        response.logprobs.extend(merged)
                    yield response, prefill_rank, prefill_cached
            except asyncio.CancelledError:
                if prefill_error:
                    raise _prefill_failed(prefill_error[0]) from None
                _raise_if_cut(request, picked["decode"])
                raise
            finally:
                call.cancel()
                if not task.done():
                    task.cancel()


PD = ("prefill", "decode")


def _prefill_failed(err: BaseException) -> RequestFailed:
    """The failure of a PD attempt whose prefill half failed with `err`. The request's own faults
    (FINAL: bad input, back-pressure, its deadline) read as in mixed mode, the worker's or
    dispatcher's words alone: which half found them is no concern of the client. A failure of the
    cluster (retried, then reported) names the prefill half, where an operator looks."""
    if isinstance(err, grpc.aio.AioRpcError):
        code, details, hint = err.code(), err.details() or "", retry_after_of(err)
    elif isinstance(err, RequestFailed):
        code, details, hint = err.code, err.message, err.retry_after_s
    else:
        code, details, hint = grpc.StatusCode.UNAVAILABLE, str(err), None
    return RequestFailed(code, details if code in FINAL else f"prefill half: {details}", hint)


def _raise_if_cut(request: common_pb2.InferenceRequest, address: str) -> None:
    """A CancelledError that is not this task's own cancellation (the client left, a stop string) is a
    call cut under the request, by its channel closing: fail the attempt so it is retried, and never
    end the client's stream silently."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11; before, every cancel is taken as ours
    if cancelling is not None and cancelling() == 0:
        raise RequestFailed(
            grpc.StatusCode.UNAVAILABLE, f"request {request.request_id}: the call to dispatcher {address} was cut"
        ) from None


async def _handoff_errors(call, request: common_pb2.InferenceRequest) -> AsyncIterator[dispatch_pb2.GenerateResponse]:
    """The decode half's stream. NOT_FOUND there means the room's KV was lost in the hand-off
    (pulled by another request, or expired before the pull): not the request's fault, and no
    "not found" for the client, so it fails UNAVAILABLE (retried with a new room). A hand-off that
    ran out of time stays DEADLINE_EXCEEDED (HTTP 504)."""
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        raise RequestFailed(
            grpc.StatusCode.UNAVAILABLE,
            f"request {request.request_id}: KV hand-off of room {request.bootstrap_room} failed: {err.details()}",
        ) from None


def _tokens(count: int) -> str:
    return counted(count, "new token")


def _attempt_id(rid: str, retries: int) -> str:
    """The request id of a retry: never clashes with the first attempt's."""
    return f"{rid[:120]}~r{retries}"


def _pinned(request: common_pb2.InferenceRequest) -> bool:
    """A pinned request is not retried: the pin is honoured, so a retry would fail alike."""
    return request.HasField("prefill_dp_rank") or request.HasField("decode_dp_rank")


def _named(rid: str, details: str, retries: int) -> str:
    text = details if rid in details else f"request {rid}: {details}"
    # a retry goes to another rank, or to another dispatcher replica when one was unreachable
    return text + (f" (after {counted(retries, 'retry', 'retries')})" if retries else "")


__all__ = ["Chunk", "Frontend", "InvalidRequest", "Prepared", "RequestFailed"]
