"""DAGs the real-Airflow suite triggers through the REST API and then ends from outside while they run.

Every rank sleeps with a child of its own, so anything left behind is visible in the process table."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.operators import PyTorchHorovodOperator, PyTorchTrainOperator
from airflow_provider_dnntrain.spec import TorchDistributed

SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
START = pendulum.datetime(2026, 1, 1, tz="UTC")
SLEEPING_RANKS = ["--spawn", "--sleep", "600"]


def torchrun_dag(dag_id: str, arguments: list[str] = SLEEPING_RANKS, **operator_args) -> DAG:
    with DAG(dag_id, schedule=None, start_date=START) as dag:
        PyTorchTrainOperator(
            task_id="train",
            source_directory=SCRIPTS,
            entry_script="ranks.py",
            arguments=arguments,
            distribution=TorchDistributed(node_count=1, process_count_per_node=2),
            **operator_args,
        )
    return dag


torchrun = torchrun_dag("dnntrain_service_torchrun")
timeout = torchrun_dag("dnntrain_service_timeout", execution_timeout=timedelta(seconds=15))
# Ranks that ignore SIGTERM (TensorFlow catches it): on_kill cannot finish before the supervisor's
# SIGKILL, the reapers must.
stubborn = torchrun_dag("dnntrain_service_stubborn", [*SLEEPING_RANKS, "--ignore-term"])

with DAG("dnntrain_service_mpirun", schedule=None, start_date=START) as mpirun:
    PyTorchHorovodOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="ranks.py",
        arguments=SLEEPING_RANKS,
        process_count_per_node=2,
        runner="mpirun",
        controller="mpi",
    )
