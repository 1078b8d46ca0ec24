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

with DAG("dnntrain_service_torchrun", schedule=None, start_date=START):
    PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="ranks.py",
        arguments=SLEEPING_RANKS,
        distribution=TorchDistributed(node_count=1, process_count_per_node=2),
    )

with DAG("dnntrain_service_mpirun", schedule=None, start_date=START):
    PyTorchHorovodOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="ranks.py",
        arguments=SLEEPING_RANKS,
        process_count_per_node=2,
        runner="mpirun",
        controller="mpi",
    )

with DAG("dnntrain_service_timeout", schedule=None, start_date=START):
    PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="ranks.py",
        arguments=SLEEPING_RANKS,
        distribution=TorchDistributed(node_count=1, process_count_per_node=2),
        execution_timeout=timedelta(seconds=15),
    )

# Ranks that ignore SIGTERM (TensorFlow catches it): on_kill cannot finish before the supervisor's
# SIGKILL, the reapers must.
with DAG("dnntrain_service_stubborn", schedule=None, start_date=START):
    PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="ranks.py",
        arguments=[*SLEEPING_RANKS, "--ignore-term"],
        distribution=TorchDistributed(node_count=1, process_count_per_node=2),
    )
