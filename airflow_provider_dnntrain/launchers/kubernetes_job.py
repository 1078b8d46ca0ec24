"""A Kubernetes run as it goes: its pods' states, gang semantics over them, and every pod's log.

Each pod's log is read by one follow stream, opened once its main container has started and opened
again (from where it stopped) if it ends early: nothing per poll. Lines carry kubelet's timestamps,
and a cursor per pod (the last timestamp read, and how many lines had it) is how a stream opened
again - or another process taking the job over - skips exactly what was already logged.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from airflow_provider_dnntrain.launchers.base import JobHandle, JobState, JobStatus, LogLine, aggregate_status
from airflow_provider_dnntrain.launchers.kubernetes_manifests import (
    CURSORS_ANNOTATION,
    MAIN_CONTAINER,
    RUN_LABEL,
    pod_hosts,
    pod_name,
)
from airflow_provider_dnntrain.launchers.local_logs import Redactor
from airflow_provider_dnntrain.topology import JobPlan

log = logging.getLogger(__name__)
_TAIL_LINES = 20
CURSOR_SAVE_SECONDS = 10.0
_RANK_LINE = re.compile(r"^\[(rank\.\d+)\] (.*)$", re.DOTALL)
_IMAGE_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
_CONFIG_FAILURES = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")


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
        if self.last and moment == Timestamp.parse(self.last):
            self.at_last += 1
        else:
            self.last, self.at_last = stamp, 1
        return True

    def since_seconds(self) -> int | None:
        """What to ask for when reading again: a little more than needed (clocks differ); the rest is
        skipped by timestamp."""
        if not self.last:
            return None
        return max(1, math.ceil(time.time() - Timestamp.parse(self.last).seconds) + 5)


@dataclass
class KubernetesJobHandle(JobHandle):
    run_id: str
    plan: JobPlan
    job: str
    namespace: str
    run_dir: Path
    launch_id: str
    redactor: Redactor
    owner_uid: str = ""
    pod_manifests: list[dict] = field(default_factory=list)  # created once pending values are given
    awaiting: set[str] = field(default_factory=set)
    provided: dict[str, str] = field(default_factory=dict)
    pods_created_at: float | None = None
    cursors: dict[str, LogCursor] = field(default_factory=dict)
    status: JobStatus = field(default_factory=lambda: JobStatus(JobState.RUNNING))
    cancelled: bool = False
    stopped: bool = False
    relay: Any = None
    relay_uri: str | None = None
    settings: Any = None  # the RunSettings its pods were rendered with
    container: str = MAIN_CONTAINER  # the replicas' container: its log is the replica's
    workload: dict | None = None  # the Kubeflow job that makes the pods (group, version, plural, kind)
    seen: set[str] = field(default_factory=set)  # pods listed at least once
    launch_env: dict[str, str] = field(default_factory=dict)
    last_poll: float = 0.0
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    tails: dict[str, collections.deque] = field(default_factory=dict)
    _lines: list[LogLine] = field(default_factory=list)
    _readers: dict[str, threading.Thread] = field(default_factory=dict)
    _responses: dict[str, Any] = field(default_factory=dict)
    _queued_up_to: dict[str, list] = field(default_factory=dict)  # cursor as of the last line queued
    _logged_up_to: dict[str, list] = field(default_factory=dict)  # ... and of the last handed out
    _cursors_saved_at: float = 0.0
    _saved_cursors: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closing: threading.Event = field(default_factory=threading.Event)

    @property
    def selector(self) -> str:
        """The label selector of every pod of the run."""
        return f"{RUN_LABEL}={self.job}"

    @property
    def pod_names(self) -> list[str]:
        return [pod_name(host) for host, _ in pod_hosts(self.plan)]

    def replica_of(self, pod: str) -> str:
        """The replica a pod runs, or for a node a runner reaches over SSH, ``node-<i>``."""
        for host, replica in pod_hosts(self.plan):
            if pod_name(host) == pod:
                return replica.name if replica is not None else pod[len(self.job) + 1 :]
        return pod[len(self.job) + 1 :]

    # -- logs -----------------------------------------------------------------------------------

    def follow(self, core, pod: str) -> None:
        """Start reading ``pod``'s log unless a reader already does."""
        if pod in self._readers or self._closing.is_set():
            return
        reader = threading.Thread(target=self._read, args=(core, pod), name=f"log-{pod}", daemon=True)
        self._readers[pod] = reader
        reader.start()

    def cursor_of(self, pod: str) -> LogCursor:
        return self.cursors.setdefault(pod, LogCursor())

    def _read(self, core, pod: str) -> None:
        cursor = self.cursor_of(pod)
        replica = self.replica_of(pod)
        while not self._closing.is_set():
            cursor.resume()
            kwargs: dict[str, Any] = {"follow": True, "timestamps": True, "container": self.container}
            if (since := cursor.since_seconds()) is not None:
                kwargs["since_seconds"] = since
            try:
                response = core.read_namespaced_pod_log(pod, self.namespace, _preload_content=False, **kwargs)
                self._responses[pod] = response
                self._consume(response, cursor, replica)
            except Exception as error:  # the pod went away, or the connection dropped: decided below
                log.debug("log stream of pod %s ended: %r", pod, error)
            if self.exit_codes.get(replica) is not None or self.stopped:
                return
            self._closing.wait(0.5)

    def _consume(self, response, cursor: LogCursor, replica: str) -> None:
        partial = b""
        for chunk in response.stream(amt=65536, decode_content=True):
            partial += chunk
            *complete, partial = partial.split(b"\n")
            self.take_raw(complete, cursor, replica)
        if partial:
            self.take_raw([partial], cursor, replica)

    def take_raw(self, raw: list[bytes], cursor: LogCursor, replica: str) -> None:
        """New lines of a pod's log (kubelet-stamped), queued for ``take_lines``; what was already
        logged is skipped by the pod's cursor."""
        taken = []
        for line in raw:
            stamp, _, text = line.decode(errors="replace").partition(" ")
            if cursor.accepts(stamp):
                taken.append(self._labelled(replica, self.redactor.line(text.rstrip("\r"))))
        with self._lock:
            self._lines.extend(taken)
            self._queued_up_to[self._pod_of(cursor)] = [cursor.last, cursor.at_last]
            for line in taken:  # a rank's lines are its runner's, whichever pod they were printed in
                owner = line.replica.split("/", 1)[0]
                self.tails.setdefault(owner, collections.deque(maxlen=_TAIL_LINES)).append(line.text)

    def _labelled(self, replica: str, text: str) -> LogLine:
        """A rank's line a pod passed on from its per-rank file (``[rank.N] ...``) is the runner's rank's,
        whichever pod it ran in, labelled as every launcher labels it."""
        match = _RANK_LINE.match(text) if self.plan.hosts else None
        if match:
            return LogLine(f"{self.plan.replicas[0].name}/{match.group(1)}", match.group(2))
        return LogLine(replica, text)

    def take_lines(self) -> list[LogLine]:
        with self._lock:
            lines, self._lines = self._lines, []
            self._logged_up_to.update(self._queued_up_to)
        return lines

    def has_lines(self) -> bool:
        return bool(self._lines)

    def finish_reading(self, timeout: float) -> None:
        """Let every reader reach the end of its (ended) pod's log, then stop the rest."""
        deadline = time.monotonic() + timeout
        for reader in list(self._readers.values()):
            reader.join(max(0.0, deadline - time.monotonic()))
        self._closing.set()
        for response in self._responses.values():
            # Shut, not released to the pool: a reader may still be in the middle of it.
            with contextlib.suppress(Exception):  # already closed
                response.shutdown()
            with contextlib.suppress(Exception):
                response.close()

    # -- state ----------------------------------------------------------------------------------

    def evaluate(self, pods: list[Any], startup_timeout: float, workload: dict | None = None) -> JobStatus:
        """Gang semantics over the pods (the API's objects from one list call) and, for a Kubeflow job,
        its conditions (``workload``: the job as the API gave it)."""
        if self.pods_created_at is None:
            return JobStatus(JobState.RUNNING)
        by_name = {p.metadata.name: p for p in pods}
        self.seen.update(by_name)
        for name in self.pod_names:
            pod = by_name.get(name)
            failure = _pod_failure(name, pod, self, startup_timeout)
            if failure is not None:
                return failure
            code = _main_exit_code(pod, self.container)
            replica = self.replica_of(name)
            if replica in {r.name for r in self.plan.replicas}:
                self.exit_codes[replica] = code
            elif code is not None:  # a node a runner reaches over SSH must run until the end
                return _failed(replica, name, f"ended (exit code {code}) while the job ran", code)
        status = aggregate_status(self.plan, self.exit_codes)
        if status.state is JobState.FAILED:  # the replica's own account, with its name and exit code
            return status
        return _workload_failure(self, workload) or status

    def to_state(self) -> dict:
        return {
            "run_id": self.run_id,
            "plan": self.plan.to_dict(),
            "job": self.job,
            "namespace": self.namespace,
            "run_dir": str(self.run_dir),
            "launch_id": self.launch_id,
            "owner_uid": self.owner_uid,
            "cursors": self.cursor_state(),
            "relay_port": self.relay.target[1] if self.relay is not None else None,
            "relay_uri": self.relay_uri,
            "pods_created": self.pods_created_at is not None,
            "awaiting": sorted(self.awaiting),
            "launch_env": self.launch_env,  # no secrets: those are in the run's Secret
            "container": self.container,
            "workload": self.workload,
        }

    def cursors_due(self) -> bool:
        """Whether the cursors moved since they were last saved, at most every few seconds."""
        now, state = time.monotonic(), self.cursor_state()
        if now - self._cursors_saved_at < CURSOR_SAVE_SECONDS or state == self._saved_cursors:
            return False
        self._cursors_saved_at, self._saved_cursors = now, state
        return True

    def cursor_state(self) -> dict[str, list]:
        """How far each pod's log has been handed out by ``take_lines`` (and so logged): lines read but
        not handed out yet are read again by whoever carries on from here."""
        with self._lock:
            return {pod: list(at) for pod, at in self._logged_up_to.items()}

    def _pod_of(self, cursor: LogCursor) -> str:
        return next(pod for pod, mine in self.cursors.items() if mine is cursor)

    def take_cursors(self, saved: dict[str, list]) -> None:
        """Cursors another watcher left (on the run's owner): whichever got further wins."""
        for pod, (last, at_last) in saved.items():
            mine = self.cursors.get(pod)
            if mine is None or not mine.last or _position(last, at_last) > _position(mine.last, mine.at_last):
                self.cursors[pod] = LogCursor(last, at_last)
                self._logged_up_to[pod] = [last, at_last]

    @classmethod
    def from_state(cls, state: dict, secrets: list[str]) -> KubernetesJobHandle:
        handle = cls(
            run_id=state["run_id"],
            plan=JobPlan.from_dict(state["plan"]),
            job=state["job"],
            namespace=state["namespace"],
            run_dir=Path(state["run_dir"]),
            launch_id=state["launch_id"],
            redactor=Redactor(secrets),
            owner_uid=state["owner_uid"],
            pods_created_at=time.monotonic() if state["pods_created"] else None,
            awaiting=set(state["awaiting"]),
            launch_env=dict(state["launch_env"]),
            relay_uri=state["relay_uri"],
            container=state.get("container", MAIN_CONTAINER),
            workload=state.get("workload"),
        )
        handle.take_cursors(state["cursors"])
        return handle


def _position(last: str, at_last: int) -> tuple[Timestamp, int]:
    return Timestamp.parse(last), at_last


def cursors_patch(handle: KubernetesJobHandle) -> dict:
    """The patch that leaves the handle's cursors on the run's owner."""
    return {"metadata": {"annotations": {CURSORS_ANNOTATION: json.dumps(handle.cursor_state())}}}


def _main_exit_code(pod, container: str) -> int | None:
    for status in (pod.status.container_statuses or []) if pod is not None and pod.status else []:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


def main_container_started(pod, container: str) -> bool:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.name == container and status.state:
            return bool(status.state.running or status.state.terminated)
    return False


def _failed(replica: str, pod: str, what: str, code: int | None = None) -> JobStatus:
    return JobStatus(
        JobState.FAILED, f"replica {replica} (pod {pod}) {what}", failed_replica=replica, exit_code=code
    )


def _pod_failure(name: str, pod, handle: KubernetesJobHandle, startup_timeout: float) -> JobStatus | None:
    """A reason the job cannot go on because of this pod, if it has one."""
    replica = handle.replica_of(name)
    if pod is None and handle.workload is not None and name not in handle.seen:  # the operator makes it
        if not _started_long_ago(handle, startup_timeout):
            return None
        what = f"was not created by the training operator within {startup_timeout:.0f} s"
        return _failed(replica, name, f"{what} (is the Kubeflow training operator running?)")
    if pod is None or pod.metadata.deletion_timestamp is not None:
        return _failed(replica, name, "was deleted while the job ran")
    status = pod.status
    if status is not None and status.phase == "Failed" and status.reason:  # evicted, preempted, node lost
        return _failed(replica, name, f"was stopped by Kubernetes: {status.reason}: {status.message or ''}")
    if status is not None and status.phase == "Failed" and _main_exit_code(pod, handle.container) is None:
        return _failed(replica, name, _init_failure(status))
    for container in status.container_statuses or [] if status else []:
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason in (*_IMAGE_FAILURES, *_CONFIG_FAILURES):
            return _failed(
                replica, name, f"cannot start: {waiting.reason}: {waiting.message or ''}".rstrip(": ")
            )
    if status is not None and status.phase == "Pending" and _started_long_ago(handle, startup_timeout):
        reasons = [
            f"{c.reason}: {c.message}" for c in status.conditions or [] if c.status == "False" and c.reason
        ]
        detail = "; ".join(reasons) or "not scheduled or started"
        return _failed(replica, name, f"was still pending after {startup_timeout:.0f} s ({detail})")
    return None


def _init_failure(status) -> str:
    for container in status.init_container_statuses or []:
        ended = container.state.terminated if container.state else None
        if ended is not None and ended.exit_code:
            return f"failed before it ran: init container {container.name} exited with code {ended.exit_code}"
    return "failed before its main container ran"


def _started_long_ago(handle: KubernetesJobHandle, startup_timeout: float) -> bool:
    return handle.pods_created_at is not None and time.monotonic() - handle.pods_created_at > startup_timeout


def deleted_workload() -> dict:
    """A Kubeflow job the API no longer has, as the verdict it amounts to."""
    failed = {"type": "Failed", "status": "True", "reason": "Deleted", "message": "the job was deleted"}
    return {"status": {"conditions": [failed]}}


def _workload_failure(handle: KubernetesJobHandle, workload: dict | None) -> JobStatus | None:
    """The training operator's verdict when it failed the job for a reason no pod shows."""
    conditions = ((workload or {}).get("status") or {}).get("conditions") or []
    for condition in conditions:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            reason = f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
            message = f"job {handle.run_id}: the training operator failed it: {reason}"
            return JobStatus(JobState.FAILED, message)
    return None
