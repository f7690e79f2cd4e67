"""Binding the runner's OpenMP team one thread per core (engines/torch/cpu_binding.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from pdlb.engines.torch.batching import compute_thread
from pdlb.engines.torch.cpu_binding import cpus_to_bind, parse_cpus


def test_parse_cpus_ranges_and_errors():
    assert parse_cpus("0-1,3") == [0, 1, 3]
    for bad in ("a", "3-1", "-1", ""):
        with pytest.raises(ValueError, match="not a CPU id or range"):
            parse_cpus(bad)
    for twice, core in (("0,0", 0), ("0-3,2", 2), ("1,0-1", 1)):  # used to be dropped in silence
        with pytest.raises(ValueError, match=f"core {core} is named twice"):
            parse_cpus(twice)


def test_cpus_to_bind_modes():
    allowed = sorted(os.sched_getaffinity(0))
    assert cpus_to_bind("none", 2, "cpu") == []
    assert cpus_to_bind("auto", len(allowed), "cuda") == []
    expected = allowed if len(allowed) > 1 else []
    assert cpus_to_bind("auto", len(allowed), "cpu") == expected
    with pytest.raises(ValueError, match="names 1 core for --torch-threads 2: name one core per torch thread"):
        cpus_to_bind(str(allowed[0]), 2, "cpu")
    # more cores than threads used to bind the first ones in silence
    with pytest.raises(ValueError, match="names 2 cores for --torch-threads 1"):
        cpus_to_bind("0-1", 1, "cpu")
    with pytest.raises(ValueError, match="core 0 is named twice"):
        cpus_to_bind("0,0", 2, "cpu")
    with pytest.raises(ValueError, match="not in this process's CPU set"):
        cpus_to_bind(f"{max(allowed) + 1000}", 1, "cpu")


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--torch-bind-cpus", "0-1", "--torch-threads", "1"], "names 2 cores for --torch-threads 1"),
        (["--torch-bind-cpus", "0,0", "--torch-threads", "2"], "core 0 is named twice in '0,0'"),
    ],
)
def test_the_scheduler_refuses_a_binding_that_disagrees_with_its_threads(flags, said):
    """One line naming the flags, exit 2, before any model loads (both used to start, binding what
    they could)."""
    run = subprocess.run(
        [sys.executable, "-m", "pdlb.services.scheduler.main", "--port", "0", "--runner", "sim", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith("pdlb-scheduler: --torch-bind-cpus ") and said in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_runner_team_bound_main_thread_not():
    cpus = sorted(os.sched_getaffinity(0))[:2]
    before = os.sched_getaffinity(0)
    with compute_thread(2, cpus) as runner:

        def on_runner():
            torch.randn(256, 256) @ torch.randn(256, 256)
            return threading.get_native_id(), os.sched_getaffinity(0)

        tid, runner_cpus = runner.submit(on_runner).result()
        assert runner_cpus == {cpus[0]}
        others = {int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}
        assert {cpus[1]} in others.values()  # the OpenMP worker
    assert os.sched_getaffinity(0) == before  # the main thread keeps the process's set
    assert tid != threading.get_native_id()
