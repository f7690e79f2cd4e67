"""Property test of the request-wave protocol: the workers' WaveState and the dispatcher's
WaveCoordinator, under any interleaving of requests (through the dispatcher, or straight to a rank
with a stale, current, future or no wave), reports and message deliveries.

The model follows the seed (vLLM's DP coordinator) and the group's lockstep: a group step happens
only when every rank runs (the step exchange needs all of them); it finishes every rank's work;
every message channel is FIFO (a gRPC stream), but channels interleave arbitrarily. Checked:
waves never go back; after a step all ranks agree on the wave; a step that finds no work advances
the wave by exactly one; and from any state, once messages flow, the group never deadlocks (a
rank left running while another stays paused) and ends paused with all work done."""

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
        ranks = list(self.ranks.values())
        if not all(r.state.running for r in ranks):
            return False
        any_work = any(r.work for r in ranks)
        max_wave = max(r.state.wave for r in ranks)
        for r in ranks:
            r.state.on_step(any_work, max_wave)
            r.work = 0  # a step finishes every rank's batch in this model
        waves = {r.state.wave for r in ranks}
        assert len(waves) == 1, f"ranks disagree on the wave after a step: {waves}"
        if not any_work:
            assert waves == {max_wave + 1}
            self.pause_waves.append(max_wave)
        return True

    def settle(self) -> None:
        """Let every message flow and the group step until nothing changes."""
        for _ in range(200):
            for worker_id in self.ranks:
                while self.ranks[worker_id].inbox:
                    self.deliver(worker_id)
                # a rank holding a request it was given after it said "no work" starts a wave
                rank = self.ranks[worker_id]
                if rank.work and not rank.state.running:
                    rank.state.on_request(None)
                self.report(worker_id)
                self.receive_report(worker_id)
            if not self.step() and all(not r.inbox and not r.reports for r in self.ranks.values()):
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
