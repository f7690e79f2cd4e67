"""Validation of InferenceRequest, shared by the gateway, the dispatcher and the scheduler.

Tokenising a long prompt takes seconds of CPU; on the event loop it would stall every other
request of the service. `check_request_off_loop` does the cheap checks (id, prompt size in
characters) on the loop and tokenises in a small thread pool (the BPE backend releases the GIL),
so an over-long prompt is refused before any tokenising and a valid long one delays only itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pdlb.common.plurals import counted
from pdlb.common.tokenizer import ByteTokenizer, ChatTemplateError, Tokenizer
from pdlb.v1 import common_pb2

MAX_REQUEST_ID_LEN = 128
MAX_NEW_TOKENS_LIMIT = 16_384
DEFAULT_MAX_NEW_TOKENS = 16
MAX_PROMPT_TOKENS_LIMIT = 1_000_000
MAX_RANK = 1 << 20
MAX_ROUTING_KEY_LEN = 256
# Trailing metadata of a RESOURCE_EXHAUSTED from a dispatcher's admission queue: whole seconds a
# refused client should wait (the gateway sends it as HTTP Retry-After).
RETRY_AFTER_KEY = "retry-after"
# Initial metadata a dispatcher's Generate sends as soon as it has bound the request to a rank (its
# value: the DP rank), before any token. A PD gateway starts the prefill half only then, so a decode
# half that is queued or shed by flow control never leaves prefill KV held for a decode that will
# not come.
BOUND_KEY = "pdlb-bound-rank"
# Why a dispatcher's admission queue failed a request (FlowControlState.shed_by_reason's keys, the
# `reason` label of the queue's shed counters): a fixed set, so metric labels stay bounded.
SHED_REASONS = ("ttl", "deadline", "full", "displaced", "shutdown")
DEFAULT_TEMPERATURE = 1.0  # vLLM's, when a request leaves temperature unset (HTTP and gRPC alike)
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_TEXT_CHARS = 4 << 20  # tokenising is linear, but bound it before any work is done
# Default characters-per-token bound of --max-prompt-chars: far above what natural text or code
# tokenises to (3-5), so only prompts that could never fit the token limit are refused unread.
CHARS_PER_TOKEN = 16
TOKENIZE_THREADS = 4
_BYTES = ByteTokenizer()
_TOKENIZE = ThreadPoolExecutor(max_workers=TOKENIZE_THREADS, thread_name_prefix="pdlb-tokenize")


def prompt_chars_limit(max_prompt_tokens: int, max_prompt_chars: int = 0) -> int:
    """The characters limit of a service: its --max-prompt-chars, else CHARS_PER_TOKEN per token of
    its --max-prompt-tokens, never above MAX_TEXT_CHARS."""
    return min(max_prompt_chars or CHARS_PER_TOKEN * max_prompt_tokens, MAX_TEXT_CHARS)


class InvalidRequest(ValueError):
    """The request is malformed; the message says what to fix."""


class TooLong(InvalidRequest):
    """The request does not fit a length limit. `field`: what to shorten, "prompt" (the prompt
    alone is longer than the limit) or "max_new_tokens" (the prompt fits, but not with this many
    new tokens)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CheckedRequest:
    request_id: str
    input_ids: list[int]
    max_new_tokens: int
    temperature: float


def check_prompt_chars(req: common_pb2.InferenceRequest, max_chars: int = MAX_TEXT_CHARS) -> None:
    """Refuse text or messages longer than `max_chars` characters in all (cheap: no tokenising)."""
    if req.input_ids:
        return
    size = len(req.text) + sum(len(m.content) + len(m.role) for m in req.messages)
    if size > max_chars:
        raise InvalidRequest(
            f"request {req.request_id}: prompt of {size} characters exceeds the limit of {max_chars} characters "
            "(--max-prompt-chars); it was not tokenised"
        )


def prompt_ids(req: common_pb2.InferenceRequest, tokenizer: Tokenizer, max_chars: int = MAX_TEXT_CHARS) -> list[int]:
    """The prompt's token ids: input_ids as given, else text or chat messages tokenised."""
    rid = req.request_id
    if req.input_ids:
        return list(req.input_ids)
    check_prompt_chars(req, max_chars)
    if req.text:
        return tokenizer.encode(req.text)
    if req.messages:
        if any(not m.role for m in req.messages):
            raise InvalidRequest(f"request {rid}: every chat message needs a role")
        try:
            return tokenizer.encode_chat([(m.role, m.content) for m in req.messages])
        except ChatTemplateError as exc:
            raise InvalidRequest(f"request {rid}: messages: {exc}") from exc
    return []


def check_request_id(req: common_pb2.InferenceRequest) -> None:
    rid = req.request_id
    if not rid or len(rid) > MAX_REQUEST_ID_LEN or not rid.isascii() or not rid.isprintable():
        raise InvalidRequest(f"request_id must be 1..{MAX_REQUEST_ID_LEN} printable ASCII characters, got {rid[:40]!r}")


def check_request(
    req: common_pb2.InferenceRequest,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS_LIMIT,
    tokenizer: Tokenizer = _BYTES,
    max_prompt_chars: int = MAX_TEXT_CHARS,
) -> CheckedRequest:
    """Validate a request and tokenise its prompt (on the calling thread); raises InvalidRequest."""
    rid = req.request_id
    check_request_id(req)
    input_ids = prompt_ids(req, tokenizer, max_prompt_chars)
    if not input_ids:
        raise InvalidRequest(f"request {rid}: empty prompt: set input_ids, text or messages")
    if len(input_ids) > max_prompt_tokens:
        message = f"request {rid}: prompt of {counted(len(input_ids), 'token')} exceeds the limit {max_prompt_tokens}"
        raise TooLong("prompt", message)
    if min(input_ids) < 0:
        raise InvalidRequest(f"request {rid}: negative token id {min(input_ids)}")
    sampling = req.sampling
    max_new = sampling.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if max_new > MAX_NEW_TOKENS_LIMIT:
        raise InvalidRequest(f"request {rid}: max_new_tokens {max_new} exceeds {MAX_NEW_TOKENS_LIMIT}")
    temperature = sampling.temperature if sampling.HasField("temperature") else DEFAULT_TEMPERATURE
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(f"request {rid}: temperature must be a finite number >= 0")
    check_sampling(rid, sampling)
    if len(req.routing_key) > MAX_ROUTING_KEY_LEN:
        raise InvalidRequest(f"request {rid}: routing_key longer than {MAX_ROUTING_KEY_LEN} characters")
    for field in ("prefill_dp_rank", "decode_dp_rank"):
        if req.HasField(field) and not 0 <= getattr(req, field) < MAX_RANK:
            raise InvalidRequest(f"request {rid}: {field} {getattr(req, field)} is out of range")
    return CheckedRequest(rid, input_ids, max_new, temperature)


def check_sampling(rid: str, sampling: common_pb2.SamplingParams) -> None:
    """The sampling parameters' ranges (vLLM's); raises InvalidRequest naming the parameter."""
    ranges = {
        "top_p": (sampling.top_p, 0.0, 1.0),
        "min_p": (sampling.min_p, 0.0, 1.0),
        "repetition_penalty": (sampling.repetition_penalty, 0.0, 2.0),
        "presence_penalty": (sampling.presence_penalty, -2.0, 2.0),
        "frequency_penalty": (sampling.frequency_penalty, -2.0, 2.0),
    }
    for name, (value, low, high) in ranges.items():
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidRequest(f"request {rid}: {name} {value} is outside [{low:g}, {high:g}]")
    if sampling.top_k < -1:
        raise InvalidRequest(f"request {rid}: top_k must be -1, 0 (all tokens) or a positive count")
    if sampling.HasField("logprobs") and sampling.logprobs > MAX_LOGPROBS:
        raise InvalidRequest(f"request {rid}: logprobs {sampling.logprobs} exceeds {MAX_LOGPROBS}")
    if sampling.min_tokens > sampling.max_new_tokens and sampling.max_new_tokens:
        raise InvalidRequest(f"request {rid}: min_tokens {sampling.min_tokens} exceeds max_new_tokens")
    if len(sampling.logit_bias) > MAX_LOGIT_BIAS or any(
        not math.isfinite(b) or not -100 <= b <= 100 for b in sampling.logit_bias.values()
    ):
        raise InvalidRequest(f"request {rid}: logit_bias takes at most {MAX_LOGIT_BIAS} biases in [-100, 100]")


async def check_request_off_loop(
    req: common_pb2.InferenceRequest,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS_LIMIT,
    tokenizer: Tokenizer = _BYTES,
    max_prompt_chars: int = MAX_TEXT_CHARS,
) -> CheckedRequest:
    """check_request with its cheap checks on the loop and the tokenising in a worker thread, so the
    event loop keeps serving others meanwhile. The caller must not change `req` until it returns."""
    check_request_id(req)
    if req.input_ids or not (req.text or req.messages):
        return check_request(req, max_prompt_tokens, tokenizer, max_prompt_chars)
    check_prompt_chars(req, max_prompt_chars)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_TOKENIZE, check_request, req, max_prompt_tokens, tokenizer, max_prompt_chars)


def sampling_seed(req: common_pb2.InferenceRequest) -> int:
    """The request's sampling seed: the client's, else derived from the request id (reproducible per
    id, never 0, which means "unset" on the wire)."""
    return req.sampling.seed or int.from_bytes(hashlib.blake2b(req.request_id.encode()).digest()[:8], "little") or 1
