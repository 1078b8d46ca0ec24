"""TensorFlow MultiWorkerMirrored training (2 workers) on the digits data, then registration."""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_dnntrain.operators import RegisterModelOperator, TensorFlowTrainOperator
from airflow_provider_dnntrain.spec import MultiWorkerMirrored

SCRIPTS = str(Path(__file__).parent / "scripts")

with DAG(
    dag_id="dnntrain_tf_multi_worker",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"epochs": Param(3, type="integer", minimum=1), "lr": Param(0.1, type="number")},
    tags=["dnntrain", "tensorflow"],
) as dag:
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="tf_multi_worker_digits.py",
        arguments={"--epochs": "{{ params.epochs }}", "--lr": "{{ params.lr }}"},
        distribution=MultiWorkerMirrored(worker_count=2),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    register = RegisterModelOperator(
        task_id="register",
        run_id=train.output,
        model_name="digits-tf-multi-worker",
        model_path="model",
        tags={"dataset": "sklearn-digits"},
    )
