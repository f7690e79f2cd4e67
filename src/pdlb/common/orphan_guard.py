"""Run a command that dies with its parent: `python -m pdlb.common.orphan_guard PARENT_PID -- CMD...`.

It arms the parent-death signal and then execs the command (the setting survives exec), so a killed
parent leaves no orphans. This replaces subprocess's preexec_fn, which can deadlock the child
between fork and exec when the parent has threads.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, separator, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if separator != "--" or not command:
        raise SystemExit("usage: python -m pdlb.common.orphan_guard PARENT_PID -- CMD [ARGS...]")
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: no parent-death signal, the parent's ordered shutdown still applies
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        raise SystemExit(1)
    os.execvp(command[0], command)


def guarded(argv: list[str]) -> list[str]:
    """argv wrapped so that the process gets SIGTERM when this process (its parent) dies."""
    return [sys.executable, "-m", "pdlb.common.orphan_guard", str(os.getpid()), "--", *argv]


if __name__ == "__main__":
    main()
