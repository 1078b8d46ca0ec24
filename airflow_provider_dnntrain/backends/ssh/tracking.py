"""Rank 0's ``mlflow.log_metric`` from a remote host, when the tracking store lives on the Airflow worker.

The store is served on the worker's loopback (:class:`StoreServer`), and one port on every host's
loopback is forwarded to it through that host's SSH connection (a remote port forward): the replicas
see ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``, the same on every host.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
from pathlib import Path

from airflow_provider_dnntrain.backends.common.tracking_server import StoreServer
from airflow_provider_dnntrain.backends.ssh.remote import RemoteHost

log = logging.getLogger(__name__)


class TrackingRelay:
    """The store's server on this worker, and the forwards that bring it to every host's loopback."""

    def __init__(self, uri: str, log_file: Path, run_id: str) -> None:
        self.server = StoreServer(uri, log_file, run_id)
        self.server.start(run_exists=False)  # boots while the source ships, if the store is set up
        self._hosts: list[RemoteHost] = []
        self.remote_port: int | None = None

    def start_server(self) -> None:
        """Serve the store (once the tracking run exists: see :meth:`StoreServer.start`)."""
        self.server.start()

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
            upstream = self.server.connect()
        except OSError:
            channel.close()
            return
        threading.Thread(target=_pump, args=(upstream, channel), daemon=True).start()
        _pump(channel, upstream)

    def close(self) -> None:
        for host in self._hosts:
            with contextlib.suppress(ValueError):
                host.on_reconnect.remove(self._forward_again)
            with contextlib.suppress(Exception):
                host.client.get_transport().cancel_port_forward("127.0.0.1", self.remote_port)
        self._hosts = []
        self.server.close()


def _pump(source, sink) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR) if isinstance(sink, socket.socket) else sink.shutdown_write()
