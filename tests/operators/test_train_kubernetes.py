"""Training operators on the Kubernetes launcher inside real Airflow runs: dag.test() against the fake
cluster (tests/fake_kubernetes), reached through a cncf-kubernetes connection's kubeconfig."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from airflow_helpers import load_dag, task_instance, xcom
from fake_kubernetes import FakeCluster

from airflow_provider_dnntrain import tracking

KUBERNETES_DAGS = Path(__file__).resolve().parents[1] / "kubernetes_dags"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with FakeCluster(tmp_path_factory.mktemp("kubernetes") / "cluster") as started:
        yield started


@pytest.fixture(autouse=True)
def connection(airflow_db, cluster, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_FAKE", cluster.airflow_connection())


def assert_nothing_left(cluster: FakeCluster) -> None:
    deadline = time.monotonic() + 30
    kinds = ("pods", "services", "secrets", "configmaps")
    while left := {k: names for k in kinds if (names := [o["metadata"]["name"] for o in cluster.objects(k)])}:
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.2)
    assert cluster.pod_processes() == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dag_id", "model"),
    [("dnntrain_kubernetes_parameter_server", "k8s-tf-ps"), ("dnntrain_kubernetes_pytorch_ddp", "k8s-ddp")],
)
def test_a_distributed_job_trains_in_pods_logs_metrics_and_registers(cluster, capfd, dag_id, model):
    dag_run = load_dag(KUBERNETES_DAGS, dag_id).test()
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "register").state == "success", logged[-5000:]
    result = xcom(dag_run, "train")
    # Rank 0 logged its metrics from inside its pod into the embedded store, served to the pods.
    assert set(result["metrics"]) >= {"loss", "accuracy"}, result
    client = tracking.client(result["tracking_uri"])
    assert len(client.get_metric_history(result["tracking_run_id"], "loss")) == 2
    assert (Path(result["outputs"]) / "model").is_dir()
    versions = client.search_model_versions(f"name = '{model}'")
    assert [int(v.version) for v in versions if v.run_id == result["tracking_run_id"]] == [
        xcom(dag_run, "register")
    ]
    assert "epoch=1 loss=" in logged  # every replica's log reached the task's
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_a_deferred_wait_streams_every_line_once_and_cleans_up(cluster, capfd):
    dag_run = load_dag(KUBERNETES_DAGS, "dnntrain_kubernetes_deferred").test()
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "train").state == "success", logged[-5000:]
    assert "waiting on the triggerer" in logged
    for node, rank in (("node-0", 0), ("node-1", 1)):
        for tick in range(20):
            line = f"[{node}] [default0]:rank {rank} tick {tick} of 20"
            assert logged.count(line) == 1, (line, logged.count(line))
    assert_nothing_left(cluster)
