"""The one interface the scheduler service runs over: an engine that serves one DP rank's requests.

Implementations: pdlb's own continuous-batching engine (`engines/torch/`, over the torch model or
the cost-model simulator) and a running vLLM server's DP rank (`engines/vllm/`). The service
(gRPC `Scheduler`, load reports, membership) calls only what is declared here, so it does not care
which engine it runs.

Request flow: the service builds a `Sequence` (prompt token ids, sampling, `outbox`), calls
`check` (raises `AdmissionError` with a gRPC status for a request that cannot run here), then
`submit`; the engine puts `Output`s (new token ids; the last carries the finish reason, or an error
status) on `seq.outbox`. `abort` stops a request whose client went away.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from pdlb.engines.kv_events import KVEventLog
    from pdlb.engines.request import ConnectorKV, EngineLimits, Sequence
    from pdlb.engines.torch.batching import HeldKV
    from pdlb.v1 import common_pb2


class Engine(Protocol):
    """One DP rank's engine (see the module docstring for the request flow)."""

    limits: EngineLimits  # max_prompt_tokens bounds what the service accepts before `check`
    listeners: list[Callable[[], None]]  # called (on the event loop) when load changed: reports go out early
    kv_events: KVEventLog | None  # prefix-cache block events for dispatchers, None if not tracked

    def check(self, seq: Sequence) -> None:
        """Raise AdmissionError (gRPC code + message) for a request this engine cannot take now."""

    def submit(self, seq: Sequence, wave: int | None = None) -> None:
        """Accept a checked request; its outputs go to `seq.outbox`. `wave`: its lockstep request wave."""

    def abort(self, request_id: str) -> bool:
        """Stop a request and free what it holds; False if it is not running here."""

    def load(self) -> common_pb2.WorkerLoad:
        """This rank's load now, as load reports carry it (exact in-flight counts)."""

    def start(self) -> None:
        """Start serving (called on the event loop, before the first request)."""

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let admitted ones finish for up to `timeout` seconds, abort the rest."""

    async def close(self) -> None:
        """Release everything (after drain)."""


class KVHandoffEngine(Engine, Protocol):
    """An engine that also runs PD roles through pdlb's KV hand-off: the prefill side holds, per
    bootstrap room, the prompt's KV (`HeldKV`, pdlb's engine: sent as tensors) or, where the
    engines move KV through their own connector (vLLM), what the decode request needs to load it
    (`ConnectorKV`), until the decode side pulls it."""

    kv_connector: str  # "": KV travels as tensors in pdlb's PullKV stream; else the engines' connector
    kv_receive_s: float  # decode side: seconds from a pull's first message to reassembled KV, summed
    kv_received_tokens: int  # decode side: prompt tokens of KV pulled

    async def wait_held(self, room: int, timeout: float) -> HeldKV | ConnectorKV | None:
        """Prefill side: the KV held for `room`, waiting up to `timeout` s for its prefill; None when
        the wait ran out. Raises AdmissionError (NOT_FOUND) at once when the room's KV was held here
        and is gone (pulled by another request, or expired)."""

    async def read_held(self, held: HeldKV) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of held KV, each [num_layers, tokens, num_heads, head_dim] on the CPU."""

    def free_held(self, held: HeldKV | ConnectorKV) -> None:
        """Release held KV (after transfer, or when the decode side went away)."""
