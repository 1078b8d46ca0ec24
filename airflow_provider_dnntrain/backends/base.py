"""The seam every backend implements, and the gang semantics they all share: read this to learn the house.

A backend is a package beside ``local/``, ``ssh/`` and ``kubernetes/`` whose launcher subclasses
:class:`Launcher`. It knows nothing of TensorFlow or PyTorch: the topology (``topology/``) renders a
:class:`JobPlan` - every replica's role, host, port, argv and environment - and the backend runs it.

The training operator calls a launcher in this order:

1. ``validate(job)`` when the DAG is parsed (raise ``ValueError`` naming the field), and
   ``preview(job, run_id)`` / ``preview_objects`` for ``dry_run()``: no side effects.
2. ``plan(job, run_id)``: placement + topology; still no side effects.
3. ``submit(job, plan, extra_env, pending_env=...)`` starts every replica and returns a
   :class:`JobHandle`; ``provide_env(handle, values)`` later delivers the variables named pending
   (the tracking run's id), which the script's processes wait for as they start.
4. :func:`wait_for_job` loops ``poll`` (aggregate status) and ``stream_logs`` (every line, tagged by
   replica) until the job ends, then ``stop``s what is left; or, deferred, ``trigger(handle, job,
   timeout)`` hands the wait to the triggerer and :func:`end_job` finishes it in ``execute_complete``.
5. ``collect_outputs(handle)``: the primary process's ``./outputs`` and ``./logs`` on the worker.
   ``cancel(handle)`` may come at any time from Airflow's signal handler.
   A backend whose replicas can outlive the task process also gives ``state(handle)`` (JSON, no
   secrets, kept in ``task_state_store``) and ``reattach(state, job, extra_env)``, so that the task's
   next try takes the running job over instead of starting a second one.

What every backend owes, whatever it runs on:

- **Gang semantics** (:func:`aggregate_status`): one replica failing, or a replica that should run
  until stopped (a parameter server) ending, fails the whole job at once, naming the replica, its exit
  code and last lines; the deciding replica (the chief, or all) succeeding ends it.
- **Idempotent submit**: submitting a run id again first ends and replaces whatever an earlier launch
  of that run id left; a run id is unique per (dag, task, Airflow run, map index, try).
- **Nothing left behind**: success, failure, a timeout, ``on_kill``, a stop raised into the wait and a
  SIGKILLed task process all end every process and object of the run (``stop`` verifies and raises
  naming what would not go; ``cancel`` must finish without this process's help). A task process
  SIGKILLed with no try left cannot clean up: each backend's replicas then end themselves (the local
  reapers, the SSH agent's lease, the Kubernetes run's lease read by its pods).
- **Secrets** reach only the script's processes, never a plan, log line, command line or artifact;
  argv travel as lists, never through a shell.

What several backends share lives in ``common/``, below all of them; serving models will sit beside
each launcher in its package, behind an interface of its own here.
"""

from __future__ import annotations

import enum
import logging
import shutil
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from airflow_provider_dnntrain.backends.common.folders import default_work_root
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import JobPlan, Placement, placeholder_placement, render_plan

log = logging.getLogger(__name__)


def secret_values(job: TrainingJob) -> dict[str, str]:
    """The job's secrets in the clear, by variable name: for the replicas' pending file or Secret only."""
    return {name: value.get_secret_value() for name, value in job.environment.secrets.items()}


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


class OutputsLost(RuntimeError):
    """The chief's outputs could not be copied back from where it ran."""


def collected_artifacts(run_dir: Path, run_id: str, lost: str | None, required: bool) -> Path:
    """The run's copied ``outputs`` and ``logs`` (``run_dir/artifacts``); :class:`OutputsLost` when
    the copy failed with ``lost`` (a warning instead when they are not ``required``)."""
    if lost:
        message = f"run {run_id}: the chief's outputs were not collected: {lost}"
        if required:
            raise OutputsLost(message)
        log.warning("%s", message)
    artifacts = run_dir / "artifacts"
    for sub in ("outputs", "logs"):
        (artifacts / sub).mkdir(parents=True, exist_ok=True)
    return artifacts


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

    def fresh_run_dir(self, run_id: str) -> Path:
        """The run's folder, emptied of what an earlier launch of the same run id left; owner-only
        (replicas' logs and plans are the job owner's alone)."""
        run_dir = self.run_dir(run_id)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        run_dir.chmod(0o700)
        return run_dir

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
        time_limit: float | None = None,
    ) -> JobHandle:
        """Start every replica. Submitting the same run id again replaces what is left of it.

        ``pending_env`` names variables whose values are not known yet (:meth:`provide_env` gives them
        later): the processes running the job's script wait for them as they start; runners
        (torchrun, horovodrun, mpirun) start at once, so their ranks usually find them there.
        ``time_limit`` (seconds, the task's ``job_timeout``) is enforced by the wait; a backend whose
        replicas can end themselves when no task is left to do so makes them carry it too.
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
    except BaseException:
        _stop_after_error(launcher, handle, on_log)
        raise
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


def _stop_after_error(launcher: Launcher, handle: JobHandle, on_log: Callable[[LogLine], None]) -> None:
    """Stop while an error propagates: a failure to stop is logged, and the first error is the one
    raised (an API server that is down fails the wait first, then the stop too)."""
    try:
        _stop_and_drain(launcher, handle, on_log)
    except Exception:
        log.exception("Run %s: stopping it failed too", handle.run_id)


def _settle(launcher: Launcher, handle: JobHandle, status: JobStatus) -> JobStatus:
    if status.state is not JobState.SUCCEEDED:
        if status.failed_replica and not status.last_lines:
            status = replace(status, last_lines=launcher.tail(handle, status.failed_replica))
        raise JobFailed(status)
    return status
