"""Request waves of lockstep DP groups: the dispatcher's side (vLLM's DP coordinator, per group).

Workers of a lockstep group report their group, wave and running/paused state on the report
stream. From the latest report of each rank the dispatcher knows each group's current wave (the
highest reported) and whether it runs. It wakes ranks in two cases, as the seed's coordinator does:

1. A request is dispatched to a rank of a group that is paused: every other rank gets StartWave for
   the current wave at once (the chosen rank is woken by the request itself).
2. A rank is reported running at the group's current wave w (it got a request for a stale wave, or
   from another dispatcher or client) while ranks of its group are reported paused at a wave <= w:
   those get StartWave(w), whichever of them reported last.

A rank paused at a later wave than a StartWave names ignores it (that wave is over), so late or
duplicate messages are harmless; the group's per-step exchange makes every rank adopt the highest
wave, so a group restarted at wave 0 catches up with a dispatcher that remembers wave 7. Each rank
is sent at most one StartWave per wave (a fresh stream or incarnation forgets what was sent).
"""

from __future__ import annotations

from collections.abc import Callable

from pdlb.v1 import common_pb2, load_report_pb2

# Sends a StartWave to a worker's report stream; False when it could not be queued.
Sender = Callable[[str, load_report_pb2.StartWave], bool]


class WaveCoordinator:
    """Not thread-safe: the dispatcher's event loop owns it. Bounded by the load table: only
    members' reports reach it, and removed members are forgotten."""

    def __init__(self, send: Sender) -> None:
        self.send = send
        self.reported: dict[str, common_pb2.DPGroupState] = {}  # worker id -> its last group state
        self.incarnations: dict[str, str] = {}
        self.groups: dict[str, set[str]] = {}
        self.sent: dict[str, int] = {}  # worker id -> highest wave it was asked to start

    def on_report(self, worker_id: str, state: common_pb2.DPGroupState | None, incarnation: str = "") -> None:
        if state is None or not state.group_id:
            if worker_id in self.reported:
                self.forget(worker_id)
            return
        old = self.reported.get(worker_id)
        if old is not None and (old.group_id != state.group_id or self.incarnations[worker_id] != incarnation):
            self.forget(worker_id)
        self.reported[worker_id] = state
        self.incarnations[worker_id] = incarnation
        self.groups.setdefault(state.group_id, set()).add(worker_id)
        wave, running = self.view(state.group_id)
        if running:  # whether the running rank or a paused one reported, the paused must wake
            self._wake(state.group_id, wave, exclude="")

    def on_dispatch(self, worker_id: str) -> int | None:
        """A request goes to this worker: the wave to stamp on it (None: not in a lockstep group)."""
        rank = self.reported.get(worker_id)
        if rank is None:
            return None
        wave, running = self.view(rank.group_id)
        # The request itself wakes its rank: no StartWave for it (one would start an empty wave
        # if it arrived first), unless the request never gets there (`may_resend`).
        self.sent[worker_id] = max(self.sent.get(worker_id, -1), wave)
        if not running:
            self._wake(rank.group_id, wave, exclude=worker_id)
        return wave

    def view(self, group_id: str) -> tuple[int, bool]:
        """The group's current wave, and whether any rank is reported running it."""
        members = [self.reported[w] for w in self.groups.get(group_id, ())]
        wave = max((r.wave for r in members), default=0)
        return wave, any(r.running and r.wave == wave for r in members)

    def _wake(self, group_id: str, wave: int, exclude: str) -> None:
        for worker_id in sorted(self.groups.get(group_id, ())):
            rank = self.reported[worker_id]
            if worker_id == exclude or rank.wave > wave or (rank.running and rank.wave == wave):
                continue  # the requester itself; past that wave; or already running it
            if self.sent.get(worker_id, -1) >= wave:
                continue
            if self.send(worker_id, load_report_pb2.StartWave(wave=wave, group_id=group_id)):
                self.sent[worker_id] = wave

    def may_resend(self, worker_id: str) -> None:
        """What was sent to the worker may be lost (its report stream ended), or a request meant
        to wake it never reached it: it may be sent StartWave again."""
        self.sent.pop(worker_id, None)

    def forget(self, worker_id: str) -> None:
        rank = self.reported.pop(worker_id, None)
        self.incarnations.pop(worker_id, None)
        self.sent.pop(worker_id, None)
        if rank is not None:
            members = self.groups.get(rank.group_id)
            if members is not None:
                members.discard(worker_id)
                if not members:
                    del self.groups[rank.group_id]
