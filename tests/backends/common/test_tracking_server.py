"""The embedded store served to remote replicas (backends/common/tracking_server.py): a real
MLflow server that refuses anyone without the run's credential."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.backends.common.tracking_server import StoreServer, store_credentials


def call(url: str, body: dict | None = None, credentials: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)
    request.add_header("Content-Type", "application/json")
    if credentials:
        pair = f"{credentials['MLFLOW_TRACKING_USERNAME']}:{credentials['MLFLOW_TRACKING_PASSWORD']}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_the_served_store_refuses_whoever_lacks_the_runs_credential(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.start_run(store, "exp", "run-a", {})
    server = StoreServer(store, tmp_path / "run-a.tracking-server.log", "run-a")
    server.start()
    try:
        server.connect().close()  # it answers
        base = f"http://127.0.0.1:{server.target[1]}/api/2.0/mlflow"
        metric = {"run_id": run.mlflow_run_id, "key": "loss", "value": 1.0, "timestamp": 0, "step": 0}
        mine = store_credentials(store, "run-a")
        others = store_credentials(store, "run-b")
        assert mine["MLFLOW_TRACKING_PASSWORD"] != others["MLFLOW_TRACKING_PASSWORD"]
        for wrong in (None, others):
            with pytest.raises(urllib.error.HTTPError, match="401"):
                call(f"{base}/runs/log-metric", metric, wrong)
        call(f"{base}/runs/log-metric", metric, mine)
        assert [m.value for m in tracking.client(store).get_metric_history(run.mlflow_run_id, "loss")] == [
            1.0
        ]
        assert store_credentials(store, "run-a") == mine  # a later try of the run serves it alike
        assert store_credentials("http://mlflow.example:5000", "run-a") == {}  # a server is its own
    finally:
        server.close()


def test_the_store_is_served_before_its_run_exists_once_it_has_tables(tmp_path):
    """Started as the job is submitted, the server boots while the replicas start - but not on a fresh
    store, whose tables the task is creating with the run."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fresh = StoreServer(store, tmp_path / "run-a.tracking-server.log", "run-a")
    fresh.start(run_exists=False)
    assert not fresh.running and not (tmp_path / "mlflow.db").exists()
    tracking.start_run(store, "exp", "run-a", {})  # the first run sets the store up
    fresh.close()

    early = StoreServer(store, tmp_path / "run-b.tracking-server.log", "run-b")
    early.start(run_exists=False)
    try:
        assert early.running
        early.connect().close()
        base = f"http://127.0.0.1:{early.target[1]}/api/2.0/mlflow"
        found = call(
            f"{base}/experiments/get-by-name?experiment_name=exp", None, store_credentials(store, "run-b")
        )
        assert found["experiment"]["name"] == "exp"
        early.start()  # the run exists now: the same server goes on serving
        assert early.running
    finally:
        early.close()
    assert not early.running
