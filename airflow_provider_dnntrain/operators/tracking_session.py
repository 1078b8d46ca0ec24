"""The MLflow side of one training task's execution: the run is created in the background from the
moment ``execute`` starts, its id reaches the replicas as soon as it exists, and it is closed with the
outcome and the outputs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from airflow_provider_dnntrain.backends.base import JobFailed, JobHandle, JobState, JobStatus, Launcher
from airflow_provider_dnntrain.backends.common.tracking_server import store_credentials
from airflow_provider_dnntrain.inputs import shown
from airflow_provider_dnntrain.spec import Environment, TrainingJob
from airflow_provider_dnntrain.topology import JobPlan

_FRAMEWORK_DISTRIBUTIONS = {"tensorflow": ("tensorflow-cpu", "tensorflow"), "pytorch": ("torch",)}


class TrackingSession:
    """The MLflow side of one execution. The run is created in a background thread while the replicas
    start; ``deliver`` hands its id to them once it exists (the script's processes wait for it)."""

    def __init__(self, operator, context, job: TrainingJob, run_id: str) -> None:
        from airflow_provider_dnntrain import tracking

        self._tracking = tracking
        self._log = operator.log
        self.target = tracking.resolve_target(operator.tracking_uri, operator.tracking_conn_id)
        self.run_id = run_id
        self.run = None
        self._error: BaseException | None = None
        ti = context["ti"]
        self.task_instance = {
            "airflow.dag_id": ti.dag_id,
            "airflow.task_id": ti.task_id,
            "airflow.run_id": ti.run_id,
            "airflow.map_index": str(ti.map_index),
        }
        self.experiment = operator.experiment_name or ti.dag_id
        tags = {
            **self.task_instance,
            "airflow.try_number": str(ti.try_number),
            "dnntrain.framework": job.framework,
        }
        self._cleanup = contextlib.ExitStack()
        self._cleanup.enter_context(self.target.credentials_in_env())  # until finish()
        self._describing: threading.Thread | None = None
        self._delivered = False
        self.ready_at = 0.0
        self._starting = threading.Thread(target=self._start, args=(tags,), daemon=True)
        self._starting.start()

    @classmethod
    def start(cls, operator, context, job, run_id) -> TrackingSession:
        from airflow.sdk.log import mask_secret

        session = cls(operator, context, job, run_id)
        for name, value in session.target.credentials.items():
            mask_secret(value, name)
        return session

    def _start(self, tags: dict[str, str]) -> None:
        try:
            self.run = self._tracking.start_run(self.target, self.experiment, self.run_id, tags)
        except BaseException as error:  # handed to the thread that waits for the run
            self._error = error
        finally:
            self.ready_at = time.monotonic()

    def _wait(self):
        self._starting.join()
        if self._error is not None:
            raise self._error
        return self.run

    def with_credentials(self, job: TrainingJob) -> TrainingJob:
        """The job with the tracking credentials as secrets: masked, never in a plan, given to replicas.
        An embedded store a backend serves to its replicas takes the run's own credential."""
        credentials = {**self.target.credentials, **store_credentials(self.target.uri, self.run_id)}
        if not credentials:
            return job
        secrets = {name: value.get_secret_value() for name, value in job.environment.secrets.items()}
        environment = Environment.model_validate(
            {**job.environment.model_dump(exclude={"secrets"}), "secrets": {**secrets, **credentials}}
        )
        return job.model_copy(update={"environment": environment})

    def replica_env(self) -> dict[str, str]:
        return self._tracking.replica_env(self.target)

    @property
    def pending_variables(self) -> tuple[str, ...]:
        return self._tracking.RUN_VARIABLES

    def deliver(self, launcher: Launcher, job: TrainingJob, handle: JobHandle) -> None:
        """Once the run exists, give the replicas its id (and raise, ending the job, if it could not
        be created). Called from the wait loop: cheap until then."""
        if self._delivered or self._starting.is_alive():
            return
        run = self._wait()
        launcher.provide_env(handle, run.run_env())
        self._delivered = True
        self._log.info("Tracking run %s at %s", run.mlflow_run_id, run.tracking_uri)
        self._log_job_description(launcher, job, handle.plan)

    def deliver_now(self, launcher: Launcher, job: TrainingJob, handle: JobHandle) -> None:
        """Wait for the run to exist and give the replicas its id (before the task defers)."""
        self._starting.join()
        self.deliver(launcher, job, handle)

    def suspend(self) -> None:
        """The task defers: what runs in the background ends in this process; the run stays open."""
        if self._describing is not None:
            self._describing.join(timeout=30)
        self._cleanup.close()

    def _log_job_description(self, launcher: Launcher, job: TrainingJob, plan: JobPlan) -> None:
        """Tags and parameters nobody waits for, logged while the job runs."""
        run = self.run

        def describe() -> None:
            try:
                version = framework_version(launcher.interpreter(job), job.framework)
                tags = {"dnntrain.framework_version": version, "dnntrain.distribution": plan.distribution}
                params = {
                    "entry_script": job.entry_script,
                    "arguments": json.dumps(job.argv()),
                    "world_size": plan.world_size,
                    **{f"distribution.{k}": v for k, v in job.distribution.model_dump().items()},
                    **{f"resources.{k}": v for k, v in job.resources.model_dump().items()},
                    **{f"inputs.{i.name}": shown(i.uri) if i.uri else i.path for i in job.inputs},
                }
                self._tracking.describe_run(run, tags, params)
                closed = self._tracking.close_abandoned_tries(run, self.task_instance)
                if closed:
                    self._log.info(
                        "Marked runs of earlier tries KILLED (their task ended abruptly): %s", closed
                    )
            except Exception:
                self._log.warning("Could not record the run's parameters", exc_info=True)

        self._describing = threading.Thread(target=describe, daemon=True)
        self._describing.start()

    def on_finished(self, status: JobStatus) -> None:
        # A stopped task may be SIGKILLed seconds later: say so in the tracking store before anything else.
        if status.state is JobState.CANCELLED and self.run is not None:
            try:
                self._tracking.mark_run(self.run, "KILLED", "the Airflow task was stopped (on_kill)")
            except Exception:
                self._log.warning("Could not mark run %s KILLED yet", self.run.mlflow_run_id, exc_info=True)

    def finish(self, artifacts, outcome: str, reason: str) -> dict[str, float]:
        try:
            run = self._wait()
            if self._describing is not None:
                self._describing.join(timeout=30)
            return self._tracking.finish_run(run, artifacts, outcome, reason)
        finally:
            self._cleanup.close()

    def download_outputs(self, run_id: str, into: Path) -> Path:
        """What an earlier run left in ``outputs/`` (``LookupError`` if nothing)."""
        return self._tracking.download_outputs(self.target, run_id, into)

    def public(self, uri: str) -> str:
        return self._tracking.public_uri(uri)


def framework_version(python: str, framework: str) -> str:
    """The installed framework version as the job's interpreter sees it (package metadata, no import);
    read in this process when the job runs with this interpreter."""
    names = _FRAMEWORK_DISTRIBUTIONS[framework]
    if Path(python).resolve() == Path(sys.executable).resolve():
        import importlib.metadata

        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return "unknown"
    probe = (
        "import importlib.metadata as m, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n        print(m.version(name)); break\n"
        "    except m.PackageNotFoundError:\n        pass\n"
    )
    try:
        result = subprocess.run([python, "-c", probe, *names], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() or "unknown"


def training_result(run_id: str, artifacts: Path, session: TrackingSession | None, metrics: dict) -> dict:
    """What a training task returns (its XCom): the run, where its outputs are, and its tracking."""
    run = session.run if session else None
    return {
        "run_id": run_id,
        "status": "succeeded",
        "outputs": str(artifacts / "outputs"),
        "artifact_uri": session.public(run.artifact_uri) if run else None,
        "tracking_uri": run.tracking_uri if run else None,
        "tracking_run_id": run.mlflow_run_id if run else None,
        "metrics": metrics,
    }


def outcome_of(error: BaseException, killed: bool) -> tuple[str, str]:
    """The tracking run's status for a run ended by ``error`` (``killed``: the task was stopped), and why."""
    if killed:
        return "KILLED", "the Airflow task was stopped (on_kill)"
    if isinstance(error, JobFailed):
        cancelled = error.status.state is JobState.CANCELLED
        return ("KILLED" if cancelled else "FAILED"), error.status.message
    return "FAILED", f"{type(error).__name__}: {error}"


def finish_run(session, launcher: Launcher, handle, outcome: str, reason: str, *, failing: bool, log):
    """Collect the chief's outputs and logs (a failed run keeps them for whoever debugs it) and close the
    tracking run: the outputs' folder and the run's metrics. Outputs that cannot be collected fail a
    run that succeeded (its tracking run is not FINISHED). While a failure propagates (``failing``), a
    problem here is logged, not raised over it."""
    lost = None
    try:
        artifacts = launcher.collect_outputs(handle) if handle is not None else None
    except Exception as error:
        artifacts, lost = None, error
        if not failing:
            outcome, reason = "FAILED", f"the outputs could not be collected: {error}"
    try:
        metrics = session.finish(artifacts, outcome, reason) if session else {}
    except Exception:
        if not failing and lost is None:
            raise
        log.exception("Could not record the end of run; the run itself ended: %s", reason)
        metrics = {}
    if lost is not None:
        if not failing:
            raise lost
        log.warning("The outputs of the run could not be collected: %s", lost)
    return artifacts, metrics
