"""DAGs the operator tests run through dag.test() and `airflow dags test`, on tests/scripts/replica.py."""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.operators import RegisterModelOperator, TensorFlowTrainOperator
from airflow_provider_dnntrain.spec import MultiWorkerMirrored

SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
START = pendulum.datetime(2026, 1, 1, tz="UTC")

with DAG("dnntrain_test_conf_arguments", schedule=None, start_date=START, render_template_as_native_obj=True):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        arguments="{{ dag_run.conf['args'] }}",
        distribution=MultiWorkerMirrored(worker_count=2),
        environment_variables={"FROM_CONF": "{{ dag_run.conf['env_value'] }}"},
        secret_variables={"API_TOKEN": "{{ dag_run.conf['token'] }}"},
    )

with DAG("dnntrain_test_templated_flags", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        arguments={"--name": "{{ dag_run.conf['name'] }}", "--date": "{{ ds }}"},
        tracking=False,
    )

with DAG("dnntrain_test_failing_replica", schedule=None, start_date=START):
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        arguments=["--fail", "worker-1:3", "--serve", "worker-0"],
        distribution=MultiWorkerMirrored(worker_count=2),
    )

with DAG("dnntrain_test_killed", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        arguments=["--spawn", "--ignore-term"],
        distribution=MultiWorkerMirrored(worker_count=2),
        tracking=False,
    )

with DAG("dnntrain_test_register_without_model", schedule=None, start_date=START):
    train = TensorFlowTrainOperator(
        task_id="train", source_directory=SCRIPTS, entry_script="replica.py", arguments=["--lines", "3"]
    )
    RegisterModelOperator(task_id="register", run_id=train.output, model_name="nothing-here")

with DAG("dnntrain_test_mapped_sweep", schedule=None, start_date=START):
    TensorFlowTrainOperator.partial(
        task_id="train", source_directory=SCRIPTS, entry_script="replica.py", tracking=False
    ).expand(arguments=[["--lr", "0.1"], ["--lr", "0.01"]])
