"""The embedded tracking store, served to replicas that cannot reach it where it lives.

The embedded store is an SQLite file on the Airflow worker (and a tracking server may listen on the
worker's loopback only): no remote host or pod can reach either. :class:`StoreServer` serves it over
HTTP from this worker - an ``mlflow server`` run under the reaper, so it ends with the task whatever
happens - once the tracking run exists. How replicas reach it is the backend's business (the SSH
backend forwards a port on every host to it; pods connect to it directly). A tracking server the
replicas reach themselves is passed on as it is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from airflow_provider_dnntrain.backends.common.ports import free_port
from airflow_provider_dnntrain.backends.common.replica import REAPER

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SERVER_START_SECONDS = 60


def needs_relay(uri: str) -> bool:
    """Whether a tracking URI, as the worker sees it, is out of remote replicas' reach."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file", "sqlite"):
        return True
    return parts.scheme == "http" and parts.hostname in _LOOPBACK


def refuse_deferral_through_worker(extra_env: Mapping[str, str], replicas: str) -> None:
    """A deferred task leaves the worker: a store reached through it cannot serve ``replicas`` then."""
    tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
    if tracking_uri and needs_relay(tracking_uri):
        raise ValueError(
            "deferrable: the job's tracking store is reached through this worker (the embedded "
            f"store, or a server on its loopback), which a deferred task leaves; give {replicas} a "
            "tracking server they reach themselves (tracking_uri=http://...), or deferrable=False"
        )


class StoreServer:
    """``uri``'s store served at ``target``: an ``mlflow server`` this process starts for a store
    (``listen``: its address; port 0 for a free one), or the server a loopback ``http`` URI names."""

    def __init__(self, uri: str, log_file: Path, listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.uri = uri
        self.log_file = log_file
        self._server: subprocess.Popen | None = None
        self._watch_fd: int | None = None
        self._starting = threading.Lock()
        self._store_ready = threading.Event()
        parts = urlsplit(uri)
        self.serves_store = parts.scheme != "http"
        if self.serves_store:
            host, port = listen
            self.target = (host, port or free_port(host, taken=set()))
        else:
            self.target = (parts.hostname or "127.0.0.1", parts.port or 80)

    def start(self) -> None:
        """``mlflow server`` on the store, under the reaper (it ends when this task process ends). Only
        once the tracking run exists (the store is set up): both would create a fresh store's tables at
        once. Connections that come earlier wait for it."""
        with self._starting:
            if self.serves_store and self._server is None:
                self._launch()
            self._store_ready.set()

    def _launch(self) -> None:
        watch_read, self._watch_fd = os.pipe()
        command = [sys.executable, "-I", "-S", str(REAPER), "--grace", "5", "--watch-fd", str(watch_read)]
        command += ["--"]
        command += [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.uri]
        command += ["--host", self.target[0], "--port", str(self.target[1]), "--workers", "1"]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_file, "ab") as log:
                self._server = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=(watch_read,),
                )
        finally:
            os.close(watch_read)

    def connect(self) -> socket.socket:
        """A connection to the server, which may not be started yet, or still starting (it takes
        seconds): wait a while."""
        deadline = time.monotonic() + _SERVER_START_SECONDS
        if not self._store_ready.wait(_SERVER_START_SECONDS):
            raise OSError("the tracking run was never created, so its store is not served")
        while True:
            try:
                return socket.create_connection(self.target, timeout=10)
            except OSError:
                if time.monotonic() > deadline or (self._server and self._server.poll() is not None):
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        if self._server is not None:
            self._server.terminate()  # the reaper stops the server and waits for it
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server.wait(timeout=15)
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None
