"""One SSH job as the launcher and the trigger both see it: its hosts, what the agents answered, the
lines taken from their logs, the job's status by gang semantics, and the state that survives a
deferral or a worker restart (``to_state`` / ``from_state``)."""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import json
import logging
import posixpath
import shutil
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_dnntrain.backends.base import JobHandle, JobState, JobStatus, LogLine, aggregate_status
from airflow_provider_dnntrain.backends.common.lines import LineSplitter, Redactor
from airflow_provider_dnntrain.backends.ssh.remote import HostSpec, HostUnreachable, RemoteHost, on_each
from airflow_provider_dnntrain.topology import JobPlan

log = logging.getLogger(__name__)
COMMAND_TIMEOUT_SECONDS = 30
_TAIL_LINES = 30


def agent_argv(host: RemoteHost, python: str, job_dir: str, command: str, *args: str) -> list[str]:
    agent = posixpath.join(job_dir, "dnntrain", "ssh_agent.py")
    return [host.spec.python or python, "-I", "-S", agent, command, job_dir, host.label, *args]


def run_agent(host: RemoteHost, python: str, job_dir: str, command: str, *args: str, timeout: float = 0):
    argv = agent_argv(host, python, job_dir, command, *args)
    return host.run_json(argv, timeout=timeout or COMMAND_TIMEOUT_SECONDS)


@dataclass
class SSHJobHandle(JobHandle):
    run_id: str
    plan: JobPlan
    python: str  # the job's interpreter on hosts that do not name their own; runs the agent too
    run_dir: Path  # on this worker: bundle, plan, fetched logs and artifacts
    job_dir: str  # on every host
    launch_id: str
    redactor: Redactor
    hosts: dict[str, RemoteHost]  # by label, the hosts this job uses
    replicas_on: dict[str, list[str]]  # label -> names of the replicas started there
    provided: dict[str, str] = field(default_factory=dict)  # the pending file's content
    undelivered: set[str] = field(default_factory=set)  # hosts that have not got it yet
    lost: set[str] = field(default_factory=set)  # hosts that stopped answering: not waited for again
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> log key -> bytes read
    exits: dict[str, int | None] = field(default_factory=dict)
    lines: list[LogLine] = field(default_factory=list)
    tails: dict[str, collections.deque] = field(default_factory=dict)
    last_answer: dict[str, float] = field(default_factory=dict)  # label -> monotonic time
    last_fetch: float = 0.0
    status: JobStatus = field(default_factory=lambda: JobStatus(JobState.RUNNING))
    cancelled: bool = False
    stopped: bool = False
    relay: Any = None  # the TrackingRelay serving this job, if any
    _splitters: dict[str, LineSplitter] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def host_of(self, replica: str) -> str:
        return next(label for label, names in self.replicas_on.items() if replica in names)

    def agent(self, host: RemoteHost, command: str, *args: str, timeout: float = 0) -> dict:
        return run_agent(host, self.python, self.job_dir, command, *args, timeout=timeout)

    def agent_argv(self, label: str, command: str, *args: str) -> list[str]:
        return agent_argv(self.hosts[label], self.python, self.job_dir, command, *args)

    def poll_argv(self, label: str) -> list[str]:
        return self.agent_argv(label, "poll", json.dumps(self.offsets.get(label, {})))

    def ack_argv(self, label: str) -> list[str]:
        """How far this watcher has logged, for the host to keep, without polling: it is leaving."""
        return self.agent_argv(label, "ack", json.dumps(self.offsets.get(label, {})))

    def on_hosts(self, action):
        """``action`` on every host of the job not given up for lost, at once: each one's result, or
        what it raised, by label."""
        return on_each(self.reachable(), action)

    def reachable(self) -> list[RemoteHost]:
        return [host for label, host in self.hosts.items() if label not in self.lost]

    def poll_host(self, host: RemoteHost, timeout: float) -> dict:
        """Renew the host's lease; its replicas' exit codes and what their logs gained."""
        return host.run_json(self.poll_argv(host.label), timeout=timeout)

    def take_answer(self, label: str, answer: dict | BaseException) -> None:
        if isinstance(answer, BaseException):
            if not isinstance(answer, HostUnreachable):
                raise answer
            self.hosts[label].last_error = str(answer)
            return
        self.last_answer[label] = time.monotonic()
        self.exits.update(answer["exits"])
        self._take_logs(label, answer["logs"])

    def _take_logs(self, label: str, logs: dict[str, list]) -> None:
        offsets = self.offsets.setdefault(label, {})
        for key in sorted(logs):
            offset, encoded = logs[key]
            if offset < offsets.get(key, 0):
                continue  # an answer to an older question: that part was taken already
            # Further on than asked: whoever watched the job before logged up to there.
            chunk = base64.b64decode(encoded)
            offsets[key] = offset + len(chunk)
            splitter = self._splitters.setdefault(f"{label}:{key}", LineSplitter(self.redactor))
            self._publish(key, splitter.feed(chunk))

    def _publish(self, key: str, texts: list[str]) -> None:
        replica, _, rank = key.partition("/")
        rank = rank.rpartition("/")[0]  # "rank.N/stdout" -> "rank.N"
        label = f"{replica}/{rank}" if rank else replica
        tail = self.tails.setdefault(replica, collections.deque(maxlen=_TAIL_LINES))
        tail.extend(f"[{rank}] {t}" if rank else t for t in texts)
        self.lines.extend(LogLine(label, text) for text in texts)

    def flush(self) -> None:
        """Lines left unfinished by replicas that have ended."""
        for key, splitter in self._splitters.items():
            self._publish(key.partition(":")[2], splitter.flush())

    def take_lines(self) -> list[LogLine]:
        with self._lock:
            lines, self.lines = self.lines, []
        return lines

    def evaluate(self, unreachable_timeout: float) -> JobStatus:
        """Gang semantics over the exit codes, and a host silent for ``unreachable_timeout`` fails the job."""
        if self.cancelled:
            return JobStatus(JobState.CANCELLED, f"job {self.run_id} was cancelled")
        status = aggregate_status(self.plan, self.exits)
        if status.state.finished:
            return status
        now = time.monotonic()
        for label, answered in self.last_answer.items():
            if now - answered > unreachable_timeout:
                self.lost.add(label)
                host = self.hosts[label]
                names = self.replicas_on[label]
                return JobStatus(
                    JobState.FAILED,
                    f"host {host.spec} has not answered for {now - answered:.0f} s "
                    f"(replicas {', '.join(names) or 'none'}): {host.last_error}",
                    failed_replica=names[0] if names else None,
                )
        return status

    # -- outputs --------------------------------------------------------------------------------

    def fetch_outputs(self) -> Path:
        """The primary process's outputs and logs, and every replica's console log, into the run's
        artifacts on this worker (redacted)."""
        label, primary = self.primary()
        host = self.hosts[label]
        packed = self.agent(host, "outputs", primary)["path"]
        artifacts = self.run_dir / "artifacts"
        shutil.rmtree(artifacts, ignore_errors=True)
        artifacts.mkdir(parents=True)  # a worker taking a job over may not have its run folder yet
        with tarfile.open(fileobj=io.BytesIO(host.get(packed))) as tar:
            tar.extractall(artifacts, filter="data")
        replica_logs = artifacts / "logs" / "replicas"
        replica_logs.mkdir(parents=True, exist_ok=True)
        for label, names in self.replicas_on.items():
            for name in names:
                path = posixpath.join(self.job_dir, "hosts", label, "logs", f"{name}.log")
                with contextlib.suppress(HostUnreachable, OSError):  # an unreachable host's is lost
                    (replica_logs / f"{name}.log").write_bytes(self.hosts[label].get(path))
        self.redactor.redact_tree(artifacts / "logs")
        return artifacts

    def primary(self) -> tuple[str, str]:
        """(host label, replica) of global rank 0: the newest mark (elastic restarts), else the chief."""
        marks = self.on_hosts(lambda h: self.agent(h, "marks")["marks"])
        for label, found in marks.items():
            if isinstance(found, HostUnreachable):
                log.warning("Not collecting from host %s: %s", self.hosts[label].spec, found)
            elif isinstance(found, BaseException):
                raise found
        reached = {label: found for label, found in marks.items() if isinstance(found, dict)}
        marked = [(when, label, name) for label, found in reached.items() for name, when in found.items()]
        if marked:
            _, label, name = max(marked)
            return label, name
        chief = self.plan.chief.name
        return self.host_of(chief), chief

    # -- surviving a deferral or a restart -------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """What another process needs to take the job over: no secret, no connection, JSON only."""
        return {
            "run_id": self.run_id,
            "plan": self.plan.to_dict(),
            "python": self.python,
            "run_dir": str(self.run_dir),
            "job_dir": self.job_dir,
            "launch_id": self.launch_id,
            "hosts": {label: asdict(host.spec) for label, host in self.hosts.items()},
            "replicas_on": self.replicas_on,
            "offsets": self.offsets,
            "exits": self.exits,
            "lost": sorted(self.lost),
            "relay_port": self.relay.remote_port if self.relay is not None else None,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], secrets: list[str]) -> SSHJobHandle:
        hosts = {label: RemoteHost(HostSpec(**spec), label) for label, spec in state["hosts"].items()}
        handle = cls(
            run_id=state["run_id"],
            plan=JobPlan.from_dict(state["plan"]),
            python=state["python"],
            run_dir=Path(state["run_dir"]),
            job_dir=state["job_dir"],
            launch_id=state["launch_id"],
            redactor=Redactor(secrets),
            hosts=hosts,
            replicas_on=state["replicas_on"],
            offsets=state["offsets"],
            exits=state["exits"],
            lost=set(state["lost"]),
        )
        now = time.monotonic()
        handle.last_answer = {label: now for label in hosts if label not in handle.lost}
        return handle
