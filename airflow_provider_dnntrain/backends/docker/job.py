"""A Docker run in this process: its containers, the lines their logs stream (a thread per container,
through the shared line splitter, redacted), and files put into and read out of containers as tar
streams - which works the same with a daemon on another host."""

from __future__ import annotations

import collections
import io
import queue
import tarfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow_provider_dnntrain.backends.base import JobHandle, JobState, JobStatus, LogLine
from airflow_provider_dnntrain.backends.common.lines import RANK_LINE, LineSplitter, Redactor
from airflow_provider_dnntrain.backends.docker import containers as specs
from airflow_provider_dnntrain.topology import JobPlan

TAIL_LINES = 40


@dataclass
class DockerJobHandle(JobHandle):
    run_id: str
    plan: JobPlan
    name: str  # the run's name: its network's, its containers' stem
    run_dir: Path
    containers: dict[str, str] = field(default_factory=dict)  # replica -> container id
    network: str | None = None
    watchdog: str | None = None  # the watchdog container's id
    redactor: Redactor | None = None
    pending: dict[str, str] = field(default_factory=dict, repr=False)  # secrets and pending variables
    lines: queue.Queue = field(default_factory=queue.Queue)
    tails: dict[str, collections.deque] = field(default_factory=dict)
    followers: list[threading.Thread] = field(default_factory=list)
    lease_renewed: float = 0.0
    cancelled: bool = False
    stopped: bool = False
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    outputs_lost: str | None = None
    relay: object | None = None  # the embedded tracking store served to the containers
    environment_record: str = ""  # the environment image's resolved packages, for the run's logs
    cursors: dict[str, float] = field(default_factory=dict)  # replica -> time of the last line taken

    def follow(self, api, replica: str) -> None:
        """Stream ``replica``'s container log (from its cursor on) into ``lines`` and its tail, in a
        thread of its own."""
        self.tails.setdefault(replica, collections.deque(maxlen=TAIL_LINES))
        thread = threading.Thread(
            target=self._pump, args=(api, replica), name=f"docker-logs-{replica}", daemon=True
        )
        thread.start()
        self.followers.append(thread)

    def _pump(self, api, replica: str) -> None:
        splitter = LineSplitter(self.redactor)
        try:
            for chunk in api.logs(self.containers[replica], stream=True, follow=True, **self._since(replica)):
                self._publish(replica, splitter.feed(chunk))
        except Exception as error:  # the container removed under the stream: its lines are all in
            self._publish(replica, [f"(log stream ended: {error})"] if not self.stopped else [])
        self._publish(replica, splitter.flush())

    def read_new(self, api) -> None:
        """Every container's lines past its cursor, at once (the triggerer's way: no thread, no stream)."""
        for replica, container in self.containers.items():
            self.tails.setdefault(replica, collections.deque(maxlen=TAIL_LINES))
            splitter = LineSplitter(self.redactor)
            self._publish(
                replica, splitter.feed(api.logs(container, **self._since(replica))) + splitter.flush()
            )

    def _since(self, replica: str) -> dict:
        """The daemon's log arguments: every line with its time, from just past the last one taken."""
        cursor = self.cursors.get(replica)
        return {"timestamps": True, **({"since": cursor + 1e-6} if cursor is not None else {})}

    def _publish(self, replica: str, texts: list[str]) -> None:
        for stamped in texts:
            text = self._unstamped(replica, stamped)
            self.tails[replica].append(text)
            self.lines.put(self._labelled(replica, text))

    def _unstamped(self, replica: str, line: str) -> str:
        """The line without the daemon's time (RFC 3339, read to the microsecond), which moves the
        replica's cursor; a line without one (a long line's continuation) as it is."""
        stamp, _, text = line.partition(" ")
        try:
            when = datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()
        except ValueError:
            return line
        self.cursors[replica] = max(when, self.cursors.get(replica, 0.0))
        return text

    def ended_node(self) -> JobStatus | None:
        """A node the runner reaches over SSH that ended while the job ran: the job has failed."""
        replicas = {replica.name for replica in self.plan.replicas}
        for name, code in self.exit_codes.items():
            if name not in replicas and code is not None:
                message = f"node {name} ended (exit code {code}) while the job ran"
                return JobStatus(JobState.FAILED, message, failed_replica=name, exit_code=code)
        return None

    def to_state(self) -> dict[str, Any]:
        """What another process needs to take the run over: no secret, no client, JSON only."""
        return {
            "run_id": self.run_id,
            "plan": self.plan.to_dict(),
            "name": self.name,
            "run_dir": str(self.run_dir),
            "containers": self.containers,
            "network": self.network,
            "watchdog": self.watchdog,
            "cursors": self.cursors,
            "relay": list(self.relay.target) if self.relay is not None else None,
            "environment_record": self.environment_record,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], secrets: list[str]) -> DockerJobHandle:
        return cls(
            run_id=state["run_id"], plan=JobPlan.from_dict(state["plan"]), name=state["name"],
            run_dir=Path(state["run_dir"]), containers=dict(state["containers"]), network=state["network"],
            watchdog=state["watchdog"], cursors=dict(state["cursors"]), redactor=Redactor(secrets),
            environment_record=state["environment_record"],
        )  # fmt: skip

    def _labelled(self, replica: str, text: str) -> LogLine:
        """A rank's line the bootstrap passed on from its per-rank file (``[rank.N] ...``) is the runner's
        rank's, whichever container it ran in: labelled ``<runner>/rank.N``, as every launcher labels it."""
        match = RANK_LINE.match(text) if self.plan.hosts else None
        if match:
            return LogLine(f"{self.plan.replicas[0].name}/{match.group(1)}", match.group(2))
        return LogLine(replica, text)

    def drain(self, timeout: float) -> list[LogLine]:
        out = []
        try:
            out.append(self.lines.get(timeout=timeout) if timeout > 0 else self.lines.get_nowait())
            while True:
                out.append(self.lines.get_nowait())
        except queue.Empty:
            pass
        return out

    def finish_reading(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.followers:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Chunks(io.RawIOBase):
    """The daemon's archive stream (an iterator of byte chunks) as a file to read."""

    def __init__(self, chunks) -> None:
        self._chunks, self._left = iter(chunks), b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._left:
            self._left = next(self._chunks, b"")
            if not self._left:
                return 0
        size = min(len(buffer), len(self._left))
        buffer[:size], self._left = self._left[:size], self._left[size:]
        return size


def copy_out(api, container: str, path: str, into: Path) -> list[str]:
    """``path`` of ``container`` (running or not) into ``into``, streamed: the files copied. A cut
    stream or a member shorter than its header says raises (``tarfile.ReadError``)."""
    stream, _ = api.get_archive(container, path)
    copied = []
    with tarfile.open(fileobj=io.BufferedReader(_Chunks(stream), 1 << 20), mode="r|") as tar:
        for member in tar:
            if member.isfile() or member.isdir():
                tar.extract(member, into, filter="data")
                copied += [member.name] if member.isfile() else []
    return copied


def start_container(api, container: str, gpus: bool) -> None:
    """Start ``container``: a daemon that cannot give it the GPUs it asks for (``gpus``) says so,
    naming the field."""
    try:
        api.start(container)
    except Exception as error:
        explanation = str(getattr(error, "explanation", None) or error)
        if gpus and "device driver" in explanation:
            raise RuntimeError(
                f"resources.use_gpu: the Docker daemon gives its containers no GPUs ({explanation}): it "
                "needs a GPU and the NVIDIA Container Toolkit"
            ) from None
        raise


def remove_run(api, run_id: str, wait: float = 10.0) -> list[str]:
    """Every container and network of ``run_id`` removed (its watchdog may be at it too); what is
    still there after ``wait`` seconds."""
    found, deadline = specs.run_filter(run_id), time.monotonic() + wait
    while True:
        for container in api.containers(all=True, filters=found):
            _gone_or(api.remove_container, container["Id"], force=True)
        for network in api.networks(filters=found):
            _gone_or(api.remove_network, network["Id"])
        containers = api.containers(all=True, filters=found)
        left = [c["Names"][0].lstrip("/") for c in containers]
        left += [n["Name"] for n in api.networks(filters=found)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _gone_or(remove, *args, **kwargs) -> None:
    """``remove``, unless what it removes is gone or going already (404, 409: removal in progress)."""
    try:
        remove(*args, **kwargs)
    except Exception as error:
        if getattr(error, "status_code", None) not in (404, 409):
            raise
