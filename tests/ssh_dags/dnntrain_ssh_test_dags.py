"""DAGs the SSH launcher's tests run through dag.test(): every topology on the test hosts (connections
ssh_h0..ssh_h2, defined by the tests as AIRFLOW_CONN_* variables). The DAGs are the example DAGs' tasks
with only ``launcher=`` changed."""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.launchers import SSHLauncher, SSHServing
from airflow_provider_dnntrain.operators import (
    DeployModelOperator,
    PyTorchHorovodOperator,
    PyTorchTrainOperator,
    RegisterModelOperator,
    TensorFlowTrainOperator,
    UndeployModelOperator,
)
from airflow_provider_dnntrain.spec import MultiWorkerMirrored, ParameterServer, TorchDistributed

EXAMPLE_SCRIPTS = str(Path(__file__).resolve().parents[2] / "dags" / "scripts")
TEST_SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
START = pendulum.datetime(2026, 1, 1, tz="UTC")
HOSTS = ["ssh_h0", "ssh_h1", "ssh_h2"]


def ssh_launcher() -> SSHLauncher:
    # Short timeouts, so that the failure tests take seconds.
    return SSHLauncher(ssh_conn_ids=HOSTS, stop_grace_seconds=3, unreachable_timeout=10, orphan_timeout=15)


with DAG("dnntrain_ssh_parameter_server", schedule=None, start_date=START):
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="tf_parameter_server_digits.py",
        arguments=["--epochs", "2"],
        distribution=ParameterServer(worker_count=1, parameter_server_count=1, chief=True),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher=ssh_launcher(),
    )
    RegisterModelOperator(task_id="register", run_id=train.output, model_name="ssh-tf-ps", model_path="model")

for dag_id, runner, controller in [
    ("dnntrain_ssh_horovod_mpirun", "mpirun", "mpi"),
    ("dnntrain_ssh_horovod_gloo", "horovodrun", "gloo"),
]:
    with DAG(dag_id, schedule=None, start_date=START):
        PyTorchHorovodOperator(
            task_id="train",
            source_directory=EXAMPLE_SCRIPTS,
            entry_script="torch_horovod_digits.py",
            arguments=["--epochs", "2"],
            node_count=2,
            runner=runner,
            controller=controller,
            network_interface="eth0",  # the hosts' private network
            launcher=ssh_launcher(),
        )

with DAG("dnntrain_ssh_multi_worker", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="tf_multi_worker_digits.py",
        arguments=["--epochs", "2"],
        distribution=MultiWorkerMirrored(worker_count=2),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher=ssh_launcher(),
    )

with DAG("dnntrain_ssh_torch_c10d", schedule=None, start_date=START):
    PyTorchTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1, rendezvous="c10d"),
        launcher=ssh_launcher(),
    )

# Rank 0 logs its metrics late: after the test has dropped every connection to its host.
with DAG("dnntrain_ssh_late_metrics", schedule=None, start_date=START):
    PyTorchTrainOperator(
        task_id="train",
        source_directory=TEST_SCRIPTS,
        entry_script="ranks.py",
        arguments=["--sleep", "12", "--late", "--log-metrics", "3"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=ssh_launcher(),
    )

# Three workers, one per host, on tests/scripts/replica.py: each replica's behaviour is chosen by flags.
for dag_id, arguments, deferrable in [
    (
        "dnntrain_ssh_failing_replica",
        ["--fail", "worker-2:3", "--serve", "worker-0", "--serve", "worker-1"],
        False,
    ),
    ("dnntrain_ssh_serving", ["--spawn"], False),  # every worker runs (with children) until stopped
    ("dnntrain_ssh_serving_deferred", ["--spawn"], True),
]:
    with DAG(dag_id, schedule=None, start_date=START):
        TensorFlowTrainOperator(
            task_id="train",
            source_directory=TEST_SCRIPTS,
            entry_script="replica.py",
            arguments=arguments,
            distribution=MultiWorkerMirrored(worker_count=3),
            launcher=ssh_launcher(),
            job_timeout=120,
            deferrable=deferrable,
            tracking=not deferrable,  # a deferred task leaves the worker that relays the embedded store
        )

with DAG("dnntrain_ssh_conf_arguments", schedule=None, start_date=START, render_template_as_native_obj=True):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=TEST_SCRIPTS,
        entry_script="replica.py",
        arguments="{{ dag_run.conf['args'] }}",
        distribution=MultiWorkerMirrored(worker_count=3),
        environment_variables={"FROM_CONF": "{{ dag_run.conf['env_value'] }}"},
        secret_variables={"API_TOKEN": "{{ dag_run.conf['token'] }}"},
        launcher=SSHLauncher(ssh_conn_ids=HOSTS, keep_remote_files=True),
    )

with DAG("dnntrain_ssh_unknown_host_key", schedule=None, start_date=START):
    TensorFlowTrainOperator(
        task_id="train",
        source_directory=TEST_SCRIPTS,
        entry_script="replica.py",
        launcher=SSHLauncher(ssh_conn_ids=["ssh_unpinned"]),
        tracking=False,
    )

with DAG("dnntrain_ssh_deferrable", schedule=None, start_date=START):
    PyTorchTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=ssh_launcher(),
        deferrable=True,
        tracking=False,  # the embedded store is reached through the worker, which a deferred task leaves
    )

with DAG("dnntrain_ssh_deferrable_embedded_store", schedule=None, start_date=START):
    PyTorchTrainOperator(
        task_id="train",
        source_directory=EXAMPLE_SCRIPTS,
        entry_script="torch_ddp_digits.py",
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=ssh_launcher(),
        deferrable=True,
    )


# -- deployment on a host ---------------------------------------------------------------------------

for dag_id, smoke_test in (("dnntrain_ssh_deploy", None), ("dnntrain_ssh_deploy_wrong_rows", [[1.0, 2.0]])):
    with DAG(dag_id, schedule=None, start_date=START, params={"model": "models:/tiny-served/1"}):
        DeployModelOperator(
            task_id="deploy",
            model="{{ params.model }}",
            endpoint="tiny-ssh",
            serving=SSHServing(ssh_conn_id="ssh_h0"),
            smoke_test=smoke_test,
        )

with DAG("dnntrain_ssh_undeploy", schedule=None, start_date=START):
    UndeployModelOperator(task_id="undeploy", endpoint="tiny-ssh", serving=SSHServing(ssh_conn_id="ssh_h0"))
