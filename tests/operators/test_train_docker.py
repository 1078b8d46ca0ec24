"""The Docker example DAGs (dags/dnntrain_docker.py) through Airflow's ``dag.test()``, on the session's
real Docker daemon: DDP across two containers, Horovod's ranks under mpirun in one, and TensorFlow's
parameter-server and multi-worker strategies across containers, each training on the project's image
for its framework, logging to the embedded store (served to the containers on the run network's
gateway), registered; nothing of any run left on the daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow_helpers import EXAMPLE_DAGS, load_dag, task_instance, xcom

from airflow_provider_dnntrain import tracking

DOCKER_DAGS = Path(__file__).resolve().parents[1] / "docker_dags"


@pytest.fixture(autouse=True)
def daemon(airflow_db, docker_daemon, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", docker_daemon.base_url)
    return docker_daemon


@pytest.mark.parametrize(
    ("dag_id", "model", "replica_line"),
    [
        ("dnntrain_docker_pytorch_ddp", "digits-pytorch-ddp-docker", "[node-1] [default0]:rank=1"),
        ("dnntrain_docker_pytorch_horovod", "digits-pytorch-horovod-docker", "[launcher-0/rank.1] epoch=1"),
        ("dnntrain_docker_tensorflow_ps", "digits-tf-ps-docker", "[ps-0] ps:0 serving at"),
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


@pytest.mark.parametrize(
    ("dag_id", "replica_lines"),
    [
        (
            "dnntrain_docker_ddp_c10d_deferred",
            ["[node-0] [default0]:rank=0 world_size=2", "[node-1] [default0]:rank=1 world_size=2"],
        ),
        ("dnntrain_docker_horovod_gloo", ["[launcher-0] [1]<stdout>:rank=1 size=2"]),
        ("dnntrain_docker_tf_multi_worker", ["[worker-1] task=worker:1 world_size=2 allreduce_sum=3.0"]),
        # rank 1 is the only rank of its node: it ran in the other node's container
        ("dnntrain_docker_tf_horovod_two_nodes", ["[launcher-0/rank.1] rank=1 size=2 local_rank=0"]),
    ],
    ids=["ddp-c10d-deferred", "horovodrun-gloo", "tf-multi-worker", "tf-horovod-two-nodes"],
)
def test_more_topologies_train_in_containers(daemon, capfd, dag_id, replica_lines):
    """DDP with c10d rendezvous, waited on by the triggerer (every line logged once, from the trigger),
    Horovod's ranks started by horovodrun over Gloo, TensorFlow's MultiWorkerMirroredStrategy, and
    TensorFlow's Horovod ranks on two containers under mpirun."""
    dag_run = load_dag(DOCKER_DAGS, dag_id).test()
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "train").state == "success", logged[-5000:]
    for line in replica_lines:
        assert logged.count(line) == 1, line
    if "deferred" in dag_id:
        assert "waiting on the triggerer" in logged
    outputs = Path(xcom(dag_run, "train")["outputs"])
    assert json.loads((outputs / "summary.json").read_text())["allreduce_sum"] == 3.0
    assert daemon.held() == ([], [])
