"""What engines and the scheduler service exchange about one request, whichever engine runs it.

A `Sequence` is one request on one DP rank (prompt token ids, sampling, and the `outbox` its
`Output`s go to); `AdmissionError` refuses it with a gRPC status; `EngineLimits` bounds a rank;
`PreloadedKV` and `ConnectorKV` carry a PD hand-off. Engines (pdlb.engines.torch,
pdlb.engines.vllm) import these from here, never from each other.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from pdlb.common.plurals import counted
from pdlb.v1 import common_pb2

if TYPE_CHECKING:
    import torch

LENGTH, STOP, ABORT, PREFILL_DONE = (
    common_pb2.FINISH_REASON_LENGTH,
    common_pb2.FINISH_REASON_STOP,
    common_pb2.FINISH_REASON_ABORT,
    common_pb2.FINISH_REASON_PREFILL_DONE,
)


@dataclass(frozen=True)
class EngineLimits:
    """Bounds of one DP rank: KV tokens, running batch, prefill chunk, waiting queue, prompt length,
    and how long an idle rank may wait for the rest of a burst of requests before its first step
    (seconds; 0: it starts at once)."""

    max_total_tokens: int
    max_running_requests: int
    chunked_prefill_size: int
    max_waiting_requests: int
    max_prompt_tokens: int
    burst_window_s: float = 0.0


@dataclass(frozen=True)
class SamplingConfig:
    """A request's sampling parameters (neutral values mean off)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: none returned; n: the token's and the n most likely

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature changes the distribution."""
        return bool(
            self.top_k > 0
            or self.top_p < 1.0
            or self.min_p > 0.0
            or self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
        )


@dataclass
class Sampled:
    """The drawn token; with logprobs asked for, its log-probability and the most likely tokens."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


class AdmissionError(Exception):
    """A request an engine cannot take: `code` is the gRPC status it fails with, the message says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def prompt_limit(max_prompt_tokens: int, context: int) -> int:
    """The longest prompt (tokens) a rank takes: its --max-prompt-tokens, and at most `context` - 1
    (a prompt leaves room for one new token; `context` 0: unknown). What it reports and checks."""
    return min(max_prompt_tokens, context - 1) if context > 0 else max_prompt_tokens


def check_prompt(seq: Sequence, vocab_size: int, max_prompt_tokens: int, context: int = 0) -> None:
    """Refuse a prompt with a token id outside 0..vocab_size-1 or longer than
    prompt_limit(max_prompt_tokens, context), and a logit_bias on a token id outside the vocabulary
    (as vLLM does; it was ignored) (AdmissionError INVALID_ARGUMENT naming the request), whichever
    engine would run it."""
    bad = next((t for t in seq.prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise AdmissionError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request {seq.request_id}: token id {bad} is outside the vocabulary 0..{vocab_size - 1}",
        )
    biased = seq.sampling.logit_bias if seq.sampling is not None else ()
    if outside := sorted(t for t, _ in biased if not 0 <= t < vocab_size):
        raise AdmissionError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request {seq.request_id}: logit_bias names token ids outside the vocabulary 0..{vocab_size - 1}: "
            f"{', '.join(map(str, outside[:5]))}{' ...' if len(outside) > 5 else ''}",
        )
    limit = prompt_limit(max_prompt_tokens, context)
    if len(seq.prompt) > limit:
        why = (
            f" (a context of {counted(context, 'token')} leaves room for one new token)"
            if limit < max_prompt_tokens
            else ""
        )
        raise AdmissionError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request {seq.request_id}: prompt of {counted(len(seq.prompt), 'token')} exceeds the limit {limit}{why}",
        )


@dataclass
class Output:
    """What a request's stream receives: new tokens, and the finish reason on the last one."""

    token_ids: list[int]
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    error: tuple[grpc.StatusCode, str] | None = None  # the request fails with this status instead
    logprobs: list[Sampled] = field(default_factory=list)  # one per token when the request asked


@dataclass
class PreloadedKV:
    """PD decode (pdlb's own engine): the prompt's KV pulled from the prefill worker, each of K and
    V [num_layers, prompt_tokens, num_kv_heads, head_dim] on the CPU, and the first token."""

    k: torch.Tensor
    v: torch.Tensor
    first_token: int


@dataclass
class ConnectorKV:
    """PD through an engine's own KV connector (vLLM's `kv_connector`): the KV went from the
    prefill engine to the decode engine through the connector, not through pdlb; pdlb hands over
    what the decode request needs to find it.

    Prefill side: held per bootstrap room until the decode side pulls it (`expires_at`, monotonic
    seconds); decode side: `Sequence.preloaded`. `kv_transfer_params`: the JSON object the prefill
    request returned (None when the connector returns none, as vLLM's ExampleConnector does)."""

    room: int
    request_id: str  # of the prefill request
    prompt: list[int]
    first_token: int
    kv_connector: str
    kv_transfer_params: dict | None = None
    expires_at: float = 0.0


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    seed: int = 0  # temperature sampling: token i is drawn with a generator seeded from (seed, seed_position + i)
    seed_position: int = 0
    sampling: SamplingConfig | None = None  # parameters beyond temperature (None: plain sampling)
    min_tokens: int = 0  # stop tokens neither end the generation nor get drawn before this many
    prefill_only: bool = False
    bootstrap_room: int | None = None
    preloaded: PreloadedKV | ConnectorKV | None = None  # PD decode: the prompt's KV, or where to find it
    outbox: asyncio.Queue[Output] = field(default_factory=asyncio.Queue)
    slots: list[int] = field(default_factory=list)
    nodes: list = field(default_factory=list)  # pdlb's engine: the locked prefix-cache path (CacheNode)
    shared: int = 0  # leading tokens whose slots belong to the prefix cache
    reserved_tokens: int = 0  # KV tokens this request holds in the engine's reservation
    cache_hit: int = 0  # prompt tokens found in the prefix cache at admission
    computed: int = 0
    output: list[int] = field(default_factory=list)
    finish_reason: int | None = None
    aborted: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def reserve(self) -> int:
        """KV tokens this request may ever hold."""
        return len(self.prompt) + (1 if self.prefill_only else self.max_new_tokens)

    @property
    def context_len(self) -> int:
        return len(self.prompt) + len(self.output)
