"""Training operators: validate at parse time, render, launch, stream, push the run to XCom."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import yaml
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import TaskDeferred
from pydantic import ValidationError

from airflow_provider_dnntrain.launchers.base import (
    JobFailed,
    JobHandle,
    JobState,
    JobStatus,
    Launcher,
    end_job,
    wait_for_job,
)
from airflow_provider_dnntrain.operators.azure_arguments import AZURE_NAMES, take_azure_arguments
from airflow_provider_dnntrain.operators.tracking_session import TrackingSession
from airflow_provider_dnntrain.run_id import make_run_id
from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.spec import (
    Environment,
    Horovod,
    Input,
    Resources,
    SingleNode,
    TrainingJob,
)

# Where a launcher's job that can outlive the task process is kept for the next try.
_JOB_STATE_KEY = "dnntrain_job"
_JOB_FIELDS = ("source_directory", "entry_script", "arguments", "environment_variables", "secret_variables")


class InvalidTrainingJob(ValueError):
    """A training job that cannot run; the message names the offending field."""


class TrainingRunFailed(RuntimeError):
    """The training run ended without success (a replica failed, it timed out or it was stopped)."""


def build_job(task_id: str, **fields: Any) -> TrainingJob:
    try:
        return TrainingJob(**fields)
    except ValidationError as error:
        raise InvalidTrainingJob(f"task {task_id!r}: invalid training job: {_describe(error)}") from None


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in error.errors())


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _is_job_resources(value: Any) -> bool:
    """Ours (``use_gpu``, ``cpu``, ``memory``) rather than Airflow's executor resources (``cpus``...)."""
    return isinstance(value, Resources) or (
        isinstance(value, Mapping) and bool(value) and set(value) <= set(Resources.model_fields)
    )


class DnnTrainOperator(BaseOperator):
    """Train a model with ``entry_script`` from ``source_directory`` on a launcher's replicas.

    The XCom ``return_value`` holds ``run_id``, ``status``, ``outputs`` (local folder),
    ``artifact_uri`` (MLflow), ``tracking_run_id``, ``tracking_uri`` and the run's final ``metrics``.
    """

    framework: ClassVar[str]
    template_fields: Sequence[str] = (
        *_JOB_FIELDS,
        "inputs",
        "tracking_uri",
        "experiment_name",
        "resume_from",
    )
    template_fields_renderers = {
        "arguments": "json",
        "environment_variables": "json",
        "secret_variables": "json",
        "inputs": "json",
    }
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
        ours = _with_azure_arguments(self.framework, ours, kwargs)
        arguments, distribution, job_timeout = ours["arguments"], ours["distribution"], ours["job_timeout"]
        # BaseOperator has its own `resources` (executor hints); ours is taken when it is ours.
        job_resources = kwargs.pop("resources") if _is_job_resources(kwargs.get("resources")) else {}
        super().__init__(**kwargs)
        environment = _environment_dict(environment)
        self.entry_script = entry_script
        self.source_directory = source_directory
        self.arguments = arguments if arguments is not None else []
        self.distribution = distribution if distribution is not None else SingleNode()
        self.environment = {k: v for k, v in environment.items() if k not in ("variables", "secrets")}
        self.environment_variables = {**environment.get("variables", {}), **(environment_variables or {})}
        self.secret_variables = {**environment.get("secrets", {}), **(secret_variables or {})}
        self.job_resources = _resources_dict(job_resources, use_gpu)
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
        values = {name: getattr(self, name) for name in (*_JOB_FIELDS, "inputs")}
        values.update(fields or {})
        arguments = values["arguments"]
        if _is_template(arguments) and validate_only:
            arguments = []
        if isinstance(arguments, str):
            raise InvalidTrainingJob(
                f"task {self.task_id!r}: invalid training job: arguments: rendered to a string, "
                "expected a list or a mapping (set render_template_as_native_obj=True on the DAG)"
            )
        environment = {
            **self.environment,
            "variables": values["environment_variables"],
            "secrets": values["secret_variables"],
        }
        return build_job(
            self.task_id,
            framework=self.framework,
            source_directory=self._source_path(values["source_directory"]),
            entry_script=values["entry_script"],
            arguments=arguments,
            distribution=self.distribution,
            environment=environment,
            resources=self.job_resources,
            inputs=values["inputs"],
            azureml_compat=self.azureml_compat,
        )

    def _with_resume(self, job: TrainingJob, ti, session, scratch: Path) -> TrainingJob:
        """The job with an earlier run's outputs to continue from: ``resume_from`` (a folder here, or a
        training run id whose outputs the tracking store has), or on a retry the previous try's."""
        wanted, automatic = self.resume_from, False
        if not wanted and ti.try_number > 1 and self.resume_on_retry:
            previous = ti.try_number - 1
            wanted, automatic = make_run_id(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, previous), True
        if not wanted:
            return job
        folder = Path(wanted.removeprefix("file://")).expanduser()
        try:
            if automatic or not folder.is_dir():
                if session is None:
                    raise LookupError("tracking is off, so no run's outputs can be looked up")
                folder = session.download_outputs(wanted, scratch)
        except LookupError as error:
            if automatic:
                self.log.info("Try %d starts afresh: %s", ti.try_number, error)
                return job
            raise InvalidTrainingJob(
                f"task {self.task_id!r}: invalid training job: resume_from: {wanted!r} is not a folder here "
                f"nor a training run with outputs ({error})"
            ) from None
        self.log.info("Resuming from %s (%s)", wanted, folder)
        return job.model_copy(update={"resume_from": str(folder), "resume_argument": self.resume_argument})

    def _source_path(self, source_directory: str) -> str:
        """A relative ``source_directory`` is relative to the DAG file's folder, as users expect."""
        path = Path(source_directory).expanduser()
        fileloc = getattr(self.dag, "fileloc", None) if self.has_dag() else None
        if not path.is_absolute() and fileloc and not _is_template(source_directory):
            path = Path(fileloc).parent / path
        return str(path)

    def _validate_at_parse_time(self) -> None:
        job = self.build_job(validate_only=True)
        try:
            if self.deferrable:
                self._launcher().check_deferrable({})
            self._launcher().validate(job)
        except ValueError as error:
            raise InvalidTrainingJob(f"task {self.task_id!r}: invalid training job: {error}") from None
        if not _is_template(self.source_directory) and not _is_template(self.entry_script):
            self._check_source(job)

    def _check_source(self, job: TrainingJob) -> None:
        try:
            check_source(job)
        except ValueError as error:
            raise InvalidTrainingJob(f"task {self.task_id!r}: invalid training job: {error}") from None

    def _launcher(self) -> Launcher:
        if self.launcher is None:
            from airflow_provider_dnntrain.launchers.local import LocalLauncher

            self.launcher = LocalLauncher()
        return self.launcher

    def dry_run(self, *, conf: Mapping[str, Any] | None = None, logical_date: datetime | None = None) -> dict:
        """Print and return the plan a run would have, with templates rendered for a manual run with
        ``conf`` at ``logical_date``: the launcher's hosts where it knows them before a run (else
        placeholders), default ports (free ones are chosen at submit), and the objects a backend such
        as Kubernetes would create (under ``objects``); secrets shown as ``***``."""
        fields = None
        if self.has_dag():
            from airflow_provider_dnntrain.operators.preview import preview_context

            context = preview_context(self, dict(conf or {}), logical_date)
            jinja_env = self.get_template_env()
            fields = {
                name: self.render_template(getattr(self, name), context, jinja_env, set())
                for name in (*_JOB_FIELDS, "inputs")
            }
        job = self.build_job(fields)
        self._check_source(job)
        run_id = make_run_id(self.dag_id, self.task_id, "dry-run", -1, 1)
        plan = self._launcher().preview(job, run_id)
        print(plan.to_json())
        shown = plan.to_dict()
        objects = self._launcher().preview_objects(job, run_id)
        if objects is not None:
            print(yaml.safe_dump_all(objects, sort_keys=False))
            shown["objects"] = objects
        return shown

    # -- execution ------------------------------------------------------------------------------

    def execute(self, context) -> dict[str, Any]:
        began = time.monotonic()
        ti = context["ti"]
        job = self.build_job()
        self._check_source(job)
        launcher = self._launcher()
        saved = self._saved_job(context)
        run_id = saved["run_id"] if saved else _new_run_id(ti)
        session = TrackingSession.start(self, context, job, run_id) if self.tracking else None
        handle = None
        try:
            if session is not None:
                job = session.with_credentials(job)
            replica_env = session.replica_env() if session else {}
            if self.deferrable:
                launcher.check_deferrable(replica_env)
            if saved:  # an earlier try's replicas still run (its worker died): take them over
                handle = self._handle = launcher.reattach(saved, job, replica_env)
                self.log.info("Run %s: took over the replicas an earlier try started", run_id)
            else:
                with tempfile.TemporaryDirectory(prefix="dnntrain-resume-") as scratch:
                    job = self._with_resume(job, ti, session, Path(scratch))
                    plan = launcher.plan(job, run_id)
                    self._raise_if_killed("before it started")
                    # The tracking run is still being created: the replicas start now and are given its
                    # id as soon as it exists (the script's processes wait for it, runners do not).
                    handle = self._handle = launcher.submit(
                        job,
                        plan,
                        extra_env=replica_env,
                        pending_env=session.pending_variables if session else (),
                    )
                self._remember(context, launcher, handle)
            launched = time.monotonic()
            self.log.info(
                "Run %s on the %s launcher, plan:\n%s", run_id, launcher.name, handle.plan.to_json()
            )
            if self._kill_requested:  # on_kill came while replicas were being started
                self.log.info("The task was stopped while run %s started: stopping every replica", run_id)
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
            ended = time.monotonic()
        except TaskDeferred:
            raise
        except BaseException as error:
            self._fail(context, error, run_id, session, launcher, handle)
        finally:
            self._handle = None
        artifacts, metrics = self._finish(session, launcher, handle, "FINISHED", "succeeded", failing=False)
        self._forget(context)
        self.log.info(
            "Run %s: replicas started %.2f s into execute (tracking run ready at %.2f s), ran %.2f s; "
            "outputs collected and tracking closed in %.2f s",
            run_id,
            launched - began,
            session.ready_at - began if session else 0.0,
            ended - launched,
            time.monotonic() - ended,
        )
        return self._result(run_id, artifacts, session, metrics)

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
            failed = event.get("failed_replica")
            status = JobStatus(
                JobState(event["status"]),
                event["message"],
                failed_replica=failed,
                exit_code=event.get("exit_code"),
                last_lines=event.get("tails", {}).get(failed or "", []),
            )
            end_job(launcher, handle, status, on_log=lambda line: self.log.info("%s", line))
        except BaseException as error:
            self._fail(context, error, run_id, session, launcher, handle)
        artifacts, metrics = self._finish(session, launcher, handle, "FINISHED", "succeeded", failing=False)
        self._forget(context)
        return self._result(run_id, artifacts, session, metrics)

    def _fail(self, context, error: BaseException, run_id: str, session, launcher, handle) -> NoReturn:
        outcome, reason = self._outcome_of(error)
        if handle is not None:
            launcher.stop(handle, launcher.stop_grace_seconds)  # no-op if already stopped
        self._finish(session, launcher, handle, outcome, reason, failing=True)
        self._forget(context)
        if isinstance(error, JobFailed):
            raise TrainingRunFailed(f"training run {run_id} failed: {error}") from None
        raise error

    # -- a job that outlives the task process ----------------------------------------------------

    def _saved_job(self, context) -> dict | None:
        """The job an earlier try of this task instance left running, for a launcher that can take it
        over (``task_state_store``, as ``ResumableJobMixin`` keeps its external job ids)."""
        store = context.get("task_state_store")
        if store is None or self._launcher().state.__func__ is Launcher.state:
            return None
        return store.get(_JOB_STATE_KEY) or None

    def _remember(self, context, launcher: Launcher, handle: JobHandle) -> None:
        store = context.get("task_state_store")
        state = launcher.state(handle)
        if store is not None and state is not None:
            store.set(_JOB_STATE_KEY, state)

    def _forget(self, context) -> None:
        store = context.get("task_state_store")
        if store is not None and self._launcher().state.__func__ is not Launcher.state:
            store.delete(_JOB_STATE_KEY)

    def _outcome_of(self, error: BaseException) -> tuple[str, str]:
        if self._kill_requested:
            return "KILLED", "the Airflow task was stopped (on_kill)"
        if isinstance(error, JobFailed):
            cancelled = error.status.state is JobState.CANCELLED
            return ("KILLED" if cancelled else "FAILED"), error.status.message
        return "FAILED", f"{type(error).__name__}: {error}"

    def _finish(self, session, launcher, handle, outcome: str, reason: str, *, failing: bool):
        """Collect the chief's outputs and logs (a failed run keeps them for whoever debugs it) and close
        the tracking run. While a failure propagates, a problem here is logged, not raised over it."""
        try:
            artifacts = launcher.collect_outputs(handle) if handle is not None else None
            metrics = session.finish(artifacts, outcome, reason) if session else {}
            return artifacts, metrics
        except Exception:
            if not failing:
                raise
            self.log.exception("Could not record the end of run; the run itself ended: %s", reason)
            return None, {}

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

    def _result(self, run_id: str, artifacts, session, metrics: dict[str, float]) -> dict[str, Any]:
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


def _with_azure_arguments(framework: str, ours: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``ours`` with the Azure ML estimator arguments taken out of ``kwargs`` in their place."""
    invalid = f"task {kwargs.get('task_id', '?')!r}: invalid training job"
    try:
        azure = take_azure_arguments(framework, kwargs)
    except ValueError as error:  # AzureArgumentError, or a topology the counts cannot make
        raise InvalidTrainingJob(f"{invalid}: {error}") from None
    for name, value in azure.items():
        if ours.get(name) is not None:
            raise InvalidTrainingJob(
                f"{invalid}: {AZURE_NAMES[name]}: Azure's name for {name}; give one of them, not both"
            )
        ours[name] = value
    return ours


def _new_run_id(ti) -> str:
    return make_run_id(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number)


def _environment_dict(environment: Environment | Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(environment, Environment):
        data = environment.model_dump(exclude={"secrets"})
        data["secrets"] = {k: v.get_secret_value() for k, v in environment.secrets.items()}
        return data
    return dict(environment or {})


def _resources_dict(resources: Resources | Mapping[str, Any], use_gpu: bool | None) -> dict[str, Any]:
    data = (
        resources.model_dump(exclude_defaults=True) if isinstance(resources, Resources) else dict(resources)
    )
    if use_gpu is not None:
        data["use_gpu"] = use_gpu
    return data


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


def build_distribution(task_id: str, model: type, **fields: Any):
    try:
        return model(**fields)
    except ValidationError as error:
        raise InvalidTrainingJob(f"task {task_id!r}: invalid training job: {_describe(error)}") from None
