"""Where `pdlb up` leaves the addresses of the cluster it runs, for the other subcommands."""

from __future__ import annotations

import json
import os
from pathlib import Path


def state_path() -> Path:
    base = os.environ.get("PDLB_STATE_DIR") or Path.home() / ".cache" / "pdlb"
    return Path(base) / "cluster.json"


def save(state: dict) -> Path:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))
    return path


def load() -> dict:
    path = state_path()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def clear() -> None:
    state_path().unlink(missing_ok=True)
