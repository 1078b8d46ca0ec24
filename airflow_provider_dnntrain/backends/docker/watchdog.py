"""Runs in a Docker run's watchdog container, the daemon's socket mounted at ``/var/run/docker.sock``
(standard library only, shipped): the run's reaper, for when nobody else is left to remove it.

Whoever watches the run (the task, or its trigger) renews the run's lease - the file ``lease`` beside
this script - by writing a new value into it. Once the lease has not changed for ``--timeout``
seconds (measured with this container's clock, from when it last saw it change), or it says ``stop``
(a task being killed asks for its run's end this way, then may die), the watchdog stops every
container of the run (``--grace`` seconds each before SIGKILL), removes them and the run's network,
then removes its own container.

Run: python watchdog.py --run LABEL_VALUE --timeout SECONDS --grace SECONDS
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import time
import urllib.parse

SOCKET = "/var/run/docker.sock"
LEASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lease")
RUN_LABEL = "dnntrain.io/run"
CHECK_SECONDS = 1.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def call(method: str, path: str, timeout: float = 60):
    connection = _UnixConnection(SOCKET, timeout)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        body = answer.read()
    finally:
        connection.close()
    return answer.status, json.loads(body) if body[:1] in (b"[", b"{") else None


def _lease() -> str:
    try:
        with open(LEASE) as lease:
            return lease.read().strip()
    except OSError:
        return ""


def wait_for_lapse(timeout: float) -> str:
    """Return once the lease says ``stop`` or has not changed for ``timeout`` seconds: which."""
    seen, since = _lease(), time.monotonic()
    while True:
        time.sleep(CHECK_SECONDS)
        now = _lease()
        if now == "stop":
            return "asked to stop"
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > timeout:
            return f"lease not renewed for {timeout:g} s"


def remove_run(run: str, grace: float) -> None:
    """Every container of the run stopped, then removed with the run's networks; this one last."""
    filters = urllib.parse.quote(json.dumps({"label": [f"{RUN_LABEL}={run}"]}))
    _, found = call("GET", f"/containers/json?all=1&filters={filters}")
    me = socket.gethostname()
    others = [c["Id"] for c in found or [] if not c["Id"].startswith(me)]
    for container in others:
        call("POST", f"/containers/{container}/kill?signal=SIGTERM")
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(c) for c in others):
        time.sleep(0.5)
    for container in others:  # SIGKILL for those still running
        call("DELETE", f"/containers/{container}?force=1&v=1")
    _, networks = call("GET", f"/networks?filters={filters}")
    for network in networks or []:
        call("DELETE", f"/networks/{network['Id']}")
    call("DELETE", f"/containers/{me}?force=1")


def _running(container: str) -> bool:
    status, found = call("GET", f"/containers/{container}/json")
    return status == 200 and bool(found["State"]["Running"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--grace", type=float, default=10.0)
    args = parser.parse_args()
    why = wait_for_lapse(args.timeout)
    print(f"dnntrain watchdog: {why}; removing run {args.run}", flush=True)
    remove_run(args.run, args.grace)


if __name__ == "__main__":
    main()
