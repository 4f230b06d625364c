"""Free loopback port allocation for listeners the tests configure by number."""

from __future__ import annotations

import random
import socket

# Below the kernel's ephemeral range (32768+), so outgoing connections made during load tests
# never sit on a port we are about to hand to a listener.
_LOW, _HIGH = 20000, 32000
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now and that this test session has not handed out before."""
    for _ in range(200):
        port = random.randint(_LOW, _HIGH)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port found")


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
