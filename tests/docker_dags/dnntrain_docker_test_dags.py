"""DAGs the Docker tests run through dag.test(): topologies beyond the example DAGs' (c10d rendezvous,
horovodrun over Gloo, TensorFlow's MultiWorkerMirroredStrategy, TensorFlow's Horovod on two nodes), a
deferred wait, and the SSH serving tests' deploy and undeploy DAGs with only ``serving=`` changed. The
daemon is the environment's (``DOCKER_HOST``, set by the tests to their own)."""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.launchers import DockerLauncher, DockerServing
from airflow_provider_dnntrain.operators import (
    DeployModelOperator,
    PyTorchHorovodOperator,
    PyTorchTrainOperator,
    TensorFlowTrainOperator,
    UndeployModelOperator,
)
from airflow_provider_dnntrain.spec import Horovod, MultiWorkerMirrored, TorchDistributed

START = pendulum.datetime(2026, 1, 1, tz="UTC")
EXAMPLE_SCRIPTS = str(Path(__file__).resolve().parents[2] / "dags" / "scripts")

# -- training ---------------------------------------------------------------------------------------

with DAG("dnntrain_docker_ddp_c10d_deferred", schedule=None, start_date=START):
    PyTorchTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1, rendezvous="c10d"),
        launcher=DockerLauncher(stop_grace_seconds=2),
        deferrable=True,
        tracking=False,  # the embedded store is served through the worker, which a deferred task leaves
    )

with DAG("dnntrain_docker_horovod_gloo", schedule=None, start_date=START):
    PyTorchHorovodOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="torch_horovod_digits.py",
        arguments=["--epochs", "2"],
        process_count_per_node=2,
        controller="gloo",
        launcher=DockerLauncher(stop_grace_seconds=2),
        tracking=False,
    )

with DAG("dnntrain_docker_tf_multi_worker", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="tf_multi_worker_digits.py",
        arguments=["--epochs", "2"],
        distribution=MultiWorkerMirrored(worker_count=2),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher=DockerLauncher(stop_grace_seconds=2),
        tracking=False,
    )

with DAG("dnntrain_docker_tf_horovod_two_nodes", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="tf_horovod_digits.py",
        arguments=["--epochs", "2"],
        distribution=Horovod(node_count=2, runner="mpirun", controller="mpi", network_interface="eth0"),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher=DockerLauncher(stop_grace_seconds=2),
        tracking=False,
    )

# -- serving ----------------------------------------------------------------------------------------

for dag_id, smoke_test in (
    ("dnntrain_docker_deploy", None),
    ("dnntrain_docker_deploy_wrong_rows", [[1.0, 2.0]]),
):
    with DAG(dag_id, schedule=None, start_date=START, params={"model": "models:/tiny-served/1"}):
        DeployModelOperator(
            task_id="deploy",
            model="{{ params.model }}",
            endpoint="tiny-docker",
            serving=DockerServing(startup_timeout=60),
            smoke_test=smoke_test,
        )

with DAG("dnntrain_docker_undeploy", schedule=None, start_date=START):
    UndeployModelOperator(task_id="undeploy", endpoint="tiny-docker", serving=DockerServing())
