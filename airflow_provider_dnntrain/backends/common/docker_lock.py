"""A lock on a Docker daemon, for every process and host that uses the daemon: a container of the
lock's name (a daemon refuses a second container of one name), never started, in which the holder
renews a lease file while it holds the lock. A lock whose lease has lapsed (its holder died) is
removed and taken by the next one asking."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from airflow_provider_dnntrain.backends.common.docker_files import put_files, read_file

log = logging.getLogger(__name__)

LEASE_LABEL = "dnntrain.io/lease-from"  # a lock's first lease, before its lease file is there
LEASE_FILE = "/dnntrain-lease"
LEASE_SECONDS = 60.0  # a lock whose lease is older is a dead holder's


@contextmanager
def daemon_lock(client, name: str, image: str, waiting_for: str) -> Iterator[None]:
    """Hold the lock ``name`` on ``client``'s daemon (its container made from ``image``, which the daemon
    has); ``waiting_for`` says, in the log, who holds it while this waits."""
    lock = _take(client, name, image, waiting_for)
    stop = threading.Event()
    renew = threading.Thread(target=_renew, args=(client, lock, stop), daemon=True)
    renew.start()
    try:
        yield
    finally:
        stop.set()
        renew.join()
        client.api.remove_container(lock, force=True)


def _take(client, name: str, image: str, waiting_for: str) -> str:
    from docker.errors import APIError, NotFound

    said = False
    while True:
        try:
            labels = {LEASE_LABEL: str(time.time())}
            lock = client.api.create_container(image, command=["true"], name=name, labels=labels)["Id"]
            _put_lease(client, lock)
            return lock
        except APIError as error:
            if error.status_code != 409:  # 409: the name is taken
                raise
        held_since = _lease_of(client, name)
        if held_since is not None and time.time() - held_since > LEASE_SECONDS:
            log.warning(
                "Lock %s: its holder is gone (lease %.0f s old); taking it", name, time.time() - held_since
            )
            with suppress(NotFound):
                client.api.remove_container(name, force=True)
        elif not said:
            log.info("Waiting for %s (lock %s)", waiting_for, name)
            said = True
        time.sleep(1)


def _renew(client, lock: str, stop: threading.Event) -> None:
    while not stop.wait(LEASE_SECONDS / 4):
        _put_lease(client, lock)


def _put_lease(client, lock: str) -> None:
    put_files(client.api, lock, {LEASE_FILE: str(time.time()).encode()})


def _lease_of(client, name: str) -> float | None:
    from docker.errors import NotFound

    lease = read_file(client.api, name, LEASE_FILE)
    if lease is not None:
        return float(lease)
    try:  # no lease file yet: the lock's creation
        return float(client.api.inspect_container(name)["Config"]["Labels"][LEASE_LABEL])
    except (NotFound, KeyError, ValueError):
        return None  # gone: take it next time round
