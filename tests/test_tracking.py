"""MLflow glue against a real MLflow SQLite store."""

from __future__ import annotations

import json

import pytest

from airflow_provider_dnntrain import tracking


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def finished_run(store, tmp_path, run_id="run-a", with_model=True, succeeded=True):
    run = tracking.start_run(
        store,
        "exp",
        run_id,
        {"dnntrain.framework": "pytorch", "dnntrain.framework_version": "2.13.0"},
        {"lr": 0.1},
    )
    artifacts = tmp_path / run_id / "artifacts"
    (artifacts / "outputs" / "model").mkdir(parents=True)
    if with_model:
        (artifacts / "outputs" / "model" / "weights.bin").write_bytes(b"\0" * 16)
    (artifacts / "outputs" / "note.txt").write_text("x")
    tracking.finish_run(run, artifacts if succeeded else None, succeeded)
    return run


def test_start_run_is_idempotent_per_run_id(store):
    first = tracking.start_run(store, "exp", "run-a", {}, {"lr": 0.1})
    again = tracking.start_run(store, "exp", "run-a", {}, {"lr": 0.1})
    other = tracking.start_run(store, "exp", "run-b", {}, {})
    assert first.mlflow_run_id == again.mlflow_run_id != other.mlflow_run_id
    assert first.env() == {"MLFLOW_TRACKING_URI": store, "MLFLOW_RUN_ID": first.mlflow_run_id}


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
