"""On one Docker host: the example DAGs' tasks with only ``launcher=`` changed, then registration.

``dnntrain_docker_pytorch_ddp`` (2 nodes, torchrun: two containers that find each other by name on the
run's own network), ``dnntrain_docker_pytorch_horovod`` (one container, 2 ranks started by mpirun) and
``dnntrain_docker_tensorflow_ps`` (a chief, 2 workers and a parameter server: four containers, each
given its ``TF_CONFIG``). The containers run the project's training image for the framework (``make
images``: ``dnntrain-torch:cpu``, ``dnntrain-tensorflow:cpu``). The daemon is the environment's
(``DOCKER_HOST``, or the local socket); the embedded tracking store is served to the containers by the
task, on the run network's gateway.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_dnntrain.launchers import DockerLauncher
from airflow_provider_dnntrain.operators import (
    PyTorchHorovodOperator,
    PyTorchTrainOperator,
    RegisterModelOperator,
    TensorFlowTrainOperator,
)
from airflow_provider_dnntrain.spec import ParameterServer, TorchDistributed

SCRIPTS = str(Path(__file__).parent / "scripts")
ARGUMENTS = ["--epochs", "{{ params.epochs }}", "--lr", "{{ params.lr }}"]


def docker_dag(dag_id: str, framework: str = "pytorch") -> DAG:
    return DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        params={"epochs": Param(3, type="integer", minimum=1), "lr": Param(0.05, type="number")},
        tags=["dnntrain", framework, "docker"],
    )


with docker_dag("dnntrain_docker_pytorch_ddp"):
    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=ARGUMENTS,
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=DockerLauncher(),
    )
    RegisterModelOperator(
        task_id="register", run_id=train.output, model_name="digits-pytorch-ddp-docker", model_path="model"
    )

with docker_dag("dnntrain_docker_pytorch_horovod"):
    train = PyTorchHorovodOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_horovod_digits.py",
        arguments=ARGUMENTS,
        process_count_per_node=2,
        runner="mpirun",
        controller="mpi",
        launcher=DockerLauncher(),
    )
    RegisterModelOperator(
        task_id="register",
        run_id=train.output,
        model_name="digits-pytorch-horovod-docker",
        model_path="model",
    )

with docker_dag("dnntrain_docker_tensorflow_ps", "tensorflow"):
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="tf_parameter_server_digits.py",
        arguments=ARGUMENTS,
        distribution=ParameterServer(worker_count=2, parameter_server_count=1, chief=True),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher=DockerLauncher(),
    )
    RegisterModelOperator(
        task_id="register", run_id=train.output, model_name="digits-tf-ps-docker", model_path="model"
    )
