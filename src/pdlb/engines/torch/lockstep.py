"""The batching engine of a rank in a lockstep DP group (scheduler --dp-group-size > 1).

Same admission, batching, prefix cache and PD hand-off as the independent engine; only the loop
differs. A paused rank computes nothing until a request reaches it or the dispatcher's StartWave
does; a running rank takes part in every group step, with its own batch or a dummy one, until the
group's step exchange finds no work on any rank. If a collective fails (a rank died, or a wave
start never reached a rank within the group timeout), the group has ended: every request here fails
with UNAVAILABLE naming the group, new requests are refused, and `on_end` tells the service to shut
down so a supervisor restarts the group as a whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from pdlb.engines.request import ABORT, AdmissionError, Output, Sequence
from pdlb.engines.torch.batching import Engine
from pdlb.engines.torch.dp_group import DPGroup, GroupBroken, WaveState
from pdlb.v1 import common_pb2

log = logging.getLogger(__name__)


class LockstepEngine(Engine):
    def __init__(self, *args, group: DPGroup, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.waves = WaveState()
        self.ended: str | None = None
        self.on_end: list[Callable[[str], None]] = []
        self._resume = asyncio.Event()

    def group_state(self) -> common_pb2.DPGroupState:
        return self.group.state(self.waves)

    def check(self, seq: Sequence) -> None:
        if self.ended is not None:
            raise AdmissionError(grpc.StatusCode.UNAVAILABLE, f"request {seq.request_id}: {self.ended}")
        super().check(seq)

    def submit(self, seq: Sequence, wave: int | None = None) -> None:
        super().submit(seq)
        if self.waves.on_request(wave):
            log.debug("request %s woke the group at wave %d", seq.request_id, self.waves.wave)
            self._wake()  # the next report says running: the dispatcher wakes the other ranks

    def start_wave(self, wave: int, group_id: str) -> None:
        """The dispatcher's StartWave (ignored when meant for another group or a wave that is over)."""
        if group_id == self.group.spec.group_id and self.waves.on_start_wave(wave):
            self._wake()

    def _wake(self) -> None:
        self._resume.set()
        super()._wake()

    def _update_idle(self) -> None:
        # Draining waits for the group to pause, not just for this rank: a rank that left while
        # the others step would break their next collective.
        if not self.waves.running and not self.waiting and not self.running:
            self._idle.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._reap_aborted()
            self._expire_held()
            if not self.waves.running:
                self._update_idle()
                self._resume.clear()
                await self._resume.wait()
                continue
            self._admit()
            items = self._plan()
            has_work = bool(self.running or self.waiting)
            started = time.perf_counter()
            try:
                outcome = await loop.run_in_executor(
                    self._executor, self.group.step, self.runner, [item for _, item in items], has_work, self.waves.wave
                )
            except GroupBroken as exc:
                self._end(str(exc))
                return
            self.waves.on_step(outcome.any_work, outcome.max_wave)
            if not self.waves.running and (self.waiting or self.running):
                # A request arrived after this rank had said "no work" in the step that paused the
                # group: it starts the next wave (its report makes the dispatcher wake the others).
                self.waves.on_request(None)
            if outcome.any_work:
                self.steps += 1
                # the group's step lasts as long as its busiest rank's: fit the step time to that
                # rank's tokens, not this one's (which may have run a dummy step)
                self._measure(items, time.perf_counter() - started, outcome.busiest_new_tokens)
                self._apply(items, outcome.tokens)
            self._notify()

    def _end(self, reason: str) -> None:
        self.ended = f"{reason}; this rank is leaving its DP group (restart the group)"
        log.error("%s", self.ended)
        for seq in list(self.by_id.values()):
            if seq in self.running:
                self.running.remove(seq)
            if seq in self.waiting:
                self.waiting.remove(seq)
            seq.outbox.put_nowait(
                Output([], ABORT, error=(grpc.StatusCode.UNAVAILABLE, f"request {seq.request_id}: {self.ended}"))
            )
            self._retire(seq, ABORT)
        self.waves.running = False
        self._idle.set()
        self._notify()
        for callback in self.on_end:
            callback(self.ended)

    async def close(self) -> None:
        await self._stop_loop()
        if self.ended is None:  # a broken group's collectives could hang: just go
            await asyncio.get_running_loop().run_in_executor(self._executor, self.group.leave)
        await super().close()
