"""MLflow glue against a real MLflow SQLite store."""

from __future__ import annotations

import json
import os

import pytest

from airflow_provider_dnntrain import tracking


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def finished_run(store, tmp_path, run_id="run-a", with_model=True, succeeded=True):
    run = tracking.start_run(store, "exp", run_id, {"dnntrain.framework": "pytorch"})
    tracking.describe_run(run, {"dnntrain.framework_version": "2.13.0"}, {"lr": 0.1})
    artifacts = tmp_path / run_id / "artifacts"
    (artifacts / "outputs" / "model").mkdir(parents=True)
    if with_model:
        (artifacts / "outputs" / "model" / "weights.bin").write_bytes(b"\0" * 16)
    (artifacts / "outputs" / "note.txt").write_text("x")
    tracking.finish_run(run, artifacts if succeeded else None, "FINISHED" if succeeded else "FAILED")
    return run


def test_start_run_is_idempotent_per_run_id(store):
    first = tracking.start_run(store, "exp", "run-a", {})
    tracking.describe_run(first, {}, {"lr": 0.1})
    again = tracking.start_run(store, "exp", "run-a", {})
    tracking.describe_run(again, {}, {"lr": 0.1, "epochs": 3})  # a resubmission adds, never conflicts
    other = tracking.start_run(store, "exp", "run-b", {})
    assert first.mlflow_run_id == again.mlflow_run_id != other.mlflow_run_id
    assert tracking.client(store).get_run(first.mlflow_run_id).data.params == {"lr": "0.1", "epochs": "3"}
    assert tracking.replica_env(first.target) == {
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_ENABLE_ASYNC_LOGGING": "true",
        "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1",
    }
    assert first.run_env() == {
        "MLFLOW_RUN_ID": first.mlflow_run_id,
        "MLFLOW_EXPERIMENT_ID": first.experiment_id,
        "DNNTRAIN_TRACKING_RUN_ID": first.mlflow_run_id,
    }
    assert set(first.run_env()) == set(tracking.RUN_VARIABLES)


def test_register_tags_and_is_idempotent(store, tmp_path):
    finished_run(store, tmp_path)
    version = tracking.register_model(store, "run-a", "digits", "model", {"team": "ml"})
    assert tracking.register_model(store, "run-a", "digits", "model/", {"team": "ml"}) == version == 1
    finished_run(store, tmp_path, run_id="run-b")
    assert tracking.register_model(store, "run-b", "digits", "model", {}) == 2
    tags = tracking.client(store).get_model_version("digits", "1").tags
    assert tags["framework"] == "pytorch" and tags["framework_version"] == "2.13.0" and tags["team"] == "ml"


def test_register_refuses_failed_runs_and_missing_paths(store, tmp_path):
    finished_run(store, tmp_path, run_id="bad", succeeded=False)
    with pytest.raises(ValueError, match="did not succeed \\(status FAILED\\)"):
        tracking.register_model(store, "bad", "digits", "model", {})
    finished_run(store, tmp_path, run_id="empty", with_model=False)
    with pytest.raises(FileNotFoundError, match="has no 'outputs/other'"):
        tracking.register_model(store, "empty", "digits", "other", {})
    with pytest.raises(LookupError, match="no training run 'never-ran'"):
        tracking.register_model(store, "never-ran", "digits", "model", {})


def test_tracking_uri_resolution_order(monkeypatch, airflow_db):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_DNNTRAIN_MLFLOW", raising=False)
    assert tracking.resolve_tracking_uri() == tracking.default_tracking_uri()
    assert tracking.default_tracking_uri().endswith("/dnntrain/mlflow.db")
    monkeypatch.setenv("AIRFLOW__DNNTRAIN__TRACKING_URI", "sqlite:////from/config.db")
    assert tracking.resolve_tracking_uri() == "sqlite:////from/config.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert tracking.resolve_tracking_uri() == "http://from-env:5000"
    monkeypatch.setenv(
        "AIRFLOW_CONN_DNNTRAIN_MLFLOW", json.dumps({"conn_type": "http", "host": "mlflow", "port": 80})
    )
    assert tracking.resolve_tracking_uri() == "http://mlflow:80"
    assert tracking.resolve_tracking_uri("file:///explicit") == "file:///explicit"


def test_credentials_are_taken_out_of_the_uri():
    target = tracking.split_credentials("https://alice:s3cr%40t@mlflow.example:5000/prefix")
    assert target.uri == "https://mlflow.example:5000/prefix"
    assert target.credentials == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cr@t"}
    assert tracking.public_uri("postgresql://u:p@db/mlflow") == "postgresql://db/mlflow"
    assert tracking.split_credentials("sqlite:////tmp/x.db").credentials == {}


def test_a_connection_login_and_password_become_mlflow_credentials(monkeypatch, airflow_db):
    conn = {"conn_type": "http", "host": "mlflow.example", "port": 5000, "login": "bob", "password": "pw-123"}
    monkeypatch.setenv("AIRFLOW_CONN_DNNTRAIN_MLFLOW", json.dumps(conn))
    target = tracking.resolve_target()
    assert target.uri == "http://mlflow.example:5000"
    assert target.credentials == {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "pw-123"}
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with target.credentials_in_env():
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw-123"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_runs_end_with_their_status_and_reason(store, tmp_path):
    for status in ("FINISHED", "FAILED", "KILLED"):
        run = tracking.start_run(store, "exp", f"run-{status.lower()}", {})
        tracking.finish_run(run, None, status, reason=f"because {status}")
        ended = tracking.client(store).get_run(run.mlflow_run_id)
        assert ended.info.status == status
        assert ended.data.tags[tracking.END_REASON_TAG] == f"because {status}"


def test_a_retry_closes_the_runs_its_earlier_tries_left_running(store):
    task_instance = {
        "airflow.dag_id": "d",
        "airflow.task_id": "t",
        "airflow.run_id": "r1",
        "airflow.map_index": "-1",
    }
    first = tracking.start_run(store, "exp", "try-1", task_instance)
    other_run = tracking.start_run(store, "exp", "other", {**task_instance, "airflow.run_id": "r2"})
    second = tracking.start_run(store, "exp", "try-2", task_instance)
    assert tracking.close_abandoned_tries(second, task_instance) == [first.mlflow_run_id]
    client = tracking.client(store)
    assert client.get_run(first.mlflow_run_id).info.status == "KILLED"
    assert "abandoned" in client.get_run(first.mlflow_run_id).data.tags[tracking.END_REASON_TAG]
    assert client.get_run(second.mlflow_run_id).info.status == "RUNNING"
    assert client.get_run(other_run.mlflow_run_id).info.status == "RUNNING"
