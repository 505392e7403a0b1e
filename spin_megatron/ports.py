"""TCP ports: whether one is free, and picking ones that stay free until they are bound.

Where this project hosts a rendezvous itself it binds port 0 and publishes what the OS chose (``spawn_local``'s
store, the weight-update group's store): nothing to pick. Where another program binds the port (an SGLang server,
its router, a torchrun agent, slurmctld in the tests), a port has to be chosen first and handed over. Picking it
by binding port 0 and letting it go, the usual trick, returns a port from the kernel's *ephemeral* range — the
range the kernel also hands to every outgoing connection, so any HTTP client on the machine can take it in the
moment before the real owner binds it (this made a test run fail with EADDRINUSE). :func:`pick_free_port`
draws at random below that range instead, where only an explicit ``bind`` can collide, and random so that two
processes picking at once do not both take the first free port.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 20000  # below: registered services and Ray's worker ports (10002-19999 by default)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux default 32768–60999)."""
    try:
        low, high = (int(x) for x in _EPHEMERAL.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def port_free(host: str, port: int) -> bool:
    """Nobody listens on (or holds) ``host:port``: a server could bind it now. TIME_WAIT leftovers do not count,
    as servers bind with SO_REUSEADDR."""
    if not 0 < port <= 65535:
        return False
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_port_free(host: str, port: int, timeout_s: float) -> bool:
    """True once ``host:port`` is free, False if it is still taken after ``timeout_s`` (a killed server's
    children may hold its socket for a moment)."""
    deadline = time.monotonic() + timeout_s
    while not port_free(host, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def pick_free_port(host: str = "127.0.0.1", span: int = 1, *, rng: random.Random | None = None) -> int:
    """A port ``p`` with ``p .. p+span-1`` all free on ``host`` now, drawn at random below the ephemeral range
    (above it when the kernel's range leaves no room below)."""
    low, high = ephemeral_range()
    if low - span > LOWEST + 1000:
        candidates = range(LOWEST, low - span + 1)
    else:
        candidates = range(high + 1, 65536 - span + 1)
    draw = rng or random.SystemRandom()
    for _ in range(200):
        port = draw.choice(candidates)
        if all(port_free(host, port + offset) for offset in range(span)):
            return port
    raise OSError(
        f"no {span} consecutive free TCP port(s) on {host} in [{candidates.start}, {candidates.stop})"
    )
