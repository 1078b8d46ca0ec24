"""Line-exact, redacted log streaming: a replica's pipe, and the per-rank files some launch commands
(mpirun) write because their own console output does not keep lines whole."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

_READ_SIZE = 1 << 16
_RANK_STREAMS = ("stdout", "stderr")
# A line longer than this is passed on in pieces, so one endless line cannot exhaust memory.
MAX_LINE_BYTES = 1 << 16
# A progress bar redraws its line with "\r" many times a second; show its state this often at most.
PROGRESS_INTERVAL_SECONDS = 5.0
# As Airflow's [logging] min_length_masked_secret: shorter values would mask ordinary words.
MIN_SECRET_LENGTH = 5
MASK = "***"

Publish = Callable[[str | None, list[str]], None]  # (rank label or None for the replica itself, lines)
_BREAKS = re.compile(rb"(\r\n|\n|\r)")
# A rank's line a container's bootstrap passed on from the rank's own file (mpirun's --output-filename).
RANK_LINE = re.compile(r"^\[(rank\.\d+)\] (.*)$", re.DOTALL)


class Redactor:
    """Replaces secret values with ``***`` in lines and files. A multi-line secret is also masked line
    by line, since logs are read a line at a time."""

    def __init__(self, secrets: Iterable[str], min_length: int = MIN_SECRET_LENGTH) -> None:
        pieces = set()
        for secret in secrets:
            pieces.update(p for p in [secret, *secret.splitlines()] if len(p) >= min_length)
        self._texts = sorted(pieces, key=len, reverse=True)
        self._bytes = [p.encode() for p in self._texts]

    def __bool__(self) -> bool:
        return bool(self._texts)

    def line(self, text: str) -> str:
        for secret in self._texts:
            text = text.replace(secret, MASK)
        return text

    def safe_cut(self, data: bytes, limit: int) -> int:
        """A position at most ``limit`` where ``data`` may be cut without splitting a secret (which
        would then match in neither piece) or a UTF-8 character."""
        cut = limit
        for secret in self._bytes:
            start = data.find(secret, max(0, limit - len(secret) + 1), limit + len(secret) - 1)
            if 0 <= start < cut < start + len(secret):
                cut = start
        while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
            cut -= 1
        return cut or limit

    def redact_file(self, path: Path) -> bool:
        """Rewrite ``path`` with every secret masked, streaming; returns whether it held any."""
        if not self._bytes or not _holds_any(path, self._bytes):
            return False
        overlap = max(len(s) for s in self._bytes) - 1
        masked = path.with_name(path.name + ".redacting")
        with open(path, "rb") as source, open(masked, "wb") as target:
            carry = b""
            while chunk := source.read(1 << 20):
                data = self._mask_bytes(carry + chunk)
                keep = self.safe_cut(data, max(0, len(data) - overlap))
                target.write(data[:keep])
                carry = data[keep:]
            target.write(self._mask_bytes(carry))
        os.chmod(masked, path.stat().st_mode)
        os.replace(masked, path)
        return True

    def redact_tree(self, folder: Path) -> None:
        if not self or not folder.is_dir():
            return
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                self.redact_file(path)

    def _mask_bytes(self, data: bytes) -> bytes:
        for secret in self._bytes:
            data = data.replace(secret, MASK.encode())
        return data


def _holds_any(path: Path, needles: list[bytes]) -> bool:
    overlap = max(len(n) for n in needles) - 1
    with open(path, "rb") as stream:
        carry = b""
        while chunk := stream.read(1 << 20):
            data = carry + chunk
            if any(n in data for n in needles):
                return True
            carry = data[-overlap:] if overlap else b""
    return False


class LineSplitter:
    """Bytes in, whole redacted lines out.

    A partial line waits for the rest (or for ``flush``), up to ``MAX_LINE_BYTES``. A line redrawn
    with carriage returns (progress bars) is shown as its latest state at most every
    ``PROGRESS_INTERVAL_SECONDS``, and in its final state when it ends.
    """

    def __init__(self, redactor: Redactor | None = None, clock: Callable[[], float] = time.monotonic):
        self._redactor = redactor or Redactor([])
        self._clock = clock
        self._pending = b""
        self._progress: bytes | None = None  # latest redraw not shown yet
        self._shown_progress: bytes | None = None
        self._shown_at = float("-inf")

    def feed(self, chunk: bytes) -> list[str]:
        out: list[bytes] = []
        for piece in _BREAKS.split(chunk):
            if piece in (b"\n", b"\r\n"):
                self._end_line(out)
            elif piece == b"\r":
                self._redraw(out)
            elif piece:
                self._pending += piece
                self._split_overlong(out)
        return [self._text(raw) for raw in out]

    def flush(self) -> list[str]:
        out: list[bytes] = []
        if self._pending or self._progress is not None:
            self._end_line(out)
        return [self._text(raw) for raw in out]

    def discard(self) -> None:
        """Forget a line begun but not ended (its stream was cut; it will be read again whole)."""
        self._pending, self._progress, self._shown_progress = b"", None, None

    def _end_line(self, out: list[bytes]) -> None:
        if self._pending:
            out.append(self._pending)
        elif self._progress is not None:
            out.append(self._progress)
        elif self._shown_progress is None:
            out.append(b"")  # a blank line; after a shown redraw, that redraw was the final state
        self._pending, self._progress, self._shown_progress = b"", None, None

    def _redraw(self, out: list[bytes]) -> None:
        if self._pending:
            self._progress, self._pending = self._pending, b""
        now = self._clock()
        if self._progress is not None and now - self._shown_at >= PROGRESS_INTERVAL_SECONDS:
            out.append(self._progress)
            self._shown_progress, self._progress, self._shown_at = self._progress, None, now

    def _split_overlong(self, out: list[bytes]) -> None:
        while len(self._pending) > MAX_LINE_BYTES:
            cut = self._redactor.safe_cut(self._pending, MAX_LINE_BYTES)
            out.append(self._pending[:cut])
            self._pending = self._pending[cut:]

    def _text(self, raw: bytes) -> str:
        return self._redactor.line(raw.decode("utf-8", errors="replace"))


def pump_pipe(fd: int, log_file: Path, publish: Publish, redactor: Redactor | None = None) -> None:
    """Read a pipe until EOF; write its redacted lines to ``log_file`` and publish them."""
    splitter = LineSplitter(redactor)
    with open(log_file, "a", encoding="utf-8") as log:

        def emit(lines: list[str]) -> None:
            if lines:
                log.write("".join(f"{line}\n" for line in lines))
                publish(None, lines)

        while chunk := os.read(fd, _READ_SIZE):
            emit(splitter.feed(chunk))
        emit(splitter.flush())


def follow_rank_files(
    directory: Path, publish: Publish, done: threading.Event, redactor: Redactor | None = None
) -> None:
    """Publish new lines of every ``.../rank.N/stdout|stderr`` under ``directory`` labelled ``rank.N``
    until ``done`` is set, then read what is left."""
    offsets: dict[Path, int] = {}
    splitters: dict[Path, LineSplitter] = {}
    while True:
        finished = done.is_set()  # checked before reading, so output written before exit is not lost
        for path in _rank_files(directory):
            splitter = splitters.setdefault(path, LineSplitter(redactor))
            with open(path, "rb") as stream:
                stream.seek(offsets.get(path, 0))
                while chunk := stream.read(_READ_SIZE):
                    if lines := splitter.feed(chunk):
                        publish(path.parent.name, lines)
                offsets[path] = stream.tell()
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
