"""Files derived from a checkpoint (dequantised weights, parsed metadata) cached on disk: named by
the source file's identity, written atomically, touched when read, least recently used dropped
past a bound. Shared by every service on the machine, which may write the same file at once."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def cached_path(directory: Path, source: Path, suffix: str, version: str = "") -> Path:
    """Where the file derived from `source` lives: a new path whenever the source is replaced
    (path, size and modification time) or the derived format changes (`version`)."""
    stat = source.stat()
    identity = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}" + (f":{version}" if version else "")
    return directory / f"{source.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}{suffix}"


def touch(path: Path) -> None:
    """Mark a cached file recently used (eviction drops the least recently used first)."""
    os.utime(path)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a private temporary file that then replaces `path`: readers see a whole file
    or none, whichever process wrote it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    write(partial)
    partial.replace(path)


def evict(directory: Path, pattern: str, budget_bytes: int | None = None, max_files: int | None = None) -> None:
    """Drop the least recently used files matching `pattern` until at most `budget_bytes` and at
    most `max_files` of them remain."""
    files = sorted(directory.glob(pattern), key=lambda f: f.stat().st_mtime)
    total, count = sum(f.stat().st_size for f in files), len(files)
    for old in files:
        if (budget_bytes is None or total <= budget_bytes) and (max_files is None or count <= max_files):
            break
        total -= old.stat().st_size
        count -= 1
        old.unlink(missing_ok=True)
