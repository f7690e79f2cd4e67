"""Continuous batching over a KV-token budget.

Admission is FIFO: a request joins the running batch when `--max-running-requests` allows and its
reservation (prompt + max_new_tokens, less the prefix found in the prefix cache) fits the KV budget
beside those already running and the cache blocks in use; the head of the queue is never
overtaken, so a long request is not starved by short ones. Every running request is guaranteed its
KV (unused cache blocks are evicted to make room), so nothing is preempted. Each step runs, in one
forward pass, one decode token of every decoding request and prefill chunks of at most
`--chunked-prefill-size` tokens. Prefill starts after the cached prefix, and a prompt's full blocks
enter the cache after every prefill chunk, so concurrent requests of one prefix share them. An idle
engine that receives a request may wait a few milliseconds for the rest of a burst
(`--burst-window-ms`), so requests sent together start in one step.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from pdlb.common.plurals import counted
from pdlb.engines.kv_events import KVEventLog
from pdlb.engines.request import (
    ABORT,
    LENGTH,
    PREFILL_DONE,
    STOP,
    AdmissionError,
    EngineLimits,
    Output,
    Sampled,
    Sequence,
    check_prompt,
    prompt_limit,
)
from pdlb.engines.room_waits import RoomWaits
from pdlb.engines.torch.cpu_binding import bind_current_team
from pdlb.engines.torch.eviction import DEFAULT_EVICTION, EvictionOrder
from pdlb.engines.torch.model import SeqChunk
from pdlb.engines.torch.prefix_cache import CacheNode, PrefixCache
from pdlb.engines.torch.runners import Runner, StepItem
from pdlb.engines.torch.step_fit import StepFit
from pdlb.v1 import common_pb2

BURST_QUIET_S = 0.002  # a burst has ended when no request arrived for this long
MAX_RELEASED_ROOMS = 10_000  # rooms whose held KV went (pulled or expired), remembered to answer at once


@dataclass
class HeldKV:
    """Prefill role: KV kept for a room until the decode side pulls it or it expires."""

    room: int
    request_id: str
    prompt: list[int]
    first_token: int
    slots: list[int]
    expires_at: float
    nodes: list[CacheNode] = field(default_factory=list)  # prefix-cache path kept locked meanwhile
    shared: int = 0  # leading slots that belong to the prefix cache

    @property
    def private_tokens(self) -> int:
        return len(self.slots) - self.shared


EWMA_WEIGHT = 0.1  # of the newest sample: about the last 10-20 steps


def _ewma(average: float, sample: float) -> float:
    return sample if average <= 0 else average + EWMA_WEIGHT * (sample - average)


def token_generator(seed: int, position: int) -> torch.Generator:
    """The generator that draws the token at `position` of a sampled sequence: one per token, so a
    sequence resumed anywhere (another rank, after a failure) continues the same draws."""
    mixed = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(mixed, "little") & (2**63 - 1))


def compute_thread(threads: int, bind_cpus: list[int] | None = None) -> ThreadPoolExecutor:
    """The thread that runs the model. On CPU it should be the only thread that ever runs parallel
    torch work: OpenMP keeps one team of workers per calling thread, and two teams spinning on the
    same cores made every decode step about 1.6x slower (measured on 2 cores). The count is set
    inside the thread because OpenMP's thread count is per OS thread. `bind_cpus` (one core per
    thread) binds that team there (cpu_binding.py); None or [] leaves it unbound."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="runner", initializer=_start_compute, initargs=(max(1, threads), bind_cpus)
    )


def _start_compute(threads: int, bind_cpus: list[int] | None) -> None:
    torch.set_num_threads(threads)
    if bind_cpus:
        bind_current_team(bind_cpus)


class Engine:
    kv_connector = ""  # PD: KV travels as tensors in pdlb's PullKV stream

    def __init__(
        self,
        runner: Runner,
        limits: EngineLimits,
        kv_hold_ttl_s: float = 60.0,
        page_size: int = 0,
        executor: ThreadPoolExecutor | None = None,
        eviction: str | EvictionOrder = DEFAULT_EVICTION,
    ) -> None:
        """`page_size` > 0 turns the prefix cache on, with blocks of that many tokens, evicted in
        the `eviction` order (eviction.py)."""
        self.runner, self.limits, self.kv_hold_ttl_s = runner, limits, kv_hold_ttl_s
        self.kv_events = KVEventLog() if page_size > 0 else None
        self.cache = PrefixCache(page_size, runner.release, self.kv_events, eviction) if page_size > 0 else None
        self.cache_hit_tokens = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}
        self.held: dict[int, HeldKV] = {}
        # Bootstrap room -> the request that owns it here (queued, running, or its KV held until
        # pulled): a second request with the room is refused, never allowed to replace the KV.
        self.rooms: dict[int, str] = {}
        self.released: OrderedDict[int, str] = OrderedDict()  # room -> what became of its held KV
        self.reserved = 0  # KV tokens promised to running requests and held rooms (beyond cache blocks)
        self.draining = False
        self.steps = 0
        self.step_s = 0.0  # measured, moving averages (see _measure)
        self.prefill_tokens_per_s = 0.0
        self.step_base_s = 0.0
        self.step_fit = StepFit()
        self.mean_output_tokens = 0.0
        self.prompt_tokens_total = 0
        # PD hand-off costs (seconds summed over requests; a token is one prompt position's K and V
        # of every layer): the prefill side's read of held KV off the device, the decode side's
        # receipt (first message to reassembled tensors) and its write into the pool
        self.kv_sent_tokens = 0
        self.kv_read_s = 0.0
        self.kv_received_tokens = 0
        self.kv_receive_s = 0.0
        self.kv_write_s = 0.0
        self.listeners: list[Callable[[], None]] = []
        self._work = asyncio.Event()
        self._arrived = asyncio.Event()  # set by every submit (the burst window listens)
        self.burst_quiet_s = BURST_QUIET_S
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._room_waits = RoomWaits()
        # One dedicated thread runs every step, so the event loop stays free to stream tokens and
        # reports while a step computes (see compute_thread for why it should be the only one).
        self._executor = executor or compute_thread(torch.get_num_threads())

    # admission ---------------------------------------------------------------------------------
    def check(self, seq: Sequence) -> None:
        """Raise AdmissionError for a request that can never run here."""
        config, limits = self.runner.config, self.limits
        if self.draining:
            raise AdmissionError(grpc.StatusCode.FAILED_PRECONDITION, "worker is shutting down; send it elsewhere")
        if seq.request_id in self.by_id:
            raise AdmissionError(grpc.StatusCode.ALREADY_EXISTS, f"request {seq.request_id} is already running here")
        owner = self.rooms.get(seq.bootstrap_room) if seq.bootstrap_room is not None else None
        if owner is not None:
            raise AdmissionError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request {seq.request_id}: bootstrap room {seq.bootstrap_room} is already taken here by request "
                f"{owner} (queued, running, or its KV held for its decode half); give every request a room of its own",
            )
        check_prompt(seq, config.vocab_size, limits.max_prompt_tokens, self.context_tokens)
        if seq.reserve > config.max_position:
            raise AdmissionError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {seq.request_id}: prompt + max_new_tokens = {seq.reserve} exceeds the model's "
                f"context of {config.max_position}",
            )
        if seq.reserve > limits.max_total_tokens:
            raise AdmissionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request {seq.request_id}: needs {seq.reserve} KV tokens, more than this worker's budget of "
                f"{limits.max_total_tokens} (--max-total-tokens)",
            )
        # Free batch slots count as room: a burst that arrives before the loop has moved anyone
        # into the batch is not refused while slots are free (the loop admits them next).
        free_slots = max(0, limits.max_running_requests - len(self.running))
        if len(self.waiting) >= limits.max_waiting_requests + free_slots:
            raise AdmissionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request {seq.request_id}: {counted(len(self.waiting), 'request')} already waiting; retry later",
            )

    def submit(self, seq: Sequence, wave: int | None = None) -> None:
        """Queue an admissible request (`wave`: its request wave, read by lockstep groups only)."""
        self.check(seq)
        self.by_id[seq.request_id] = seq
        if seq.bootstrap_room is not None:
            self.rooms[seq.bootstrap_room] = seq.request_id
        self.waiting.append(seq)
        self.prompt_tokens_total += len(seq.prompt)
        self._idle.clear()
        self._arrived.set()
        self._wake()

    def abort(self, request_id: str) -> bool:
        seq = self.by_id.get(request_id)
        if seq is None or seq.finish_reason is not None:
            return False
        seq.aborted = True
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._finish(seq, ABORT)
        self._wake()
        return True

    def _admit(self) -> None:
        limits = self.limits
        while self.waiting and len(self.running) < limits.max_running_requests:
            seq = self.waiting[0]
            path = self._cached_path(seq)
            need = seq.reserve - sum(len(node.slots) for node in path)
            locked = self.cache.locked_tokens + self.cache.unlocked_tokens(path) if self.cache else 0
            if self.reserved + need + locked > limits.max_total_tokens:
                break  # FIFO: the head waits for room, nobody overtakes it
            self.waiting.popleft()
            self.reserved += seq.reserve
            seq.reserved_tokens = seq.reserve
            self.running.append(seq)
            self._adopt_cached(seq, path)  # the cached part moves from the reservation to the cache
            if seq.preloaded is not None:
                self._load_preloaded(seq)

    def _cached_path(self, seq: Sequence) -> list[CacheNode]:
        if self.cache is None or seq.preloaded is not None:
            return []
        return self.cache.match(seq.prompt, len(seq.prompt) - 1)  # the last token is computed for its logits

    def _catch_up(self, seq: Sequence) -> None:
        """Before a request's first prefill chunk, take what others cached since its admission
        (requests of one prefix admitted together share the blocks the first one computes)."""
        if self.cache is None or seq.computed != seq.shared or len(seq.slots) != seq.shared:
            return
        self._adopt_cached(seq, self.cache.match(seq.prompt, len(seq.prompt) - 1))

    def _adopt_cached(self, seq: Sequence, path: list[CacheNode]) -> None:
        """Use the cached blocks of `path` beyond those the request holds (it has computed nothing
        past them): lock them, point its slots at them and skip their prefill."""
        more = path[len(seq.nodes) :]
        if not more:
            return
        assert self.cache is not None
        self.cache.lock(more)
        extra = sum(len(node.slots) for node in more)
        seq.nodes = path
        seq.slots.extend(slot for node in more for slot in node.slots)
        seq.shared += extra
        seq.computed += extra
        seq.cache_hit += extra
        seq.reserved_tokens -= extra
        self.reserved -= extra
        self.cache_hit_tokens += extra

    def _cache_prompt(self, seq: Sequence) -> None:
        """Hand the prompt's computed full blocks to the prefix cache (after every prefill chunk)."""
        if self.cache is None:
            return
        done = min(seq.computed, len(seq.prompt))
        full = done - done % self.cache.page_size
        if full <= seq.shared:
            return
        seq.nodes, duplicates = self.cache.insert(seq.prompt[:full], seq.slots, seq.nodes)
        if duplicates:
            self.runner.release(duplicates)
        moved = full - seq.shared
        seq.shared = full
        seq.reserved_tokens -= moved
        self.reserved -= moved

    def _allocate(self, n: int) -> list[int]:
        shortfall = n - self.runner.kv_free
        if shortfall > 0 and self.cache is not None:
            self.cache.evict(shortfall)
        return self.runner.allocate(n)

    def _load_preloaded(self, seq: Sequence) -> None:
        preloaded, seq.preloaded = seq.preloaded, None
        seq.slots = self._allocate(len(seq.prompt))
        started = time.perf_counter()
        self.runner.write_kv(seq.slots, preloaded.k, preloaded.v)
        self.kv_write_s += time.perf_counter() - started
        seq.computed = len(seq.prompt)
        self._cache_prompt(seq)
        self._emit(seq, preloaded.first_token)

    # the loop ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine")

    async def _run(self) -> None:
        while True:
            await self._work.wait()
            if self.waiting and not self.running:
                await self._gather_burst()
            self._reap_aborted()
            self._expire_held()
            self._admit()
            items = self._plan()
            if not items:
                self._work.clear()
                self._update_idle()
                continue
            started = time.perf_counter()
            tokens = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.runner.step, [item for _, item in items]
            )
            self.steps += 1
            self._measure(items, time.perf_counter() - started)
            self._apply(items, tokens)
            self._notify()

    async def _gather_burst(self) -> None:
        """Before an idle engine's first step: wait while requests keep arriving (each within
        `burst_quiet_s` of the last), until the waiting prompts fill a step or the burst window
        (limits.burst_window_s) has passed. Requests sent at once reach the loop one by one over a
        few milliseconds; without the wait the first one is stepped alone, and on a CPU that step
        (~0.4 s for 200 tokens of SmolLM2) delays every other request of the burst."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.burst_window_s
        while sum(len(s.prompt) - s.computed for s in self.waiting) < self.limits.chunked_prefill_size:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(self.burst_quiet_s, left))
            except asyncio.TimeoutError:
                return

    def _plan(self) -> list[tuple[Sequence, StepItem]]:
        budget = self.limits.chunked_prefill_size
        items = []
        for seq in self.running:
            if seq.computed < len(seq.prompt):
                if budget <= 0:
                    continue
                self._catch_up(seq)
                n = min(len(seq.prompt) - seq.computed, budget)
                budget -= n
                new = seq.prompt[seq.computed : seq.computed + n]
            else:
                new = [seq.output[-1]]
            self._grow(seq, seq.computed + len(new))
            done_prompt = seq.computed + len(new) >= len(seq.prompt)
            chunk = SeqChunk(new_tokens=new, start_pos=seq.computed, slots=seq.slots)
            items.append(
                (
                    seq,
                    StepItem(
                        chunk,
                        sample=done_prompt,
                        temperature=seq.temperature,
                        generator=token_generator(seq.seed, seq.seed_position + len(seq.output))
                        if done_prompt and seq.temperature > 0
                        else None,
                        config=seq.sampling,
                        prompt=seq.prompt,
                        output=seq.output,
                        banned=self._banned(seq) if done_prompt else frozenset(),
                    ),
                )
            )
        return items

    def _banned(self, seq: Sequence) -> frozenset[int]:
        """Tokens the next draw must not be: the stop tokens, while min_tokens is not reached."""
        if seq.seed_position + len(seq.output) >= seq.min_tokens:
            return frozenset()
        return seq.stop_ids if seq.ignore_eos else seq.stop_ids | {self.runner.eos_token_id}

    def _measure(self, items: list[tuple[Sequence, StepItem]], seconds: float, fit_tokens: int | None = None) -> None:
        """The step time (moving average) and the fitted line of step time against prefill tokens
        (`fit_tokens` when the step's length was set by other work, as a lockstep group's busiest
        rank), reported to dispatchers (the predicted-latency method converts queued work to time
        with them). Until the steps' sizes allow a fit, the prefill speed is the plain average."""
        self.step_s = _ewma(self.step_s, seconds)
        prefill = sum(len(item.chunk.new_tokens) for seq, item in items if seq.computed < len(seq.prompt))
        self.step_fit.add(prefill if fit_tokens is None else fit_tokens, seconds)
        line = self.step_fit.line()
        if line is not None:
            self.step_base_s, per_token = line
            self.prefill_tokens_per_s = 1.0 / per_token
        elif prefill and seconds > 0:
            self.prefill_tokens_per_s = _ewma(self.prefill_tokens_per_s, prefill / seconds)

    def _grow(self, seq: Sequence, length: int) -> None:
        if length > len(seq.slots):
            seq.slots.extend(self._allocate(length - len(seq.slots)))

    def _apply(self, items: list[tuple[Sequence, StepItem]], tokens: list[int | None]) -> None:
        for (seq, item), token in zip(items, tokens, strict=True):
            prefilling = seq.computed < len(seq.prompt)
            seq.computed += len(item.chunk.new_tokens)
            if prefilling and not seq.aborted:
                self._cache_prompt(seq)
            if token is not None and not seq.aborted:
                self._emit(seq, token, item.sampled)

    def _emit(self, seq: Sequence, token: int, sampled: Sampled | None = None) -> None:
        seq.output.append(token)
        reason = self._finish_reason(seq, token)
        logprobs = [sampled] if sampled is not None and seq.sampling and seq.sampling.logprobs is not None else []
        if reason is None:
            seq.outbox.put_nowait(Output([token], logprobs=logprobs))
            return
        self.running.remove(seq)
        if reason == PREFILL_DONE and seq.bootstrap_room is not None:
            self._hold(seq, token)
            seq.outbox.put_nowait(Output([token], reason, logprobs=logprobs))
            self._retire(seq, reason, keep_kv=True)
            return
        seq.outbox.put_nowait(Output([token], reason, logprobs=logprobs))
        self._retire(seq, reason)

    def _finish_reason(self, seq: Sequence, token: int) -> int | None:
        if seq.prefill_only:
            return PREFILL_DONE
        stops = seq.seed_position + len(seq.output) > seq.min_tokens
        if stops and (token in seq.stop_ids or (token == self.runner.eos_token_id and not seq.ignore_eos)):
            return STOP
        if len(seq.output) >= seq.max_new_tokens:
            return LENGTH
        return None

    def _reap_aborted(self) -> None:
        for seq in [s for s in self.running if s.aborted]:
            self.running.remove(seq)
            self._finish(seq, ABORT)

    def _finish(self, seq: Sequence, reason: int) -> None:
        seq.outbox.put_nowait(Output([], reason))
        self._retire(seq, reason)

    def _retire(self, seq: Sequence, reason: int, keep_kv: bool = False) -> None:
        """Finish a request; `keep_kv`: its slots and cache locks were handed over (held for PD)."""
        seq.finish_reason = reason
        if reason in (STOP, LENGTH):
            self.mean_output_tokens = _ewma(self.mean_output_tokens, float(len(seq.output)))
        self.reserved -= seq.reserved_tokens
        seq.reserved_tokens = 0
        if not keep_kv:
            self._release_kv(seq.slots, seq.shared, seq.nodes)
            self._release_room(seq.bootstrap_room, seq.request_id)
        seq.slots, seq.nodes = [], []
        self.by_id.pop(seq.request_id, None)
        self._wake()

    def _release_room(self, room: int | None, request_id: str) -> None:
        if room is not None and self.rooms.get(room) == request_id:
            del self.rooms[room]

    def _release_kv(self, slots: list[int], shared: int, nodes: list[CacheNode]) -> None:
        if len(slots) > shared:
            self.runner.release(slots[shared:])
        if nodes and self.cache is not None:
            self.cache.unlock(nodes)

    # held KV (prefill role) ------------------------------------------------------------------
    def _hold(self, seq: Sequence, first_token: int) -> None:
        room = seq.bootstrap_room
        assert room is not None and room not in self.held  # admission refused a second owner of the room
        self.released.pop(room, None)
        prompt_slots = seq.slots[: len(seq.prompt)]
        extra = seq.slots[len(seq.prompt) :]
        if extra:
            self.runner.release(extra)
        held = HeldKV(
            room,
            seq.request_id,
            seq.prompt,
            first_token,
            prompt_slots,
            time.monotonic() + self.kv_hold_ttl_s,
            nodes=seq.nodes,
            shared=seq.shared,
        )
        self.held[room] = held
        self.reserved += held.private_tokens
        asyncio.get_running_loop().call_later(self.kv_hold_ttl_s, self._wake)  # so expiry runs when idle
        self._room_waits.held(room)

    async def wait_held(self, room: int, timeout: float) -> HeldKV | None:
        """Take a room's KV, waiting up to `timeout` for its prefill to finish here; None when the
        wait ran out. Raises AdmissionError(NOT_FOUND) at once when the room's KV was here and is
        gone (pulled by another request, or expired): waiting could never bring it back."""
        return await self._room_waits.take(room, timeout, self.take_held, self._raise_if_released)

    def _raise_if_released(self, room: int) -> None:
        what = self.released.get(room)
        if what is not None and room not in self.rooms:
            raise AdmissionError(grpc.StatusCode.NOT_FOUND, f"room {room}: the KV held here for it was {what}")

    async def read_held(self, held: HeldKV) -> tuple[torch.Tensor, torch.Tensor]:
        """The held KV, read off the device on the runner thread: not on the event loop (a long
        prompt's KV takes tens of milliseconds to read, which would hold up every stream of this
        worker), and not on a thread of its own (a second thread running torch work brings its own
        OpenMP team onto the runner's cores; see compute_thread)."""
        started = time.perf_counter()
        k, v = await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.read_kv, held.slots)
        self.kv_read_s += time.perf_counter() - started
        self.kv_sent_tokens += len(held.slots)
        return k, v

    def take_held(self, room: int) -> HeldKV | None:
        """Hand a room's KV to a transfer; the caller must `free_held` it afterwards."""
        self._expire_held()
        return self.held.pop(room, None)

    def free_held(self, held: HeldKV) -> None:
        self._free_held(held, "already pulled (taken by a PullKV call)")
        self._notify()

    def _free_held(self, held: HeldKV, what: str) -> None:
        self.reserved -= held.private_tokens
        self._release_kv(held.slots, held.shared, held.nodes)
        held.slots, held.nodes, held.shared = [], [], 0
        self._release_room(held.room, held.request_id)
        self.released[held.room] = f"{what}; it belonged to request {held.request_id}"
        self.released.move_to_end(held.room)
        while len(self.released) > MAX_RELEASED_ROOMS:
            self.released.popitem(last=False)
        self._wake()

    def _expire_held(self) -> None:
        now = time.monotonic()
        for room in [r for r, h in self.held.items() if h.expires_at <= now]:
            what = f"not pulled within {self.kv_hold_ttl_s:g} s and freed (--kv-hold-ttl)"
            self._free_held(self.held.pop(room), what)

    # state ---------------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._work.set()
        self._notify()

    def _update_idle(self) -> None:
        if not self.waiting and not self.running:
            self._idle.set()

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    @property
    def context_tokens(self) -> int:
        """The most prompt + new tokens one request may hold here: the model's context, within the KV budget."""
        return min(self.runner.config.max_position, self.limits.max_total_tokens)

    def load(self) -> common_pb2.WorkerLoad:
        return common_pb2.WorkerLoad(
            running_requests=len(self.running),
            waiting_requests=len(self.waiting),
            running_tokens=sum(s.context_len for s in self.running),
            waiting_tokens=sum(len(s.prompt) for s in self.waiting),
            kv_tokens_used=self.runner.kv_used,
            kv_tokens_evictable=self.cache.evictable_tokens if self.cache else 0,
            kv_tokens_capacity=self.limits.max_total_tokens,
            prompt_tokens_total=self.prompt_tokens_total,
            cache_hit_tokens=self.cache_hit_tokens,
            max_running_requests=self.limits.max_running_requests,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            step_ms=self.step_s * 1000,
            mean_output_tokens=self.mean_output_tokens,
            prefill_pending_tokens=sum(len(s.prompt) - s.computed for s in self.waiting)
            + sum(len(s.prompt) - s.computed for s in self.running if s.computed < len(s.prompt)),
            step_base_ms=self.step_base_s * 1000,
            prefill_tokens_per_step=self.limits.chunked_prefill_size,
            max_prompt_tokens=prompt_limit(self.limits.max_prompt_tokens, self.context_tokens),
            max_context_tokens=self.context_tokens,
        )

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let the admitted ones finish for up to `timeout`, abort the rest."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            for seq in list(self.by_id.values()):
                self.abort(seq.request_id)
            await asyncio.wait_for(self._idle.wait(), 30)

    async def _stop_loop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def close(self) -> None:
        await self._stop_loop()
        for held in list(self.held.values()):
            self._free_held(held, "freed at shutdown")
        self.held.clear()
        self._executor.shutdown(wait=True)
