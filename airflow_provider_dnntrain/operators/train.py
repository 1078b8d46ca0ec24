"""Training operators: validate at parse time, render, launch, stream, push the run to XCom."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from airflow.sdk import BaseOperator
from pydantic import ValidationError

from airflow_provider_dnntrain.launchers.base import (
    JobFailed,
    JobHandle,
    JobState,
    JobStatus,
    Launcher,
    wait_for_job,
)
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
from airflow_provider_dnntrain.topology import JobPlan, placeholder_placement, render_plan

_FRAMEWORK_DISTRIBUTIONS = {"tensorflow": ("tensorflow-cpu", "tensorflow"), "pytorch": ("torch",)}
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
    template_fields: Sequence[str] = (*_JOB_FIELDS, "inputs", "tracking_uri", "experiment_name")
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
        **kwargs: Any,
    ) -> None:
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
        )

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
        ``conf`` at ``logical_date`` (placeholder hosts, default ports; secrets shown as ``***``)."""
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
        plan = render_plan(job, f"{self.dag_id}-{self.task_id}-dry-run", placeholder_placement())
        print(plan.to_json())
        return plan.to_dict()

    # -- execution ------------------------------------------------------------------------------

    def execute(self, context) -> dict[str, Any]:
        began = time.monotonic()
        ti = context["ti"]
        run_id = make_run_id(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number)
        job = self.build_job()
        self._check_source(job)
        launcher = self._launcher()
        session = TrackingSession.start(self, context, job, run_id) if self.tracking else None
        handle = None
        try:
            if session is not None:
                job = session.with_credentials(job)
            plan = launcher.plan(job, run_id)
            self._raise_if_killed("before it started")
            # The tracking run is still being created: the replicas start now and are given its id
            # as soon as it exists (the script's processes wait for it, runners do not).
            handle = self._handle = launcher.submit(
                job,
                plan,
                extra_env=session.replica_env(plan) if session else {},
                pending_env=session.pending_variables if session else (),
            )
            launched = time.monotonic()
            self.log.info(
                "Run %s on the %s launcher, plan:\n%s", run_id, launcher.name, handle.plan.to_json()
            )
            if self._kill_requested:  # on_kill came while replicas were being started
                launcher.cancel(handle)
            wait_for_job(
                launcher,
                handle,
                on_log=lambda line: self.log.info("%s", line),
                timeout=self.job_timeout,
                watch=(lambda: session.deliver(launcher, job, handle)) if session else None,
                on_finished=session.on_finished if session else None,
            )
            ended = time.monotonic()
        except BaseException as error:
            outcome, reason = self._outcome_of(error)
            if handle is not None:
                launcher.stop(handle, launcher.stop_grace_seconds)  # no-op if already stopped
            self._finish(session, launcher, handle, outcome, reason, failing=True)
            if isinstance(error, JobFailed):
                raise TrainingRunFailed(f"training run {run_id} failed: {error}") from None
            raise
        finally:
            self._handle = None
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
        return self._result(run_id, artifacts, session, metrics)

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


class TrackingSession:
    """The MLflow side of one execution. The run is created in the background from the moment
    ``execute`` starts; the replicas wait for it only when they are about to start."""

    def __init__(self, operator: DnnTrainOperator, context, job: TrainingJob, run_id: str) -> None:
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
        self._credentials_env = self.target.credentials_in_env()
        self._credentials_env.__enter__()
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
        """The job with the tracking credentials as secrets: masked, never in a plan, given to replicas."""
        if not self.target.credentials:
            return job
        secrets = {name: value.get_secret_value() for name, value in job.environment.secrets.items()}
        environment = Environment.model_validate(
            {
                **job.environment.model_dump(exclude={"secrets"}),
                "secrets": {**secrets, **self.target.credentials},
            }
        )
        return job.model_copy(update={"environment": environment})

    def replica_env(self, plan: JobPlan) -> dict[str, str]:
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
            self._credentials_env.__exit__(None, None, None)

    def public(self, uri: str) -> str:
        return self._tracking.public_uri(uri)


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
