"""Each tenant's share of the cluster's room: pure bookkeeping, no I/O.

Fair queue order (the admission queue's deficit round robin) decides who is bound next, but not how
much of the cluster a tenant holds once bound: a tenant that floods fills every free batch slot as
it frees, and another tenant's requests then run in steps loaded with the flood's prefills and
decodes. So, while other tenants are active, a tenant may hold at most its weighted share of the
cluster's room on the ranks; past it, its requests wait in the dispatcher's queue (where the TTL
sheds them) while other tenants' requests are bound at once. This is the per-flow capacity of
llm-d's flow control and the per-class share of Dynamo's router, applied to what a tenant has in
flight rather than to its queue.

- **Share**: `scale * w / (w + sum of the other active tenants' weights)` of the cluster's room,
  summed over the live ranks: its batch slots (requests in flight), and its prompt-token room
  (`Room.tokens`: on mixed and prefill ranks the prefill work flow control lets queue, counted
  until the request's first token, since co-scheduled prefill chunks are what slow another
  tenant's first token; on decode ranks the KV capacity, counted until the request ends).
- **Active**: a tenant with requests queued, or in flight here, or whose last request ended within
  `active_window_s` (a steady tenant between two requests still counts, so the flood does not take
  its room in the gap).
- A tenant alone, or holding nothing yet, is never held: one request in flight is always allowed, so
  a tiny share cannot starve a tenant.
- **Lending** (`lend`, work-conserving; lending.py): a tenant past its share is still bound while the
  room left free after it (the room less what every tenant holds here) covers each other active
  tenant's headroom, at most its unused share: of the batch slots, its recent peak in flight plus
  `lend_headroom` requests, less what it holds; of the prompt-token room, `lend_headroom` prompts of
  its mean size (prompt room frees within a prefill step, so a peak over seconds would idle it).
  So room another tenant leaves unused is lent instead of idling, its arrivals up to that headroom
  bind at once, and past it it gets its share back as lent requests end (nothing is preempted).
  Without `lend` the share is a hard reserve.

Counts only what this dispatcher bound (replicas each keep their own). Bounded: tenants are keyed
by `tenant_key` (tenant_key.py), the admission queue's rule: at most `max_tenants` tenants are
tracked apart and further ones share the overflow key "", which is counted and capped as one
tenant; a tenant's entry is dropped once it holds nothing and its window has passed.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pdlb.services.dispatcher.lending import RecentPeak, headroom
from pdlb.services.dispatcher.tenant_key import MAX_TENANT_CHARS, tenant_key

DEFAULT_ACTIVE_WINDOW_S = 2.0
PROMPT_MEAN_WEIGHT = 0.1  # weight of each new prompt in a tenant's moving mean prompt size


@dataclass
class _Use:
    requests: int = 0
    tokens: int = 0
    last_end: float = float("-inf")  # monotonic seconds its last request ended
    peak_requests: RecentPeak = field(default_factory=RecentPeak)  # recent peak of `requests`
    mean_prompt: float = 0.0  # moving mean of its prompts' tokens (0: none bound yet)


@dataclass(frozen=True)
class Room:
    """The cluster's room a share is taken of, summed over live ranks: batch slots, and prompt
    tokens (prefill work or KV, see the module doc); 0: not reported, that part is not capped.
    ranks: how many ranks it sums (a tenant with no prompt seen yet is kept one rank's worth)."""

    requests: int = 0
    tokens: int = 0
    ranks: int = 1


class Verdict(enum.Enum):
    """What binding one more request of a tenant would do to the shares."""

    WITHIN = "within"  # within its share (or no share applies): bind it
    LENT = "lent"  # past its share, on room the other tenants leave unused: bind it
    HELD = "held"  # past its share, and the others' headroom needs the rest: hold it


class TenantShares:
    """Per-tenant requests and prompt tokens in flight, and whether a tenant is past its share.

    weights: tenant -> weight (others `default_weight`). scale: the share's multiplier (<= 0: no
    cap at all; > 1 lets a tenant exceed its even share). active_window_s: seconds a tenant stays
    active after its last request ended. lend: lend room other tenants leave unused (module doc),
    keeping each one's headroom of `lend_headroom` requests beyond its recent peak in flight (and
    as many prompts of prompt-token room). Not thread-safe: one asyncio loop owns it.
    """

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        default_weight: float = 1.0,
        scale: float = 1.0,
        active_window_s: float = DEFAULT_ACTIVE_WINDOW_S,
        max_tenants: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        lend: bool = False,
        lend_headroom: float = 1.0,
    ) -> None:
        if default_weight <= 0 or max_tenants < 1 or active_window_s < 0 or lend_headroom < 0:
            raise ValueError("default_weight and max_tenants must be positive, active_window_s and lend_headroom >= 0")
        self.weights = dict(weights or {})
        self.default_weight, self.scale = default_weight, scale
        self.active_window_s, self.max_tenants, self.clock = active_window_s, max_tenants, clock
        self.lend, self.lend_headroom = lend, lend_headroom
        self._use: dict[str, _Use] = {}
        self._leases: dict[str, list] = {}  # request id -> [tenant key, tokens still counted]
        self.requests = 0  # requests in flight here, all tenants
        self.tokens = 0  # prompt tokens still counted, all tenants
        self.held_total = 0  # times a request was held because its tenant was past its share
        self.lent_total = 0  # requests bound past their tenant's share on room lent by the others

    @property
    def enabled(self) -> bool:
        return self.scale > 0

    def key(self, tenant: str) -> str:
        """The key `tenant` is counted and capped under (`tenant_key`: its cut name, or "" while
        `max_tenants` other tenants are tracked)."""
        key = tenant_key(tenant, self._use, self.max_tenants)
        if key != tenant[:MAX_TENANT_CHARS]:  # the map is full: idle tenants' entries may free room
            self._drop_idle()
            key = tenant_key(tenant, self._use, self.max_tenants)
        return key

    def weight(self, key: str) -> float:
        return self.weights.get(key, self.default_weight)

    def in_flight(self, tenant: str) -> tuple[int, int]:
        """(requests, prompt tokens still counted) `tenant` has in flight here."""
        use = self._use.get(self.key(tenant))
        return (use.requests, use.tokens) if use else (0, 0)

    def acquire(self, request_id: str, tenant: str, tokens: int) -> None:
        """Count a request bound to a rank until `release(request_id)`."""
        if request_id in self._leases:
            return
        key = self.key(tenant)
        use = self._use.setdefault(key, _Use())
        use.requests += 1
        use.tokens += tokens
        self.requests += 1
        self.tokens += tokens
        use.peak_requests.observe(use.requests, self.clock())
        use.mean_prompt += PROMPT_MEAN_WEIGHT * (tokens - use.mean_prompt) if use.mean_prompt else tokens
        self._leases[request_id] = [key, tokens]

    def release_tokens(self, request_id: str) -> bool:
        """The request's prompt stops counting (its prefill is done); its slot still counts.
        True when it freed tokens."""
        lease = self._leases.get(request_id)
        if lease is None or not lease[1]:
            return False
        self._use[lease[0]].tokens -= lease[1]
        self.tokens -= lease[1]
        lease[1] = 0
        return True

    def release(self, request_id: str) -> None:
        """The request finished, failed or was cancelled; unknown ids are ignored."""
        lease = self._leases.pop(request_id, None)
        if lease is None:
            return
        key, tokens = lease
        use = self._use[key]
        use.requests -= 1
        use.tokens -= tokens
        self.requests -= 1
        self.tokens -= tokens
        use.last_end = self.clock()

    def share(self, tenant: str, queued_tenants: Iterable[str] = ()) -> float:
        """`tenant`'s fraction of the room now (1.0 while no other tenant is active)."""
        key = self.key(tenant)
        others = self._active(queued_tenants) - {key}
        if not others:
            return 1.0
        mine = self.weight(key)
        return min(1.0, self.scale * mine / (mine + sum(self.weight(t) for t in others)))

    def over_share(self, tenant: str, tokens: int, room: Room, queued_tenants: Iterable[str] = ()) -> bool:
        """Whether binding one more request of `tokens` prompt tokens would put `tenant` past its
        share of `room` while other tenants are active (`queued_tenants`: those with queued
        requests), and lending cannot cover it: `verdict(...) is Verdict.HELD`."""
        return self.verdict(tenant, tokens, room, queued_tenants) is Verdict.HELD

    def verdict(self, tenant: str, tokens: int, room: Room, queued_tenants: Iterable[str] = ()) -> Verdict:
        """WITHIN when binding one more request of `tenant` with `tokens` prompt tokens keeps it
        within its share of `room` (or no share applies); past it, LENT when lending is on and the
        room left free after it still covers every other active tenant's headroom (module doc),
        else HELD. Callers bind a LENT request only when no request within its share waits."""
        if not self.enabled:
            return Verdict.WITHIN
        key = self.key(tenant)
        use = self._use.get(key)
        if use is None or not use.requests:
            return Verdict.WITHIN  # one request in flight is always allowed
        active = self._active(queued_tenants)
        others = active - {key}
        if not others:
            return Verdict.WITHIN
        total_weight = sum(self.weight(t) for t in active | {key})
        share = min(1.0, self.scale * self.weight(key) / total_weight)
        if share >= 1.0:
            return Verdict.WITHIN
        past = bool(room.requests) and use.requests + 1 > share * room.requests
        # Tokens: one prompt is always allowed, however long (else it could never be bound).
        past = past or (bool(room.tokens and use.tokens) and use.tokens + tokens > share * room.tokens)
        if not past:
            return Verdict.WITHIN
        if not self.lend:
            return Verdict.HELD
        now = self.clock()
        keep_requests = keep_tokens = 0.0
        for other in others:
            theirs = min(1.0, self.scale * self.weight(other) / total_weight)
            held = self._use.get(other) or _Use()
            peak = held.peak_requests.peak(held.requests, now)
            keep_requests += headroom(theirs * room.requests, held.requests, peak, self.lend_headroom)
            prompt = held.mean_prompt or room.tokens / max(room.ranks, 1)
            keep_tokens += headroom(theirs * room.tokens, held.tokens, held.tokens, self.lend_headroom * prompt)
        if room.requests and room.requests - self.requests - 1 < keep_requests:
            return Verdict.HELD
        if room.tokens and room.tokens - self.tokens - tokens < keep_tokens:
            return Verdict.HELD
        return Verdict.LENT

    def _active(self, queued_tenants: Iterable[str]) -> set[str]:
        """The active tenants' keys; drops the entries of tenants no longer active."""
        self._drop_idle()
        return set(self._use) | {tenant_key(t, self._use, self.max_tenants) for t in queued_tenants}

    def _drop_idle(self) -> None:
        """Drop the entries of tenants that hold nothing and whose window has passed."""
        now = self.clock()
        idle = [k for k, use in self._use.items() if not use.requests and now - use.last_end >= self.active_window_s]
        for key in idle:
            del self._use[key]

    def __len__(self) -> int:
        return len(self._use)
