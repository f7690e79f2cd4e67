"""Validation of InferenceRequest, shared by the dispatcher and the scheduler."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from pdlb.common.tokenizer import ByteTokenizer, ChatTemplateError, Tokenizer
from pdlb.v1 import common_pb2

MAX_REQUEST_ID_LEN = 128
MAX_NEW_TOKENS_LIMIT = 16_384
DEFAULT_MAX_NEW_TOKENS = 16
MAX_PROMPT_TOKENS_LIMIT = 1_000_000
MAX_RANK = 1 << 20
MAX_ROUTING_KEY_LEN = 256
MAX_TEXT_CHARS = 4 << 20  # tokenising is linear, but bound it before any work is done
_BYTES = ByteTokenizer()


class InvalidRequest(ValueError):
    """The request is malformed; the message says what to fix."""


@dataclass(frozen=True)
class CheckedRequest:
    request_id: str
    input_ids: list[int]
    max_new_tokens: int
    temperature: float


def prompt_ids(req: common_pb2.InferenceRequest, tokenizer: Tokenizer) -> list[int]:
    """The prompt's token ids: input_ids as given, else text or chat messages tokenised."""
    rid = req.request_id
    if req.input_ids:
        return list(req.input_ids)
    size = len(req.text) + sum(len(m.content) + len(m.role) for m in req.messages)
    if size > MAX_TEXT_CHARS:
        raise InvalidRequest(f"request {rid}: prompt of {size} characters exceeds {MAX_TEXT_CHARS}")
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


def check_request(
    req: common_pb2.InferenceRequest,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS_LIMIT,
    tokenizer: Tokenizer = _BYTES,
) -> CheckedRequest:
    rid = req.request_id
    if not rid or len(rid) > MAX_REQUEST_ID_LEN or not rid.isascii() or not rid.isprintable():
        raise InvalidRequest(f"request_id must be 1..{MAX_REQUEST_ID_LEN} printable ASCII characters, got {rid[:40]!r}")
    input_ids = prompt_ids(req, tokenizer)
    if not input_ids:
        raise InvalidRequest(f"request {rid}: empty prompt: set input_ids, text or messages")
    if len(input_ids) > max_prompt_tokens:
        raise InvalidRequest(f"request {rid}: prompt of {len(input_ids)} tokens exceeds the limit {max_prompt_tokens}")
    if min(input_ids) < 0:
        raise InvalidRequest(f"request {rid}: negative token id {min(input_ids)}")
    sampling = req.sampling
    max_new = sampling.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if max_new > MAX_NEW_TOKENS_LIMIT:
        raise InvalidRequest(f"request {rid}: max_new_tokens {max_new} exceeds {MAX_NEW_TOKENS_LIMIT}")
    if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
        raise InvalidRequest(f"request {rid}: temperature must be a finite number >= 0")
    if len(req.routing_key) > MAX_ROUTING_KEY_LEN:
        raise InvalidRequest(f"request {rid}: routing_key longer than {MAX_ROUTING_KEY_LEN} characters")
    for field in ("prefill_dp_rank", "decode_dp_rank"):
        if req.HasField(field) and not 0 <= getattr(req, field) < MAX_RANK:
            raise InvalidRequest(f"request {rid}: {field} {getattr(req, field)} is out of range")
    return CheckedRequest(rid, input_ids, max_new, sampling.temperature)


def sampling_seed(req: common_pb2.InferenceRequest) -> int:
    """The request's sampling seed: the client's, else derived from the request id (reproducible per
    id, never 0, which means "unset" on the wire)."""
    return req.sampling.seed or int.from_bytes(hashlib.blake2b(req.request_id.encode()).digest()[:8], "little") or 1
