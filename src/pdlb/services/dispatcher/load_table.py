"""The dispatcher's view of every worker's load: reported load plus exact in-flight accounting.

Each dispatch to a worker gets a sequence number and is kept as in flight. A worker's report
carries the highest sequence it has received from this dispatcher; the report's load already
includes those requests, so in-flight entries up to that sequence are dropped and the reported load
replaces the old one. Entries after it stay counted, so a late report never forgets a request in
flight. A report whose acknowledged sequence is lower than one already applied is stale and ignored.

Sequence numbers come from one counter of the whole table, never reset: a worker that leaves the
table (its lease expired while it was paused, say) and rejoins under the same id still acknowledges
the numbers it received before, and those must never cover a dispatch made after the rejoin.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pdlb.common.plurals import counted

STATE_CHECK_S = 0.05
MAX_GONE_COUNTS = 4096  # dispatch counts of departed workers kept for a rejoin (ids come from etcd keys)


class Role(str, Enum):
    MIXED = "mixed"
    PREFILL = "prefill"
    DECODE = "decode"


class MemberState(str, Enum):
    LIVE = "live"
    STALE = "stale"
    GONE = "gone"


@dataclass(frozen=True)
class Worker:
    worker_id: str
    role: Role
    dp_rank: int
    address: str
    model: str = ""  # the model id it advertises; empty: unknown


@dataclass
class ReportedLoad:
    running_requests: int = 0
    waiting_requests: int = 0
    running_tokens: int = 0
    waiting_tokens: int = 0
    kv_tokens_used: int = 0
    kv_tokens_capacity: int = 0
    cache_hit_tokens: int = 0
    prompt_tokens_total: int = 0
    max_running_requests: int = 0
    kv_tokens_evictable: int = 0
    prefill_tokens_per_s: float = 0.0
    step_ms: float = 0.0
    mean_output_tokens: float = 0.0
    prefill_pending_tokens: int = 0
    step_base_ms: float = 0.0
    prefill_tokens_per_step: int = 0
    max_prompt_tokens: int = 0  # the worker's length limits, passed on to the gateway (0: unknown)
    max_context_tokens: int = 0


@dataclass
class InFlight:
    tokens: int
    expires_at: float


@dataclass(eq=False)
class WorkerEntry:
    """One worker's row: membership, last report and requests in flight to it.

    The effective loads that policies compare (`total_requests`, `total_tokens`, `kv_ratio`) are
    plain attributes recomputed on every change of this row, so a decision reads them at C speed.
    """

    worker: Worker
    reported: ReportedLoad = field(default_factory=ReportedLoad)
    incarnation: str = ""
    acked_seq: int = 0
    next_seq: int = 0  # the sequence of the last dispatch to this worker (from the table's counter)
    inflight: OrderedDict[int, InFlight] = field(default_factory=OrderedDict)
    inflight_tokens: int = 0
    last_report_at: float | None = None
    registered_at: float = 0.0
    dispatched_total: int = 0
    state: MemberState = MemberState.LIVE
    total_requests: int = 0
    total_tokens: int = 0
    kv_ratio: float = 0.0
    kv_free: int = 0
    slot_excess: int = 0
    queued_tokens: int = 0
    # Requests this dispatcher saw end on the worker since its last report (which still counts them
    # as running): their batch slots are free now, a report interval before the worker says so.
    finished_unreported: int = 0
    # What the table's policy derives from this row and keeps with it (predicted_latency: its
    # prediction's coefficients), so a decision over any subset of the ranks reads it at C speed;
    # None after every change of the row (recount), so it is derived afresh when next read.
    policy_state: Any = None

    @property
    def dp_rank(self) -> int:
        return self.worker.dp_rank

    @property
    def inflight_requests(self) -> int:
        return len(self.inflight)

    @property
    def kv_used(self) -> int:
        """KV tokens in use (less the evictable prefix cache) plus those in-flight requests will need."""
        return self.reported.kv_tokens_used - self.reported.kv_tokens_evictable + self.inflight_tokens

    def recount(self) -> None:
        self.policy_state = None
        r = self.reported
        running = max(0, r.running_requests - self.finished_unreported)
        self.total_requests = running + r.waiting_requests + len(self.inflight)
        self.total_tokens = r.running_tokens + r.waiting_tokens + self.inflight_tokens
        # Prompt work not done yet: what the worker still has to prefill (a worker too old to say
        # reports only its waiting prompts) and what was sent to it since its report.
        self.queued_tokens = max(r.prefill_pending_tokens, r.waiting_tokens) + self.inflight_tokens
        capacity = r.kv_tokens_capacity
        self.kv_free = capacity - self.kv_used
        # Requests that would queue for a batch slot ahead of (and including) one more request.
        free_slots = max(0, r.max_running_requests - running)
        self.slot_excess = max(0, r.waiting_requests + len(self.inflight) + 1 - free_slots)
        # Not reported yet: rank it after every reported worker, by what was sent to it.
        self.kv_ratio = self.kv_used / capacity if capacity > 0 else 1.0 + self.inflight_tokens

    def drop_through(self, seq: int) -> None:
        while self.inflight:
            first_seq = next(iter(self.inflight))
            if first_seq > seq:
                break
            self.inflight_tokens -= self.inflight.popitem(last=False)[1].tokens
        self.recount()


class UnknownWorker(KeyError):
    pass


class LoadTable:
    """Workers of one role keyed by id, with their load. Not thread-safe: one asyncio loop owns it."""

    def __init__(
        self,
        inflight_timeout_s: float = 60.0,
        stale_after_s: float = 5.0,
        max_inflight_per_worker: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inflight_timeout_s = inflight_timeout_s
        self.stale_after_s = stale_after_s
        self.max_inflight_per_worker = max_inflight_per_worker
        self.clock = clock
        self.entries: dict[str, WorkerEntry] = {}
        self._members_version = 0  # bumped when membership or a state changes
        # bumped when a report changes a worker's batch size, prefill chunk or KV capacity: what
        # flow control sums over the ranks to size each tenant's share of the room
        self.capacity_version = 0
        self._candidates: list[WorkerEntry] = []
        self._candidates_version = -1
        self._states_checked_at = float("-inf")
        self._last_seq = 0  # the table's dispatch counter: never reset, not even when a worker rejoins
        # Dispatch counts of workers that left, by id: one that rejoins keeps counting from there
        # (dispatched_total means since this dispatcher started). Oldest dropped past the bound.
        self._gone_dispatched: OrderedDict[str, int] = OrderedDict()

    # membership ------------------------------------------------------------------------------
    def upsert(self, worker: Worker) -> WorkerEntry:
        entry = self.entries.get(worker.worker_id)
        if entry is None or entry.worker != worker:
            previous = entry
            entry = WorkerEntry(worker=worker, registered_at=self.clock())
            if previous is not None:  # same id, new address or rank
                entry.next_seq = previous.next_seq
                entry.dispatched_total = previous.dispatched_total
            else:
                entry.dispatched_total = self._gone_dispatched.pop(worker.worker_id, 0)
            self.entries[worker.worker_id] = entry
        entry.state = MemberState.LIVE
        self._changed_members()
        return entry

    def remove(self, worker_id: str) -> WorkerEntry | None:
        entry = self.entries.pop(worker_id, None)
        if entry is not None:
            entry.state = MemberState.GONE
            if entry.dispatched_total:
                self._gone_dispatched[worker_id] = entry.dispatched_total
                while len(self._gone_dispatched) > MAX_GONE_COUNTS:
                    self._gone_dispatched.popitem(last=False)
            self._changed_members()
        return entry

    def get(self, worker_id: str) -> WorkerEntry:
        try:
            return self.entries[worker_id]
        except KeyError:
            raise UnknownWorker(worker_id) from None

    # load ------------------------------------------------------------------------------------
    def apply_report(self, worker_id: str, load: ReportedLoad, acked_seq: int, incarnation: str = "") -> bool:
        """Set the worker's load from a report. Returns False when the report was stale and ignored."""
        entry = self.get(worker_id)
        if incarnation != entry.incarnation:
            # A restarted worker acknowledges afresh; what it never received is cancelled by the
            # forwarder's error path or expires by the in-flight timeout.
            entry.incarnation = incarnation
            entry.acked_seq = 0
        elif acked_seq < entry.acked_seq:
            return False
        entry.acked_seq = acked_seq
        entry.finished_unreported = 0  # the report counts what ended before it
        entry.drop_through(acked_seq)
        old = entry.reported
        if (old.max_running_requests, old.prefill_tokens_per_step, old.kv_tokens_capacity) != (
            load.max_running_requests,
            load.prefill_tokens_per_step,
            load.kv_tokens_capacity,
        ):
            self.capacity_version += 1
        entry.reported = load
        entry.last_report_at = self.clock()
        entry.recount()
        if entry.state is MemberState.STALE:
            entry.state = MemberState.LIVE
            self._changed_members()
        return True

    def record_dispatch(self, worker_id: str, tokens: int) -> int:
        """Count one request of `tokens` prompt tokens as in flight; returns its sequence number."""
        entry = self.get(worker_id)
        self._expire(entry)
        if len(entry.inflight) >= self.max_inflight_per_worker:
            raise OverflowError(
                f"worker {worker_id} has {counted(len(entry.inflight), 'unacknowledged request')}; it is not reporting"
            )
        self._last_seq += 1
        entry.next_seq = self._last_seq
        entry.inflight[entry.next_seq] = InFlight(tokens, self.clock() + self.inflight_timeout_s)
        entry.inflight_tokens += tokens
        entry.dispatched_total += 1
        entry.recount()
        return entry.next_seq

    def record_finish(self, worker_id: str, seq: int) -> None:
        """A request the worker received has ended (its stream closed): unacknowledged, it is no
        longer in flight; acknowledged, its report's running count is one too high until the next."""
        entry = self.entries.get(worker_id)
        if entry is None:
            return
        item = entry.inflight.pop(seq, None)
        if item is not None:
            entry.inflight_tokens -= item.tokens
        elif entry.finished_unreported < entry.reported.running_requests:
            entry.finished_unreported += 1
        entry.recount()

    def cancel_dispatch(self, worker_id: str, seq: int) -> None:
        """Forget an in-flight request the worker never received (forwarding failed)."""
        entry = self.entries.get(worker_id)
        if entry is None:
            return
        item = entry.inflight.pop(seq, None)
        if item is not None:
            entry.inflight_tokens -= item.tokens
            entry.recount()

    def _expire(self, entry: WorkerEntry) -> None:
        now = self.clock()
        while entry.inflight:
            item = next(iter(entry.inflight.values()))
            if item.expires_at > now:
                break
            entry.inflight.popitem(last=False)
            entry.inflight_tokens -= item.tokens
            entry.recount()

    def refresh_states(self) -> None:
        """Mark workers without a recent report STALE (and back to LIVE when they report)."""
        now = self.clock()
        for entry in self.entries.values():
            self._expire(entry)
            # A worker that never reported counts from its registration.
            seen_at = entry.last_report_at if entry.last_report_at is not None else entry.registered_at
            silent = now - seen_at > self.stale_after_s
            if silent and entry.state is MemberState.LIVE:
                entry.state = MemberState.STALE
                self._changed_members()
        self._states_checked_at = now

    # selection helpers ---------------------------------------------------------------------------
    def _changed_members(self) -> None:
        self._members_version += 1

    def candidates(self) -> list[WorkerEntry]:
        """One worker per DP rank, ordered by rank: LIVE preferred over STALE, then the most
        recently reporting. If no rank has a LIVE worker, STALE ones are returned so requests
        still flow. Cached until membership or a state changes; states are re-checked at most
        every STATE_CHECK_S so a decision stays O(1) in the common case."""
        if self.clock() - self._states_checked_at >= STATE_CHECK_S:
            self.refresh_states()
        if self._candidates_version != self._members_version:
            self._candidates = self._build_candidates()
            self._candidates_version = self._members_version
        return self._candidates

    def _build_candidates(self) -> list[WorkerEntry]:
        by_rank: dict[int, WorkerEntry] = {}
        for entry in self.entries.values():
            best = by_rank.get(entry.dp_rank)
            if best is None or _preference(entry) > _preference(best):
                by_rank[entry.dp_rank] = entry
        ranked = [by_rank[r] for r in sorted(by_rank)]
        live = [e for e in ranked if e.state is MemberState.LIVE]
        return live or ranked

    def for_rank(self, dp_rank: int) -> WorkerEntry | None:
        for entry in self.candidates():
            if entry.dp_rank == dp_rank:
                return entry
        return None

    def addresses(self) -> set[str]:
        """Addresses of the workers in the table (their channels must stay open)."""
        return {entry.worker.address for entry in self.entries.values()}

    def ordered(self) -> Iterable[WorkerEntry]:
        return sorted(self.entries.values(), key=lambda e: (e.dp_rank, e.worker.worker_id))


def _preference(entry: WorkerEntry) -> tuple[int, float]:
    return (1 if entry.state is MemberState.LIVE else 0, entry.registered_at)
