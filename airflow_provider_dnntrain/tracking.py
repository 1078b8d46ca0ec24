"""MLflow glue: one tracking run per training run, and the model registry."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from mlflow import MlflowClient

RUN_ID_TAG = "dnntrain.run_id"
END_REASON_TAG = "dnntrain.end_reason"
DEFAULT_CONN_ID = "dnntrain_mlflow"
USERNAME_VAR = "MLFLOW_TRACKING_USERNAME"
PASSWORD_VAR = "MLFLOW_TRACKING_PASSWORD"
# The job's run, for the replicas' interpreters to route non-primary ranks (see replica_site/).
PARENT_RUN_VAR = "DNNTRAIN_TRACKING_RUN_ID"
# What a training task instance is, in the tags of its runs: a retry finds its earlier tries by these.
TASK_INSTANCE_TAGS = ("airflow.dag_id", "airflow.task_id", "airflow.run_id", "airflow.map_index")

RunOutcome = Literal["FINISHED", "FAILED", "KILLED"]


def _home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")) / "dnntrain"


def default_tracking_uri() -> str:
    return f"sqlite:///{_home() / 'mlflow.db'}"


def default_artifact_root() -> str:
    return (_home() / "mlartifacts").as_uri()


@dataclass(frozen=True)
class TrackingTarget:
    """A tracking store: its URI without credentials (safe to show), and the credentials apart, as the
    variables MLflow reads them from."""

    uri: str
    credentials: dict[str, str] = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def credentials_in_env(self) -> Iterator[None]:
        """MLflow takes credentials from the environment; set them for this process meanwhile."""
        saved = {name: os.environ.get(name) for name in self.credentials}
        os.environ.update(self.credentials)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def split_credentials(uri: str) -> TrackingTarget:
    """``http://user:pw@host`` -> ``http://host`` with the user and password as MLflow variables."""
    parts = urlsplit(uri)
    if not parts.username and not parts.password:
        return TrackingTarget(uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    credentials = {USERNAME_VAR: unquote(parts.username or "")}
    if parts.password:
        credentials[PASSWORD_VAR] = unquote(parts.password)
    return TrackingTarget(urlunsplit(parts._replace(netloc=netloc)), credentials)


def public_uri(uri: str) -> str:
    """The URI without any credentials it carries."""
    return split_credentials(uri).uri


def resolve_target(explicit: str | None = None, conn_id: str | None = DEFAULT_CONN_ID) -> TrackingTarget:
    """Explicit argument, then an Airflow connection (its login/password become MLflow's username and
    password), then ``MLFLOW_TRACKING_URI``, then the ``[dnntrain] tracking_uri`` config option, then an
    embedded SQLite store under AIRFLOW_HOME."""
    if explicit:
        return split_credentials(explicit)
    if conn_id and (target := _target_from_connection(conn_id)):
        return target
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return split_credentials(uri)
    from airflow.configuration import conf

    return split_credentials(conf.get("dnntrain", "tracking_uri", fallback=None) or default_tracking_uri())


def resolve_tracking_uri(explicit: str | None = None, conn_id: str | None = DEFAULT_CONN_ID) -> str:
    return resolve_target(explicit, conn_id).uri


def _target_from_connection(conn_id: str) -> TrackingTarget | None:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except (AirflowNotFoundException, RuntimeError):
        return None
    if conn.extra_dejson.get("tracking_uri"):
        target = split_credentials(conn.extra_dejson["tracking_uri"])
    elif conn.host:
        scheme = conn.conn_type if conn.conn_type in ("http", "https") else "http"
        host = conn.host if "://" in conn.host else f"{scheme}://{conn.host}"
        target = split_credentials(f"{host}:{conn.port}" if conn.port else host)
    else:
        return None
    credentials = dict(target.credentials)
    if conn.login:
        credentials[USERNAME_VAR] = conn.login
    if conn.password:
        credentials[PASSWORD_VAR] = conn.password
    return TrackingTarget(target.uri, credentials)


def client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@dataclass
class TrackingRun:
    target: TrackingTarget
    mlflow_run_id: str
    experiment_id: str
    artifact_uri: str

    @property
    def tracking_uri(self) -> str:
        return self.target.uri

    def run_env(self) -> dict[str, str]:
        """The variables that name this run (:data:`RUN_VARIABLES`), known once it exists."""
        return {
            "MLFLOW_RUN_ID": self.mlflow_run_id,
            "MLFLOW_EXPERIMENT_ID": self.experiment_id,
            PARENT_RUN_VAR: self.mlflow_run_id,
        }


# What replicas are given once the run exists (they start before it: see replica_env).
RUN_VARIABLES = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", PARENT_RUN_VAR)


def replica_env(target: TrackingTarget) -> dict[str, str]:
    """What every replica needs from the start; once :data:`RUN_VARIABLES` arrive, the primary process
    (global rank 0, or the chief) logs to the run and every other one to a child run of its own.
    Credentials are not here: they travel as the job's secrets. Metrics are logged asynchronously, in
    batches (MLflow's own queue, flushed when the process exits): a script that logs every batch does
    not wait for a round trip to a remote store each time. The queue sends what a second brought in
    one request, not a request per metric."""
    return {
        "MLFLOW_TRACKING_URI": target.uri,
        "MLFLOW_ENABLE_ASYNC_LOGGING": "true",
        "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1",
    }


def start_run(
    target: TrackingTarget | str, experiment_name: str, run_id: str, tags: dict[str, str]
) -> TrackingRun:
    """Create (or, for the same run id, reuse) the MLflow run of a training run. Only what is needed
    before the replicas start; parameters and the rest of the tags follow with :func:`describe_run`."""
    target = split_credentials(target) if isinstance(target, str) else target
    mlflow = client(target.uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        artifact_root = default_artifact_root() if target.uri.startswith("sqlite:") else None
        experiment_id = mlflow.create_experiment(experiment_name, artifact_location=artifact_root)
    else:
        experiment_id = experiment.experiment_id
    existing = mlflow.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{_quote(run_id)}'")
    if existing:
        run = existing[0]
    else:
        run = mlflow.create_run(experiment_id, run_name=run_id, tags={RUN_ID_TAG: run_id, **tags})
    return TrackingRun(target, run.info.run_id, experiment_id, run.info.artifact_uri)


def describe_run(run: TrackingRun, tags: dict[str, str], params: dict[str, Any]) -> None:
    """Tags and parameters that the replicas do not wait for."""
    from mlflow.entities import Param, RunTag

    mlflow = client(run.tracking_uri)
    logged = mlflow.get_run(run.mlflow_run_id).data.params
    new_params = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
    mlflow.log_batch(run.mlflow_run_id, params=new_params, tags=[RunTag(k, v) for k, v in tags.items()])


def close_abandoned_tries(run: TrackingRun, task_instance: dict[str, str]) -> list[str]:
    """Earlier tries of this task instance whose runs still say RUNNING ended without closing them (the
    task process was SIGKILLed): mark them KILLED. Returns their MLflow run ids."""
    mlflow = client(run.tracking_uri)
    conditions = [f"tags.`{k}` = '{_quote(task_instance[k])}'" for k in TASK_INSTANCE_TAGS]
    conditions.append("attributes.status = 'RUNNING'")
    stale = [
        found
        for found in mlflow.search_runs([run.experiment_id], filter_string=" and ".join(conditions))
        if found.info.run_id != run.mlflow_run_id
    ]
    for found in stale:
        mlflow.set_tag(
            found.info.run_id, END_REASON_TAG, "abandoned: its task process ended without closing it"
        )
        mlflow.set_terminated(found.info.run_id, status="KILLED")
    return [found.info.run_id for found in stale]


def mark_run(run: TrackingRun, status: RunOutcome, reason: str = "") -> None:
    mlflow = client(run.tracking_uri)
    if reason:
        mlflow.set_tag(run.mlflow_run_id, END_REASON_TAG, reason[:5000])
    mlflow.set_terminated(run.mlflow_run_id, status=status)


def finish_run(
    run: TrackingRun, artifacts: Path | None, status: RunOutcome, reason: str = ""
) -> dict[str, float]:
    """Upload the collected outputs and logs (in parallel), close the run, return its final metrics.

    The run is closed only after its files are uploaded: FINISHED means they are there to register.
    """
    mlflow = client(run.tracking_uri)
    folders = [] if artifacts is None else [artifacts / sub for sub in ("outputs", "logs")]
    folders = [folder for folder in folders if folder.is_dir() and any(folder.iterdir())]
    with ThreadPoolExecutor(max_workers=3) as pool:
        uploads = [
            pool.submit(mlflow.log_artifacts, run.mlflow_run_id, str(folder), folder.name)
            for folder in folders
        ]
        for upload in uploads:
            upload.result()
    mark_run(run, status, reason)
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


def download_outputs(target: TrackingTarget, run_id: str, into: Path) -> Path:
    """The ``outputs/`` a run (training or MLflow run id) left in the store, downloaded into ``into``;
    ``LookupError`` when there is no such run or it left none."""
    with target.credentials_in_env():
        mlflow = client(target.uri)
        run = find_run(mlflow, run_id)
        if not mlflow.list_artifacts(run.info.run_id, "outputs"):
            raise LookupError(f"training run {run_id!r} left no outputs in the tracking store")
        return Path(mlflow.download_artifacts(run.info.run_id, "outputs", str(into)))


def _quote(value: str) -> str:
    return value.replace("'", "")


def register_model(
    tracking_uri: str,
    run_id: str,
    model_name: str,
    model_path: str,
    tags: dict[str, str],
    package: Callable[[MlflowClient, Any, str, str], dict[str, str]] | None = None,
) -> int:
    """Register ``outputs/<model_path>`` of a finished run as a new version of ``model_name``: its files
    as they are, or what ``package(client, run, outputs path, registered path)`` logs at
    ``registered/<model_path>`` (returning tags for the version).

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
    registered = artifact_path if package is None else f"registered/{model_path.strip('/')}"
    source = f"{run.info.artifact_uri}/{registered}"
    for version in mlflow.search_model_versions(f"name = '{_quote(model_name)}'"):
        if version.run_id == run.info.run_id and version.source == source:
            return int(version.version)
    made = package(mlflow, run, artifact_path, registered) if package is not None else {}
    run_tags = run.data.tags
    tags = {
        "framework": run_tags.get("dnntrain.framework", "unknown"),
        "framework_version": run_tags.get("dnntrain.framework_version", "unknown"),
        "dnntrain.run_id": run_tags.get(RUN_ID_TAG, run_id),
        **made,
        **tags,
    }
    version = mlflow.create_model_version(model_name, source, run_id=run.info.run_id, tags=tags)
    return int(version.version)


def _artifact_exists(mlflow: MlflowClient, mlflow_run_id: str, artifact_path: str) -> bool:
    parent, _, leaf = artifact_path.rpartition("/")
    return any(item.path == artifact_path for item in mlflow.list_artifacts(mlflow_run_id, parent or None))


def download_model(tracking_uri: str, name: str, version: str, into: Path) -> str:
    """A registered version's files (an MLflow model), downloaded into ``into``."""
    import mlflow.artifacts

    source = client(tracking_uri).get_model_version_download_uri(name, version)
    return mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(into), tracking_uri=tracking_uri
    )
