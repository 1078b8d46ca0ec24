"""The Docker example DAGs (dags/dnntrain_docker.py) through Airflow's ``dag.test()``, on the session's
real Docker daemon: DDP across two containers and Horovod's ranks under mpirun in one, each training on
the project's image, logging to the embedded store (served to the containers on the run network's
gateway), registered; nothing of either run left on the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow_helpers import EXAMPLE_DAGS, load_dag, task_instance, xcom

from airflow_provider_dnntrain import tracking


@pytest.fixture(autouse=True)
def daemon(airflow_db, docker_daemon, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", docker_daemon.base_url)
    return docker_daemon


@pytest.mark.parametrize(
    ("dag_id", "model", "replica_line"),
    [
        ("dnntrain_docker_pytorch_ddp", "digits-pytorch-ddp-docker", "[node-1] [default0]:rank=1"),
        ("dnntrain_docker_pytorch_horovod", "digits-pytorch-horovod-docker", "[launcher-0/rank.1] epoch=1"),
    ],
)
def test_an_example_dag_trains_in_containers_logs_metrics_and_registers(
    daemon, capfd, dag_id, model, replica_line
):
    dag_run = load_dag(EXAMPLE_DAGS, dag_id).test(run_conf={"epochs": 2})
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "register").state == "success", logged[-5000:]
    assert replica_line in logged  # every replica's log reached the task's
    result, version = xcom(dag_run, "train"), xcom(dag_run, "register")
    client = tracking.client(result["tracking_uri"])
    assert len(client.get_metric_history(result["tracking_run_id"], "loss")) == 2  # logged from a container
    assert (Path(result["outputs"]) / "model").is_dir()
    assert client.get_model_version(model, str(version)).run_id == result["tracking_run_id"]
    assert daemon.held() == ([], [])  # no container, no network of any run
