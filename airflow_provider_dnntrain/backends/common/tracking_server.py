"""The embedded tracking store, served to replicas that cannot reach it where it lives.

The embedded store is an SQLite file on the Airflow worker (and a tracking server may listen on the
worker's loopback only): no remote host or pod can reach either. :class:`StoreServer` serves it over
HTTP from this worker - MLflow's server run under the reaper, so it ends with the task whatever
happens - once the tracking run exists. How replicas reach it is the backend's business (the SSH
backend forwards a port on every host to it; pods connect to it directly). A tracking server the
replicas reach themselves is passed on as it is.

Whoever reaches the served store must not be able to write to it (any pod of the cluster, any user of
an SSH host): it is MLflow's basic-auth server, whose one user's password is the run's own
(:func:`store_credentials`), handed to the replicas as a secret like a tracking server's credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from airflow_provider_dnntrain.backends.common.replica import REAPER

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SERVER_START_SECONDS = 60
STORE_USER = "admin"  # MLflow basic-auth's admin: the one user of a run's served store
# MLflow's basic-auth settings, but for the credential cache: without it every request pays a password
# hash meant to be slow (170 ms of CPU here; a script logging every batch synchronously ran 6x slower).
# The one user's password never changes, so a cached check is never stale.
_AUTH_CONFIG = """[mlflow]
default_permission = READ
database_uri = sqlite:///basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 86400
"""
_STORE_KEY = ".dnntrain-store-key"


def needs_relay(uri: str) -> bool:
    """Whether a tracking URI, as the worker sees it, is out of remote replicas' reach."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file", "sqlite"):
        return True
    return parts.scheme == "http" and parts.hostname in _LOOPBACK


def serves_store(uri: str) -> bool:
    """Whether a tracking URI is a store (not a server) that :class:`StoreServer` serves from here."""
    return needs_relay(uri) and urlsplit(uri).scheme != "http"


def store_credentials(uri: str, run_id: str) -> dict[str, str]:
    """What replicas write to the served store ``uri`` with: a password for run ``run_id`` only. Every
    try of the run derives the same one (a try that takes a job over serves the store to replicas that
    have it), from a key kept beside the store, which only who can read the store can read."""
    from airflow_provider_dnntrain.tracking import PASSWORD_VAR, USERNAME_VAR

    if not serves_store(uri):
        return {}
    return {USERNAME_VAR: STORE_USER, PASSWORD_VAR: store_password(uri, run_id)}


def store_password(uri: str, run_id: str) -> str:
    return hmac.new(_store_key(uri), run_id.encode(), hashlib.sha256).hexdigest()


def _store_path(uri: str) -> Path:
    """Where a store URI's data lives: ``sqlite:///rel.db`` is relative, ``sqlite:////abs.db`` not."""
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        return Path(uri.split("://", 1)[1][1:]).absolute()
    return Path(urlsplit(uri).path if scheme == "file" else uri).absolute()


def _absolute(uri: str) -> str:
    """The URI with its path made absolute (the server runs in a folder of its own)."""
    prefix = {"sqlite": "sqlite:///", "file": "file://"}.get(urlsplit(uri).scheme, "")
    return f"{prefix}{_store_path(uri)}"


def _has_tables(uri: str) -> bool:
    """Whether a store is set up: an SQLite file with MLflow's schema version, or a file store's folder."""
    path = _store_path(uri)
    if urlsplit(uri).scheme != "sqlite":
        return path.is_dir()
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as store:
            return store.execute("SELECT version_num FROM alembic_version").fetchone() is not None
    except sqlite3.Error:
        return False


def _store_key(uri: str) -> bytes:
    path = _store_path(uri)
    folder = path.parent if urlsplit(uri).scheme == "sqlite" or path.suffix else path
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / _STORE_KEY
    with contextlib.suppress(FileExistsError):
        descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as created:
            created.write(secrets.token_hex(32))
    return key.read_bytes()


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
    """``uri``'s store served at ``target``: an MLflow server this process starts for a store
    (``listen``: its address; port 0 for a free one), or the server a loopback ``http`` URI names."""

    def __init__(
        self, uri: str, log_file: Path, run_id: str, listen: tuple[str, int] = ("127.0.0.1", 0)
    ) -> None:
        self.uri = uri
        self.log_file = log_file
        self.run_id = run_id
        self._server: subprocess.Popen | None = None
        self._watch_fd: int | None = None
        self._starting = threading.Lock()
        self._store_ready = threading.Event()
        parts = urlsplit(uri)
        self.serves_store = parts.scheme != "http"
        self._listener: socket.socket | None = None
        if self.serves_store:
            # Listening from now on: a replica that connects before the server is up waits in the
            # backlog rather than being refused (and backing off for seconds, as MLflow's client does).
            family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
            self._listener = socket.create_server(listen, family=family, backlog=128)
            self.target = (listen[0], self._listener.getsockname()[1])
        else:
            self.target = (parts.hostname or "127.0.0.1", parts.port or 80)

    def start(self, *, run_exists: bool = True) -> None:
        """The store's server (:mod:`.store_process`), under the reaper (it ends when this task process
        ends). Before the tracking run exists (``run_exists=False``: as the job is submitted, so the
        server boots while the replicas start) only for a store that has its tables: on a fresh store
        the server and the task would create them at once. Connections that come earlier wait."""
        with self._starting:
            if not (run_exists or _has_tables(self.uri)):
                return
            # One started early may have died on a store another task was still setting up.
            ended = self._server is not None and self._server.poll() is not None
            if self.serves_store and (self._server is None or (ended and run_exists)):
                self._launch()
            self._store_ready.set()

    @property
    def running(self) -> bool:
        """Whether this process's server for the store is up (or starting)."""
        return self._server is not None and self._server.poll() is None

    def _launch(self) -> None:
        if self._watch_fd is not None:  # an earlier server's, ended
            os.close(self._watch_fd)
        watch_read, self._watch_fd = os.pipe()
        command = [sys.executable, "-I", "-S", str(REAPER), "--grace", "5", "--watch-fd", str(watch_read)]
        command += ["--", sys.executable, "-m", "airflow_provider_dnntrain.backends.common.store_process"]
        command += [_absolute(self.uri), str(self._listener.fileno())]
        # The auth app keeps its one user in a database of its own, made afresh for each server.
        auth = self.log_file.with_suffix(".auth")
        shutil.rmtree(auth, ignore_errors=True)
        auth.mkdir(parents=True, mode=0o700)
        (auth / "auth.ini").write_text(_AUTH_CONFIG)
        env = {
            **os.environ,
            "MLFLOW_AUTH_CONFIG_PATH": str(auth / "auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": store_credentials(self.uri, self.run_id)[
                "MLFLOW_TRACKING_PASSWORD"
            ],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
        try:
            with open(self.log_file, "ab") as log:
                self._server = subprocess.Popen(
                    command,
                    cwd=auth,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=(watch_read, self._listener.fileno()),
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
        if self._listener is not None:
            self._listener.close()
