"""Line-exact log streaming for the local launcher: a replica's pipe, and per-rank files some
launch commands (mpirun) write because their own console output does not keep lines whole."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

_READ_SIZE = 1 << 16
_RANK_STREAMS = ("stdout", "stderr")

Publish = Callable[[str | None, list[str]], None]  # (rank label or None for the replica itself, lines)


class LineSplitter:
    """Bytes in, whole lines out; a partial line waits for the rest (or for ``flush``)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        *complete, self._pending = (self._pending + chunk).split(b"\n")
        return [_text(raw) for raw in complete]

    def flush(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [_text(rest)] if rest else []


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")


def pump_pipe(fd: int, log_file: Path, publish: Publish) -> None:
    """Copy a pipe to ``log_file`` and publish its lines, a chunk at a time, until EOF."""
    splitter = LineSplitter()
    with open(log_file, "ab") as log:
        while chunk := os.read(fd, _READ_SIZE):
            log.write(chunk)
            if lines := splitter.feed(chunk):
                publish(None, lines)
    if rest := splitter.flush():
        publish(None, rest)


def follow_rank_files(directory: Path, publish: Publish, done: threading.Event) -> None:
    """Publish new lines of every ``.../rank.N/stdout|stderr`` under ``directory`` labelled ``rank.N``
    until ``done`` is set, then read what is left."""
    offsets: dict[Path, int] = {}
    splitters: dict[Path, LineSplitter] = {}
    while True:
        finished = done.is_set()  # checked before reading, so output written before exit is not lost
        for path in _rank_files(directory):
            splitter = splitters.setdefault(path, LineSplitter())
            with open(path, "rb") as stream:
                stream.seek(offsets.get(path, 0))
                chunk = stream.read()
                offsets[path] = stream.tell()
            if lines := splitter.feed(chunk):
                publish(path.parent.name, lines)
        if finished:
            for path, splitter in splitters.items():
                if rest := splitter.flush():
                    publish(path.parent.name, rest)
            return
        time.sleep(0.1)


def _rank_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("rank.*/*") if p.name in _RANK_STREAMS and p.is_file())
