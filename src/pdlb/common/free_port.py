"""Choosing a TCP port for a server that another process will bind later.

A port found free now can be taken before the child binds it. The usual taker is the kernel
itself: every `bind(("", 0))` and outgoing connection draws from the ephemeral range
(`/proc/sys/net/ipv4/ip_local_port_range`, 32768-60999 on Linux by default). A vLLM server with
several DP ranks opens dozens of such sockets while it starts, so a port chosen from that range
for the next server could be handed to the first one's engine cores, and the second server then
died with "Address already in use". Ports below the ephemeral range are never handed out
implicitly, so choosing there leaves only processes that name a port explicitly as rivals.
"""

from __future__ import annotations

import collections
import random
import socket
import threading

# ports we handed out recently, never handed out twice while their owner may not have bound yet;
# bounded, oldest forgotten first
_recent: collections.deque[int] = collections.deque(maxlen=4096)
_lock = threading.Lock()
LOWEST = 10000  # below: well-known and registered services, more likely bound by name


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int] | None:
    """The kernel's ephemeral port range (first, last), inclusive; None where it cannot be read."""
    try:
        with open(path) as file:
            first, last = (int(part) for part in file.read().split())
        return first, last
    except (OSError, ValueError):
        return None


def explicit_range(ephemeral: tuple[int, int] | None) -> tuple[int, int] | None:
    """The half-open range [low, high) outside `ephemeral` to choose from: below it when at least
    1000 ports lie between LOWEST and its start, else above it when 1000 ports lie there; None
    (bind port 0 instead) when neither holds."""
    if ephemeral is None:
        return None
    first, last = ephemeral
    if first - LOWEST >= 1000:
        return LOWEST, first
    if 65536 - (last + 1) >= 1000:
        return last + 1, 65536
    return None


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing is bound to now, outside the kernel's ephemeral range
    (see the module's docstring) and not handed out by this process recently. Falls back to the
    kernel's choice (bind port 0) when no such range exists or 64 random tries all find a port
    in use."""
    span = explicit_range(ephemeral_range())
    with _lock:
        if span is not None:
            for _ in range(64):
                port = random.randrange(*span)
                if port not in _recent and _bindable(host, port):
                    _recent.append(port)
                    return port
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        _recent.append(port)
        return port
