"""The etcd data directories of `pdlb up` processes that were killed (kill -9, an OOM kill): their
children die with them (parent-death signal), but nothing removes the directory their etcd wrote.

Each `pdlb up` names its etcd's temp directory `pdlb-up-etcd-<its pid>-<random>`; a later `pdlb up`
removes those of that form whose pid no longer runs. A live owner's directory is never touched,
whatever cluster it runs; a pid reused since its owner died keeps a directory (until the process
holding it ends): the mistake, if any, is on the side of keeping. Directories of other programs, and
the `pdlb-etcd-*` ones tests start etcd in, do not match the form.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from pdlb.cli import state

PREFIX = "pdlb-up-etcd-"
_OWNED = re.compile(rf"^{re.escape(PREFIX)}(\d+)-[A-Za-z0-9_]+$")


def etcd_dir_prefix() -> str:
    """The temp directory prefix of this process's etcd data."""
    return f"{PREFIX}{os.getpid()}-"


def remove_dead_owners(directory: str | None = None) -> list[Path]:
    """Remove the etcd data directories under `directory` (default: the temp dir) whose `pdlb up`
    no longer runs; returns those removed. Best effort: one that cannot be removed is left."""
    base = Path(directory or tempfile.gettempdir())
    removed = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    for path in entries:
        found = _OWNED.match(path.name)
        if not found or not path.is_dir() or path.is_symlink():
            continue
        owner = int(found.group(1))
        if owner == os.getpid() or state.pid_alive(owner):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed
