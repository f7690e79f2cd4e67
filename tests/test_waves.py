"""Property test of the request-wave protocol: the workers' WaveState and the dispatcher's
WaveCoordinator, under any interleaving of requests (through the dispatcher, or straight to a rank
with a stale, current, future or no wave), reports and message deliveries.

The model follows the seed (vLLM's DP coordinator) and the group's lockstep: a group step happens
only when every rank runs (the step exchange needs all of them); it finishes every rank's work;
every message channel is FIFO (a gRPC stream), but channels interleave arbitrarily. A step is not
atomic: each rank learns the exchange's outcome at its own time, and messages reach a rank between
the exchange and that moment (as StartWave reaches a real rank's event loop while its step runs on
the runner thread). Checked: waves never go back; every rank leaves a step at the wave the exchange
decided (or later, when it was asked to start a later wave meanwhile); a step that finds no work
advances the wave by exactly one; and from any state, once messages flow, the group never deadlocks
(a rank left running while another stays paused) and ends paused with all work done."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pdlb.engines.torch.dp_group import WaveState
from pdlb.services.dispatcher.waves import WaveCoordinator
from pdlb.v1 import common_pb2

GROUP = "g"


@dataclass
class Rank:
    id: str
    state: WaveState = field(default_factory=WaveState)
    work: int = 0
    inbox: deque = field(default_factory=deque)  # ("request", wave | None) or ("start", wave)
    outcome: tuple[bool, int] | None = None  # the exchange's (any work, max wave), not yet applied
    reports: deque = field(default_factory=deque)  # states on the way to the dispatcher


class Cluster:
    def __init__(self, size: int) -> None:
        self.ranks = {f"r{i}": Rank(f"r{i}") for i in range(size)}
        self.coordinator = WaveCoordinator(self._send)
        self.pause_waves: list[int] = []

    def _send(self, worker_id: str, start) -> bool:
        self.ranks[worker_id].inbox.append(("start", start.wave))
        return True

    def dispatch(self, worker_id: str) -> None:
        wave = self.coordinator.on_dispatch(worker_id)
        self.ranks[worker_id].inbox.append(("request", wave))

    def direct(self, worker_id: str, wave: int | None) -> None:
        self.ranks[worker_id].inbox.append(("request", wave))

    def deliver(self, worker_id: str) -> None:
        rank = self.ranks[worker_id]
        if not rank.inbox:
            return
        kind, wave = rank.inbox.popleft()
        before = rank.state.wave
        if kind == "request":
            rank.work += 1
            rank.state.on_request(wave)
        else:
            rank.state.on_start_wave(wave)
        assert rank.state.wave >= before

    def report(self, worker_id: str) -> None:
        rank = self.ranks[worker_id]
        rank.reports.append(common_pb2.DPGroupState(group_id=GROUP, wave=rank.state.wave, running=rank.state.running))

    def receive_report(self, worker_id: str) -> None:
        rank = self.ranks[worker_id]
        if rank.reports:
            self.coordinator.on_report(worker_id, rank.reports.popleft())

    def step(self) -> bool:
        """The step exchange: every rank must be running and done with its previous step."""
        ranks = list(self.ranks.values())
        if not all(r.state.running and r.outcome is None for r in ranks):
            return False
        any_work = any(r.work for r in ranks)
        max_wave = max(r.state.wave for r in ranks)
        for r in ranks:
            r.outcome = (any_work, max_wave)
            r.work = 0  # a step finishes every rank's batch in this model
        if not any_work:
            self.pause_waves.append(max_wave)
        return True

    def finish_step(self, worker_id: str) -> None:
        """One rank applies the exchange's outcome (as the lockstep engine's loop does)."""
        rank = self.ranks[worker_id]
        if rank.outcome is None:
            return
        any_work, max_wave = rank.outcome
        rank.outcome = None
        before = rank.state.wave
        rank.state.on_step(any_work, max_wave)
        decided = max_wave if any_work else max_wave + 1
        assert rank.state.wave >= before
        assert rank.state.wave == decided or (rank.state.running and rank.state.wave > decided), (
            f"{worker_id} left the step at wave {rank.state.wave}, the exchange decided {decided}"
        )
        if rank.work and not rank.state.running:  # work that came during the pausing step
            rank.state.on_request(None)

    def settle_messages(self) -> None:
        """Deliver every queued message and report, without stepping."""
        for worker_id in self.ranks:
            while self.ranks[worker_id].inbox:
                self.deliver(worker_id)
            self.report(worker_id)
            self.receive_report(worker_id)

    def settle(self) -> None:
        """Let every message flow and the group step until nothing changes."""
        for _ in range(200):
            for worker_id in self.ranks:
                while self.ranks[worker_id].inbox:
                    self.deliver(worker_id)
                self.finish_step(worker_id)
                # a rank holding a request it was given after it said "no work" starts a wave
                rank = self.ranks[worker_id]
                if rank.work and not rank.state.running:
                    rank.state.on_request(None)
                self.report(worker_id)
                self.receive_report(worker_id)
            if not self.step() and all(
                not r.inbox and not r.reports and r.outcome is None for r in self.ranks.values()
            ):
                break
        ranks = list(self.ranks.values())
        assert not any(r.state.running for r in ranks), "deadlock: some rank still running, others paused"
        assert not any(r.work for r in ranks), "work left undone"
        assert len({r.state.wave for r in ranks}) == 1


operation = st.one_of(
    st.tuples(st.just("dispatch"), st.integers(0, 3)),
    st.tuples(st.just("direct"), st.integers(0, 3), st.one_of(st.none(), st.integers(-2, 2))),
    st.tuples(st.just("deliver"), st.integers(0, 3)),
    st.tuples(st.just("report"), st.integers(0, 3)),
    st.tuples(st.just("receive"), st.integers(0, 3)),
    st.tuples(st.just("step")),
    st.tuples(st.just("finish"), st.integers(0, 3)),
)


@settings(max_examples=400, deadline=None)
@given(size=st.integers(2, 4), ops=st.lists(operation, max_size=60))
def test_waves_never_deadlock_and_stay_in_agreement(size: int, ops: list[tuple]) -> None:
    cluster = Cluster(size)
    for op in ops:
        kind, *args = op
        worker_id = f"r{args[0] % size}" if args else ""
        if kind == "dispatch":
            cluster.dispatch(worker_id)
        elif kind == "direct":
            offset = args[1]
            wave = None if offset is None else max(0, cluster.ranks[worker_id].state.wave + offset)
            cluster.direct(worker_id, wave)
        elif kind == "deliver":
            cluster.deliver(worker_id)
        elif kind == "report":
            cluster.report(worker_id)
        elif kind == "receive":
            cluster.receive_report(worker_id)
        elif kind == "finish":
            cluster.finish_step(worker_id)
        else:
            cluster.step()
    cluster.settle()
    assert cluster.pause_waves == sorted(set(cluster.pause_waves)), "each wave ends once, in order"


def test_dispatch_to_a_paused_group_wakes_every_other_rank_once() -> None:
    cluster = Cluster(3)
    for worker_id in cluster.ranks:
        cluster.report(worker_id)
        cluster.receive_report(worker_id)
    cluster.dispatch("r1")
    cluster.dispatch("r1")
    assert [list(cluster.ranks[w].inbox) for w in ("r0", "r1", "r2")] == [
        [("start", 0)],
        [("request", 0), ("request", 0)],
        [("start", 0)],
    ]


def test_stale_start_wave_is_ignored() -> None:
    state = WaveState(wave=5)
    assert not state.on_start_wave(4) and not state.running
    assert state.on_start_wave(5) and state.running
    state.on_step(any_work=False, max_wave=5)
    assert (state.wave, state.running) == (6, False)
    assert state.on_request(2) and state.wave == 6  # a stale request still runs, at the current wave


def test_start_wave_reaching_a_rank_during_the_step_that_pauses_the_group_is_kept() -> None:
    """The race behind a group timing out in CI: the group's last step of wave 0 has decided "no
    work" on every rank, but r0 is still finishing it when a request for wave 1 reaches r1 and the
    StartWave(1) it causes reaches r0. r0 must leave that step running wave 1, not pause at wave 2
    (which left r1 alone in the next step exchange until the group timeout ended the group)."""
    cluster = Cluster(2)
    cluster.settle_messages()  # the dispatcher learns the group
    cluster.dispatch("r0")
    cluster.settle_messages()
    assert all(r.state.running for r in cluster.ranks.values())
    assert cluster.step()  # wave 0's work
    for worker_id in cluster.ranks:
        cluster.finish_step(worker_id)
    assert cluster.step()  # no work left: every rank will pause, but r0 has not finished the step
    cluster.finish_step("r1")
    assert (cluster.ranks["r1"].state.wave, cluster.ranks["r1"].state.running) == (1, False)
    cluster.report("r1")
    cluster.receive_report("r1")
    cluster.dispatch("r1")  # stamped wave 1; r0 is asked to start wave 1
    assert list(cluster.ranks["r0"].inbox) == [("start", 1)]
    cluster.deliver("r0")
    cluster.deliver("r1")
    cluster.finish_step("r0")
    assert [(r.state.wave, r.state.running) for r in cluster.ranks.values()] == [(1, True), (1, True)]
    cluster.settle()
    assert cluster.pause_waves == [0, 1]
