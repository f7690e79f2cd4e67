"""The vLLM engine: each pdlb worker is one DP rank of a running vLLM OpenAI server.

Requests go to the server's `/v1/completions` as prompt token ids (the dispatcher has tokenised
them), streamed, with `return_token_ids` so tokens arrive as ids, not text. A server that holds
several DP ranks (`--data-parallel-size N`) is addressed per rank with the `X-data-parallel-rank`
header; a server per rank needs no header. Closing a stream aborts the request in vLLM (it frees
the request's KV; `vllm:num_requests_running` drops).

Load: vLLM's gauges refresh once per engine step (seconds on a CPU), so load reports carry pdlb's
own exact in-flight counts (requests sent here and not finished: waiting until their first token,
then running), merged with the last scrape of the rank's `/metrics` series (the larger total of the
two: the server may also serve traffic that did not come through pdlb). Prefix-cache hits and
KV use come from vLLM's counters. Health comes from `/health`: when the server stops answering, the
engine fails its requests with UNAVAILABLE (the gateway resumes them elsewhere) and reports itself
unhealthy; the scheduler service then leaves membership, and joins again once the server is back
and still serves the same tokenizer.

PD (prefill and decode workers, `kv_connector` set): vLLM moves the KV itself, through the KV
connector its servers were started with (`--kv-transfer-config`); pdlb keeps its own PD flow around
it. A prefill rank sends the prompt with `max_tokens` 1 and `kv_transfer_params` asking for remote
decode (vLLM's P/D protocol: `do_remote_decode`), not streamed (vLLM returns `kv_transfer_params`
only in a whole response), and holds what came back per bootstrap room (a `ConnectorKV`) until the
decode side pulls it through pdlb's PullKV, or `kv_hold_ttl_s` passes. A decode rank then sends the
whole request with those `kv_transfer_params`, and its server loads the prompt's KV from the
connector instead of computing it (vLLM's `vllm:prompt_tokens_by_source_total{source=
"external_kv_transfer"}` counts it). Room ownership is kept as pdlb's own engine keeps it: one
request per room on a rank, a second one refused with ALREADY_EXISTS, a pulled or expired room
answered NOT_FOUND at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import grpc

from pdlb.common.plurals import counted
from pdlb.common.tokenizer import Tokenizer
from pdlb.engines.request import (
    ABORT,
    LENGTH,
    PREFILL_DONE,
    STOP,
    AdmissionError,
    ConnectorKV,
    EngineLimits,
    Output,
    PreloadedKV,
    Sampled,
    Sequence,
    check_prompt,
    prompt_limit,
)
from pdlb.engines.room_waits import RoomWaits
from pdlb.engines.vllm.rank_metrics import RankRates, RankStats, parse_rank
from pdlb.v1 import common_pb2

log = logging.getLogger(__name__)

FINISH = {"length": LENGTH, "stop": STOP, "abort": ABORT}
MAX_ERROR_CHARS = 500  # of a vLLM error body quoted in a status message
MAX_LINE_BYTES = 1 << 20  # one SSE line of a streamed completion
MAX_BODY_BYTES = 16 << 20  # a whole (prefill) completion response: the prompt's ids echoed, and little else
MAX_HELD_ROOMS = 10_000  # prefill: rooms whose connector hand-off waits for its decode side
MAX_RELEASED_ROOMS = 10_000  # rooms whose hand-off went (pulled or expired), remembered to answer at once
# vLLM's P/D protocol: the prefill request asks for its KV to be kept for a remote decode
REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# A busy CPU server answers /health late: one slow probe must not fail its streams. Unhealthy
# means this many probes in a row failed or took longer than PROBE_TIMEOUT_S each (a dead server
# resets its streams' connections at once anyway, and those fail by themselves).
FAILED_PROBES = 3
PROBE_TIMEOUT_S = 5.0
# Strings whose token ids must be the same on both sides: plain text, whitespace, digits, unicode
# and the chat template's special tokens (a different vocabulary differs on at least one).
TOKENIZER_PROBES = (
    "The capital of France is Paris.",
    "  def f(x):\n\treturn x ** 2  # 12345",
    "naïve café, 東京 🙂",
    "<|im_start|>user\nHi!<|im_end|>\n",
)


class VLLMUnavailable(Exception):
    """The vLLM server did not answer as expected; the message says what happened."""


class TokenizerMismatch(Exception):
    """The vLLM server's tokenizer is not the dispatcher's; the message shows the first difference."""


@dataclass(frozen=True)
class VLLMRank:
    """Where one DP rank lives: the server's base URL and the rank within it.

    `header_rank` is sent as X-data-parallel-rank (None: the server holds only this rank);
    `engine_label` is the rank's `engine` label in the server's /metrics."""

    url: str
    header_rank: int | None
    engine_label: str

    @classmethod
    def of(cls, url: str, server_ranks: int, rank_in_server: int) -> VLLMRank:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"vLLM URL {url!r} must start with http:// or https://")
        if not 0 <= rank_in_server < max(1, server_ranks):
            raise ValueError(f"rank {rank_in_server} is not one of the server's {server_ranks} DP ranks")
        return cls(url.rstrip("/"), rank_in_server if server_ranks > 1 else None, str(rank_in_server))


async def served_model(session: aiohttp.ClientSession, url: str, timeout_s: float = 10.0) -> tuple[str, int]:
    """The (model id, max_model_len) a vLLM server serves; raises VLLMUnavailable."""
    try:
        async with session.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise VLLMUnavailable(f"{url}/v1/models answered HTTP {resp.status}")
            models = (await resp.json()).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise VLLMUnavailable(f"{url}/v1/models: {exc!r}") from None
    if not models:
        raise VLLMUnavailable(f"{url} serves no model")
    return str(models[0]["id"]), int(models[0].get("max_model_len") or 0)


async def check_tokenizer(session: aiohttp.ClientSession, url: str, model: str, tokenizer: Tokenizer) -> None:
    """Raise TokenizerMismatch unless the server tokenises the probe strings exactly as `tokenizer`
    does (VLLMUnavailable if it cannot be asked)."""
    for probe in TOKENIZER_PROBES:
        body = {"model": model, "prompt": probe, "add_special_tokens": False}
        try:
            async with session.post(f"{url}/tokenize", json=body, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    raise VLLMUnavailable(f"{url}/tokenize answered HTTP {resp.status}: {await _error_text(resp)}")
                theirs = list((await resp.json())["tokens"])
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
            raise VLLMUnavailable(f"{url}/tokenize: {exc!r}") from None
        ours = tokenizer._encode_text(probe)
        if theirs != ours:
            raise TokenizerMismatch(
                f"vLLM at {url} (model {model!r}) tokenises {probe!r} as {theirs[:12]}, the dispatcher's "
                f"tokenizer as {ours[:12]}: serve the same model on both sides"
            )


def token_id_of(placeholder: str) -> int:
    """The id in vLLM's "token_id:<id>" (return_tokens_as_token_ids); ValueError otherwise."""
    prefix, _, number = placeholder.partition(":")
    if prefix != "token_id":
        raise ValueError(f"a logprobs token {placeholder[:40]!r} that is not token_id:<id>")
    return int(number)


def logprobs_of(choice: dict, tokens: list[int], count: int | None) -> list[Sampled]:
    """pdlb's per-token logprobs from a completion chunk's `logprobs` (vLLM's completions format:
    token_logprobs, top_logprobs as {"token_id:<id>": logprob}); the `count` most likely tokens of
    each position, most likely first (vLLM adds the drawn token when it is not among them: dropped,
    as pdlb's engine lists exactly `count`). [] when none were asked for; ValueError when vLLM sent
    fewer than one entry per token."""
    if count is None or not tokens:
        return []
    got = choice.get("logprobs") or {}
    values, tops = got.get("token_logprobs") or [], got.get("top_logprobs") or []
    if len(values) != len(tokens) or len(tops) != len(tokens):
        raise ValueError(f"{len(values)} logprobs for {len(tokens)} tokens")
    sampled = []
    for token, value, top in zip(tokens, values, tops, strict=True):
        ranked = sorted(((token_id_of(k), float(v)) for k, v in (top or {}).items()), key=lambda p: -p[1])
        sampled.append(Sampled(token, float(value) if value is not None else None, ranked[:count]))
    return sampled


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    """vLLM's error message (OpenAI error JSON), else the body's start."""
    raw = (await resp.content.read(64 << 10)).decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return str(json.loads(raw)["error"]["message"])[:MAX_ERROR_CHARS]
    return raw[:MAX_ERROR_CHARS]


@dataclass
class _InFlight:
    seq: Sequence
    task: asyncio.Task | None = None
    first_token_at: float | None = None
    tokens: int = 0


class VLLMEngine:
    """One DP rank of a vLLM server behind pdlb's Engine interface (pdlb.engines.base.Engine)."""

    def __init__(
        self,
        rank: VLLMRank,
        model: str,
        limits: EngineLimits,
        vocab_size: int,
        max_model_len: int,
        poll_interval_s: float = 0.5,
        session: aiohttp.ClientSession | None = None,
        kv_connector: str = "",
        kv_hold_ttl_s: float = 60.0,
    ) -> None:
        """`model`: the id the server serves (sent as `model`); `limits`: pdlb's bounds on this rank
        (max_running + max_waiting requests in flight at most, max_prompt_tokens);
        `poll_interval_s`: how often /health and /metrics are read; `session`: the HTTP client
        session to use (default: a new one), closed by close(); `kv_connector`: the KV connector
        the server was started with (PD roles; empty: mixed requests only); `kv_hold_ttl_s`:
        prefill role, how long a room's hand-off waits for its decode side."""
        self.rank, self.model, self.limits = rank, model, limits
        self.kv_connector, self.kv_hold_ttl_s = kv_connector, kv_hold_ttl_s
        # PD rooms: the request that owns each room here (its prefill or decode in flight, or its
        # hand-off held); the hand-offs held for decode sides; what became of released ones
        self.rooms: dict[int, str] = {}
        self.held: dict[int, ConnectorKV] = {}
        self.released: OrderedDict[int, str] = OrderedDict()
        self._room_waits = RoomWaits()
        self.kv_receive_s = 0.0  # decode side: the scheduler service's PullKV accounting
        self.kv_received_tokens = 0
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.poll_interval_s = poll_interval_s
        self.listeners: list[Callable[[], None]] = []
        self.health_listeners: list[Callable[[bool], None]] = []  # called with the new health on a change
        self.kv_events = None  # vLLM's KV events (ZMQ) are not read; dispatchers use reported hit counters
        self.inflight: dict[str, _InFlight] = {}
        self.stats = RankStats()
        self.rates = RankRates()
        self.healthy = True
        self.failed_probes = 0  # in a row
        self.draining = False
        self.prompt_tokens_total = 0
        self.session = session  # closed with the engine
        self._poller: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._headers = {"X-data-parallel-rank": str(rank.header_rank)} if rank.header_rank is not None else {}

    # the Engine interface -------------------------------------------------------------------------
    def start(self) -> None:
        if self.session is None:
            # no total timeout: a completion streams as long as it generates; connects are bounded
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self._poller = asyncio.create_task(self._poll(), name=f"vllm-poll:{self.rank.url}#{self.rank.engine_label}")

    def check(self, seq: Sequence) -> None:
        limits = self.limits
        if self.draining:
            raise AdmissionError(grpc.StatusCode.FAILED_PRECONDITION, "worker is shutting down; send it elsewhere")
        if not self.healthy:
            raise AdmissionError(
                grpc.StatusCode.UNAVAILABLE, f"the vLLM server at {self.rank.url} is not healthy; send it elsewhere"
            )
        if seq.request_id in self.inflight:
            raise AdmissionError(grpc.StatusCode.ALREADY_EXISTS, f"request {seq.request_id} is already running here")
        if seq.bootstrap_room is not None:
            self._check_room(seq)
        check_prompt(seq, self.vocab_size, limits.max_prompt_tokens, self.max_model_len)
        if self.max_model_len and seq.reserve > self.max_model_len:
            raise AdmissionError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {seq.request_id}: prompt + max_new_tokens = {seq.reserve} exceeds the served model's "
                f"context of {self.max_model_len} (vLLM --max-model-len)",
            )
        if len(self.inflight) >= limits.max_running_requests + limits.max_waiting_requests:
            raise AdmissionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request {seq.request_id}: {counted(len(self.inflight), 'request')} already in flight on this rank; "
                "retry later",
            )

    def _check_room(self, seq: Sequence) -> None:
        room = seq.bootstrap_room
        if not self.kv_connector and (seq.prefill_only or seq.preloaded is not None):
            raise AdmissionError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request {seq.request_id}: this vLLM worker serves mixed requests only; PD needs vLLM servers "
                "started with a KV connector and workers given --vllm-kv-connector",
            )
        if isinstance(seq.preloaded, PreloadedKV):
            raise AdmissionError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request {seq.request_id}: room {room} holds KV tensors from pdlb's own engine; a vLLM decode "
                "rank loads KV only through its connector (run prefill and decode on the same engine)",
            )
        owner = self.rooms.get(room)  # type: ignore[arg-type]
        if owner is not None:
            raise AdmissionError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request {seq.request_id}: bootstrap room {room} is already taken here by request {owner} "
                "(in flight, or its KV held for its decode half); give every request a room of its own",
            )
        if seq.prefill_only and len(self.held) >= MAX_HELD_ROOMS:
            raise AdmissionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request {seq.request_id}: {MAX_HELD_ROOMS} prefilled rooms already wait for their decode "
                "side here; retry later",
            )

    def submit(self, seq: Sequence, wave: int | None = None) -> None:
        self.check(seq)
        entry = _InFlight(seq)
        self.inflight[seq.request_id] = entry
        if seq.bootstrap_room is not None:
            self.rooms[seq.bootstrap_room] = seq.request_id
        self.prompt_tokens_total += len(seq.prompt)
        self._idle.clear()
        run = self._prefill(entry) if seq.prefill_only else self._stream(entry)
        entry.task = asyncio.create_task(run, name=f"vllm:{seq.request_id}")
        self._notify()

    def abort(self, request_id: str) -> bool:
        entry = self.inflight.get(request_id)
        if entry is None or entry.seq.finish_reason is not None:
            return False
        entry.seq.aborted = True
        if entry.task is not None:
            entry.task.cancel()  # closes the HTTP stream: vLLM aborts the request and frees its KV
        return True

    def load(self) -> common_pb2.WorkerLoad:
        started = [e for e in self.inflight.values() if e.first_token_at is not None]
        waiting = [e for e in self.inflight.values() if e.first_token_at is None]
        stats = self.stats
        capacity = stats.kv_capacity_tokens
        # vLLM's gauges may count traffic that bypassed pdlb, or lag a step behind: the larger total
        # wins, split so that running is the larger of the two running counts
        total = max(len(self.inflight), stats.running + stats.waiting)
        running = min(total, max(len(started), stats.running))
        return common_pb2.WorkerLoad(
            running_requests=running,
            waiting_requests=total - running,
            running_tokens=sum(len(e.seq.prompt) + e.tokens for e in started),
            waiting_tokens=sum(len(e.seq.prompt) for e in waiting),
            kv_tokens_used=int(stats.kv_usage * capacity),
            kv_tokens_capacity=capacity,
            prompt_tokens_total=max(self.prompt_tokens_total, stats.prefix_queried_tokens),
            cache_hit_tokens=stats.prefix_hit_tokens,
            max_running_requests=self.limits.max_running_requests,
            prefill_pending_tokens=sum(len(e.seq.prompt) for e in waiting),
            # from vLLM's histograms (see RankRates); a decode step stands for the fixed cost of a step
            step_ms=self.rates.step_s * 1000,
            step_base_ms=self.rates.step_s * 1000,
            prefill_tokens_per_s=self.rates.prefill_tokens_per_s,
            mean_output_tokens=self.rates.mean_output_tokens,
            max_prompt_tokens=prompt_limit(self.limits.max_prompt_tokens, self.max_model_len),
            max_context_tokens=self.max_model_len,  # 0 (unknown) when vLLM did not say
        )

    async def drain(self, timeout: float) -> None:
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            for request_id in list(self.inflight):
                self.abort(request_id)
            await asyncio.wait_for(self._idle.wait(), 30)

    async def close(self) -> None:
        for request_id in list(self.inflight):
            self.abort(request_id)
        tasks = [e.task for e in self.inflight.values() if e.task is not None]
        if self._poller is not None:
            self._poller.cancel()
            tasks.append(self._poller)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    # requests -------------------------------------------------------------------------------------
    def _body(self, seq: Sequence) -> dict:
        body = {
            "model": self.model,
            "prompt": seq.prompt,
            "max_tokens": seq.max_new_tokens,
            "temperature": seq.temperature,
            "ignore_eos": seq.ignore_eos,
            "stream": True,
            "return_token_ids": True,
            "stream_options": {"include_usage": True},
        }
        if seq.stop_ids:
            body["stop_token_ids"] = sorted(seq.stop_ids)
        if seq.min_tokens > seq.seed_position:  # a resumed request has already streamed seed_position tokens
            body["min_tokens"] = seq.min_tokens - seq.seed_position
        if seq.sampling is not None:
            # vLLM's own names and neutral values; 0 (all tokens) is -1 for vLLM's top_k
            cfg = seq.sampling
            body.update(
                top_k=cfg.top_k or -1,
                top_p=cfg.top_p,
                min_p=cfg.min_p,
                repetition_penalty=cfg.repetition_penalty,
                presence_penalty=cfg.presence_penalty,
                frequency_penalty=cfg.frequency_penalty,
            )
            if cfg.logit_bias:
                body["logit_bias"] = {str(token): bias for token, bias in cfg.logit_bias}
            if cfg.logprobs is not None:
                # vLLM's default logprobs are the model's raw ones, as pdlb's engine returns them;
                # tokens come back as "token_id:<id>", not text
                body.update(logprobs=cfg.logprobs, return_tokens_as_token_ids=True)
        if isinstance(seq.preloaded, ConnectorKV) and seq.preloaded.kv_transfer_params is not None:
            body["kv_transfer_params"] = seq.preloaded.kv_transfer_params  # what the prefill returned
        if seq.temperature > 0:
            # vLLM draws from one generator per request: a resumed sampled request does not continue
            # the original's draws (greedy requests resume exactly)
            body["seed"] = (seq.seed + seq.seed_position) & 0x7FFFFFFF
        return body

    async def _stream(self, entry: _InFlight) -> None:
        seq = entry.seq
        headers = {**self._headers, "X-Request-Id": seq.request_id}
        try:
            async with self.session.post(
                f"{self.rank.url}/v1/completions", json=self._body(seq), headers=headers
            ) as resp:
                if resp.status != 200:
                    code = grpc.StatusCode.INVALID_ARGUMENT if resp.status == 400 else grpc.StatusCode.UNAVAILABLE
                    self._fail(
                        seq, code, f"vLLM at {self.rank.url} answered HTTP {resp.status}: {await _error_text(resp)}"
                    )
                    return
                await self._read_events(entry, resp)
            if seq.finish_reason is None:
                self._fail(
                    seq, grpc.StatusCode.UNAVAILABLE, f"vLLM at {self.rank.url} ended the stream without a finish"
                )
        except asyncio.CancelledError:
            if seq.finish_reason is None:
                self._finish(seq, [], ABORT)
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            self._fail(seq, grpc.StatusCode.UNAVAILABLE, f"vLLM at {self.rank.url} failed mid-request: {exc!r}")
        except ValueError as exc:  # a chunk that is not vLLM's JSON
            self._fail(seq, grpc.StatusCode.INTERNAL, f"vLLM at {self.rank.url} sent an unreadable chunk: {exc}")
        finally:
            self._done(seq)

    def _done(self, seq: Sequence) -> None:
        self.inflight.pop(seq.request_id, None)
        room = seq.bootstrap_room
        if room is not None and room not in self.held and self.rooms.get(room) == seq.request_id:
            del self.rooms[room]
        if not self.inflight:
            self._idle.set()
        self._notify()

    async def _prefill(self, entry: _InFlight) -> None:
        """PD prefill: the prompt with max_tokens 1 asking for remote decode; the hand-off that
        comes back is held for the room, and the first token streamed with PREFILL_DONE."""
        seq = entry.seq
        body = self._body(seq)
        for key in ("stream", "stream_options", "min_tokens", "logprobs", "return_tokens_as_token_ids"):
            body.pop(key, None)
        body.update(max_tokens=1, kv_transfer_params=dict(REMOTE_DECODE))
        headers = {**self._headers, "X-Request-Id": seq.request_id}
        try:
            async with self.session.post(f"{self.rank.url}/v1/completions", json=body, headers=headers) as resp:
                if resp.status != 200:
                    code = grpc.StatusCode.INVALID_ARGUMENT if resp.status == 400 else grpc.StatusCode.UNAVAILABLE
                    error = await _error_text(resp)
                    self._fail(seq, code, f"vLLM at {self.rank.url} answered the prefill HTTP {resp.status}: {error}")
                    return
                raw = await resp.content.read(MAX_BODY_BYTES + 1)
            if len(raw) > MAX_BODY_BYTES:
                raise ValueError(f"a prefill response over {MAX_BODY_BYTES} bytes")
            answer = json.loads(raw)
            tokens = [int(t) for t in answer["choices"][0].get("token_ids") or []]
            if not tokens:
                raise ValueError("a prefill response without token_ids")
            cached = ((answer.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
            seq.cache_hit = int(cached or 0)
            params = answer.get("kv_transfer_params")
            entry.first_token_at = time.monotonic()
            self._hold(seq, tokens[0], params if isinstance(params, dict) else None)
            self._finish(seq, tokens[:1], PREFILL_DONE)
        except asyncio.CancelledError:
            if seq.finish_reason is None:
                self._finish(seq, [], ABORT)
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            self._fail(seq, grpc.StatusCode.UNAVAILABLE, f"vLLM at {self.rank.url} failed mid-prefill: {exc!r}")
        except (ValueError, KeyError, IndexError, TypeError) as exc:  # not vLLM's completion JSON
            message = f"vLLM at {self.rank.url} sent an unreadable prefill answer: {exc!r}"
            self._fail(seq, grpc.StatusCode.INTERNAL, message)
        finally:
            self._done(seq)

    # PD hand-offs held for decode sides (prefill role) -----------------------------------------
    def _hold(self, seq: Sequence, first_token: int, params: dict | None) -> None:
        room = seq.bootstrap_room
        assert room is not None  # a prefill request always has its room
        self.released.pop(room, None)
        self.held[room] = ConnectorKV(
            room,
            seq.request_id,
            seq.prompt,
            first_token,
            self.kv_connector,
            params,
            expires_at=time.monotonic() + self.kv_hold_ttl_s,
        )
        asyncio.get_running_loop().call_later(self.kv_hold_ttl_s, self._expire_held)
        self._room_waits.held(room)

    async def wait_held(self, room: int, timeout: float) -> ConnectorKV | None:
        """Take a room's hand-off, waiting up to `timeout` s for its prefill here; None when the
        wait ran out. Raises AdmissionError(NOT_FOUND) at once when it was here and is gone."""
        return await self._room_waits.take(room, timeout, self.take_held, self._raise_if_released)

    def take_held(self, room: int) -> ConnectorKV | None:
        """Hand a room's hand-off to a PullKV call; the caller must `free_held` it afterwards."""
        self._expire_held()
        return self.held.pop(room, None)

    def free_held(self, held: ConnectorKV) -> None:
        self._release(held, "already pulled (taken by a PullKV call)")
        self._notify()

    def _release(self, held: ConnectorKV, what: str) -> None:
        if self.rooms.get(held.room) == held.request_id:
            del self.rooms[held.room]
        self.released[held.room] = f"{what}; it belonged to request {held.request_id}"
        self.released.move_to_end(held.room)
        while len(self.released) > MAX_RELEASED_ROOMS:
            self.released.popitem(last=False)

    def _expire_held(self) -> None:
        now = time.monotonic()
        for room in [r for r, h in self.held.items() if h.expires_at <= now]:
            self._release(self.held.pop(room), f"not pulled within {self.kv_hold_ttl_s:g} s (--kv-hold-ttl)")

    def _raise_if_released(self, room: int) -> None:
        what = self.released.get(room)
        if what is not None and room not in self.rooms:
            raise AdmissionError(grpc.StatusCode.NOT_FOUND, f"room {room}: the KV hand-off held here for it was {what}")

    async def _read_events(self, entry: _InFlight, resp: aiohttp.ClientResponse) -> None:
        seq = entry.seq
        while True:
            line = await resp.content.readline()
            if not line:
                return
            if len(line) > MAX_LINE_BYTES:
                raise ValueError(f"an event line of {len(line)} bytes")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            chunk = json.loads(data)
            usage = chunk.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None:
                seq.cache_hit = int(cached)
            for choice in chunk.get("choices") or []:
                tokens = [int(t) for t in choice.get("token_ids") or []]
                reason = FINISH.get(choice.get("finish_reason") or "")
                if tokens and entry.first_token_at is None:
                    entry.first_token_at = time.monotonic()
                    self._notify()  # waiting -> running
                entry.tokens += len(tokens)
                logprobs = logprobs_of(choice, tokens, seq.sampling.logprobs) if seq.sampling is not None else []
                if reason is not None:
                    self._finish(seq, tokens, reason, logprobs)
                elif tokens:
                    seq.output.extend(tokens)
                    seq.outbox.put_nowait(Output(tokens, logprobs=logprobs))

    def _finish(self, seq: Sequence, tokens: list[int], reason: int, logprobs: list[Sampled] | None = None) -> None:
        seq.output.extend(tokens)
        seq.finish_reason = reason
        seq.outbox.put_nowait(Output(tokens, reason, logprobs=logprobs or []))

    def _fail(self, seq: Sequence, code: grpc.StatusCode, message: str) -> None:
        if seq.finish_reason is not None:
            return
        log.warning("request %s: %s", seq.request_id, message)
        seq.finish_reason = ABORT
        seq.outbox.put_nowait(Output([], ABORT, error=(code, message)))

    # health and metrics ---------------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            answered = await self._scrape()
            self.failed_probes = 0 if answered else self.failed_probes + 1
            healthy = self.healthy if 0 < self.failed_probes < FAILED_PROBES else answered
            if healthy != self.healthy:
                self.healthy = healthy
                log.warning("vLLM at %s is %s", self.rank.url, "healthy again" if healthy else "NOT healthy")
                if not healthy:
                    for entry in list(self.inflight.values()):
                        if entry.task is not None:
                            entry.task.cancel()  # closes the stream; _stream reports ABORT...
                        self._fail(entry.seq, grpc.StatusCode.UNAVAILABLE, f"vLLM at {self.rank.url} stopped answering")
                for listener in self.health_listeners:
                    listener(healthy)
            self._notify()
            await asyncio.sleep(self.poll_interval_s)

    async def _scrape(self) -> bool:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        try:
            async with self.session.get(f"{self.rank.url}/health", timeout=timeout) as resp:
                if resp.status != 200:
                    return False
            async with self.session.get(f"{self.rank.url}/metrics", timeout=timeout) as resp:
                if resp.status == 200:
                    stats = parse_rank(await resp.text(), self.rank.engine_label)
                    self.rates.update(self.stats, stats)
                    self.stats = stats
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
            return False
        except ValueError as exc:
            log.warning("unreadable /metrics from %s: %s", self.rank.url, exc)
        return True

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()
