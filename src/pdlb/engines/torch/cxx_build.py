"""The system C++ compiler: finding it, and building a kernel's shared library once into a cache.

Two CPU options need a compiler: torch.compile's inductor (compiled_ops.py) and pdlb's own C++
kernels (paged_attention_cpu.py, decode_ops_cpu.py, built and loaded through `load`). Both ask
`compiler()` here, so a worker is refused at start with the same check and message
(`missing_compiler_message`), before any model loads.

`build` compiles one source file into `<cache>/<stem>-<key>-<digest>.so`. The key hashes everything
that changes the binary (the source and the headers beside it, which it may include, the compiler
and its version, the flags, and with -march=native
this CPU's feature flags), so a changed source or another machine sharing the cache never loads a
stale or foreign library. The digest is the library's own SHA-256 (first 16 hex digits): a cached
file whose bytes no longer match its name (truncated, overwritten) is removed and built again, since
loading a truncated library kills the process with SIGBUS inside dlopen, past any Python handler.
Workers starting together may build the same key at once: each writes a file of its own and renames
it into place, so the one that lands is whole. At most `KEEP` libraries per stem are kept (older
keys removed).

The cache is $XDG_CACHE_HOME/pdlb/kernels (else ~/.cache/pdlb/kernels). Where it cannot be written,
libraries go to a directory of this user's own under the system temp directory (created 0700; one
owned by someone else or writable by others is never used, as its files would be loaded as code),
and the reason is logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

KEEP = 4  # libraries kept per source stem in the cache
BUILD_TIMEOUT_S = 300.0


class BuildFailed(RuntimeError):
    """The compiler did not produce the library; the message holds its last lines of output."""


Loaded = TypeVar("Loaded")


def load(
    what: str,
    source: Path,
    flags: list[str],
    wrap: Callable[[Path], Loaded],
    unavailable: type[Exception],
    reason: str | None,
) -> Loaded:
    """`wrap(library)` for the library of `source` built with `flags` (`build`). `reason`: why the
    kernel cannot run on this machine, None when it can. Raises `unavailable` naming `what` and why:
    that reason, or a build or load failure (BuildFailed, OSError from the loader)."""
    if reason is not None:
        raise unavailable(f"{what} cannot run here: {reason}")
    try:
        return wrap(build(source, flags))
    except (BuildFailed, OSError) as exc:
        raise unavailable(f"{what} could not be built or loaded: {exc}") from None


FALLBACKS = ("c++", "g++", "clang++")


def _named() -> str:
    return os.environ.get("CXX", "").strip()


def compiler() -> str | None:
    """The C++ compiler to use: the one $CXX names when set (None if it names nothing runnable: a
    mistyped $CXX is not silently replaced by another compiler), else c++, g++ or clang++ on PATH;
    None if none (`compiler_problem` says why)."""
    if named := _named():
        return shutil.which(named)
    for name in FALLBACKS:
        if path := shutil.which(name):
            return path
    return None


def compiler_problem() -> str | None:
    """Why `compiler()` finds none, in one line (a $CXX naming no executable, or no compiler on
    PATH), or None when it finds one."""
    if compiler() is not None:
        return None
    if named := _named():
        return f"$CXX={named!r} names no executable file (not found on PATH; unset it to use c++ or g++)"
    return "no C++ compiler found (c++, g++ or clang++ on PATH, or $CXX)"


def available() -> bool:
    """Whether a C++ compiler is found (see `compiler`)."""
    return compiler() is not None


def missing_compiler_message(flag: str, what: str) -> str:
    """The one-line refusal for `flag` when `compiler()` finds none; `what` says what it compiles."""
    return f"{flag} needs a C++ compiler for {what}: {compiler_problem()} (on Debian: apt-get install g++)"


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
        raise BuildFailed(str(compiler_problem()))
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildFailed(f"{cxx} --version failed: {exc}") from None
    all_flags = [*flags, "-shared", "-fPIC"]
    key = hashlib.sha256()
    # the headers beside the source (shared helpers it includes) change the binary as it does
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    for part in (source.read_bytes(), *headers, cxx.encode(), version.encode(), " ".join(all_flags).encode()):
        key.update(part)
        key.update(b"\0")
    if "-march=native" in all_flags:
        key.update(_cpu_flags().encode())
    name = f"{source.stem}-{key.hexdigest()[:16]}"
    cache = cache_dir or default_cache_dir()
    for place in (cache, _private_fallback(create=False)):
        if place is not None and (found := _cached(place, name)) is not None:
            return found
    try:
        fd, partial = _scratch_file(cache, name)
    except OSError as exc:
        fallback = _private_fallback()
        if fallback is None:
            raise BuildFailed(f"neither {cache} nor a private temp directory can hold the library: {exc}") from None
        log.warning("kernel cache %s is not writable (%s); building into %s", cache, exc, fallback)
        cache = fallback
        fd, partial = _scratch_file(cache, name)
    os.close(fd)
    try:
        run = subprocess.run(
            [cxx, *all_flags, "-o", partial, str(source)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if run.returncode != 0:
            tail = " | ".join((run.stderr or run.stdout).strip().splitlines()[-5:])
            raise BuildFailed(f"{Path(cxx).name} could not build {source.name}: {tail}")
        target = cache / f"{name}-{_digest(Path(partial))}.so"
        os.replace(partial, target)
    except subprocess.TimeoutExpired:
        raise BuildFailed(f"building {source.name} took over {BUILD_TIMEOUT_S:g} s") from None
    finally:
        Path(partial).unlink(missing_ok=True)
    log.info("built %s into %s", source.name, target)
    _prune(cache, source.stem, keep=target)
    return target


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _cached(cache: Path, name: str) -> Path | None:
    """A library of `name` in `cache` whose bytes match the digest in its file name; one that does
    not is removed (or, where it cannot be, passed over) so that it is built again."""
    for candidate in sorted(cache.glob(f"{name}-*.so")):
        try:
            if candidate.name == f"{name}-{_digest(candidate)}.so":
                return candidate
            log.warning("cached kernel %s does not match its digest (damaged); removing it", candidate)
            candidate.unlink()
        except OSError:
            continue
    return None


def _scratch_file(cache: Path, name: str) -> tuple[int, str]:
    cache.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{name}.", dir=cache)


def _private_fallback(create: bool = True) -> Path | None:
    """<temp>/pdlb-kernels-<uid>, created 0700 (with `create`); None when it is missing (without
    `create`) or exists but is not this user's alone."""
    place = Path(tempfile.gettempdir()) / f"pdlb-kernels-{os.getuid()}"
    try:
        if create:
            place.mkdir(mode=0o700, exist_ok=True)
        info = place.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        log.warning("not using %s for kernels: not a directory of this user's alone", place)
        return None
    return place


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
