"""SGLang's native `POST /generate` on the gateway, in SGLang's request and response shapes, so
that SGLang clients and `smg` (which forwards `/generate` to its workers, adding
`data_parallel_rank` with `--dp-aware`) can use pdlb as one SGLang worker with DP ranks.

Request (SGLang's GenerateReqInput, one prompt per request):
- `text` (a string, or a list of one) or `input_ids` (token ids, or a list of one list);
- `sampling_params`: `max_new_tokens` (SGLang's default 128), `min_new_tokens`, `temperature`,
  `top_p`, `top_k`, `min_p`, `frequency_penalty`, `presence_penalty`, `repetition_penalty`, `stop`,
  `stop_token_ids`, `ignore_eos`, `skip_special_tokens`, `logit_bias`, `sampling_seed`; `n` = 1,
  `no_stop_trim` = false and `spaces_between_special_tokens` are accepted as no-ops; anything else
  is refused, naming it (`sampling_params.<name>`);
- `stream`, `rid` (the request id), `data_parallel_rank` (pins the rank: mixed, or decode in
  PD), `priority`, `model` (optional; 404 when not served); what smg adds to each body is accepted
  as a no-op: `return_logprob`, `return_hidden_states`, `return_bytes`, `return_entropy`,
  `background` at false, `log_metrics`, `no_logs`, `return_text_in_logprobs` at any value.

Response: `{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
"completion_tokens", "cached_tokens", "e2e_latency", "dp_rank"}}`; `finish_reason` is
`{"type": "length", "length": n}` or `{"type": "stop", "matched": <token id or stop string>}`
(null while streaming). A stream is server-sent events, each the whole output so far (SGLang's
default, not increments), ending with `data: [DONE]`. Errors are JSON with `error.message`
(the gateway's OpenAI error body, which SGLang's clients read the same way); in a stream after the
first event, an error event. Limits, pins and failures are those of `/v1/completions` (same code).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from pdlb.common.requests import InvalidRequest, check_request_id
from pdlb.common.slots import Slots
from pdlb.services.gateway.frontend import RequestFailed
from pdlb.services.gateway.metrics import API_KEY, GatewayMetrics
from pdlb.services.gateway.openai_api import (
    HTTP_STATUS,
    TOKEN_IDS,
    ApiError,
    OpenAIApi,
    Parsed,
    error_body,
    failed_response,
    first_of,
    flow_fields,
    sse_event,
    stream_flag,
)
from pdlb.services.gateway.request_params import ParamError, check_names, sampling_from, shown_value
from pdlb.services.gateway.stops import StopMatcher
from pdlb.v1 import common_pb2

SGLANG_API = "generate"  # the API label of these requests in the gateway's metrics
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams default
# SGLang's sampling names -> the OpenAI names request_params reads (the same meaning and ranges).
SAMPLING_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "sampling_seed": "seed",
    **{
        name: name
        for name in (
            "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
            "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens", "logit_bias",
            "n", "no_stop_trim", "spaces_between_special_tokens",
        )
    },
}  # fmt: skip
# the `param` of each InferenceRequest field a worker may refuse (RequestFailed.field)
WORKER_PARAMS = {"logit_bias": "sampling_params.logit_bias", "input_ids": "input_ids"}
TOP_LEVEL = {"text", "input_ids", "sampling_params", "stream", "rid", "data_parallel_rank", "priority", "model"}
# What smg 0.3.2 adds to every body it forwards (seen on the wire), at the values that change nothing.
TOP_LEVEL_NEUTRAL: dict[str, Any] = {
    "return_logprob": False,
    "return_hidden_states": False,
    "return_bytes": False,
    "return_entropy": False,
    "background": False,
}
TOP_LEVEL_NO_OP = {"log_metrics", "no_logs", "return_text_in_logprobs"}


class SGLangApi:
    def __init__(self, api: OpenAIApi, streams: Slots, metrics: GatewayMetrics) -> None:
        self.api, self.streams, self.metrics = api, streams, metrics

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/generate", self.generate)
        app.router.add_put("/generate", self.generate)  # SGLang serves both

    async def generate(self, http: web.Request) -> web.StreamResponse:
        http[API_KEY] = SGLANG_API  # the error middleware counts a refusal under this API
        if not self.streams.try_acquire():
            raise ApiError(429, f"{self.streams.refusal()} at this gateway; retry later", kind="rate_limit_error")
        try:
            parsed = await self.parse(http)
            response = await (self._stream(http, parsed) if parsed.stream else self._whole(parsed))
            self.metrics.done(SGLANG_API, str(response.status))
            return response
        finally:
            self.streams.release()

    async def parse(self, http: web.Request) -> Parsed:
        """The body as a prepared request; ApiError 400 naming the field for what cannot be served."""
        body = await self.api.read_json(http)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        body = {key: value for key, value in body.items() if value is not None}
        for name, value in body.items():
            if name in TOP_LEVEL or name in TOP_LEVEL_NO_OP:
                continue
            if name not in TOP_LEVEL_NEUTRAL:
                raise ApiError(400, f"unsupported field: {name}", name)
            if value is not TOP_LEVEL_NEUTRAL[name]:
                served = json.dumps(TOP_LEVEL_NEUTRAL[name])
                message = f"{name}={shown_value(value)} is not supported by this server: it serves only {name}={served}"
                raise ApiError(400, message, name)
        self.api.check_model(body.get("model", self.api.model_id))
        rid = body.get("rid", f"gen-{uuid.uuid4().hex}")
        if isinstance(rid, list) and len(rid) == 1:
            rid = rid[0]
        if not isinstance(rid, str):
            raise ApiError(400, "rid must be a string (one request per call)", "rid")
        request = common_pb2.InferenceRequest(request_id=rid)
        try:
            check_request_id(request)
        except InvalidRequest as exc:
            raise ApiError(400, str(exc).replace("request_id", "rid"), "rid") from None
        _prompt(body, request)
        params = _params(body.get("sampling_params", {}))
        translated = _sampling(params)
        try:
            extras = sampling_from(check_names(translated), False, request.sampling)
        except ParamError as exc:
            param = f"sampling_params.{_sglang_name(exc.param)}"
            raise ApiError(400, exc.message.replace(exc.param, param), param) from None
        OpenAIApi.rank_pins(http, body, request)
        flow_fields(http, body, request)
        stream = stream_flag(body)
        fit = params.get("max_new_tokens") is None  # SGLang's default is cut to the room left, as vLLM's
        prompt_param = "text" if request.text else "input_ids"
        prepared = await self.api.prepare(request, prompt_param, "sampling_params.max_new_tokens", fit)
        return Parsed(False, prepared, stream, False, extras.stops, None, self.api.model_id)

    async def _outputs(self, parsed: Parsed):
        """(output so far, finished) after each chunk: the body SGLang sends at that point."""
        matcher = StopMatcher(parsed.stops)
        started = time.perf_counter()
        text, ids = "", []
        async for chunk, piece, reason in self.api.run(parsed, matcher):
            text += piece
            ids += chunk.token_ids
            finish = None
            if reason == "length":
                finish = {"type": "length", "length": len(ids)}
            elif reason == "stop":
                matched: int | str | None = matcher.matched
                if matched is None and ids:
                    matched = ids[-1]  # EOS or one of stop_token_ids
                finish = {"type": "stop", "matched": matched}
            meta = {
                "id": parsed.prepared.request.request_id,
                "finish_reason": finish,
                "prompt_tokens": len(parsed.prepared.prompt),
                "completion_tokens": len(ids),
                "cached_tokens": chunk.cached_tokens,
                "e2e_latency": time.perf_counter() - started,
                "dp_rank": chunk.decode_dp_rank,
            }
            yield {"text": text, "output_ids": list(ids), "meta_info": meta}, finish is not None

    async def _whole(self, parsed: Parsed) -> web.Response:
        last = None
        try:
            async for output, _ in self._outputs(parsed):
                last = output
        except RequestFailed as exc:
            return failed_response(exc, WORKER_PARAMS)
        return web.json_response(last)

    async def _stream(self, http: web.Request, parsed: Parsed) -> web.StreamResponse:
        outputs = self._outputs(parsed)
        first, failed = await first_of(outputs, WORKER_PARAMS)
        if failed is not None:
            return failed
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)
        try:
            if first is not None:
                await sse_event(response, first[0])
                if not first[1]:
                    async for output, _ in outputs:
                        await sse_event(response, output)
        except RequestFailed as exc:
            param = WORKER_PARAMS.get(exc.field)
            await sse_event(response, error_body(HTTP_STATUS.get(exc.code, 500), exc.message, param))
        finally:
            await outputs.aclose()  # cancels the upstream calls when the client left
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _prompt(body: dict, request: common_pb2.InferenceRequest) -> None:
    text, ids = body.get("text"), body.get("input_ids")
    if text is not None and ids is not None:
        raise ApiError(400, "send text or input_ids, not both", "input_ids")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]  # a batch of one
    if isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], list):
        ids = ids[0]
    if text is not None:
        if not isinstance(text, str) or not text:
            raise ApiError(400, "text must be a non-empty string (one prompt per request)", "text")
        request.text = text
    elif ids is not None:
        if not isinstance(ids, list) or not ids or not all(_is_int(t) for t in ids):
            raise ApiError(400, "input_ids must be a non-empty list of token ids (one prompt per request)", "input_ids")
        if bad := next(((i, t) for i, t in enumerate(ids) if not 0 <= t < 2**31), None):
            raise ApiError(400, f"input_ids[{bad[0]}] = {str(bad[1])[:24]} is not a token id: {TOKEN_IDS}", "input_ids")
        request.input_ids.extend(ids)
    else:
        raise ApiError(400, "text or input_ids is required", "text")


def _params(params: Any) -> dict:
    """The body's sampling_params object (or the one of a batch of one); ApiError 400 otherwise."""
    if isinstance(params, list) and len(params) == 1:
        params = params[0]
    if not isinstance(params, dict):
        raise ApiError(400, "sampling_params must be an object", "sampling_params")
    return params


def _sampling(params: dict) -> dict:
    """SGLang's sampling_params under the OpenAI names that request_params reads."""
    translated: dict[str, Any] = {"max_tokens": DEFAULT_MAX_NEW_TOKENS}
    for name, value in params.items():
        if value is None:
            continue
        if name not in SAMPLING_NAMES:
            raise ApiError(400, f"unsupported sampling parameter: {name}", f"sampling_params.{name}")
        translated[SAMPLING_NAMES[name]] = value
    return translated


def _sglang_name(openai_name: str) -> str:
    return next((name for name, mapped in SAMPLING_NAMES.items() if mapped == openai_name), openai_name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
