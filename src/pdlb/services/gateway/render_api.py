"""vLLM's render endpoints: a request turned into the token ids the engine would run, without running it.

- `POST /v1/completions/render`: a completions body; answers a list with one GenerateRequest
  (vLLM answers one per prompt; the gateway takes one prompt per request);
- `POST /v1/chat/completions/render`: a chat body; answers one GenerateRequest, its `token_ids`
  the prompt after the chat template.

A GenerateRequest (vLLM's `scale_out/token_in_token_out/protocol.py`) is
`{"request_id", "token_ids": [int], "sampling_params": {...}, "model", "stream", "priority", ...}`;
`sampling_params` holds the sampling the gateway would apply (SamplingParams' names: `max_tokens`
is the bound after the prompt, `temperature` the default when unset). Multimodal and
disaggregation fields are null: the gateway has none.

vllm-router's `cache_aware` policy asks each worker for these ids and matches prefixes on them
(when a worker cannot render, it routes on without that match). Parsing, limits and bad-input errors are those of
`/v1/completions` and `/v1/chat/completions` (the same code); tokenising runs off the event loop.
"""

from __future__ import annotations

from aiohttp import web

from pdlb.common.slots import Slots
from pdlb.services.gateway.metrics import API_KEY, RENDER_API, GatewayMetrics
from pdlb.services.gateway.openai_api import ApiError, OpenAIApi, Parsed


class RenderApi:
    def __init__(self, api: OpenAIApi, streams: Slots, metrics: GatewayMetrics) -> None:
        self.api, self.streams, self.metrics = api, streams, metrics

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions/render", self.completions)
        app.router.add_post("/v1/chat/completions/render", self.chat_completions)

    async def completions(self, http: web.Request) -> web.Response:
        return web.json_response([await self._render(http, chat=False)])

    async def chat_completions(self, http: web.Request) -> web.Response:
        return web.json_response(await self._render(http, chat=True))

    async def _render(self, http: web.Request, chat: bool) -> dict:
        http[API_KEY] = RENDER_API  # the error middleware counts a refusal under this API
        # a stream slot bounds the tokenisations in flight, as it bounds the generations
        if not self.streams.try_acquire():
            raise ApiError(429, f"{self.streams.refusal()} at this gateway; retry later", kind="rate_limit_error")
        try:
            parsed = await self.api.parse(http, chat)
        finally:
            self.streams.release()
        self.metrics.done(RENDER_API, "200")
        return generate_request(parsed)


def generate_request(parsed: Parsed) -> dict:
    """vLLM's GenerateRequest for a parsed request (see the module docstring)."""
    request = parsed.prepared.request
    return {
        "request_id": request.request_id,
        "token_ids": list(parsed.prepared.prompt),
        "token_offsets": None,
        "features": None,
        "content_parts": None,
        "sampling_params": sampling_params(parsed),
        "model": parsed.model,
        "reasoning_ended": None,
        "reasoning_parser_kwargs": None,
        "return_token_ids": None,
        "output_mode": "tokens",
        "stream": parsed.stream,
        "stream_options": {"include_usage": parsed.include_usage} if parsed.stream else None,
        "cache_salt": None,
        "priority": request.priority,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
    }


def sampling_params(parsed: Parsed) -> dict:
    """The request's sampling under vLLM's SamplingParams names; optional ones only when set."""
    sampling = parsed.prepared.request.sampling
    params: dict = {
        "presence_penalty": _decimal(sampling.presence_penalty),
        "frequency_penalty": _decimal(sampling.frequency_penalty),
        "repetition_penalty": _decimal(sampling.repetition_penalty),
        "temperature": _decimal(sampling.temperature),
        "top_p": _decimal(sampling.top_p),
        "top_k": sampling.top_k,
        "min_p": _decimal(sampling.min_p),
        "stop": list(parsed.stops),
        "stop_token_ids": list(sampling.stop_token_ids),
        "ignore_eos": sampling.ignore_eos,
        "max_tokens": parsed.prepared.max_new_tokens,
        "min_tokens": sampling.min_tokens,
        "skip_special_tokens": not sampling.keep_special_tokens,
    }
    if sampling.seed:
        params["seed"] = sampling.seed
    if parsed.logprobs is not None:
        params["logprobs"] = parsed.logprobs
    if sampling.logit_bias:
        params["logit_bias"] = {str(token): _decimal(bias) for token, bias in sorted(sampling.logit_bias.items())}
    return params


def _decimal(value: float) -> float:
    """A float32 of the protobuf as the decimal the client sent (0.7, not 0.699999988)."""
    return float(f"{value:.7g}")
