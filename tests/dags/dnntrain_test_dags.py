"""DAGs the operator tests run through dag.test() and `airflow dags test`, on tests/scripts/replica.py."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.launchers import LocalLauncher
from airflow_provider_dnntrain.operators import (
    DeployModelOperator,
    PyTorchHorovodOperator,
    PyTorchTrainOperator,
    RegisterModelOperator,
    TensorFlowTrainOperator,
    UndeployModelOperator,
)
from airflow_provider_dnntrain.spec import (
    Input,
    MultiWorkerMirrored,
    ResourceConfiguration,
    Resources,
    TorchDistributed,
)

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
        # worker-1 fails once the chief has written its outputs, which the failed run keeps
        arguments=["--sleep", "3", "--fail", "worker-1:3", "--serve", "worker-0"],
        distribution=MultiWorkerMirrored(worker_count=2),
    )

with DAG("dnntrain_test_killed", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        arguments=["--spawn", "--ignore-term"],
        distribution=MultiWorkerMirrored(worker_count=2),
    )


class SlowSnapshotLauncher(LocalLauncher):
    """Submits as slowly as a large source folder would: a kill can arrive while it does."""

    def submit(self, job, plan, extra_env, **kwargs):
        marker = self.run_dir(plan.run_id).parent / f"{plan.run_id}.submitting"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        time.sleep(5)
        return super().submit(job, plan, extra_env, **kwargs)


with DAG("dnntrain_test_killed_while_submitting", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        arguments=["--spawn"],
        distribution=MultiWorkerMirrored(worker_count=2),
        launcher=SlowSnapshotLauncher(),
    )

with DAG("dnntrain_test_register_without_model", schedule=None, start_date=START):
    train = TensorFlowTrainOperator(
        task_id="train", source_directory=SCRIPTS, entry_script="replica.py", arguments=["--lines", "3"]
    )
    RegisterModelOperator(task_id="register", run_id=train.output, model_name="nothing-here")

with DAG("dnntrain_test_register_model", schedule=None, start_date=START):
    train = PyTorchTrainOperator(
        task_id="train", source_directory=SCRIPTS, entry_script="tiny_model.py", arguments=["2.0"]
    )
    RegisterModelOperator(
        task_id="register",
        run_id=train.output,
        model_name="tiny",
        model_framework="PyTorch",
        model_framework_version="2.13.0",
        resource_configuration=ResourceConfiguration(cpu=0.5, memory_in_gb=1),
    )
    RegisterModelOperator(
        task_id="register_templated", run_id=train.output, model_name="tiny-{{ dag_run.conf['suffix'] }}"
    )
    # The model's own file named: its input example is found beside it.
    RegisterModelOperator(
        task_id="register_file", run_id=train.output, model_name="tiny-file", model_path="model/model.pt"
    )

# -- deployment ---------------------------------------------------------------------------------------

with DAG("dnntrain_test_train_tiny", schedule=None, start_date=START, params={"scale": 2.0}):
    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="tiny_model.py",
        arguments=["{{ params.scale }}"],
    )
    RegisterModelOperator(
        task_id="register",
        run_id=train.output,
        model_name="tiny-served",
        resource_configuration=ResourceConfiguration(cpu=0.5, memory_in_gb=1),  # a pod's resources
    )

MODEL_FROM_CONF = {"model": "models:/tiny-served/1"}
with DAG("dnntrain_test_deploy", schedule=None, start_date=START, params=MODEL_FROM_CONF):
    DeployModelOperator(
        task_id="deploy", model="{{ params.model }}", endpoint="tiny", promote_alias="champion"
    )

with DAG("dnntrain_test_deploy_gated", schedule=None, start_date=START, params=MODEL_FROM_CONF):
    DeployModelOperator(
        task_id="deploy",
        model="{{ params.model }}",
        endpoint="tiny",
        promote_alias="champion",
        must_beat="champion",
        metric="score",
    )

with DAG("dnntrain_test_deploy_wrong_rows", schedule=None, start_date=START, params=MODEL_FROM_CONF):
    DeployModelOperator(
        task_id="deploy", model="{{ params.model }}", endpoint="tiny", smoke_test=[[1.0, 2.0]]
    )

with DAG("dnntrain_test_undeploy", schedule=None, start_date=START):
    UndeployModelOperator(task_id="undeploy", endpoint="tiny", forget_key=True)

with DAG("dnntrain_test_mapped_sweep", schedule=None, start_date=START):
    TensorFlowTrainOperator.partial(
        task_id="train", source_directory=SCRIPTS, entry_script="replica.py", tracking=False
    ).expand(arguments=[["--lr", "0.1"], ["--lr", "0.01"]])

# -- what reaches the job ---------------------------------------------------------------------------

with DAG("dnntrain_test_job_resources", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="resources_object",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        resources=Resources(use_gpu=True, cpu=2),
    )
    TensorFlowTrainOperator(
        task_id="resources_dict",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        resources={"memory": "2Gi"},
    )
    TensorFlowTrainOperator(
        task_id="use_gpu", source_directory=SCRIPTS, entry_script="replica.py", use_gpu=True
    )
    TensorFlowTrainOperator(
        task_id="airflow_resources",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        resources={"cpus": 2},
    )

with DAG("dnntrain_test_templated_inputs", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        inputs=[Input(name="train_data", path="{{ dag_run.conf['data'] }}/{{ ds }}", argument="--data")],
        tracking=False,
    )

# Metrics logged asynchronously by a script that never ends its MLflow run: none may be lost at exit.
with DAG("dnntrain_test_metrics_every_batch", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train", source_directory=SCRIPTS, entry_script="log_every_batch.py", arguments=["200", "1"]
    )

# A UI trigger's conf names where the data is: the connection's credentials must not follow it elsewhere.
with DAG("dnntrain_test_conf_input_uri", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        inputs=[Input(name="train_data", uri="{{ dag_run.conf['data'] }}", conn_id="web_reader")],
        tracking=False,
    )

# Every rank logs `loss`: the run must hold rank 0's only, each other rank a child run of its own.
RANKS_LOGGING = {"source_directory": SCRIPTS, "entry_script": "ranks.py", "arguments": ["--log-metrics", "6"]}

with DAG("dnntrain_test_rank_metrics", schedule=None, start_date=START):
    PyTorchHorovodOperator(
        task_id="mpirun", process_count_per_node=2, runner="mpirun", controller="mpi", **RANKS_LOGGING
    )
    PyTorchHorovodOperator(task_id="horovodrun", process_count_per_node=2, controller="gloo", **RANKS_LOGGING)
    PyTorchTrainOperator(
        task_id="torchrun",
        distribution=TorchDistributed(node_count=1, process_count_per_node=2),
        **RANKS_LOGGING,
    )
    TensorFlowTrainOperator(
        task_id="multi_worker", distribution=MultiWorkerMirrored(worker_count=2), **RANKS_LOGGING
    )

with DAG("dnntrain_test_secret_printed", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="replica.py",
        arguments=["--print-env", "API_TOKEN"],
        distribution=MultiWorkerMirrored(worker_count=2),
        secret_variables={"API_TOKEN": "{{ dag_run.conf['token'] }}"},
    )

with DAG("dnntrain_test_tracking_server", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="with_connection",
        source_directory=SCRIPTS,
        entry_script="ranks.py",
        arguments=["--log-metrics", "3", "--print-env", "MLFLOW_TRACKING_PASSWORD"],
    )
    TensorFlowTrainOperator(
        task_id="with_uri",
        source_directory=SCRIPTS,
        entry_script="ranks.py",
        arguments=["--log-metrics", "3", "--print-env", "MLFLOW_TRACKING_PASSWORD"],
        tracking_uri="{{ dag_run.conf['tracking_uri'] }}",
        tracking_conn_id=None,
    )

with DAG("dnntrain_test_azureml_compat", schedule=None, start_date=START):
    # A script written for Azure ML, and Azure's estimator arguments: Horovod under mpirun, 2 ranks.
    PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="azure_style.py",
        script_params={"--epochs": "3"},
        distributed_backend="mpi",
        process_count_per_node=2,
        inputs=[Input(name="digits", path=SCRIPTS)],
        azureml_compat=True,
    )

EXAMPLE_SCRIPTS = str(Path(__file__).resolve().parents[2] / "dags" / "scripts")

with DAG("dnntrain_test_resume", schedule=None, start_date=START):
    # The same DDP job twice: the test kills the first one's ranks mid-way; its retry resumes.
    for name, retries in (("interrupted", 1), ("uninterrupted", 0)):
        PyTorchTrainOperator(
            task_id=name,
            source_directory=EXAMPLE_SCRIPTS,
            entry_script="torch_ddp_digits.py",
            arguments=["--epochs", "60"],
            distribution=TorchDistributed(node_count=1, process_count_per_node=2),
            retries=retries,
            retry_delay=timedelta(0),
        )

# Datasets by URI: a file from the test's object store (download), a folder as is (mount).
with DAG("dnntrain_test_downloaded_inputs", schedule=None, start_date=START):
    PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="reads_inputs.py",
        inputs=[
            Input(name="digits", uri="{{ dag_run.conf['uri'] }}", argument="--data-folder"),
            Input(name="labels", uri="{{ dag_run.conf['labels'] }}", mode="mount"),
        ],
    )
