"""The one interface every backend implements, and the gang semantics they all share."""

from __future__ import annotations

import enum
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from airflow_provider_dnntrain.launchers import reaper
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import JobPlan, Placement, placeholder_placement, render_plan

# What every backend runs a replica under: reaper.py, and replica_site/ leading its PYTHONPATH (that
# sitecustomize runs first in each of the replica's interpreters).
REAPER = Path(reaper.__file__)
REPLICA_SITE = Path(__file__).resolve().parents[1] / "replica_site"
REPLICA_SITE_MODULES = ("sitecustomize.py", "azureml_compat.py")  # what a remote backend ships of it
# Every process of a launch carries this variable: how a stop finds what escaped every other net.
LAUNCH_ID_VAR = "DNNTRAIN_LAUNCH_ID"
# How the replica site knows the script's processes, which of them is the primary one (global rank 0,
# else the chief) and what they await.
ENTRY_SCRIPT_VAR = "DNNTRAIN_ENTRY_SCRIPT"
PRIMARY_REPLICA_VAR = "DNNTRAIN_PRIMARY_REPLICA"
# Written by the primary process into its working directory: where the run's outputs are.
PRIMARY_MARKER = ".dnntrain-primary"
PENDING_ENV_VAR = "DNNTRAIN_PENDING_ENV"
PENDING_FILE_VAR = "DNNTRAIN_PENDING_ENV_FILE"


# In the chief's logs/, so that the run's tracking keeps it: the packages a job's environment resolved to.
ENVIRONMENT_RECORD = "environment.txt"


def requirements_of(job: TrainingJob) -> str:
    """The text of the job's requirements file ('' without one); ``ValueError`` naming the field."""
    name = job.environment.requirements_file
    if not name:
        return ""
    path = Path(job.source_directory).expanduser().resolve() / name
    if not path.is_file():
        raise ValueError(f"environment.requirements_file: {str(path)!r} is not a file")
    return path.read_text()


def default_work_root() -> Path:
    """Where a run's files live on the Airflow worker: its snapshot, plan, logs and artifacts."""
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(home) / "dnntrain" / "runs"


class JobState(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self is not JobState.RUNNING


@dataclass(frozen=True)
class LogLine:
    replica: str
    text: str

    def __str__(self) -> str:
        return f"[{self.replica}] {self.text}"


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    message: str = ""
    failed_replica: str | None = None
    exit_code: int | None = None
    last_lines: list[str] = field(default_factory=list)


class JobFailed(RuntimeError):
    def __init__(self, status: JobStatus) -> None:
        detail = "\n".join(f"    {line}" for line in status.last_lines)
        super().__init__(status.message + (f"\n  last lines:\n{detail}" if detail else ""))
        self.status = status


def aggregate_status(plan: JobPlan, exit_codes: Mapping[str, int | None]) -> JobStatus:
    """Gang semantics from each replica's exit code (``None`` = still running).

    Any replica exiting non-zero fails the job; a replica that should run until stopped (a parameter
    server) exiting at all fails it too. Success is the deciding replica exiting 0 (``chief`` policy)
    or every replica exiting 0 (``all`` policy).
    """
    for replica in plan.replicas:
        code = exit_codes.get(replica.name)
        if code is None:
            continue
        if code != 0:
            return JobStatus(
                JobState.FAILED,
                f"replica {replica.name} failed with exit code {code}",
                failed_replica=replica.name,
                exit_code=code,
            )
        if replica.runs_until_stopped:
            return JobStatus(
                JobState.FAILED,
                f"replica {replica.name} exited before the job finished",
                failed_replica=replica.name,
                exit_code=code,
            )
    finishers = [r for r in plan.replicas if not r.runs_until_stopped]
    if plan.success_policy == "chief":
        finishers = [r for r in finishers if r.decides_success]
    if all(exit_codes.get(r.name) == 0 for r in finishers):
        return JobStatus(JobState.SUCCEEDED, "job succeeded")
    return JobStatus(JobState.RUNNING)


class JobHandle(ABC):
    run_id: str
    plan: JobPlan


class Launcher(ABC):
    """Where replicas run. Subclasses know nothing about TensorFlow vs PyTorch beyond the plan."""

    name: str = "launcher"
    stop_grace_seconds: float = 10.0
    work_root: Path | None = None  # where runs' files live on the worker (default_work_root())

    @abstractmethod
    def placement(self, run_id: str) -> Placement: ...

    def interpreter(self, job: TrainingJob) -> str:
        return job.environment.python or sys.executable

    def run_dir(self, run_id: str) -> Path:
        """The run's folder on the worker: its plan, logs and artifacts (owner-only)."""
        return (self.work_root or default_work_root()) / run_id

    def inputs_folder(self, run_id: str) -> str:
        """Where the run's replicas find its downloaded inputs (``<folder>/<name>``, pointing at the
        host's cache)."""
        return str(self.run_dir(run_id) / "inputs")

    def validate(self, job: TrainingJob) -> None:
        """Raise ``ValueError`` naming the field if this backend cannot run ``job``."""
        for item in job.inputs:
            if item.scheme == "pvc" and not item.downloads:
                raise ValueError(
                    f"inputs.{item.name}.uri: pvc:// names a Kubernetes volume claim; the {self.name} "
                    "launcher's replicas read a path (file:// or a plain path on a shared filesystem)"
                )

    def plan(self, job: TrainingJob, run_id: str) -> JobPlan:
        """Placement + topology, no side effects."""
        self.validate(job)
        placed = job.with_inputs_in(self.inputs_folder(run_id))
        return render_plan(placed, run_id, self.placement(run_id), self.interpreter(job))

    def preview(self, job: TrainingJob, run_id: str) -> JobPlan:
        """The plan a dry run shows: where replicas would go, as far as it is known before a run
        (placeholder hosts unless the backend knows its hosts)."""
        placed = job.with_inputs_in(self.inputs_folder(run_id))
        return render_plan(placed, run_id, placeholder_placement(), self.interpreter(job))

    def preview_objects(self, job: TrainingJob, run_id: str) -> list[dict] | None:
        """What the backend would create for the run beyond processes (Kubernetes objects), secrets
        masked; None for a backend that creates none."""
        return None

    @abstractmethod
    def submit(
        self,
        job: TrainingJob,
        plan: JobPlan,
        extra_env: Mapping[str, str],
        *,
        pending_env: Collection[str] = (),
    ) -> JobHandle:
        """Start every replica. Submitting the same run id again replaces what is left of it.

        ``pending_env`` names variables whose values are not known yet (:meth:`provide_env` gives them
        later): the processes running the job's script wait for them as they start; runners
        (torchrun, horovodrun, mpirun) start at once, so their ranks usually find them there.
        """

    @abstractmethod
    def provide_env(self, handle: JobHandle, values: Mapping[str, str]) -> None:
        """Deliver the values of the variables ``submit`` was told are pending."""

    @abstractmethod
    def poll(self, handle: JobHandle) -> JobStatus: ...

    @abstractmethod
    def stream_logs(self, handle: JobHandle, timeout: float) -> Iterable[LogLine]:
        """Lines written since the last call, waiting at most ``timeout`` seconds for the first."""

    @abstractmethod
    def stop(self, handle: JobHandle, grace_seconds: float) -> None:
        """Stop every replica still running: SIGTERM, SIGKILL after ``grace_seconds``; return only when
        none of the job's processes is left (raise naming any that could not be stopped). Bounded."""

    @abstractmethod
    def cancel(self, handle: JobHandle) -> None:
        """Ask every replica to stop and return at once: Airflow calls this from its SIGTERM handler,
        and may SIGKILL the task process a few seconds later, so the backend must finish the job (and
        escalate) without this process's help. ``poll`` reports CANCELLED from now on."""

    @abstractmethod
    def tail(self, handle: JobHandle, replica: str) -> list[str]:
        """The last lines a replica wrote."""

    # -- surviving the task process (backends whose replicas can outlive it) ----------------------

    def state(self, handle: JobHandle) -> dict | None:
        """What another process needs to take the job over (JSON, no secrets), or None when the job
        cannot outlive this process (the local launcher's replicas end with it, by design)."""
        return None

    def reattach(self, state: dict, job: TrainingJob, extra_env: Mapping[str, str]) -> JobHandle:
        """Take over the job ``state`` describes (a retry after a worker restart, a resumed deferral)."""
        raise NotImplementedError(f"the {self.name} launcher cannot take over a job")

    def check_deferrable(self, extra_env: Mapping[str, str]) -> None:
        """Raise ``ValueError`` saying why a job given ``extra_env`` could not wait on the triggerer."""
        if type(self).trigger is Launcher.trigger:
            raise ValueError(
                f"deferrable: the {self.name} launcher cannot wait on the triggerer (its replicas end "
                "with the task process); use a multi-host launcher"
            )

    def trigger(self, handle: JobHandle, job: TrainingJob, timeout: float | None):
        """A trigger that waits for the job on the triggerer (values given to ``provide_env`` have
        reached the replicas by the time it returns), or None if this backend has none."""
        return None

    @abstractmethod
    def collect_outputs(self, handle: JobHandle) -> Path:
        """Copy the primary process's (global rank 0's, or the chief's) ``./outputs`` and ``./logs`` into
        the run's artifacts; return their folder."""


def wait_for_job(
    launcher: Launcher,
    handle: JobHandle,
    on_log: Callable[[LogLine], None],
    *,
    timeout: float | None = None,
    watch: Callable[[], None] | None = None,
    on_finished: Callable[[JobStatus], None] | None = None,
) -> JobStatus:
    """Stream logs until the job finishes, then stop what is left (parameter servers, stragglers).
    ``watch`` is called every poll and may raise to end the job; ``on_finished`` hears the outcome as
    soon as it is known, before the stopping begins.

    However this returns, every replica is stopped first, with the launcher's grace: on success, on a
    failing replica (:class:`JobFailed` naming it), on a timeout, and on an exception raised into the
    wait (Airflow's ``execution_timeout`` arrives as one).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        status = launcher.poll(handle)
        while not status.state.finished:
            for line in launcher.stream_logs(handle, timeout=0.05):
                on_log(line)
            if watch is not None:
                watch()
            status = launcher.poll(handle)
            if deadline is not None and time.monotonic() > deadline and not status.state.finished:
                status = JobStatus(JobState.FAILED, f"job {handle.run_id} timed out after {timeout:.0f}s")
        if on_finished is not None:
            on_finished(status)
    finally:
        _stop_and_drain(launcher, handle, on_log)
    return _settle(launcher, handle, status)


def end_job(launcher: Launcher, handle: JobHandle, status: JobStatus, on_log: Callable[[LogLine], None]):
    """The end of :func:`wait_for_job` for a job whose outcome was learnt elsewhere (a trigger): stop
    what is left, pass on the last lines, raise :class:`JobFailed` unless it succeeded."""
    _stop_and_drain(launcher, handle, on_log)
    return _settle(launcher, handle, status)


def _stop_and_drain(launcher: Launcher, handle: JobHandle, on_log: Callable[[LogLine], None]) -> None:
    launcher.stop(handle, grace_seconds=launcher.stop_grace_seconds)
    for line in launcher.stream_logs(handle, timeout=0):
        on_log(line)


def _settle(launcher: Launcher, handle: JobHandle, status: JobStatus) -> JobStatus:
    if status.state is not JobState.SUCCEEDED:
        if status.failed_replica and not status.last_lines:
            status = replace(status, last_lines=launcher.tail(handle, status.failed_replica))
        raise JobFailed(status)
    return status
