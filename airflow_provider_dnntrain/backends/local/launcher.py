"""Local processes: the embedded default. Every replica runs under its own reaper on this host."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from airflow_provider_dnntrain import inputs
from airflow_provider_dnntrain.backends.base import (
    JobState,
    JobStatus,
    Launcher,
    LogLine,
    aggregate_status,
    secret_values,
)
from airflow_provider_dnntrain.backends.common import host_cache, reaper
from airflow_provider_dnntrain.backends.common.environments import (
    ensure_environment,
    environment_key,
    environment_python,
    requirements_of,
)
from airflow_provider_dnntrain.backends.common.folders import beside_runs
from airflow_provider_dnntrain.backends.common.gpus import check_host_gpus, local_gpus
from airflow_provider_dnntrain.backends.common.lines import Redactor
from airflow_provider_dnntrain.backends.common.ports import FreePortPlacement, port_is_free
from airflow_provider_dnntrain.backends.common.replica import (
    ENVIRONMENT_RECORD,
    PENDING_ENV_VAR,
    PENDING_FILE_VAR,
    PRIMARY_MARKER,
    REPLICA_SITE,
    launch_env,
)
from airflow_provider_dnntrain.backends.local.processes import (
    LocalJobHandle,
    ReplicaProcess,
    end_previous_launch,
    inherited_env,
    launch_processes,
    pending_file,
    start_replica,
)
from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.source import snapshot as copy_snapshot
from airflow_provider_dnntrain.spec import Horovod, TrainingJob
from airflow_provider_dnntrain.topology import JobPlan

log = logging.getLogger(__name__)
# Beyond the grace, how long a reaper may take to report back before its subtree is killed directly.
_REAPER_SLACK_SECONDS = reaper.KILL_WAIT_SECONDS + 2


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
        self.environments_root = Path(environments_root or beside_runs("environments"))
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
        time_limit: float | None = None,
    ) -> LocalJobHandle:
        source = check_source(job)
        if job.resources.use_gpu:  # every replica is on this host
            check_host_gpus(plan, plan.replicas[0].host, "this host", local_gpus())
        end_previous_launch(self.run_dir(plan.run_id))
        run_dir = self.fresh_run_dir(plan.run_id)
        snapshot = self._prepare(job, plan, source, run_dir)
        plan = self._with_free_ports(job, plan)
        (run_dir / "plan.json").write_text(plan.to_json())
        secrets = secret_values(job)
        handle = LocalJobHandle(
            run_id=plan.run_id,
            plan=plan,
            run_dir=run_dir,
            launch_id=uuid.uuid4().hex,
            redactor=Redactor(secrets.values()),
        )
        (run_dir / "launch.json").write_text(json.dumps({"launch_id": handle.launch_id}))
        env = {**extra_env, **launch_env(handle.launch_id, job.entry_script, plan.chief.name)}
        # Secrets reach the script's processes through the owner-only pending file, never through a
        # runner's environment: horovodrun, for one, puts every variable on its ranks' command lines.
        if pending := [*secrets, *pending_env]:
            env.update({PENDING_ENV_VAR: ",".join(pending), PENDING_FILE_VAR: str(pending_file(handle))})
            self.provide_env(handle, secrets)
        self._start_all(handle, snapshot, env, exclude=secrets)
        return handle

    def _prepare(self, job: TrainingJob, plan: JobPlan, source: Path, run_dir: Path) -> Path:
        """The run's inputs linked, its source snapshot and its environment: the snapshot's folder."""
        for name, (_, cached) in inputs.fetch_all(job, self.inputs_root).items():
            host_cache.link(str(cached), os.path.join(self.inputs_folder(plan.run_id), name))
        snapshot = run_dir / "source"
        copy_snapshot(source, snapshot, job.resume_from)
        if job.environment.has_packages:
            self._build_environment(job, snapshot)
        (run_dir / "logs").mkdir()
        return snapshot

    def _start_all(self, handle: LocalJobHandle, snapshot: Path, env: dict, exclude: Collection[str]):
        watch_read, handle.watch_fd = os.pipe()
        try:
            for replica in handle.plan.replicas:
                environ = {**inherited_env(exclude), **replica.env, **env}
                path = filter(None, [str(REPLICA_SITE), environ.get("PYTHONPATH")])
                environ["PYTHONPATH"] = os.pathsep.join(path)
                handle.processes[replica.name] = start_replica(
                    handle, replica, snapshot, environ, watch_read, self.stop_grace_seconds
                )
        except BaseException:
            self.stop(handle, grace_seconds=0)
            raise
        finally:
            os.close(watch_read)

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

    def provide_env(self, handle: LocalJobHandle, values: Mapping[str, str]) -> None:
        target = pending_file(handle)
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
        escaped = reaper.terminate(lambda: launch_processes(handle.launch_id), grace_seconds=0)
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

    def _kill_unresponsive_reaper(self, process: ReplicaProcess) -> list[int]:
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
