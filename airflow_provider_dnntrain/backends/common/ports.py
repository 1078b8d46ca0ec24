"""Free ports on this host for the local launcher's replicas."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from airflow_provider_dnntrain.topology import Endpoint


class FreePortPlacement:
    """Every replica on 127.0.0.1, each on a port that is free when planned.

    Ports come from below the kernel's ephemeral range, so no outgoing connection can be handed one
    between planning and the replica binding it; ``submit`` checks them again right before starting.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._ports: dict[tuple[str, int], int] = {}
        self.runs_as_root = os.geteuid() == 0

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint:
        key = (role, index)
        if key not in self._ports:
            self._ports[key] = free_port(self._host, taken=set(self._ports.values()))
        return Endpoint(self._host, self._ports[key])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str, taken: set[int]) -> int:
    low, _ = _ephemeral_range()
    if low > 11000:
        for _ in range(200):
            port = random.randrange(10000, low)
            if port not in taken and port_is_free(host, port):
                return port
    while True:  # no room below the ephemeral range: let the kernel choose
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port
