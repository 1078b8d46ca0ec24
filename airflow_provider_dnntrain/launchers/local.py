"""Local processes: the embedded default. Every replica runs under its own reaper on this host."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from airflow_provider_dnntrain import inputs
from airflow_provider_dnntrain.launchers import host_cache, reaper
from airflow_provider_dnntrain.launchers.base import (
    ENTRY_SCRIPT_VAR,
    ENVIRONMENT_RECORD,
    LAUNCH_ID_VAR,
    PENDING_ENV_VAR,
    PENDING_FILE_VAR,
    PRIMARY_MARKER,
    PRIMARY_REPLICA_VAR,
    REAPER,
    REPLICA_SITE,
    JobHandle,
    JobState,
    JobStatus,
    Launcher,
    LogLine,
    aggregate_status,
    default_work_root,
    requirements_of,
)
from airflow_provider_dnntrain.launchers.environments import (
    ensure_environment,
    environment_key,
    environment_python,
)
from airflow_provider_dnntrain.launchers.gpu_check import check_host_gpus, local_gpus
from airflow_provider_dnntrain.launchers.local_logs import Redactor, follow_rank_files, pump_pipe
from airflow_provider_dnntrain.launchers.local_ports import FreePortPlacement, port_is_free
from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.source import snapshot as copy_snapshot
from airflow_provider_dnntrain.spec import Horovod, TrainingJob
from airflow_provider_dnntrain.topology import JobPlan, Replica

log = logging.getLogger(__name__)
# Beyond the grace, how long a reaper may take to report back before its subtree is killed directly.
_REAPER_SLACK_SECONDS = reaper.KILL_WAIT_SECONDS + 2


@dataclass
class _Process:
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
    processes: dict[str, _Process] = field(default_factory=dict)
    lines: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    # The write end of the pipe every reaper watches: while this process holds it, replicas live.
    watch_fd: int | None = None


class LocalLauncher(Launcher):
    """Run every replica on this host, each under a reaper, in a per-run snapshot of the source."""

    name = "local"

    def __init__(
        self,
        *,
        work_root: str | os.PathLike | None = None,
        python: str | None = None,
        stop_grace_seconds: float = 10.0,
        environments_root: str | os.PathLike | None = None,
        inputs_root: str | os.PathLike | None = None,
    ) -> None:
        self.work_root = Path(work_root) if work_root else None
        self.python = python
        self.stop_grace_seconds = stop_grace_seconds
        # Where jobs' environments (pip_packages) are built and cached, shared by every run here.
        self.environments_root = Path(environments_root or default_work_root().parent / "environments")
        # Where downloaded inputs are cached, shared likewise.
        self.inputs_root = Path(inputs_root or inputs.default_cache_root())

    def placement(self, run_id: str) -> FreePortPlacement:
        return FreePortPlacement()

    def validate(self, job: TrainingJob) -> None:
        super().validate(job)
        dist = job.distribution
        if isinstance(dist, Horovod) and dist.node_count > 1:
            raise ValueError(
                "distribution.node_count: the local launcher runs Horovod on this one host; use "
                "node_count=1 with process_count_per_node=N, or a multi-host launcher"
            )

    def interpreter(self, job: TrainingJob) -> str:
        """The job's environment's interpreter when it asks for packages (built at submit), else the base."""
        base = self.python or super().interpreter(job)
        if not job.environment.has_packages:
            return base
        key = environment_key(base, job.environment.pip_packages, requirements_of(job))
        return environment_python(str(self.environments_root), key)

    # -- submit ---------------------------------------------------------------------------------

    def submit(
        self,
        job: TrainingJob,
        plan: JobPlan,
        extra_env: Mapping[str, str],
        *,
        pending_env: Collection[str] = (),
    ) -> LocalJobHandle:
        source = check_source(job)
        if job.resources.use_gpu:  # every replica is on this host
            check_host_gpus(plan, plan.replicas[0].host, "this host", local_gpus())
        run_dir = self.run_dir(plan.run_id)
        end_previous_launch(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        run_dir.chmod(0o700)  # replica logs and plans are the job owner's only
        for name, (_, cached) in inputs.fetch_all(job, self.inputs_root).items():
            host_cache.link(str(cached), os.path.join(self.inputs_folder(plan.run_id), name))
        snapshot = run_dir / "source"
        copy_snapshot(source, snapshot, job.resume_from)
        if job.environment.has_packages:
            self._build_environment(job, snapshot)
        (run_dir / "logs").mkdir()
        plan = self._with_free_ports(job, plan)
        (run_dir / "plan.json").write_text(plan.to_json())
        secrets = {name: value.get_secret_value() for name, value in job.environment.secrets.items()}
        handle = LocalJobHandle(
            run_id=plan.run_id,
            plan=plan,
            run_dir=run_dir,
            launch_id=uuid.uuid4().hex,
            redactor=Redactor(secrets.values()),
        )
        (run_dir / "launch.json").write_text(json.dumps({"launch_id": handle.launch_id}))
        launch_env = {
            "PYTHONUNBUFFERED": "1",
            LAUNCH_ID_VAR: handle.launch_id,
            ENTRY_SCRIPT_VAR: job.entry_script,
            PRIMARY_REPLICA_VAR: plan.chief.name,
        }
        # Secrets reach the script's processes through the owner-only pending file, never through a
        # runner's environment: horovodrun, for one, puts every variable on its ranks' command lines.
        if pending := [*secrets, *pending_env]:
            launch_env.update(
                {PENDING_ENV_VAR: ",".join(pending), PENDING_FILE_VAR: str(_pending_file(handle))}
            )
            self.provide_env(handle, secrets)
        watch_read, handle.watch_fd = os.pipe()
        try:
            for replica in plan.replicas:
                env = {**_inherited_env(exclude=secrets), **replica.env, **extra_env, **launch_env}
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPLICA_SITE), env.get("PYTHONPATH")]))
                handle.processes[replica.name] = self._start(handle, replica, snapshot, env, watch_read)
        except BaseException:
            self.stop(handle, grace_seconds=0)
            raise
        finally:
            os.close(watch_read)
        return handle

    def _build_environment(self, job: TrainingJob, snapshot: Path) -> None:
        """Build (or find) the job's environment; its resolved packages go with the chief's logs to the
        run's tracking (``logs/environment.txt``)."""
        base = self.python or super().interpreter(job)
        built = ensure_environment(
            str(self.environments_root), base, job.environment.pip_packages, requirements_of(job)
        )
        (snapshot / "logs").mkdir(exist_ok=True)
        (snapshot / "logs" / ENVIRONMENT_RECORD).write_text(built["freeze"])
        log.info("Environment %s (%s)", built["key"], "built" if built["built"] else "cached")

    def _with_free_ports(self, job: TrainingJob, plan: JobPlan) -> JobPlan:
        """The plan's ports were free when planned; if one has been taken since, plan again."""
        taken = [r for r in plan.replicas if r.port and not port_is_free(r.host, r.port)]
        return self.plan(job, plan.run_id) if taken else plan

    def _start(
        self, handle: LocalJobHandle, replica: Replica, snapshot: Path, env: dict, watch_read: int
    ) -> _Process:
        workdir = handle.run_dir / "replicas" / replica.name
        # A real copy, not hard links: a script writing a file in place must not change its peers' copy.
        shutil.copytree(snapshot, workdir)
        for sub in ("outputs", "logs"):
            (workdir / sub).mkdir(exist_ok=True)
        for relative, content in replica.files.items():
            (workdir / relative).write_text(content)
        command = [sys.executable, "-I", "-S", str(REAPER), "--grace", str(self.stop_grace_seconds)]
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
        process = _Process(replica, popen, pidfd, workdir, handle.run_dir / "logs" / f"{replica.name}.log")
        process.start_readers(handle.lines, handle.redactor)
        return process

    def provide_env(self, handle: LocalJobHandle, values: Mapping[str, str]) -> None:
        target = _pending_file(handle)
        provided = json.loads(target.read_text()) if target.exists() else {}
        provided.update(values)
        written = target.with_suffix(".writing")
        with os.fdopen(os.open(written, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
            json.dump(provided, file)
        os.replace(written, target)  # whole or not at all: the replicas read it as soon as it exists

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
        """Ask every replica to stop and return at once (safe in a signal handler); the reapers
        escalate to SIGKILL after the grace on their own, and ``stop`` waits for them."""
        handle.cancelled = True
        for process in list(handle.processes.values()):
            process.signal(signal.SIGTERM)

    def stop(self, handle: LocalJobHandle, grace_seconds: float) -> None:
        processes = list(handle.processes.values())
        for process in processes:
            if grace_seconds > 0:
                process.signal(signal.SIGTERM)
            else:  # the subtree first: once its reaper is gone, orphans would be lost to PID 1
                reaper.send(reaper.descendants(process.popen.pid), signal.SIGKILL)
                process.signal(signal.SIGKILL)
        deadline = time.monotonic() + grace_seconds + _REAPER_SLACK_SECONDS
        while time.monotonic() < deadline and any(p.popen.poll() is None for p in processes):
            time.sleep(0.05)
        stuck = [self._kill_unresponsive_reaper(p) for p in processes if p.popen.poll() is None]
        escaped = reaper.terminate(lambda: _launch_processes(handle.launch_id), grace_seconds=0)
        if handle.watch_fd is not None:
            os.close(handle.watch_fd)
            handle.watch_fd = None
        for process in processes:
            process.release()
            # Everything that held the pipe is gone now, so the readers reach end of file.
            for reader in process.readers:
                reader.join(timeout=5)
        for process in processes:  # what runners wrote themselves (torchrun, mpirun rank files)
            handle.redactor.redact_tree(process.workdir / "logs")
        if stuck := [pid for pids in stuck for pid in pids] + escaped:
            raise RuntimeError(f"run {handle.run_id}: processes {stuck} could not be stopped")

    def _kill_unresponsive_reaper(self, process: _Process) -> list[int]:
        """A reaper that did not finish in time (stopped, starved): kill its subtree and it directly."""
        below = reaper.descendants(process.popen.pid)
        stuck = reaper.terminate(lambda: reaper.alive(below), grace_seconds=0)
        process.signal(signal.SIGKILL)
        try:
            process.popen.wait(timeout=reaper.KILL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            stuck.append(process.popen.pid)
        return stuck

    def collect_outputs(self, handle: LocalJobHandle) -> Path:
        # Global rank 0 is not always on the first node (torchrun's c10d numbers nodes as they join).
        # After an elastic restart, the newest mark is rank 0's.
        marked = [p for p in handle.processes.values() if (p.workdir / PRIMARY_MARKER).exists()]
        newest = max(marked, key=lambda p: (p.workdir / PRIMARY_MARKER).stat().st_mtime, default=None)
        chief = newest or handle.processes[handle.plan.chief.name]
        artifacts = handle.run_dir / "artifacts"
        for sub in ("outputs", "logs"):
            target = artifacts / sub
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(chief.workdir / sub, target, dirs_exist_ok=True)
        replica_logs = artifacts / "logs" / "replicas"
        replica_logs.mkdir(parents=True, exist_ok=True)
        for log_file in (handle.run_dir / "logs").glob("*.log"):
            shutil.copy2(log_file, replica_logs / log_file.name)
        return artifacts


def _pending_file(handle: LocalJobHandle) -> Path:
    return handle.run_dir / "pending-env.json"


def _inherited_env(exclude: Collection[str]) -> dict[str, str]:
    """This process's environment for the replicas, less Airflow's own settings (database URL, secrets
    backends, task tokens: not the script's business) and variables named like the job's secrets (those
    reach the script's processes through the pending file only)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k not in exclude}


def _launch_processes(launch_id: str) -> dict[int, int]:
    return reaper.processes_with_environment(f"{LAUNCH_ID_VAR}={launch_id}")


def end_previous_launch(run_dir: Path) -> list[int]:
    """A resubmitted run id first ends whatever its previous launch left running, wherever it went."""
    try:
        launch_id = json.loads((run_dir / "launch.json").read_text())["launch_id"]
    except (OSError, ValueError, KeyError):
        return []
    return reaper.terminate(lambda: _launch_processes(launch_id), grace_seconds=0)
