"""Work-conserving lending: how much of the room kept for others may be lent out. Pure, no I/O.

A tenant's share (tenant_share.py) and the slot reserve (flow_control.py) keep room for a party
that may not use it: a steady tenant that holds 3 of its 32 slots, a high-priority class that
arrives in bursts. Kept hard, the rest of that room idles while requests that could use it wait.
Lent (the work-conserving sharing of Dynamo's weighted deficit round robin and of llm-d's flow
control), a held request may take it, as long as the room left free still covers each owner's
**headroom**: what the owner held at its recent peak, plus a margin, less what it holds now, never
more than it is still entitled to (for prompt room, which frees within a prefill step, callers
pass what it holds now as the peak: the margin alone is kept). So an owner's arrivals up to its
recent peak plus the margin bind at once; past that, it gets lent room back as lent requests end
(the engines do not preempt, so it waits about one request's service time over the lent requests
in flight for a slot, or one prefill step for prompt room).

`RecentPeak` keeps the peak in two buckets of `PEAK_WINDOW_S` each (aligned to multiples of it):
bounded (three numbers per owner), and a peak is forgotten one to two windows after it happened.
"""

from __future__ import annotations

import math

PEAK_WINDOW_S = 10.0  # seconds a bucket of the recent peak spans (a peak is kept 10-20 s)


class RecentPeak:
    """The highest value a count (requests or tokens in flight) reached within the last one to two
    `window_s` seconds. `observe` it whenever the count rises, and read it with `peak`."""

    __slots__ = ("_bucket", "_current", "_previous", "window_s")

    def __init__(self, window_s: float = PEAK_WINDOW_S) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, not {window_s}")
        self.window_s = window_s
        self._bucket = -math.inf  # the current bucket: monotonic seconds // window_s
        self._current = 0.0  # the peak within the current bucket
        self._previous = 0.0  # the peak within the bucket before it (0 when that bucket is older)

    def observe(self, value: float, now: float) -> None:
        """The count is `value` at monotonic second `now`."""
        self._roll(now)
        self._current = max(self._current, value)

    def peak(self, value: float, now: float) -> float:
        """The recent peak, counting the current `value` (the count now) too."""
        self.observe(value, now)
        return max(self._current, self._previous)

    def _roll(self, now: float) -> None:
        bucket = now // self.window_s
        if bucket <= self._bucket:
            return
        self._previous = self._current if bucket == self._bucket + 1 else 0.0
        self._current, self._bucket = 0.0, bucket


def headroom(entitled: float, in_use: float, peak: float, margin: float) -> float:
    """The room to keep free for an owner entitled to `entitled` (slots or tokens) that holds
    `in_use` now and held up to `peak` recently: what it may still want (`peak + margin - in_use`),
    at most what it is still entitled to (`entitled - in_use`), at least 0."""
    return max(0.0, min(entitled, peak + margin) - in_use)
