"""A worker's step time as a line in its prefill tokens, fitted over recent steps.

step seconds ~ base + tokens / rate. Dispatchers predict a queued prompt's wait from the two numbers
(the worker reports both). A plain average of tokens / seconds over prefill steps would not do: a
step's fixed cost is shared by all its tokens, so that average rises after long prompts and falls
after short ones, and a dispatcher that trusts it sends new work to whichever rank happened to
prefill long prompts last (the busiest one). The fit is weighted least squares with exponential
forgetting (sufficient statistics, O(1) per step).
"""

from __future__ import annotations

FORGET = 0.95  # weight of a step one step older: about the last 20-40 steps count


class StepFit:
    def __init__(self, forget: float = FORGET) -> None:
        self.forget = forget
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, prefill_tokens: int, seconds: float) -> None:
        d, x = self.forget, float(prefill_tokens)
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + seconds
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * seconds

    def line(self) -> tuple[float, float] | None:
        """(base seconds, seconds per prefill token); None until the steps' sizes differ enough to
        fit a slope, or while the fitted slope is not positive (noise)."""
        spread = self._w * self._xx - self._x * self._x
        if self._w <= 0 or spread <= 1e-9 * max(self._w * self._xx, 1.0):
            return None
        slope = (self._w * self._xy - self._x * self._y) / spread
        if slope <= 0:
            return None
        base = (self._y - slope * self._x) / self._w
        return max(base, 0.0), slope
