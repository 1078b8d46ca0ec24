"""From a training operator's arguments to a typed ``TrainingJob``: Azure ML's names taken where they
map, the job's own ``resources`` told apart from Airflow's, and every error naming the field."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from airflow_provider_dnntrain.operators.azure_arguments import AZURE_NAMES, take_azure_arguments
from airflow_provider_dnntrain.spec import Environment, Resources, TrainingJob

# The fields that make the job (templated); ``inputs`` too.
JOB_FIELDS = ("source_directory", "entry_script", "arguments", "environment_variables", "secret_variables")


class InvalidTrainingJob(ValueError):
    """A training job that cannot run; the message names the offending field."""


def build_job(task_id: str, **fields: Any) -> TrainingJob:
    return build_distribution(task_id, TrainingJob, **fields)


def build_distribution(task_id: str, model: type, **fields: Any):
    """``model(**fields)`` (a distribution, or the job), or ``InvalidTrainingJob`` naming the field."""
    try:
        return model(**fields)
    except ValidationError as error:
        raise InvalidTrainingJob(f"task {task_id!r}: invalid training job: {_describe(error)}") from None


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in error.errors())


def is_template(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def is_job_resources(value: Any) -> bool:
    """Ours (``use_gpu``, ``cpu``, ``memory``) rather than Airflow's executor resources (``cpus``...)."""
    return isinstance(value, Resources) or (
        isinstance(value, Mapping) and bool(value) and set(value) <= set(Resources.model_fields)
    )


def with_azure_arguments(framework: str, ours: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
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


def environment_dict(environment: Environment | Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(environment, Environment):
        data = environment.model_dump(exclude={"secrets"})
        data["secrets"] = {k: v.get_secret_value() for k, v in environment.secrets.items()}
        return data
    return dict(environment or {})


def resources_dict(resources: Resources | Mapping[str, Any], use_gpu: bool | None) -> dict[str, Any]:
    data = (
        resources.model_dump(exclude_defaults=True) if isinstance(resources, Resources) else dict(resources)
    )
    if use_gpu is not None:
        data["use_gpu"] = use_gpu
    return data


def job_of(operator, fields: Mapping[str, Any] | None = None, *, validate_only: bool = False) -> TrainingJob:
    """The typed job from a training operator's (rendered) fields, or from ``fields`` given instead (a
    preview); ``validate_only``: when the DAG is parsed, before templates are rendered."""
    values = {name: getattr(operator, name) for name in (*JOB_FIELDS, "inputs")}
    values.update(fields or {})
    arguments = values["arguments"]
    if is_template(arguments) and validate_only:
        arguments = []
    if isinstance(arguments, str):
        raise InvalidTrainingJob(
            f"task {operator.task_id!r}: invalid training job: arguments: rendered to a string, "
            "expected a list or a mapping (set render_template_as_native_obj=True on the DAG)"
        )
    environment = {
        **operator.environment,
        "variables": values["environment_variables"],
        "secrets": values["secret_variables"],
    }
    return build_job(
        operator.task_id,
        framework=operator.framework,
        source_directory=_source_path(operator, values["source_directory"]),
        entry_script=values["entry_script"],
        arguments=arguments,
        distribution=operator.distribution,
        environment=environment,
        resources=operator.job_resources,
        inputs=values["inputs"],
        azureml_compat=operator.azureml_compat,
    )


def _source_path(operator, source_directory: str) -> str:
    """A relative ``source_directory`` is relative to the DAG file's folder, as users expect."""
    path = Path(source_directory).expanduser()
    fileloc = getattr(operator.dag, "fileloc", None) if operator.has_dag() else None
    if not path.is_absolute() and fileloc and not is_template(source_directory):
        path = Path(fileloc).parent / path
    return str(path)
