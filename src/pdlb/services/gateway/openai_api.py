"""OpenAI-compatible HTTP API of the gateway: completions, chat completions, models, health, metrics.

aiohttp serves it on the gateway's event loop, beside grpc.aio: one small dependency that is both
server and client, streaming responses written as tokens arrive, a hard request-body bound, and
handler cancellation when a client disconnects (which cancels the upstream gRPC calls, so the
workers abort the request and free its KV).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, TransferEncodingError

from pdlb.common.requests import InvalidRequest, TooLong
from pdlb.services.gateway.body_encoding import ACCEPTED, BodyEncodingError, check_decoded, codings, decode
from pdlb.services.gateway.frontend import SHUTTING_DOWN, Chunk, Frontend, Prepared, RequestFailed
from pdlb.services.gateway.metrics import Timer
from pdlb.services.gateway.request_params import ParamError, ascii_int, check_names, sampling_from
from pdlb.services.gateway.stops import StopMatcher
from pdlb.v1 import common_pb2

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
# Chat roles vLLM's chat templates take; any other is refused (a template would render it as text).
ROLES = ("system", "user", "assistant", "tool", "developer")
# Retry-After of a 503 (no dispatcher or worker of a role): a restarted service registers within seconds.
UNAVAILABLE_RETRY_AFTER_S = 5
MAX_RANK = 1 << 20  # rank pins above this are refused: no cluster has that many ranks
# what a token id is, for refusals (the model's vocabulary bounds it further: its workers check that)
TOKEN_IDS = "token ids are integers from 0 to the model's vocabulary size - 1"
OFF_LOOP_BYTES = 64 << 10  # a compressed body this large or larger is decoded in a thread
DEADLINE_HEADER = "X-pdlb-TTFT-Deadline-Ms"
TENANT_HEADER = "X-pdlb-Tenant"


class ApiError(Exception):
    """A refusal, answered as OpenAI error JSON; `close`: the rest of the body is unknown (it trickles,
    or could not be decoded), so the connection is closed after the answer instead of reused."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        close: bool = False,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.close = status, message, param, kind, close
        self.headers = headers or {}  # sent with the answer (a 415's Accept-Encoding)


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None) -> dict:
    """OpenAI's error JSON. A 429 (back-pressure: a dispatcher's queue shed it, or the gateway's
    stream slots are taken) is OpenAI's rate-limit shape, type `rate_limit_error` and code
    `rate_limit_exceeded`, which its SDKs answer with RateLimitError and retry after Retry-After."""
    kind = kind or (
        "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    )
    code = {429: "rate_limit_exceeded", 413: "request_too_large"}.get(status)
    if status == 404:  # an unknown model, or a path this server does not serve
        code = "model_not_found" if param == "model" else "not_found"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, kind), status=status)


def failed_response(exc: RequestFailed, params: dict[str, str] | None = None) -> web.Response:
    """A failed request as OpenAI error JSON; a shed one (429) and an unavailable one (503) with
    `Retry-After` seconds (the dispatcher's hint, else 1 s for 429 and 5 s for 503). `params`: the
    API's name for each InferenceRequest field a worker refused (RequestFailed.field), its `param`."""
    status = HTTP_STATUS.get(exc.code, 500)
    response = error_response(status, exc.message, (params or {}).get(exc.field))
    if status in (429, 503):
        default = 1 if status == 429 else UNAVAILABLE_RETRY_AFTER_S
        response.headers["Retry-After"] = str(exc.retry_after_s or default)
    return response


@dataclass
class Parsed:
    chat: bool
    prepared: Prepared
    stream: bool
    include_usage: bool
    stops: list[str] = field(default_factory=list)
    logprobs: int | None = None  # report log-probabilities: the token's and this many alternatives
    model: str = ""  # the model the request named


class OpenAIApi:
    def __init__(
        self,
        frontend: Frontend,
        model_id: str,
        models: Callable[[], list[str]],
        observe,
        body_timeout_s: float = 30.0,
        max_body: int = 1 << 20,
    ) -> None:
        self.frontend, self.model_id, self.models, self.observe = frontend, model_id, models, observe
        self.body_timeout_s = body_timeout_s
        self.max_body = max_body  # bytes: the raw body's bound (aiohttp's client_max_size), and the decoded one's

    # parsing -----------------------------------------------------------------------------------
    async def read_body(self, http: web.Request) -> bytes:
        """The whole body. ApiError 408 when it trickles in slower than --http-body-timeout, stops
        short, or breaks its chunked framing after the headers (aiohttp's parser never tells); 503 when
        the gateway starts shutting down while it still arrives (the request never started here, so
        the client can send it to another gateway at once; the shutdown waits for nothing)."""
        if http.content.is_eof():  # all received with the headers (the usual): nothing to wait for
            return await http.read()
        reading = asyncio.ensure_future(http.read())
        stopping = asyncio.ensure_future(self.frontend.drained.wait())
        try:
            await asyncio.wait((reading, stopping), timeout=self.body_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not reading.done():
                reading.cancel()
            elif not reading.cancelled():
                reading.exception()  # retrieved: a client gone mid-body, while this handler is cancelled too
        if reading.done() and not reading.cancelled():
            return reading.result()
        if stopping.done() and not stopping.cancelled():
            message = f"{SHUTTING_DOWN} and the request body was still arriving; send the request to another one"
            raise ApiError(503, message, kind="server_error", close=True)
        # aiohttp's parser drops a chunked body whose framing breaks after the headers without a word
        # to the handler (the read just waits), so a malformed body ends here too: the message says so
        raise ApiError(
            408,
            f"the request body did not arrive whole within {self.body_timeout_s:g} s (--http-body-timeout): it "
            "was sent too slowly, stopped short of its Content-Length, or its chunked framing is malformed",
            close=True,
        )

    async def read_json(self, http: web.Request) -> Any:
        """The body as JSON (read_body's errors), its Content-Encoding undone (body_encoding.py:
        gzip and deflate); ApiError 415 for a coding not supported (with Accept-Encoding), 400 when
        its coding does not decode it, or it is not JSON, nests too deeply or holds text that is not
        valid Unicode, 413 when it decodes past --max-body-bytes."""
        header = ", ".join(http.headers.getall("Content-Encoding", ()))  # repeated: one list
        try:
            applied = codings(header)
        except BodyEncodingError as exc:  # refused before reading: the rest of the body is not read
            raise ApiError(exc.status, exc.message, close=True, headers={"Accept-Encoding": ACCEPTED}) from None
        try:
            raw = await self.read_body(http)
        except (web.RequestPayloadError, HttpProcessingError) as exc:  # aiohttp could not read it (its framing)
            # the parser's error, wrapped or (aiohttp's pure-Python parser, at times) as it is
            cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc
            reason = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
            if isinstance(cause, TransferEncodingError):  # aiohttp's pure-Python parser tells; its C one does not
                message = f"the request body's chunked framing is broken (Transfer-Encoding: chunked): {reason[:120]!r}"
                raise ApiError(400, message, close=True) from None
            raise ApiError(400, f"the request body could not be read: {reason[:200]}", close=True) from None
        if applied:
            try:  # a large body decodes off the event loop (about 1 ms per 100 KiB)
                raw = (
                    decode(raw, applied, self.max_body)
                    if len(raw) < OFF_LOOP_BYTES
                    else await asyncio.to_thread(decode, raw, applied, self.max_body)
                )
            except BodyEncodingError as exc:  # closed after, as README promises of a body that does not decode
                raise ApiError(exc.status, exc.message, close=True) from None
        try:
            check_decoded(raw, header, applied)
        except BodyEncodingError as exc:  # read whole: the connection serves on
            raise ApiError(exc.status, exc.message) from None
        try:
            body = json.loads(raw)
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: it nests too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        try:
            where = _lone_surrogate(body)
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: it nests too deeply") from None
        if where is not None:
            raise ApiError(
                400, f"{where or 'the body'} holds a lone UTF-16 surrogate (\\ud800-\\udfff): not valid Unicode", where
            )
        return body

    async def parse(self, http: web.Request, chat: bool) -> Parsed:
        body = await self.read_json(http)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            body = check_names(body)
        except ParamError as exc:
            raise ApiError(400, exc.message, exc.param) from None
        model = self.check_model(body.get("model"))
        request = common_pb2.InferenceRequest(request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}")
        if chat:
            self._messages(body, request)
        else:
            self._prompt(body, request)
        try:
            extras = sampling_from(body, chat, request.sampling)
        except ParamError as exc:
            raise ApiError(400, exc.message, exc.param) from None
        user = body.get("user")
        if user is not None:
            if not isinstance(user, str) or len(user) > 256:
                raise ApiError(400, "user must be a string of at most 256 characters", "user")
            request.routing_key = user
        if key := header_text(http, "X-Session-Id"):
            request.routing_key = key[:256]
        self.rank_pins(http, body, request)
        flow_fields(http, body, request)
        stream = stream_flag(body)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", "stream_options")
        if "stream_options" in body and not stream:  # as vLLM: it would be silently meaningless
            raise ApiError(400, "stream_options can only be set when stream is true", "stream_options")
        stream_options(options)
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        # max_tokens unset: its default is cut to the room the context leaves (vLLM's behaviour)
        prepared = await self.prepare(request, "messages" if chat else "prompt", key, fit=key not in body)
        return Parsed(chat, prepared, stream, bool(options.get("include_usage")), extras.stops, extras.logprobs, model)

    def check_model(self, model: Any) -> str:
        """The model a body names; left out, null or "" is the served model (as vLLM and SGLang
        serve it). ApiError 400 when not a string, 404 (model_not_found) when not served."""
        if model is None or model == "":
            return self.model_id
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string (see GET /v1/models), not {model!r:.40}", "model")
        if model not in self.models():
            message = f"the model {model[:200]!r} does not exist; this server serves {self.model_id!r}"
            raise ApiError(404, message, "model")
        return model

    async def prepare(
        self, request: common_pb2.InferenceRequest, prompt_param: str, tokens_param: str, fit: bool
    ) -> Prepared:
        """The request checked and tokenised against the workers' limits (Frontend.prepare); ApiError
        400 naming `prompt_param` for a bad or too-long prompt, `tokens_param` when the prompt fits
        but not with the new tokens asked for."""
        try:
            return await self.frontend.prepare(request, fit)
        except TooLong as exc:
            raise ApiError(400, str(exc), prompt_param if exc.field == "prompt" else tokens_param) from None
        except InvalidRequest as exc:
            raise ApiError(400, str(exc), prompt_param) from None

    def _prompt(self, body: dict, request: common_pb2.InferenceRequest) -> None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            request.text = prompt
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            if bad := next(((i, t) for i, t in enumerate(prompt) if not 0 <= t < 2**31), None):
                raise ApiError(400, f"prompt[{bad[0]}] = {str(bad[1])[:24]} is not a token id: {TOKEN_IDS}", "prompt")
            request.input_ids.extend(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise ApiError(400, "batched prompts are not supported: send one prompt per request", "prompt")
        else:
            raise ApiError(400, "prompt must be a non-empty string or a list of token ids", "prompt")

    def _messages(self, body: dict, request: common_pb2.InferenceRequest) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", "messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ApiError(
                    400,
                    f"messages[{index}] must be an object with a role and content, not {json_kind(message)}",
                    f"messages[{index}]",
                )
            if "role" not in message:
                raise ApiError(
                    400, f"messages[{index}] needs a role: one of {', '.join(ROLES)}", f"messages[{index}].role"
                )
            if not isinstance(message["role"], str):
                raise ApiError(
                    400,
                    f"messages[{index}].role must be a string, one of {', '.join(ROLES)}; not "
                    f"{json_kind(message['role'])}",
                    f"messages[{index}].role",
                )
            if message["role"] not in ROLES:
                raise ApiError(
                    400,
                    f"messages[{index}].role {message['role'][:40]!r} is not a chat role: "
                    f"use one of {', '.join(ROLES)}",
                    f"messages[{index}].role",
                )
            request.messages.append(common_pb2.ChatMessage(role=message["role"], content=_content(message, index)))

    @staticmethod
    def rank_pins(http: web.Request, body: dict, request: common_pb2.InferenceRequest) -> None:
        """vLLM's X-data-parallel-rank header and SGLang-style body fields pin ranks. ApiError 400
        naming the field or header the client sent (not the pin it maps to) for a value that is not
        a rank."""
        # pin -> (value, where the client gave it)
        pins = {name: (body.get(name), name) for name in ("decode_dp_rank", "prefill_dp_rank")}
        general = (body.get("data_parallel_rank"), "data_parallel_rank")
        header = http.headers.get("X-data-parallel-rank")
        if header is not None:
            if (rank := ascii_int(header)) is None:
                said = f"X-data-parallel-rank must be an integer in ASCII digits, not {header!r:.40}"
                raise ApiError(400, said, "X-data-parallel-rank")
            general = (rank, "X-data-parallel-rank")
        if general[0] is not None and pins["decode_dp_rank"][0] is None:
            pins["decode_dp_rank"] = general  # mixed: the rank; PD: the decode rank (where the tokens come from)
        for name, (value, given) in pins.items():
            if value is None:
                continue
            if not _is_int(value) or not 0 <= value < MAX_RANK:
                said = f"{given} must be an integer rank from 0 to {MAX_RANK - 1}, not {value!r:.40}"
                raise ApiError(400, said, given)
            setattr(request, name, value)

    # serving -----------------------------------------------------------------------------------
    async def completions(self, http: web.Request) -> web.StreamResponse:
        return await self._serve(http, chat=False)

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        return await self._serve(http, chat=True)

    async def _serve(self, http: web.Request, chat: bool) -> web.StreamResponse:
        parsed = await self.parse(http, chat)
        if parsed.stream:
            return await self._stream(http, parsed)
        return await self._whole(parsed)

    async def run(self, parsed: Parsed, matcher: StopMatcher | None = None):
        """The request's chunks with stop strings applied: (chunk, text, finish) triples. The
        matcher (one of `parsed.stops` by default) tells which stop string ended the text."""
        matcher = matcher or StopMatcher(parsed.stops)
        timer = Timer(self.observe)
        chunks = self.frontend.generate(parsed.prepared)
        try:
            async for chunk in chunks:
                timer.tokens(len(chunk.token_ids))
                text, stopped = matcher.push(chunk.text)
                if stopped:
                    yield chunk, text, "stop"
                    return
                if chunk.finish_reason:
                    yield chunk, text + matcher.flush(), FINISH.get(chunk.finish_reason, "stop")
                    return
                yield chunk, text, None
        finally:
            await chunks.aclose()  # cancels the upstream calls: the workers abort and free the KV

    def _logprobs(self, parsed: Parsed, entries: list[common_pb2.TokenLogprob], offset: int = 0) -> dict | None:
        """OpenAI's logprobs object for these tokens (chat: `content` entries; completions: parallel
        lists), or None when the request did not ask for them. `offset`: text offset of the first."""
        if parsed.logprobs is None:
            return None
        decode = self.frontend.tokenizer.decode
        if parsed.chat:
            return {
                "content": [
                    {
                        **_token(decode([e.token_id], False), e.logprob),
                        "top_logprobs": [_token(decode([t.token_id], False), t.logprob) for t in e.top_logprobs],
                    }
                    for e in entries
                ]
            }
        texts = [decode([e.token_id], False) for e in entries]
        offsets = [offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        return {
            "tokens": texts,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{decode([t.token_id], False): t.logprob for t in e.top_logprobs} for e in entries],
            "text_offset": offsets,
        }

    async def _whole(self, parsed: Parsed) -> web.Response:
        text, tokens, last = [], 0, None
        finish = "stop"
        logprobs: list[common_pb2.TokenLogprob] = []
        try:
            async for chunk, piece, reason in self.run(parsed):
                text.append(piece)
                tokens += len(chunk.token_ids)
                logprobs += chunk.logprobs
                last = chunk
                finish = reason or finish
        except RequestFailed as exc:
            return failed_response(exc, worker_params(parsed))
        body = self._envelope(parsed, last)
        content = "".join(text)
        if parsed.chat:
            body["object"] = "chat.completion"
            body["choices"] = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                    "logprobs": self._logprobs(parsed, logprobs),
                }
            ]
        else:
            body["object"] = "text_completion"
            body["choices"] = [
                {"index": 0, "text": content, "finish_reason": finish, "logprobs": self._logprobs(parsed, logprobs)}
            ]
        body["usage"] = _usage(parsed, last, tokens)
        return web.json_response(body, headers=_rank_headers(last))

    async def _stream(self, http: web.Request, parsed: Parsed) -> web.StreamResponse:
        runner = self.run(parsed)
        first, failed = await first_of(runner, worker_params(parsed))
        if failed is not None:
            return failed
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **_rank_headers(first and first[0]),
            }
        )
        await response.prepare(http)
        tokens, last = 0, None
        if parsed.chat:
            opening = {"role": "assistant", "content": ""}
            await sse_event(response, self._chunk(parsed, first and first[0], opening, None))

        async def chunks():  # the first one, already read, then the rest
            if first is not None:
                yield first
            async for item in runner:
                yield item

        offset = 0
        try:
            async for chunk, text, reason in chunks():
                tokens += len(chunk.token_ids)
                last = chunk
                if text or reason or (parsed.logprobs is not None and chunk.logprobs):
                    delta = {"content": text} if parsed.chat else text
                    body = self._chunk(parsed, chunk, delta, reason)
                    body["choices"][0]["logprobs"] = self._logprobs(parsed, list(chunk.logprobs), offset)
                    await sse_event(response, body)
                    offset += len(text)
                if reason:
                    break
        except RequestFailed as exc:
            param = worker_params(parsed).get(exc.field)
            await sse_event(response, error_body(HTTP_STATUS.get(exc.code, 500), exc.message, param))
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away: nobody to tell
        except Exception as exc:  # headers are sent: the status goes in the stream
            log.exception("request %s failed in the gateway", parsed.prepared.request.request_id)
            await sse_event(response, error_body(500, f"internal error in the gateway: {type(exc).__name__}: {exc}"))
        finally:
            await runner.aclose()
        if parsed.include_usage and last is not None:
            usage = self._envelope(parsed, last)
            usage["object"] = "chat.completion.chunk" if parsed.chat else "text_completion"
            usage["choices"] = []
            usage["usage"] = _usage(parsed, last, tokens)
            await sse_event(response, usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _envelope(self, parsed: Parsed, chunk: Chunk | None) -> dict:
        return {
            "id": parsed.prepared.request.request_id,
            "created": int(time.time()),
            "model": self.model_id,
            "dp_rank": chunk.decode_dp_rank if chunk else None,
            "prefill_dp_rank": chunk.prefill_dp_rank if chunk and chunk.prefill_dp_rank >= 0 else None,
        }

    def _chunk(self, parsed: Parsed, chunk: Chunk | None, delta, reason: str | None) -> dict:
        body = self._envelope(parsed, chunk)
        if parsed.chat:
            body["object"] = "chat.completion.chunk"
            body["choices"] = [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
        else:
            body["object"] = "text_completion"
            body["choices"] = [{"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}]
        return body

    async def list_models(self, http: web.Request) -> web.Response:
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "pdlb"} for m in self.models()]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, http: web.Request) -> web.Response:
        """`GET /v1/models/{id}`: one model object as in the list; 404 model_not_found otherwise."""
        model = self.check_model(http.match_info["model"])
        return web.json_response({"id": model, "object": "model", "created": int(time.time()), "owned_by": "pdlb"})


def _usage(parsed: Parsed, last: Chunk | None, completion_tokens: int) -> dict:
    prompt = len(parsed.prepared.prompt)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens if last else 0},
    }


def _rank_headers(chunk: Chunk | None) -> dict[str, str]:
    if chunk is None:
        return {}
    headers = {"X-pdlb-dp-rank": str(chunk.decode_dp_rank)}
    if chunk.prefill_dp_rank >= 0:
        headers["X-pdlb-prefill-dp-rank"] = str(chunk.prefill_dp_rank)
    return headers


def stream_options(options: dict) -> None:
    """vLLM's stream_options, checked: `include_usage` and `continuous_usage_stats` are true, false or
    null (a string such as "false" was taken as true); usage every chunk is not served. ApiError 400
    naming the field, or an unknown one."""
    for name, value in options.items():
        param = f"stream_options.{name}"
        if name not in ("include_usage", "continuous_usage_stats"):
            raise ApiError(400, f"unsupported parameter: {param}", param)
        if value is not None and not isinstance(value, bool):
            raise ApiError(400, f"{param} must be true or false, not {value!r:.40}", param)
    if options.get("continuous_usage_stats"):
        param = "stream_options.continuous_usage_stats"
        raise ApiError(400, f"{param}=true is not supported: usage comes once, at the end (include_usage)", param)


async def first_of(items: AsyncIterator[Any], params: dict[str, str] | None = None) -> tuple[Any, web.Response | None]:
    """The first item of a response's stream, read before any header goes out so that an early
    failure still gets its own HTTP status: (the item, or None when the stream was empty, None), or
    (None, the failure's error response, `params` as failed_response's)."""
    try:
        return await anext(items), None
    except StopAsyncIteration:
        return None, None
    except RequestFailed as exc:
        return None, failed_response(exc, params)


def worker_params(parsed: Parsed) -> dict[str, str]:
    """The OpenAI `param` of each InferenceRequest field a worker may refuse (RequestFailed.field)."""
    return {"logit_bias": "logit_bias", "input_ids": "messages" if parsed.chat else "prompt"}


async def sse_event(response: web.StreamResponse, body: dict) -> None:
    """One server-sent event carrying `body` as compact JSON."""
    await response.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")


def _content(message: dict, index: int) -> str:
    """A chat message's text: a string, or text content parts joined. ApiError 400 naming the field
    for content missing where the role needs it (every role but assistant, whose turn may be
    empty), content of another shape, and a `name` that is not a string (as vLLM refuses them)."""
    where = f"messages[{index}]"
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise ApiError(400, f"{where}.name must be a string", f"{where}.name")
    content = message.get("content")
    if content is None:
        if message["role"] != "assistant":
            raise ApiError(400, f"{where}.content is required for role {message['role']!r}", f"{where}.content")
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
    texts = []
    for number, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = f"type {str(part.get('type'))[:40]!r}" if isinstance(part, dict) else json_kind(part)
            raise ApiError(
                400,
                f"{where}.content[{number}]: only text content parts are supported (a part of type 'text'), "
                f"not {kind}: this model reads text only",
                f"{where}.content[{number}]",
            )
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}.content[{number}].text must be a string", f"{where}.content[{number}].text")
        texts.append(part["text"])
    return "".join(texts)


def json_kind(value: object) -> str:
    """What a JSON value is, as a message names it ("a string", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def stream_flag(body: dict) -> bool:
    """The body's `stream` (false when absent); ApiError 400 when it is not a boolean."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    return stream


def flow_fields(http: web.Request, body: dict, request: common_pb2.InferenceRequest) -> None:
    """Flow-control fields: vLLM's `priority` (lower is served earlier), the TTFT deadline
    (`X-pdlb-TTFT-Deadline-Ms` header) and the tenant (`X-pdlb-Tenant`; else the routing key)."""
    priority = body.get("priority", 0)
    if not _is_int(priority) or not -(2**31) <= priority < 2**31:
        raise ApiError(400, "priority must be a 32-bit integer (lower is served earlier)", "priority")
    request.priority = priority
    if raw := http.headers.get(DEADLINE_HEADER):
        ms = ascii_int(raw)
        if ms is None or not 0 < ms < 2**32:
            said = f"{DEADLINE_HEADER} must be a whole number of milliseconds from 1 to {2**32 - 1}, not {raw!r:.40}"
            raise ApiError(400, said, DEADLINE_HEADER)
        request.ttft_deadline_ms = ms
    if tenant := header_text(http, TENANT_HEADER):
        request.tenant = tenant[:256]


def header_text(http: web.Request, name: str) -> str:
    """The header `name` as text ("" when absent); ApiError 400 naming it when its bytes are not
    UTF-8 (aiohttp keeps such bytes as lone surrogates, which no protobuf string can carry: a 500)."""
    value = http.headers.get(name, "")
    if _lone_surrogate(value) is not None:
        try:  # the bytes the client sent (aiohttp decoded them with surrogateescape)
            sent = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            sent = value.encode("utf-8", "backslashreplace")
        raise ApiError(400, f"the {name} header must be UTF-8 text, not the bytes {sent!r:.60}", name)
    return value


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (JSON lets `"\\ud800"` through;
    UTF-8 cannot carry it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key) is not None:
            return path or "the body"
        where = _lone_surrogate(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if where is not None:
            return where
    return None


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
