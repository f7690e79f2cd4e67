"""Binding the runner's OpenMP team one thread per CPU core (Linux), as vLLM's CPU build does.

An unbound team of N compute threads on N busy cores waits at every barrier of every op for
whichever thread the kernel descheduled or moved; on 2 cores shared with other work pdlb's worker
fell to 0.40x vLLM's tokens/s, whose threads are bound (`VLLM_CPU_OMP_THREADS_BIND`). OpenMP's own
binding (`OMP_PROC_BIND`, `GOMP_CPU_AFFINITY`) would pin the interpreter's initial thread too, the one
whose event loop serves gRPC. So the team is bound from inside the runner thread instead: the
runner thread itself (the team's master) goes to the first core, and its OpenMP workers, found as
the threads that running the first parallel op created, one each to the next cores. Every other
thread of the process keeps the process's CPU set.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

AUTO, NONE = "auto", "none"


def parse_cpus(spec: str) -> list[int]:
    """CPU ids of a list such as "0-3,6" (ranges inclusive), in order.

    Raises ValueError naming the part that is not a CPU id or range, or the core named twice
    (two threads bound to one core would take turns on it)."""
    cpus: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"not a CPU id or range: {part!r} (write e.g. 0-3,6)") from None
        if first < 0 or last < first:
            raise ValueError(f"not a CPU id or range: {part!r} (write e.g. 0-3,6)")
        twice = [c for c in range(first, last + 1) if c in cpus]
        if twice:
            raise ValueError(f"core {twice[0]} is named twice in {spec!r}: one core per torch thread")
        cpus += range(first, last + 1)
    return cpus


def cpus_to_bind(spec: str, threads: int, device: str) -> list[int]:
    """The cores a runner of `threads` compute threads on `device` binds to, one per thread, from
    the --torch-bind-cpus value: "none" (bind nothing: []), "auto" (on a CPU device, the process's
    allowed cores when there are exactly `threads` of them: the team takes the whole set anyway,
    bound it only stops moving; else []), or a list ("0-1") of exactly `threads` distinct cores.

    Raises ValueError for a list that names a core twice, more or fewer cores than threads (neither
    flag wins: binding some threads, or leaving named cores idle, is never what was meant), or cores
    outside the process's set."""
    spec = spec.strip().lower()
    if spec == NONE or threads < 1:
        return []
    allowed = sorted(os.sched_getaffinity(0))
    if spec == AUTO:
        return allowed if device == "cpu" and threads > 1 and len(allowed) == threads else []
    try:
        cpus = parse_cpus(spec)
    except ValueError as exc:
        raise ValueError(f"--torch-bind-cpus {spec}: {exc}") from None
    if len(cpus) != threads:
        cores = f"{len(cpus)} core{'s' if len(cpus) != 1 else ''}"
        raise ValueError(
            f"--torch-bind-cpus {spec} names {cores} for --torch-threads {threads}: name one core per torch thread"
        )
    outside = [c for c in cpus if c not in allowed]
    if outside:
        raise ValueError(f"--torch-bind-cpus: cores {outside} are not in this process's CPU set {allowed}")
    return cpus


def _thread_ids() -> set[int]:
    return {int(task.name) for task in Path("/proc/self/task").iterdir()}


def bind_current_team(cpus: list[int]) -> dict[int, int]:
    """Call on the thread that runs torch (after torch.set_num_threads, before its first parallel
    op): binds it to cpus[0] and the OpenMP workers its first parallel op starts to cpus[1:].

    Returns {thread id: core} of what was bound; {} (nothing bound, a warning logged) when the team
    already existed or other threads started meanwhile, so the workers cannot be told apart."""
    if not cpus:
        return {}
    threads = torch.get_num_threads()
    before = _thread_ids()
    # a parallel op large enough that ATen splits it over the whole team (grain size 32,768)
    torch.ones(threads * (1 << 16)).exp_()
    workers = sorted(_thread_ids() - before)
    if len(workers) != threads - 1 or len(cpus) < threads:
        log.warning(
            "torch threads not bound: expected %d new OpenMP workers, found %d (cores %s)",
            threads - 1,
            len(workers),
            cpus,
        )
        return {}
    bound = {}
    for tid, cpu in zip([0, *workers], cpus, strict=False):
        os.sched_setaffinity(tid, {cpu})  # 0: the calling thread only (Linux sets per thread)
        bound[tid or threading.get_native_id()] = cpu
    log.info("torch threads bound one per core: %s", bound)
    return bound
