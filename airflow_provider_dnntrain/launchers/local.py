"""Local processes: the embedded default. Every replica is its own process group on this host."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from airflow_provider_dnntrain.launchers.base import (
    JobHandle,
    JobState,
    JobStatus,
    Launcher,
    LogLine,
    aggregate_status,
)
from airflow_provider_dnntrain.launchers.local_logs import follow_rank_files, pump_pipe
from airflow_provider_dnntrain.spec import Horovod, TrainingJob
from airflow_provider_dnntrain.topology import Endpoint, JobPlan, Replica

_NEVER_SNAPSHOT = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", ".ipynb_checkpoints")


def _snapshot_ignore(source: Path):
    """Skip caches, and a top-level outputs/ or logs/ left by a manual run: each run starts with its own."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(_NEVER_SNAPSHOT(folder, names))
        if Path(folder) == source:
            skipped |= {"outputs", "logs"} & set(names)
        return skipped

    return ignore


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the Airflow task process is SIGKILLed, the replica
    # gets SIGKILL too instead of living on as an orphan.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def default_work_root() -> Path:
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(home) / "dnntrain" / "runs"


class FreePortPlacement:
    """Every replica on 127.0.0.1, each on a port free at planning time."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._ports: dict[tuple[str, int], int] = {}
        self.runs_as_root = os.geteuid() == 0

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint:
        key = (role, index)
        if key not in self._ports:
            self._ports[key] = _free_port(self._host, taken=set(self._ports.values()))
        return Endpoint(self._host, self._ports[key])


def _free_port(host: str, taken: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


@dataclass
class _Process:
    replica: Replica
    popen: subprocess.Popen
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

    def start_readers(self, lines: queue.Queue) -> None:
        publish = self.publish_to(lines)
        pipe_closed = threading.Event()

        def pump() -> None:
            try:
                pump_pipe(self.popen.stdout.fileno(), self.log_file, publish)
            finally:
                self.popen.stdout.close()
                pipe_closed.set()

        self.readers.append(threading.Thread(target=pump, daemon=True))
        if self.replica.rank_logs:
            follow = (self.workdir / self.replica.rank_logs, publish, pipe_closed)
            self.readers.append(threading.Thread(target=follow_rank_files, args=follow, daemon=True))
        for reader in self.readers:
            reader.start()


@dataclass
class LocalJobHandle(JobHandle):
    run_id: str
    plan: JobPlan
    run_dir: Path
    processes: dict[str, _Process] = field(default_factory=dict)
    lines: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False


class LocalLauncher(Launcher):
    """Run every replica as a process group on this host, in a per-run snapshot of the source."""

    name = "local"

    def __init__(
        self,
        *,
        work_root: str | os.PathLike | None = None,
        python: str | None = None,
        stop_grace_seconds: float = 10.0,
    ) -> None:
        self.work_root = Path(work_root) if work_root else None
        self.python = python
        self.stop_grace_seconds = stop_grace_seconds

    def placement(self, run_id: str) -> FreePortPlacement:
        return FreePortPlacement()

    def validate(self, job: TrainingJob) -> None:
        dist = job.distribution
        if isinstance(dist, Horovod) and dist.node_count > 1:
            raise ValueError(
                "distribution.node_count: the local launcher runs Horovod on this one host; use "
                "node_count=1 with process_count_per_node=N, or a multi-host launcher"
            )

    def interpreter(self, job: TrainingJob) -> str:
        return self.python or super().interpreter(job)

    def run_dir(self, run_id: str) -> Path:
        return (self.work_root or default_work_root()) / run_id

    # -- submit ---------------------------------------------------------------------------------

    def submit(self, job: TrainingJob, plan: JobPlan, extra_env: Mapping[str, str]) -> LocalJobHandle:
        source = Path(job.source_directory).expanduser().resolve()
        if not (source / job.entry_script).is_file():
            raise FileNotFoundError(f"entry_script {job.entry_script!r} not found in {source}")
        run_dir = self.run_dir(plan.run_id)
        _kill_recorded_processes(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        snapshot = run_dir / "source"
        shutil.copytree(source, snapshot, ignore=_snapshot_ignore(source))
        (run_dir / "logs").mkdir()
        (run_dir / "plan.json").write_text(plan.to_json())
        secrets = {name: value.get_secret_value() for name, value in job.environment.secrets.items()}
        handle = LocalJobHandle(run_id=plan.run_id, plan=plan, run_dir=run_dir)
        try:
            for replica in plan.replicas:
                env = {**_inherited_env(), **replica.env, **extra_env, **secrets, "PYTHONUNBUFFERED": "1"}
                handle.processes[replica.name] = self._start(handle, replica, snapshot, env)
        except BaseException:
            self.stop(handle, grace_seconds=0)
            raise
        _record_processes(handle)
        return handle

    def _start(self, handle: LocalJobHandle, replica: Replica, snapshot: Path, env: dict) -> _Process:
        workdir = handle.run_dir / "replicas" / replica.name
        # A real copy, not hard links: a script writing a file in place must not change its peers' copy.
        shutil.copytree(snapshot, workdir)
        for sub in ("outputs", "logs"):
            (workdir / sub).mkdir(exist_ok=True)
        for relative, content in replica.files.items():
            (workdir / relative).write_text(content)
        popen = subprocess.Popen(
            replica.argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        process = _Process(replica, popen, workdir, handle.run_dir / "logs" / f"{replica.name}.log")
        process.start_readers(handle.lines)
        return process

    # -- observe --------------------------------------------------------------------------------

    def poll(self, handle: LocalJobHandle) -> JobStatus:
        if handle.cancelled:
            return JobStatus(JobState.CANCELLED, f"job {handle.run_id} was cancelled")
        codes = {name: p.popen.poll() for name, p in handle.processes.items()}
        return aggregate_status(handle.plan, codes)

    def stream_logs(self, handle: LocalJobHandle, timeout: float) -> Iterable[LogLine]:
        lines: list[LogLine] = []
        try:
            lines += handle.lines.get(timeout=timeout) if timeout > 0 else handle.lines.get_nowait()
            while True:
                lines += handle.lines.get_nowait()
        except queue.Empty:
            pass
        return lines

    def tail(self, handle: LocalJobHandle, replica: str) -> list[str]:
        return list(handle.processes[replica].tail)

    # -- stop -----------------------------------------------------------------------------------

    def cancel(self, handle: LocalJobHandle) -> None:
        handle.cancelled = True
        super().cancel(handle)

    def stop(self, handle: LocalJobHandle, grace_seconds: float) -> None:
        _terminate_groups([p.popen for p in handle.processes.values()], grace_seconds)
        for process in handle.processes.values():
            # A grandchild that escaped the group may hold the pipe open; it is dead now, so EOF comes.
            for reader in process.readers:
                reader.join(timeout=5)

    def collect_outputs(self, handle: LocalJobHandle) -> Path:
        chief = handle.processes[handle.plan.chief.name]
        artifacts = handle.run_dir / "artifacts"
        for sub in ("outputs", "logs"):
            target = artifacts / sub
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(chief.workdir / sub, target, dirs_exist_ok=True)
        return artifacts


def _inherited_env() -> dict[str, str]:
    # Airflow's own settings (database URL, secrets backends, task tokens) are not the script's business.
    return {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _terminate_groups(popens: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM each replica's process group (and any descendant that left it), then SIGKILL."""
    alive = [p for p in popens if p.poll() is None]
    # Collect descendants first: once a parent dies, its children are re-parented and lost to us.
    stragglers = [child for p in popens for child in _descendants(p.pid)]
    for popen in popens:
        _signal_group(popen.pid, signal.SIGTERM)
    for child in stragglers:
        _quietly(child.terminate)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(p.poll() is None for p in alive):
        time.sleep(0.05)
    for popen in popens:
        _signal_group(popen.pid, signal.SIGKILL)
    for child in stragglers:
        _quietly(child.kill)
    for popen in popens:
        popen.wait()
    psutil.wait_procs(stragglers, timeout=5)


def _quietly(action) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        action()


def _record_processes(handle: LocalJobHandle) -> None:
    records = {}
    for name, process in handle.processes.items():
        try:
            started = psutil.Process(process.popen.pid).create_time()
            records[name] = {"pid": process.popen.pid, "started": started}
        except psutil.NoSuchProcess:
            continue
    (handle.run_dir / "processes.json").write_text(json.dumps(records))


def _kill_recorded_processes(run_dir: Path) -> None:
    """A resubmitted run id first ends whatever its previous submission left running."""
    try:
        records = json.loads((run_dir / "processes.json").read_text())
    except (OSError, ValueError):
        return
    for record in records.values():
        try:
            process = psutil.Process(record["pid"])
            if abs(process.create_time() - record["started"]) < 0.01:
                _signal_group(process.pid, signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
