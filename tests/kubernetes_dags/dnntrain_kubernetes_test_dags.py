"""DAGs the Kubernetes launcher's tests run through dag.test() on the fake cluster, besides the example
DAGs (connection ``kubernetes_fake``, defined by the tests as an AIRFLOW_CONN_* variable)."""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.launchers import KServeServing, KubernetesLauncher, KubernetesServing
from airflow_provider_dnntrain.operators import (
    DeployModelOperator,
    PyTorchTrainOperator,
    RegisterModelOperator,
    UndeployModelOperator,
)
from airflow_provider_dnntrain.spec import TorchDistributed

START = pendulum.datetime(2026, 1, 1, tz="UTC")


def kubernetes_launcher(kubeflow: bool = False) -> KubernetesLauncher:
    return KubernetesLauncher(
        kubernetes_conn_id="kubernetes_fake",
        stop_grace_seconds=5,
        startup_timeout_seconds=60,
        kubeflow=kubeflow,
        api_request_timeout=3,  # the fault tests hold some requests longer than this
    )


TEST_SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
EXAMPLE_SCRIPTS = str(Path(__file__).resolve().parents[2] / "dags" / "scripts")

with DAG("dnntrain_kubernetes_ddp_registered", schedule=None, start_date=START):
    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=kubernetes_launcher(),
    )
    RegisterModelOperator(
        task_id="register", run_id=train.output, model_name="digits-chaos", model_path="model"
    )

for dag_id, kubeflow in (("dnntrain_kubernetes_deferred", False), ("dnntrain_kubeflow_deferred", True)):
    with DAG(dag_id, schedule=None, start_date=START):
        # The wait is the triggerer's; the embedded tracking store cannot be served from a deferred task.
        PyTorchTrainOperator(
            task_id="train",
            source_directory=TEST_SCRIPTS,
            entry_script="ranks.py",
            arguments=["--ticks", "40", "--tick-seconds", "0.1"],
            distribution=TorchDistributed(node_count=2, process_count_per_node=1),
            launcher=kubernetes_launcher(kubeflow),
            deferrable=True,
            tracking=False,
        )


# -- deployment on the cluster ------------------------------------------------------------------------

SERVING = KubernetesServing(kubernetes_conn_id="kubernetes_fake", startup_timeout=120, api_request_timeout=5)
DEPLOY_CONF = {"model": "models:/tiny-served/1", "canary": ""}

with DAG("dnntrain_kubernetes_deploy", schedule=None, start_date=START, params=DEPLOY_CONF):
    DeployModelOperator(
        task_id="deploy",
        model="{{ params.model }}",
        endpoint="tiny-k8s",
        serving=SERVING,
        canary_traffic_percent="{{ params.canary }}",
        promote_alias="k8s-champion",
    )

with DAG("dnntrain_kubernetes_undeploy", schedule=None, start_date=START):
    UndeployModelOperator(task_id="undeploy", endpoint="tiny-k8s", serving=SERVING)

# -- deployment by the cluster's KServe ---------------------------------------------------------------

KSERVE = KServeServing(kubernetes_conn_id="kubernetes_fake", startup_timeout=120, api_request_timeout=5)

with DAG("dnntrain_kserve_deploy", schedule=None, start_date=START, params=DEPLOY_CONF):
    DeployModelOperator(
        task_id="deploy",
        model="{{ params.model }}",
        endpoint="tiny-kserve",
        serving=KSERVE,
        canary_traffic_percent="{{ params.canary }}",
        promote_alias="kserve-champion",
    )

with DAG("dnntrain_kserve_undeploy", schedule=None, start_date=START):
    UndeployModelOperator(task_id="undeploy", endpoint="tiny-kserve", serving=KSERVE)
