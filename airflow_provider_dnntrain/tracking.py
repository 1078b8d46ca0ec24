"""MLflow glue: one tracking run per training run, and the model registry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

RUN_ID_TAG = "dnntrain.run_id"
DEFAULT_CONN_ID = "dnntrain_mlflow"


def _home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")) / "dnntrain"


def default_tracking_uri() -> str:
    return f"sqlite:///{_home() / 'mlflow.db'}"


def default_artifact_root() -> str:
    return (_home() / "mlartifacts").as_uri()


def resolve_tracking_uri(explicit: str | None = None, conn_id: str | None = DEFAULT_CONN_ID) -> str:
    """Explicit argument, then an Airflow connection, then ``MLFLOW_TRACKING_URI``, then the
    ``[dnntrain] tracking_uri`` config option, then an embedded SQLite store under AIRFLOW_HOME."""
    if explicit:
        return explicit
    if conn_id and (uri := _uri_from_connection(conn_id)):
        return uri
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    from airflow.configuration import conf

    return conf.get("dnntrain", "tracking_uri", fallback=None) or default_tracking_uri()


def _uri_from_connection(conn_id: str) -> str | None:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except (AirflowNotFoundException, RuntimeError):
        return None
    if conn.extra_dejson.get("tracking_uri"):
        return conn.extra_dejson["tracking_uri"]
    if conn.host:
        scheme = conn.conn_type if conn.conn_type in ("http", "https") else "http"
        host = conn.host if "://" in conn.host else f"{scheme}://{conn.host}"
        return f"{host}:{conn.port}" if conn.port else host
    return None


def client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@dataclass
class TrackingRun:
    tracking_uri: str
    mlflow_run_id: str

    def env(self) -> dict[str, str]:
        """What every replica needs so rank 0's ``mlflow.log_metric`` lands in this run."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_RUN_ID": self.mlflow_run_id}


def start_run(
    tracking_uri: str, experiment_name: str, run_id: str, tags: dict[str, str], params: dict[str, Any]
) -> TrackingRun:
    """Create (or, for the same run id, reuse) the MLflow run of a training run."""
    mlflow = client(tracking_uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        artifact_root = default_artifact_root() if tracking_uri.startswith("sqlite:") else None
        experiment_id = mlflow.create_experiment(experiment_name, artifact_location=artifact_root)
    else:
        experiment_id = experiment.experiment_id
    existing = mlflow.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
    if existing:
        run = existing[0]
    else:
        run = mlflow.create_run(experiment_id, run_name=run_id, tags={RUN_ID_TAG: run_id, **tags})
        for key, value in params.items():
            mlflow.log_param(run.info.run_id, key, str(value)[:6000])
    return TrackingRun(tracking_uri, run.info.run_id)


def finish_run(run: TrackingRun, artifacts: Path | None, succeeded: bool) -> dict[str, float]:
    """Upload the collected outputs and logs, close the run, and return its final metrics."""
    mlflow = client(run.tracking_uri)
    if artifacts is not None:
        for sub in ("outputs", "logs"):
            if (artifacts / sub).is_dir() and any((artifacts / sub).iterdir()):
                mlflow.log_artifacts(run.mlflow_run_id, str(artifacts / sub), artifact_path=sub)
    mlflow.set_terminated(run.mlflow_run_id, status="FINISHED" if succeeded else "FAILED")
    return dict(mlflow.get_run(run.mlflow_run_id).data.metrics)


def find_run(mlflow: MlflowClient, run_id: str):
    """The MLflow run of a training run id (or an MLflow run id given directly)."""
    runs = mlflow.search_runs(
        [e.experiment_id for e in mlflow.search_experiments()],
        filter_string=f"tags.`{RUN_ID_TAG}` = '{_quote(run_id)}'",
        max_results=1,
    )
    if runs:
        return runs[0]
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_run(run_id)
    except MlflowException:
        raise LookupError(f"no training run {run_id!r} in the tracking store") from None


def _quote(value: str) -> str:
    return value.replace("'", "")


def register_model(
    tracking_uri: str, run_id: str, model_name: str, model_path: str, tags: dict[str, str]
) -> int:
    """Register ``outputs/<model_path>`` of a finished run as a new version of ``model_name``.

    Registering the same run and path again returns the existing version instead of adding one.
    """
    from mlflow.exceptions import MlflowException

    mlflow = client(tracking_uri)
    run = find_run(mlflow, run_id)
    if run.info.status != "FINISHED":
        raise ValueError(f"run {run_id!r} did not succeed (status {run.info.status}); not registering it")
    artifact_path = f"outputs/{model_path.strip('/')}"
    if not _artifact_exists(mlflow, run.info.run_id, artifact_path):
        raise FileNotFoundError(f"run {run_id!r} has no {artifact_path!r} to register")
    try:
        mlflow.create_registered_model(model_name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{run.info.artifact_uri}/{artifact_path}"
    for version in mlflow.search_model_versions(f"name = '{_quote(model_name)}'"):
        if version.run_id == run.info.run_id and version.source == source:
            return int(version.version)
    run_tags = run.data.tags
    tags = {
        "framework": run_tags.get("dnntrain.framework", "unknown"),
        "framework_version": run_tags.get("dnntrain.framework_version", "unknown"),
        "dnntrain.run_id": run_tags.get(RUN_ID_TAG, run_id),
        **tags,
    }
    version = mlflow.create_model_version(model_name, source, run_id=run.info.run_id, tags=tags)
    return int(version.version)


def _artifact_exists(mlflow: MlflowClient, mlflow_run_id: str, artifact_path: str) -> bool:
    parent, _, leaf = artifact_path.rpartition("/")
    return any(item.path == artifact_path for item in mlflow.list_artifacts(mlflow_run_id, parent or None))
