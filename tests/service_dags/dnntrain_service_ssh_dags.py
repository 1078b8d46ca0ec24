"""DAGs the real-Airflow suite runs on the SSH launcher (connections ssh_h0, ssh_h1 in the components'
environment): every rank sleeps, then rank 0 logs metrics, so a task can be ended or taken over mid-run."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.launchers import SSHLauncher
from airflow_provider_dnntrain.operators import PyTorchTrainOperator
from airflow_provider_dnntrain.spec import TorchDistributed

SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
START = pendulum.datetime(2026, 1, 1, tz="UTC")
GO_AHEAD = "go-ahead"  # a rank that waits for it ends its sleep once the test puts it in its folder


def ssh_dag(dag_id: str, sleep: int, *, arguments=("--late", "--log-metrics", "3"), **operator_args) -> DAG:
    with DAG(dag_id, schedule=None, start_date=START) as dag:
        PyTorchTrainOperator(
            task_id="train",
            source_directory=SCRIPTS,
            entry_script="ranks.py",
            arguments=["--spawn", "--sleep", str(sleep), *arguments],
            distribution=TorchDistributed(node_count=2, process_count_per_node=1),
            launcher=SSHLauncher(ssh_conn_ids=["ssh_h0", "ssh_h1"], stop_grace_seconds=3, orphan_timeout=150),
            **operator_args,
        )
    return dag


# A worker that dies mid-run: the next try takes the replicas over.
resumed = ssh_dag(
    "dnntrain_service_ssh_resumed",
    120,  # or until the test says the next try has taken over (GO_AHEAD in the ranks' folder)
    arguments=("--until", GO_AHEAD, "--late", "--log-metrics", "3"),
    retries=1,
    retry_delay=timedelta(seconds=1),
)
# Waits on the triggerer; the test marks it failed while deferred.
deferred = ssh_dag("dnntrain_service_ssh_deferred", 600, deferrable=True, tracking=False)
# Numbered lines while the triggerer is restarted: each must reach the task log once.
ticking = ssh_dag(
    "dnntrain_service_ssh_ticking",
    0,
    arguments=("--ticks", "90", "--tick-seconds", "0.25"),
    deferrable=True,
    tracking=False,
)
# Ended from outside while they run: marked failed or success, timed out; the stubborn ones' ranks
# ignore SIGTERM (as TensorFlow does), so on_kill cannot finish before the supervisor's SIGKILL.
serving = ssh_dag("dnntrain_service_ssh_serving", 600, arguments=())
stubborn = ssh_dag("dnntrain_service_ssh_stubborn", 600, arguments=("--ignore-term",))
timeout = ssh_dag("dnntrain_service_ssh_timeout", 600, arguments=(), execution_timeout=timedelta(seconds=20))
