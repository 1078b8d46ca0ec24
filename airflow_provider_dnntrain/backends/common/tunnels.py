"""A port on this worker's loopback whose connections are carried to a server this worker cannot reach
directly (``ssh -L``, ``kubectl port-forward``): each connection accepted gets its own way there."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def local_forward(open_way: Callable[[], Any]) -> Iterator[int]:
    """The port; ``open_way()`` makes, per connection, a socket-like object (``recv``, ``sendall``,
    ``close``, and ``shutdown(SHUT_WR)`` or ``shutdown_write()``) that reaches the server."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the context ended
            try:
                way = open_way()
            except Exception:
                client.close()
                continue
            threading.Thread(target=carry, args=(client, way), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def carry(client: socket.socket, way: Any) -> None:
    """Both ways; an end of one way is passed on (half-close), and both are closed once both ended."""
    ended = threading.Barrier(2)

    def pump(source: Any, sink: Any) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            _end_writing(sink)
            ended.wait(300)
        except (OSError, threading.BrokenBarrierError):
            ended.abort()  # the other way stops waiting too
        way.close()
        client.close()

    threading.Thread(target=pump, args=(way, client), daemon=True).start()
    pump(client, way)


def _end_writing(sink: Any) -> None:
    if hasattr(sink, "shutdown_write"):  # a paramiko channel
        sink.shutdown_write()
    else:
        sink.shutdown(socket.SHUT_WR)
