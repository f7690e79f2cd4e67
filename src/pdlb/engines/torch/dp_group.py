"""Lockstep DP-attention groups: ranks that step together, and their request waves.

In SGLang's DP attention and vLLM's DP + expert parallelism, every forward pass of every rank of a
group ends in a collective (the MoE all-to-all), so a step lasts as long as the busiest rank's work,
and a rank with nothing to do still runs dummy steps while any rank of its group has work. A group
is either running or paused; it pauses when an all-reduce of "has unfinished requests" says no rank
has any, and each such running -> paused transition ends a request wave (vLLM's DP coordinator).

Here each step starts with one all-gather of a small row per rank (has work, new and attended
tokens, simulated time, wave, last compute time): every rank sees the same rows, so all decide the
same thing (step or pause), adopt the highest wave, and size the MoE stand-in alike. Then the rank
computes its own batch (or nothing: a dummy step) and joins an all-reduce sized like one MoE
exchange (the group's largest token count x hidden size), which holds every rank until the busiest
is done. With the simulator the step lasts the group's largest simulated time. Every collective is
bounded by the group timeout; a failed or timed-out collective ends the group (see lockstep.py).
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch

from pdlb.engines.torch.runners import Runner, SimRunner, StepItem
from pdlb.v1 import common_pb2

# Columns of the per-step row each rank contributes.
HAS_WORK, NEW_TOKENS, ATTENDED, SIM_US, WAVE, LAST_COMPUTE_US = range(6)
ROW = 6


class GroupBroken(RuntimeError):
    """A collective of the group failed or timed out: the group cannot step any more."""


@dataclass
class WaveState:
    """A rank's request-wave state, with vLLM's engine-side rules.

    `wave` counts the group's running -> paused transitions. A request or a StartWave for the
    current or a later wave makes a paused rank run; a StartWave for an earlier wave is ignored (that
    wave is over); a request for an earlier wave still runs (its work is real) and the rank's report
    of running at its own wave makes the dispatcher wake the others. Ranks adopt the group's highest
    wave at every step, so a rank that joined at wave 0 or missed a wave agrees after one step.

    A start for a later wave that reaches a running rank is kept until its step ends (`restart`):
    that step may be the one that pauses the group, and the other ranks, already past it, will wait
    for this one in the later wave's first step exchange.
    """

    wave: int = 0
    running: bool = False
    restart: int = -1  # a later wave this rank was asked to run while running an earlier one

    def on_request(self, wave: int | None) -> bool:
        """A request arrived (stamped with the dispatcher's wave, if any). True if it woke this rank."""
        return self._start(wave if wave is not None else self.wave)

    def on_start_wave(self, wave: int) -> bool:
        """The dispatcher asks this rank to run `wave`. True if it woke this rank."""
        if wave < self.wave:
            return False
        return self._start(wave)

    def _start(self, wave: int) -> bool:
        if self.running:
            if wave > self.wave:
                self.restart = max(self.restart, wave)
            return False
        self.wave, self.running = max(self.wave, wave), True
        return True

    def on_step(self, any_work: bool, max_wave: int) -> None:
        """The outcome of a group step, identical on every rank."""
        self.wave = max(self.wave, max_wave)
        if not any_work:
            self.running = False
            self.wave += 1
            if self.restart >= self.wave:
                self.wave, self.running = self.restart, True
        if self.restart <= self.wave:
            self.restart = -1


@dataclass(frozen=True)
class GroupSpec:
    size: int
    rank: int
    address: str  # host:port of the rendezvous store, served by group rank 0
    backend: str  # gloo or nccl
    timeout_s: float
    group_id: str


@dataclass
class StepOutcome:
    any_work: bool
    max_wave: int
    tokens: list[int | None]
    busiest_new_tokens: int = 0  # the most new tokens any rank of the group ran in this step


@dataclass
class GroupStats:
    steps: int = 0
    dummy_steps: int = 0
    imbalance_sum: float = 0.0
    imbalance_steps: int = 0
    step_seconds: float = 0.0
    busiest_compute_seconds: float = 0.0


class DPGroup:
    """One rank's membership of a lockstep group. Every method but `state` runs on the runner
    thread (collectives block)."""

    def __init__(self, spec: GroupSpec, hidden_size: int, max_step_tokens: int, device: str, dtype: torch.dtype):
        self.spec = spec
        self.device = torch.device(device)
        self.hidden_size, self.max_step_tokens, self.dtype = hidden_size, max_step_tokens, dtype
        self.stats = GroupStats()
        self._last_compute_us = 0
        self._moe: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []

    def join(self) -> None:
        """Rendezvous with the other ranks (blocks until all joined, or the timeout)."""
        import torch.distributed as dist

        if self.spec.backend == "nccl":
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # so NCCL honours the timeout too
            torch.cuda.set_device(self.device)
        try:
            dist.init_process_group(
                self.spec.backend,
                init_method=f"tcp://{self.spec.address}",
                rank=self.spec.rank,
                world_size=self.spec.size,
                timeout=datetime.timedelta(seconds=self.spec.timeout_s),
            )
        except Exception as exc:
            raise GroupBroken(
                f"could not form DP group {self.spec.group_id} of {self.spec.size} ranks at {self.spec.address} "
                f"as group rank {self.spec.rank} within {self.spec.timeout_s:g}s: {exc}"
            ) from exc
        self._moe = torch.zeros(max(1, self.max_step_tokens), self.hidden_size, device=self.device, dtype=self.dtype)
        self._rows = [torch.zeros(ROW, dtype=torch.int64, device=self.device) for _ in range(self.spec.size)]

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def step(self, runner: Runner, items: list[StepItem], has_work: bool, wave: int) -> StepOutcome:
        import torch.distributed as dist

        started = time.perf_counter()
        sim_s = runner.cost.step_time(items) if isinstance(runner, SimRunner) and items else 0.0
        new = sum(len(item.chunk.new_tokens) for item in items)
        attended = sum(item.chunk.start_pos + len(item.chunk.new_tokens) for item in items)
        mine = torch.tensor(
            [int(has_work), new, attended, int(sim_s * 1e6), wave, self._last_compute_us],
            dtype=torch.int64,
            device=self.device,
        )
        try:
            dist.all_gather(self._rows, mine)
            rows = torch.stack(self._rows).tolist()
        except Exception as exc:
            raise GroupBroken(f"DP group {self.spec.group_id}: the step exchange failed: {exc}") from exc
        any_work = any(row[HAS_WORK] for row in rows)
        max_wave = max(row[WAVE] for row in rows)
        self.stats.busiest_compute_seconds += max(row[LAST_COMPUTE_US] for row in rows) / 1e6
        self._last_compute_us = 0
        if not any_work:
            return StepOutcome(False, max_wave, [])
        computing = time.perf_counter()
        if isinstance(runner, SimRunner):
            tokens = runner.compute(items)
            compute_s = sim_s
        else:
            tokens = runner.step(items) if items else []
            compute_s = time.perf_counter() - computing
        self._last_compute_us = int(compute_s * 1e6)
        width = min(max(1, max(row[NEW_TOKENS] for row in rows)), self._moe.shape[0])
        try:
            dist.all_reduce(self._moe[:width])  # stands in for the MoE all-to-all of this step
        except Exception as exc:
            raise GroupBroken(f"DP group {self.spec.group_id}: the MoE exchange failed: {exc}") from exc
        if isinstance(runner, SimRunner):  # the step lasts as long as the group's slowest rank
            remaining = max(row[SIM_US] for row in rows) / 1e6 - (time.perf_counter() - started)
            if remaining > 0:
                time.sleep(remaining)
        stats = self.stats
        stats.steps += 1
        stats.dummy_steps += not items
        attended_all = [row[ATTENDED] for row in rows]
        if any(attended_all):
            stats.imbalance_sum += max(attended_all) * len(rows) / sum(attended_all)
            stats.imbalance_steps += 1
        stats.step_seconds += time.perf_counter() - started
        return StepOutcome(True, max_wave, tokens, max(row[NEW_TOKENS] for row in rows))

    def state(self, waves: WaveState) -> common_pb2.DPGroupState:
        s = self.stats
        return common_pb2.DPGroupState(
            group_id=self.spec.group_id,
            group_size=self.spec.size,
            group_rank=self.spec.rank,
            wave=waves.wave,
            running=waves.running,
            steps=s.steps,
            dummy_steps=s.dummy_steps,
            imbalance_sum=s.imbalance_sum,
            imbalance_steps=s.imbalance_steps,
            step_seconds_total=s.step_seconds,
            busiest_compute_seconds_total=s.busiest_compute_seconds,
        )
