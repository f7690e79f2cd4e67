"""Where each `pdlb up` leaves the addresses of the cluster it runs, for the other subcommands.

One file per cluster, `clusters/<name>.json` under `~/.cache/pdlb` (or `$PDLB_STATE_DIR`), holding
the pid of its `pdlb up`: clusters on one machine never overwrite or delete each other's state, a
file whose `pdlb up` is gone (killed) is stale and ignored, and a command finds the one running
cluster by itself, or is told which with `--cluster`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StateError(SystemExit):
    """No such cluster, or several and none named: the message says what to pass."""


def state_dir() -> Path:
    base = os.environ.get("PDLB_STATE_DIR") or Path.home() / ".cache" / "pdlb"
    return Path(base) / "clusters"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise StateError(f"cluster name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not first)")
    return name


def kv_storage_of(name: str) -> Path:
    """Where the vLLM servers of cluster `name` share PD's KV (vLLM's ExampleConnector stores each
    prompt's KV there); `pdlb up` removes it when the cluster stops."""
    return state_dir().parent / "vllm-kv" / check_name(name)


def path_of(name: str) -> Path:
    return state_dir() / f"{check_name(name)}.json"


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def running() -> dict[str, dict]:
    """Name -> state of every cluster whose `pdlb up` is alive."""
    found = {}
    for path in sorted(state_dir().glob("*.json")):
        state = _read(path)
        if isinstance(state.get("up_pid"), int) and pid_alive(state["up_pid"]):
            found[path.stem] = state
    return found


def save(name: str, state: dict) -> Path:
    """Write the cluster's state (atomically: readers never see half a file), owned by this process."""
    path = path_of(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({**state, "name": name, "up_pid": os.getpid()}, indent=2))
    partial.replace(path)
    return path


def load(name: str = "") -> dict:
    """The named cluster's state, or the only running one's; {} when none runs. Raises StateError
    for a named cluster that does not run, or for several running clusters and no name."""
    if name:
        state = running().get(check_name(name))
        if state is None:
            others = ", ".join(running()) or "none"
            raise StateError(
                f"no running cluster named {name!r} (running: {others}); start it with `pdlb up --name {name}`"
            )
        return state
    clusters = running()
    if len(clusters) > 1:
        listed = ", ".join(f"{n} ({s.get('http', '?')})" for n, s in clusters.items())
        raise StateError(f"several clusters run here: {listed}; pick one with --cluster NAME (or $PDLB_CLUSTER)")
    return next(iter(clusters.values()), {})


def clear(name: str) -> None:
    """Delete the cluster's state if this process wrote it (never another cluster's)."""
    path = path_of(name)
    if _read(path).get("up_pid") == os.getpid():
        path.unlink(missing_ok=True)
