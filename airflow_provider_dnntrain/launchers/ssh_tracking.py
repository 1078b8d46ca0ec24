"""Rank 0's ``mlflow.log_metric`` from a remote host, when the tracking store lives on the Airflow worker.

The embedded store is an SQLite file on the worker (and a tracking server may listen on the worker's
loopback only): no remote host can reach either. The relay serves the store over HTTP on the worker's
loopback (an ``mlflow server`` run under the reaper, so it ends with the task whatever happens), and
forwards one port on every host's loopback to it through that host's SSH connection (a remote port
forward): the replicas see ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``, the same on every host.
A tracking server the hosts can reach themselves is passed on as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from airflow_provider_dnntrain.launchers.base import REAPER
from airflow_provider_dnntrain.launchers.local_ports import free_port
from airflow_provider_dnntrain.launchers.ssh_remote import RemoteHost

log = logging.getLogger(__name__)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SERVER_START_SECONDS = 60


def needs_relay(uri: str) -> bool:
    """Whether a tracking URI, as the worker sees it, is out of the hosts' reach."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file", "sqlite"):
        return True
    return parts.scheme == "http" and parts.hostname in _LOOPBACK


def refuse_deferral_through_worker(extra_env, replicas: str) -> None:
    """A deferred task leaves the worker: a store reached through it cannot serve ``replicas`` then."""
    tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
    if tracking_uri and needs_relay(tracking_uri):
        raise ValueError(
            "deferrable: the job's tracking store is reached through this worker (the embedded "
            f"store, or a server on its loopback), which a deferred task leaves; give {replicas} a "
            "tracking server they reach themselves (tracking_uri=http://...), or deferrable=False"
        )


class TrackingRelay:
    def __init__(self, uri: str, log_file: Path, listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.uri = uri
        self.log_file = log_file
        self._server: subprocess.Popen | None = None
        self._watch_fd: int | None = None
        self._hosts: list[RemoteHost] = []
        self.remote_port: int | None = None
        self._starting = threading.Lock()
        self._store_ready = threading.Event()
        parts = urlsplit(uri)
        self.serves_store = parts.scheme != "http"
        if self.serves_store:
            host, port = listen
            self.target = (host, port or free_port(host, taken=set()))
        else:
            self.target = (parts.hostname or "127.0.0.1", parts.port or 80)

    def start_server(self) -> None:
        """``mlflow server`` on the store, under the reaper (it ends when this task process ends). Only
        once the tracking run exists (the store is set up): both would create a fresh store's tables at
        once. Connections that come earlier wait for it."""
        with self._starting:
            if self.serves_store and self._server is None:
                self._launch_server()
            self._store_ready.set()

    def _launch_server(self) -> None:
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

    @property
    def replica_uri(self) -> str:
        return f"http://127.0.0.1:{self.remote_port}"

    def forward(self, hosts: list[RemoteHost], port: int | None = None) -> str:
        """Forward one port, the same on every host, to the store; return the URI replicas use.
        ``port``: the one a resumed job's replicas already use (their forward ended with the worker)."""
        candidates = [port] if port else [random.randrange(10000, 32000) for _ in range(50)]
        for candidate in candidates:
            if self._forward_on_all(hosts, candidate):
                self._hosts, self.remote_port = list(hosts), candidate
                for host in hosts:
                    host.on_reconnect.append(self._forward_again)
                return self.replica_uri
        raise RuntimeError("could not forward a port to the tracking store on every host")

    def _forward_on_all(self, hosts: list[RemoteHost], port: int) -> bool:
        forwarded = []
        try:
            for host in hosts:
                transport = host.connect().client.get_transport()
                transport.request_port_forward("127.0.0.1", port, handler=self._relay)
                forwarded.append(host)
            return True
        except Exception:  # taken on one of them: give the others back
            for host in forwarded:
                with contextlib.suppress(Exception):
                    host.client.get_transport().cancel_port_forward("127.0.0.1", port)
            return False

    def _forward_again(self, host: RemoteHost) -> None:
        """The host's connection dropped and was made again: its forward went with the old one."""
        try:
            transport = host.client.get_transport()
            transport.request_port_forward("127.0.0.1", self.remote_port, handler=self._relay)
        except Exception as error:  # held by the old session still, on the host's side
            log.warning(
                "Host %s: the tracking store could not be forwarded to port %s again (%s); tracking "
                "calls from that host fail until its connection is made again",
                host.spec,
                self.remote_port,
                error,
            )

    def _relay(self, channel, origin, server) -> None:
        threading.Thread(target=self._serve, args=(channel,), daemon=True).start()

    def _serve(self, channel) -> None:
        try:
            upstream = self._connect_upstream()
        except OSError:
            channel.close()
            return
        threading.Thread(target=_pump, args=(upstream, channel), daemon=True).start()
        _pump(channel, upstream)

    def _connect_upstream(self) -> socket.socket:
        """The server may not be started yet, or still starting (it takes seconds): wait a while."""
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
        for host in self._hosts:
            with contextlib.suppress(ValueError):
                host.on_reconnect.remove(self._forward_again)
            with contextlib.suppress(Exception):
                host.client.get_transport().cancel_port_forward("127.0.0.1", self.remote_port)
        self._hosts = []
        if self._server is not None:
            self._server.terminate()  # the reaper stops the server and waits for it
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server.wait(timeout=15)
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None


def _pump(source, sink) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR) if isinstance(sink, socket.socket) else sink.shutdown_write()
