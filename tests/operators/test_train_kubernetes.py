"""Training operators on the Kubernetes launcher inside real Airflow runs: dag.test() against the fake
cluster (tests/fake_kubernetes), reached through a cncf-kubernetes connection's kubeconfig."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from airflow_helpers import EXAMPLE_DAGS, load_dag, task_instance, xcom
from fake_kubernetes import FakeCluster, assert_nothing_left

from airflow_provider_dnntrain import tracking

KUBERNETES_DAGS = Path(__file__).resolve().parents[1] / "kubernetes_dags"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Its training operator runs the Kubeflow form; the pod form never uses it.
    with FakeCluster(tmp_path_factory.mktemp("kubernetes") / "cluster", training_operator="run") as started:
        yield started


@pytest.fixture(autouse=True)
def connection(airflow_db, cluster, monkeypatch):
    # The examples use the provider's default connection; the test DAGs name theirs.
    for name in ("AIRFLOW_CONN_KUBERNETES_DEFAULT", "AIRFLOW_CONN_KUBERNETES_FAKE"):
        monkeypatch.setenv(name, cluster.airflow_connection())


def assert_trained_and_registered(result: dict, version: int, model: str) -> None:
    # Rank 0 logged its metrics from inside its pod into the embedded store, served to the pods.
    assert set(result["metrics"]) >= {"loss", "accuracy"}, result
    client = tracking.client(result["tracking_uri"])
    assert len(client.get_metric_history(result["tracking_run_id"], "loss")) == 2
    assert (Path(result["outputs"]) / "model").is_dir()
    registered = client.get_model_version(model, str(version))
    assert registered.run_id == result["tracking_run_id"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dag_id", "model", "replica_line"),
    [
        ("dnntrain_k8s_tf_parameter_server", "digits-tf-parameter-server-k8s", "[chief-0] epoch=1 loss="),
        ("dnntrain_k8s_tf_multi_worker", "digits-tf-multi-worker-k8s", "[worker-1] epoch=1 loss="),
        ("dnntrain_k8s_pytorch_horovod", "digits-pytorch-horovod-k8s", "[launcher-0/rank.1] epoch=1 loss="),
        ("dnntrain_kubeflow_tf_parameter_server", "digits-tf-parameter-server-kubeflow", "[chief-0] epoch=1"),
        ("dnntrain_kubeflow_pytorch_ddp", "digits-pytorch-ddp-kubeflow", "[node-1] [default0]:rank=1"),
        (
            "dnntrain_kubeflow_pytorch_horovod",
            "digits-pytorch-horovod-kubeflow",
            "[launcher-0/rank.1] epoch=1",
        ),
    ],
)
def test_an_example_dag_trains_in_pods_logs_metrics_and_registers(
    cluster, capfd, dag_id, model, replica_line
):
    dag_run = load_dag(EXAMPLE_DAGS, dag_id).test(run_conf={"epochs": 2})
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "register").state == "success", logged[-5000:]
    assert replica_line in logged  # every replica's log reached the task's
    assert_trained_and_registered(xcom(dag_run, "train"), xcom(dag_run, "register"), model)
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_the_ddp_example_through_airflow_dags_test_like_a_user(cluster):
    airflow = Path(sys.executable).with_name("airflow")
    completed = subprocess.run(
        [str(airflow), "dags", "test", "dnntrain_k8s_pytorch_ddp", "-c", json.dumps({"epochs": 2})],
        env={**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLE_DAGS)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    assert "[node-1] [default0]:rank=1 world_size=2" in output
    version = int(re.search(r"Registered model digits-pytorch-ddp-k8s version (\d+)", output).group(1))
    run_id = re.search(r"Tracking run (\w+) at", output).group(1)
    client = tracking.client(tracking.resolve_tracking_uri())
    assert client.get_model_version("digits-pytorch-ddp-k8s", str(version)).run_id == run_id
    facts = json.loads(Path(client.download_artifacts(run_id, "outputs/summary.json")).read_text())
    assert facts["world_size"] == 2 and facts["allreduce_sum"] == 3.0
    assert_nothing_left(cluster)


@pytest.mark.slow
@pytest.mark.parametrize("dag_id", ["dnntrain_kubernetes_deferred", "dnntrain_kubeflow_deferred"])
def test_a_deferred_wait_streams_every_line_once_and_cleans_up(cluster, capfd, dag_id):
    dag_run = load_dag(KUBERNETES_DAGS, dag_id).test()
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "train").state == "success", logged[-5000:]
    assert "waiting on the triggerer" in logged
    for node, rank in (("node-0", 0), ("node-1", 1)):
        for tick in range(40):
            line = f"[{node}] [default0]:rank {rank} tick {tick} of 40"
            assert logged.count(line) == 1, (line, logged.count(line))
    assert_nothing_left(cluster)


# -- a cluster that misbehaves ------------------------------------------------------------------------

# A fifth of the API's answers are 429 / 500 / 503 (some after the change was made), some requests
# are held past the launcher's 3 s timeout, every log stream is cut in the middle of a line after 2 s.
CHAOS = {"error_rate": 0.2, "delay_rate": 0.03, "delay_seconds": 4, "cut_logs_after": 2}


def replica_lines(logged: str, replica: str) -> list[str]:
    """A replica's lines as the task logged them (the task's own followed by its logger and place)."""
    return re.findall(rf"\[{replica}\] (.*?)(?:\s+\[[\w.]+\] loc=\S+)?\s*$", logged, re.MULTILINE)


def assert_every_line_logged_once(cluster, logged: str, run_id: str, replicas: tuple[str, ...]) -> None:
    """Each replica's lines in the task log are its pod's log, line for line: none lost, none twice."""
    from airflow_provider_dnntrain.backends.kubernetes.manifests import job_name

    for replica in replicas:
        [pod_log] = cluster.root.glob(f"pods/training-{job_name(run_id)}-{replica}-*/base.log")
        expected = [line.split(" ", 1)[1].rstrip() for line in pod_log.read_text().splitlines()]
        assert len(expected) > 5
        assert replica_lines(logged, replica) == expected, replica


@pytest.mark.slow
def test_a_ddp_job_trains_and_registers_while_the_api_fails_and_log_streams_are_cut(cluster, capfd):
    with cluster.misbehaving(**CHAOS, cut_execs=2):  # the outputs' copy is cut twice too
        dag_run = load_dag(KUBERNETES_DAGS, "dnntrain_kubernetes_ddp_registered").test()
        injected = cluster.injected()["injected"]
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "register").state == "success", logged[-5000:]
    result = xcom(dag_run, "train")
    assert_trained_and_registered(result, xcom(dag_run, "register"), "digits-chaos")
    assert_every_line_logged_once(cluster, logged, result["run_id"], ("node-0", "node-1"))
    assert sum(injected.get(str(status), 0) for status in (429, 500, 503)) >= 5, injected
    assert injected["log stream cut"] >= 2 and injected["exec cut"] == 2, injected
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_a_deferred_wait_survives_the_faults_and_logs_every_line_once(cluster, capfd):
    with cluster.misbehaving(**CHAOS):
        dag_run = load_dag(KUBERNETES_DAGS, "dnntrain_kubernetes_deferred").test()
        injected = cluster.injected()["injected"]
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "train").state == "success", logged[-5000:]
    assert "waiting on the triggerer" in logged
    run_id = xcom(dag_run, "train")["run_id"]
    assert_every_line_logged_once(cluster, logged, run_id, ("node-0", "node-1"))
    assert injected["log stream cut"] >= 2, injected
    assert_nothing_left(cluster)
