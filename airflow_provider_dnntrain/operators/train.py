"""Training operators: validate at parse time, render, launch, stream, push the run to XCom."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_dnntrain.backends.base import (
    JobFailed,
    JobHandle,
    Launcher,
    end_job,
    wait_for_job,
)
from airflow_provider_dnntrain.inputs import check_destinations
from airflow_provider_dnntrain.operators import job_state
from airflow_provider_dnntrain.operators.job_fields import (
    JOB_FIELDS,
    InvalidTrainingJob,
    build_distribution,
    environment_dict,
    is_job_resources,
    is_template,
    job_of,
    resources_dict,
    with_azure_arguments,
)
from airflow_provider_dnntrain.operators.resume import with_resume
from airflow_provider_dnntrain.operators.tracking_session import (
    TrackingSession,
    finish_run,
    outcome_of,
    training_result,
)
from airflow_provider_dnntrain.run_id import run_id_of_try
from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.spec import Environment, Horovod, Input, SingleNode, TrainingJob
from airflow_provider_dnntrain.triggers import job_status_of


class TrainingRunFailed(RuntimeError):
    """The training run ended without success (a replica failed, it timed out or it was stopped)."""


class DnnTrainOperator(BaseOperator):
    """Train a model with ``entry_script`` from ``source_directory`` on a launcher's replicas.

    The XCom ``return_value`` holds ``run_id``, ``status``, ``outputs`` (local folder),
    ``artifact_uri`` (MLflow), ``tracking_run_id``, ``tracking_uri`` and the run's final ``metrics``.
    """

    framework: ClassVar[str]
    template_fields: Sequence[str] = (*JOB_FIELDS, "inputs", "tracking_uri", "experiment_name", "resume_from")
    template_fields_renderers = dict.fromkeys(
        ("arguments", "environment_variables", "secret_variables", "inputs"), "json"
    )
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        entry_script: str,
        source_directory: str,
        arguments: list[Any] | Mapping[str, Any] | str | None = None,
        distribution: Any = None,
        environment: Environment | Mapping[str, Any] | None = None,
        environment_variables: Mapping[str, str] | None = None,
        secret_variables: Mapping[str, str] | None = None,
        use_gpu: bool | None = None,
        inputs: list[Input | Mapping[str, Any]] | None = None,
        launcher: Launcher | None = None,
        tracking: bool = True,
        tracking_uri: str | None = None,
        tracking_conn_id: str | None = "dnntrain_mlflow",
        experiment_name: str | None = None,
        job_timeout: float | None = None,
        deferrable: bool = False,
        azureml_compat: bool = False,
        resume_from: str | None = None,
        resume_argument: str | None = None,
        resume_on_retry: bool = True,
        **kwargs: Any,
    ) -> None:
        ours = {"arguments": arguments, "distribution": distribution, "job_timeout": job_timeout}
        ours = with_azure_arguments(self.framework, ours, kwargs)
        arguments, distribution, job_timeout = ours["arguments"], ours["distribution"], ours["job_timeout"]
        # BaseOperator has its own `resources` (executor hints); ours is taken when it is ours.
        job_resources = kwargs.pop("resources") if is_job_resources(kwargs.get("resources")) else {}
        super().__init__(**kwargs)
        environment = environment_dict(environment)
        self.entry_script = entry_script
        self.source_directory = source_directory
        self.arguments = arguments if arguments is not None else []
        self.distribution = distribution if distribution is not None else SingleNode()
        self.environment = {k: v for k, v in environment.items() if k not in ("variables", "secrets")}
        self.environment_variables = {**environment.get("variables", {}), **(environment_variables or {})}
        self.secret_variables = {**environment.get("secrets", {}), **(secret_variables or {})}
        self.job_resources = resources_dict(job_resources, use_gpu)
        # Plain dicts, so that templates inside them are rendered like any other field's.
        self.inputs = [i.model_dump() if isinstance(i, Input) else dict(i) for i in inputs or []]
        self.launcher = launcher
        self.tracking = tracking
        self.tracking_uri = tracking_uri
        self.tracking_conn_id = tracking_conn_id
        self.experiment_name = experiment_name
        self.job_timeout = job_timeout
        self.deferrable = deferrable
        self.azureml_compat = azureml_compat
        self.resume_from = resume_from
        self.resume_argument = resume_argument
        self.resume_on_retry = resume_on_retry
        self._handle: JobHandle | None = None
        self._kill_requested = False
        self._validate_at_parse_time()

    # -- the job --------------------------------------------------------------------------------

    def build_job(
        self, fields: Mapping[str, Any] | None = None, *, validate_only: bool = False
    ) -> TrainingJob:
        """The typed job from this operator's (rendered) fields, or from ``fields`` given instead (a
        preview); raises :class:`InvalidTrainingJob` naming the field."""
        return job_of(self, fields, validate_only=validate_only)

    def _validate_at_parse_time(self) -> None:
        job = self.build_job(validate_only=True)
        try:
            if self.deferrable:
                self._launcher().check_deferrable({})
            self._launcher().validate(job)
        except ValueError as error:
            raise InvalidTrainingJob(f"task {self.task_id!r}: invalid training job: {error}") from None
        if not is_template(self.source_directory) and not is_template(self.entry_script):
            self._check_source(job)

    def _check_source(self, job: TrainingJob) -> None:
        """The code is there and the inputs' credentials go only to their connections' servers,
        before anything starts."""
        try:
            check_source(job)
            check_destinations(job)
        except ValueError as error:
            raise InvalidTrainingJob(f"task {self.task_id!r}: invalid training job: {error}") from None

    def _launcher(self) -> Launcher:
        if self.launcher is None:
            from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher

            self.launcher = LocalLauncher()
        return self.launcher

    def dry_run(self, *, conf: Mapping[str, Any] | None = None, logical_date: datetime | None = None) -> dict:
        """Print and return the plan a run would have, with templates rendered for a manual run with
        ``conf`` at ``logical_date``: the launcher's hosts where it knows them before a run (else
        placeholders), default ports (free ones are chosen at submit), and the objects a backend such
        as Kubernetes would create (under ``objects``); secrets shown as ``***``."""
        from airflow_provider_dnntrain.operators.preview import dry_run

        return dry_run(self, conf, logical_date)

    # -- execution ------------------------------------------------------------------------------

    def execute(self, context) -> dict[str, Any]:
        began = time.monotonic()
        job = self.build_job()
        self._check_source(job)
        launcher = self._launcher()
        saved = job_state.saved_job(context, launcher)
        run_id = saved["run_id"] if saved else run_id_of_try(context["ti"])
        session = TrackingSession.start(self, context, job, run_id) if self.tracking else None
        handle = None
        try:
            if session is not None:
                job = session.with_credentials(job)
            replica_env = session.replica_env() if session else {}
            if self.deferrable:
                launcher.check_deferrable(replica_env)
            job, handle = self._launch(context, launcher, job, session, saved, run_id, replica_env)
            launched = time.monotonic()
            self._wait(launcher, job, handle, session)
            ended = time.monotonic()
        except TaskDeferred:
            raise
        except BaseException as error:
            self._fail(context, error, run_id, session, launcher, handle)
        finally:
            self._handle = None
        job_state.forget(context, launcher)  # the job has ended: nothing is left to take over
        artifacts, metrics = self._finish(session, launcher, handle, "FINISHED", "succeeded", failing=False)
        self.log.info(
            "Run %s: replicas started %.2f s into execute (tracking run ready at %.2f s), ran %.2f s; "
            "outputs collected and tracking closed in %.2f s",
            run_id,
            launched - began,
            session.ready_at - began if session else 0.0,
            ended - launched,
            time.monotonic() - ended,
        )
        return training_result(run_id, artifacts, session, metrics)

    def _launch(
        self, context, launcher, job, session, saved, run_id, replica_env
    ) -> tuple[TrainingJob, JobHandle]:
        """The job as it runs, and its handle: the replicas an earlier try left running (its worker died),
        taken over, or the run's own, started."""
        if saved:
            handle = self._handle = launcher.reattach(saved, job, replica_env)
            self.log.info("Run %s: took over the replicas an earlier try started", run_id)
            return job, handle
        with tempfile.TemporaryDirectory(prefix="dnntrain-resume-") as scratch:
            job = with_resume(self, job, context["ti"], session, Path(scratch))
            plan = launcher.plan(job, run_id)
            self._raise_if_killed("before it started")
            # The tracking run is still being created: the replicas start now and are given its id as
            # soon as it exists (the script's processes wait for it, runners do not).
            pending = session.pending_variables if session else ()
            handle = self._handle = launcher.submit(
                job, plan, extra_env=replica_env, pending_env=pending, time_limit=self.job_timeout
            )
        job_state.remember(context, launcher, handle)
        return job, handle

    def _wait(self, launcher: Launcher, job: TrainingJob, handle: JobHandle, session) -> None:
        """Until the job ends (or, deferrable, hand the wait to the triggerer), its lines into the log."""
        self.log.info(
            "Run %s on the %s launcher, plan:\n%s", handle.run_id, launcher.name, handle.plan.to_json()
        )
        if self._kill_requested:  # on_kill came while replicas were being started
            self.log.info("The task was stopped while run %s started: stopping every replica", handle.run_id)
            launcher.cancel(handle)
        if self.deferrable:
            self._defer_the_wait(launcher, job, handle, session)
        wait_for_job(
            launcher,
            handle,
            on_log=lambda line: self.log.info("%s", line),
            timeout=self.job_timeout,
            watch=(lambda: session.deliver(launcher, job, handle)) if session else None,
            on_finished=session.on_finished if session else None,
        )

    def _defer_the_wait(self, launcher: Launcher, job: TrainingJob, handle: JobHandle, session) -> None:
        """Hand the wait to the triggerer: once the replicas have the tracking run's id."""
        if session is not None:
            session.deliver_now(launcher, job, handle)
            session.suspend()
        trigger = launcher.trigger(handle, job, self.job_timeout)
        self.log.info("Run %s: waiting on the triggerer", handle.run_id)
        self.defer(trigger=trigger, method_name="execute_complete")

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        """The trigger saw the job end: stop what is left, collect the outputs, close the tracking run."""
        job = self.build_job()
        launcher = self._launcher()
        state = event["state"]
        run_id = state["run_id"]
        session = TrackingSession.start(self, context, job, run_id) if self.tracking else None
        handle = None
        try:
            if session is not None:
                job = session.with_credentials(job)
            handle = launcher.reattach(state, job, {})
            end_job(launcher, handle, job_status_of(event), on_log=lambda line: self.log.info("%s", line))
        except BaseException as error:
            self._fail(context, error, run_id, session, launcher, handle)
        job_state.forget(context, self._launcher())
        artifacts, metrics = self._finish(session, launcher, handle, "FINISHED", "succeeded", failing=False)
        return training_result(run_id, artifacts, session, metrics)

    def _fail(self, context, error: BaseException, run_id: str, session, launcher, handle) -> NoReturn:
        outcome, reason = outcome_of(error, killed=self._kill_requested)
        if handle is not None:
            launcher.stop(handle, launcher.stop_grace_seconds)  # no-op if already stopped
        self._finish(session, launcher, handle, outcome, reason, failing=True)
        job_state.forget(context, self._launcher())
        if isinstance(error, JobFailed):
            raise TrainingRunFailed(f"training run {run_id} failed: {error}") from None
        raise error

    def _finish(self, session, launcher, handle, outcome: str, reason: str, *, failing: bool):
        return finish_run(session, launcher, handle, outcome, reason, failing=failing, log=self.log)

    def _raise_if_killed(self, when: str) -> None:
        if self._kill_requested:
            raise TrainingRunFailed(f"the task was stopped {when}; nothing was left running")

    def on_kill(self) -> None:
        # Called from Airflow's SIGTERM handler, possibly before the replicas exist: remembered, so a
        # submit under way is cancelled as soon as it returns; nothing here may block.
        self._kill_requested = True
        if self._handle is not None and self.launcher is not None:
            self.log.info("Stopping every replica of run %s", self._handle.run_id)
            self.launcher.cancel(self._handle)

    def render_template_fields(self, context, jinja_env=None) -> None:
        super().render_template_fields(context, jinja_env)
        # Registered before Airflow stores the rendered fields, so they, and every log line, are redacted.
        from airflow.sdk.log import mask_secret

        for name, value in self.secret_variables.items():
            mask_secret(str(value), name)
        if self.tracking_uri:
            from airflow_provider_dnntrain.tracking import split_credentials

            for name, value in split_credentials(str(self.tracking_uri)).credentials.items():
                mask_secret(value, name)


class TensorFlowTrainOperator(DnnTrainOperator):
    """TensorFlow training: single node, ``ParameterServer`` or ``MultiWorkerMirrored``."""

    framework = "tensorflow"


class PyTorchTrainOperator(DnnTrainOperator):
    """PyTorch training: single node or DDP via ``torchrun`` (``TorchDistributed``)."""

    framework = "pytorch"


class PyTorchHorovodOperator(PyTorchTrainOperator):
    """PyTorch with Horovod: ``node_count`` x ``process_count_per_node`` ranks started by ``horovodrun``
    (Gloo or MPI controller) or ``mpirun``. Scripts call ``hvd.init()`` and read rank/size from Horovod."""

    def __init__(
        self,
        *,
        node_count: int = 1,
        process_count_per_node: int = 1,
        runner: str = "horovodrun",
        controller: str = "gloo",
        network_interface: str | None = None,
        **kwargs: Any,
    ) -> None:
        distribution = build_distribution(
            kwargs.get("task_id", "?"),
            Horovod,
            node_count=node_count,
            process_count_per_node=process_count_per_node,
            runner=runner,
            controller=controller,
            network_interface=network_interface,
        )
        super().__init__(distribution=distribution, **kwargs)
