"""Exec a command with a private, empty /tmp in which named directories of the real /tmp stay.

    python3 private_tmp.py [DIR ...] -- COMMAND [ARG ...]

Run it as root inside a fresh mount namespace (`unshare --mount --propagation private`): it mounts
a tmpfs over /tmp, as a container has, then binds each DIR (a directory directly under /tmp: the
checkout, a virtualenv, the working directory) from the real /tmp back to the same path, so the
command finds its programs and code wherever they were installed. Everything else the command
writes to /tmp stays private and goes away with the namespace.
"""

from __future__ import annotations

import ctypes
import os
import sys

MS_BIND = 4096
MS_REC = 16384
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def main(argv: list[str]) -> None:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        raise SystemExit("usage: private_tmp.py [DIR ...] -- COMMAND [ARG ...]")
    split = argv.index("--")
    keep, command = argv[:split], argv[split + 1 :]
    # A handle on the real /tmp, still reachable through /proc once the tmpfs hides it.
    real = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
    _mount("tmpfs", "/tmp", "tmpfs", 0)
    for path in keep:
        name = os.path.relpath(path, "/tmp")
        if name.startswith("..") or "/" in name or name == ".":
            raise SystemExit(f"private_tmp.py: {path} is not a directory directly under /tmp")
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{real}/{name}", path, None, MS_BIND | MS_REC)
    os.close(real)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
