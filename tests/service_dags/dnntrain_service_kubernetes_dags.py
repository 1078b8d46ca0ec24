"""DAGs the real-Airflow suite runs on the Kubernetes launcher (connection kubernetes_fake in the
components' environment, the fake cluster): every rank sleeps, then rank 0 logs metrics, so a task can be
ended or taken over mid-run."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.launchers import KubernetesLauncher
from airflow_provider_dnntrain.operators import PyTorchTrainOperator
from airflow_provider_dnntrain.spec import TorchDistributed

SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
START = pendulum.datetime(2026, 1, 1, tz="UTC")
GO_AHEAD = "go-ahead"  # a rank that waits for it ends its sleep once the test puts it in its folder


def kubernetes_dag(
    dag_id: str, sleep: int, *, arguments=("--late", "--log-metrics", "3"), **operator_args
) -> DAG:
    with DAG(dag_id, schedule=None, start_date=START) as dag:
        PyTorchTrainOperator(
            task_id="train",
            source_directory=SCRIPTS,
            entry_script="ranks.py",
            arguments=["--spawn", "--sleep", str(sleep), *arguments],
            distribution=TorchDistributed(node_count=2, process_count_per_node=1),
            launcher=KubernetesLauncher(kubernetes_conn_id="kubernetes_fake", stop_grace_seconds=3),
            **operator_args,
        )
    return dag


# A worker that dies mid-run: the next try takes the pods over.
resumed = kubernetes_dag(
    "dnntrain_service_k8s_resumed",
    120,  # or until the test says the next try has taken over (GO_AHEAD in the ranks' folder)
    arguments=("--until", GO_AHEAD, "--late", "--log-metrics", "3"),
    retries=1,
    retry_delay=timedelta(seconds=1),
)
# Waits on the triggerer; the test marks it failed while deferred.
deferred = kubernetes_dag("dnntrain_service_k8s_deferred", 600, deferrable=True, tracking=False)
# Numbered lines while the triggerer is restarted: each must reach the task log once.
ticking = kubernetes_dag(
    "dnntrain_service_k8s_ticking",
    0,
    arguments=("--ticks", "90", "--tick-seconds", "0.25"),
    deferrable=True,
    tracking=False,
)
# Ended from outside while they run: marked failed or success, timed out; the stubborn ones' ranks
# ignore SIGTERM (as TensorFlow does), so only the pod's grace period ends them.
serving = kubernetes_dag("dnntrain_service_k8s_serving", 600, arguments=())
stubborn = kubernetes_dag("dnntrain_service_k8s_stubborn", 600, arguments=("--ignore-term",))
timeout = kubernetes_dag(
    "dnntrain_service_k8s_timeout", 600, arguments=(), execution_timeout=timedelta(seconds=20)
)
