"""PyTorch DDP training (1 node x 2 processes via torchrun) on the digits data, then registration.

Scheduled daily so backfills retrain per date; ``dag_run.conf`` may override epochs and lr.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_dnntrain.operators import PyTorchTrainOperator, RegisterModelOperator
from airflow_provider_dnntrain.spec import TorchDistributed

SCRIPTS = str(Path(__file__).parent / "scripts")
# Scheduled runs and backfills have a logical date; runs triggered from the UI or the API may not.
TRAINING_DATE = "{{ (dag_run.logical_date or dag_run.run_after) | ds }}"

with DAG(
    dag_id="dnntrain_pytorch_ddp",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"epochs": Param(3, type="integer", minimum=1), "lr": Param(0.05, type="number")},
    tags=["dnntrain", "pytorch"],
) as dag:
    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "{{ params.epochs }}", "--lr", "{{ params.lr }}"],
        distribution=TorchDistributed(node_count=1, process_count_per_node=2),
        environment_variables={"TRAINING_DATE": TRAINING_DATE},
    )
    register = RegisterModelOperator(
        task_id="register",
        run_id="{{ ti.xcom_pull(task_ids='train')['run_id'] }}",
        model_name="digits-pytorch-ddp",
        model_path="model",
        tags={"dataset": "sklearn-digits", "training_date": TRAINING_DATE},
    )
    train >> register
