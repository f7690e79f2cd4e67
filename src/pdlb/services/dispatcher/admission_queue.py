"""The dispatcher's queue of requests held until a rank has room: pure ordering, no I/O.

Order, in the field's terms:
- **priority first** (vLLM's convention: a lower value is served earlier; 0 by default): the head is
  always a request of the best priority present, whatever its tenant;
- **weighted fair sharing across tenants** within that priority: deficit round robin over prompt
  tokens (each visit adds `quantum * weight` tokens of credit to a tenant; its head is served when
  its credit covers the head's prompt), so a tenant that floods the queue gets its weight's share
  and no more while others wait;
- **deadline within a tenant** (earliest TTFT due time first, then arrival).

Bounded: at most `capacity` requests; the tenant map only holds tenants with queued requests (a
tenant's credit is dropped when its queue empties, as DRR does), so it is bounded by `capacity`
and by `max_tenants`. Tenants are keyed by `tenant_key` (tenant_key.py: names cut to
`MAX_TENANT_CHARS`, tenants past `max_tenants` queued as the overflow class "").

When full, an arriving request displaces the queued request of the worst priority if that is worse
than its own (the newest of them: the oldest has waited longest). Failing that, fair share decides
within its priority: if its tenant holds fewer queued requests than its weighted share of the queue
(`capacity * w / sum of the weights of the tenants queued, its own included`), it displaces the
newest request of its priority of the tenant most over its share, so a tenant flooding a full queue
cannot lock the others out. Otherwise it is refused. Finding the request to displace is
O(tenants): each tenant keeps its requests in a second heap, worst priority then newest first.
Callers fail the displaced or refused request with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pdlb.common.plurals import counted
from pdlb.services.dispatcher.tenant_key import tenant_key

DEFAULT_QUANTUM_TOKENS = 2048


class QueueFull(Exception):
    """No room in the queue, no queued request of a worse priority to displace, and the arriving
    request's tenant already holds its fair share of the queue (or no tenant is over its own)."""


@dataclass(eq=False)
class Waiter:
    """One queued request.

    priority: lower is served earlier (vLLM). deadline_at / expires_at: monotonic seconds (inf: none);
    expires_at is when the request stops waiting (its TTL or its deadline, whichever is first).
    tokens: prompt tokens (the DRR cost). payload: what the caller needs back (context, future).
    """

    request_id: str
    priority: int
    tenant: str
    tokens: int
    enqueued_at: float
    deadline_at: float = math.inf
    expires_at: float = math.inf
    payload: Any = None
    seq: int = 0
    queued: bool = field(default=False, repr=False)

    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.deadline_at, self.seq)


@dataclass
class _Tenant:
    weight: float
    heap: list[tuple[tuple[int, float, int], Waiter]] = field(default_factory=list)
    # The same requests, the one to displace first on top: worst priority, then newest.
    worst_heap: list[tuple[tuple[int, int], Waiter]] = field(default_factory=list)
    size: int = 0
    credit: float = 0.0

    def push(self, waiter: Waiter) -> None:
        heapq.heappush(self.heap, (waiter.sort_key(), waiter))
        heapq.heappush(self.worst_heap, ((-waiter.priority, -waiter.seq), waiter))
        self.size += 1

    def head(self) -> Waiter | None:
        while self.heap and not self.heap[0][1].queued:
            heapq.heappop(self.heap)  # removed earlier (cancelled, expired, displaced)
        return self.heap[0][1] if self.heap else None

    def worst(self) -> Waiter | None:
        """Its request to displace first: the worst priority, the newest of those."""
        while self.worst_heap and not self.worst_heap[0][1].queued:
            heapq.heappop(self.worst_heap)
        return self.worst_heap[0][1] if self.worst_heap else None

    def compact(self) -> None:
        """Drop removed requests once they outnumber the queued ones (removal is lazy: a request
        served from one heap's top may sit deep in the other), so each heap stays within 2x + 16."""
        for heap in (self.heap, self.worst_heap):
            if len(heap) > 2 * self.size + 16:
                heap[:] = [entry for entry in heap if entry[1].queued]
                heapq.heapify(heap)


class AdmissionQueue:
    """Requests waiting for room, ordered by priority, tenant share (DRR over prompt tokens) and
    deadline. Not thread-safe: one asyncio loop owns it.

    capacity: most queued requests. quantum_tokens: DRR credit per visit at weight 1. weights:
    tenant -> weight (others get `default_weight`). max_tenants: most tenants with queued requests;
    requests of further tenants share the tenant "" (the overflow class).
    """

    def __init__(
        self,
        capacity: int = 1024,
        quantum_tokens: int = DEFAULT_QUANTUM_TOKENS,
        weights: dict[str, float] | None = None,
        default_weight: float = 1.0,
        max_tenants: int = 1024,
    ) -> None:
        if capacity < 1 or quantum_tokens < 1 or max_tenants < 1 or default_weight <= 0:
            raise ValueError("capacity, quantum_tokens, max_tenants and default_weight must be positive")
        self.capacity = capacity
        self.quantum = quantum_tokens
        self.weights = dict(weights or {})
        self.default_weight = default_weight
        self.max_tenants = max_tenants
        self.size = 0
        self.tokens = 0
        # Tenants with queued requests, in round-robin order; the first is the one being visited.
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return self.size

    @property
    def tenants(self) -> int:
        return len(self._tenants)

    def tenant_key(self, tenant: str) -> str:
        """The key `tenant` is queued under (`tenant_key`: its cut name, or "" once `max_tenants`
        other tenants are queued)."""
        return tenant_key(tenant, self._tenants, self.max_tenants)

    def push(self, waiter: Waiter) -> Waiter | None:
        """Queue `waiter`; returns the request it displaced (the caller fails it), if any.

        Raises QueueFull when the queue is full of requests of its priority or better and its
        tenant holds its fair share of the queue already (or no other tenant is over its share).
        """
        waiter.tenant = self.tenant_key(waiter.tenant)
        displaced = None
        if self.size >= self.capacity:
            worst = self._worst()
            if worst is not None and worst.priority > waiter.priority:
                displaced = worst
            else:
                displaced = self._over_share_victim(waiter)
                if displaced is None:
                    raise QueueFull(
                        f"{counted(self.size, 'request')} {'is' if self.size == 1 else 'are'} queued (the bound), "
                        "none of lower priority, and "
                        + (
                            f"tenant {waiter.tenant!r} holds its fair share of the queue"
                            if waiter.tenant
                            else "requests without a tenant hold their fair share of the queue"
                        )
                    )
            self.remove(displaced)
            # Its tenant's entry may have just been dropped: the key is taken again below.
            waiter.tenant = self.tenant_key(waiter.tenant)
        tenant = self._tenants.get(waiter.tenant)
        if tenant is None:
            tenant = self._tenants[waiter.tenant] = _Tenant(self.weight(waiter.tenant))
        waiter.seq = next(self._seq)
        waiter.queued = True
        tenant.push(waiter)
        tenant.compact()
        self.size += 1
        self.tokens += waiter.tokens
        return displaced

    def remove(self, waiter: Waiter) -> bool:
        """Take `waiter` out (cancelled, expired, displaced); False when it was not queued."""
        if not waiter.queued:
            return False
        waiter.queued = False
        tenant = self._tenants[waiter.tenant]
        tenant.size -= 1
        self.size -= 1
        self.tokens -= waiter.tokens
        if tenant.size == 0:
            del self._tenants[waiter.tenant]  # DRR: an idle tenant keeps no credit
        else:
            tenant.compact()
        return True

    def tenant_names(self) -> list[str]:
        """The keys of the tenants with queued requests."""
        return list(self._tenants)

    def peek(self, skip: set[str] | frozenset[str] = frozenset()) -> Waiter | None:
        """The request to serve next (it stays queued until `pop`), ignoring the tenants in `skip`
        (held past their share). Advances the DRR round as needed, so calling it again without a
        pop returns the same request."""
        if not self.size:
            return None
        heads = [(name, t, t.head()) for name, t in self._tenants.items() if name not in skip]
        if not any(w is not None for _, _, w in heads):
            return None
        best = min(w.priority for _, _, w in heads if w is not None)
        eligible = [(name, t, w) for name, t, w in heads if w is not None and w.priority == best]
        # The first eligible tenant in round order whose credit covers its head is served; if none,
        # whole rounds are added at once: each tenant needs ceil(shortfall / (quantum * weight)).
        for _, t, w in eligible:
            if t.credit >= w.tokens:
                return w
        rounds = min(math.ceil((w.tokens - t.credit) / (self.quantum * t.weight)) for _, t, w in eligible)
        for _, t, _ in eligible:
            t.credit += rounds * self.quantum * t.weight
        for name, t, w in eligible:
            if t.credit >= w.tokens:
                self._tenants.move_to_end(name, last=False)  # the round continues from this tenant
                return w
        raise AssertionError("unreachable: some tenant's credit covers its head after the added rounds")

    def pop(self, waiter: Waiter) -> None:
        """Serve `waiter` (what `peek` returned): charge its tenant and move the round on when the
        tenant's credit is spent."""
        name = waiter.tenant
        tenant = self._tenants[name]
        tenant.credit -= waiter.tokens
        self.remove(waiter)
        if name in self._tenants:
            nxt = tenant.head()
            if nxt is None or tenant.credit < nxt.tokens:
                self._tenants.move_to_end(name)  # its turn is over: the next tenant's round begins

    def __iter__(self) -> Iterator[Waiter]:
        for tenant in list(self._tenants.values()):
            for _, waiter in list(tenant.heap):
                if waiter.queued:
                    yield waiter

    def _worst(self) -> Waiter | None:
        """The queued request to displace first: the worst priority, the newest of those. O(tenants)."""
        worst = None
        for tenant in self._tenants.values():
            waiter = tenant.worst()
            if waiter is not None and (worst is None or (waiter.priority, waiter.seq) > (worst.priority, worst.seq)):
                worst = waiter
        return worst

    def weight(self, key: str) -> float:
        return self.weights.get(key, self.default_weight)

    def _over_share_victim(self, waiter: Waiter) -> Waiter | None:
        """With the queue full of requests no worse than `waiter`'s priority: the request it
        displaces by fair share, or None. Its tenant must hold fewer queued requests than its
        weighted share of the queue; the victim is the newest request of `waiter`'s priority of
        the tenant most over its share (requests per weight). O(tenants)."""
        mine = self._tenants.get(waiter.tenant)
        held = mine.size if mine is not None else 0
        total_weight = sum(t.weight for t in self._tenants.values()) + (0.0 if mine else self.weight(waiter.tenant))
        if held >= self.capacity * self.weight(waiter.tenant) / total_weight:
            return None  # its tenant holds its share already
        victim, most = None, 0.0
        for name, tenant in self._tenants.items():
            if name == waiter.tenant or tenant.size <= self.capacity * tenant.weight / total_weight:
                continue  # not over its share
            candidate = tenant.worst()
            if candidate is None or candidate.priority != waiter.priority:
                continue  # only requests of better priority: not displaced by this one
            if tenant.size / tenant.weight > most:
                victim, most = candidate, tenant.size / tenant.weight
        return victim
