"""Training operators: validate at parse time, render, launch, stream, push the run to XCom."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from airflow.sdk import BaseOperator
from pydantic import ValidationError

from airflow_provider_dnntrain.cli import placeholder_placement
from airflow_provider_dnntrain.launchers.base import JobFailed, JobHandle, Launcher, wait_for_job
from airflow_provider_dnntrain.run_id import make_run_id
from airflow_provider_dnntrain.spec import (
    Environment,
    Horovod,
    Input,
    Resources,
    SingleNode,
    TrainingJob,
)
from airflow_provider_dnntrain.topology import JobPlan, render_plan

_FRAMEWORK_DISTRIBUTIONS = {"tensorflow": ("tensorflow-cpu", "tensorflow"), "pytorch": ("torch",)}


class InvalidTrainingJob(ValueError):
    """A training job that cannot run; the message names the offending field."""


def build_job(task_id: str, **fields: Any) -> TrainingJob:
    try:
        return TrainingJob(**fields)
    except ValidationError as error:
        raise InvalidTrainingJob(f"task {task_id!r}: invalid training job: {_describe(error)}") from None


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in error.errors())


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


class DnnTrainOperator(BaseOperator):
    """Train a model with ``entry_script`` from ``source_directory`` on a launcher's replicas.

    The XCom ``return_value`` holds ``run_id``, ``status``, ``outputs`` (local folder),
    ``artifact_uri`` (MLflow), ``tracking_run_id``, ``tracking_uri`` and the run's final ``metrics``.
    """

    framework: ClassVar[str]
    template_fields: Sequence[str] = (
        "source_directory",
        "entry_script",
        "arguments",
        "environment_variables",
        "secret_variables",
        "inputs",
        "tracking_uri",
        "experiment_name",
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
        resources: Resources | Mapping[str, Any] | None = None,
        inputs: list[Input | Mapping[str, Any]] | None = None,
        launcher: Launcher | None = None,
        tracking: bool = True,
        tracking_uri: str | None = None,
        tracking_conn_id: str | None = "dnntrain_mlflow",
        experiment_name: str | None = None,
        job_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.entry_script = entry_script
        self.source_directory = source_directory
        self.arguments = arguments if arguments is not None else []
        self.distribution = distribution if distribution is not None else SingleNode()
        self.environment = environment
        self.environment_variables = dict(environment_variables or {})
        self.secret_variables = dict(secret_variables or {})
        self.resources = resources
        self.inputs = list(inputs or [])
        self.launcher = launcher
        self.tracking = tracking
        self.tracking_uri = tracking_uri
        self.tracking_conn_id = tracking_conn_id
        self.experiment_name = experiment_name
        self.job_timeout = job_timeout
        self._handle: JobHandle | None = None
        job = self.build_job(validate_only=True)
        try:
            self._launcher().validate(job)
        except ValueError as error:
            raise InvalidTrainingJob(f"task {self.task_id!r}: invalid training job: {error}") from None

    # -- the job --------------------------------------------------------------------------------

    def build_job(self, *, validate_only: bool = False) -> TrainingJob:
        """The typed job from this operator's (rendered) fields; raises :class:`InvalidTrainingJob`."""
        arguments = self.arguments
        if _is_template(arguments) and validate_only:
            arguments = []
        if isinstance(arguments, str):
            raise InvalidTrainingJob(
                f"task {self.task_id!r}: invalid training job: arguments: rendered to a string, "
                "expected a list or a mapping (set render_template_as_native_obj=True on the DAG)"
            )
        environment = self.environment or {}
        if isinstance(environment, Environment):
            environment = environment.model_dump()
        environment = {
            **environment,
            "variables": {**environment.get("variables", {}), **self.environment_variables},
            "secrets": {**environment.get("secrets", {}), **self.secret_variables},
        }
        return build_job(
            self.task_id,
            framework=self.framework,
            source_directory=self.source_directory,
            entry_script=self.entry_script,
            arguments=arguments,
            distribution=self.distribution,
            environment=environment,
            resources=self.resources or {},
            inputs=self.inputs,
        )

    def _launcher(self) -> Launcher:
        if self.launcher is None:
            from airflow_provider_dnntrain.launchers.local import LocalLauncher

            self.launcher = LocalLauncher()
        return self.launcher

    def dry_run(self) -> dict:
        """Print and return the plan that would run, with placeholder hosts and default ports."""
        job = self.build_job()
        plan = render_plan(job, f"{self.dag_id}-{self.task_id}-dry-run", placeholder_placement())
        print(plan.to_json())
        return plan.to_dict()

    # -- execution ------------------------------------------------------------------------------

    def execute(self, context) -> dict[str, Any]:
        ti = context["ti"]
        run_id = make_run_id(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number)
        job = self.build_job()
        launcher = self._launcher()
        plan = launcher.plan(job, run_id)
        self.log.info("Run %s on %s launcher, plan:\n%s", run_id, launcher.name, plan.to_json())
        tracking_run = self._start_tracking(context, job, plan, launcher) if self.tracking else None
        handle = launcher.submit(job, plan, extra_env=tracking_run.env() if tracking_run else {})
        self._handle = handle
        try:
            wait_for_job(
                launcher, handle, on_log=lambda line: self.log.info("%s", line), timeout=self.job_timeout
            )
        except JobFailed as failure:
            # The failed run keeps what the chief wrote, and its logs, for whoever debugs it.
            self._finish_tracking(tracking_run, launcher.collect_outputs(handle), succeeded=False)
            raise RuntimeError(f"training run {run_id} failed: {failure}") from None
        finally:
            self._handle = None
        artifacts = launcher.collect_outputs(handle)
        metrics = self._finish_tracking(tracking_run, artifacts, succeeded=True)
        return self._result(run_id, artifacts, tracking_run, metrics)

    def on_kill(self) -> None:
        if self._handle is not None and self.launcher is not None:
            self.log.info("Stopping every replica of run %s", self._handle.run_id)
            self.launcher.cancel(self._handle)

    def render_template_fields(self, context, jinja_env=None) -> None:
        super().render_template_fields(context, jinja_env)
        # Registered before Airflow stores the rendered fields, so they, and every log line, are redacted.
        from airflow.sdk.log import mask_secret

        for name, value in self._secret_values().items():
            mask_secret(value, name)

    def _secret_values(self) -> dict[str, str]:
        environment = self.environment
        if isinstance(environment, Environment):
            given = {k: v.get_secret_value() for k, v in environment.secrets.items()}
        else:
            given = {k: str(v) for k, v in (environment or {}).get("secrets", {}).items()}
        return {**given, **{k: str(v) for k, v in self.secret_variables.items()}}

    def _start_tracking(self, context, job: TrainingJob, plan: JobPlan, launcher: Launcher):
        from airflow_provider_dnntrain import tracking

        ti = context["ti"]
        uri = tracking.resolve_tracking_uri(self.tracking_uri, self.tracking_conn_id)
        tags = {
            "airflow.dag_id": ti.dag_id,
            "airflow.task_id": ti.task_id,
            "airflow.run_id": ti.run_id,
            "airflow.map_index": str(ti.map_index),
            "airflow.try_number": str(ti.try_number),
            "dnntrain.framework": job.framework,
            "dnntrain.framework_version": framework_version(launcher.interpreter(job), job.framework),
            "dnntrain.distribution": plan.distribution,
        }
        params = {
            "entry_script": job.entry_script,
            "arguments": json.dumps(job.argv()),
            "world_size": plan.world_size,
            **{f"distribution.{k}": v for k, v in job.distribution.model_dump().items()},
        }
        run = tracking.start_run(uri, self.experiment_name or ti.dag_id, plan.run_id, tags, params)
        self.log.info("Tracking run %s at %s", run.mlflow_run_id, uri)
        return run

    def _finish_tracking(self, tracking_run, artifacts, *, succeeded: bool) -> dict[str, float]:
        if tracking_run is None:
            return {}
        from airflow_provider_dnntrain import tracking

        return tracking.finish_run(tracking_run, artifacts, succeeded)

    def _result(self, run_id: str, artifacts, tracking_run, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "status": "succeeded",
            "outputs": str(artifacts / "outputs"),
            "tracking_uri": tracking_run.tracking_uri if tracking_run else None,
            "tracking_run_id": tracking_run.mlflow_run_id if tracking_run else None,
            "metrics": metrics,
        }


def framework_version(python: str, framework: str) -> str:
    """The installed framework version as the job's interpreter sees it (metadata only, no import)."""
    names = _FRAMEWORK_DISTRIBUTIONS[framework]
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
