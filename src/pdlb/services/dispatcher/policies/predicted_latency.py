"""`predicted_latency`: the rank where this request's first token is predicted soonest.

For a prefill or mixed rank the predicted time to first token is
    expected wait for a batch slot          (when the rank has no free slot)
  + the rest of the step it is running      (half a step on average; none when idle)
  + prefill work queued ahead of it         (prompt tokens not yet computed there: waiting requests,
                                             running ones still in prefill, and what was sent since
                                             the rank's last report)
  + its own prefill                         (the prompt less what that rank likely caches)
where P prompt tokens take P / rate of token time plus one step's fixed cost per chunk of
`prefill_tokens_per_step` (and one step at least). The worker measures and reports the numbers: a
least-squares line of step time against the step's prefill tokens (its intercept is the fixed cost,
its slope one over the rate), the mean step time, its chunk size, and the mean output length of its
finished requests. Slots free up as running requests finish: with R running requests of mean output
L at step time s, about R / (L * s) per second, so the k-th free slot comes after k * L * s / R. The
cache term comes from the prefix index (as in `cache_aware`). Predictions within a millisecond tie;
ties go to the longer expected cache hit, then rotate.

For a decode rank the prediction is the inter-token latency the request would see: after any wait
for a slot, the rank's step time scaled by the tokens its batch would attend with this request
added. A worker that has not reported rates yet is predicted with the average of those that have;
when none has, ranks are ordered as `least_wait` orders them.

Both predictions are linear in the request's tokens, a + c x tokens, with a and c of each rank
updated when it reports or receives a request and kept with its row of the load table; a decision
is then one pass over the candidate ranks' pairs (and the few ranks with a cache hit), whichever
subset of the ranks it is given (flow control offers those with room), which keeps it fast at a
thousand ranks.

`last_prediction_s` holds the prediction for the chosen rank (the dispatcher returns it to clients).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlb.services.dispatcher.load_table import Role, WorkerEntry
from pdlb.services.dispatcher.policies.base import (
    SLOT_EXCESS_THEN_TOKENS,
    PolicyOptions,
    PrefixIndexPolicy,
    RouteContext,
)

TIE_S = 0.001
PRIOR_WEIGHT = 0.05  # moving average of all workers' rates: the prior of unmeasured ones


class PredictedLatency(PrefixIndexPolicy):
    name = "predicted_latency"

    def __init__(self, options: PolicyOptions, role: Role = Role.MIXED) -> None:
        super().__init__(options)
        self.role = role
        self.last_prediction_s: float | None = None
        self.prior = [0.0, 0.0, 0.0, 0.0]  # prefill tokens/s, step seconds, mean output tokens, step base
        self._list: Sequence[WorkerEntry] = ()  # the candidates `_position` indexes
        self._position: dict[str, int] = {}

    # the model -----------------------------------------------------------------------------------
    def coefficients(self, entry: WorkerEntry) -> tuple[float, float]:
        """(a, c): the prediction for `tokens` new tokens on `entry` is a + c * tokens seconds."""
        r = entry.reported
        rate = r.prefill_tokens_per_s or self.prior[0]
        step = r.step_ms / 1000 if r.step_ms else self.prior[1]
        output = r.mean_output_tokens or self.prior[2] or 1.0
        slots = entry.slot_excess  # requests that would queue for a slot, this one included
        slot_wait = slots * output * step / max(r.running_requests, 1) if slots > 0 else 0.0
        if self.role is Role.DECODE:
            attended = r.running_tokens + entry.inflight_tokens
            return slot_wait + step, (step / attended if attended else 0.0)
        if rate <= 0:
            return float("inf"), 0.0
        base = r.step_base_ms / 1000 if r.step_base_ms else self.prior[3]
        chunk = r.prefill_tokens_per_step
        per_token = 1.0 / rate + (base / chunk if chunk else 0.0)
        rest_of_step = step / 2 if r.running_requests else 0.0
        return slot_wait + rest_of_step + base + entry.queued_tokens * per_token, per_token

    def predict(self, entry: WorkerEntry, tokens: int, hit: int = 0) -> float:
        a, c = self.coefficients(entry)
        return a + c * (tokens - (0 if self.role is Role.DECODE else hit))

    # keeping a and c current -------------------------------------------------------------------
    def _refresh(self, entry: WorkerEntry) -> tuple[float, float]:
        """(a, c) of `entry`, kept with its row until the row changes (a report, a dispatch, a
        finish: `WorkerEntry.recount` drops it), so only the rows that changed since the last
        decision are computed again."""
        entry.policy_state = pair = self.coefficients(entry)
        return pair

    def on_report(self, entry: WorkerEntry) -> None:
        super().on_report(entry)
        r = entry.reported
        measured = (r.prefill_tokens_per_s, r.step_ms / 1000, r.mean_output_tokens, r.step_base_ms / 1000)
        for k, value in enumerate(measured):
            if value > 0:
                self.prior[k] = value if self.prior[k] <= 0 else self.prior[k] + PRIOR_WEIGHT * (value - self.prior[k])

    # the decision ----------------------------------------------------------------------------------
    def select(self, ctx: RouteContext, candidates: Sequence[WorkerEntry]) -> WorkerEntry:
        if self.prior[0] <= 0 and self.prior[1] <= 0:
            self.last_prediction_s = None  # nothing measured yet anywhere
            return self._least(candidates, SLOT_EXCESS_THEN_TOKENS)
        tokens = ctx.num_tokens
        refresh = self._refresh
        pairs = [e.policy_state or refresh(e) for e in candidates]
        predictions = [a + c * tokens for a, c in pairs]
        hits: dict[int, int] = {}
        if self.role is not Role.DECODE:
            matches = self.matches_of(ctx)
            if matches:
                if self._list is not candidates:  # indexed only when some rank holds the prefix
                    self._list = candidates
                    self._position = {e.worker.worker_id: i for i, e in enumerate(candidates)}
                block, cap, position = self.index.block_size, max(tokens - 1, 0), self._position
                for worker_id, blocks in matches.items():  # once per rank holding the prefix
                    i = position.get(worker_id)
                    if i is not None:
                        hit = blocks * block
                        hit = hits[i] = hit if hit < cap else cap
                        predictions[i] -= pairs[i][1] * hit
        limit = min(predictions) + TIE_S
        tied = [i for i, p in enumerate(predictions) if p <= limit]
        if len(tied) > 1:
            most = max(hits.get(i, 0) for i in tied)
            tied = [i for i in tied if hits.get(i, 0) == most]
        start = self._start(candidates)
        index = next((i for i in tied if i >= start), tied[0])  # ties rotate
        chosen = candidates[index]
        self._last_rank = chosen.worker.dp_rank
        self.last_prediction_s = predictions[index]
        return chosen
