"""The OpenAI request parameters (with vLLM's and SGLang's extensions) and what the gateway does
with each: honoured (carried in pdlb.v1 SamplingParams), accepted as a no-op (the value sent
changes nothing here), or refused with a 400 naming it. vLLM's protocol is the reference for
names, ranges and defaults. A parameter sent as JSON null is the same as one not sent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pdlb.common.requests import DEFAULT_TEMPERATURE, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_NEW_TOKENS_LIMIT
from pdlb.v1 import common_pb2

INTEGER = re.compile(r"-?[0-9]{1,20}")  # ASCII digits only: a str pattern's \d matches any script's
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's completions default
DEFAULT_CHAT_TOKENS = 1024  # chat: "up to the context" in OpenAI's words; bounded here


class ParamError(ValueError):
    """A parameter the gateway cannot take: its name and why (a 400 with `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


# Accepted as no-ops at any value: they change nothing here. The reasoning switches select a
# reasoning parser's output, and no served model has one; `user` feeds routing, not sampling.
NO_OP_ANY = {
    "separate_reasoning", "stream_reasoning", "include_reasoning", "reasoning_effort", "metadata", "store",
    "service_tier", "parallel_tool_calls", "spaces_between_special_tokens", "return_text_in_logprobs",
}  # fmt: skip
# Accepted only at the value that changes nothing (shown in the refusal); any other value is
# refused, naming it.
NEUTRAL: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "suffix": "",
    "tools": [],
    "tool_choice": ("none", "auto"),  # without tools, "auto" calls none
    "functions": [],
    "function_call": ("none", "auto"),
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "no_stop_trim": False,
    "include_stop_str_in_output": False,
    "continue_final_message": False,
    "add_generation_prompt": True,
    "return_hidden_states": False,
    "use_beam_search": False,
    "length_penalty": 1,
    "chat_template_kwargs": {},
    "echo": False,
}
# Honoured: read by `sampling_from` and the API module.
HONOURED = {
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
    "stop_token_ids", "ignore_eos", "skip_special_tokens", "logprobs", "top_logprobs", "logit_bias", "stream",
    "stream_options", "user", "data_parallel_rank", "prefill_dp_rank", "decode_dp_rank", "priority",
}  # fmt: skip


def check_names(body: dict[str, Any]) -> dict[str, Any]:
    """The body without nulls; ParamError for an unknown parameter or one at a value not honoured."""
    body = {key: value for key, value in body.items() if value is not None}
    for name, value in body.items():
        if name in HONOURED or name in NO_OP_ANY:
            continue
        if name not in NEUTRAL:
            raise ParamError(name, f"unsupported parameter: {name}")
        accepted = NEUTRAL[name]
        choices = accepted if isinstance(accepted, tuple) else (accepted,)
        if not any(_same(value, choice) for choice in choices):
            allowed = " or ".join(json.dumps(choice) for choice in choices)
            raise ParamError(
                name,
                f"{name}={shown_value(value)} is not supported by this server: it serves only {name}={allowed} "
                "(or leave it out)",
            )
    return body


def _same(value: Any, accepted: Any) -> bool:
    """JSON equality that keeps booleans apart from numbers (true is not 1)."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted
    return value == accepted


def shown_value(value: Any, limit: int = 60) -> str:
    """The value as JSON when short, else its shape (a cut JSON text reads as a parse error)."""
    text = json.dumps(value)
    if len(text) <= limit:
        return text
    if isinstance(value, list):
        return f"[...{len(value)} item{'s' if len(value) != 1 else ''}...]"
    if isinstance(value, dict):
        keys = ", ".join(json.dumps(k) for k in list(value)[:4])
        return "{" + keys + (", ..." if len(value) > 4 else "") + "}"
    return text[: limit - 3] + "..." + ('"' if isinstance(value, str) else "")


@dataclass
class Extras:
    """What the API module itself applies: stop strings and how to report log-probabilities."""

    stops: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none reported; n: the token's and n alternatives


def sampling_from(body: dict[str, Any], chat: bool, sampling: common_pb2.SamplingParams) -> Extras:
    """Fill `sampling` from a checked body (see check_names); raises ParamError."""
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(key, DEFAULT_CHAT_TOKENS if chat else DEFAULT_COMPLETION_TOKENS)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ParamError(key, f"{key} must be a positive integer")
    if max_tokens > MAX_NEW_TOKENS_LIMIT:
        raise ParamError(
            key,
            f"{key} {max_tokens} is more than any request may ask for ({MAX_NEW_TOKENS_LIMIT}); the model's "
            "context bounds it further: GET /server_info gives max_new_tokens",
        )
    sampling.max_new_tokens = max_tokens
    sampling.temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)
    sampling.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    sampling.min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    sampling.repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 2.0, low_open=True)
    sampling.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    sampling.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    top_k = body.get("top_k", 0)
    if not _is_int(top_k) or top_k < -1:
        raise ParamError("top_k", "top_k must be -1 or 0 (all tokens) or a positive count")
    sampling.top_k = max(top_k, 0)
    min_tokens = body.get("min_tokens", 0)
    if not _is_int(min_tokens) or not 0 <= min_tokens <= max_tokens:
        raise ParamError("min_tokens", f"min_tokens must be an integer from 0 to {key} ({max_tokens})")
    sampling.min_tokens = min_tokens
    if "seed" in body:
        seed = body["seed"]
        if not _is_int(seed) or not 0 <= seed < 2**63:
            raise ParamError("seed", "seed must be an integer from 0 to 2^63-1")
        sampling.seed = seed
    stop_ids = body.get("stop_token_ids", [])
    if (
        not isinstance(stop_ids, list)
        or len(stop_ids) > MAX_STOP_STRINGS
        or not all(_is_int(t) and 0 <= t < 2**31 for t in stop_ids)
    ):
        raise ParamError("stop_token_ids", f"stop_token_ids must be a list of at most {MAX_STOP_STRINGS} token ids")
    sampling.stop_token_ids.extend(stop_ids)
    for name, target in (("ignore_eos", "ignore_eos"), ("skip_special_tokens", "keep_special_tokens")):
        value = body.get(name, name == "skip_special_tokens")
        if not isinstance(value, bool):
            raise ParamError(name, f"{name} must be true or false")
        setattr(sampling, target, value if target == name else not value)
    bias = body.get("logit_bias", {})
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise ParamError("logit_bias", f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases")
    for token, value in bias.items():
        token_id = ascii_int(token)
        if token_id is None:
            raise ParamError("logit_bias", f"logit_bias key {token[:40]!r} is not a token id (ASCII digits)")
        if not 0 <= token_id < 2**31 or not _is_number(value) or not -100 <= value <= 100:
            raise ParamError("logit_bias", "logit_bias maps token ids to numbers from -100 to 100")
        sampling.logit_bias[token_id] = float(value)
    extras = Extras(stops=_stops(body.get("stop")), logprobs=_logprobs(body, chat))
    if extras.logprobs is not None:
        sampling.logprobs = extras.logprobs
    return extras


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Completions: logprobs is a count (0..20). Chat: logprobs is a switch, top_logprobs the count."""
    if chat:
        switch, count = body.get("logprobs", False), body.get("top_logprobs", 0)
        if not isinstance(switch, bool):
            raise ParamError("logprobs", "logprobs must be true or false (the count is top_logprobs)")
        if not _is_int(count) or not 0 <= count <= MAX_LOGPROBS:
            raise ParamError("top_logprobs", f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}")
        if count and not switch:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
        return count if switch else None
    if "top_logprobs" in body:
        raise ParamError("top_logprobs", "completions take the count as logprobs, not top_logprobs")
    count = body.get("logprobs")
    if count is None:
        return None
    if not _is_int(count) or not 0 <= count <= MAX_LOGPROBS:
        raise ParamError("logprobs", f"logprobs must be an integer from 0 to {MAX_LOGPROBS}")
    return count


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if not _is_number(value) or not low <= value <= high or (low_open and value == low):
        span = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ParamError(name, f"{name} must be a number in {span}")
    return float(value)


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ParamError("stop", "stop must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ParamError("stop", f"at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_CHARS} characters")
    return stops


def ascii_int(text: str) -> int | None:
    """The integer a header value or JSON key spells in ASCII digits (a leading '-' allowed), else
    None. Python's int() also takes other scripts' digits ('١٢' is 12, '²' raises), '_' between
    digits and surrounding spaces: a client's text means what it shows, or is refused."""
    return int(text) if INTEGER.fullmatch(text) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN
