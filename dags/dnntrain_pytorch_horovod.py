"""PyTorch with Horovod (1 node x 2 ranks, horovodrun with the Gloo controller), then registration."""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_dnntrain.operators import PyTorchHorovodOperator, RegisterModelOperator

SCRIPTS = str(Path(__file__).parent / "scripts")

with DAG(
    dag_id="dnntrain_pytorch_horovod",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"epochs": Param(3, type="integer", minimum=1), "lr": Param(0.05, type="number")},
    tags=["dnntrain", "pytorch", "horovod"],
) as dag:
    train = PyTorchHorovodOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_horovod_digits.py",
        arguments=["--epochs", "{{ params.epochs }}", "--lr", "{{ params.lr }}"],
        node_count=1,
        process_count_per_node=2,
        controller="gloo",
    )
    register = RegisterModelOperator(
        task_id="register",
        run_id=train.output,
        model_name="digits-pytorch-horovod",
        tags={"dataset": "sklearn-digits"},
    )
