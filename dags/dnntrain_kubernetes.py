"""Every topology on Kubernetes: the example DAGs' tasks with only ``launcher=`` changed, then registration.

``dnntrain_k8s_tf_parameter_server`` (chief + worker + parameter server), ``dnntrain_k8s_tf_multi_worker``
(2 workers, MultiWorkerMirrored), ``dnntrain_k8s_pytorch_ddp`` (2 nodes, torchrun) and
``dnntrain_k8s_pytorch_horovod`` (2 nodes, mpirun; the second node's pod runs sshd). Each replica is a pod
of the project's training image (``make images``: ``dnntrain-{torch,tensorflow}:{cpu,gpu}``) behind a
headless Service, all owned by one ConfigMap per run.

``dnntrain_kubeflow_tf_parameter_server``, ``dnntrain_kubeflow_pytorch_ddp`` and
``dnntrain_kubeflow_pytorch_horovod`` are the same jobs in their Kubeflow form
(``KubernetesLauncher(kubeflow=True)``): a TFJob / PyTorchJob / MPIJob that the Kubeflow training operator
runs, for clusters that have it (the MPIJob's launcher pod starts the ranks in the worker pods through the
operator's ``kubectl exec``).

The cluster comes from the cncf-kubernetes connection ``kubernetes_default`` (in-cluster, a kubeconfig
path or an inline kubeconfig; ``namespace`` in its extra). The embedded tracking store is served to the
pods by the task itself: the pods must reach the Airflow worker, at the connection's extra
``tracking_address`` (``host:port``) or at its address towards the API server - as they do when Airflow
runs in the cluster. Otherwise give ``tracking_uri=`` a tracking server the pods reach.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_dnntrain.launchers import KubernetesLauncher
from airflow_provider_dnntrain.operators import (
    PyTorchHorovodOperator,
    PyTorchTrainOperator,
    RegisterModelOperator,
    TensorFlowTrainOperator,
)
from airflow_provider_dnntrain.spec import MultiWorkerMirrored, ParameterServer, TorchDistributed

SCRIPTS = str(Path(__file__).parent / "scripts")
ARGUMENTS = ["--epochs", "{{ params.epochs }}", "--lr", "{{ params.lr }}"]


def kubernetes_dag(dag_id: str, framework: str) -> DAG:
    return DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        params={"epochs": Param(3, type="integer", minimum=1), "lr": Param(0.05, type="number")},
        tags=["dnntrain", framework, "kubernetes"],
    )


def register(train, model_name: str) -> RegisterModelOperator:
    return RegisterModelOperator(
        task_id="register",
        run_id=train.output,
        model_name=model_name,
        model_path="model",
        tags={"dataset": "sklearn-digits"},
    )


with kubernetes_dag("dnntrain_k8s_tf_parameter_server", "tensorflow"):
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="tf_parameter_server_digits.py",
        arguments=ARGUMENTS,
        distribution=ParameterServer(worker_count=1, parameter_server_count=1, chief=True),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher=KubernetesLauncher(),  # with use_gpu=True, every replica but the parameter server gets one
    )
    register(train, "digits-tf-parameter-server-k8s")

with kubernetes_dag("dnntrain_k8s_tf_multi_worker", "tensorflow"):
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="tf_multi_worker_digits.py",
        arguments=ARGUMENTS,
        distribution=MultiWorkerMirrored(worker_count=2),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher=KubernetesLauncher(),
    )
    register(train, "digits-tf-multi-worker-k8s")

with kubernetes_dag("dnntrain_k8s_pytorch_ddp", "pytorch"):
    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=ARGUMENTS,
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=KubernetesLauncher(),
    )
    register(train, "digits-pytorch-ddp-k8s")

with kubernetes_dag("dnntrain_k8s_pytorch_horovod", "pytorch"):
    train = PyTorchHorovodOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_horovod_digits.py",
        arguments=ARGUMENTS,
        node_count=2,
        runner="mpirun",
        controller="mpi",
        network_interface="eth0",  # the pods' network
        launcher=KubernetesLauncher(),
    )
    register(train, "digits-pytorch-horovod-k8s")

with kubernetes_dag("dnntrain_kubeflow_tf_parameter_server", "tensorflow"):
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="tf_parameter_server_digits.py",
        arguments=ARGUMENTS,
        distribution=ParameterServer(worker_count=1, parameter_server_count=1, chief=True),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher=KubernetesLauncher(kubeflow=True),
    )
    register(train, "digits-tf-parameter-server-kubeflow")

with kubernetes_dag("dnntrain_kubeflow_pytorch_ddp", "pytorch"):
    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=ARGUMENTS,
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=KubernetesLauncher(kubeflow=True),
    )
    register(train, "digits-pytorch-ddp-kubeflow")

with kubernetes_dag("dnntrain_kubeflow_pytorch_horovod", "pytorch"):
    train = PyTorchHorovodOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_horovod_digits.py",
        arguments=ARGUMENTS,
        node_count=2,
        runner="mpirun",  # an MPIJob's launcher runs mpirun; horovodrun would want SSH to the workers
        controller="mpi",
        network_interface="eth0",
        launcher=KubernetesLauncher(kubeflow=True),
    )
    register(train, "digits-pytorch-horovod-kubeflow")
