"""Against a real MLflow tracking server with basic auth: credentials are honoured, and never shown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from airflow_helpers import TEST_DAGS, load_dag, rendered_fields, xcom

from airflow_provider_dnntrain import tracking

PASSWORD = "Adm1n-pw-q7!x"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only",
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
    }
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--app-name",
            "basic-auth",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            str(home / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=home,
        env=env,
        stdout=open(home / "server.log", "wb"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (home / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_server_refuses_requests_without_credentials(mlflow_server):
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1")


@pytest.mark.slow
def test_connection_and_uri_credentials_are_honoured_and_never_shown(
    mlflow_server, monkeypatch, capfd, airflow_db
):
    host, port = mlflow_server.removeprefix("http://").split(":")
    connection = {
        "conn_type": "http",
        "host": host,
        "port": int(port),
        "login": "admin",
        "password": PASSWORD,
    }
    monkeypatch.setenv("AIRFLOW_CONN_DNNTRAIN_MLFLOW", json.dumps(connection))
    dag = load_dag(TEST_DAGS, "dnntrain_test_tracking_server")
    dag_run = dag.test(run_conf={"tracking_uri": f"http://admin:{PASSWORD}@{host}:{port}"})
    logged = "".join(capfd.readouterr())
    assert dag_run.state == "success", logged[-4000:]
    assert PASSWORD not in logged
    assert logged.count("MLFLOW_TRACKING_PASSWORD=***") == 2  # the replicas had it, printed it, masked
    assert PASSWORD not in json.dumps(rendered_fields(dag_run, "with_uri"))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = tracking.client(mlflow_server)
    for task_id in ("with_connection", "with_uri"):
        result = xcom(dag_run, task_id)
        assert PASSWORD not in json.dumps(result)
        assert result["tracking_uri"] == mlflow_server
        run = client.get_run(result["tracking_run_id"])
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss")  # logged by the replica, with them
        assert sorted(m.value for m in history) == [0.0, 1.0, 2.0]
        logs = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "logs/replicas")]
        assert logs == ["worker-0.log"]
