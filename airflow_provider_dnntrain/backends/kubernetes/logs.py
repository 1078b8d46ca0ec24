"""Every pod's log of a Kubernetes run, followed: one stream per pod, opened once its main container has
started and opened again (from where it stopped) if it ends early - nothing per poll.

This is the one follower that both the launcher's own wait and the deferred wait on the triggerer use.
:class:`PodLogFollower` makes every decision - what to ask the API for, which bytes make which lines,
which lines are new, how they are labelled, when a stream is worth opening again - and
:class:`PodLogs` keeps what they yield for whoever logs it. The two drivers below only carry bytes: one
in a thread with the ``kubernetes`` client (the task's wait), one as a task on an event loop with
``kubernetes_asyncio`` (the trigger).

Lines carry kubelet's timestamps, and a cursor per pod (the last timestamp read, and how many lines had
it) is how a stream opened again - or another process taking the job over - skips exactly what was
already logged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from airflow_provider_dnntrain.backends.base import LogLine
from airflow_provider_dnntrain.backends.common.lines import RANK_LINE, LineSplitter, Redactor
from airflow_provider_dnntrain.backends.kubernetes.run import KubernetesRun

log = logging.getLogger(__name__)
READ_SIZE = 65536
REOPEN_SECONDS = 0.5  # after a stream ended early (a dropped connection, a kubelet restart)
CURSOR_SAVE_SECONDS = 10.0
_TAIL_LINES = 20
_STAMP_BYTES = 64  # kubelet's RFC 3339 timestamp, with room


@dataclass(frozen=True, order=True)
class Timestamp:
    """An RFC 3339 timestamp as kubelet writes it (nanoseconds, trailing zeros trimmed), comparable."""

    seconds: int
    nanos: int

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        whole, _, fraction = text.rstrip("Z").partition(".")
        moment = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        return cls(int(moment.timestamp()), int((fraction or "0").ljust(9, "0")[:9]))


@dataclass
class LogCursor:
    """How far a pod's log has been logged: the last line's timestamp, and how many lines had it."""

    last: str = ""
    at_last: int = 0
    _resume_at: Timestamp | None = None
    _skip: int = 0

    def resume(self) -> None:
        """A stream opens again (from earlier than needed): what it repeats is skipped."""
        self._resume_at = Timestamp.parse(self.last) if self.last else None
        self._skip = self.at_last

    def accepts(self, stamp: str) -> bool:
        """Whether a line stamped ``stamp`` is new; if it is, the cursor moves past it."""
        if self.is_new(stamp):
            self.commit(stamp)
            return True
        return False

    def is_new(self, stamp: str) -> bool:
        """Whether a line stamped ``stamp``, read after :meth:`resume`, was not logged yet."""
        try:
            moment = Timestamp.parse(stamp)
        except ValueError:
            return True  # not stamped (cannot happen with timestamps=true): never lose a line
        if self._resume_at is not None:
            if moment < self._resume_at:
                return False
            if moment == self._resume_at and self._skip > 0:
                self._skip -= 1
                return False
            self._resume_at = None
        return True

    def commit(self, stamp: str) -> None:
        """A new line stamped ``stamp`` was logged whole."""
        try:
            same = bool(self.last) and Timestamp.parse(stamp) == Timestamp.parse(self.last)
        except ValueError:
            return
        if same:
            self.at_last += 1
        else:
            self.last, self.at_last = stamp, 1

    def since_seconds(self) -> int | None:
        """What to ask for when reading again: a little more than needed (clocks differ); the rest is
        skipped by timestamp."""
        if not self.last:
            return None
        return max(1, math.ceil(time.time() - Timestamp.parse(self.last).seconds) + 5)


def _position(last: str, at_last: int) -> tuple[Timestamp, int]:
    return Timestamp.parse(last), at_last


class PodLogs:
    """The run's pods' logs as they are followed: each pod's cursor, the lines read but not handed out
    yet, each replica's last lines, and how far lines were handed out (what is saved, so that whoever
    carries on from here reads again what was read but not logged)."""

    def __init__(self, run: KubernetesRun, redactor: Redactor) -> None:
        self.run = run
        self.redactor = redactor
        self.cursors: dict[str, LogCursor] = {}
        self.tails: dict[str, collections.deque] = {}
        self.closing = threading.Event()  # set when nothing more is to be read
        self._lines: list[LogLine] = []
        self._queued_up_to: dict[str, list] = {}  # cursor as of the last line queued
        self._logged_up_to: dict[str, list] = {}  # ... and of the last handed out
        self._cursors_saved_at = 0.0
        self._saved_cursors: dict = {}
        self._lock = threading.Lock()
        self.take_cursors(run.cursors)

    def follower(self, pod: str, ended: Callable[[str], bool]) -> PodLogFollower:
        """A follower of ``pod``'s log; ``ended(replica)``: whether the replica's container has ended
        (its log then has no more to give once a stream reaches its end)."""
        return PodLogFollower(self, pod, ended)

    def cursor_of(self, pod: str) -> LogCursor:
        return self.cursors.setdefault(pod, LogCursor())

    def take_texts(self, pod: str, texts: list[str]) -> None:
        """New text of a pod's log, queued for :meth:`take_lines`, the pod's cursor as of now with it."""
        cursor, replica = self.cursor_of(pod), self.run.replica_of(pod)
        taken = [self._labelled(replica, text) for text in texts]
        with self._lock:
            self._lines.extend(taken)
            self._queued_up_to[pod] = [cursor.last, cursor.at_last]
            for line in taken:  # a rank's lines are its runner's, whichever pod they were printed in
                owner = line.replica.split("/", 1)[0]
                self.tails.setdefault(owner, collections.deque(maxlen=_TAIL_LINES)).append(line.text)

    def _labelled(self, replica: str, text: str) -> LogLine:
        """A rank's line a pod passed on from its per-rank file (``[rank.N] ...``) is the runner's rank's,
        whichever pod it ran in, labelled as every launcher labels it."""
        match = RANK_LINE.match(text) if self.run.plan.hosts else None
        if match:
            return LogLine(f"{self.run.plan.replicas[0].name}/{match.group(1)}", match.group(2))
        return LogLine(replica, text)

    def take_lines(self) -> list[LogLine]:
        with self._lock:
            lines, self._lines = self._lines, []
            self._logged_up_to.update(self._queued_up_to)
        return lines

    def has_lines(self) -> bool:
        return bool(self._lines)

    def cursor_state(self) -> dict[str, list]:
        """How far each pod's log has been handed out by :meth:`take_lines` (and so logged)."""
        with self._lock:
            return {pod: list(at) for pod, at in self._logged_up_to.items()}

    def cursors_due(self) -> bool:
        """Whether the cursors moved since they were last saved, at most every few seconds."""
        now, state = time.monotonic(), self.cursor_state()
        if now - self._cursors_saved_at < CURSOR_SAVE_SECONDS or state == self._saved_cursors:
            return False
        self._cursors_saved_at, self._saved_cursors = now, state
        return True

    def take_cursors(self, saved: dict[str, list]) -> None:
        """Cursors another watcher left (on the run's owner): whichever got further wins."""
        for pod, (last, at_last) in saved.items():
            mine = self.cursors.get(pod)
            if mine is None or not mine.last or _position(last, at_last) > _position(mine.last, mine.at_last):
                self.cursors[pod] = LogCursor(last, at_last)
                self._logged_up_to[pod] = [last, at_last]


class PodLogFollower:
    """One pod's log, followed: what to open it with, what its bytes say, and whether to open it again.

    Its text goes through the :class:`LineSplitter` every backend uses (lines of any length in bounded
    pieces, progress bars redrawn with ``\r`` shown every few seconds, secrets masked). A line counts
    as logged - the pod's cursor moves past it - once its end has been read: a stream cut in the
    middle of a line is opened again before it, and the line comes whole.
    """

    def __init__(self, logs: PodLogs, pod: str, ended: Callable[[str], bool]) -> None:
        self.logs = logs
        self.pod = pod
        self.replica = logs.run.replica_of(pod)
        self._ended = ended
        self._splitter = LineSplitter(logs.redactor)
        self._head = b""  # the start of a line whose timestamp is not whole yet
        self._stamp: str | None = None  # the line being read: its timestamp, if it is a new line
        self._in_line = False

    def open_arguments(self) -> dict[str, Any]:
        """``read_namespaced_pod_log``'s arguments besides the pod and the namespace, for a stream that
        starts where the last one stopped (the cursor skips what it repeats)."""
        cursor = self.logs.cursor_of(self.pod)
        cursor.resume()
        self._head, self._stamp, self._in_line = b"", None, False
        self._splitter.discard()
        arguments: dict[str, Any] = {
            "follow": True,
            "timestamps": True,
            "container": self.logs.run.container,
            "_preload_content": False,
        }
        if (since := cursor.since_seconds()) is not None:
            arguments["since_seconds"] = since
        return arguments

    def feed(self, chunk: bytes) -> None:
        texts: list[str] = []
        data = self._head + chunk
        self._head = b""
        while data:
            if not self._in_line:  # a line starts with kubelet's timestamp and a space
                space = data.find(b" ", 0, _STAMP_BYTES)
                if space < 0 and len(data) < _STAMP_BYTES:
                    self._head = data
                    break
                stamp = data[:space].decode(errors="replace") if space >= 0 else ""
                data = data[space + 1 :] if space >= 0 else data
                self._in_line = True
                self._stamp = stamp if self.logs.cursor_of(self.pod).is_new(stamp) else None
            end = data.find(b"\n")
            piece, data = (data, b"") if end < 0 else (data[: end + 1], data[end + 1 :])
            if self._stamp is not None:
                texts.extend(self._splitter.feed(piece))
            if end >= 0:
                self._line_ended()
        self.logs.take_texts(self.pod, texts)

    def _line_ended(self) -> None:
        if self._stamp is not None:
            self.logs.cursor_of(self.pod).commit(self._stamp)
        self._stamp, self._in_line = None, False

    def stream_ended(self, cut: bool) -> bool:
        """The stream ended - whole, or ``cut`` (a dropped connection, an error); whether to open it
        again: always after a cut (a line left half read comes again whole), else not once the
        replica's container has ended, whose log then has nothing more to give; never when the run is
        closing."""
        if not cut and self._in_line:  # the log's last line, with no newline after it
            if self._stamp is not None:
                self.logs.take_texts(self.pod, self._splitter.flush())
            self._line_ended()
        if self.logs.closing.is_set():
            return False
        return cut or not self._ended(self.replica)


def follow_in_thread(core, follower: PodLogFollower, opened: Callable[[Any], None], timeout: float) -> None:
    """Drive ``follower`` with the ``kubernetes`` client ``core`` until it is done; ``opened`` hears of
    every response, so that a stop can shut it. ``timeout``: for connecting, and for a stream silent
    that long (a half-open connection), which is then opened again."""
    namespace = follower.logs.run.namespace
    while True:
        cut = False
        try:
            response = core.read_namespaced_pod_log(
                follower.pod, namespace, _request_timeout=(timeout, timeout), **follower.open_arguments()
            )
            opened(response)
            for chunk in response.stream(amt=READ_SIZE, decode_content=True):
                follower.feed(chunk)
        except Exception as error:  # the pod went away, or the connection dropped: the follower decides
            log.debug("log stream of pod %s ended: %r", follower.pod, error)
            cut = not _gone(error)
        if not follower.stream_ended(cut) or follower.logs.closing.wait(REOPEN_SECONDS):
            return


async def follow_on_loop(core, follower: PodLogFollower, then: Callable[[], None], timeout: float) -> None:
    """Drive ``follower`` with the ``kubernetes_asyncio`` client ``core`` until it is done; ``then`` after
    every chunk (the trigger logs what it made at once). ``timeout`` as for :func:`follow_in_thread`."""
    namespace = follower.logs.run.namespace
    while True:
        cut = False
        try:
            response = await core.read_namespaced_pod_log(
                follower.pod, namespace, _request_timeout=(timeout, timeout), **follower.open_arguments()
            )
            async with response:
                if response.status >= 300:  # kubernetes_asyncio hands streams over unchecked
                    raise StreamRefused(response.status, await response.text())
                async for chunk in response.content.iter_any():
                    follower.feed(chunk)
                    then()
        except Exception as error:  # as above: the follower decides
            log.debug("log stream of pod %s ended: %r", follower.pod, error)
            cut = not _gone(error)
        reopen = follower.stream_ended(cut)
        then()
        if not reopen:
            return
        await asyncio.sleep(REOPEN_SECONDS)


class StreamRefused(Exception):
    """The API server answered a log stream's request with an error."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:200]}")
        self.status = status


def _gone(error: BaseException) -> bool:
    """Whether a stream failed because its pod is gone (nothing more to read), not by a fault."""
    return getattr(error, "status", None) == 404
