"""The system C++ compiler: finding it, and building a kernel's shared library once into a cache.

Two CPU options need a compiler: torch.compile's inductor (compiled_ops.py) and pdlb's own C++
kernels (paged_attention_cpu.py). Both ask `compiler()` here, so a worker is refused at start with the
same check and message (`missing_compiler_message`), before any model loads.

`build` compiles one source file into `<cache>/<stem>-<key>.so`, where the key hashes everything
that changes the binary (the source, the compiler and its version, the flags, and with -march=native
this CPU's feature flags), so a changed source or another machine sharing the cache never loads a
stale or foreign library. Workers starting together may build the same key at once: each writes a
file of its own and renames it into place, so the one that lands is whole. At most `KEEP` libraries
per stem are kept (older keys removed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

KEEP = 4  # libraries kept per source stem in the cache
BUILD_TIMEOUT_S = 300.0


class BuildFailed(RuntimeError):
    """The compiler did not produce the library; the message holds its last lines of output."""


def compiler() -> str | None:
    """The C++ compiler to use: $CXX when set and found, else c++, g++ or clang++ on PATH; None if none."""
    for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def available() -> bool:
    """Whether a C++ compiler is found (see `compiler`)."""
    return compiler() is not None


def missing_compiler_message(flag: str, what: str) -> str:
    """The one-line refusal for `flag` when `compiler()` finds none; `what` says what it compiles."""
    return (
        f"{flag} needs a C++ compiler for {what} (c++, g++ or $CXX; on Debian: apt-get install g++); none found on PATH"
    )


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/pdlb/kernels, else ~/.cache/pdlb/kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pdlb" / "kernels"


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux), for keys of -march=native builds; '' where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build(source: Path, flags: list[str], cache_dir: Path | None = None) -> Path:
    """The shared library of `source` compiled with `flags` (plus -shared -fPIC), built now unless
    the cache holds it. Raises BuildFailed (no compiler, a compile error, or the timeout) naming why."""
    cxx = compiler()
    if cxx is None:
        raise BuildFailed("no C++ compiler found (c++, g++ or $CXX)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildFailed(f"{cxx} --version failed: {exc}") from None
    all_flags = [*flags, "-shared", "-fPIC"]
    key = hashlib.sha256()
    for part in (source.read_bytes(), cxx.encode(), version.encode(), " ".join(all_flags).encode()):
        key.update(part)
        key.update(b"\0")
    if "-march=native" in all_flags:
        key.update(_cpu_flags().encode())
    cache = cache_dir or default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / f"pdlb-kernels-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", dir=cache)
    os.close(fd)
    try:
        run = subprocess.run(
            [cxx, *all_flags, "-o", partial, str(source)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if run.returncode != 0:
            tail = " | ".join((run.stderr or run.stdout).strip().splitlines()[-5:])
            raise BuildFailed(f"{Path(cxx).name} could not build {source.name}: {tail}")
        os.replace(partial, target)
    except subprocess.TimeoutExpired:
        raise BuildFailed(f"building {source.name} took over {BUILD_TIMEOUT_S:g} s") from None
    finally:
        Path(partial).unlink(missing_ok=True)
    log.info("built %s into %s", source.name, target)
    _prune(cache, source.stem, keep=target)
    return target


def _prune(cache: Path, stem: str, keep: Path) -> None:
    """Drop the oldest libraries of `stem` beyond KEEP (a library mapped by a running process stays
    valid after its file is removed)."""

    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another worker's prune
            return 0.0

    built = sorted(cache.glob(f"{stem}-*.so"), key=mtime, reverse=True)
    for old in [p for p in built if p != keep][KEEP - 1 :]:
        old.unlink(missing_ok=True)
