"""Train, register, deploy: the second half of a retraining pipeline, on the local backend.

- ``dnntrain_deploy_digits`` (what ``make demo`` runs): TensorFlow MultiWorkerMirrored training, the
  model registered, served at the endpoint ``digits`` (blue/green, smoke-tested) and promoted to
  ``champion``.
- ``dnntrain_retrain_digits``: weekly PyTorch DDP retraining whose new version is deployed only if its
  accuracy beats the champion's (else the deploy is skipped, saying why), then promoted.
- ``dnntrain_stage_digits``: scheduled on the Asset of that model: every new version is deployed to a
  staging endpoint as soon as it is registered.
- ``dnntrain_canary_digits`` (needs a cluster: connection ``kubernetes_default``): retraining on
  Kubernetes, gated, deployed as a canary taking about 20% of the requests until an hour after the
  run's interval ended, then given all of them and promoted.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_dnntrain.launchers import KubernetesLauncher, KubernetesServing
from airflow_provider_dnntrain.operators import (
    DeployModelOperator,
    PyTorchTrainOperator,
    RegisterModelOperator,
    TensorFlowTrainOperator,
)
from airflow_provider_dnntrain.operators.register import model_asset
from airflow_provider_dnntrain.spec import MultiWorkerMirrored, TorchDistributed

SCRIPTS = str(Path(__file__).parent / "scripts")
START = pendulum.datetime(2026, 1, 1, tz="UTC")
REGISTERED = "{{ ti.xcom_pull(task_ids='register') }}"

with DAG(
    dag_id="dnntrain_deploy_digits",
    schedule=None,
    start_date=START,
    params={"epochs": Param(3, type="integer", minimum=1)},
    tags=["dnntrain", "tensorflow", "deploy"],
):
    train = TensorFlowTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="tf_multi_worker_digits.py",
        arguments={"--epochs": "{{ params.epochs }}"},
        distribution=MultiWorkerMirrored(worker_count=2),
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    register = RegisterModelOperator(task_id="register", run_id=train.output, model_name="digits")
    deploy = DeployModelOperator(
        task_id="deploy", model=f"models:/digits/{REGISTERED}", endpoint="digits", promote_alias="champion"
    )
    train >> register >> deploy

with DAG(
    dag_id="dnntrain_retrain_digits",
    schedule="@weekly",
    start_date=START,
    catchup=False,
    params={"epochs": Param(3, type="integer", minimum=1)},
    tags=["dnntrain", "pytorch", "deploy"],
):
    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "{{ params.epochs }}"],
        distribution=TorchDistributed(node_count=1, process_count_per_node=2),
    )
    register = RegisterModelOperator(task_id="register", run_id=train.output, model_name="digits-ddp")
    deploy = DeployModelOperator(
        task_id="deploy",
        model=f"models:/digits-ddp/{REGISTERED}",
        endpoint="digits-ddp",
        must_beat="champion",  # the quality gate: better accuracy than the serving champion, or skip
        metric="accuracy",
        promote_alias="champion",
    )
    train >> register >> deploy

with DAG(
    dag_id="dnntrain_stage_digits",
    schedule=[model_asset("digits-ddp")],  # each new registered version
    start_date=START,
    tags=["dnntrain", "deploy"],
):
    DeployModelOperator(
        task_id="deploy_to_staging",
        model="{{ (triggering_asset_events.values() | first | last).extra['model_uri'] }}",
        endpoint="digits-ddp-staging",
    )

with DAG(
    dag_id="dnntrain_canary_digits",
    schedule="@weekly",
    start_date=START,
    catchup=False,
    tags=["dnntrain", "pytorch", "deploy", "kubernetes"],
):
    from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor

    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "3"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=KubernetesLauncher(),
    )
    register = RegisterModelOperator(task_id="register", run_id=train.output, model_name="digits-k8s")
    serving = KubernetesServing(replicas=4)  # the serving version's 4 pods, and 1 of the canary
    canary = DeployModelOperator(
        task_id="canary",
        model=f"models:/digits-k8s/{REGISTERED}",
        endpoint="digits",
        serving=serving,
        must_beat="champion",
        metric="accuracy",
        canary_traffic_percent=20,
    )
    watch = TimeDeltaSensor(task_id="watch_the_canary", delta=pendulum.duration(hours=1), deferrable=True)
    promote = DeployModelOperator(
        task_id="promote",
        model=f"models:/digits-k8s/{REGISTERED}",
        endpoint="digits",
        serving=serving,
        canary_traffic_percent=100,
        promote_alias="champion",
    )
    train >> register >> canary >> watch >> promote
