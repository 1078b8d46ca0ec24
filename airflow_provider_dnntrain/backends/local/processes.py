"""The local backend's replicas as processes: each under its own reaper, its output read by threads
into one queue of lines, and the run's handle that holds them."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from airflow_provider_dnntrain.backends.base import JobHandle, LogLine
from airflow_provider_dnntrain.backends.common import reaper
from airflow_provider_dnntrain.backends.common.lines import Redactor, follow_rank_files, pump_pipe
from airflow_provider_dnntrain.backends.common.replica import LAUNCH_ID_VAR, REAPER
from airflow_provider_dnntrain.topology import JobPlan, Replica


@dataclass
class ReplicaProcess:
    replica: Replica
    popen: subprocess.Popen
    pidfd: int
    workdir: Path
    log_file: Path
    readers: list[threading.Thread] = field(default_factory=list)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=30))

    def publish_to(self, lines: queue.Queue):
        def publish(rank: str | None, texts: list[str]) -> None:
            label = f"{self.replica.name}/{rank}" if rank else self.replica.name
            self.tail.extend(f"[{rank}] {t}" if rank else t for t in texts)
            lines.put([LogLine(label, text) for text in texts])

        return publish

    def start_readers(self, lines: queue.Queue, redactor: Redactor) -> None:
        publish = self.publish_to(lines)
        pipe_closed = threading.Event()

        def pump() -> None:
            try:
                pump_pipe(self.popen.stdout.fileno(), self.log_file, publish, redactor)
            finally:
                self.popen.stdout.close()
                pipe_closed.set()

        self.readers.append(threading.Thread(target=pump, daemon=True))
        if self.replica.rank_logs:
            follow = (self.workdir / self.replica.rank_logs, publish, pipe_closed, redactor)
            self.readers.append(threading.Thread(target=follow_rank_files, args=follow, daemon=True))
        for reader in self.readers:
            reader.start()

    def signal(self, sig: int) -> None:
        """Signal the reaper, never a process that merely reuses its PID."""
        if self.popen.returncode is None and self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def release(self) -> None:
        if self.popen.returncode is not None and self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


@dataclass
class LocalJobHandle(JobHandle):
    run_id: str
    plan: JobPlan
    run_dir: Path
    launch_id: str
    redactor: Redactor
    processes: dict[str, ReplicaProcess] = field(default_factory=dict)
    lines: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    # The write end of the pipe every reaper watches: while this process holds it, replicas live.
    watch_fd: int | None = None


def start_replica(
    handle: LocalJobHandle, replica: Replica, snapshot: Path, env: dict, watch_read: int, grace: float
) -> ReplicaProcess:
    """Start ``replica`` under its reaper (``grace``: its SIGTERM-to-SIGKILL escalation) in a working
    directory of its own, a copy of ``snapshot``; its output is read into the handle's lines."""
    workdir = handle.run_dir / "replicas" / replica.name
    # A real copy, not hard links: a script writing a file in place must not change its peers' copy.
    shutil.copytree(snapshot, workdir)
    for sub in ("outputs", "logs"):
        (workdir / sub).mkdir(exist_ok=True)
    for relative, content in replica.files.items():
        (workdir / relative).write_text(content)
    command = [sys.executable, "-I", "-S", str(REAPER), "--grace", str(grace)]
    command += ["--watch-fd", str(watch_read), "--", *replica.argv]
    popen = subprocess.Popen(
        command,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        pass_fds=(watch_read,),
    )
    pidfd = os.pidfd_open(popen.pid)  # not reaped yet, so this is our reaper, whatever happens next
    log_file = handle.run_dir / "logs" / f"{replica.name}.log"
    process = ReplicaProcess(replica, popen, pidfd, workdir, log_file)
    process.start_readers(handle.lines, handle.redactor)
    return process


def pending_file(handle: LocalJobHandle) -> Path:
    return handle.run_dir / "pending-env.json"


def inherited_env(exclude: Collection[str]) -> dict[str, str]:
    """This process's environment for the replicas, less Airflow's own settings (database URL, secrets
    backends, task tokens: not the script's business) and variables named like the job's secrets (those
    reach the script's processes through the pending file only)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k not in exclude}


def launch_processes(launch_id: str) -> dict[int, int]:
    return reaper.processes_with_environment(f"{LAUNCH_ID_VAR}={launch_id}")


def end_previous_launch(run_dir: Path) -> list[int]:
    """A resubmitted run id first ends whatever its previous launch left running, wherever it went."""
    try:
        launch_id = json.loads((run_dir / "launch.json").read_text())["launch_id"]
    except (OSError, ValueError, KeyError):
        return []
    return reaper.terminate(lambda: launch_processes(launch_id), grace_seconds=0)
