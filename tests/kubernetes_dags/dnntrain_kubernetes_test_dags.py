"""DAGs the Kubernetes launcher's tests run through dag.test() on the fake cluster (connection
``kubernetes_fake``, defined by the tests as an AIRFLOW_CONN_* variable). The DAGs are the example
DAGs' tasks with only ``launcher=`` changed."""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.launchers.kubernetes import KubernetesLauncher
from airflow_provider_dnntrain.operators import (
    PyTorchTrainOperator,
    RegisterModelOperator,
    TensorFlowTrainOperator,
)
from airflow_provider_dnntrain.spec import ParameterServer, TorchDistributed

EXAMPLE_SCRIPTS = str(Path(__file__).resolve().parents[2] / "dags" / "scripts")
START = pendulum.datetime(2026, 1, 1, tz="UTC")


def kubernetes_launcher() -> KubernetesLauncher:
    return KubernetesLauncher(
        kubernetes_conn_id="kubernetes_fake",
        stop_grace_seconds=5,
        startup_timeout_seconds=60,
    )


with DAG("dnntrain_kubernetes_parameter_server", schedule=None, start_date=START):
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="tf_parameter_server_digits.py",
        arguments=["--epochs", "2"],
        distribution=ParameterServer(worker_count=1, parameter_server_count=1, chief=True),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher=kubernetes_launcher(),
    )
    RegisterModelOperator(task_id="register", run_id=train.output, model_name="k8s-tf-ps", model_path="model")

with DAG("dnntrain_kubernetes_pytorch_ddp", schedule=None, start_date=START):
    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=kubernetes_launcher(),
    )
    RegisterModelOperator(task_id="register", run_id=train.output, model_name="k8s-ddp", model_path="model")

TEST_SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")

with DAG("dnntrain_kubernetes_deferred", schedule=None, start_date=START):
    # The wait is the triggerer's; the embedded tracking store cannot be served from a deferred task.
    PyTorchTrainOperator(
        task_id="train",
        source_directory=TEST_SCRIPTS,
        entry_script="ranks.py",
        arguments=["--ticks", "20", "--tick-seconds", "0.1"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=kubernetes_launcher(),
        deferrable=True,
        tracking=False,
    )
