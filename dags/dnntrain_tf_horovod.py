"""TensorFlow with Horovod (1 node x 2 ranks started by Open MPI's mpirun), then registration."""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_dnntrain.operators import RegisterModelOperator, TensorFlowTrainOperator
from airflow_provider_dnntrain.spec import Horovod

SCRIPTS = str(Path(__file__).parent / "scripts")

with DAG(
    dag_id="dnntrain_tf_horovod",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"epochs": Param(3, type="integer", minimum=1), "lr": Param(0.05, type="number")},
    tags=["dnntrain", "tensorflow", "horovod"],
) as dag:
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="tf_horovod_digits.py",
        arguments=["--epochs", "{{ params.epochs }}", "--lr", "{{ params.lr }}"],
        distribution=Horovod(node_count=1, process_count_per_node=2, runner="mpirun", controller="mpi"),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    register = RegisterModelOperator(
        task_id="register",
        run_id=train.output,
        model_name="digits-tf-horovod",
        tags={"dataset": "sklearn-digits"},
    )
